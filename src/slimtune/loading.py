"""What training and the finished-run verbs share: the model source a config names, its tokenizer or
preprocessor, the precision the hardware runs, example lengths for batching."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError
from .models import ModelSource, resolve
from .models.factory import factory_source

if TYPE_CHECKING:
    from .config import RunConfig
    from .tasks.base import Task


def resolve_precision(precision: str) -> str:
    """accelerate's mixed_precision value: 'bf16', 'fp16' or 'no'."""
    if precision == "fp32":
        return "no"
    if precision == "fp16":
        if not torch.cuda.is_available():
            raise ConfigError("train.precision: 'fp16' needs a CUDA GPU; use 'bf16' or 'auto' on CPU")
        return "fp16"
    if precision == "bf16":
        return "bf16"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() \
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if cpu_bf16 else "no"


def resolve_model(cfg: RunConfig) -> ModelSource:
    if cfg.model.factory:
        return factory_source(cfg.model.factory)
    return resolve(cfg.model.name, cfg.model.gguf_file, cfg.model.revision)


def load_processor(task: Task, cfg: RunConfig, source: ModelSource) -> Any:
    """The tokenizer (text), or the task's own preprocessor (images)."""
    return task.load_processor(cfg, source)


def lengths(examples: list[dict]) -> list[int]:
    return [e["length"] if "length" in e else len(e["input_ids"]) for e in examples]
