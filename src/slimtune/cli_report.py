"""`slimtune report`: a self-contained HTML page for a run, a sweep, or a comparison of runs."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from .cli_common import fail, out
from .cli_runs import find_run, rows_of
from .errors import SlimtuneError


def report_cmd(
    runs: Optional[List[str]] = typer.Argument(None, help="a run (folder or name), a sweep folder, or with --compare "
                                                          "several runs"),
    compare: bool = typer.Option(False, "--compare", help="one comparison page for the runs given"),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o",
                                            help="HTML file to write (default: report.html in the run / sweep "
                                            "folder; compare-<time>.html beside the runs)"),
    root: Path = typer.Option(Path("runs"), "--root", help="index used to find runs given by name"),
    fmt: str = typer.Option("svg", "--format", help="plot format: svg or png"),
):
    """A self-contained HTML report: curves, confusion matrix, cost and energy, config; or a comparison page."""
    from . import report
    from .track import index
    from .track.runinfo import is_run_folder

    if not runs:
        fail("give a run folder (or name), a sweep folder, or --compare RUN RUN ...")
    rows_cache: list[dict] | None = None

    def locate(ref: str) -> tuple[Path, dict | None]:
        nonlocal rows_cache
        p = Path(ref)
        if p.is_dir():
            return p, None
        if rows_cache is None:
            rows_cache = rows_of(root) if index.index_file(root).exists() else []
        if not rows_cache:
            fail(f"{ref}: no such folder, and no index at {index.index_file(root)} to look the name up")
        r = find_run(root, ref, rows_cache)
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
                kids = [Path(r["path"]) for r in (rows_cache or [])
                        if row and r["parent_key"] == row["key"] and r["exists"]]
                dest = out_path or folder / "report.html"
                written = (report.compare_report(kids, dest, fmt, title=f"Sweep {folder.name}")
                           if kids else report.sweep_report(folder, out_path, fmt))
    except SlimtuneError as e:  # an unreadable run folder, a bad --format
        fail(e)
    out.print(f"report: {written}", highlight=False)
