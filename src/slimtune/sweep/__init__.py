"""Tuning strategy: hyperparameter search with pruning (`slimtune sweep`) and the LR range test
(`slimtune lr-find`).

    space.py    the `sweep:` section of the run config: parameter ranges / choices, budget, sampler,
                pruner, storage; checked against the config schema; sampled values -> a trial's config
    study.py    the sweep folder, the optuna study, the plan, local worker processes, the summary
    plan.py     SweepPlan: what every worker of one sweep is given (the file a worker process reads);
                SweepError
    storage.py  the storage URL: from --storage / $SLIMTUNE_SWEEP_STORAGE / the config, and its masked form
                (the only one any file holds)
    engine.py   the optuna pieces: storage connection, sampler, pruner; trials whose worker died
    worker.py   one worker: takes trials from the shared study until the budget is spent
    trial.py    one trial: a normal run() of the base config with the sampled values, a pruning callback
    results.py  the trials table and the best trial's config, read back from the study
    plots.py    optimisation history, parameter importances, parallel coordinates, learning curves
    lrfind.py   the LR range test: exponentially increasing lr, loss-vs-lr plot, suggested lr

Nothing here is imported by a plain `slimtune run` except the config classes in space.py
(pydantic only); optuna and matplotlib load when a sweep or lr-find starts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .lrfind import LRFindResult
    from .study import SweepResult


def sweep(*args: Any, **kwargs: Any) -> SweepResult:
    """See `slimtune.sweep.study.sweep`."""
    from .study import sweep as _sweep

    return _sweep(*args, **kwargs)


def lr_find(*args: Any, **kwargs: Any) -> LRFindResult:
    """See `slimtune.sweep.lrfind.lr_find`."""
    from .lrfind import lr_find as _lr_find

    return _lr_find(*args, **kwargs)
