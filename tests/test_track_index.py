"""The run index: runs register themselves (status, metrics, cost, parent sweep); `slimtune runs`
lists / filters / sorts / shows / compares / adds / removes; copied, damaged and deleted folders
are handled with clear messages; concurrent writers do not lose rows."""
from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import slimtune
from slimtune.cli import app
from slimtune.track import index
from slimtune.track.runinfo import config_hash

from conftest import cls_config, sentiment_rows, write_csv

runner = CliRunner(env={"COLUMNS": "1000"})


def tiny(model: str, data: dict, out: Path, name: str, **train) -> dict:
    cfg = cls_config(model, data, out, **{"max_steps": 6, "log_every": 2, **train})
    cfg["eval"] = {"every_steps": 3}
    cfg["output"]["name"] = name
    cfg["output"]["save_checkpoints"] = False
    return cfg


@pytest.fixture(scope="module")
def root(tiny_bert, tmp_path_factory) -> Path:
    """Two runs under one output root: `a` (r=4) and `trial-1` (r=8, lr 5e-3) inside the sweep `sweep-x`."""
    base = tmp_path_factory.mktemp("index")
    data = {"train": str(write_csv(base / "train.csv", sentiment_rows(96, 0))),
            "test": str(write_csv(base / "test.csv", sentiment_rows(24, 1)))}
    root = base / "runs"
    slimtune.run(tiny(tiny_bert, data, root, "a"))
    cfg = tiny(tiny_bert, data, root / "sweep-x" / "trials", "trial-1", lr=5e-3)
    cfg["method"]["r"] = 8
    cfg["track"] = {"sweep": str(root / "sweep-x")}
    slimtune.run(cfg)
    return root


def listed(root: Path, *args: str) -> list[dict]:
    res = runner.invoke(app, ["runs", "list", "--root", str(root), "--json", *args])
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def test_runs_register_themselves_with_metrics_and_cost(root):
    rows = {r["name"]: r for r in listed(root)}
    assert set(rows) == {"a", "trial-1", "sweep-x"}
    a, t = rows["a"], rows["trial-1"]
    assert a["kind"] == "run" and a["status"] == "completed"
    assert a["task"] == "text-classification" and a["method"] == "lora"
    assert a["monitor"] == "accuracy" and 0 <= a["best_accuracy"] <= 1 and "test_accuracy" in a
    assert a["started"] and a["ended"] and a["ended"] >= a["started"]
    assert a["energy_kwh"] > 0 and a["co2_kg"] > 0 and a["train_seconds"] > 0 and a["flops"] > 0
    assert a["cost"]["energy"]["method"]  # the measuring method is stated
    summary = json.loads((root / "a" / "summary.json").read_text())
    assert (a["config_hash"] == summary["config_hash"]
            == config_hash(yaml.safe_load((root / "a" / "config.yaml").read_text())))
    assert a["config_hash"] != t["config_hash"]
    # the sweep's trial is in the output root's index, under its sweep
    assert t["parent"] == "sweep-x" and rows["sweep-x"]["kind"] == "sweep"
    sweep = rows["sweep-x"]  # the sweep row sums up its runs
    assert sweep["runs"] == 1 and sweep["status"] == "completed" and sweep["best_accuracy"] == t["best_accuracy"]
    assert sweep["energy_kwh"] == pytest.approx(t["energy_kwh"])
    assert [r["name"] for r in listed(root, "--sweep", "sweep-x")] == ["trial-1"]


def test_list_filters_and_sorts(root):
    assert {r["name"] for r in listed(root, "--method", "lora", "--status", "completed")} == {"a", "trial-1"}
    assert listed(root, "--task", "causal-lm") == []
    by_r = listed(root, "--status", "completed", "--sort", "train_seconds", "--desc")
    assert [r["train_seconds"] for r in by_r] == sorted((r["train_seconds"] for r in by_r), reverse=True)
    acc = {r["name"]: r["best_accuracy"] for r in listed(root, "--status", "completed")}
    lo = min(acc.values())
    kept = {r["name"] for r in listed(root, "--where", f"accuracy>{lo}")}  # a bare metric name means best_<name>
    assert kept == {n for n, v in acc.items() if v > lo}
    assert ({r["name"] for r in listed(root, "--where", "energy_kwh>0", "--where", "test_accuracy>=0")}
            == {"a", "trial-1", "sweep-x"})
    assert {r["name"] for r in listed(root, "--kind", "run", "--where", "energy_kwh>0")} == {"a", "trial-1"}
    # the table view prints the default columns
    res = runner.invoke(app, ["runs", "list", "--root", str(root)])
    assert res.exit_code == 0 and "best_accuracy" in res.output and "kWh" in res.output and "sweep-x" in res.output
    for bad, msg in ((["--where", "accuracy>>1"], "expected COLUMN OP VALUE"),
                     (["--sort", "nope"], "unknown column 'nope'")):
        res = runner.invoke(app, ["runs", "list", "--root", str(root), *bad])
        assert res.exit_code == 2 and msg in res.output, res.output


def test_show_and_compare(root):
    res = runner.invoke(app, ["runs", "show", "a", "--root", str(root)])
    assert res.exit_code == 0, res.output
    assert "measured with" in res.output and "kWh" in res.output and "completed" in res.output
    res = runner.invoke(app, ["runs", "compare", "a", "trial-1", "--root", str(root), "--json"])
    assert res.exit_code == 0, res.output
    cmp = json.loads(res.stdout)
    assert cmp["config"]["method.r"] == [4, 8] and cmp["config"]["train.lr"] == [0.01, 0.005]
    assert "output.name" not in cmp["config"]  # where a run is written is not a difference
    assert "train.epochs" not in cmp["config"]  # equal keys are left out
    assert len(cmp["metrics"]["best_accuracy"]) == 2 and cmp["cost"]["energy_kwh"][0] > 0
    res = runner.invoke(app, ["runs", "compare", "a", "trial-1", "--root", str(root)])
    assert res.exit_code == 0 and "method.r" in res.output and "test_accuracy" in res.output
    res = runner.invoke(app, ["runs", "show", "nope", "--root", str(root)])
    assert res.exit_code == 2 and "no run 'nope'" in res.output


def test_copied_folder_is_added_and_bad_folders_are_named(root, tmp_path):
    copy = tmp_path / "from-elsewhere" / "a-copy"
    shutil.copytree(root / "a", copy)
    other = tmp_path / "other-root"
    res = runner.invoke(app, ["runs", "add", str(copy), "--root", str(other)])
    assert res.exit_code == 0, res.output
    rows = listed(other)
    assert [r["name"] for r in rows] == ["a-copy"] and rows[0]["status"] == "completed" and rows[0]["energy_kwh"] > 0

    damaged = tmp_path / "damaged"
    shutil.copytree(root / "a", damaged)
    (damaged / "summary.json").write_text('{"status": "compl')
    not_run = tmp_path / "not-a-run"
    not_run.mkdir()
    res = runner.invoke(app, ["runs", "add", str(damaged), str(not_run), str(tmp_path / "gone"), "--root", str(other)])
    assert res.exit_code == 1
    out = " ".join(res.output.split())
    assert "summary.json: not valid JSON" in out and "damaged" in out
    assert "not a run folder (no config.yaml)" in out and "folder not found" in out
    # an indexed folder damaged later is reported by `list`, not crashed on
    (copy / "summary.json").write_text("{ broken")
    rows = listed(other)
    assert rows[0]["status"] == "damaged" and "not valid JSON" in rows[0]["problem"]
    # a damaged index file is named with the way out
    (other / "index.sqlite").write_bytes(b"this is not a database" * 100)
    res = runner.invoke(app, ["runs", "list", "--root", str(other)])
    assert res.exit_code == 2 and "is damaged" in res.output


def test_deleted_folder_is_reported_and_rm_asks_first(root, tmp_path):
    work = tmp_path / "r"
    shutil.copytree(root / "a", work / "x")
    shutil.copytree(root / "a", work / "y")
    assert runner.invoke(app, ["runs", "add", str(work), "--root", str(work)]).exit_code == 0
    shutil.rmtree(work / "x")
    rows = {r["name"]: r for r in listed(work)}
    assert rows["x"]["status"] == "missing" and "no longer exists" in rows["x"]["problem"]
    res = runner.invoke(app, ["runs", "list", "--root", str(work)])
    assert res.exit_code == 0 and "missing" in res.output and "no longer exists" in " ".join(res.output.split())
    res = runner.invoke(app, ["runs", "show", "x", "--root", str(work)])
    assert res.exit_code == 0 and "missing" in res.output

    res = runner.invoke(app, ["runs", "rm", "y", "--root", str(work)], input="n\n")
    assert res.exit_code == 1 and "DELETE 1 folder" in res.output and (work / "y").is_dir()
    assert {r["name"] for r in listed(work)} == {"x", "y"}
    res = runner.invoke(app, ["runs", "rm", "y", "x", "--root", str(work)], input="y\n")
    assert res.exit_code == 0, res.output
    assert not (work / "y").exists() and listed(work) == []


def _writer(root: str, k: int) -> None:
    for i in range(15):
        run_dir = Path(root) / f"w{k}-{i}"
        index.register_run(root, run_dir,
                           {"task": "text-classification", "model": {"name": "m"}, "method": {"name": "lora"}},
                           {"status": "completed", "monitor": "accuracy", "best": {"accuracy": i / 15}})


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = index.rows(tmp_path, refresh=False)
    assert len(rows) == 60 and all(r["status"] == "missing" for r in rows)  # no folders behind them


def test_vanished_process_shows_as_dead(tmp_path):
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    import socket

    index.register_run(tmp_path, run_dir, {"task": "causal-lm", "model": {"name": "m"}},
                       {"status": "running", "pid": proc.pid, "host": socket.gethostname()})
    (r,) = index.rows(tmp_path)
    assert r["status"] == "dead" and "killed or crashed" in r["problem"]


def test_config_hash_ignores_where_a_run_is_written():
    a = {"task": "t", "model": {"name": "m"}, "train": {"lr": 1e-3}, "output": {"dir": "x", "name": "a"},
         "track": {"index": True}}
    b = {**a, "output": {"dir": "y", "name": "b"}, "track": {"index": False}}
    c = {**a, "train": {"lr": 2e-3}}
    assert config_hash(a) == config_hash(b) != config_hash(c)
