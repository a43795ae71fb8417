"""The run index: one small SQLite file, `<output.dir>/index.sqlite`, with a row per run and per sweep.

A row holds what `slimtune runs list` filters and sorts on (task, model, method, status, key
metrics, cost, start / end, parent sweep, config hash) plus the config, metrics and cost as
JSON, so that `runs show` / `runs compare` still work when a folder is gone. The folders stay
the truth: a row whose summary.json changed since it was indexed is re-read when listed, a
folder copied from elsewhere is added with `add_folder`, and a deleted folder is reported.

Concurrent runs write to the same index: every write is one short `BEGIN IMMEDIATE`
transaction, in WAL mode, with a busy timeout, so writers queue instead of failing.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from datetime import datetime
from pathlib import Path

from ..errors import SlimtuneError
from . import index_errors
from .procs import process_alive
from .query import column_kind, parse_where, resolve_column, select, value, where_filter  # noqa: F401
from .runinfo import RunFolderError, config_hash, flat_metrics, is_run_folder, read_run, run_folders_in

INDEX_FILE = "index.sqlite"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    path TEXT PRIMARY KEY,      -- relative to the index root when inside it (the root can move), else absolute
    name TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'run',   -- run | sweep
    parent TEXT,                -- path key of the sweep the run belongs to
    status TEXT,
    task TEXT, model TEXT, method TEXT,
    config_hash TEXT,
    monitor TEXT, monitor_value REAL,
    started REAL, ended REAL,   -- unix times
    wall_seconds REAL, train_seconds REAL, energy_kwh REAL, co2_kg REAL,
    pid INTEGER, host TEXT,     -- of a running run: a vanished process shows as 'dead'
    metrics TEXT, cost TEXT, config TEXT,   -- JSON
    summary_mtime REAL,
    updated REAL
);
CREATE INDEX IF NOT EXISTS runs_parent ON runs(parent);
CREATE INDEX IF NOT EXISTS runs_name ON runs(name);
"""
_FIELDS = ("path", "name", "kind", "parent", "status", "task", "model", "method", "config_hash", "monitor",
           "monitor_value", "started", "ended", "wall_seconds", "train_seconds", "energy_kwh", "co2_kg", "pid", "host",
           "metrics", "cost", "config", "summary_mtime", "updated")
# what `runs list` shows by default (metric columns are added from the rows)
LIST_COLUMNS = ("name", "status", "task", "model", "method")
COST_COLUMNS = ("train_seconds", "energy_kwh", "co2_kg")


class RunIndexError(SlimtuneError, LookupError):
    """A run reference that the index cannot resolve; the message says why."""


class NoRunIndex(SlimtuneError, FileNotFoundError):
    """No index.sqlite under the folder given as --root."""


def index_file(root: str | Path) -> Path:
    return Path(root) / INDEX_FILE


@contextlib.contextmanager
def connect(root: str | Path, create: bool = True):
    path = index_file(root)
    if not create and not path.exists():
        raise NoRunIndex(f"{path}: no run index here; runs register themselves under their output.dir "
                                f"(give --root), and `slimtune runs add FOLDER` adds a run folder by hand")
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        con.row_factory = sqlite3.Row
        con.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        with contextlib.suppress(sqlite3.OperationalError):  # e.g. a file system without shared memory
            con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        if con.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            with _write(con):
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def _write(con):
    """One short write transaction; IMMEDIATE takes the write lock up front (no upgrade deadlock)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        # SQLite may have rolled back already (it does on a full disk): a second ROLLBACK would fail
        # with "no transaction is active" and hide the error that says what happened
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


# -- keys ----------------------------------------------------------------------

def key_for(root: str | Path, path: str | Path) -> str:
    root, path = Path(root).resolve(), Path(path).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def path_for(root: str | Path, key: str) -> Path:
    p = Path(key)
    return p if p.is_absolute() else Path(root) / p


# -- writing -------------------------------------------------------------------

def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return None


def _num(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def row_for_run(root, run_dir, config: dict, summary: dict, summary_mtime: float | None = None) -> dict:
    cost = summary.get("cost") or {}
    monitor = summary.get("monitor")
    best = summary.get("best") or {}
    sweep = (config.get("track") or {}).get("sweep")
    ended = _epoch(summary.get("ended_at"))
    started = _epoch(summary.get("started_at"))
    wall = _num(cost.get("wall_seconds")) or _num(summary.get("wall_seconds"))
    if started is None and ended is not None and wall is not None:
        started = ended - wall
    method = config.get("method") or {}
    return {
        "path": key_for(root, run_dir), "name": Path(run_dir).name, "kind": "run",
        "parent": key_for(root, sweep) if sweep else None,
        "status": summary.get("status", "unknown"),
        "task": config.get("task"), "model": (config.get("model") or {}).get("name"),
        "method": method.get("name", "lora") if isinstance(method, dict) else str(method),
        "config_hash": summary.get("config_hash") or config_hash(config),
        "monitor": monitor, "monitor_value": _num(best.get(monitor)) if monitor else None,
        "started": started, "ended": ended,
        "wall_seconds": wall, "train_seconds": _num(cost.get("train_seconds")) or _num(summary.get("train_seconds")),
        "energy_kwh": _num(cost.get("energy_kwh")), "co2_kg": _num(cost.get("co2_kg")),
        "pid": summary.get("pid"), "host": summary.get("host"),
        "metrics": json.dumps(flat_metrics(summary)), "cost": json.dumps(cost, default=str),
        "config": json.dumps(config, default=str), "summary_mtime": summary_mtime, "updated": time.time(),
    }


def _upsert(con, row: dict) -> None:
    cols = ", ".join(_FIELDS)
    marks = ", ".join(f":{f}" for f in _FIELDS)
    updates = ", ".join(f"{f}=excluded.{f}" for f in _FIELDS if f != "path")
    con.execute(f"INSERT INTO runs ({cols}) VALUES ({marks}) ON CONFLICT(path) DO UPDATE SET {updates}",
                {f: row.get(f) for f in _FIELDS})
    if row.get("parent"):  # the sweep gets a row too, if its runner did not register it
        con.execute("INSERT OR IGNORE INTO runs (path, name, kind, status, task, updated) "
                    "VALUES (?, ?, 'sweep', ?, ?, ?)",
                    (row["parent"], Path(row["parent"]).name, "", row.get("task"), time.time()))


def register_run(root, run_dir, config: dict, summary: dict) -> None:
    """Insert or update the run's row (called by `run()` when it starts, at each evaluation and at the end)."""
    sp = Path(run_dir) / "summary.json"
    mtime = sp.stat().st_mtime if sp.exists() else None
    row = row_for_run(root, run_dir, config, summary, mtime)
    with connect(root) as con, _write(con):
        _upsert(con, row)


def register_sweep(root, sweep_dir, status: str = "running", task: str | None = None, **info) -> None:
    """The sweep runner's row: `info` may hold best metrics ('metrics': {...}), cost ('cost': {...})
    and started / ended unix times; its trials register themselves with `track.sweep` set."""
    cost = info.get("cost") or {}
    row = {"path": key_for(root, sweep_dir), "name": Path(sweep_dir).name, "kind": "sweep", "status": status,
           "task": task, "started": info.get("started"), "ended": info.get("ended"),
           "metrics": json.dumps(info.get("metrics") or {}), "cost": json.dumps(cost, default=str),
           "config": json.dumps(info.get("config") or {}, default=str), "energy_kwh": _num(cost.get("energy_kwh")),
           "co2_kg": _num(cost.get("co2_kg")), "updated": time.time()}
    with connect(root) as con, _write(con):
        _upsert(con, row)


def add_folder(root, path) -> list[str]:
    """Add a run folder (copied from elsewhere, or run with track.index off), or every run folder
    directly inside a folder of runs (a sweep). Returns the names added; raises RunFolderError."""
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"{path}: folder not found")
    if is_run_folder(path):
        folders = [path]
    else:
        folders = run_folders_in(path)
        if not folders:
            raise RunFolderError(f"{path}: not a run folder (no config.yaml) and holds no run folders")
    rows = []
    for f in folders:
        info = read_run(f)
        sp = f / "summary.json"
        row = row_for_run(root, f, info.config, info.summary, sp.stat().st_mtime if sp.exists() else None)
        if row["parent"] is None and f != path:  # runs inside a folder of runs: that folder is their sweep
            top = f.relative_to(path).parts[0]
            if path.resolve() != Path(root).resolve():
                row["parent"] = key_for(root, path)
            elif top != f.name:  # <root>/<sweep>/trials/<run>
                row["parent"] = key_for(root, path / top)
        rows.append(row)
    with connect(root) as con, _write(con):
        for row in rows:
            _upsert(con, row)
    return [r["name"] for r in rows]


def remove(root, keys: list[str]) -> None:
    with connect(root, create=False) as con, _write(con):
        for key in keys:
            con.execute("DELETE FROM runs WHERE path = ?", (key,))


# -- reading -------------------------------------------------------------------

def _decode(root, r: dict) -> dict:
    """A stored row -> the flat dict that list / filter / sort / show use."""
    folder = path_for(root, r["path"])
    out = {k: r[k] for k in ("name", "kind", "status", "task", "model", "method", "monitor", "monitor_value",
                             "config_hash", "started", "ended", "wall_seconds", "train_seconds", "energy_kwh",
                             "co2_kg")}
    out["key"] = r["path"]
    out["path"] = str(folder)
    out["parent"] = Path(r["parent"]).name if r["parent"] else None
    out["parent_key"] = r["parent"]
    out["exists"] = folder.is_dir()
    out["problem"] = None
    for k, v in json.loads(r["metrics"] or "{}").items():
        out.setdefault(k, v)
    cost = json.loads(r["cost"] or "{}")
    for k in ("cpu_seconds", "gpu_seconds", "flops", "samples_seen", "tokens_seen", "host_peak_rss_mb",
              "device_peak_mb"):
        if k in cost:
            out[k] = cost[k]
    out["cost"] = cost
    out["config"] = json.loads(r["config"] or "{}")
    if not out["exists"]:
        out["problem"] = f"folder {folder} no longer exists (`slimtune runs rm {out['name']}` drops the entry)"
        out["status"] = "missing"
    elif out["status"] == "running" and not process_alive(r["pid"], r["host"]):
        out["problem"] = f"process {r['pid']} is gone without writing a final status (killed or crashed)"
        out["status"] = "dead"
    return out


def _refresh(root, con, raw: list[dict], notes: list[str]) -> tuple[list[dict], dict]:
    """Re-read the runs whose summary.json changed since they were indexed (a resumed run, a
    run written with the index off, a folder edited by hand); damaged ones are reported. When the
    index cannot be written now (full disk, lock, read-only), the listing shows what the folders
    say and `notes` says that the index was left as it was."""
    fresh, problems = [], {}
    for r in raw:
        if r["kind"] != "run":
            continue
        folder = path_for(root, r["path"])
        sp = folder / "summary.json"
        try:
            mtime = sp.stat().st_mtime
        except OSError:
            continue
        if r["summary_mtime"] is not None and abs(mtime - r["summary_mtime"]) < 1e-6:
            continue
        try:
            info = read_run(folder)
        except RunFolderError as e:
            problems[r["path"]] = str(e)
            continue
        row = row_for_run(root, folder, info.config, info.summary, mtime)
        row["parent"] = row["parent"] or r["parent"]
        fresh.append(row)
    if not fresh:
        return raw, problems
    try:
        with _write(con):
            for row in fresh:
                _upsert(con, row)
    except (sqlite3.OperationalError, OSError) as e:
        if index_errors.kind_of(e) not in index_errors.UNWRITABLE:
            raise
        notes.append(f"{len(fresh)} changed run(s) shown as their folders say, not saved to the index: "
                     + index_errors.explain(root, e, BUSY_TIMEOUT_S))
        by_path = {r["path"]: r for r in raw}
        for row in fresh:
            by_path[row["path"]] = {**by_path.get(row["path"], {}), **row}
        return list(by_path.values()), problems
    return [dict(x) for x in con.execute("SELECT * FROM runs")], problems


def rows(root, refresh: bool = True, notes: list[str] | None = None) -> list[dict]:
    """Every row of the index under `root`, decoded; missing / dead / damaged runs are marked;
    `notes` (when given) collects what the caller should tell the user (an index left unwritten)."""
    with connect(root, create=False) as con:
        raw = [dict(x) for x in con.execute("SELECT * FROM runs")]
        problems = {}
        if refresh:
            raw, problems = _refresh(root, con, raw, [] if notes is None else notes)
    out = []
    for r in raw:
        d = _decode(root, r)
        if r["path"] in problems:
            d["status"], d["problem"] = "damaged", problems[r["path"]]
        out.append(d)
    _sum_sweeps(out)
    return out


def _sum_sweeps(all_rows: list[dict]) -> None:
    """A sweep row shows its runs: how many, the best value of their monitor, and what they cost together."""
    for s in (r for r in all_rows if r["kind"] == "sweep"):
        kids = [r for r in all_rows if r["parent_key"] == s["key"]]
        s["runs"] = len(kids)
        if not kids:
            continue
        if not s["status"] or (s["status"] == "missing" and any(k["exists"] for k in kids)):
            live = {k["status"] for k in kids}
            s["status"] = "running" if "running" in live else "completed" if live == {"completed"} else "finished"
            s["problem"] = None
        for col in ("train_seconds", "energy_kwh", "co2_kg"):
            if s.get(col) is None:
                vals = [k[col] for k in kids if isinstance(k.get(col), (int, float))]
                s[col] = sum(vals) if vals else None
        monitors = {k["monitor"] for k in kids if k.get("monitor")}
        if len(monitors) == 1:
            (m,) = monitors
            lower = m in ("loss", "perplexity")
            for part in ("best", "test"):
                vals = [k[f"{part}_{m}"] for k in kids if isinstance(k.get(f"{part}_{m}"), (int, float))]
                if vals and s.get(f"{part}_{m}") is None:
                    s[f"{part}_{m}"] = min(vals) if lower else max(vals)
            s["monitor"] = m


def find(root, ref: str, all_rows: list[dict] | None = None) -> dict:
    """A run by folder path, name, or unique name prefix."""
    all_rows = rows(root) if all_rows is None else all_rows
    p = Path(ref)
    if p.exists():
        key = key_for(root, p)
        hit = [r for r in all_rows if r["key"] == key]
        if hit:
            return hit[0]
    for test in (lambda r: r["name"] == ref, lambda r: r["name"].startswith(ref)):
        hit = [r for r in all_rows if test(r)]
        if len(hit) == 1:
            return hit[0]
        if len(hit) > 1:
            raise RunIndexError(f"{ref!r} matches {len(hit)} runs ({', '.join(r['path'] for r in hit[:5])}); give the "
                                "folder path")
    if p.exists() and is_run_folder(p):
        raise RunIndexError(f"{ref}: this run folder is not in the index at {index_file(root)}; add it with "
                          f"`slimtune runs add {ref} --root {root}`")
    raise RunIndexError(f"no run {ref!r} in {index_file(root)} (`slimtune runs list --root {root}` lists them)")


# -- filter and sort: track/query.py (re-exported here, where `slimtune runs` and older code look) --

def fmt_time(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else "-"
