"""What a sweep takes from the user and writes back: a method's default lr per trial, folder names that stay
under output.dir, a storage password that no file holds, warnings instead of silence, and `error: ...` only
for the user's errors (a bug keeps its traceback)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.config import ConfigError, load_config
from slimtune.methods import REGISTRY
from slimtune.sweep.space import sweep_base, trial_config
from slimtune.sweep.storage import STORAGE_ENV, is_masked, mask_url
from slimtune.sweep.plan import SweepError, SweepPlan

from conftest import cls_config
from sweep_plans import sweep_plan

runner = CliRunner(env={"COLUMNS": "200"})
TRAIN_DEFAULT_LR = 2e-3  # text-classification's TaskSpec.default_lr: the LoRA family's rate (lora has none of its own)


def flat(text: str) -> str:
    return " ".join(text.split())


def small(**sections) -> dict:
    return {"task": "text-classification", "model": {"name": "org/model"}, "data": {"train": "train.csv"}, **sections}


# -- a method's default lr --------------------------------------------------------

@pytest.mark.parametrize("base_method", ["ia3", "lora"])
def test_each_trial_gets_its_own_methods_default_lr(base_method):
    """No train.lr in the config (but a train section): a trial of lora gets the task's 2e-3 and one of ia3 gets
    ia3's 1e-2, whichever method the base config names; the base config does not carry the loaded method's default."""
    assert REGISTRY["ia3"].default_lr == pytest.approx(1e-2) and REGISTRY["lora"].default_lr is None
    cfg = load_config(small(method={"name": base_method}, train={"epochs": 1},
                            sweep={"params": {"method.name": ["lora", "ia3"]}, "trials": 2}))
    base = sweep_base(cfg)
    assert "lr" not in base["train"] and base["train"]["epochs"] == 1
    expected = {"lora": TRAIN_DEFAULT_LR, "ia3": REGISTRY["ia3"].default_lr}
    for name, lr in expected.items():
        trial = load_config(trial_config(base, {"method.name": name}))
        assert (trial.method.name, trial.train.lr) == (name, pytest.approx(lr))
    # a config object given to the sweep (load_config(RunConfig)) keeps the default a default too
    again = load_config(cfg)
    assert again == cfg and "lr" not in sweep_base(again)["train"]


def test_a_user_set_lr_is_carried_to_every_trial():
    for given in ({"train": {"epochs": 1, "lr": 3e-3}}, {"train": {"lr": 3e-3}}):
        cfg = load_config(small(method={"name": "ia3"}, **given,
                                sweep={"params": {"method.name": ["lora", "ia3"]}, "trials": 2}))
        base = sweep_base(cfg)
        assert base["train"]["lr"] == pytest.approx(3e-3)
        for name in ("lora", "ia3"):
            assert load_config(trial_config(base, {"method.name": name})).train.lr == pytest.approx(3e-3)
    # an override counts as the user's too
    cfg = load_config(small(method={"name": "ia3"}, sweep={"params": {"method.name": ["lora"]}, "trials": 1}),
                      ["train.lr=2e-3"])
    assert load_config(trial_config(sweep_base(cfg), {"method.name": "lora"})).train.lr == pytest.approx(2e-3)


# -- folder names -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", "a/../../x", "/tmp/x", ".", "a\\b"])
def test_sweep_name_must_be_a_plain_folder_name(name, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(small(output={"dir": str(tmp_path / "runs")},
                          sweep={"params": {"train.lr": [1e-4]}, "name": name}))
    msg = flat(str(info.value))
    assert f"sweep.name: {name!r} is not accepted" in msg and "plain folder name" in msg
    # the same from the command line (--name), before anything is written
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(yaml.safe_dump(small(output={"dir": str(tmp_path / "runs")},
                                        sweep={"params": {"train.lr": [1e-4]}})))
    res = runner.invoke(app, ["sweep", str(cfg), "--name", name])
    assert res.exit_code == 2 and f"sweep.name: {name!r} is not accepted" in flat(res.output), res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tune.yaml"]


def test_a_plain_sweep_name_is_accepted():
    assert load_config(small(sweep={"params": {"train.lr": [1e-4]}, "name": "lr.search_2"})).sweep.name == "lr.search_2"


# -- the storage password -------------------------------------------------------------

@pytest.mark.parametrize("url, secret", [
    ("postgresql://user:S3cret@host/db", "S3cret"),
    ("postgresql+psycopg2://user:S3cret@host:5432/db?sslmode=require", "S3cret"),
    ("postgresql://user:p@ss@word@host/db", "ss@word"),  # '@' in the password: the last '@' ends the user part
    ("postgresql://user:pa/ss@host/db", "pa/ss"),  # '/' in the password: no URL parser reads it
    ("postgresql://user:p%40ss@host/db", "p%40ss"),
    ("postgresql://:S3cret@host/db", "S3cret"),
    ("mysql://us er:S3cret@host/db", "S3cret"),
    ("postgresql://host/db?user=u&password=S3cret", "S3cret"),
    ("postgresql://host/db?sslpassword=S3cret&x=1", "S3cret"),
    ("user:S3cret@host/db", "S3cret"),  # not a URL at all
    ("://user:S3cret@", "S3cret"),
])
def test_mask_url_never_returns_the_password(url, secret):
    masked = mask_url(url)
    assert secret not in masked and "***" in masked and is_masked(masked), masked
    assert mask_url(masked) == masked


@pytest.mark.parametrize("url", ["sqlite:////tmp/a@b/study.db", "sqlite:///study.db",
                                 "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", "postgresql://host/db"])
def test_mask_url_keeps_urls_without_a_password(url):
    assert mask_url(url) == url and not is_masked(url)


def test_plan_file_holds_the_masked_url_and_workers_get_the_real_one(tmp_path, monkeypatch):
    from slimtune.sweep import study, worker

    real = "postgresql://slim:S3cret-pw@db.example/optuna"
    seen = {}

    class Proc:
        def __init__(self, args, env):
            seen["plan"] = Path(args[-2]).read_text()
            seen["env"] = env

        def wait(self):
            return 0

    monkeypatch.setattr(study.subprocess, "Popen", Proc)
    plan = sweep_plan(storage=real, threads=1)
    study._run_processes(plan, 2, tmp_path, print)
    assert "S3cret-pw" not in seen["plan"] and json.loads(seen["plan"])["storage"] == "postgresql://slim:***@db.example/optuna"
    assert seen["env"][STORAGE_ENV] == real
    # the file's keys are the ones plan files always had; a worker reads back the plan it was given
    assert list(json.loads(seen["plan"])) == ["sweep_dir", "sweep_name", "study_name", "storage", "base", "sweep",
                                              "monitor", "direction", "budget", "deadline", "seed", "threads",
                                              "parent_pid"]
    read = SweepPlan.from_dict(json.loads(seen["plan"]))
    assert read == dataclasses.replace(plan, storage=mask_url(real), parent_pid=os.getpid())
    # a worker process: the real URL from its environment, or a clear error without it
    monkeypatch.setenv(STORAGE_ENV, real)
    assert worker.run_time_url(mask_url(real)) == real
    monkeypatch.delenv(STORAGE_ENV)
    with pytest.raises(SweepError, match=f"masked.*set {STORAGE_ENV}"):
        worker.run_time_url(mask_url(real))
    assert worker.run_time_url("sqlite:///x.db") == "sqlite:///x.db"


def test_no_file_of_a_sweep_holds_the_storage_password(tiny_bert, cls_data, tmp_path, monkeypatch):
    """A sweep on a password-protected database (here served by SQLite: `make_storage` maps the URL), with a model
    given as a plain string and method.name swept without a train.lr: the trials get their method's default lr,
    the database gets the real URL, and no file anywhere under the output folder holds the password. Re-running
    from the saved sweep.yaml (masked) needs the URL again; $SLIMTUNE_SWEEP_STORAGE gives it."""
    from slimtune.sweep import study as study_mod, sweep, worker

    secret = "S3cret-pw"
    real = f"postgresql://slim:{secret}@db.example/optuna"
    out = tmp_path / "runs"
    connected = []

    def fake_storage(url):
        connected.append(url)
        return real_make_storage(url if worker.is_sqlite(url) else f"sqlite:///{out / 'sweep-tune' / 'fake-pg.db'}")

    real_make_storage = worker.make_storage
    monkeypatch.setattr(worker, "make_storage", fake_storage)
    monkeypatch.setattr(study_mod, "make_storage", fake_storage)
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    cfg = cls_config(tiny_bert, cls_data, out, max_steps=2, batch_size=16)
    cfg["model"] = tiny_bert  # the plain-string form
    del cfg["train"]["lr"]
    cfg["eval"] = {"every_steps": 2, "monitor": "loss"}
    cfg["output"]["save_checkpoints"] = False
    cfg["track"] = {"energy": False}
    cfg["sweep"] = {"params": {"method.name": ["lora", "ia3"]}, "sampler": "grid", "pruner": "none", "trials": 2}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    result = sweep(path, storage=real, plots=False, log=lambda s: None)
    assert result.counts == {"complete": 2}, result.trials
    assert connected and set(connected) == {real}
    sweep_dir = out / "sweep-tune"
    for row in result.trials:
        saved = yaml.safe_load((Path(row["run_dir"]) / "config.yaml").read_text())
        name = saved["method"]["name"]
        assert saved["model"]["name"] == tiny_bert  # `model: <id>` is written out as model.name
        assert saved["train"]["lr"] == pytest.approx({"lora": TRAIN_DEFAULT_LR,
                                                      "ia3": REGISTRY["ia3"].default_lr}[name])
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["sweep"]["storage"] == mask_url(real)
    assert json.loads((sweep_dir / "summary.json").read_text())["storage"] == mask_url(real)

    # the saved config names the storage masked: the URL is needed again, and the message says how
    res = runner.invoke(app, ["sweep", str(sweep_dir / "sweep.yaml"), "--no-plots"])
    assert res.exit_code == 2, res.output
    assert "is masked" in flat(res.output) and "--storage" in flat(res.output) and STORAGE_ENV in flat(res.output)
    monkeypatch.setenv(STORAGE_ENV, real)  # e.g. another machine joining: the budget is spent, nothing is added
    connected.clear()
    again = sweep(path, plots=False, log=lambda s: None)
    assert again.counts == {"complete": 2} and set(connected) == {real}

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "index.sqlite" for p in files) and len(files) > 10
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaks == []


# -- warnings and errors ------------------------------------------------------------------

def test_a_failed_trials_table_write_is_said(tmp_path):
    from slimtune.sweep.worker import update_table

    class Study:
        def get_trials(self, deepcopy=False):
            return []

    (tmp_path / "trials.csv").mkdir()  # the write cannot replace a folder
    lines = []
    update_table(Study(), sweep_plan(sweep_dir=tmp_path, monitor="loss"), lines.append)
    assert len(lines) == 1
    assert f"{tmp_path / 'trials.csv'} was not updated (IsADirectoryError" in lines[0] and "warning" in lines[0]


@pytest.mark.parametrize("command", ["sweep", "lr-find"])
def test_cli_reports_user_errors_and_keeps_a_bugs_traceback(command, tmp_path, monkeypatch):
    import slimtune.sweep as sweep_pkg
    from slimtune.errors import InputNotFound
    from slimtune.methods import MethodError

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small()))
    attr = "sweep" if command == "sweep" else "lr_find"
    user_errors = (ConfigError("bad key x"), SweepError("3 trials in a row failed"),
                   MethodError("method ia3: found no key layers"), InputNotFound("no such file t.csv"))
    bugs = (FileNotFoundError("a bug's missing file"), ValueError("a bug"), TypeError("another bug"))
    for exc, code in [(e, 2) for e in user_errors] + [(e, 1) for e in bugs]:
        def boom(*args, **kwargs):
            raise exc

        monkeypatch.setattr(sweep_pkg, attr, boom)
        res = runner.invoke(app, [command, str(cfg)])
        assert res.exit_code == code, (exc, res.output)
        if code == 2:
            assert f"error: {exc}" in flat(res.output)
        else:  # not dressed up as the user's error: the exception (and its traceback) goes through
            assert res.exception is exc and "error:" not in res.output


def test_lr_find_bad_options_are_user_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small()))
    res = runner.invoke(app, ["lr-find", str(cfg), "--start-lr", "1", "--end-lr", "0.1"])
    assert res.exit_code == 2 and "error: lr-find needs 0 < start_lr < end_lr, got 1.0 and 0.1" in flat(res.output)


def test_sweep_options_are_checked_like_the_file(tmp_path, monkeypatch):
    from slimtune.sweep import sweep

    monkeypatch.delenv(STORAGE_ENV, raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small(output={"dir": str(tmp_path / "runs")},
                                        sweep={"params": {"train.lr": [1e-4]}})))
    with pytest.raises(ConfigError, match="sweep.timeout_minutes: -1.0 is not accepted"):
        sweep(cfg, timeout_minutes=-1.0)
    with pytest.raises(ConfigError, match="'nota url' is not a database URL; accepted: sqlite:///"):
        sweep(cfg, storage="nota url")
    assert not (tmp_path / "runs").exists()


def test_a_users_error_ends_the_sweep_and_a_bug_fails_its_trial(tmp_path, monkeypatch):
    """A trial that raises a SlimtuneError (the user's to fix) is recorded and ends the sweep; any other exception
    fails that trial alone, with its type and message on the trial."""
    import optuna

    import slimtune.runner
    from slimtune.errors import DataError
    from slimtune.sweep.engine import make_storage
    from slimtune.sweep.trial import Objective

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=make_storage(url), study_name="s", direction="minimize")
    plan = sweep_plan(storage=url, sweep_dir=tmp_path, base=small())
    started = []
    for error, fatal in ((ValueError("a bug"), False), (FileNotFoundError("a bug's missing file"), False),
                         (DataError("train.csv: no column 'text'"), True)):
        def fail(*args, **kwargs):
            raise error

        monkeypatch.setattr(slimtune.runner, "run", fail)
        objective = Objective(plan, 0, on_start=lambda: started.append(True))
        study.optimize(objective, n_trials=1, catch=(Exception,))
        trial = study.trials[-1]
        assert trial.state.name == "FAIL" and trial.user_attrs["error"] == f"{type(error).__name__}: {error}"
        assert trial.user_attrs["run_dir"] == str(tmp_path / "trials" / f"trial-{trial.number:04d}")
        assert (objective.fatal is error) == fatal
    assert started == [True, True, True]
