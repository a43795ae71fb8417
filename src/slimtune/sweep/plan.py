"""What every worker of one sweep is given: the `SweepPlan`, and the error that ends a sweep.

`slimtune sweep` builds the plan once (study.make_plan); a worker in the same process takes it as it is,
a worker process (`--workers N`) reads it from `<sweep>/.plan-<pid>.json` (`to_dict` / `from_dict`: the
file's keys are the field names, the sweep section is its JSON dump, the storage URL is masked).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import SlimtuneError
from .space import SweepConfig


class SweepError(SlimtuneError, RuntimeError):
    """A sweep that cannot go on (its trials keep failing, a worker died, the storage disagrees)."""


@dataclass(frozen=True)
class SweepPlan:
    sweep_dir: Path
    """The sweep folder, absolute: trials/, trials.csv, best.yaml, summary.json, the plots."""
    sweep_name: str
    study_name: str
    storage: str
    """The optuna storage URL to connect to. In the plan file it is masked; a worker process gets the real
    one from $SLIMTUNE_SWEEP_STORAGE (storage.run_time_url)."""
    base: dict[str, Any]
    """The base config of every trial: the keys the user set, without the sweep section (space.sweep_base)."""
    sweep: SweepConfig
    monitor: str
    """The objective: the eval metric each trial's best value is taken of (the config's eval.monitor)."""
    direction: str
    """'maximize' or 'minimize': sweep.direction, or the monitor's own sense when that is 'auto'."""
    budget: int | None
    """Finished trials (complete + pruned) to reach across all workers and re-runs; None: only the deadline."""
    deadline: float | None
    """Wall-clock time (time.time()) after which no trial starts; None: no time budget."""
    seed: int
    """The sampler seed before the per-worker offset (worker.worker_seed): sweep.seed, else train.seed."""
    threads: int | None
    """Torch threads of each worker process (cpus // workers); None: one worker in the sweep's own process."""
    parent_pid: int | None = None
    """The `slimtune sweep` process that started this worker process: the worker ends when it is gone."""

    @property
    def params(self) -> list[str]:
        """The swept keys in the order the config gives them (the order of trials.csv's columns)."""
        return list(self.sweep.params)

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"

    def to_dict(self) -> dict[str, Any]:
        """The plan file's JSON: every field by name, the sweep section as the config writes it."""
        data = asdict(self)
        data["sweep_dir"] = str(self.sweep_dir)
        data["sweep"] = self.sweep.model_dump(mode="json")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepPlan:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["sweep_dir"] = Path(data["sweep_dir"])
        values["sweep"] = SweepConfig.model_validate(data["sweep"])
        return cls(**values)
