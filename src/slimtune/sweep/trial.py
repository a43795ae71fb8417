"""One trial: a normal `run()` of the base config with the sampled values set, in its own run folder
(`<sweep>/trials/trial-0007`), with a pruning callback that reports each evaluation of the monitored metric
to optuna and ends the run cleanly (status 'pruned') when the pruner says so.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import metric_higher_is_better
from ..errors import SlimtuneError
from ..tasks import task_spec
from .engine import HOST
from .plan import SweepPlan
from .space import ParamSpec, applies, choice_label, choice_value, trial_config

if TYPE_CHECKING:
    import optuna

    from ..runner import RunResult
    from ..train.loop import Loop


class PruningCallback:
    """Loop callback: reports each evaluation of the monitored metric to the trial (as steps 1, 2,
    3, ...) and ends the run with PruneTraining when the pruner says so (never at the last one, and
    never while the trial's own lr warmup runs: a trial with a long warmup has barely trained at the
    first evaluations, and judging it there prunes good settings. In the sweep benchmark that is
    what pruned the best trial of the unpruned search at its first evaluation)."""

    TIE_EPS = 1e-9  # the tie-break's weight: far below any real difference of an eval metric

    def __init__(self, trial: optuna.Trial, enabled: bool = True, metric: str | None = None, maximize: bool = True,
                 tiebreak: str | None = None):
        self.trial = trial
        self.enabled = enabled
        self.metric = metric  # sweep.prune_on; None: the run's monitored metric (the objective)
        self.maximize = maximize  # the study's direction: a metric of the other sense is reported negated
        self.tiebreak = tiebreak  # sweep.prune_tiebreak: orders trials that tie on the reported metric
        self.reports = 0
        self.reason: str | None = None

    def _reported(self, name: str, value: float, metrics: dict[str, float]) -> float:
        """The value optuna sees: in the study's sense, nudged by the tie-break metric."""
        same_sense = True if self.metric is None else metric_higher_is_better(name) == self.maximize
        reported = value if same_sense else -value
        tiebreak = metrics.get(self.tiebreak) if self.tiebreak and self.tiebreak != name else None
        if tiebreak is not None and math.isfinite(float(tiebreak)):  # e.g. accuracy ties at chance, broken by the loss
            tiebreak = max(-1e3, min(1e3, float(tiebreak)))
            same_sense = metric_higher_is_better(self.tiebreak) == self.maximize
            reported += self.TIE_EPS * (tiebreak if same_sense else -tiebreak)
        return reported

    def on_eval_end(self, loop: Loop, metrics: dict[str, float]) -> None:
        from ..train.callbacks import PruneTraining

        self.reports += 1
        name = self.metric or loop.monitor
        value = float(metrics[name])
        self.trial.report(self._reported(name, value, metrics), self.reports)
        step, total = loop.state.step, loop.plan.total_steps
        if self.enabled and loop.plan.warmup < step < total and self.trial.should_prune():
            self.reason = (f"pruned by the sweep at evaluation {self.reports} (step {step} of {total}): "
                           f"{name}={value:.4f}")
            raise PruneTraining(self.reason)


def suggest(trial: optuna.Trial, key: str, spec: ParamSpec) -> Any:
    if spec.kind == "categorical":
        return trial.suggest_categorical(key, [choice_label(c) for c in spec.choices])
    if spec.kind == "int":
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(key, float(spec.low), float(spec.high), step=spec.step, log=spec.log)


def sample_params(trial: optuna.Trial, plan: SweepPlan) -> dict[str, Any]:
    """The trial's values by dotted key; method.name first, since the method.* keys sampled depend on it."""
    space = plan.sweep.params
    params: dict[str, Any] = {}
    if "method.name" in space:
        params["method.name"] = suggest(trial, "method.name", space["method.name"])
    method = params.get("method.name", (plan.base.get("method") or {}).get("name", "lora"))
    for key, spec in space.items():
        if key != "method.name" and applies(key, method):
            value = suggest(trial, key, spec)
            params[key] = choice_value(value, spec) if spec.kind == "categorical" else value
    return params


def trial_run_config(plan: SweepPlan, params: dict[str, Any], run_name: str) -> dict[str, Any]:
    """The run config of one trial: filed under its sweep in the run index, its folder under trials/, and the
    pruner's metrics computed at every evaluation."""
    data = trial_config(plan.base, params)
    data["track"] = {**(data.get("track") or {}), "sweep": str(plan.sweep_dir)}
    data["output"] = {**(data.get("output") or {}), "dir": str(plan.sweep_dir / "trials"), "name": run_name}
    evaluation = data.get("eval") or {}
    metrics = list(evaluation.get("metrics") or task_spec(data["task"]).default_metrics)
    for metric in (plan.sweep.prune_on, plan.sweep.prune_tiebreak):
        if metric and metric not in metrics:
            metrics.append(metric)
            data["eval"] = {**evaluation, "metrics": metrics}
    return data


class Objective:
    """optuna's objective: runs one trial, records what it did on the trial, returns the best monitored value.

    A user's error (a SlimtuneError: a bad value in the config, data the task cannot read) ends the sweep
    (`fatal`, raised by the worker after the trial is recorded); any other exception fails the trial alone."""

    def __init__(self, plan: SweepPlan, worker: int, on_start: Callable[[], None]):
        self.plan = plan
        self.worker = worker
        self.on_start = on_start  # called once the trial exists (RUNNING): other workers count it from then on
        self.number: int | None = None
        self.fatal: SlimtuneError | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        self.on_start()
        self.number = trial.number
        for key, value in (("host", HOST), ("pid", os.getpid()), ("worker", self.worker)):
            trial.set_user_attr(key, value)
        run_name = f"trial-{trial.number:04d}"
        data = trial_run_config(self.plan, sample_params(trial, self.plan), run_name)
        trial.set_user_attr("run_dir", str(self.plan.sweep_dir / "trials" / run_name))
        pruning = PruningCallback(trial, enabled=self.plan.sweep.pruner != "none", metric=self.plan.sweep.prune_on,
                                  maximize=self.plan.maximize, tiebreak=self.plan.sweep.prune_tiebreak)
        result = self._run(trial, data, pruning)
        trial.set_user_attr("run_dir", str(result.run_dir))
        trial.set_user_attr("steps", result.summary.get("steps"))
        for metric, value in (result.test_metrics or {}).items():
            trial.set_user_attr(f"test_{metric}", value)
        if result.status == "pruned":
            raise optuna.TrialPruned(pruning.reason)
        value = (result.best_metrics or {}).get(self.plan.monitor)
        return float("nan") if value is None else float(value)

    def _run(self, trial: optuna.Trial, data: dict[str, Any], pruning: PruningCallback) -> RunResult:
        from ..runner import run

        started = time.time()
        try:
            return run(data, callbacks=[pruning])
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted")
            if trial.user_attrs.get("retry_of") is None:
                trial.study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
            raise
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:1000])
            if isinstance(error, SlimtuneError):
                self.fatal = error
            raise
        finally:
            trial.set_user_attr("seconds", round(time.time() - started, 3))
            trial.set_user_attr("evals", pruning.reports)
