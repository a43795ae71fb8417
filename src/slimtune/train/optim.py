"""AdamW over the trainable parameters, in named groups.

Decay is off for biases and norms. `lr_scale(name) -> (group, multiplier) | None`
puts a parameter into a group with its own learning rate (LoRA+'s B matrices;
layer-wise rates). Each group keeps `base_lr`, the peak the schedule multiplies.
"""
from __future__ import annotations

from typing import Callable

import torch


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float,
                 lr_scale: Callable[[str], tuple[str, float] | None] | None = None) -> list[dict]:
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or "norm" in name.lower())
        scaled = lr_scale(name) if lr_scale else None
        gname, mult = scaled if scaled else ("default", 1.0)
        key = (gname, decay)
        if key not in groups:
            label = gname if gname != "default" else ("decay" if decay else "no_decay")
            if gname != "default" and not decay:  # not "<group>/no_decay": MLflow's file store keeps a metric
                label = f"{gname}_no_decay"          # per file, and "lr/head" would have to be a folder too
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr": lr * mult,
                           "base_lr": lr * mult, "name": label}
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(model, lr: float, weight_decay: float, lr_scale=None) -> torch.optim.Optimizer:
    groups = param_groups(model, lr, weight_decay, lr_scale)
    if not groups:
        raise ValueError("the model has no trainable parameters; check method.targets")
    # the fused kernel updates every tensor in one call: PyTorch's CPU default is a Python loop over the
    # parameters, which for a LoRA model (dozens of small tensors) cost ~20 ms a step, as much as a
    # MiniLM forward+backward (benchmarks/RESULTS.md, bench_core); fall back to foreach where fused
    # is not available for the device / dtype
    params = [p for g in groups for p in g["params"]]
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if fusable:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)
