"""Loading a run config: a YAML file, a dict or a RunConfig, plus `a.b=value` overrides -> a checked `RunConfig`."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .run import RunConfig, model_section
from .sweep_keys import check_space
from .validation import validate_run_config


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value (for example train.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}; use dotted names such as method.r")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} holds {nxt!r}, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def config_from_dict(data: dict, source: str = "config") -> RunConfig:
    cfg = validate_run_config(data, source)
    if cfg.sweep is not None:  # every swept key and value against the schema, before any compute
        check_space(cfg, source)
    return cfg


def load_config(path: str | Path | dict | RunConfig, overrides: list[str] | None = None) -> RunConfig:
    """A validated RunConfig from a YAML path, a dict or a RunConfig, with dotted overrides applied."""
    if isinstance(path, RunConfig):  # the keys set, not the filled-in defaults (a method's lr), which reload the same
        data, source = path.model_dump(mode="json", exclude_unset=True), "config"
    elif isinstance(path, dict):
        data, source = path, "config"
    else:
        data, source = _read_yaml(Path(path)), str(Path(path))
    if overrides:
        if isinstance(data, dict) and isinstance(data.get("model"), str):  # so that model.max_length=64 finds a section
            data = {**data, "model": model_section(data["model"])}
        data = apply_overrides(data, overrides)
    return config_from_dict(data, source)


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
