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

import torch.nn as nn

ATTENTION_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "c_attn", "qkv", "Wqkv", "out_proj"}


def _linear_types():
    types = [nn.Linear]
    try:  # GPT-2 style Conv1D is a linear layer with transposed weights
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ModuleList of the model's repeated blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(c) for c in mod}
            if len(kinds) == 1 and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise ValueError(
            f"could not find the transformer blocks of {type(model).__name__} (no nn.ModuleList of identical "
            "layers); set method.targets to a list of module names"
        )
    return best


def find_targets(model: nn.Module, targets, exclude: list[str] = ()) -> str | list[str]:
    if isinstance(targets, list):
        return targets
    blocks_name, blocks = find_blocks(model)
    linear = _linear_types()
    leaves: set[str] = set()
    for block in blocks:
        for name, mod in block.named_modules():
            if isinstance(mod, linear) and name:
                leaf = name.split(".")[-1]
                if leaf in exclude:
                    continue
                if targets == "attention" and leaf not in ATTENTION_LEAVES:
                    continue
                leaves.add(name)
    if not leaves:
        raise ValueError(f"no linear layers found inside {blocks_name} for method.targets={targets!r}")
    alt = "|".join(sorted(re.escape(x) for x in leaves))
    return rf"(?:.*\.)?{re.escape(blocks_name)}\.\d+\.(?:{alt})"
