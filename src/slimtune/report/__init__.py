"""HTML reports: one page for a run, one comparison page for several runs or a sweep folder.

    run_report(run_dir)                  -> <run_dir>/report.html
    compare_report([run_dir, ...], out)  -> out
    sweep_report(folder)                 -> <folder>/report.html (every run folder inside it)

Each page is a single self-contained file: plots embedded as SVG (or PNG) data URIs, inline
CSS, no scripts and nothing fetched, so it can be mailed, archived or opened offline.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from ..track import atomic
from ..track.runinfo import RunFolderError, read_run, run_folders_in

FORMATS = ("svg", "png")


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"image format {fmt!r}: use one of {', '.join(FORMATS)}")


def run_report(run_dir: str | Path, out: str | Path | None = None, fmt: str = "svg") -> Path:
    from .html import run_page

    _check_fmt(fmt)
    info = read_run(run_dir, records=True)
    data_report = None
    if (info.path / "data_report.json").is_file():
        try:
            data_report = json.loads((info.path / "data_report.json").read_text(encoding="utf-8"))
        except ValueError:
            data_report = None
    out = Path(out) if out else info.path / "report.html"
    atomic.write_text(out, run_page(info, fmt, data_report))
    return out


def compare_report(run_dirs: list[str | Path], out: str | Path, fmt: str = "svg", title: str | None = None) -> Path:
    """A comparison page; folders that cannot be read are listed on the page, not fatal (unless none can)."""
    from .html import compare_page

    _check_fmt(fmt)
    infos, notes = [], []
    for d in run_dirs:
        try:
            infos.append(read_run(d, records=True))
        except RunFolderError as e:
            notes.append(f"left out: {e}")
    if not infos:
        raise RunFolderError("no readable run folder to compare" + (": " + "; ".join(notes) if notes else ""))
    out = Path(out)
    atomic.write_text(out, compare_page(infos, title or f"Comparison of {len(infos)} runs", fmt, notes))
    return out


def sweep_report(folder: str | Path, out: str | Path | None = None, fmt: str = "svg") -> Path:
    folder = Path(folder)
    runs = run_folders_in(folder)
    if not runs:
        raise RunFolderError(f"{folder}: holds no run folders (folders with a config.yaml)")
    return compare_report(runs, out or folder / "report.html", fmt, title=f"Sweep {folder.name}")
