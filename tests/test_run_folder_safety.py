"""A run folder is untrusted input: what a resume may change, one trainer per folder, code it names."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import slimtune
from slimtune.cli import app
from slimtune.config import ConfigError
from slimtune.track import guard

from conftest import cls_config, sentiment_rows, write_csv

runner = CliRunner()


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def _trained(tiny_bert, tmp_path_factory):
    """A completed 1-epoch run (9 optimizer steps), trained once for the module."""
    root = tmp_path_factory.mktemp("done")
    data = {"train": str(write_csv(root / "train.csv", sentiment_rows(160, 0))),
            "test": str(write_csv(root / "test.csv", sentiment_rows(40, 1)))}
    res = slimtune.run(cls_config(tiny_bert, data, root / "runs", epochs=1))
    assert res.status == "completed" and res.summary["steps"] == 9
    return res.run_dir


@pytest.fixture
def done_run(_trained, tmp_path):
    """A copy of the completed run for one test to change."""
    return Path(shutil.copytree(_trained, tmp_path / "run"))


@pytest.mark.parametrize("override", ["train.lr=3e-4", "method.r=16", "train.batch_size=8", "data.train=other.csv",
                                      "model.max_length=64"])
def test_resume_refuses_overrides_that_change_the_run(done_run, override):
    before = _snapshot(done_run)
    with pytest.raises(ConfigError) as e:
        slimtune.run(None, overrides=[override], resume=done_run)
    key = override.split("=")[0]
    assert key in str(e.value) and "train.epochs" in str(e.value) and "new run" in str(e.value)
    assert _snapshot(done_run) == before  # nothing in the folder was touched


def test_resume_of_a_complete_run_says_so(done_run):
    before = _snapshot(done_run)
    res = runner.invoke(app, ["run", "--resume", str(done_run)])
    assert res.exit_code == 2, res.output
    assert "complete" in res.output and "train.epochs=N" in res.output
    assert _snapshot(done_run) == before


def test_resume_extends_training_and_records_it(done_run):
    res = slimtune.run(None, overrides=["train.epochs=2"], resume=done_run)
    assert res.status == "completed" and res.summary["steps"] == 18
    assert yaml.safe_load((done_run / "config.yaml").read_text())["train"]["epochs"] == 2
    history = [json.loads(line) for line in (done_run / "resumes.jsonl").read_text().splitlines()]
    assert history == [{"at_step": 9, "total_steps": 18, "changed": {"train.epochs": [1.0, 2]},
                        "time": history[0]["time"]}]
    steps = [json.loads(line)["step"] for line in (done_run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert max(steps) == 18
    tests = [json.loads(line) for line in (done_run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "test"]
    assert [t["step"] for t in tests] == [18]  # the first finish's test record gave way to the new one


def test_resume_extension_must_leave_steps(done_run):
    before = _snapshot(done_run)
    with pytest.raises(ConfigError, match="already at step 9"):
        slimtune.run(None, overrides=["train.max_steps=5"], resume=done_run)
    after = _snapshot(done_run)
    assert {k: v for k, v in after.items() if k != "data_report.json"} == \
           {k: v for k, v in before.items() if k != "data_report.json"}


def test_resume_of_a_run_in_training_is_refused(done_run):
    """A second trainer in the same folder: refused with the holder's pid; a killed holder frees the folder."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from slimtune.track.guard import RunLock
        lock = RunLock({str(done_run)!r}).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(done_run)
        with pytest.raises(guard.RunBusy, match=f"pid {holder.pid}"):
            slimtune.run(None, overrides=["train.epochs=2"], resume=done_run)
        assert {k: v for k, v in _snapshot(done_run).items() if k != ".lock"} == \
               {k: v for k, v in before.items() if k != ".lock"}
    finally:
        holder.kill()  # as kill -9: the OS drops the lock with the process
        holder.wait()
    res = slimtune.run(None, overrides=["train.epochs=2"], resume=done_run)
    assert res.summary["steps"] == 18


def test_a_run_holds_its_folder_lock_only_while_it_trains(tiny_bert, cls_data, tmp_path):
    seen = {}

    class Probe:
        def on_train_begin(self, loop):
            with pytest.raises(guard.RunBusy):
                guard.RunLock(loop.run.path).acquire()
            seen["busy"] = True

    res = slimtune.run(cls_config(tiny_bert, cls_data, tmp_path / "runs", max_steps=2), callbacks=[Probe()])
    assert seen == {"busy": True}
    guard.RunLock(res.run_dir).acquire().release()  # free after run() returned


def test_a_run_folder_that_runs_code_needs_trust(tiny_bert, cls_data, tmp_path):
    """trust_remote_code in a copied run's config, or a factory its meta.json names: refused unless trusted,
    and refused before the factory's module is imported."""
    res = slimtune.run(cls_config(tiny_bert, cls_data, tmp_path / "runs", max_steps=2))
    run = res.run_dir
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    for call in (lambda **kw: slimtune.evaluate(run, cls_data["test"], **kw),
                 lambda **kw: slimtune.predict(run, ["good movie"], **kw),
                 lambda **kw: slimtune.merge(run, tmp_path / "merged", **kw)):
        with pytest.raises(guard.UntrustedRun, match="trust_remote_code"):
            call()
    assert not (tmp_path / "merged").exists()
    assert slimtune.evaluate(run, cls_data["test"], trust_run_code=True)["examples"] == 40
    res_cli = runner.invoke(app, ["predict", str(run), "--text", "good movie"])
    assert res_cli.exit_code == 2 and "--trust-run-code" in res_cli.output

    marker = tmp_path / "imported"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef build(**kw):\n    raise SystemExit\n")
    cfg["model"] = {"factory": f"{evil}:build", "max_length": 32}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    meta = json.loads((run / "meta.json").read_text())
    meta["model_source"] = {"path": f"{evil}:build", "hub_id": None, "gguf_file": None, "origin": "factory"}
    (run / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(guard.UntrustedRun, match="factory"):
        slimtune.api.load_run(run)
    res_cli = runner.invoke(app, ["eval", str(run), "--data", cls_data["test"]])
    assert res_cli.exit_code == 2 and "factory" in res_cli.output
    assert not marker.exists()


def test_resume_of_a_run_that_runs_code_needs_trust(done_run):
    cfg = yaml.safe_load((done_run / "config.yaml").read_text())
    cfg["model"]["trust_remote_code"] = True
    (done_run / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = _snapshot(done_run)
    with pytest.raises(guard.UntrustedRun):
        slimtune.run(None, overrides=["train.epochs=2"], resume=done_run)
    assert _snapshot(done_run) == before
    res = slimtune.run(None, overrides=["train.epochs=2"], resume=done_run, trust_run_code=True)
    assert res.summary["steps"] == 18


def test_a_damaged_summary_on_resume_is_said(done_run, capsys):
    """The earlier sessions' cost lives in summary.json; when it cannot be read the resume says so."""
    (done_run / "summary.json").write_text('{"status": "comp')
    res = slimtune.run(None, overrides=["train.epochs=2"], resume=done_run)
    said = capsys.readouterr().err
    assert "summary.json is damaged" in said and "earlier sessions" in said
    assert res.summary["steps"] == 18 and res.summary["cost"]["sessions"] == 1
