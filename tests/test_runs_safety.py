"""`slimtune runs` against bad input and faults: a --where value that is not a number, a column that
does not exist, `runs rm` on an index row that names a folder slimtune did not write, and an index
file that cannot be read or written (full disk, lock, read-only, permissions, real damage). The
message names what is wrong and says what is true; no index row and no user file is lost."""
from __future__ import annotations

import errno
import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.track import index

runner = CliRunner(env={"COLUMNS": "1000"})


def fake_run(folder: Path, accuracy: float, r: int = 4, seed: int = 0, sweep: Path | None = None, **summary) -> Path:
    """A run folder as slimtune writes it (config.yaml, summary.json, meta.json), without training."""
    folder.mkdir(parents=True)
    config = {"task": "text-classification", "model": {"name": "m"}, "method": {"name": "lora", "r": r},
              "train": {"lr": 0.001 * r, "seed": seed}, "output": {"dir": str(folder.parent), "name": folder.name}}
    if sweep is not None:
        config["track"] = {"sweep": str(sweep)}
    (folder / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (folder / "summary.json").write_text(json.dumps({"status": "completed", "monitor": "accuracy",
                                                     "best": {"accuracy": accuracy},
                                                     "cost": {"train_seconds": 1.0 + r}, **summary}), encoding="utf-8")
    (folder / "meta.json").write_text(json.dumps({"labels": ["a", "b"]}), encoding="utf-8")
    return folder


def invoke(*args: str, **kw):
    res = runner.invoke(app, list(args), **kw)
    res.text = " ".join(res.output.split())  # rich wraps long lines
    return res


def listed(root: Path, *args: str) -> list[dict]:
    res = invoke("runs", "list", "--root", str(root), "--json", *args)
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


@pytest.fixture()
def root(tmp_path) -> Path:
    """Two runs (best accuracy 0.62 and 0.95; one has [markup] in its name) and an index-only row."""
    root = tmp_path / "runs"
    fake_run(root / "low", 0.62, r=4, seed=1)
    fake_run(root / "high[bold]", 0.95, r=8, seed=2)
    assert invoke("runs", "add", str(root), "--root", str(root)).exit_code == 0
    index.register_run(root, root / "gone", {"task": "text-classification", "model": {"name": "m"}},
                       {"status": "completed", "monitor": "accuracy", "best": {"accuracy": 0.5}})
    return root


# -- --where and --columns ------------------------------------------------------

@pytest.mark.parametrize("expr, value", [("accuracy>=0,9", "0,9"), ("accuracy>0.9x", "0.9x")])
def test_where_value_that_is_not_a_number_is_an_error(root, expr, value):
    res = invoke("runs", "list", "--root", str(root), "--where", expr)
    assert res.exit_code == 2, res.output
    for part in (repr(expr), "best_accuracy", "number column", f"{value!r} is not a number", "such as 0.9"):
        assert part in res.text, (part, res.text)
    assert "Traceback" not in res.output


def test_where_reads_the_value_by_the_column(root):
    assert {r["name"] for r in listed(root, "--where", "accuracy>=0.9")} == {"high[bold]"}
    assert {r["name"] for r in listed(root, "--where", "best_accuracy<0.9")} == {"low", "gone"}
    # a config key by its dotted path
    assert {r["name"] for r in listed(root, "--where", "method.r=8")} == {"high[bold]"}
    assert {r["name"] for r in listed(root, "--where", "train.lr<0.005", "--kind", "run")} == {"low"}
    assert {r["name"] for r in listed(root, "--where", "name=low")} == {"low"}
    res = invoke("runs", "list", "--root", str(root), "--where", "method>lora")
    assert res.exit_code == 2 and "method is a text column; compare it with = or !=" in res.text, res.output


def test_unknown_column_is_named_with_the_accepted_ones(root):
    res = invoke("runs", "list", "--root", str(root), "--columns", "name,seed")
    assert res.exit_code == 2, res.output
    assert "unknown column 'seed'" in res.text and "did you mean train.seed?" in res.text
    assert "columns:" in res.text and "best_accuracy" in res.text and "energy_kwh" in res.text
    assert isinstance(res.exception, SystemExit), res.exception  # a message, not a traceback
    res = invoke("runs", "list", "--root", str(root), "--columns", "name,train.seed,best_accuracy")
    assert res.exit_code == 0, res.output
    assert "train.seed" in res.text and "high[bold]" in res.text and "0.95" in res.text
    res = invoke("runs", "show", "high", "--root", str(root))  # a name with [markup] is printed as it is
    assert res.exit_code == 0 and "high[bold]" in res.text, res.output


# -- runs rm ----------------------------------------------------------------------

def test_rm_refuses_a_folder_that_is_not_a_sweep_or_a_run(tmp_path):
    root = tmp_path / "runs"
    precious = tmp_path / "home"
    (precious / "thesis").mkdir(parents=True)
    (precious / "thesis" / "chapter1.tex").write_text("years of work")
    # a copied run whose track.sweep names that folder: the index gets a sweep row for it
    fake_run(tmp_path / "copied" / "run-1", 0.7, sweep=precious)
    assert invoke("runs", "add", str(tmp_path / "copied" / "run-1"), "--root", str(root)).exit_code == 0
    # `runs add` of a folder that holds a run (and the user's files) makes it a sweep row too
    mine = tmp_path / "mine"
    fake_run(mine / "run-2", 0.8)
    (mine / "notes.txt").write_text("keep me")
    assert invoke("runs", "add", str(mine), "--root", str(root)).exit_code == 0
    # an index row of kind run whose folder only looks like one
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.yaml").write_text("task: x\nmodel: y\n")
    (odd / "data.csv").write_text("a,b\n")
    index.register_run(root, odd, {"task": "x", "model": {"name": "y"}}, {"status": "completed"})
    before = {r["name"] for r in listed(root)}
    assert {"home", "mine", "odd", "run-1", "run-2"} <= before

    for ref, folder, why in (("home", precious, "no sweep.yaml in it: not a sweep folder"),
                             ("mine", mine, "no sweep.yaml in it: not a sweep folder"),
                             ("odd", odd, "no summary.json or meta.json in it")):
        res = invoke("runs", "rm", ref, "--root", str(root), "--yes")
        assert res.exit_code == 1, res.output
        assert str(folder) in res.text and why in res.text, res.text
    assert (precious / "thesis" / "chapter1.tex").read_text() == "years of work"
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "run-2" / "config.yaml").is_file()
    assert (tmp_path / "copied" / "run-1").is_dir() and (odd / "data.csv").is_file()
    assert {r["name"] for r in listed(root)} == before  # nothing refused left the index either
    # --keep-files drops the entry and touches no folder
    assert invoke("runs", "rm", "home", "--root", str(root), "--yes", "--keep-files").exit_code == 0
    assert (precious / "thesis" / "chapter1.tex").is_file() and "home" not in {r["name"] for r in listed(root)}


def test_rm_deletes_a_real_sweep_with_its_trials(tmp_path):
    root = tmp_path / "runs"
    sweep = root / "sweep-a"
    sweep.mkdir(parents=True)
    (sweep / "sweep.yaml").write_text(yaml.safe_dump({"task": "text-classification", "sweep": {"trials": 2}}))
    sqlite3.connect(sweep / "study.db").close()
    for k in range(2):
        fake_run(sweep / "trials" / f"trial-{k}", 0.5 + k / 10, sweep=sweep)
    fake_run(root / "other", 0.9)
    for folder in (sweep, root / "other"):
        assert invoke("runs", "add", str(folder), "--root", str(root)).exit_code == 0
    assert {r["name"] for r in listed(root)} == {"sweep-a", "trial-0", "trial-1", "other"}
    res = invoke("runs", "rm", "sweep-a", "--root", str(root), "--yes")
    assert res.exit_code == 0, res.output
    assert "removed 3 entries, deleted 3 folder(s)" in res.text
    assert not sweep.exists() and (root / "other" / "summary.json").is_file()
    assert {r["name"] for r in listed(root)} == {"other"}


# -- the index file under faults --------------------------------------------------

class _Proxy:
    """A sqlite3 connection whose statements starting with `fail_on` raise `error`."""

    def __init__(self, con, fail_on: str, error: BaseException):
        object.__setattr__(self, "_con", con)
        object.__setattr__(self, "_fail", (fail_on, error))

    def execute(self, sql, *args):
        if sql.lstrip().upper().startswith(self._fail[0]):
            raise self._fail[1]
        return self._con.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._con, name)

    def __setattr__(self, name, value):
        setattr(self._con, name, value)


def _fail_sqlite(monkeypatch, fail_on: str, error: BaseException) -> None:
    real = sqlite3.connect
    monkeypatch.setattr(index.sqlite3, "connect", lambda *a, **k: _Proxy(real(*a, **k), fail_on, error))


def _snapshot(root: Path) -> list:
    with sqlite3.connect(root / "index.sqlite") as con:
        return sorted(tuple(r) for r in con.execute("SELECT path, name, kind, status, metrics FROM runs"))


NOT_DAMAGED = [
    (sqlite3.OperationalError("database or disk is full"), "no space left on"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on"),
    (sqlite3.OperationalError("database is locked"), "is locked: another process"),
    (sqlite3.OperationalError("attempt to write a readonly database"), "is read-only"),
    (OSError(errno.EROFS, "Read-only file system"), "is read-only"),
    (sqlite3.OperationalError("unable to open database file"), "cannot be opened"),
    (PermissionError(errno.EACCES, "Permission denied"), "cannot be opened"),
]


@pytest.mark.parametrize("error, says", NOT_DAMAGED, ids=lambda x: str(x)[:28])
def test_index_that_cannot_be_read_now_is_not_called_damaged(root, monkeypatch, error, says):
    before = _snapshot(root)
    _fail_sqlite(monkeypatch, "SELECT", error)
    for cmd in (["runs", "list"], ["runs", "show", "low"], ["runs", "rm", "low", "--yes"]):
        res = invoke(*cmd, "--root", str(root))
        assert res.exit_code == 2, res.output
        assert says in res.text and str(root / "index.sqlite") in res.text, res.text
        assert "is damaged" not in res.text and "move it away" not in res.text
        assert "rebuild" not in res.text.replace("do not rebuild", "")
    monkeypatch.undo()
    assert _snapshot(root) == before and (root / "low").is_dir()


@pytest.mark.parametrize("error", [sqlite3.DatabaseError("file is not a database"),
                                   sqlite3.DatabaseError("database disk image is malformed")], ids=str)
def test_really_damaged_index_says_how_to_rebuild(root, monkeypatch, error):
    _fail_sqlite(monkeypatch, "SELECT", error)
    res = invoke("runs", "list", "--root", str(root))
    assert res.exit_code == 2 and "is damaged" in res.text and f"slimtune runs add {root} --root {root}" in res.text
    assert ".recover" in res.text  # the rows whose folders are gone can still be saved from the copy


def test_full_disk_during_refresh_lists_the_folders_and_keeps_every_row(root, monkeypatch):
    """A real SQLITE_FULL (the file may not grow): `runs list` still lists, says the index was not
    updated and why, and the index keeps every row, the index-only one included."""
    listed(root)  # the index is up to date with the folders
    before = _snapshot(root)
    summary = json.loads((root / "low" / "summary.json").read_text())
    summary["best"].update({f"m{i}": i / 1000 for i in range(3000)})  # the updated row needs new pages
    (root / "low" / "summary.json").write_text(json.dumps(summary))
    real = sqlite3.connect

    def full(*a, **k):
        con = real(*a, **k)
        con.execute(f"PRAGMA max_page_count={con.execute('PRAGMA page_count').fetchone()[0]}")
        return con

    monkeypatch.setattr(index.sqlite3, "connect", full)
    res = invoke("runs", "list", "--root", str(root), "--json")
    assert res.exit_code == 0, res.output
    rows = {json.loads(line)["name"]: json.loads(line) for line in res.stdout.splitlines() if line.strip()}
    assert set(rows) == {"low", "high[bold]", "gone"} and rows["low"]["best_m2999"] == 2.999  # what the folder says
    assert "not saved to the index" in res.text and "no space left on" in res.text and "not damaged" in res.text
    monkeypatch.undo()
    assert _snapshot(root) == before  # rolled back: nothing lost, nothing half-written
    assert listed(root, "--where", "m2999>2")[0]["name"] == "low"  # saved once there is room


def test_locked_index_during_refresh_still_lists(root, monkeypatch):
    listed(root)
    (root / "low" / "summary.json").write_text(json.dumps({"status": "completed", "monitor": "accuracy",
                                                           "best": {"accuracy": 0.7}}))
    _fail_sqlite(monkeypatch, "BEGIN IMMEDIATE", sqlite3.OperationalError("database is locked"))
    res = invoke("runs", "list", "--root", str(root), "--json")
    assert res.exit_code == 0, res.output
    assert "is locked" in res.text and '"best_accuracy": 0.7' in res.stdout
