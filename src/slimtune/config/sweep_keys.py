"""The search space's keys against the run config: which dotted keys exist and may be swept, which apply to a
method, and the config a trial gets (the base config with the sampled values set).

A `method.*` key is conditional when `method.name` is swept: a trial only samples the keys its method has. Bad
keys and bad ranges fail before any compute with a message naming the key, the value and what is accepted
(`check_space`, called by the config loader).
"""
from __future__ import annotations

import copy
import types
import typing
from typing import Any

from pydantic.fields import FieldInfo

from ..errors import ConfigError
from .run import RunConfig
from .sweep import ParamSpec
from .validation import validate_run_config

NOT_SWEEPABLE = {
    "sweep": "the sweep section itself cannot be swept",
    "output": "the sweep sets each trial's output folder (under the sweep folder)",
    "task": "the task cannot be swept (each task has its own data and metrics)",
    "eval.monitor": "the monitored metric is the sweep's objective; set it in eval.monitor, not in the space",
    "eval.mode": "the objective's direction is set by eval.mode / sweep.direction, not sampled",
}


def method_configs() -> dict[str, type]:
    """Method name -> its config class."""
    from ..methods import REGISTRY

    return {name: method.config for name, method in REGISTRY.items()}


def set_key(data: dict, key: str, value: Any) -> None:
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


def sweep_base(cfg: RunConfig) -> dict:
    """The base of a sweep's trials: the keys the user set, without the sweep section. A default the loader filled
    in (a method's own `train.lr`) is not among them, so a trial of another method gets that method's default."""
    base = cfg.model_dump(mode="json", exclude_unset=True)
    base.pop("sweep", None)
    return base


def method_names(cfg: RunConfig, space: dict[str, ParamSpec]) -> list[str]:
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

def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "model_fields")


def _plain_types(annotation: Any) -> set:
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


def field_of(key: str, cfg: RunConfig, space: dict[str, ParamSpec]) -> FieldInfo | None:
    """The pydantic field a dotted key names (None for method.name), or a ValueError saying what is accepted."""
    for bad, why in NOT_SWEEPABLE.items():
        if key == bad or key.startswith(bad + "."):
            raise ValueError(f"{key!r} cannot be swept: {why}")
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"{key!r} is not a dotted config key (for example train.lr or method.r)")
    top = RunConfig.model_fields
    if parts[0] not in top:
        sections = ", ".join(k for k in top if k not in NOT_SWEEPABLE)
        raise ValueError(f"{key!r} is not a config key; accepted sections: {sections}")
    if parts[0] == "method":
        return _method_field(key, parts, cfg, space)
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
        raise ValueError(f"{key!r} is a section; sweep one of its keys: "
                         + ", ".join(f"{key}.{f}" for f in model.model_fields))
    return field


def _method_field(key: str, parts: list[str], cfg: RunConfig, space: dict[str, ParamSpec]) -> FieldInfo | None:
    """The field of a `method.<option>` key in the methods a trial can use."""
    if len(parts) != 2:
        raise ValueError(f"{key!r}: method options are one level deep (method.<option>)")
    if parts[1] == "name":
        return None
    configs = method_configs()
    names = [n for n in method_names(cfg, space) if n in configs]  # an unknown one: reported by the method.name check
    have = [configs[n].model_fields[parts[1]] for n in names if parts[1] in configs[n].model_fields]
    if not have:
        accepted = sorted({f for n in names for f in configs[n].model_fields if f != "name"})
        raise ValueError(f"{key!r} is not an option of method {' / '.join(names)}; accepted: "
                         + ", ".join(f"method.{f}" for f in accepted))
    return have[0]


def check_space(cfg: RunConfig, source: str = "config") -> None:
    """Every swept key exists and every end of its range / every choice is a valid value for it;
    raises ConfigError naming the key. Called by the config loader when a `sweep:` section is present."""
    space = cfg.sweep.params
    problems = _method_name_problems(space)
    base = sweep_base(cfg)
    for key, spec in space.items():
        try:
            field = field_of(key, cfg, space)
        except ValueError as e:
            problems.append(f"sweep.params.{key}: {e}")
            continue
        if field is not None and spec.kind == "float" and _plain_types(field.annotation) == {int}:
            problems.append(f"sweep.params.{key}: {key} takes whole numbers; give integer low / high (or type: int)")
            continue
        if key != "method.name":
            problems += _value_problems(key, spec, cfg, base)
    if cfg.sweep.sampler == "grid":
        for key, spec in space.items():
            try:
                spec.grid()
            except ValueError as e:
                problems.append(f"sweep.params.{key}: {e}")
    if problems:
        raise ConfigError(f"invalid config ({source}):\n" + "\n".join(f"  {p}" for p in problems))


def _method_name_problems(space: dict[str, ParamSpec]) -> list[str]:
    """A swept method.name must be a list of method names."""
    spec = space.get("method.name")
    if spec is None:
        return []
    configs = method_configs()
    bad = [c for c in (spec.choices or []) if c not in configs]
    if spec.kind == "categorical" and not bad:
        return []
    return [f"sweep.params.method.name: {bad or spec.model_dump(exclude_none=True)!r} "
            f"{'are not methods' if bad else 'must be a list of method names'}; accepted: {', '.join(configs)}"]


def _value_problems(key: str, spec: ParamSpec, cfg: RunConfig, base: dict) -> list[str]:
    """The first end of the range / choice of `key` that the config rejects, per method a trial can use: each is
    validated as a trial's config would be."""
    space, configs = cfg.sweep.params, method_configs()
    values = spec.choices if spec.kind == "categorical" else [spec.low, spec.high]
    if spec.kind == "int":
        values = [int(v) for v in values]
    elif spec.kind == "float":
        values = [float(v) for v in values]
    problems = []
    for method in method_names(cfg, space):
        if method not in configs or not applies(key, method):
            continue
        params = {"method.name": method} if "method.name" in space else {}
        for value in values:
            try:
                validate_run_config(trial_config(base, {**params, key: value}), "sweep trial")
            except ConfigError as e:
                detail = "; ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
                problems.append(f"sweep.params.{key}: the value {value!r} is not accepted: {detail}")
                break
    return problems
