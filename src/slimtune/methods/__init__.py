"""PEFT methods: one module per family (config + apply), registered here.

`MethodConfig` is the union the run config validates `method:` against, keyed by
`name`; `apply_method` turns a loaded model into the model to train.
A new method = a new module with a `*Config` (with a `name` Literal) and an
`apply(model, cfg, task_type=..., head_modules=...)`, plus one line below.
"""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from . import lora

REGISTRY = {
    "lora": (lora.LoraConfig, lora.apply),
}

_configs = tuple(c for c, _ in REGISTRY.values())
MethodConfig = Annotated[Union[_configs], Field(discriminator="name")] if len(_configs) > 1 else _configs[0]


def apply_method(model, cfg, *, task_type: str, head_modules: list[str]):
    _, apply = REGISTRY[cfg.name]
    return apply(model, cfg, task_type=task_type, head_modules=head_modules)
