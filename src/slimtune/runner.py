"""`run()`: one config from YAML to an adapter on disk, as eight phases read top to bottom.

    prepare -> read_inputs -> open_run_folder -> plan_batches -> build_model -> build_loop -> fit -> finish

Each phase is a function of the earlier phases' results (small frozen dataclasses), so a reader follows one run
from config to adapter by reading `run()` and the phase functions in order. Data comes before the model (every
data error shows before weights load) and the run folder before the model (its lock and files exist when the
slow part starts).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from .config import RunConfig
from .phases.prepare import open_run_folder, plan_batches, prepare, read_inputs
from .phases.train import RunResult, build_loop, build_model, ends_as_status, finish, fit

__all__ = ["RunResult", "run"]


def run(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, resume: str | Path | None = None,
        callbacks: list | None = None, trust_run_code: bool = False) -> RunResult:
    """Fine-tune as the config says; returns the metrics and the run folder.

    `resume`: a run folder; training continues from its last checkpoint with its saved config. Overrides
    may only extend training (train.epochs / train.max_steps; track/guard.py says why).
    `callbacks`: extra objects with any of train.callbacks.Callback's events.
    `trust_run_code`: resume a run folder whose model runs code (trust_remote_code, a factory).
    """
    with contextlib.ExitStack() as held:  # the run folder's lock, released however run() ends
        setup = prepare(config, overrides, resume, trust_run_code, held)
        inputs = read_inputs(setup)
        folder = open_run_folder(setup, inputs, held)
        batches = plan_batches(setup, inputs, folder)
        built = build_model(setup, inputs, folder, batches)
        trainer = build_loop(setup, inputs, folder, batches, built, callbacks or [])
        with ends_as_status(folder, trainer) as ending:
            fit(folder, trainer, ending)
            return finish(setup, inputs, folder, batches, trainer)
