"""Activation checkpointing (`train.gradient_checkpointing`): the blocks' activations recomputed in the backward
pass instead of kept from the forward, optionally with what is kept held in host memory.

Not to be confused with train/checkpoint.py, which saves resumable training state.

- true: transformers' own checkpointing of the model's transformer blocks (`GradientCheckpointingLayer`), with
  torch's non-reentrant checkpoint (`use_reentrant=False`): it is the variant that gives parameters inside a
  block their gradients when the block's input needs none, so no input-grad hook is needed, and it works under
  DDP. transformers installs peft's input-grad hook (`enable_input_require_grads`) anyway for token models; it
  is removed here, because with it autograd runs the backward through frozen blocks below the trained ones
  (last-n-layers, head-only), recomputing them for gradients nobody uses.
- offload: the same, and each block's input (all a checkpointed block keeps) goes to pinned host memory in the
  forward and back in the backward (`save_on_cpu`, transformers' `offload=True`; torchtune's activation
  offloading with checkpointing does the same). CUDA only: on a CPU the activations are in host memory already.

Dropout masks are the same in the recomputation: torch's checkpoint restores the RNG state (slimtune's
FastDropout draws from torch's generator too), so the loss and gradients are those of an uncheckpointed step.
"""
from __future__ import annotations

import inspect
from typing import Callable, ContextManager, Literal

import torch

from ..errors import ConfigError, MethodError, ModelError
from ..methods.base import Method

Setting = bool | Literal["offload"]


def check_checkpointing(setting: Setting, method: Method, device: torch.device) -> None:
    """Before the model is loaded: is `setting` possible with this method on this device."""
    if setting is False:
        return
    if method.checkpointing_conflict:
        raise MethodError(f"method {method.name} cannot be combined with train.gradient_checkpointing: "
                          f"{method.checkpointing_conflict}, or set train.gradient_checkpointing: false")
    if setting == "offload" and device.type != "cuda":
        raise ConfigError("train.gradient_checkpointing: offload keeps saved activations in host memory instead "
                          "of a CUDA GPU's memory, and needs a CUDA GPU; this run trains on the "
                          f"{device.type}. Use train.gradient_checkpointing: true (recomputation, works on CPUs)")


def enable_checkpointing(model: torch.nn.Module, setting: Setting,
                         context_fn: Callable[[], tuple[ContextManager, ContextManager]] | None = None) -> None:
    """Turn activation checkpointing on in `model` (a transformers model, or a peft model around one).
    `context_fn`: torch's checkpoint option, the contexts of the forward and of the recomputation (the
    recomputation runs in the backward pass, outside the contexts the forward ran in)."""
    if setting is False:
        return
    base = model.get_base_model() if _is_peft(model) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ModelError(f"train.gradient_checkpointing: {type(base).__name__} does not support activation "
                         "checkpointing (transformers models say so with `supports_gradient_checkpointing`; a "
                         "model.factory model has to checkpoint its own blocks); set train.gradient_checkpointing: "
                         "false")
    kwargs = {"use_reentrant": False, **({"context_fn": context_fn} if context_fn else {})}
    enable = getattr(base, "activation_checkpointing_enable", None)
    offload = setting == "offload"
    if enable is not None and "offload" in inspect.signature(enable).parameters:
        enable(kwargs, offload=offload)
    elif offload:
        import transformers

        raise ConfigError(f"train.gradient_checkpointing: offload needs a transformers with activation offloading "
                          f"(activation_checkpointing_enable(offload=True)); this is {transformers.__version__}. "
                          "Upgrade transformers or use train.gradient_checkpointing: true")
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.disable_input_require_grads()  # not needed without reentrancy (module docstring)
    config = getattr(base, "config", None)
    if getattr(config, "use_cache", None):
        config.use_cache = False  # a cache is rebuilt by every recomputation; transformers would warn each step


def _is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
