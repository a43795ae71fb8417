"""`slimtune sweep`: the sweep folder, the study, the workers, the results.

    <output.dir>/<sweep name>/          (sweep name: sweep.name, default sweep-<config file stem>)
      sweep.yaml        the resolved config with its sweep section, as last started
      study.db          the optuna study (SQLite; absent when sweep.storage names a database)
      trials/trial-0007 each trial's run folder (a normal run folder)
      trials.csv        every trial: state, objective, params, evaluations, seconds, test metrics, run folder
      best.yaml         the best trial's config; `slimtune run best.yaml` takes it as it is
      summary.json      study, storage, direction, counts by state, best trial, wall time
      (a storage URL is written with its password masked, postgresql://user:***@host/db, in every file: the real
      one comes from --storage or $SLIMTUNE_SWEEP_STORAGE at run time, or the config file it was given in)
      history.png, importances.png, parallel.png, intermediate.png   (plots.txt says why one is missing)

Re-running the same command resumes the study: finished trials stay, trials that were in flight
when a worker or the sweep was killed are failed and their parameters queued again, and the
budget (`sweep.trials`) counts finished trials across all runs and workers.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..config import ConfigError, RunConfig, config_from_dict, dump_config, load_config
from ..track import atomic
from .engine import make_storage, recover_dead_trials
from .plan import SweepError, SweepPlan
from .space import sweep_base
from .storage import STORAGE_ENV, mask_url, storage_url
from .worker import intermediate_label, run_worker

if TYPE_CHECKING:
    import optuna

Log = Callable[[str], Any]


@dataclass
class SweepResult:
    sweep_dir: Path
    study_name: str
    storage: str
    direction: str
    metric: str
    best_value: float | None
    best_params: dict
    best_trial: int | None
    best_config: Path | None
    counts: dict
    wall_seconds: float
    trials: list[dict] = field(default_factory=list)
    plots: dict = field(default_factory=dict)


def _default_name(config: str | Path | dict | RunConfig) -> str:
    if isinstance(config, (str, Path)):
        return f"sweep-{Path(config).stem}"
    return "sweep"


def prepare(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, *, name: str | None = None,
            storage: str | None = None, trials: int | None = None,
            timeout_minutes: float | None = None) -> tuple[RunConfig, str, str | None]:
    """The config with the sweep options given here set, its sweep name, and the storage URL to connect to
    (None: SQLite in the sweep folder). The config holds that URL masked: it is what gets written."""
    cfg = load_config(config, overrides)
    src = str(config) if isinstance(config, (str, Path)) else "the config"
    if cfg.sweep is None:
        raise ConfigError(f"{src} has no `sweep:` section; add one with the search space, for example\n"
                          "sweep:\n  params:\n    train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}\n"
                          "    method.r: [4, 8, 16]\n  trials: 20")
    options = (("name", name), ("trials", trials), ("timeout_minutes", timeout_minutes))
    given = {key: value for key, value in options if value is not None}
    url = storage_url(cfg.sweep.storage, storage)
    if url is not None and (url != cfg.sweep.storage or mask_url(url) != url):
        given["storage"] = mask_url(url)
    if given:  # through the config's own checks (a name is one folder name, budgets are positive, ...)
        data = cfg.model_dump(mode="json", exclude_unset=True)
        data["sweep"].update(given)
        cfg = config_from_dict(data, f"{src} with the sweep options given")
    return cfg, cfg.sweep.name or _default_name(config), url


def sweep(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, *, workers: int = 1,
          name: str | None = None, storage: str | None = None, trials: int | None = None,
          timeout_minutes: float | None = None, plots: bool = True, log: Log = print) -> SweepResult:
    """Hyperparameter search over the config's `sweep:` section; returns the best trial and the sweep folder.

    `workers`: local worker processes sharing the study (1: in this process). `storage`, `trials`,
    `timeout_minutes`, `name` override the sweep section. Re-running resumes the study.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    cfg, sweep_name, url = prepare(config, overrides, name=name, storage=storage, trials=trials,
                                   timeout_minutes=timeout_minutes)
    sweep_dir = Path(cfg.output.dir) / sweep_name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    url = url or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"  # the real URL: in memory only
    plan = make_plan(cfg, sweep_dir, sweep_name, url, workers)
    _note_config(sweep_dir, cfg, log)
    study = _open_study(plan)
    _announce(study, plan, workers, log)
    started = time.time()
    _index(plan, cfg, "running", log, started=started)
    try:
        if workers == 1:
            run_worker(plan, 0, log=log)
        else:
            _run_processes(plan, workers, sweep_dir, log)
    except BaseException:
        _index(plan, cfg, "interrupted", log, started=started, ended=time.time())
        raise
    result = finish(plan, sweep_dir, time.time() - started, plots=plots)
    metrics = {cfg.monitor: result.best_value} if result.best_value is not None else {}
    _index(plan, cfg, "completed", log, started=started, ended=time.time(), metrics=metrics,
           cost={"wall_seconds": result.wall_seconds, "trial_seconds": sum(r["seconds"] or 0 for r in result.trials)})
    return result


def make_plan(cfg: RunConfig, sweep_dir: Path, sweep_name: str, url: str, workers: int) -> SweepPlan:
    """What every worker of this sweep is given (its URL the real one: the plan file masks it)."""
    sweep_section = cfg.sweep
    auto = "maximize" if cfg.higher_is_better else "minimize"
    cpus = os.cpu_count() or 1
    return SweepPlan(
        sweep_dir=sweep_dir.resolve(), sweep_name=sweep_name, study_name=sweep_section.study_name or sweep_name,
        storage=url, base=sweep_base(cfg), sweep=sweep_section, monitor=cfg.monitor,
        direction=sweep_section.direction if sweep_section.direction != "auto" else auto,
        budget=sweep_section.trials,
        deadline=time.time() + 60 * sweep_section.timeout_minutes if sweep_section.timeout_minutes else None,
        seed=sweep_section.seed if sweep_section.seed is not None else cfg.train.seed,
        threads=max(1, cpus // workers) if workers > 1 else None,
    )


def _open_study(plan: SweepPlan) -> optuna.Study:
    """The sweep's study, created on the first start; a study of the other direction is refused."""
    import optuna

    study = optuna.create_study(storage=make_storage(plan.storage), study_name=plan.study_name,
                                direction=plan.direction, load_if_exists=True)
    created = study.direction.name.lower()
    if created != plan.direction:
        raise ConfigError(f"study {plan.study_name!r} in {mask_url(plan.storage)} was created to {created}, "
                          f"not to {plan.direction}; use another sweep.study_name / sweep.name")
    return study


def _announce(study: optuna.Study, plan: SweepPlan, workers: int, log: Log) -> None:
    """Trials a dead worker left in flight are failed and queued again; then the sweep's one-line header."""
    recovered = recover_dead_trials(study, plan.storage)
    if recovered:
        log(f"[sweep] trials {', '.join(map(str, recovered))} were in flight when their worker died: failed, "
            "parameters queued again")
    done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False))
    section = plan.sweep
    log(f"[sweep] {plan.sweep_dir}  study {plan.study_name!r}  {plan.direction} {plan.monitor}  "
        f"sampler {section.sampler}  pruner {section.pruner}  budget {section.trials or '-'} trials"
        + (f" / {section.timeout_minutes:g} min" if section.timeout_minutes else "")
        + (f"  ({done} finished before: resuming)" if done else "") + (f"  workers {workers}" if workers > 1 else ""))


def _index(plan: SweepPlan, cfg: RunConfig, status: str, log: Log, **info: Any) -> None:
    """The sweep's row in the run index of its output folder (its trials file themselves under it)."""
    if not cfg.track.index:
        return
    try:
        from ..track.index import register_sweep

        register_sweep(plan.sweep_dir.parent, str(plan.sweep_dir), status=status, task=cfg.task,
                       config=plan.base, **info)
    except Exception as e:  # the index is a convenience; it never stops a sweep
        log(f"[sweep] note: the run index was not updated ({type(e).__name__}: {e})")


def _note_config(sweep_dir: Path, cfg: RunConfig, log: Log) -> None:
    path = sweep_dir / "sweep.yaml"
    text = dump_config(cfg)
    if path.exists():
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if (old.get("sweep") or {}).get("params") != cfg.sweep.model_dump(mode="json")["params"]:
            log("[sweep] warning: the search space differs from the one this sweep started with; "
                "the trials so far were sampled from the earlier one")
    atomic.write_text(path, text)


def _run_processes(plan: SweepPlan, workers: int, sweep_dir: Path, log: Log) -> None:
    """N worker processes (`python -m slimtune.sweep.worker`), each with cpus // N torch threads."""
    plan_path = sweep_dir / f".plan-{os.getpid()}.json"
    # the file holds the storage masked; the workers get the real URL in their environment (worker.run_time_url)
    written = dataclasses.replace(plan, parent_pid=os.getpid(), storage=mask_url(plan.storage))
    atomic.write_json(plan_path, written.to_dict())
    env = {**os.environ, "OMP_NUM_THREADS": str(plan.threads), "TOKENIZERS_PARALLELISM": "false",
           STORAGE_ENV: plan.storage}
    procs = [subprocess.Popen([sys.executable, "-m", "slimtune.sweep.worker", str(plan_path), str(i)], env=env)
             for i in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        # Ctrl-C in a terminal reaches the workers too; forward it only to those still running after a while
        deadline = time.time() + 10
        while time.time() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        plan_path.unlink(missing_ok=True)
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
        exits = ", ".join(f"{index} exited with code {code}" for index, code in bad)
        raise SweepError(f"worker {exits} (its error is printed above)")


def finish(plan: SweepPlan, sweep_dir: Path, wall: float, plots: bool = True) -> SweepResult:
    """Table, best config, summary and plots from the study as it stands."""
    import optuna

    from .results import best_trial, write_best, write_table

    study = optuna.load_study(study_name=plan.study_name, storage=make_storage(plan.storage))
    rows = write_table(study, sweep_dir, plan.monitor, plan.params)
    best = best_trial(study)
    best_path = write_best(plan, study, sweep_dir)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    drawn: dict[str, str] = {}
    if plots:
        from .plots import write_plots

        drawn = write_plots(study, sweep_dir, plan.monitor, intermediate_label(plan))
    best_summary = None if best is None else {
        "trial": best.number, "value": best.value, "params": best.params, "run_dir": best.user_attrs.get("run_dir"),
        "config": str(best_path), **{k: v for k, v in best.user_attrs.items() if k.startswith("test_")}}
    summary = {
        "sweep_dir": str(sweep_dir), "study_name": plan.study_name, "storage": mask_url(plan.storage),
        "direction": plan.direction, "metric": plan.monitor, "sampler": plan.sweep.sampler,
        "pruner": plan.sweep.pruner, "budget_trials": plan.budget, "counts": counts, "best": best_summary,
        "wall_seconds": wall, "trial_seconds": sum(row["seconds"] or 0 for row in rows), "plots": drawn,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic.write_json(sweep_dir / "summary.json", summary)
    return SweepResult(sweep_dir, plan.study_name, summary["storage"], plan.direction, plan.monitor,
                       None if best is None else best.value, {} if best is None else dict(best.params),
                       None if best is None else best.number, best_path, counts, wall, rows, drawn)
