"""The optuna pieces a sweep is made of: the storage connection, the sampler and the pruner the sweep section
names, and the trials whose worker died (failed, their parameters queued again once).

A worker that dies leaves its trial RUNNING: the next worker on the same machine sees that the process is gone
(SQLite storage) or optuna's heartbeat goes stale (any storage), fails the trial and queues its parameters again.
"""
from __future__ import annotations

import importlib.util
import socket
import warnings
from typing import TYPE_CHECKING

from ..track.procs import process_alive
from .plan import SweepError
from .space import ParamSpec, SweepConfig
from .storage import is_sqlite

if TYPE_CHECKING:
    import optuna

HOST = socket.gethostname()
HEARTBEAT_S = 10  # optuna's heartbeat: a RUNNING trial whose worker is silent for GRACE_S is failed
GRACE_S = 30


def make_storage(url: str) -> optuna.storages.RDBStorage:
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 60}} if is_sqlite(url) else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=GRACE_S, heartbeat_stale_trial_callback=retry_trial)


def _needs(package: str, message: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise SweepError(message)


def make_sampler(sweep: SweepConfig, seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    kind = sweep.sampler
    if kind == "tpe":  # constant_liar: trials in flight count as bad guesses, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    if kind == "cmaes":
        _needs("cmaes", "sweep.sampler 'cmaes' needs the cmaes package: pip install cmaes")
        return optuna.samplers.CmaEsSampler(seed=seed)
    if kind == "gp":
        _needs("scipy", "sweep.sampler 'gp' needs scipy: pip install scipy")
        return optuna.samplers.GPSampler(seed=seed)
    if kind == "grid":
        return optuna.samplers.GridSampler({key: spec.grid() for key, spec in sweep.params.items()}, seed=seed)
    raise SweepError(f"unknown sampler {kind!r}")


def make_pruner(kind: str, *, startup_trials: int, prune_after: int,
                reduction_factor: int) -> optuna.pruners.BasePruner:
    """The pruner of sweep.pruner with its options (the sweep section's keys of the same names)."""
    import optuna

    if kind == "median":  # n_warmup_steps: evaluations are reported as steps 1, 2, 3, ...
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=prune_after)
    if kind == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=prune_after, reduction_factor=reduction_factor)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=prune_after, reduction_factor=reduction_factor)
    return optuna.pruners.NopPruner()


def sweep_pruner(sweep: SweepConfig) -> optuna.pruners.BasePruner:
    return make_pruner(sweep.pruner, startup_trials=sweep.startup_trials, prune_after=sweep.prune_after,
                       reduction_factor=sweep.reduction_factor)


def grid_size(space: dict[str, ParamSpec]) -> int:
    combinations = 1
    for spec in space.values():
        combinations *= len(spec.grid())
    return combinations


# -- trials that died ---------------------------------------------------------------

def retry_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a failed trial's parameters once more (not a retry of a retry)."""
    if trial.user_attrs.get("retry_of") is not None or not trial.params:
        return
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})


def recover_dead_trials(study: optuna.Study, url: str) -> list[int]:
    """Fail the RUNNING trials whose worker is gone, and queue their parameters again.

    With SQLite (one machine by construction) a trial whose worker process no longer exists is
    failed at once; with a shared database only optuna's heartbeat decides (another machine's
    process ids mean nothing here)."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    if is_sqlite(url):
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get("host") != HOST or process_alive(trial.user_attrs.get("pid")):
                continue
            try:
                study._storage.set_trial_user_attr(trial._trial_id, "error", "its worker process was killed")
                if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    retry_trial(study, trial)
                    failed.append(trial.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return failed
