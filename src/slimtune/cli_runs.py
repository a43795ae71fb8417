"""`slimtune runs ...`: the run index under an output folder. Parses, calls, prints."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .cli_common import err, fail, out
from .errors import SlimtuneError

runs_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="The run index under an output folder: list, show, compare, add, rm.")

ROOT_HELP = "output folder whose index.sqlite to use (the runs' output.dir)"
HEADERS = {"train_seconds": "train s", "wall_seconds": "wall s", "energy_kwh": "kWh", "co2_kg": "kg CO2e",
           "parent": "sweep"}
TEXT_COLUMNS = ("name", "status", "task", "model", "method", "parent", "started", "ended")  # left-aligned


def _index_failed(root: Path, e: BaseException) -> None:
    """An error of the index file, said as what it is (full disk, lock, read-only, damaged, ...)."""
    from .track import index, index_errors

    fail(index_errors.explain(root, e, index.BUSY_TIMEOUT_S))


def rows_of(root: Path) -> list[dict]:
    """The index's rows under `root`, its notes printed; a missing or unreadable index ends the command."""
    from .track import index

    notes: list[str] = []
    try:
        found = index.rows(root, notes=notes)
    except FileNotFoundError as e:
        if not index.index_file(root).exists():
            fail(str(e))
        _index_failed(root, e)
    except (sqlite3.Error, OSError) as e:
        _index_failed(root, e)
    for n in notes:
        err.print(f"[yellow]note:[/] {escape(n)}", highlight=False)
    return found


def find_run(root: Path, ref: str, rows: list[dict]) -> dict:
    """The row a run reference (name, prefix or folder) names; an unknown or ambiguous one ends the command."""
    from .track import index

    try:
        return index.find(root, ref, rows)
    except SlimtuneError as e:  # no such run, or a name that matches several
        fail(e)


def _cell(v) -> str:
    """A value as a table cell: formatted, and escaped (a name or a config value may hold [markup])."""
    from .report.html import fmt

    return escape(fmt(v))


def _short_model(m: str | None) -> str:
    if not m:
        return "-"
    return Path(m).name if ("/" in m and Path(m).exists()) or m.startswith("/") else m


def _status(r: dict) -> str:
    colour = {"completed": "green", "failed": "red", "dead": "red", "missing": "red", "damaged": "red",
              "running": "yellow", "interrupted": "yellow", "pruned": "yellow", "paused": "yellow"}.get(r["status"],
                                                                                                     "white")
    return f"[{colour}]{escape(str(r['status']))}[/]"


@runs_app.command("list")
def list_(
    root: Path = typer.Option(Path("runs"), "--root", help=ROOT_HELP),
    task: Optional[str] = typer.Option(None, help="only this task"),
    model: Optional[str] = typer.Option(None, help="only models whose name contains this"),
    method: Optional[str] = typer.Option(None, help="only this PEFT method"),
    status: Optional[str] = typer.Option(None, help="only this status: completed, running, failed, interrupted, "
                                                    "pruned, paused, dead, missing"),
    sweep: Optional[str] = typer.Option(None, help="only the runs of this sweep"),
    kind: Optional[str] = typer.Option(None, help="only runs ('run') or only sweeps ('sweep')"),
    where: Optional[List[str]] = typer.Option(None, "--where", "-w",
                                              help="threshold, repeatable: 'test_accuracy>=0.9', 'energy_kwh<0.01', "
                                                   "'accuracy>0.8' (= best_accuracy)"),
    sort: Optional[str] = typer.Option(None, help="sort by any column (e.g. test_accuracy, energy_kwh, train_seconds); "
                                                  "default: newest first"),
    desc: bool = typer.Option(False, "--desc", help="sort descending"),
    columns: Optional[str] = typer.Option(None, help="comma list of columns to show instead of the default ones"),
    limit: Optional[int] = typer.Option(None, help="show at most this many"),
    as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
):
    """Runs and sweeps in the index, filtered and sorted."""
    from .track import index

    rows = rows_of(root)
    try:  # a bad --where / --sort / --columns is named with what is accepted, before anything is printed
        sel = index.select(rows, task=task, model=model, method=method, status=status, sweep=sweep, kind=kind,
                           where=where, sort=sort, descending=desc if sort else None)
        cols = _list_columns(rows, sel, columns, where, sort)
    except SlimtuneError as e:
        fail(e)
    if limit:
        sel = sel[:limit]
    if as_json:
        for r in sel:
            print(json.dumps({k: v for k, v in r.items() if k not in ("config",)}, default=str))
        return
    table = Table(show_header=True, header_style="bold", title=escape(f"{len(sel)} of {len(rows)} entries in "
                                                                      f"{index.index_file(root)}"))
    for c in cols:
        table.add_column(escape(HEADERS.get(c, c)), justify="left" if c in TEXT_COLUMNS else "right", overflow="fold")
    for r in sel:
        cells = []
        for c in cols:
            v = index.value(r, c)
            if c == "status":
                cells.append(_status(r))
            elif c in ("started", "ended"):
                cells.append(index.fmt_time(v))
            elif c == "model":
                cells.append(escape(_short_model(v)))
            elif c == "name" and r["kind"] == "sweep":
                cells.append(f"{escape(str(v))} [dim](sweep)[/]")
            else:
                cells.append(_cell(v))
        table.add_row(*cells)
    out.print(table)
    problems = [r for r in sel if r.get("problem")]
    for r in problems:
        err.print(f"[yellow]note:[/] {escape(r['name'])}: {escape(str(r['problem']))}", highlight=False)


def _list_columns(rows: list[dict], sel: list[dict], columns: str | None, where: list[str] | None,
                  sort: str | None) -> list[str]:
    """--columns as given (each resolved, or a ValueError naming the accepted ones), else the default
    columns plus the monitored metrics and whatever --where / --sort use."""
    from .track import index

    if columns:
        return [index.resolve_column(c.strip(), rows) for c in columns.split(",") if c.strip()]
    monitors = []
    for r in sel:
        if r.get("monitor") and r["monitor"] not in monitors:
            monitors.append(r["monitor"])
    metric_cols = [f"{p}_{m}" for m in monitors[:2] for p in ("best", "test") if any(f"{p}_{m}" in r for r in sel)]
    extra = [index.resolve_column(index.parse_where(w)[0], rows) for w in where or []]
    extra += [index.resolve_column(sort, rows)] if sort else []
    cols = list(dict.fromkeys([*index.LIST_COLUMNS, *metric_cols, *index.COST_COLUMNS, *extra, "started"]))
    if any(r.get("parent") for r in sel):
        cols.insert(2, "parent")
    return cols


@runs_app.command()
def show(run: str = typer.Argument(..., help="run name, unique name prefix, or folder"),
         root: Path = typer.Option(Path("runs"), "--root", help=ROOT_HELP),
         as_json: bool = typer.Option(False, "--json", help="print the index entry as JSON")):
    """One run: identity, status, metrics, cost and energy (with the method that measured it)."""
    from .track import index

    rows = rows_of(root)
    r = find_run(root, run, rows)
    if as_json:
        print(json.dumps(r, indent=2, default=str))
        return
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("name", escape(r["name"]) + (" (sweep)" if r["kind"] == "sweep" else ""))
    t.add_row("folder", escape(r["path"]) + ("" if r["exists"] else "  [red](missing)[/]"))
    t.add_row("status", _status(r))
    for k in ("task", "model", "method", "parent", "monitor", "config_hash"):
        if r.get(k):
            t.add_row(k, escape(str(r[k])))
    t.add_row("started / ended", f"{index.fmt_time(r.get('started'))} / {index.fmt_time(r.get('ended'))}")
    for part in ("best", "final", "test"):
        vals = {k[len(part) + 1:]: v for k, v in r.items() if k.startswith(part + "_") and isinstance(v, (int, float))}
        if vals:
            t.add_row(part, "  ".join(f"{escape(k)}={_cell(v)}" for k, v in vals.items()))
    cost = r.get("cost") or {}
    if cost:
        t.add_row("time", f"wall {_cell(cost.get('wall_seconds'))} s, training {_cell(cost.get('train_seconds'))} s, "
                          f"CPU {_cell(cost.get('cpu_seconds'))} s, GPU {_cell(cost.get('gpu_seconds'))} s")
        t.add_row("memory", f"host peak {_cell(cost.get('host_peak_rss_mb'))} MB, device peak "
                            f"{_cell(cost.get('device_peak_mb'))} MB")
        t.add_row("data", f"{_cell(cost.get('samples_seen'))} samples, {_cell(cost.get('tokens_seen'))} tokens, "
                          f"{_cell(cost.get('flops'))} FLOPs (estimate)")
        e = cost.get("energy") or {}
        if e.get("energy_kwh") is not None:
            t.add_row("energy", f"{_cell(e['energy_kwh'])} kWh, {_cell(e['co2_kg'])} kg CO2e at "
                                f"{_cell(e.get('carbon_intensity_g_per_kwh'))} "
                                + escape(f"g/kWh ({e.get('carbon_intensity_source')})"))
            t.add_row("measured with", escape(f"{e.get('method')} ({e.get('tool')}, {e.get('tracking_mode')} mode)"))
        elif e.get("error"):
            t.add_row("energy", escape(f"not measured: {e['error']}"))
    if r.get("problem"):
        t.add_row("[yellow]note[/]", escape(str(r["problem"])))
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
        fail("give at least two runs to compare")
    rows = rows_of(root)
    sel = [find_run(root, ref, rows) for ref in runs]
    configs = [r.get("config") or {} for r in sel]
    keys = sorted(set().union(*(flat(c) for c in configs))) if all_keys else differing_keys(configs)
    metric_keys = []
    for r in sel:
        for k in r:
            is_metric = k.split("_", 1)[0] in ("best", "test", "final") and isinstance(r[k], (int, float))
            if is_metric and k not in metric_keys:
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
        t.add_column(escape(n), overflow="fold")
    for k in keys:
        t.add_row(escape(k), *(escape(str(flat(c).get(k, "-"))) for c in configs))
    if not keys:
        t.add_row("[dim](the configs are the same)[/]", *["" for _ in names])
    out.print(t)
    m = Table(title="metrics and cost", header_style="bold")
    m.add_column("")
    for n in names:
        m.add_column(escape(n), justify="right")
    for k in [*sorted(metric_keys), *cost_keys]:
        vals = [r.get(k) for r in sel]
        if any(v is not None for v in vals):
            m.add_row(escape(k), *(_cell(v) for v in vals))
    out.print(m)
    for r in sel:
        if r.get("problem"):
            err.print(f"[yellow]note:[/] {escape(r['name'])}: {escape(str(r['problem']))}", highlight=False)


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
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            failed += 1
            continue
        except (sqlite3.Error, OSError) as e:
            _index_failed(root, e)
        out.print(f"added {len(names)} run(s) from {p}: {', '.join(names)}", highlight=False, markup=False)
    if failed:
        raise typer.Exit(1)


@runs_app.command()
def rm(runs: List[str] = typer.Argument(..., help="runs or sweeps to remove (names, prefixes or folders)"),
       root: Path = typer.Option(Path("runs"), "--root", help=ROOT_HELP),
       keep_files: bool = typer.Option(False, "--keep-files", help="only drop the index entries; leave the folders"),
       yes: bool = typer.Option(False, "--yes", "-y", help="do not ask")):
    """Remove runs from the index and delete their folders (asks first). Only folders that are
    verifiably a run's or a sweep's are deleted; any other is kept, with its entry, and named."""
    from .track import index

    rows = rows_of(root)
    named = {r["key"]: r for r in (find_run(root, ref, rows) for ref in runs)}
    sel = dict(named)
    for r in named.values():  # a sweep takes its runs along
        if r["kind"] == "sweep":
            for c in rows:
                if c["parent_key"] == r["key"]:
                    sel.setdefault(c["key"], c)
    kept = {} if keep_files else _refused(root, sel, named)
    drop = [k for k in sel if k not in kept]
    delete = [sel[k] for k in drop if sel[k]["exists"] and not keep_files]
    for r in sel.values():
        note = ("  (folder already gone)" if not r["exists"] else f"  (KEPT: {kept[r['key']]})" if r["key"] in kept
                else "")
        out.print(f"  {r['name']}  {r['path']}{note}", highlight=False, markup=False)
    if not drop:
        fail("nothing removed: " + "; ".join(f"{sel[k]['path']}: {why}" for k, why in kept.items())
              + " (`slimtune runs rm --keep-files` drops only the index entries)", code=1)
    what = (f"Remove {len(drop)} entr{'y' if len(drop) == 1 else 'ies'} from the index"
            + (f" and DELETE {len(delete)} folder(s)" if delete else "") + "?")
    if not yes and not typer.confirm(what, default=False):
        err.print("nothing removed")
        raise typer.Exit(1)
    deleted = 0
    for r in sorted(delete, key=lambda r: -len(Path(r["path"]).parts)):  # runs inside a sweep folder first
        folder = Path(r["path"])
        try:
            shutil.rmtree(folder)
            deleted += 1
        except OSError as e:  # a permission, a busy file: the folder is (partly) there, so is its entry
            kept[r["key"]] = f"could not be deleted ({e})"
            drop.remove(r["key"])
    try:
        index.remove(root, drop)
    except (sqlite3.Error, OSError) as e:
        _index_failed(root, e)
    out.print(f"removed {len(drop)} entr{'y' if len(drop) == 1 else 'ies'}, deleted {deleted} folder(s)",
              highlight=False)
    for k, why in kept.items():
        err.print(f"[yellow]kept[/] {escape(sel[k]['path'])}: {escape(why)}; its index entry stays "
                  f"(`slimtune runs rm --keep-files` drops only the entry)", highlight=False)
    if kept:
        raise typer.Exit(1)


def _refused(root: Path, sel: dict, named: dict) -> dict[str, str]:
    """{key: why} for the selected folders `runs rm` must not delete: not verifiably a run's or a
    sweep's, or holding the index itself; the runs a kept sweep would take along stay with it."""
    from .track.runinfo import not_deletable

    index_dir = root.resolve()
    kept = {}
    for key, r in sel.items():
        if not r["exists"]:
            continue
        folder = Path(r["path"])
        why = not_deletable(folder, r["kind"])
        if why is None and (index_dir == folder.resolve() or folder.resolve() in index_dir.parents):
            why = f"it holds the index {root / 'index.sqlite'}"
        if why:
            kept[key] = why
    for key, r in sel.items():
        if key not in named and key not in kept and r["parent_key"] in kept:
            kept[key] = (f"it belongs to the sweep {sel[r['parent_key']]['path']}, which is kept "
                         "(name the run itself to delete it)")
    return kept
