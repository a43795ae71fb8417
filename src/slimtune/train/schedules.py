"""Learning-rate schedules as pure functions of progress (nanoGPT's get_lr style).

`lr_factor(step, total, warmup_steps, kind)` is the multiplier of each group's
peak lr after `step` optimizer steps; the loop sets it on every param group.
"""
from __future__ import annotations

import math


def warmup_steps(warmup: float, total: int) -> int:
    """`train.warmup` < 1 is a fraction of all steps, >= 1 a number of steps."""
    return int(round(warmup * total)) if warmup < 1 else min(int(warmup), total)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}; accepted: constant, linear, cosine")
