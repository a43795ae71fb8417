"""LoRA's forward with its scaling and residual add done by the second matmul.

peft's `lora.Linear` computes `result + lora_B(lora_A(dropout(x))) * scaling`. Past the two small matmuls (rank r)
that is full-width elementwise work on every adapted layer: forward, the `* scaling` and the `+` over the layer's
output ([tokens, out]) and the dropout's `x * 1 / (1 - p)` over its input ([tokens, in]); backward, the gradient
of the `* scaling` and of the dropout's scale. On CPU each is a pass through memory about as long as the rank-8
matmul itself. Here the scaling (and the dropout's 1 / (1 - p), which commutes with the matmuls) is the `alpha`
of one `addmm_` that adds the update into the base layer's fresh output in place (an out-of-place addmm copies
that output first): the same function, the same dropout masks drawn from the same RNG (runs stay reproducible
and resume exactly), rounding aside. On the MiniLM + LoRA training step x1.07-1.12 (benchmarks/RESULTS.md,
bench_multi_label). Under autocast the input is cast to 16 bits once for the base layer and the LoRA path
(x1.03-1.10 on a bf16 host). peft has no such path; its forward stays the fallback for everything this does not
cover (DoRA and other variants, several or mixed adapters, merged or disabled adapters, a LoRA bias, a base layer that
is not nn.Linear, adapters in another dtype than the base layer's output).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from peft.tuners.lora.layer import Linear as LoraLinear

from .dropout import FastDropout


class FusedLoraLinear(LoraLinear):
    """peft's LoRA Linear (same parameters, state dict and methods) with the fused forward."""

    cast_input_once = True  # under autocast; False: as peft (benchmarks/micro_pooled.py --change cast-once)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self.active_adapters
        name = adapters[0] if len(adapters) == 1 else None
        if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
                or name in getattr(self, "lora_variant", {}) or self.lora_B[name].bias is not None
                or not isinstance(self.base_layer, nn.Linear)):
            return super().forward(x, *args, **kwargs)
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # 2-D throughout (nn.Linear folds the leading dimensions the same way)
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        device = x.device.type
        if self.cast_input_once and torch.is_autocast_enabled(device):
            # autocast would cast x for the base layer and its masked copy again for lora_A (peft's input cast to
            # the adapter's fp32 first, autocast back after): one cast feeds both, the mask zeroes 16-bit values;
            # the same values reach both matmuls, x's two gradients add in 16 bits before their cast back
            x = x.to(torch.get_autocast_dtype(device))
            result = self.base_layer(x)
        else:
            result = self.base_layer(x)
            x = self._cast_input_dtype(x, lora_a.weight.dtype)
        if isinstance(dropout, FastDropout) and dropout.training and 0.0 < dropout.p < 1.0:
            x, scale = dropout.zero_dropped(x)  # FastDropout's own draw; its scale goes into the addmm
        else:
            x, scale = dropout(x), 1.0
        h = lora_a(x)
        alpha = self.scaling[name] * scale
        if h.dtype != result.dtype:  # adapters kept in fp32 beside a 16-bit base, no autocast: peft's arithmetic
            return (result + lora_b(h) * alpha).to(result.dtype).view(*lead, result.shape[-1])
        weight = lora_b.weight.t().to(result.dtype)  # autocast casts no in-place op's inputs
        if self.base_layer._forward_hooks:  # a hook may hold the base output: leave it as it is
            result = torch.addmm(result, h, weight, alpha=alpha)
        else:  # nothing else holds the fresh base output (its backward keeps only the input and weight)
            result.addmm_(h, weight, alpha=alpha)
        return result.view(*lead, result.shape[-1])


def fuse_lora_forward(model: nn.Module) -> int:
    """Give every plain peft LoRA Linear of the model the fused forward; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            n += 1
    return n
