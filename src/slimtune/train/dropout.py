"""Dropout with cheaper masks, for CPU training.

A profile of LoRA training on a 2-core CPU (MiniLM, SST-2, bf16 autocast) put 37% of the training
time in `torch.dropout`: the LoRA input dropout of every adapted layer plus the model's own hidden
dropouts draw one random number per activation element, while the adapter's own compute (x @ A with
r = 8) is tiny. `FastDropout` draws one 64-bit word per four elements from torch's generator and
compares 16-bit slices of it with a threshold: the same Bernoulli keep-mask (p rounded to a multiple
of 1/65536, the scale 1 / (1 - p) using the rounded p, so E[y] = x exactly), the same RNG state that
checkpoints save and restore (runs stay reproducible and resume exactly), a 1-byte mask kept for
the backward pass instead of a float one. On CUDA torch's fused dropout kernel is already fast, so
slimtune swaps modules only for CPU training (`train.fast_dropout`, on by default: same quality as
torch's dropout on SST-2 over 3 seeds, on the quickstart over 8 seeds and on SmolLM2 chat over 2 seeds;
benchmarks/RESULTS.md).

LoRA adapters that read the same tensor share one dropped copy of it. peft gives every adapted linear its own
input dropout, so the query, key and value adapters of a block draw three masks over the same hidden states
(and keep three dropped copies for the backward pass); on models with a fused qkv projection (GPT-2, Phi-3,
Falcon) peft draws one mask for all three. slimtune's LoRA input dropouts do what the fused case does on every
model: the first of them to see a tensor drops it, the next ones with the same p reuse that output as long as
nothing has drawn random numbers since. The model's own dropouts never share (two of them over one tensor mean
two masks). A profile of MiniLM + LoRA on
every block linear put a quarter of the dropout masks' cost in the two redundant ones (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

_LEVELS = 65536  # 16-bit random slices


def keep_mask(shape, p: float, device=None) -> tuple[torch.Tensor, float]:
    """(bool mask with P(True) = 1 - p', scale 1 / (1 - p')), p' = p rounded to a multiple of 1/65536."""
    numel = 1
    for s in shape:
        numel *= int(s)
    drop_levels = min(_LEVELS - 1, max(0, round(p * _LEVELS)))
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    slices = words.view(torch.int16)[:numel].view(shape)
    mask = slices >= (drop_levels - _LEVELS // 2)  # int16 slices are uniform over [-32768, 32767]
    return mask, _LEVELS / (_LEVELS - drop_levels)


class _LastShared:
    """The last tensor a sharing dropout dropped (held weakly) and its output. A hit needs the very same tensor
    object, unchanged since (its version counter), the same p and grad mode, and the CPU generator exactly where
    that draw left it: a hit never depends on what happens to be alive, and a dropout drawn in between (the
    model's own, any random op) ends the sharing. That keeps activation checkpointing exact: its recomputation
    restores the RNG state of the segment's start, which can only be a state *before* the last cached draw, so
    the recomputed segment misses and hits exactly where the first pass did."""

    entry: tuple | None = None

    @classmethod
    def get(cls, x: torch.Tensor, p: float) -> torch.Tensor | None:
        e = cls.entry
        if (e is None or x.device.type != "cpu" or e[0]() is not x
                or e[1:4] != (x._version, p, torch.is_grad_enabled())):
            return None
        return e[5] if torch.equal(e[4], torch.default_generator.get_state()) else None

    @classmethod
    def put(cls, x: torch.Tensor, p: float, out: torch.Tensor) -> None:
        if x.device.type == "cpu":
            cls.entry = (weakref.ref(x), x._version, p, torch.is_grad_enabled(),
                         torch.default_generator.get_state(), out)


class FastDropout(nn.Dropout):
    """`nn.Dropout` (same p, same train / eval behaviour) with masks from 16-bit random slices. With
    `share_input`, a tensor this or another sharing dropout (same p) has just dropped is not dropped again:
    its output is returned (LoRA input dropouts; module docstring)."""

    def __init__(self, p: float = 0.5, inplace: bool = False, share_input: bool = False):
        super().__init__(p, inplace)
        self.share_input = share_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return torch.zeros_like(x)
        if self.share_input and (out := _LastShared.get(x, self.p)) is not None:
            return out
        mask, scale = keep_mask(x.shape, self.p, x.device)
        out = torch.where(mask, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))
        if self.share_input:
            _LastShared.put(x, self.p, out)
        return out


def use_fast_dropout(model: nn.Module) -> int:
    """Replace every plain `nn.Dropout` inside the model (peft's LoRA input dropouts included) by
    FastDropout with the same p, LoRA's sharing their input's mask; returns how many were replaced."""
    swaps = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if type(child) is nn.Dropout and child.p > 0:
                # peft keeps each LoRA layer's input dropouts in a ModuleDict named lora_dropout (one per adapter)
                swaps.append((module, child_name, child, name.rsplit(".", 1)[-1] == "lora_dropout"))
    for parent, child_name, child, lora_input in swaps:
        fast = FastDropout(child.p, child.inplace, share_input=lora_input)
        fast.train(child.training)
        setattr(parent, child_name, fast)
    return len(swaps)
