"""AdamW over the trainable parameters, in named groups.

Decay is off for biases and norms. `lr_scale(name) -> (group, multiplier) | None`
puts a parameter into a group with its own learning rate (LoRA+'s B matrices;
layer-wise rates). Each group keeps `base_lr`, the peak the schedule multiplies.
"""
from __future__ import annotations

from typing import Callable

import torch

from .groups import lr_multipliers


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


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    lr_scale: Callable | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model, lr, weight_decay, lr_scale)
    if not groups:
        from ..errors import MethodError

        raise MethodError("the model has no trainable parameters; check method.targets")
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


# -- the rates of parameter groups: layer-wise / discriminative, the new head's, the method's own ----------

HEAD_LR_MULT, HEAD_LR_MAX = 10.0, 2e-2


def default_head_lr(lr: float, mult: float = HEAD_LR_MULT) -> float:
    """The lr of a newly initialised head when train.head_lr is not set: `mult` x train.lr (the task's; 10 by default),
    at most 2e-2 (the linear-probe rate of the method table, `head-only`), never below train.lr. A head that starts
    from random weights at the adapters' rate learns too slowly: the adapters then reshape the features
    for a head that barely moves, and small imbalanced runs collapse onto the majority classes
    (benchmarks/RESULTS.md, bench_transfer: Banking77 66.5 -> 87.8% test accuracy; SST-2 unchanged)."""
    return max(lr, min(mult * lr, HEAD_LR_MAX))


def is_head_param(name: str, head: list[str]) -> bool:
    dotted = "." + name
    return any(f".{h}." in dotted for h in head)


def param_lr_scale(cfg, method, groups, head: list[str] | None = None, head_lr_mult: float = HEAD_LR_MULT):
    """Per-parameter (group, lr multiplier): layer-wise / discriminative rates composed with the method's own
    (LoRA+), and the rate of a newly initialised head (`head`: its module names; `head_lr_mult`: the task's
    TaskSpec.new_head_lr_mult)."""
    t = cfg.train
    mults = None
    if t.layer_decay is not None or t.lr_ratio_min is not None or t.head_lr is not None:
        mults = lr_multipliers(groups, t.layer_decay, t.lr_ratio_min, t.head_lr / t.lr if t.head_lr else None)
    # the new head's default rate (train.head_lr unset): its own parameters only, not the pooler / final
    # norm / soft prompts that share the top group
    head_mult = default_head_lr(t.lr, head_lr_mult) / t.lr if head and t.head_lr is None else 1.0

    def scale(name):
        g, m = None, 1.0
        if mults is not None:
            g = groups.of_param.get(name, "head")
            m = mults[g]
        if head_mult != 1.0 and is_head_param(name, head):  # its own group: "head" may also hold the pooler /
            g, m = "new_head", m * head_mult                      # norms / soft prompts at another rate
        own = method.lr_scale(name, cfg.method) if method.lr_scale else None
        if own:
            g, m = (f"{g}/{own[0]}" if g else own[0]), m * own[1]
        return (g, m) if g else None

    reported = mults
    if head_mult != 1.0:  # param_groups.json: the new head's multiplier as applied
        reported = {**(mults or {}), "new_head": (mults or {}).get("head", 1.0) * head_mult}
    return (scale if (reported is not None or method.lr_scale) else None), reported


def trainable_per_group(model, groups) -> dict:
    out = {g: 0 for g in groups.names}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[groups.of_param.get(n, "head")] += p.numel()
    return out
