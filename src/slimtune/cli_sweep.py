"""CLI commands of the tuning strategy: `slimtune sweep` and `slimtune lr-find` (registered in cli.py).
Thin: parse, call slimtune.sweep, print."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .cli_common import err, exit_on_user_error, out


def sweep_cmd(
    config: Path = typer.Argument(..., help="YAML config with a `sweep:` section (search space, budget)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides of the base config: train.epochs=2"),
    workers: int = typer.Option(1, "--workers", min=1, help="local worker processes sharing the study"),
    storage: Optional[str] = typer.Option(None, "--storage", help="optuna storage URL (default: "
                                          "$SLIMTUNE_SWEEP_STORAGE, else sweep.storage, else SQLite in the sweep "
                                          "folder); a shared PostgreSQL URL lets other machines join with the same "
                                          "command. Files hold it with the password masked"),
    name: Optional[str] = typer.Option(None, "--name", help="sweep folder / study name (default: sweep-<config stem>)"),
    trials: Optional[int] = typer.Option(None, "--trials", min=1,
                                         help="budget: finished trials (overrides sweep.trials)"),
    timeout_minutes: Optional[float] = typer.Option(None, "--timeout-minutes",
                                                    help="budget: minutes (overrides sweep.timeout_minutes)"),
    no_plots: bool = typer.Option(False, "--no-plots", help="skip the plots"),
):
    """Hyperparameter search with pruning: each trial is a normal run; writes the sweep folder (trials table,
    best.yaml, plots). Re-running the same command resumes the sweep."""
    from rich.table import Table

    from .sweep import sweep

    try:
        with exit_on_user_error():  # a sweep that cannot go on (SweepError) included
            result = sweep(config, overrides, workers=workers, name=name, storage=storage, trials=trials,
                           timeout_minutes=timeout_minutes, plots=not no_plots,
                           log=lambda s: err.print(s, markup=False, highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        err.print("interrupted: re-run the same command to resume the sweep")
        raise typer.Exit(130)
    table = Table(title=f"{result.sweep_dir}  ({', '.join(f'{v} {k}' for k, v in result.counts.items())})")
    rows = result.trials
    params = [k for k in (rows[0] if rows else {}) if "." in k]
    for col in ["#", "state", result.metric, *params, "evals", "seconds"]:
        table.add_column(col, justify="right" if col not in ("state",) else "left")
    for r in rows:
        mark = " *" if r["number"] == result.best_trial else ""
        table.add_row(f"{r['number']}{mark}", r["state"], _fmt(r[result.metric]), *(_fmt(r[p]) for p in params),
                      _fmt(r["evals"]), _fmt(r["seconds"], 1))
    out.print(table)
    out.print_json(json.dumps({"sweep_dir": str(result.sweep_dir), "best_trial": result.best_trial,
                               "best": result.best_value, "params": result.best_params,
                               "best_config": str(result.best_config) if result.best_config else None,
                               "counts": result.counts, "wall_seconds": round(result.wall_seconds, 1)}))


def lr_find_cmd(
    config: Path = typer.Argument(..., help="YAML config (model, data, method)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides: train.batch_size=32"),
    steps: int = typer.Option(100, "--steps", min=5, help="training steps of the range test"),
    start_lr: float = typer.Option(1e-7, "--start-lr", help="first learning rate"),
    end_lr: float = typer.Option(1.0, "--end-lr", help="last learning rate"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="folder for lr_find.png / lr_find.json "
                                           "(default: <output.dir>/lr-find-<time>)"),
    apply: bool = typer.Option(False, "--apply",
                               help="write <config stem>.lr.yaml next to the config with train.lr set"),
):
    """LR range test: exponentially increasing lr, loss-vs-lr plot, suggested lr (steepest descent of the smoothed
    loss). Writes no run folder and changes no model."""
    from .sweep import lr_find

    try:
        with exit_on_user_error():
            r = lr_find(config, overrides, steps=steps, start_lr=start_lr, end_lr=end_lr, out=out_dir, apply=apply)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    if r.stopped:
        err.print(r.stopped, markup=False)
    err.print(f"suggested lr: {r.suggestion:.3g}  (rule: {r.rule})", markup=False, highlight=False)
    if r.note:
        err.print(f"[yellow]note:[/] {r.note}")
    out.print_json(json.dumps({"suggested_lr": r.suggestion, "lr_min_div10": r.lr_min_div10, "steps": len(r.losses),
                               "plot": str(r.plot) if r.plot else None, "out_dir": str(r.out_dir),
                               "applied_config": str(r.applied_config) if r.applied_config else None}))


def _fmt(v, nd: int = 4) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{nd}f}".rstrip("0").rstrip(".")
    return str(v)
