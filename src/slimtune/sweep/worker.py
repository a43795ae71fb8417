"""One sweep worker: takes trials from the shared study until the budget is spent.

Each trial is a normal run (trial.py). Workers coordinate only through the study's storage (SQLite in
the sweep folder, or a database URL shared by many machines), plus a lock file in the sweep folder that
makes "is there budget left? then start a trial" atomic between the workers of one machine. Trials
whose worker died are failed and queued again by the next worker (engine.recover_dead_trials).

`python -m slimtune.sweep.worker PLAN.json INDEX` runs one worker process (what `--workers N` starts).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import metric_higher_is_better
from ..errors import SlimtuneError
from .engine import HOST, grid_size, make_sampler, make_storage, recover_dead_trials, sweep_pruner
from .plan import SweepError, SweepPlan
from .storage import STORAGE_ENV, is_masked, is_sqlite, mask_url
from .trial import Objective

if TYPE_CHECKING:
    import optuna

WAIT_S = 2.0  # poll interval while the remaining budget is held by trials in flight elsewhere
MAX_FAILS_IN_ROW = 3

Log = Callable[[str], Any]


# -- the budget --------------------------------------------------------------------

class FileLock:
    """An exclusive lock on a file (fcntl), held from the budget check until a trial has started."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def next_move(study: optuna.Study, plan: SweepPlan) -> str:
    """'run' a new trial, 'wait' for trials in flight (they may fail and be queued again), or 'done'."""
    from optuna.trial import TrialState

    if plan.deadline and time.time() >= plan.deadline:
        return "done"
    recover_dead_trials(study, plan.storage)
    counts = {state: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    if plan.budget is None:
        return "run"
    finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    if finished >= plan.budget:
        return "done"
    if finished + counts[TrialState.RUNNING] >= plan.budget:
        return "wait"
    return "run"


# -- the worker loop -------------------------------------------------------------------

def worker_seed(plan: SweepPlan, index: int, n_existing: int) -> int:
    """Distinct per worker and per (re-)start: a resumed sweep must not replay the sampler's first draws."""
    seed = plan.seed + 1000 * index + n_existing
    if not is_sqlite(plan.storage):  # workers on other machines start with the same index
        seed += sum(HOST.encode()) * 7919 + os.getpid()
    return seed


def _load_study(plan: SweepPlan, index: int) -> optuna.Study:
    """The shared study with this worker's own sampler (seeded per worker and start) and the sweep's pruner."""
    import optuna

    storage = make_storage(plan.storage)
    probe = optuna.load_study(study_name=plan.study_name, storage=storage)
    seed = worker_seed(plan, index, len(probe.get_trials(deepcopy=False)))
    return optuna.load_study(study_name=plan.study_name, storage=storage,
                             sampler=make_sampler(plan.sweep, seed), pruner=sweep_pruner(plan.sweep))


def run_worker(plan: SweepPlan, index: int = 0, log: Log = print) -> dict[str, int]:
    """Run trials until the budget is spent; returns {trials: n run here}."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = _load_study(plan, index)
    if plan.sweep.sampler == "grid":
        plan = dataclasses.replace(plan, budget=min(plan.budget or 10**9, grid_size(plan.sweep.params)))
    lock = FileLock(plan.sweep_dir / ".trial.lock")
    objective = Objective(plan, index, on_start=lock.release)
    ran, fails = 0, 0
    while True:
        with lock:
            move = next_move(study, plan)
            if move == "run":
                objective.number = None
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        if move == "done":
            break
        if move == "wait":
            time.sleep(WAIT_S)
            continue
        ran += 1
        if objective.number is None:
            continue
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == objective.number)
        log(trial_line(trial, plan))
        update_table(study, plan, log)
        if objective.fatal is not None:
            raise objective.fatal
        fails = fails + 1 if trial.state.name == "FAIL" else 0
        if fails >= MAX_FAILS_IN_ROW:
            raise _failing(trial, fails)
    return {"trials": ran}


def _failing(trial: optuna.trial.FrozenTrial, fails: int) -> SweepError:
    where = trial.user_attrs.get("run_dir")  # a trial that failed before training leaves no folder
    where = f"run folder {where}" if where and Path(where).is_dir() else "it left no run folder"
    return SweepError(f"{fails} trials in a row failed; the last one (trial {trial.number}): "
                      f"{trial.user_attrs.get('error') or 'no error was recorded'} ({where})")


def update_table(study: optuna.Study, plan: SweepPlan, log: Log) -> None:
    """trials.csv after each trial. A failed write (a full disk, a permission) does not stop the sweep (the study
    holds every trial and the table is written again after the next one and at the end), but it is said."""
    from .results import write_table

    try:
        write_table(study, plan.sweep_dir, plan.monitor, plan.params)
    except OSError as e:
        log(f"[sweep] warning: {plan.sweep_dir / 'trials.csv'} was not updated ({type(e).__name__}: {e}); "
            "the study keeps every trial and the table is written again after the next trial and at the end")


# -- what a worker says ----------------------------------------------------------------

def reported_metric(plan: SweepPlan) -> tuple[str, float]:
    """(metric, sign) of what trials report at each evaluation: the objective, or sweep.prune_on, negated
    (sign -1) when its sense is not the study's direction."""
    metric = plan.sweep.prune_on
    if not metric:
        return plan.monitor, 1.0
    return metric, 1.0 if metric_higher_is_better(metric) == plan.maximize else -1.0


def intermediate_label(plan: SweepPlan) -> str:
    metric, sign = reported_metric(plan)
    return metric if sign > 0 else f"-{metric} (pruning)"


def trial_line(trial: optuna.trial.FrozenTrial, plan: SweepPlan) -> str:
    params = "  ".join(f"{key}={_fmt(value)}" for key, value in trial.params.items())
    state = trial.state.name.lower()
    if state == "complete":
        what = f"{plan.monitor}={trial.value:.4f}"
    elif state == "pruned":
        last = trial.intermediate_values.get(trial.last_step) if trial.last_step is not None else None
        metric, sign = reported_metric(plan)
        what = f"at evaluation {trial.last_step}" + (f" ({metric}={sign * last:.4f})" if last is not None else "")
    else:
        what = trial.user_attrs.get("error", "")
    secs = trial.user_attrs.get("seconds")
    return f"[sweep] trial {trial.number} {state} {what}  {params}" + (f"  ({secs:.0f}s)" if secs is not None else "")


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# -- process entry (--workers N) ---------------------------------------------------------

def run_time_url(saved: str) -> str:
    """A worker process's storage: the plan file holds the masked URL, the real one comes in $SLIMTUNE_SWEEP_STORAGE."""
    real = os.environ.get(STORAGE_ENV)
    if real and mask_url(real) == saved:
        return real
    if is_masked(saved):
        raise SweepError(f"the sweep's storage {saved} is masked (the password is never saved); "
                         f"set {STORAGE_ENV} to its URL")
    return saved


def _watch_parent(parent: int) -> None:
    """A worker started by `slimtune sweep --workers N` ends when that command is gone (killed)."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plan = SweepPlan.from_dict(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    index = int(argv[1])
    try:
        plan = dataclasses.replace(plan, storage=run_time_url(plan.storage))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if plan.parent_pid:
        _watch_parent(plan.parent_pid)
    if plan.threads:
        import torch

        torch.set_num_threads(plan.threads)
    try:
        run_worker(plan, index, log=lambda line: print(f"{line}  [worker {index}]", flush=True))
    except KeyboardInterrupt:
        return 130
    except SlimtuneError as e:  # the user's to fix; anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
