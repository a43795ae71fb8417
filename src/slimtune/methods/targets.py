"""Find the modules a method should adapt, by structure rather than by name lists.

The transformer blocks are the largest `nn.ModuleList` of identical children
(BERT `encoder.layer`, Llama `model.layers`, GPT-2 `h`, ViT `encoder.layer`).
The default targets are the linear layers inside those blocks; the task head and
anything outside the blocks (pooler, embeddings) is never a target. We return a
regex that peft matches against full module names, so a leaf name such as
`dense` cannot accidentally hit `pooler.dense`.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from typing import TYPE_CHECKING

from ..errors import MethodError

if TYPE_CHECKING:  # torch loads when a model is adapted, not when the config's method classes are imported
    import torch.nn as nn

ATTENTION_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "c_attn", "qkv", "Wqkv",
                    "out_proj"}


def _linear_types() -> tuple[type, ...]:
    import torch.nn as nn

    types = [nn.Linear]
    try:  # GPT-2 style Conv1D is a linear layer with transposed weights
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ModuleList of the model's repeated blocks."""
    import torch.nn as nn

    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(c) for c in mod}
            if len(kinds) == 1 and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise MethodError(
            f"could not find the transformer blocks of {type(model).__name__} (no nn.ModuleList of identical "
            "layers); set method.targets to a list of module names"
        )
    return best


def _pointwise_conv(mod: nn.Module) -> bool:
    """A 1x1 convolution: the linear layer of a CNN (ResNet bottlenecks, EfficientNet / MobileNet
    expand and project convolutions); peft's LoRA wraps nn.Conv2d."""
    import torch.nn as nn

    return isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) == (1, 1) and mod.groups == 1


def block_linear_names(model: nn.Module, exclude: Collection[str] = ()) -> list[str]:
    """Names (relative to one block) of the linear layers (and 1x1 convolutions) inside the blocks."""
    _, blocks = find_blocks(model)
    linear = _linear_types()
    names: set[str] = set()
    for block in blocks:
        for name, mod in block.named_modules():
            if (isinstance(mod, linear) or _pointwise_conv(mod)) and name and name.split(".")[-1] not in exclude:
                names.add(name)
    return sorted(names)


def block_linear_shapes(model: nn.Module, exclude: Collection[str] = ()) -> list[tuple[int, int]]:
    _, blocks = find_blocks(model)
    linear = _linear_types()
    return sorted({tuple(m.weight.shape) for b in blocks for n, m in b.named_modules()
                   if isinstance(m, linear) and n and n.split(".")[-1] not in exclude})


def block_regex(model: nn.Module, names: list[str]) -> str:
    """A regex peft matches against full module names: these block-relative names, in every block."""
    blocks_name, _ = find_blocks(model)
    alt = "|".join(sorted(re.escape(x) for x in names))
    return rf"(?:.*\.)?{re.escape(blocks_name)}\.\d+\.(?:{alt})"


def find_targets(model: nn.Module, targets: str | list[str],
                 exclude: Collection[str] = ()) -> str | list[str]:
    if isinstance(targets, list):
        return targets
    names = block_linear_names(model, exclude)
    if targets == "attention":
        names = [n for n in names if n.split(".")[-1] in ATTENTION_LEAVES]
    if not names:
        blocks_name, _ = find_blocks(model)
        raise MethodError(f"no linear layers found inside {blocks_name} for method.targets={targets!r}")
    return block_regex(model, names)
