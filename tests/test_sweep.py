"""`slimtune sweep`: the search-space parser, and sweeps over a tiny random model: pruning, a killed
sweep resumed, two local workers on one SQLite study, two workers on a real PostgreSQL server."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.config import ConfigError, load_config
from slimtune.sweep.space import SweepConfig, trial_config

from conftest import cls_config
from sweep_plans import sweep_plan

runner = CliRunner(env={"COLUMNS": "200"})


def flat(text: str) -> str:
    return " ".join(text.split())


# -- the search space -------------------------------------------------------------

def base(**sweep) -> dict:
    return {"task": "text-classification", "model": {"name": "org/model"}, "data": {"train": "train.csv"},
            "sweep": {"params": {"train.lr": {"low": 1e-5, "high": 1e-3, "log": True}}, **sweep}}


def space_error(params: dict, **sweep) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(base(params=params, **sweep))
    return flat(str(info.value))


def test_space_parses_ranges_and_choices():
    cfg = load_config(base(params={"train.lr": {"low": 1e-5, "high": 1e-3, "log": True}, "method.r": [4, 8, 16],
                                   "method.dropout": {"low": 0.0, "high": 0.3}, "train.warmup": {"low": 0, "high": 10},
                                   "method.targets": ["auto", ["query", "value"]],
                                   "train.batch_size": {"low": 8, "high": 32, "step": 8}}))
    p = cfg.sweep.params
    assert [p[k].kind for k in p] == ["float", "categorical", "float", "int", "categorical", "int"]
    assert p["train.batch_size"].grid() == [8, 16, 24, 32]
    assert cfg.sweep.trials == 20 and cfg.sweep.sampler == "tpe" and cfg.sweep.pruner == "median"
    # a trial's config: the base with the values set, the sweep section gone
    trial = trial_config(cfg.model_dump(mode="json", exclude_unset=True),
                         {"train.lr": 3e-4, "method.r": 16, "method.targets": ["query", "value"]})
    assert "sweep" not in trial and trial["train"]["lr"] == 3e-4
    assert trial["method"] == {"r": 16, "targets": ["query", "value"]}
    assert load_config(trial).method.r == 16


@pytest.mark.parametrize("params, expected", [
    ({"train.lrr": {"low": 1e-5, "high": 1e-3}},
     "'train.lrr' is not a config key; accepted keys in train: train.epochs"),
    ({"trian.lr": [1e-4]}, "'trian.lr' is not a config key; accepted sections: model, data, method, train"),
    ({"method.rank": [4, 8]}, "'method.rank' is not an option of method lora; accepted: method.alpha"),
    ({"train.early_stopping": [1, 2]},
     "'train.early_stopping' is a section; sweep one of its keys: train.early_stopping.patience"),
    ({"output.dir": ["a", "b"]}, "'output.dir' cannot be swept"),
    ({"train.lr": {"low": 1e-3, "high": 1e-5}}, "sweep.params.train.lr: low (0.001) must be below high (1e-05)"),
    ({"train.lr": {"low": 1e-3, "high": 1e-3}}, "low (0.001) must be below high (0.001)"),
    ({"train.lr": {"low": 0.0, "high": 1e-3, "log": True}},
     "sweep.params.train.lr: a log range needs low > 0, got low=0.0"),
    ({"method.r": []}, "sweep.params.method.r: [] is not accepted: `choices` is empty"),
    ({"method.r": {"low": 4}}, "a range needs both `low` and `high`"),
    ({"method.r": {"low": 2.5, "high": 8, "type": "int"}}, "an int range needs whole numbers: low=2.5"),
    ({"method.r": {"low": 2.0, "high": 8.0}}, "method.r takes whole numbers"),
    ({"train.warmup": {"low": -1, "high": 3}}, "sweep.params.train.warmup: the value -1 is not accepted"),
    ({"train.schedule": ["linear", "cosinus"]}, "the value 'cosinus' is not accepted"),
    ({"method.name": ["lora", "no-such-method"]}, "['no-such-method'] are not methods; accepted: lora"),
    ({"train.lr": {"low": 1e-5, "high": 1e-3, "log": True, "step": 1e-5}},
     "`step` cannot be combined with `log: true`"),
    ({"train.lr": {"low": 1e-5, "high": 1e-3, "choices": [1]}}, "give either `choices` or a range"),
])
def test_space_rejects_bad_keys_and_ranges(params, expected):
    assert expected in space_error(params)


def test_sweep_section_errors():
    assert "the search space is empty" in space_error({})
    assert "no budget" in space_error({"method.r": [4]}, trials=None)
    assert "needs a `step` for the grid sampler" in space_error({"train.lr": {"low": 1e-5, "high": 1e-3}},
                                                                sampler="grid")
    msg = space_error({"train.lr": [1e-4]}, pruner="asha")
    assert "sweep.pruner" in msg and "successive-halving" in msg
    # slimtune run takes a config with a sweep section (and ignores it); validate checks the space too
    assert load_config(base()).sweep is not None


def test_method_name_choices_make_method_keys_conditional():
    from slimtune.sweep.space import applies, method_configs

    names = method_configs()
    if "dora" not in names or "ia3" not in names:
        pytest.skip("needs the dora and ia3 methods")
    cfg = load_config(base(params={"method.name": ["lora", "ia3"], "method.r": [4, 8]}))
    assert applies("method.r", "lora") and not applies("method.r", "ia3")
    trial = trial_config(cfg.model_dump(mode="json", exclude_unset=True), {"method.name": "dora", "method.r": 4})
    assert load_config(trial).method.name == "dora"


# -- sweeps on a tiny model ---------------------------------------------------------

def sweep_config(model: str, data: dict, out: Path, trials: int = 5, **sweep) -> dict:
    cfg = cls_config(model, data, out, max_steps=8, batch_size=16)
    cfg["eval"] = {"every_steps": 2, "monitor": "loss"}  # 4 evaluations per trial: pruning has something to go on
    cfg["output"]["save_checkpoints"] = False
    cfg["sweep"] = {"params": {"train.lr": {"low": 1e-6, "high": 1e-1, "log": True}, "method.r": [2, 4]},
                    "trials": trials, "pruner": "median", "startup_trials": 2, "seed": 3, **sweep}
    return cfg


def study_trials(sweep_dir: Path, url: str | None = None, name: str | None = None):
    import optuna

    url = url or f"sqlite:///{sweep_dir / 'study.db'}"
    return sorted(optuna.load_study(study_name=name or sweep_dir.name, storage=url).get_trials(),
                  key=lambda t: t.number)


def check_trials_consistent(trials, sweep_dir: Path | None = None) -> None:
    """No trial ran twice or got lost: every finished trial has its own run folder, whose config holds
    the trial's values and whose summary agrees with the trial's state."""
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    dirs = [t.user_attrs["run_dir"] for t in finished]
    assert len(set(dirs)) == len(dirs), dirs
    for t in finished:
        run = Path(t.user_attrs["run_dir"])
        if sweep_dir is not None:
            assert run.parent == sweep_dir / "trials"
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["train"]["lr"] == pytest.approx(t.params["train.lr"])
        assert saved["method"]["r"] == t.params["method.r"]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == {"COMPLETE": "completed", "PRUNED": "pruned"}[t.state.name]
        if t.state.name == "COMPLETE":
            assert summary["best"]["loss"] == pytest.approx(t.value)


def test_sweep_prunes_survives_a_kill_and_writes_a_runnable_best_config(tiny_bert, cls_data, tmp_path):
    cfg_path = tmp_path / "tune.yaml"
    cfg_path.write_text(yaml.safe_dump(sweep_config(tiny_bert, cls_data, tmp_path / "runs", trials=4), sort_keys=False))
    sweep_dir = tmp_path / "runs" / "sweep-tune"

    # 1. start the sweep, kill it (SIGKILL) as soon as its third trial has started
    proc = subprocess.Popen([sys.executable, "-m", "slimtune", "sweep", str(cfg_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while not (sweep_dir / "trials" / "trial-0002" / "config.yaml").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the sweep did not reach its third trial"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = study_trials(sweep_dir)
    assert [t.state.name for t in before][2] == "RUNNING" and len(before) == 3

    # 2. the same command again resumes: the killed trial is failed and its parameters queued once more
    res = runner.invoke(app, ["sweep", str(cfg_path)])
    assert res.exit_code == 0, res.output
    trials = study_trials(sweep_dir)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 4  # the budget counts finished trials
    assert states[2] == "FAIL" and trials[2].user_attrs["error"] == "its worker process was killed"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 2]
    assert len(retry) == 1 and retry[0].params == trials[2].params
    assert [t.number for t in trials[:2]] == [0, 1] and trials[0].datetime_start == before[0].datetime_start
    assert "PRUNED" in states, states  # poor trials stop early
    pruned = next(t for t in trials if t.state.name == "PRUNED")
    assert pruned.last_step < 4 and pruned.user_attrs["evals"] == pruned.last_step
    check_trials_consistent(trials, sweep_dir)
    # the killed trial's run folder stays as the kill left it (on a fast machine the tiny trial may have
    # finished writing before the kill reached it; what matters is that optuna failed it and re-ran its values)
    killed = sweep_dir / "trials" / "trial-0002"
    assert killed.is_dir() and retry[0].user_attrs["run_dir"] != str(killed)

    # 3. the sweep folder: table, summary, best config, plots
    rows = (sweep_dir / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,loss,train.lr,method.r,evals,pruned_at_eval,seconds")
    assert len(rows) == 1 + len(trials)
    summary = json.loads((sweep_dir / "summary.json").read_text())
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert summary["best"]["trial"] == best.number and summary["direction"] == "minimize"
    assert summary["counts"]["fail"] == 1 and summary["storage"].startswith("sqlite:///")
    for plot in ("history", "parallel", "intermediate"):
        assert (sweep_dir / f"{plot}.png").stat().st_size > 1000, summary["plots"]
    assert ((sweep_dir / "importances.png").exists()
            or "importances.png skipped" in (sweep_dir / "plots.txt").read_text())
    assert f"trial {best.number}" in (sweep_dir / "best.yaml").read_text()
    best_cfg = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert "sweep" not in best_cfg and best_cfg["train"]["lr"] == pytest.approx(best.params["train.lr"])
    res = runner.invoke(app, ["run", str(sweep_dir / "best.yaml")])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "runs" / "sweep-tune-best" / "summary.json").read_text())
    assert again["status"] == "completed" and again["best"]["loss"] == pytest.approx(best.value, abs=1e-5)

    # 4. a sweep whose budget is spent does nothing more
    res = runner.invoke(app, ["sweep", str(cfg_path), "--no-plots"])
    assert res.exit_code == 0, res.output
    assert len(study_trials(sweep_dir)) == len(trials)


def test_two_local_workers_share_one_study(tiny_bert, cls_data, tmp_path):
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(sweep_config(tiny_bert, cls_data, tmp_path / "runs", trials=6, pruner="none")))
    res = runner.invoke(app, ["sweep", str(cfg_path), "--workers", "2", "--no-plots"])
    assert res.exit_code == 0, res.output
    sweep_dir = tmp_path / "runs" / "sweep-two"
    trials = study_trials(sweep_dir)
    assert [t.number for t in trials] == list(range(6))
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6  # none lost, none run twice, no extra one
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # both processes took trials
    assert len({t.user_attrs["pid"] for t in trials}) == 2
    check_trials_consistent(trials, sweep_dir)
    assert len({(t.params["train.lr"], t.params["method.r"]) for t in trials}) == 6  # workers do not repeat draws
    assert sorted(p.name for p in (sweep_dir / "trials").glob("trial-*")) == [f"trial-{i:04d}" for i in range(6)]


# -- PostgreSQL --------------------------------------------------------------------------

def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (initdb + pg_ctl in a temporary folder)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql (.ci/run does)")
    pytest.importorskip("psycopg2", reason="psycopg2 not installed: pip install psycopg2-binary")
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="slimtune-pg-")
    if os.geteuid() == 0:  # the server refuses to run as root
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = os.path.join(root, "data")
    subprocess.run(as_user + [initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"], check=True,
                   capture_output=True, timeout=120)
    subprocess.run(as_user + [pg_ctl, "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "60", "-o",
                              f"-c listen_addresses=127.0.0.1 -p {port} -k {root}", "start"], check=True,
                   capture_output=True, timeout=120)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_postgresql(tiny_bert, cls_data, tmp_path, postgres_url, monkeypatch):
    from slimtune.sweep.storage import STORAGE_ENV

    secret = "pg-S3cret"  # the server trusts local connections: any password connects, and none may be written
    url = postgres_url.replace("postgres@", f"postgres:{secret}@", 1)
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    cfg_path = tmp_path / "pg.yaml"
    cfg_path.write_text(yaml.safe_dump(sweep_config(tiny_bert, cls_data, tmp_path / "runs", trials=4), sort_keys=False))
    res = runner.invoke(app, ["sweep", str(cfg_path), "--workers", "2", "--storage", url, "--no-plots"])
    assert res.exit_code == 0, res.output
    sweep_dir = tmp_path / "runs" / "sweep-pg"
    assert not (sweep_dir / "study.db").exists()  # the study lives in the database
    trials = study_trials(sweep_dir, postgres_url, "sweep-pg")
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    check_trials_consistent(trials, sweep_dir)
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["storage"].startswith("postgresql+psycopg2://postgres:***@127.0.0.1")
    # another machine would run the same command (the URL in the environment): it joins the study, finds the budget
    # spent, adds nothing
    monkeypatch.setenv(STORAGE_ENV, url)
    res = runner.invoke(app, ["sweep", str(cfg_path), "--name", "sweep-pg", "--no-plots"])
    assert res.exit_code == 0, res.output
    assert len(study_trials(sweep_dir, postgres_url, "sweep-pg")) == 4
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10 and [str(p) for p in files if secret.encode() in p.read_bytes()] == []


def test_budget_counts_finished_trials_across_workers(tmp_path):
    """'run' while budget is left, 'wait' while the rest is in flight elsewhere, 'done' when spent or past the deadline;
    a RUNNING trial whose process is gone is failed and its parameters queued again (once)."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from slimtune.sweep.worker import HOST, make_storage, next_move

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=make_storage(url), study_name="s", direction="maximize")
    dist = {"train.lr": FloatDistribution(1e-5, 1e-3, log=True)}
    plan = sweep_plan(storage=url, budget=3, deadline=None)
    study.add_trial(create_trial(params={"train.lr": 1e-4}, distributions=dist, value=0.5))
    study.add_trial(create_trial(params={"train.lr": 2e-4}, distributions=dist, state=TrialState.PRUNED, value=0.4))
    assert next_move(study, plan) == "run"
    running = study.ask(dist)  # another worker's trial in flight, its process alive (this one)
    study._storage.set_trial_user_attr(running._trial_id, "host", HOST)
    study._storage.set_trial_user_attr(running._trial_id, "pid", os.getpid())
    assert next_move(study, plan) == "wait"
    assert next_move(study, dataclasses.replace(plan, deadline=time.time() - 1)) == "done"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    study._storage.set_trial_user_attr(running._trial_id, "pid", int(dead.stdout))  # its worker died
    assert next_move(study, plan) == "run"
    trials = study.get_trials()
    assert trials[2].state == TrialState.FAIL and trials[3].state == TrialState.WAITING
    assert trials[3].system_attrs["fixed_params"] == trials[2].params and trials[3].user_attrs["retry_of"] == 2
    study.add_trial(create_trial(params={"train.lr": 3e-4}, distributions=dist, value=0.7))
    assert next_move(study, plan) == "done"


def test_sweep_cli_errors(tmp_path):
    cfg = tmp_path / "plain.yaml"
    cfg.write_text(yaml.safe_dump({"task": "text-classification", "model": {"name": "m"}, "data": {"train": "t.csv"}}))
    res = runner.invoke(app, ["sweep", str(cfg)])
    assert res.exit_code == 2 and "has no `sweep:` section" in flat(res.output)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base(params={"train.lr": {"low": 1, "high": 0.1}})))
    res = runner.invoke(app, ["sweep", str(bad)])
    assert res.exit_code == 2 and "low (1) must be below high (0.1)" in flat(res.output)
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2 and "sweep.params.train.lr" in flat(res.output)


def test_sweep_config_is_in_the_schema():
    schema = SweepConfig.model_json_schema()
    assert "pruner" in schema["properties"] and "description" in schema["properties"]["storage"]


def test_no_pruning_during_the_trials_lr_warmup():
    """A trial is reported at every evaluation but only judged once its own warmup is over."""
    from types import SimpleNamespace

    from slimtune.sweep.trial import PruningCallback
    from slimtune.train.callbacks import PruneTraining
    from slimtune.train.state import TrainState

    class Trial:
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return True

    trial = Trial()
    cb = PruningCallback(trial)
    loop = SimpleNamespace(state=TrainState(), plan=SimpleNamespace(total_steps=100, warmup=30), monitor="accuracy")
    for step in (10, 20, 30):  # inside the warmup: reported, never pruned
        loop.state.step = step
        cb.on_eval_end(loop, {"accuracy": 0.5})
    assert [s for s, _ in trial.reports] == [1, 2, 3]
    loop.state.step = 40
    with pytest.raises(PruneTraining, match="evaluation 4"):
        cb.on_eval_end(loop, {"accuracy": 0.5})
    loop.state.step = 100  # the last evaluation is never pruned
    PruningCallback(trial).on_eval_end(loop, {"accuracy": 0.5})


def test_prune_on_reports_another_metric_in_the_studys_sense():
    """sweep.prune_on: the pruner sees eval loss (negated for a maximizing study); the objective is unchanged."""
    from types import SimpleNamespace

    from slimtune.sweep.trial import PruningCallback
    from slimtune.sweep.worker import intermediate_label
    from slimtune.train.callbacks import PruneTraining
    from slimtune.train.state import TrainState

    class Trial:
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append(value)

        def should_prune(self):
            return len(self.reports) > 1

    loop = SimpleNamespace(state=TrainState(step=50), plan=SimpleNamespace(total_steps=100, warmup=0),
                           monitor="accuracy")
    trial = Trial()
    cb = PruningCallback(trial, metric="loss", maximize=True)
    cb.on_eval_end(loop, {"accuracy": 0.5, "loss": 0.7})
    with pytest.raises(PruneTraining, match="loss=0.6000"):
        cb.on_eval_end(loop, {"accuracy": 0.5, "loss": 0.6})
    assert trial.reports == [-0.7, -0.6]
    for metric, maximize, reported in (("loss", False, 0.7), (None, True, 0.5)):
        trial = Trial()
        PruningCallback(trial, metric=metric, maximize=maximize).on_eval_end(loop, {"accuracy": 0.5, "loss": 0.7})
        assert trial.reports == [reported]
    # the tie-break: accuracy ties at chance are ordered by the loss, never a real accuracy difference
    t1, t2, t3 = Trial(), Trial(), Trial()
    PruningCallback(t1, tiebreak="loss").on_eval_end(loop, {"accuracy": 0.5, "loss": 0.7})
    PruningCallback(t2, tiebreak="loss").on_eval_end(loop, {"accuracy": 0.5, "loss": 0.6})
    PruningCallback(t3, tiebreak="loss").on_eval_end(loop, {"accuracy": 0.5 + 1 / 1000, "loss": 100.0})
    assert t1.reports[0] < t2.reports[0] < 0.5 < t3.reports[0]
    plan = sweep_plan({"prune_on": "loss"}, monitor="accuracy", direction="maximize")
    assert intermediate_label(plan) == "-loss (pruning)"
    assert intermediate_label(sweep_plan(monitor="accuracy", direction="maximize")) == "accuracy"
    from slimtune.sweep.worker import trial_line

    pruned = SimpleNamespace(number=3, params={"train.lr": 1e-3}, state=SimpleNamespace(name="PRUNED"), last_step=2,
                             intermediate_values={2: -0.6744}, user_attrs={"seconds": 4.0})
    assert "trial 3 pruned at evaluation 2 (loss=0.6744)" in trial_line(pruned, plan)
    assert "sweep.prune_on: 'perplexity' is not a metric of task 'text-classification'" in space_error(
        {"train.lr": [1e-4]}, prune_on="perplexity")
