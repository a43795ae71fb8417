"""`slimtune select` (registered in cli.py). Thin: parse, call slimtune.select, print."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .cli_common import err, exit_on_user_error, out


def select_cmd(
    config: Path = typer.Argument(..., help="YAML config (task, data, train, eval; its model and method are the "
                                  "defaults the candidates replace)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides of the config: train.epochs=2"),
    models: Optional[str] = typer.Option(None, "--models", help="candidate models, comma-separated (Hub ids, "
                                         "folders, .gguf files, factories file.py:function); overrides select.models"),
    methods: Optional[str] = typer.Option(None, "--methods", help="candidate methods, comma-separated (default: "
                                          "select.methods, else the config's method)"),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="budget: wall minutes of all "
                                                   "trials together"),
    budget_kwh: Optional[float] = typer.Option(None, "--budget-kwh", help="budget: energy of all trials (kWh)"),
    memory: Optional[str] = typer.Option(None, "--memory", help="memory for training, e.g. 16GB: candidates whose "
                                         "estimated training memory exceeds it are dropped"),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="pick the fastest-training candidate within "
                                              "this many points (1/100 of the metric's unit) of the best"),
    eta: Optional[int] = typer.Option(None, "--eta", help="reduction factor: the best 1/eta go on (default 3)"),
    min_fraction: Optional[float] = typer.Option(None, "--min-fraction", help="share of the data at rung 0"),
    name: Optional[str] = typer.Option(None, "--name", help="select folder name (default: select-<config stem>)"),
    no_report: bool = typer.Option(False, "--no-report", help="skip report.html"),
):
    """Choose the pre-trained model and the PEFT method for the data within a budget: successive halving over
    (model, method) pairs, each trial a normal run; writes summary.json, best.yaml and report.html. Re-running the
    same command resumes."""
    from .select import select

    options = {"models": models, "methods": methods, "budget_minutes": budget_minutes, "budget_kwh": budget_kwh,
               "memory": memory, "tolerance": tolerance, "eta": eta, "min_fraction": min_fraction, "name": name}
    try:
        with exit_on_user_error():
            result = select(config, overrides, report=not no_report,
                            log=lambda s: err.print(s, markup=False, highlight=False, soft_wrap=True), **options)
    except KeyboardInterrupt:
        err.print("interrupted: re-run the same command to resume the selection")
        raise typer.Exit(130)
    err.print(f"rule: {result.rule}", markup=False, highlight=False, soft_wrap=True)
    out.print_json(json.dumps({"select_dir": str(result.select_dir),
                               "pick": result.pick.label if result.pick else None,
                               "best_config": str(result.best_config) if result.best_config else None,
                               "report": str(result.report) if result.report else None,
                               "decided_rung": result.decided_rung, "stopped": result.stopped}))
