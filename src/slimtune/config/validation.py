"""A dict -> a `RunConfig`, with pydantic's errors turned into one `ConfigError` that names each key, the value
given and what is accepted (the accepted keys of a section, the method names, the allowed values)."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError
from .run import RunConfig
from .sweep import ParamSpec, SweepConfig


def validate_run_config(data: Any, source: str = "config") -> RunConfig:
    """The RunConfig `data` describes (its sweep space is not checked here: `config_from_dict` does that)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (task, model, data, ...), "
                          f"got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = _loc_str(e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _section_model(e["loc"][:-1])
            accepted = ", ".join(parent.model_fields) if parent else "see `slimtune schema`"
            lines.append(f"  {loc}: unknown key (value {e['input']!r}); accepted keys here: {accepted}")
        elif e["type"] == "union_tag_invalid":
            from ..methods import REGISTRY

            methods = ", ".join(repr(n) for n in REGISTRY)
            lines.append(f"  {loc}.name: {e['ctx']['tag']!r} is not a method; accepted: {methods}")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], dict):
                lines.append(f"  {loc}: {e['input']!r} is not accepted: {msg}")
            else:
                lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def _loc_str(loc: tuple) -> str:
    """'method.r', dropping the union tag pydantic inserts after 'method'."""
    from ..methods import REGISTRY

    parts = list(loc)
    if len(parts) > 1 and parts[0] == "method" and parts[1] in REGISTRY:
        del parts[1]
    return ".".join(str(x) for x in parts)


def _section_model(loc: tuple) -> type | None:
    """The pydantic model of the section that `loc` points into."""
    from ..methods import REGISTRY

    parts = [p for p in loc if isinstance(p, str)]
    if parts and parts[0] == "method":
        name = parts[1] if len(parts) > 1 and parts[1] in REGISTRY else "lora"
        return REGISTRY[name].config
    if parts and parts[0] == "sweep":  # sweep, or one parameter of its space (sweep.params.<dotted key>)
        return ParamSpec if len(parts) == 3 and parts[1] == "params" else SweepConfig if len(parts) == 1 else None
    model: Any = RunConfig
    for part in parts:
        field = model.model_fields.get(part)
        if field is None or not hasattr(field.annotation, "model_fields"):
            return None
        model = field.annotation
    return model
