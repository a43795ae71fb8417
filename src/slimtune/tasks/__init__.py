"""Tasks: one module per task, each exposing the same free functions.

    METRICS, DEFAULT_METRICS, PEFT_TASK_TYPE
    load_data(cfg) -> Splits                     read, validate, split (no model needed)
    load_model(cfg, source, splits) -> (model, head_modules)
    featurize(cfg, tokenizer, splits, report)    tokenized examples per split (+ truncation warnings)
    collate(tokenizer) -> callable               dynamic padding of a list of examples
    eval_step(model, batch) -> dict of tensors   gathered across processes by the loop
    compute_metrics(parts, wanted) -> dict
    count(batch) -> (samples, tokens)            for throughput
    predict(model, tokenizer, inputs, meta, **kw)
    load_processor(cfg, source)                  the tokenizer (text: model.max_length checked against the
                                                 model's positions) or the image preprocessing

Optional (image-classification has them): train_collate(processor, holder) for augmented / resized
training batches, read_eval(cfg, source) for `slimtune eval`; examples may carry a `length` instead of
`input_ids`.
"""
from __future__ import annotations

import importlib

TASK_MODULES = {
    "text-classification": "slimtune.tasks.text_classification",
    "causal-lm": "slimtune.tasks.causal_lm",
    "image-classification": "slimtune.tasks.image_classification",
}


def get_task(name: str):
    return importlib.import_module(TASK_MODULES[name])


def task_metrics(name: str) -> tuple[str, ...]:
    return get_task(name).METRICS
