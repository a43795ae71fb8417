"""The `sweep:` section of the run config: the search space (one `ParamSpec` per dotted key), the budget, the
sampler, the pruner and the storage.

    sweep:
      params:
        train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}     # float range (log scale)
        method.r: [4, 8, 16]                                 # choices (a list is shorthand for {choices: [...]})
        method.dropout: {low: 0.0, high: 0.3}
        train.warmup: {type: float, low: 0, high: 0.2, step: 0.05}
        method.name: [lora, dora]                            # the method itself
      trials: 20
      pruner: median

The keys are checked against the rest of the schema by `config.sweep_keys.check_space`; running the search is
`slimtune.sweep`'s (optuna loads there, not here).
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..schema import StrictModel, plain_name

SCALARS = (type(None), bool, int, float, str)


class ParamSpec(StrictModel):
    """One dimension of the search space: a float / int range (linear or log) or a list of choices."""

    type: Literal["float", "int", "categorical"] | None = Field(
        None, description="'float' or 'int' range, or 'categorical' choices; inferred when absent (choices -> "
        "categorical; integer low and high -> int; else float)")
    low: int | float | None = Field(None, description="lower end of the range (included)")
    high: int | float | None = Field(None, description="upper end of the range (included)")
    log: bool = Field(False, description="sample the range on a log scale (needs low > 0)")
    step: int | float | None = Field(None, description="discretisation step of the range (not with log)")
    choices: list[Any] | None = Field(None, description="the values to choose from (numbers, strings, booleans, null, "
                                      "or lists / mappings, e.g. target module lists)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        return {"choices": value} if isinstance(value, list) else value

    @property
    def kind(self) -> str:
        if self.type:
            return self.type
        if self.choices is not None:
            return "categorical"
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high) if v is not None)
        return "int" if ints and (self.step is None or isinstance(self.step, int)) else "float"

    @model_validator(mode="after")
    def _check(self):
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either `choices` or a range (`low` and `high`), not both")
            if self.type in ("float", "int"):
                raise ValueError(f"type {self.type!r} is a range: give `low` and `high` instead of `choices`")
            if not self.choices:
                raise ValueError("`choices` is empty; list at least one value")
            if self.log or self.step is not None:
                raise ValueError("`log` and `step` apply to ranges, not to choices")
            labels = [choice_label(c) for c in self.choices]
            if len(set(labels)) != len(labels):
                raise ValueError(f"`choices` has duplicates: {self.choices!r}")
            return self
        if self.type == "categorical":
            raise ValueError("type 'categorical' needs `choices` (a list of values)")
        if self.low is None or self.high is None:
            raise ValueError("a range needs both `low` and `high` (or give `choices`: a list of values)")
        for name in ("low", "high", "step"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got low={self.low}")
        if self.step is not None:
            if self.step <= 0:
                raise ValueError(f"step must be > 0, got {self.step}")
            if self.log:
                raise ValueError("`step` cannot be combined with `log: true`")
            if self.step > self.high - self.low:
                raise ValueError(f"step ({self.step}) is larger than the range {self.low}..{self.high}")
        if self.kind == "int":
            bad = [f"{n}={v!r}" for n, v in (("low", self.low), ("high", self.high), ("step", self.step))
                   if v is not None and float(v) != int(v)]
            if bad:
                raise ValueError(f"an int range needs whole numbers: {', '.join(bad)}")
        return self

    def grid(self) -> list:
        """The values a grid search visits (categorical choices, or a range with a step)."""
        if self.kind == "categorical":
            return [choice_label(c) for c in self.choices]
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise ValueError("a float range needs a `step` for the grid sampler (or use choices)")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


class SweepConfig(StrictModel):
    """Hyperparameter search (`slimtune sweep`): each trial is a normal run of this config with the
    sampled values set; the objective is the best value of `eval.monitor` (its direction from eval.mode)."""

    params: dict[str, ParamSpec] = Field(
        ..., description="search space: dotted config key -> range {low, high, log, step, type} or a list of choices")
    trials: int | None = Field(20, ge=1, description="budget: number of finished trials (completed + pruned), counted "
                               "across all workers and re-runs of the sweep")
    timeout_minutes: float | None = Field(None, gt=0, description="budget: stop starting new trials after this many "
        "minutes "
                                          "(per invocation of `slimtune sweep`; trials in flight finish)")
    sampler: Literal["tpe", "random", "cmaes", "gp", "qmc", "grid"] = Field(
        "tpe", description="optuna sampler: tpe (default), random, cmaes (needs `pip install cmaes`), gp, qmc, grid "
        "(every combination; float ranges need a step)")
    pruner: Literal["median", "successive-halving", "hyperband", "none"] = Field(
        "median", description="stops poor trials early from their evaluations: median (worse than the median of "
            "earlier "
        "trials at the same evaluation), successive-halving, hyperband, or none")
    prune_after: int = Field(1, ge=1, description="evaluations every trial gets before it can be pruned (the min "
        "resource "
                             "of successive-halving / hyperband); a trial is never pruned at its last evaluation, nor "
                                 "while its "
                             "own lr warmup runs")
    prune_on: str | None = Field(
        None, description="the eval metric the pruner compares at each evaluation (default: the objective, "
            "eval.monitor). "
        "'loss' tells trials apart that tie on accuracy early on (on a small eval set every trial still predicting the "
        "majority class has the same accuracy, and successive-halving promotes ties); the objective stays eval.monitor")
    prune_tiebreak: str | None = Field(
        None, description="an eval metric that orders trials which tie on the pruned metric (weight 1e-9), e.g. "
        "loss; off by default (measurements: benchmarks/RESULTS.md)")
    startup_trials: int = Field(3, ge=0, description="median pruner: trials that run to the end before pruning starts")
    reduction_factor: int = Field(3, ge=2, description="successive-halving / hyperband: only the best "
                                  "1/reduction_factor of the trials at each rung go on (measurements: "
                                      "benchmarks/RESULTS.md)")
    direction: Literal["auto", "maximize", "minimize"] = Field(
        "auto", description="objective direction; auto: from eval.monitor / eval.mode (maximize accuracy, minimize "
            "loss)")
    storage: str | None = Field(None, description="optuna storage URL; default: SQLite in the sweep folder. A shared "
                                "database (postgresql://user:password@host/db) lets workers on many machines join one "
                                    "study. "
                                "Every file the sweep writes holds it with the password masked "
                                    "(postgresql://user:***@host/db); "
                                "at run time the URL comes from --storage, else $SLIMTUNE_SWEEP_STORAGE, else this key "
                                "(a masked one needs the URL again: --storage or $SLIMTUNE_SWEEP_STORAGE)")
    study_name: str | None = Field(None, description="study name in the storage (default: the sweep name)")
    name: str | None = Field(None, description="sweep folder name under output.dir (default: sweep-<config file "
        "stem>); "
                             "re-running the same sweep resumes it")
    seed: int | None = Field(None, description="sampler seed (default: train.seed)")

    _plain_name = field_validator("name")(plain_name)

    @field_validator("params")
    @classmethod
    def _nonempty(cls, value):
        if not value:
            raise ValueError("the search space is empty; add at least one key, e.g. train.lr: {low: 1.0e-5, high: "
                "1.0e-3, log: true}")
        return value

    @model_validator(mode="after")
    def _budget(self):
        if self.trials is None and self.timeout_minutes is None:
            raise ValueError("no budget: set sweep.trials and / or sweep.timeout_minutes")
        return self


# -- values -------------------------------------------------------------------

def choice_label(value: Any) -> Any:
    """optuna stores scalar choices as they are; lists / mappings go in as their JSON text."""
    return value if isinstance(value, SCALARS) else json.dumps(value, sort_keys=True)


def choice_value(label: Any, spec: ParamSpec) -> Any:
    """The choice whose label optuna stored (a copy: a trial may change its lists)."""
    for c in spec.choices:
        if choice_label(c) == label:
            return copy.deepcopy(c)
    return label
