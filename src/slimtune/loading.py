"""What training and the finished-run verbs share: the model source a config names, its tokenizer or
preprocessor, the precision the hardware runs, example lengths for batching."""
from __future__ import annotations

import torch

from .models import load_tokenizer, resolve
from .models.factory import factory_source


def resolve_precision(precision: str) -> str:
    """accelerate's mixed_precision value: 'bf16', 'fp16' or 'no'."""
    if precision == "fp32":
        return "no"
    if precision == "fp16":
        if not torch.cuda.is_available():
            raise ValueError("train.precision: 'fp16' needs a CUDA GPU; use 'bf16' or 'auto' on CPU")
        return "fp16"
    if precision == "bf16":
        return "bf16"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if cpu_bf16 else "no"


def resolve_model(cfg):
    if cfg.model.factory:
        return factory_source(cfg.model.factory)
    return resolve(cfg.model.name, cfg.model.gguf_file, cfg.model.revision)


def load_processor(task, cfg, source):
    """The tokenizer (text), or the task's own preprocessor (images)."""
    if hasattr(task, "load_processor"):
        return task.load_processor(cfg, source)
    return load_tokenizer(source, cfg.model.trust_remote_code, cfg.model.revision)


def lengths(examples) -> list[int]:
    return [e["length"] if "length" in e else len(e["input_ids"]) for e in examples]
