"""The verbs, the same as the CLI's: run(), evaluate(), predict(), merge(), export(), sweep(), lr_find().

A facade: `runner.py` holds run() and its phases, `finished.py` the verbs on a finished run, `sweep/` the
searches. The CLI calls these names (so a test or a launcher may wrap them here).
"""
from __future__ import annotations

from .export import export
from .finished import LoadedRun, evaluate, load_run, merge, predict
from .loading import lengths, load_processor, resolve_model, resolve_precision
from .runner import RunResult, run
from .select import select
from .sweep.lrfind import lr_find
from .sweep.study import sweep
from .train.optim import build_optimizer, default_head_lr, param_lr_scale, trainable_per_group

__all__ = [
    "LoadedRun", "RunResult", "build_optimizer", "default_head_lr", "evaluate", "export", "lengths", "load_processor",
    "load_run", "lr_find", "merge", "param_lr_scale", "predict", "resolve_model", "resolve_precision", "run", "sweep",
    "select", "trainable_per_group",
]
