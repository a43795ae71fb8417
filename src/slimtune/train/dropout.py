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
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

_LEVELS = 65536  # 16-bit random slices


def keep_mask(shape, p: float, device=None) -> tuple[torch.Tensor, float]:
    """(bool mask with P(True) = 1 - p', scale 1 / (1 - p')), p' = p rounded to a multiple of 1/65536."""
    numel = 1
    for s in shape:
        numel *= int(s)
    drop_levels = min(_LEVELS - 1, max(0, round(p * _LEVELS)))
    # to=None: torch's full 64-bit path, one raw draw per word (an explicit upper bound takes a 64-bit modulo
    # per word: 1.25x the time of this on a 2-core EPYC for a 384 x 384 mask)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    slices = words.view(torch.int16)[:numel].view(shape)
    mask = slices >= (drop_levels - _LEVELS // 2)  # int16 slices are uniform over [-32768, 32767]
    return mask, _LEVELS / (_LEVELS - drop_levels)


class FastDropout(nn.Dropout):
    """`nn.Dropout` (same p, same train / eval behaviour) with masks from 16-bit random slices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return torch.zeros_like(x)
        mask, scale = keep_mask(x.shape, self.p, x.device)
        # scale, then zero (not where(...).mul_(scale): 1.15x the time forward and backward, 384 x 384 fp32)
        return torch.where(mask, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))

    def zero_dropped(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        return zero_dropped(x, self.p)


def zero_dropped(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """x with this step's dropped elements zeroed, unscaled, and the scale 1 / (1 - p') that the kept ones take
    (a consumer that is linear in x applies it later, on a smaller tensor: train/fused_lora.py, fast_dropout_sdpa)."""
    mask, scale = keep_mask(x.shape, p, x.device)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)), scale


def use_fast_dropout(model: nn.Module) -> int:
    """Replace every plain `nn.Dropout` inside the model (peft's LoRA input dropouts included) by
    FastDropout with the same p, and point the attention of every transformers model inside it that runs on
    `sdpa` at `fast_dropout_sdpa`; returns how many modules were replaced."""
    swaps = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if type(child) is nn.Dropout and child.p > 0:
                swaps.append((module, child_name, child))
    for parent, child_name, child in swaps:
        fast = FastDropout(child.p, child.inplace)
        fast.train(child.training)
        setattr(parent, child_name, fast)
    use_fast_attention_dropout(model)
    return len(swaps)


# The attention-probability dropout is no module call: the attention layers of transformers models pass its p to
# the attention function (AttentionInterface), and torch's CPU sdpa with dropout_p > 0 runs its math path, which
# draws a float Bernoulli mask per probability (`bernoulli_`: 3.8 ms per MiniLM layer at 32 x 40 tokens, more than
# the layer's four adapted projections' masks together) and checks every row for -inf (`_safe_softmax`: `isneginf`
# + `all`, another 0.9 ms). `fast_dropout_sdpa` is that math path (fp32 throughout, as torch's is) with a
# FastDropout mask and a plain softmax, for training with attention dropout; everything else (eval, p = 0, the
# causal case sdpa handles by its is_causal flag, extra arguments such as a position bias) goes to transformers'
# own sdpa function unchanged. The model's masks come from transformers' sdpa mask function, so its inputs are
# what sdpa gets.
FAST_DROPOUT_SDPA = "slimtune_fast_dropout_sdpa"


def fast_dropout_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention function (same arguments, same result), with FastDropout's attention mask."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (not 0.0 < dropout < 1.0 or (causal and attention_mask is None and query.shape[2] > 1)
            or any(v is not None and v is not False for v in kwargs.values())):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    with torch.autocast(query.device.type, enabled=False):  # fp32 like torch's math path, whatever autocast says
        query_, key, value = query.float(), key.float(), value.float()
        attn = torch.matmul(query_, key.transpose(-2, -1))
        attn.mul_(scaling if scaling is not None else query.shape[-1] ** -0.5)  # matmul's backward needs no output
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:  # sdpa's convention: True attends
                attn.masked_fill_(~attention_mask, torch.finfo(attn.dtype).min)
            else:
                attn.add_(attention_mask)
        probs = torch.softmax(attn, dim=-1)
        kept, scale = zero_dropped(probs, dropout)
        out = torch.matmul(kept, value)
        out.mul_(scale)  # the dropout's 1 / (1 - p) on the [.., query, head_dim] output, not the probabilities
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def use_fast_attention_dropout(model: nn.Module) -> int:
    """Switch every transformers model inside `model` whose attention implementation is `sdpa` (and that follows
    transformers' AttentionInterface) to `fast_dropout_sdpa`; returns how many. The name is not saved with a
    config (transformers leaves `_attn_implementation` out of config.json)."""
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FAST_DROPOUT_SDPA, fast_dropout_sdpa)
    AttentionMaskInterface.register(FAST_DROPOUT_SDPA, sdpa_mask)
    n = 0
    for module in model.modules():
        # _can_set_attn_implementation: transformers' own test (does the model's file use the interface?); where a
        # release lacks it, set_attn_implementation below decides alone and the count says what took
        can_set = getattr(module, "_can_set_attn_implementation", lambda: True)
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation == "sdpa" and can_set():
            module.set_attn_implementation(FAST_DROPOUT_SDPA)
            n += module.config._attn_implementation == FAST_DROPOUT_SDPA
    return n
