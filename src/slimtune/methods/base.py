"""What every method module provides, and the context a method is applied in.

A method family is one module: its config classes (each with a `name` Literal,
validated as part of the run config) and a `Method` record per name saying how
to apply it, whether peft or slimtune saves it, whether it merges, and its
optional hooks (parameter groups for LoRA+, a per-step hook for AdaLoRA, model
loading options for QLoRA).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

from pydantic import Field

from ..errors import MethodError  # noqa: F401  (re-exported: callers import it from here)
from ..schema import StrictModel


@dataclass
class MethodContext:
    task: str  # text-classification | causal-lm
    task_type: str  # peft's TaskType name: SEQ_CLS | CAUSAL_LM
    head_modules: list[str] = field(default_factory=list)  # the task head, trained in full
    total_steps: int | None = None
    sample_batches: Callable[[], Iterable[dict]] | None = None  # data-driven initialisations (EVA)


@dataclass
class Method:
    name: str
    config: type
    apply: Callable[[Any, Any, MethodContext], Any]
    saved_by: Literal["peft", "slimtune"] = "peft"
    mergeable: bool = True
    summary: str = ""
    # (param name, cfg) -> (group, lr multiplier)
    lr_scale: Callable[[str, Any], tuple[str, float] | None] | None = None
    on_optimizer_step: Callable[[Any, int], None] | None = None  # (unwrapped model, step), before zero_grad
    # the state that hook keeps beside the parameters, for an exact resume: model -> (tensors, JSON data), and
    # (model, that pair or None for a checkpoint without it, the step resumed at) -> None
    save_state: Callable[[Any], tuple[dict, dict]] | None = None
    load_state: Callable[[Any, tuple[dict, dict] | None, int], None] | None = None
    load_kwargs: Callable[[Any], dict] | None = None  # extra from_pretrained kwargs (quantization)
    # the from_pretrained kwargs of the base a merge folds the adapter into, where they differ from training's
    # (QLoRA: a 16-bit base, not the 4-bit one: merging into quantized weights degrades generations, peft#2321)
    merge_load_kwargs: Callable[[Any], dict] | None = None
    check_environment: Callable[[Any], None] | None = None
    before_save: Callable[[Any, Any], dict] | None = None  # -> extra save_pretrained kwargs
    # train.lr when the config sets none; None: the task's (TaskSpec.default_lr: 2e-3 with a new head, 5e-4 for a
    # causal LM; right for the LoRA family, benchmarks/grid_lora_lr.py).
    # Families whose parameters move the output far less per unit of lr (vectors, zero-initialised factors,
    # a probe) need larger rates; full fine-tuning needs smaller ones (benchmarks/bench_methods.py measured them).
    default_lr: float | None = None
    # why train.gradient_checkpointing cannot be used with the method (None: it can)
    checkpointing_conflict: str | None = None


Targets = Literal["auto", "all-linear", "attention"] | list[str]


class TargetedConfig(StrictModel):
    targets: Targets = Field(
        "auto",
        description="'auto' / 'all-linear': the linear layers inside the transformer blocks (never the task head); "
        "'attention': only the attention projections; or a list of module-name suffixes as peft takes them",
    )
