"""Model and method selection (`slimtune select`): successive halving over (model, method) pairs within a budget.

    plan.py     SelectPlan, Candidate, SelectResult and the race's rules as pure functions: the rungs, who goes
                on, the budget, the pick (best quality, or the cheapest within the tolerance)
    memory.py   the candidates that fit in select.memory, by `slimtune inspect`'s estimate (meta device)
    trial.py    one trial: a normal run() with the candidate and the rung's data, or its finished folder read
                back; the inference latency probe
    race.py     the select folder, the memory check, the race (the module docstring says why not optuna)
    outputs.py  summary.json, best.yaml
    report.py   report.html (report/'s page, table and Pareto plot)

The config section is `slimtune.config.select` (torch-free); nothing here loads for a plain `slimtune run`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .plan import SelectResult


def select(*args: Any, **kwargs: Any) -> SelectResult:
    """See `slimtune.select.race.select`."""
    from .race import select as _select

    return _select(*args, **kwargs)
