"""Methods that train a subset of the model's own parameters; peft has no equivalent.

    bitfit         the bias terms only (Ben Zaken et al. 2022) + the head
    last-n-layers  the top N transformer blocks (+ the final norm) + the head
    head-only      the task head only (a linear probe on frozen features)
    full           every parameter: the baseline every comparison needs

Saved by slimtune (`save_native` / `load_native` in methods/__init__.py): the trained
tensors under their names in the base model, in `adapter_model.safetensors`, with
`slimtune_adapter.json` naming the method and the base model. Loading = base model +
`load_state_dict(strict=False)` of those tensors; merging is the same and saves a
full model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..schema import StrictModel
from ..tasks import task_spec
from .base import Method, MethodContext, MethodError
from .targets import find_blocks

if TYPE_CHECKING:
    import torch


class BitfitConfig(StrictModel):
    name: Literal["bitfit"] = "bitfit"
    include_norm: bool = Field(False, description="also train the norm layers' biases and scales")


class LastNLayersConfig(StrictModel):
    name: Literal["last-n-layers"] = "last-n-layers"
    n: int = Field(2, ge=1, description="number of top transformer blocks to train")
    include_norm: bool = Field(True, description="also train the norm after the last block")


class HeadOnlyConfig(StrictModel):
    name: Literal["head-only"] = "head-only"


class FullConfig(StrictModel):
    name: Literal["full"] = "full"


def _head_names(model: torch.nn.Module, ctx: MethodContext) -> list[str]:
    """The head the method trains in full: the task's new head, or a language model's output layer."""
    heads = list(ctx.head_modules)
    if not heads and not task_spec(ctx.task).has_head:
        out = model.get_output_embeddings()
        heads = [n for n, m in model.named_modules() if m is out]
    return heads


def _freeze_all_but(model, keep) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = keep(name, p)


def _train_modules(model, prefixes) -> None:
    """Train exactly the parameters of these modules, by identity: a head tied to the input
    embeddings (Llama's lm_head) is listed by named_parameters under the embeddings' name."""
    mods = dict(model.named_modules())
    keep = {id(p) for pre in prefixes for p in mods[pre].parameters()}
    _freeze_all_but(model, lambda n, p: id(p) in keep)


def _in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def apply_bitfit(model, cfg: BitfitConfig, ctx):
    heads = _head_names(model, ctx)
    norm_words = ("norm", "LayerNorm", "ln_")
    mods = dict(model.named_modules())
    head_ids = {id(p) for h in heads for p in mods[h].parameters()}
    _freeze_all_but(model, lambda n, p: id(p) in head_ids or n.endswith(".bias")
                    or (cfg.include_norm and any(w in n for w in norm_words)))
    if not any(p.requires_grad and n.endswith(".bias") and id(p) not in head_ids for n, p in model.named_parameters()):
        raise MethodError(f"method bitfit: {type(model).__name__} has no bias terms outside the head, so BitFit "
                          "would train only the head; use head-only, ia3 or a LoRA-family method")
    return model


def apply_last_n(model, cfg: LastNLayersConfig, ctx):
    blocks_name, blocks = find_blocks(model)
    if cfg.n > len(blocks):
        raise MethodError(f"method.n={cfg.n}, but the model has only {len(blocks)} blocks in {blocks_name}")
    top = [f"{blocks_name}.{i}" for i in range(len(blocks) - cfg.n, len(blocks))]
    heads = _head_names(model, ctx)
    norms = []
    if cfg.include_norm:  # a norm after the blocks (Llama `model.norm`, GPT-2 `ln_f`), not inside them
        parent = blocks_name.rsplit(".", 1)[0] if "." in blocks_name else ""
        for n, m in model.named_modules():
            is_norm = "norm" in type(m).__name__.lower() and "embed" not in n
            if is_norm and not _in(n, [blocks_name]) and n.rsplit(".", 1)[0] == parent:
                norms.append(n)
    _train_modules(model, top + heads + norms)
    return model


def apply_head_only(model, cfg, ctx):
    heads = _head_names(model, ctx)
    if not heads:
        raise MethodError("method head-only: the model has no task head to train")
    _train_modules(model, heads)
    return model


def apply_full(model, cfg, ctx):
    _freeze_all_but(model, lambda n, p: True)
    return model


METHODS = [
    Method("bitfit", BitfitConfig, apply_bitfit, saved_by="slimtune", default_lr=5e-3, summary="bias terms only"),
    Method("last-n-layers", LastNLayersConfig, apply_last_n, saved_by="slimtune", default_lr=1e-4,
           summary="top N blocks unfrozen"),
    Method("head-only", HeadOnlyConfig, apply_head_only, saved_by="slimtune", default_lr=2e-2,
           summary="linear probe on frozen features"),
    Method("full", FullConfig, apply_full, saved_by="slimtune", default_lr=5e-5, summary="all parameters (baseline)"),
]
