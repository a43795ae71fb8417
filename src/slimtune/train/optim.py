"""AdamW over the trainable parameters, with decay off for biases and norms."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr, "base_lr": lr, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr, "name": "no_decay"})
    return [g for g in groups if g["params"]]


def build_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = param_groups(model, lr, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters; check method.targets")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
