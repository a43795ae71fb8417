"""Tasks: one module per task holding a `Task` subclass (tasks/base.py: the contract, with no-op defaults for
the optional members), and one `TaskSpec` line here (tasks/spec.py: the facts, torch-free).

Adding a task is one new module plus one line in `TASKS`.
"""
from __future__ import annotations

import importlib
from functools import cache

from .spec import TaskSpec

_CLASSIFICATION = ("accuracy", "macro_f1", "loss")
_MULTI_LABEL = ("micro_f1", "macro_f1", "samples_f1", "subset_accuracy", "tuned_micro_f1", "tuned_macro_f1",
                "tuned_samples_f1", "tuned_subset_accuracy", "loss")
_REGRESSION = ("rmse", "mae", "r2", "pearson", "spearman", "loss")

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    # new_head_lr_mult: the small pooled text features need a 10x head rate (benchmarks/RESULTS.md, "The new head's
    # learning rate"); images' do not (same file, bench_vision)
    TaskSpec("text-classification", "slimtune.tasks.text_classification", _CLASSIFICATION, _CLASSIFICATION,
             "accuracy", "samples", "SEQ_CLS", "tokens", new_head_lr_mult=10.0, keep_last_token=True,
             auto_model="AutoModelForSequenceClassification"),
    TaskSpec("causal-lm", "slimtune.tasks.causal_lm", ("loss", "perplexity"), ("loss", "perplexity"),
             "loss", "tokens", "CAUSAL_LM", "tokens", has_head=False, packing=True, generates=True,
             auto_model="AutoModelForCausalLM", default_lr=5e-4),
    # peft_task_type None: peft's plain PeftModel, the model's own forward (pixel_values, labels)
    TaskSpec("image-classification", "slimtune.tasks.image_classification",
             _CLASSIFICATION + ("top2_accuracy", "top3_accuracy", "top5_accuracy"), _CLASSIFICATION,
             "accuracy", "samples", None, "images", auto_model="AutoModelForImageClassification"),
    # float targets, standardised for training; the head gets the new-head rate as text-classification's does
    TaskSpec("regression", "slimtune.tasks.regression", _REGRESSION, _REGRESSION, "rmse", "samples", "SEQ_CLS",
             "tokens", new_head_lr_mult=10.0, keep_last_token=True, lower_is_better=frozenset({"rmse", "mae", "loss"}),
             auto_model="AutoModelForSequenceClassification", losses=("mse", "huber"), target_columns=True),
    # one tag per word: entity-level f1 / precision / recall (seqeval, micro), word accuracy
    TaskSpec("token-classification", "slimtune.tasks.token_classification",
             ("f1", "precision", "recall", "accuracy", "loss"), ("f1", "precision", "recall", "accuracy", "loss"),
             "f1", "samples", "TOKEN_CLS", "tokens", keep_last_token=True, labels_per_token=True,
             auto_model="AutoModelForTokenClassification"),
    # label sets, one sigmoid per label; micro_f1 monitors (stable on small eval splits, where one example swings a
    # rare label's F1 between 0 and 1); tuned_*: at the per-label thresholds fitted on the eval split. The head at
    # 40x (2e-2, the cap, at lr 5e-4 and above): a sigmoid per label needs large logits where softmax needs only
    # their differences; at 10x, 12 / 40 Banking77 intents end with every probability under 0.5
    # (benchmarks/RESULTS.md, multi-label)
    TaskSpec("multi-label-classification", "slimtune.tasks.multi_label", _MULTI_LABEL, _MULTI_LABEL, "micro_f1",
             "samples", "SEQ_CLS", "tokens", new_head_lr_mult=40.0, keep_last_token=True,
             auto_model="AutoModelForSequenceClassification"),
)}


def task_spec(name: str) -> TaskSpec:
    return TASKS[name]


@cache
def get_task(name: str):
    """The task's behaviour (a tasks.base.Task); imports torch and the task's libraries."""
    return importlib.import_module(TASKS[name].module).TASK


def task_metrics(name: str) -> tuple[str, ...]:
    return TASKS[name].metrics
