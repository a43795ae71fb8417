"""`slimtune runs ...` (the run index) and `slimtune report` (HTML pages). Parses, calls, prints."""
from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

runs_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="The run index under an output folder: list, show, compare, add, rm.")
err = Console(stderr=True)
out = Console()

ROOT_HELP = "output folder whose index.sqlite to use (the runs' output.dir)"
HEADERS = {"train_seconds": "train s", "wall_seconds": "wall s", "energy_kwh": "kWh", "co2_kg": "kg CO2e", "parent": "sweep"}


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}", markup=True, highlight=False)
    raise typer.Exit(code)


def _rows(root: Path) -> list[dict]:
    from .track import index

    try:
        return index.rows(root)
    except FileNotFoundError as e:
        _fail(str(e))
    except sqlite3.DatabaseError as e:
        _fail(f"{index.index_file(root)} is damaged ({e}); move it away and rebuild it with `slimtune runs add {root} --root {root}`")


def _find(root: Path, ref: str, rows: list[dict]) -> dict:
    from .track import index

    try:
        return index.find(root, ref, rows)
    except LookupError as e:
        _fail(str(e))


def _cell(v) -> str:
    from .report.html import fmt

    return fmt(v)


def _short_model(m: str | None) -> str:
    if not m:
        return "-"
    return Path(m).name if ("/" in m and Path(m).exists()) or m.startswith("/") else m


def _status(r: dict) -> str:
    colour = {"completed": "green", "failed": "red", "dead": "red", "missing": "red", "damaged": "red",
              "running": "yellow", "interrupted": "yellow", "pruned": "yellow"}.get(r["status"], "white")
    return f"[{colour}]{r['status']}[/]"


@runs_app.command("list")
def list_(
    root: Path = typer.Option(Path("runs"), "--root", help=ROOT_HELP),
    task: Optional[str] = typer.Option(None, help="only this task"),
    model: Optional[str] = typer.Option(None, help="only models whose name contains this"),
    method: Optional[str] = typer.Option(None, help="only this PEFT method"),
    status: Optional[str] = typer.Option(None, help="only this status: completed, running, failed, interrupted, dead, missing"),
    sweep: Optional[str] = typer.Option(None, help="only the runs of this sweep"),
    kind: Optional[str] = typer.Option(None, help="only runs ('run') or only sweeps ('sweep')"),
    where: Optional[List[str]] = typer.Option(None, "--where", "-w",
                                              help="threshold, repeatable: 'test_accuracy>=0.9', 'energy_kwh<0.01', 'accuracy>0.8' (= best_accuracy)"),
    sort: Optional[str] = typer.Option(None, help="sort by any column (e.g. test_accuracy, energy_kwh, train_seconds); default: newest first"),
    desc: bool = typer.Option(False, "--desc", help="sort descending"),
    columns: Optional[str] = typer.Option(None, help="comma list of columns to show instead of the default ones"),
    limit: Optional[int] = typer.Option(None, help="show at most this many"),
    as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
):
    """Runs and sweeps in the index, filtered and sorted."""
    from .track import index

    rows = _rows(root)
    try:
        sel = index.select(rows, task=task, model=model, method=method, status=status, sweep=sweep, kind=kind, where=where,
                           sort=sort, descending=desc if sort else None)
    except ValueError as e:
        _fail(str(e))
    if limit:
        sel = sel[:limit]
    if as_json:
        for r in sel:
            print(json.dumps({k: v for k, v in r.items() if k not in ("config",)}, default=str))
        return
    if columns:
        cols = [index.resolve_column(c.strip(), rows) for c in columns.split(",") if c.strip()]
    else:
        monitors = []
        for r in sel:
            if r.get("monitor") and r["monitor"] not in monitors:
                monitors.append(r["monitor"])
        metric_cols = [f"{p}_{m}" for m in monitors[:2] for p in ("best", "test") if any(f"{p}_{m}" in r for r in sel)]
        extra = [index.resolve_column(index.parse_where(w)[0], rows) for w in where or []] + ([index.resolve_column(sort, rows)] if sort else [])
        cols = list(dict.fromkeys([*index.LIST_COLUMNS, *metric_cols, *index.COST_COLUMNS, *extra, "started"]))
        if any(r.get("parent") for r in sel):
            cols.insert(2, "parent")
    table = Table(show_header=True, header_style="bold", title=f"{len(sel)} of {len(rows)} entries in {index.index_file(root)}")
    for c in cols:
        table.add_column(HEADERS.get(c, c), justify="right" if c not in ("name", "status", "task", "model", "method", "parent", "started", "ended") else "left",
                         overflow="fold")
    for r in sel:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "status":
                cells.append(_status(r))
            elif c in ("started", "ended"):
                cells.append(index.fmt_time(v))
            elif c == "model":
                cells.append(_short_model(v))
            elif c == "name" and r["kind"] == "sweep":
                cells.append(f"{v} [dim](sweep)[/]")
            else:
                cells.append(_cell(v))
        table.add_row(*cells)
    out.print(table)
    problems = [r for r in sel if r.get("problem")]
    for r in problems:
        err.print(f"[yellow]note:[/] {r['name']}: {r['problem']}", highlight=False)


@runs_app.command()
def show(run: str = typer.Argument(..., help="run name, unique name prefix, or folder"),
         root: Path = typer.Option(Path("runs"), "--root", help=ROOT_HELP),
         as_json: bool = typer.Option(False, "--json", help="print the index entry as JSON")):
    """One run: identity, status, metrics, cost and energy (with the method that measured it)."""
    from .track import index

    rows = _rows(root)
    r = _find(root, run, rows)
    if as_json:
        print(json.dumps(r, indent=2, default=str))
        return
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("name", r["name"] + (" (sweep)" if r["kind"] == "sweep" else ""))
    t.add_row("folder", r["path"] + ("" if r["exists"] else "  [red](missing)[/]"))
    t.add_row("status", _status(r))
    for k in ("task", "model", "method", "parent", "monitor", "config_hash"):
        if r.get(k):
            t.add_row(k, str(r[k]))
    t.add_row("started / ended", f"{index.fmt_time(r.get('started'))} / {index.fmt_time(r.get('ended'))}")
    for part in ("best", "final", "test"):
        vals = {k[len(part) + 1:]: v for k, v in r.items() if k.startswith(part + "_") and isinstance(v, (int, float))}
        if vals:
            t.add_row(part, "  ".join(f"{k}={_cell(v)}" for k, v in vals.items()))
    cost = r.get("cost") or {}
    if cost:
        t.add_row("time", f"wall {_cell(cost.get('wall_seconds'))} s, training {_cell(cost.get('train_seconds'))} s, "
                          f"CPU {_cell(cost.get('cpu_seconds'))} s, GPU {_cell(cost.get('gpu_seconds'))} s")
        t.add_row("memory", f"host peak {_cell(cost.get('host_peak_rss_mb'))} MB, device peak {_cell(cost.get('device_peak_mb'))} MB")
        t.add_row("data", f"{_cell(cost.get('samples_seen'))} samples, {_cell(cost.get('tokens_seen'))} tokens, "
                          f"{_cell(cost.get('flops'))} FLOPs (estimate)")
        e = cost.get("energy") or {}
        if e.get("energy_kwh") is not None:
            t.add_row("energy", f"{_cell(e['energy_kwh'])} kWh, {_cell(e['co2_kg'])} kg CO2e at {_cell(e.get('carbon_intensity_g_per_kwh'))} "
                                f"g/kWh ({e.get('carbon_intensity_source')})")
            t.add_row("measured with", f"{e.get('method')} ({e.get('tool')}, {e.get('tracking_mode')} mode)")
        elif e.get("error"):
            t.add_row("energy", f"not measured: {e['error']}")
    if r.get("problem"):
        t.add_row("[yellow]note[/]", r["problem"])
    out.print(t)


@runs_app.command()
def compare(runs: List[str] = typer.Argument(..., help="two or more runs (names, prefixes or folders)"),
            root: Path = typer.Option(Path("runs"), "--root", help=ROOT_HELP),
            all_keys: bool = typer.Option(False, "--all", help="show every config key, not only those that differ"),
            as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """The config keys that differ, and the metrics and cost side by side."""
    from .report.html import differing_keys
    from .track.runinfo import flat

    if len(runs) < 2:
        _fail("give at least two runs to compare")
    rows = _rows(root)
    sel = [_find(root, ref, rows) for ref in runs]
    configs = [r.get("config") or {} for r in sel]
    keys = sorted(set().union(*(flat(c) for c in configs))) if all_keys else differing_keys(configs)
    metric_keys = []
    for r in sel:
        for k in r:
            if k.split("_", 1)[0] in ("best", "test", "final") and isinstance(r[k], (int, float)) and k not in metric_keys:
                metric_keys.append(k)
    cost_keys = ["train_seconds", "wall_seconds", "cpu_seconds", "flops", "energy_kwh", "co2_kg", "host_peak_rss_mb"]
    if as_json:
        print(json.dumps({"runs": [r["name"] for r in sel],
                          "config": {k: [flat(c).get(k) for c in configs] for k in keys},
                          "metrics": {k: [r.get(k) for r in sel] for k in metric_keys},
                          "cost": {k: [r.get(k) for r in sel] for k in cost_keys}}, indent=2, default=str))
        return
    names = [r["name"] for r in sel]
    t = Table(title="config" + ("" if all_keys else " (keys that differ)"), header_style="bold")
    t.add_column("key")
    for n in names:
        t.add_column(n, overflow="fold")
    for k in keys:
        t.add_row(k, *(str(flat(c).get(k, "-")) for c in configs))
    if not keys:
        t.add_row("[dim](the configs are the same)[/]", *["" for _ in names])
    out.print(t)
    m = Table(title="metrics and cost", header_style="bold")
    m.add_column("")
    for n in names:
        m.add_column(n, justify="right")
    for k in [*sorted(metric_keys), *cost_keys]:
        vals = [r.get(k) for r in sel]
        if any(v is not None for v in vals):
            m.add_row(k, *(_cell(v) for v in vals))
    out.print(m)
    for r in sel:
        if r.get("problem"):
            err.print(f"[yellow]note:[/] {r['name']}: {r['problem']}", highlight=False)


@runs_app.command()
def add(paths: List[Path] = typer.Argument(..., help="run folders, or folders of runs (a sweep, an output folder)"),
        root: Path = typer.Option(Path("runs"), "--root", help=ROOT_HELP)):
    """Add run folders to the index (copied from another machine, or run with track.index off)."""
    from .track import index
    from .track.runinfo import RunFolderError

    failed = 0
    for p in paths:
        try:
            names = index.add_folder(root, p)
        except RunFolderError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False)
            failed += 1
            continue
        except sqlite3.DatabaseError as e:
            _fail(f"{index.index_file(root)} is damaged ({e}); move it away and run this again")
        out.print(f"added {len(names)} run(s) from {p}: {', '.join(names)}", highlight=False)
    if failed:
        raise typer.Exit(1)


@runs_app.command()
def rm(runs: List[str] = typer.Argument(..., help="runs or sweeps to remove (names, prefixes or folders)"),
       root: Path = typer.Option(Path("runs"), "--root", help=ROOT_HELP),
       keep_files: bool = typer.Option(False, "--keep-files", help="only drop the index entries; leave the folders"),
       yes: bool = typer.Option(False, "--yes", "-y", help="do not ask")):
    """Remove runs from the index and delete their folders (asks first)."""
    from .track import index

    rows = _rows(root)
    sel = {r["key"]: r for r in (_find(root, ref, rows) for ref in runs)}
    for r in list(sel.values()):  # a sweep takes its runs along
        if r["kind"] == "sweep":
            for c in rows:
                if c["parent_key"] == r["key"]:
                    sel.setdefault(c["key"], c)
    existing = [r for r in sel.values() if r["exists"]]
    for r in sel.values():
        out.print(f"  {r['name']}  {r['path']}" + ("" if r["exists"] else "  (folder already gone)"), highlight=False)
    what = (f"Remove {len(sel)} entr{'y' if len(sel) == 1 else 'ies'} from the index"
            + ("" if keep_files or not existing else f" and DELETE {len(existing)} folder(s)") + "?")
    if not yes and not typer.confirm(what, default=False):
        err.print("nothing removed")
        raise typer.Exit(1)
    if not keep_files:
        for r in existing:
            folder = Path(r["path"])
            if r["kind"] == "run" and not (folder / "config.yaml").is_file():
                err.print(f"[yellow]kept[/] {folder}: not a run folder (no config.yaml)", highlight=False)
                continue
            shutil.rmtree(folder)
    index.remove(root, list(sel))
    out.print(f"removed {len(sel)} entr{'y' if len(sel) == 1 else 'ies'}" + ("" if keep_files else f", deleted {len(existing)} folder(s)"))


def report_cmd(
    runs: Optional[List[str]] = typer.Argument(None, help="a run (folder or name), a sweep folder, or with --compare several runs"),
    compare: bool = typer.Option(False, "--compare", help="one comparison page for the runs given"),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: report.html in the run / sweep "
                                            "folder; compare-<time>.html beside the runs)"),
    root: Path = typer.Option(Path("runs"), "--root", help="index used to find runs given by name"),
    fmt: str = typer.Option("svg", "--format", help="plot format: svg or png"),
):
    """A self-contained HTML report: curves, confusion matrix, cost and energy, config; or a comparison page."""
    from . import report
    from .track import index
    from .track.runinfo import RunFolderError, is_run_folder

    if not runs:
        _fail("give a run folder (or name), a sweep folder, or --compare RUN RUN ...")
    rows_cache: list[dict] | None = None

    def locate(ref: str) -> tuple[Path, dict | None]:
        nonlocal rows_cache
        p = Path(ref)
        if p.is_dir():
            return p, None
        if rows_cache is None:
            rows_cache = _rows(root) if index.index_file(root).exists() else []
        if not rows_cache:
            _fail(f"{ref}: no such folder, and no index at {index.index_file(root)} to look the name up")
        r = _find(root, ref, rows_cache)
        return Path(r["path"]), r

    try:
        if compare or len(runs) > 1:
            folders = [locate(x)[0] for x in runs]
            dest = out_path or folders[0].parent / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.html"
            written = report.compare_report(folders, dest, fmt)
        else:
            folder, row = locate(runs[0])
            if is_run_folder(folder):
                written = report.run_report(folder, out_path, fmt)
            else:  # a sweep: its runs from the index when it is there, else the run folders inside it
                kids = [Path(r["path"]) for r in (rows_cache or []) if row and r["parent_key"] == row["key"] and r["exists"]]
                written = (report.compare_report(kids, out_path or folder / "report.html", fmt, title=f"Sweep {folder.name}")
                           if kids else report.sweep_report(folder, out_path, fmt))
    except (RunFolderError, ValueError) as e:
        _fail(str(e))
    out.print(f"report: {written}", highlight=False)
