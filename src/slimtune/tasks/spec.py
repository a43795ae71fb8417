"""What is known about a task without loading it: torch-free, read by config, inspect and tracking.

A task is one module under tasks/ (its `Task` subclass, the behaviour) plus one `TaskSpec` line in
tasks/__init__.py's registry (the facts). Nothing outside tasks/ spells a task's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TaskSpec:
    name: str
    module: str  # the module holding the Task subclass `TASK`
    metrics: tuple[str, ...]  # every metric eval.metrics / eval.monitor may name
    default_metrics: tuple[str, ...]  # computed when eval.metrics is not given
    default_monitor: str  # eval.monitor when not given
    throughput_unit: Literal["samples", "tokens"]  # the progress bar's and the summary's speed
    peft_task_type: str | None  # peft's TaskType (None: the plain PeftModel, the model's own forward)
    inputs: Literal["tokens", "images"]  # tokens: model.max_length, sequence-length schedules, FLOPs ~ tokens x weights
    # a randomly initialised head's default lr as a multiple of train.lr (train/optim.py default_head_lr: at most
    # HEAD_LR_MAX, never below lr); 1: the adapters' rate. Chosen per task from measurements (benchmarks/RESULTS.md,
    # "The new head's learning rate", "The multi-label head's defaults")
    new_head_lr_mult: float = 1.0
    # train.lr when neither the config nor the method (Method.default_lr: the LoRA family has none) sets one. 2e-3
    # for the tasks that train a new head on an encoder: LoRA at 5e-4 is still near the majority class after 126
    # steps on Banking77 (51% test accuracy, 2e-3: 81%; RESULTS.md "grid_lora_lr results"); a causal LM's own head is
    # pre-trained and its loss moves at lower rates (5e-4)
    default_lr: float = 2e-3
    has_head: bool = True  # a new output layer sized to the labels (classification), trained in full
    # a sequence-length schedule cuts examples but keeps their last token (a classifier's [SEP] / EOS)
    keep_last_token: bool = False
    # the head predicts a label per token (token classification): inspect's dummy batch holds one per position
    labels_per_token: bool = False
    # training examples may be packed into rows (data.packing): the task's collate and count handle packed rows
    packing: bool = False
    # eval.generate: the task generates text for its eval records (Task.generation_prompts) and scores it
    generates: bool = False
    lower_is_better: frozenset[str] = frozenset({"loss", "perplexity"})
    # the transformers Auto class that builds the model from its config (`slimtune inspect`, on the meta device);
    # None: the task is not inspected
    auto_model: str | None = None
    # train.loss values the task accepts besides 'auto' (its default loss); empty: its default loss only
    losses: tuple[str, ...] = ()
    # data.target_columns (several float targets) is read; other tasks take their one label from data.label_column
    target_columns: bool = False

    def higher_is_better(self, metric: str) -> bool:
        return metric not in self.lower_is_better
