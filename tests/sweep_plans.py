"""A SweepPlan for tests of the sweep's parts: placeholder values for the fields a test does not look at."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from slimtune.sweep.plan import SweepPlan
from slimtune.sweep.space import SweepConfig


def sweep_plan(sweep: dict[str, Any] | None = None, **fields: Any) -> SweepPlan:
    """`sweep`: keys of the sweep section over a one-key space; `fields`: the plan's own fields."""
    values: dict[str, Any] = {
        "sweep_dir": Path("/nonexistent/sweep"), "sweep_name": "sweep", "study_name": "sweep",
        "storage": "sqlite:///study.db", "base": {}, "monitor": "loss", "direction": "minimize", "budget": None,
        "deadline": None, "seed": 0, "threads": None}
    section = SweepConfig.model_validate({"params": {"train.lr": [1e-4]}, **(sweep or {})})
    return SweepPlan(**{**values, "sweep": section, **fields})
