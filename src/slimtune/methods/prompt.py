"""Prompt-learning methods through peft: prompt tuning, prefix tuning, P-tuning.

They add trained virtual tokens instead of changing weights, so nothing merges into
the base model. Prefix tuning needs a model that takes `past_key_values` (decoders);
encoders such as BERT get a clear error naming the alternatives.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..schema import StrictModel
from ..tasks import task_spec
from .base import Method, MethodContext, MethodError


class PromptTuningConfig(StrictModel):
    """Prompt tuning (Lester et al. 2021): trained soft-prompt embeddings prepended to the input."""
    name: Literal["prompt-tuning"] = "prompt-tuning"
    num_virtual_tokens: int = Field(20, ge=1, description="number of soft-prompt tokens")
    init_text: str | None = Field(None, description="initialise the prompt from the embeddings of this text")


class PrefixTuningConfig(StrictModel):
    """Prefix tuning (Li & Liang 2021): trained key/value prefixes in every layer."""
    name: Literal["prefix-tuning"] = "prefix-tuning"
    num_virtual_tokens: int = Field(20, ge=1, description="number of prefix tokens per layer")
    projection: bool = Field(False, description="reparameterise the prefix through an MLP (prefix_projection)")


class PTuningConfig(StrictModel):
    """P-tuning (Liu et al. 2021): virtual tokens produced by a small prompt encoder (MLP or LSTM)."""
    name: Literal["p-tuning"] = "p-tuning"
    num_virtual_tokens: int = Field(20, ge=1, description="number of virtual tokens")
    encoder: Literal["MLP", "LSTM"] = Field("MLP", description="prompt encoder type")
    encoder_hidden_size: int = Field(128, ge=1, description="hidden size of the prompt encoder")


def _token_inputs(name: str, ctx: MethodContext) -> None:
    """Virtual tokens go into a sequence of token embeddings; an image model has none (peft has no prompt learning
    for a model without a task type: it would fail deep inside peft)."""
    inputs = task_spec(ctx.task).inputs
    if inputs != "tokens":
        raise MethodError(f"method {name} adds virtual tokens to a token sequence; task {ctx.task} takes {inputs}, "
                          "not tokens. Use a LoRA-family method, ia3, a partial method (bitfit, last-n-layers, "
                          "head-only) or full")


def _finish(model, pc, ctx: MethodContext):
    from peft import get_peft_model

    if ctx.head_modules:
        pc.modules_to_save = list(ctx.head_modules)
    return get_peft_model(model, pc)


def apply_prompt(model, cfg: PromptTuningConfig, ctx):
    _token_inputs("prompt-tuning", ctx)
    from peft import PromptTuningConfig as P, PromptTuningInit

    kw = {}
    if cfg.init_text:
        name = getattr(model.config, "_name_or_path", None)
        kw = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": cfg.init_text,
              "tokenizer_name_or_path": name}
    return _finish(model, P(task_type=ctx.task_type, num_virtual_tokens=cfg.num_virtual_tokens, **kw), ctx)


def apply_prefix(model, cfg: PrefixTuningConfig, ctx):
    _token_inputs("prefix-tuning", ctx)
    from peft import PrefixTuningConfig as P

    # a language model (its output layer is the head) is a decoder; another model says so in its config
    if task_spec(ctx.task).has_head and not getattr(model.config, "is_decoder", False):
        raise MethodError(
            f"method prefix-tuning needs a model that takes past_key_values (a decoder); {type(model).__name__} is an "
            "encoder. Use prompt-tuning or p-tuning (virtual tokens at the input) or a LoRA-family method"
        )
    return _finish(model, P(task_type=ctx.task_type, num_virtual_tokens=cfg.num_virtual_tokens,
                            prefix_projection=cfg.projection), ctx)


def apply_ptuning(model, cfg: PTuningConfig, ctx):
    _token_inputs("p-tuning", ctx)
    from peft import PromptEncoderConfig as P

    return _finish(model, P(task_type=ctx.task_type, num_virtual_tokens=cfg.num_virtual_tokens,
                            encoder_reparameterization_type=cfg.encoder,
                            encoder_hidden_size=cfg.encoder_hidden_size), ctx)


# measured: transformers drops the cache in a checkpointed block, so the forward fails on the prefix's mask
PREFIX_CHECKPOINTING = ("its prefixes reach every block as a key/value cache, which transformers drops in "
                        "checkpointed blocks; use prompt-tuning or p-tuning (virtual tokens at the input) or a "
                        "LoRA-family method")


METHODS = [
    Method("prompt-tuning", PromptTuningConfig, apply_prompt, mergeable=False, default_lr=3e-2,
           summary="trained soft prompt at the input"),
    Method("prefix-tuning", PrefixTuningConfig, apply_prefix, mergeable=False, default_lr=1e-2,
           summary="trained key/value prefixes (decoders)", checkpointing_conflict=PREFIX_CHECKPOINTING),
    Method("p-tuning", PTuningConfig, apply_ptuning, mergeable=False, default_lr=1e-2,
           summary="virtual tokens from a prompt encoder"),
]
