"""The search space: the `sweep:` section of the run config, checked against the config schema.

    sweep:
      params:
        train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}     # float range (log scale)
        method.r: [4, 8, 16]                                 # choices (a list is shorthand for {choices: [...]})
        method.dropout: {low: 0.0, high: 0.3}
        train.warmup: {type: float, low: 0, high: 0.2, step: 0.05}
        method.name: [lora, dora]                            # the method itself
      trials: 20
      pruner: median

A key is a dotted config path; the trial's config is the base config with the sampled values set
(`trial_config`). `method.*` keys are conditional when `method.name` is swept: a trial only samples the
keys its method has. Bad keys and bad ranges fail before any compute with a message naming the key,
the value and what is accepted (`check_space`, called by the config loader).

No optuna here: this module is imported by `slimtune.config`.
"""
from __future__ import annotations

import copy
import json
import math
import types
import typing
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..schema import StrictModel, plain_name

SCALARS = (type(None), bool, int, float, str)
NOT_SWEEPABLE = {
    "sweep": "the sweep section itself cannot be swept",
    "output": "the sweep sets each trial's output folder (under the sweep folder)",
    "task": "the task cannot be swept (each task has its own data and metrics)",
    "eval.monitor": "the monitored metric is the sweep's objective; set it in eval.monitor, not in the space",
    "eval.mode": "the objective's direction is set by eval.mode / sweep.direction, not sampled",
}


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
    timeout_minutes: float | None = Field(None, gt=0, description="budget: stop starting new trials after this many minutes "
                                          "(per invocation of `slimtune sweep`; trials in flight finish)")
    sampler: Literal["tpe", "random", "cmaes", "gp", "qmc", "grid"] = Field(
        "tpe", description="optuna sampler: tpe (default), random, cmaes (needs `pip install cmaes`), gp, qmc, grid "
        "(every combination; float ranges need a step)")
    pruner: Literal["median", "successive-halving", "hyperband", "none"] = Field(
        "median", description="stops poor trials early from their evaluations: median (worse than the median of earlier "
        "trials at the same evaluation), successive-halving, hyperband, or none")
    prune_after: int = Field(1, ge=1, description="evaluations every trial gets before it can be pruned (the min resource "
                             "of successive-halving / hyperband); a trial is never pruned at its last evaluation, nor while its "
                             "own lr warmup runs")
    prune_on: str | None = Field(
        None, description="the eval metric the pruner compares at each evaluation (default: the objective, eval.monitor). "
        "'loss' tells trials apart that tie on accuracy early on (on a small eval set every trial still predicting the "
        "majority class has the same accuracy, and successive-halving promotes ties); the objective stays eval.monitor")
    prune_tiebreak: str | None = Field(
        None, description="an eval metric that orders trials which tie on the pruned metric (weight 1e-9: it never "
        "outweighs a real difference), e.g. loss: early on, trials still predicting the majority class tie on accuracy, "
        "and successive-halving promotes all of them. Off by default: on SST-2 it pruned more (0.34x the unpruned wall "
        "time instead of 0.47x) but also the slow-starting trials that end best (benchmarks/RESULTS.md, bench_sweep)")
    startup_trials: int = Field(3, ge=0, description="median pruner: trials that run to the end before pruning starts")
    reduction_factor: int = Field(3, ge=2, description="successive-halving / hyperband: only the best 1/reduction_factor "
                                  "of the trials at each rung go on (successive-halving on SST-2: 4 was at least as good as 3, "
                                  "0.37x the unpruned time in a replay of 1,000 sweeps, 0.38x measured; benchmarks/RESULTS.md)")
    direction: Literal["auto", "maximize", "minimize"] = Field(
        "auto", description="objective direction; auto: from eval.monitor / eval.mode (maximize accuracy, minimize loss)")
    storage: str | None = Field(None, description="optuna storage URL; default: SQLite in the sweep folder. A shared "
                                "database (postgresql://user:password@host/db) lets workers on many machines join one study. "
                                "Every file the sweep writes holds it with the password masked (postgresql://user:***@host/db); "
                                "at run time the URL comes from --storage, else $SLIMTUNE_SWEEP_STORAGE, else this key "
                                "(a masked one needs the URL again: --storage or $SLIMTUNE_SWEEP_STORAGE)")
    study_name: str | None = Field(None, description="study name in the storage (default: the sweep name)")
    name: str | None = Field(None, description="sweep folder name under output.dir (default: sweep-<config file stem>); "
                             "re-running the same sweep resumes it")
    seed: int | None = Field(None, description="sampler seed (default: train.seed)")

    _plain_name = field_validator("name")(plain_name)

    @field_validator("params")
    @classmethod
    def _nonempty(cls, value):
        if not value:
            raise ValueError("the search space is empty; add at least one key, e.g. train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}")
        return value

    @model_validator(mode="after")
    def _budget(self):
        if self.trials is None and self.timeout_minutes is None:
            raise ValueError("no budget: set sweep.trials and / or sweep.timeout_minutes")
        return self


# -- values -------------------------------------------------------------------

def choice_label(value) -> Any:
    """optuna stores scalar choices as they are; lists / mappings go in as their JSON text."""
    return value if isinstance(value, SCALARS) else json.dumps(value, sort_keys=True)


def choice_value(label, spec: ParamSpec):
    for c in spec.choices:
        if choice_label(c) == label:
            return copy.deepcopy(c)
    return label


def method_configs() -> dict[str, type]:
    """Method name -> its config class (the registry's records or (config, apply) pairs)."""
    from ..methods import REGISTRY

    return {name: (getattr(rec, "config", None) or rec[0]) for name, rec in REGISTRY.items()}


def set_key(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


def trial_config(base: dict, params: dict[str, Any]) -> dict:
    """The base config (the keys the user wrote) with the sampled values set. When `method.name` is
    sampled, the method section keeps only the keys the sampled method has."""
    data = copy.deepcopy(base)
    data.pop("sweep", None)
    name = params.get("method.name")
    if name is not None:
        old = data.get("method") or {}
        fields = method_configs()[name].model_fields
        data["method"] = {"name": name, **{k: v for k, v in old.items() if k != "name" and k in fields}}
    for key, value in params.items():
        if key != "method.name":
            set_key(data, key, value)
    return data


def sweep_base(cfg) -> dict:
    """The base of a sweep's trials: the keys the user set, without the sweep section. A default the loader filled
    in (a method's own `train.lr`) is not among them, so a trial of another method gets that method's default."""
    base = cfg.model_dump(mode="json", exclude_unset=True)
    base.pop("sweep", None)
    return base


def method_names(cfg, space: dict[str, ParamSpec]) -> list[str]:
    """The methods a trial can use: the swept choices of method.name, else the config's method."""
    spec = space.get("method.name")
    if spec is not None and spec.kind == "categorical":
        return [c for c in spec.choices if isinstance(c, str)]
    return [cfg.method.name]


def applies(key: str, method: str) -> bool:
    """Whether a swept key is sampled in a trial that uses `method` (method.* keys are conditional)."""
    if not key.startswith("method.") or key == "method.name":
        return True
    return key.split(".", 1)[1] in method_configs()[method].model_fields


# -- checks -------------------------------------------------------------------

def _is_model(tp) -> bool:
    return isinstance(tp, type) and hasattr(tp, "model_fields")


def _plain_types(annotation) -> set:
    """The non-None types an annotation accepts (int | None -> {int})."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        out = set()
        for a in typing.get_args(annotation):
            out |= _plain_types(a)
        return out
    if origin is typing.Annotated:
        return _plain_types(typing.get_args(annotation)[0])
    return set() if annotation is type(None) else {annotation}


def field_of(key: str, cfg, space: dict[str, ParamSpec]):
    """The pydantic field a dotted key names, or a ValueError saying what is accepted."""
    from ..config import RunConfig

    for bad, why in NOT_SWEEPABLE.items():
        if key == bad or key.startswith(bad + "."):
            raise ValueError(f"{key!r} cannot be swept: {why}")
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"{key!r} is not a dotted config key (for example train.lr or method.r)")
    top = RunConfig.model_fields
    if parts[0] not in top:
        raise ValueError(f"{key!r} is not a config key; accepted sections: {', '.join(k for k in top if k not in NOT_SWEEPABLE)}")
    if parts[0] == "method":
        if len(parts) != 2:
            raise ValueError(f"{key!r}: method options are one level deep (method.<option>)")
        if parts[1] == "name":
            return None
        configs = method_configs()
        names = method_names(cfg, space)
        unknown = [n for n in names if n not in configs]
        if unknown:  # reported by the method.name check
            names = [n for n in names if n in configs]
        have = [configs[n].model_fields[parts[1]] for n in names if parts[1] in configs[n].model_fields]
        if not have:
            accepted = sorted({f for n in names for f in configs[n].model_fields if f != "name"})
            raise ValueError(f"{key!r} is not an option of method {' / '.join(names)}; accepted: "
                             + ", ".join(f"method.{f}" for f in accepted))
        return have[0]
    model, field = RunConfig, None
    for i, part in enumerate(parts):
        section = ".".join(parts[:i]) or "the config"
        if model is None:
            raise ValueError(f"{key!r}: {'.'.join(parts[:i])} is a value, not a section")
        fields = model.model_fields
        if part not in fields:
            raise ValueError(f"{key!r} is not a config key; accepted keys in {section}: "
                             + ", ".join(f"{'.'.join(parts[:i])}.{f}" for f in fields))
        field = fields[part]
        model = field.annotation if _is_model(field.annotation) else None
    if model is not None:
        raise ValueError(f"{key!r} is a section; sweep one of its keys: " + ", ".join(f"{key}.{f}" for f in model.model_fields))
    return field


def check_space(cfg, source: str = "config") -> None:
    """Every swept key exists and every end of its range / every choice is a valid value for it;
    raises ConfigError naming the key. Called by the config loader when a `sweep:` section is present."""
    from ..config import ConfigError, config_from_dict

    space = cfg.sweep.params
    base = sweep_base(cfg)
    problems = []
    configs = method_configs()
    if "method.name" in space:
        spec = space["method.name"]
        bad = [c for c in (spec.choices or []) if c not in configs]
        if spec.kind != "categorical" or bad:
            problems.append(f"sweep.params.method.name: {bad or spec.model_dump(exclude_none=True)!r} "
                            f"{'are not methods' if bad else 'must be a list of method names'}; accepted: {', '.join(configs)}")
    for key, spec in space.items():
        try:
            field = field_of(key, cfg, space)
        except ValueError as e:
            problems.append(f"sweep.params.{key}: {e}")
            continue
        if field is not None and spec.kind == "float" and _plain_types(field.annotation) == {int}:
            problems.append(f"sweep.params.{key}: {key} takes whole numbers; give integer low / high (or type: int)")
            continue
        values = spec.choices if spec.kind == "categorical" else [spec.low, spec.high]
        if spec.kind == "int":
            values = [int(v) for v in values]
        elif spec.kind == "float":
            values = [float(v) for v in values]
        if key == "method.name":
            continue
        for method in method_names(cfg, space):
            if method not in configs or not applies(key, method):
                continue
            params = {key: None}
            if "method.name" in space:
                params = {"method.name": method, key: None}
            for value in values:
                params[key] = value
                try:
                    config_from_dict(trial_config(base, params), "sweep trial")
                except ConfigError as e:
                    detail = "; ".join(l.strip() for l in str(e).splitlines()[1:]) or str(e)
                    problems.append(f"sweep.params.{key}: the value {value!r} is not accepted: {detail}")
                    break
    if cfg.sweep.sampler == "grid":
        for key, spec in space.items():
            try:
                spec.grid()
            except ValueError as e:
                problems.append(f"sweep.params.{key}: {e}")
    if problems:
        raise ConfigError(f"invalid config ({source}):\n" + "\n".join(f"  {p}" for p in problems))
