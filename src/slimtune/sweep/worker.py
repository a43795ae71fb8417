"""One sweep worker: takes trials from the shared study until the budget is spent.

A trial is a normal `slimtune.run()` of the base config with the sampled values set, in its own
run folder (`<sweep>/trials/trial-0007`), with a pruning callback that reports each evaluation of
the monitored metric to optuna and ends the run cleanly (status 'pruned') when the pruner says so.

Workers coordinate only through the study's storage (SQLite in the sweep folder, or a database
URL shared by many machines), plus a lock file in the sweep folder that makes "is there budget
left? then start a trial" atomic between the workers of one machine. A worker that dies leaves
its trial RUNNING: the next worker on the same machine sees that the process is gone (SQLite
storage) or optuna's heartbeat goes stale (any storage), fails the trial and queues its
parameters again, once.

`python -m slimtune.sweep.worker PLAN.json INDEX` runs one worker process (what `--workers N` starts).
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

from .storage import STORAGE_ENV, is_masked, mask_url

HOST = socket.gethostname()
HEARTBEAT_S = 10  # optuna's heartbeat: a RUNNING trial whose worker is silent for GRACE_S is failed
GRACE_S = 30
WAIT_S = 2.0  # poll interval while the remaining budget is held by trials in flight elsewhere
MAX_FAILS_IN_ROW = 3


class SweepError(RuntimeError):
    """A sweep that cannot go on (its trials keep failing, a worker died, the storage disagrees)."""


# -- storage, sampler, pruner ------------------------------------------------------

def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def run_time_url(saved: str) -> str:
    """A worker process's storage: the plan file holds the masked URL, the real one comes in $SLIMTUNE_SWEEP_STORAGE."""
    real = os.environ.get(STORAGE_ENV)
    if real and mask_url(real) == saved:
        return real
    if is_masked(saved):
        raise SweepError(f"the sweep's storage {saved} is masked (the password is never saved); "
                         f"set {STORAGE_ENV} to its URL")
    return saved


def make_storage(url: str):
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 60}} if is_sqlite(url) else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=GRACE_S, heartbeat_stale_trial_callback=retry_trial)


def make_sampler(sw: dict, seed: int | None, space: dict):
    import optuna

    kind = sw["sampler"]
    if kind == "tpe":  # constant_liar: trials in flight count as bad guesses, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    if kind == "cmaes":
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:
            raise SweepError("sweep.sampler 'cmaes' needs the cmaes package: pip install cmaes")
        return optuna.samplers.CmaEsSampler(seed=seed)
    if kind == "gp":
        import importlib.util

        if importlib.util.find_spec("scipy") is None:
            raise SweepError("sweep.sampler 'gp' needs scipy: pip install scipy")
        return optuna.samplers.GPSampler(seed=seed)
    if kind == "grid":
        return optuna.samplers.GridSampler({k: spec.grid() for k, spec in space.items()}, seed=seed)
    raise SweepError(f"unknown sampler {kind!r}")


def make_pruner(sw: dict):
    import optuna

    kind = sw["pruner"]
    if kind == "median":  # n_warmup_steps: evaluations are reported as steps 1, 2, 3, ...
        return optuna.pruners.MedianPruner(n_startup_trials=sw["startup_trials"], n_warmup_steps=sw["prune_after"])
    if kind == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=sw["prune_after"], reduction_factor=sw["reduction_factor"])
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=sw["prune_after"], reduction_factor=sw["reduction_factor"])
    return optuna.pruners.NopPruner()


def grid_size(space: dict) -> int:
    n = 1
    for spec in space.values():
        n *= len(spec.grid())
    return n


# -- trials that died ---------------------------------------------------------------

def retry_trial(study, trial) -> None:
    """Queue a failed trial's parameters once more (not a retry of a retry)."""
    if trial.user_attrs.get("retry_of") is not None or not trial.params:
        return
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that its parent has not reaped yet is a zombie: dead for us
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def recover_dead_trials(study, url: str) -> list[int]:
    """Fail the RUNNING trials whose worker is gone, and queue their parameters again.

    With SQLite (one machine by construction) a trial whose worker process no longer exists is
    failed at once; with a shared database only optuna's heartbeat decides (another machine's
    process ids mean nothing here)."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    if is_sqlite(url):
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get("pid")
            if t.user_attrs.get("host") != HOST or not pid or _pid_alive(int(pid)):
                continue
            try:
                study._storage.set_trial_user_attr(t._trial_id, "error", "its worker process was killed")
                if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    retry_trial(study, t)
                    failed.append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return failed


# -- the budget --------------------------------------------------------------------

class FileLock:
    """An exclusive lock on a file (fcntl), held from the budget check until a trial has started."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = None

    def acquire(self) -> None:
        import fcntl

        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def next_move(study, plan: dict) -> str:
    """'run' a new trial, 'wait' for trials in flight (they may fail and be queued again), or 'done'."""
    from optuna.trial import TrialState

    if plan.get("deadline") and time.time() >= plan["deadline"]:
        return "done"
    recover_dead_trials(study, plan["storage"])
    counts = {s: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    budget = plan.get("budget")
    if budget is None:
        return "run"
    finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    if finished >= budget:
        return "done"
    if finished + counts[TrialState.RUNNING] >= budget:
        return "wait"
    return "run"


# -- one trial -----------------------------------------------------------------------

class PruningCallback:
    """Loop callback: reports each evaluation of the monitored metric to the trial (as steps 1, 2,
    3, ...) and ends the run with PruneTraining when the pruner says so (never at the last one, and
    never while the trial's own lr warmup runs: a trial with a long warmup has barely trained at the
    first evaluations, and judging it there prunes good settings. In the sweep benchmark that is
    what pruned the best trial of the unpruned search at its first evaluation)."""

    TIE_EPS = 1e-9  # the tie-break's weight: far below any real difference of an eval metric

    def __init__(self, trial, enabled: bool = True, metric: str | None = None, maximize: bool = True,
                 tiebreak: str | None = None):
        self.trial = trial
        self.enabled = enabled
        self.metric = metric  # sweep.prune_on; None: the run's monitored metric (the objective)
        self.maximize = maximize  # the study's direction: a metric of the other sense is reported negated
        self.tiebreak = tiebreak  # sweep.prune_tiebreak: orders trials that tie on the reported metric
        self.reports = 0
        self.reason = None

    def on_eval_end(self, loop, metrics: dict) -> None:
        from ..config import metric_higher_is_better
        from ..train.callbacks import PruneTraining

        self.reports += 1
        name = self.metric or loop.monitor
        value = float(metrics[name])
        same_sense = True if self.metric is None else metric_higher_is_better(name) == self.maximize
        reported = value if same_sense else -value
        tb = metrics.get(self.tiebreak) if self.tiebreak and self.tiebreak != name else None
        if tb is not None and math.isfinite(float(tb)):  # e.g. accuracy ties at chance, broken by the loss
            tb = max(-1e3, min(1e3, float(tb)))
            reported += self.TIE_EPS * (tb if metric_higher_is_better(self.tiebreak) == self.maximize else -tb)
        self.trial.report(reported, self.reports)
        step = loop.state["step"]
        if self.enabled and (getattr(loop, "warmup", 0) or 0) < step < loop.total_steps and self.trial.should_prune():
            self.reason = (f"pruned by the sweep at evaluation {self.reports} (step {loop.state['step']} of "
                           f"{loop.total_steps}): {name}={value:.4f}")
            raise PruneTraining(self.reason)


def _user_errors() -> tuple:
    from ..config import ConfigError
    from ..data.readers import DataError
    from ..models.sources import ModelError

    errors = [ConfigError, DataError, ModelError, FileNotFoundError]
    try:
        from ..methods import MethodError

        errors.append(MethodError)
    except ImportError:
        pass
    return tuple(errors)


class Objective:
    def __init__(self, plan: dict, lock: FileLock, worker: int):
        from .space import SweepConfig

        self.plan = plan
        self.lock = lock
        self.worker = worker
        self.space = SweepConfig.model_validate(plan["sweep"]).params
        self.number = None
        self.fatal = None

    def __call__(self, trial) -> float:
        import optuna

        from .. import api
        from .space import applies, choice_value, trial_config

        self.lock.release()  # the trial exists (RUNNING): other workers count it from now on
        self.number = trial.number
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("worker", self.worker)
        params = {}
        base_method = (self.plan["base"].get("method") or {}).get("name", "lora")
        for key, spec in self.space.items():  # method.name first: the method.* keys depend on it
            if key == "method.name":
                params[key] = suggest(trial, key, spec)
        for key, spec in self.space.items():
            if key != "method.name" and applies(key, params.get("method.name", base_method)):
                value = suggest(trial, key, spec)
                params[key] = choice_value(value, spec) if spec.kind == "categorical" else value
        data = trial_config(self.plan["base"], params)
        if tracks_sweeps():  # the run index files the trial under its sweep
            data["track"] = {**(data.get("track") or {}), "sweep": self.plan["sweep_dir"]}
        name = f"trial-{trial.number:04d}"
        data["output"] = {**(data.get("output") or {}), "dir": str(Path(self.plan["sweep_dir"]) / "trials"), "name": name}
        trial.set_user_attr("run_dir", str(Path(self.plan["sweep_dir"]) / "trials" / name))
        prune_on, tiebreak = self.plan["sweep"].get("prune_on"), self.plan["sweep"].get("prune_tiebreak")
        from ..tasks import get_task

        metrics = list((data.get("eval") or {}).get("metrics") or get_task(data.get("task")).DEFAULT_METRICS)
        for m in (prune_on, tiebreak):  # the pruner's metrics are computed at every evaluation
            if m and m not in metrics:
                metrics.append(m)
                data["eval"] = {**(data.get("eval") or {}), "metrics": metrics}
        cb = PruningCallback(trial, enabled=self.plan["sweep"]["pruner"] != "none", metric=prune_on,
                             maximize=self.plan["direction"] == "maximize", tiebreak=tiebreak)
        t0 = time.time()
        try:
            result = api.run(data, callbacks=[cb])
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted")
            if trial.user_attrs.get("retry_of") is None:
                trial.study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            if isinstance(e, _user_errors()):
                self.fatal = e
            raise
        finally:
            trial.set_user_attr("seconds", round(time.time() - t0, 3))
            trial.set_user_attr("evals", cb.reports)
        trial.set_user_attr("run_dir", str(result.run_dir))
        trial.set_user_attr("steps", result.summary.get("steps"))
        for k, v in (result.test_metrics or {}).items():
            trial.set_user_attr(f"test_{k}", v)
        if result.status == "pruned":
            raise optuna.TrialPruned(cb.reason)
        value = (result.best_metrics or {}).get(self.plan["monitor"])
        return float("nan") if value is None else float(value)


def tracks_sweeps() -> bool:
    """Whether the run config has `track.sweep` (the run index's link from a run to its sweep)."""
    from ..config import RunConfig

    field = RunConfig.model_fields.get("track")
    return field is not None and "sweep" in getattr(field.annotation, "model_fields", {})


def suggest(trial, key: str, spec):
    if spec.kind == "categorical":
        from .space import choice_label

        return trial.suggest_categorical(key, [choice_label(c) for c in spec.choices])
    if spec.kind == "int":
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(key, float(spec.low), float(spec.high), step=spec.step, log=spec.log)


# -- the worker loop -------------------------------------------------------------------

def worker_seed(plan: dict, index: int, n_existing: int) -> int:
    """Distinct per worker and per (re-)start: a resumed sweep must not replay the sampler's first draws."""
    seed = plan["seed"] + 1000 * index + n_existing
    if not is_sqlite(plan["storage"]):  # workers on other machines start with the same index
        seed += sum(HOST.encode()) * 7919 + os.getpid()
    return seed


def run_worker(plan: dict, index: int = 0, log=print) -> dict:
    """Run trials until the budget is spent; returns {trials: n run here, last_state}."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = make_storage(plan["storage"])
    from .space import SweepConfig

    space = SweepConfig.model_validate(plan["sweep"]).params
    probe = optuna.load_study(study_name=plan["study_name"], storage=storage)
    seed = worker_seed(plan, index, len(probe.get_trials(deepcopy=False)))
    study = optuna.load_study(study_name=plan["study_name"], storage=storage,
                              sampler=make_sampler(plan["sweep"], seed, space), pruner=make_pruner(plan["sweep"]))
    if plan["sweep"]["sampler"] == "grid":
        plan = {**plan, "budget": min(plan.get("budget") or 10**9, grid_size(space))}
    lock = FileLock(Path(plan["sweep_dir"]) / ".trial.lock")
    objective = Objective(plan, lock, index)
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
        t = study.get_trials(deepcopy=False)
        t = next(x for x in t if x.number == objective.number)
        log(trial_line(t, plan))
        update_table(study, plan, log)
        if objective.fatal is not None:
            raise objective.fatal
        fails = fails + 1 if t.state.name == "FAIL" else 0
        if fails >= MAX_FAILS_IN_ROW:
            where = t.user_attrs.get("run_dir")  # a trial that failed before training leaves no folder
            where = f"run folder {where}" if where and Path(where).is_dir() else "it left no run folder"
            raise SweepError(f"{fails} trials in a row failed; the last one (trial {t.number}): "
                             f"{t.user_attrs.get('error') or 'no error was recorded'} ({where})")
    return {"trials": ran}


def update_table(study, plan: dict, log) -> None:
    """trials.csv after each trial. A failed write (a full disk, a permission) does not stop the sweep (the study
    holds every trial and the table is written again after the next one and at the end), but it is said."""
    from .results import write_table

    try:
        write_table(study, Path(plan["sweep_dir"]), plan["monitor"], list(plan["sweep"]["params"]))
    except OSError as e:
        log(f"[sweep] warning: {Path(plan['sweep_dir']) / 'trials.csv'} was not updated ({type(e).__name__}: {e}); "
            "the study keeps every trial and the table is written again after the next trial and at the end")


def reported_metric(plan: dict) -> tuple[str, float]:
    """(metric, sign) of what trials report at each evaluation: the objective, or sweep.prune_on, negated
    (sign -1) when its sense is not the study's direction."""
    from ..config import metric_higher_is_better

    metric = plan["sweep"].get("prune_on")
    if not metric:
        return plan["monitor"], 1.0
    return metric, 1.0 if metric_higher_is_better(metric) == (plan["direction"] == "maximize") else -1.0


def intermediate_label(plan: dict) -> str:
    metric, sign = reported_metric(plan)
    return metric if sign > 0 else f"-{metric} (pruning)"


def trial_line(t, plan: dict) -> str:
    ps = "  ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
    state = t.state.name.lower()
    if state == "complete":
        what = f"{plan['monitor']}={t.value:.4f}"
    elif state == "pruned":
        last = t.intermediate_values.get(t.last_step) if t.last_step is not None else None
        metric, sign = reported_metric(plan)
        what = f"at evaluation {t.last_step}" + (f" ({metric}={sign * last:.4f})" if last is not None else "")
    else:
        what = t.user_attrs.get("error", "")
    secs = t.user_attrs.get("seconds")
    return f"[sweep] trial {t.number} {state} {what}  {ps}" + (f"  ({secs:.0f}s)" if secs is not None else "")


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# -- process entry (--workers N) ---------------------------------------------------------

def _watch_parent(parent: int) -> None:
    """A worker started by `slimtune sweep --workers N` ends when that command is gone (killed)."""
    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plan = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    index = int(argv[1])
    try:
        plan["storage"] = run_time_url(plan["storage"])
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if plan.get("parent_pid"):
        _watch_parent(plan["parent_pid"])
    if plan.get("threads"):
        import torch

        torch.set_num_threads(plan["threads"])
    try:
        run_worker(plan, index, log=lambda s: print(f"{s}  [worker {index}]", flush=True))
    except KeyboardInterrupt:
        return 130
    except _user_errors() + (SweepError,) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
