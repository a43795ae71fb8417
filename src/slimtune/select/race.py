"""`slimtune select`: the select folder, the memory check, the race, the pick.

    <output.dir>/<select name>/          (select name: select.name, default select-<config file stem>)
      select.yaml       the resolved config with its select section, as last started
      trials/<model>-<method>-<hash>   each candidate's run folder (a normal run folder), all its rungs
      summary.json      every candidate: memory estimate, dropped reason, metric per rung, cost; the pick and its rule
      best.yaml         the user's config with the pick's model and method; `slimtune run` takes it
      report.html       the candidates' table, quality vs training time with the Pareto front, the recommendation

Successive halving (Jamieson & Talwalkar, 2016) over (model, method) pairs: every candidate's run trains to a small
share of its steps at rung 0 and pauses; the best 1/eta (rounded up) are resumed to eta x that share, until at most
one would go on or a rung trained the runs to their end; that last rung decides, by the rule in plan.pick. As in
ASHA (Li et al., 2020) a promoted trial continues from its checkpoint rather than starting over, so the race's
compute is the survivors' longest run plus the others' short ones (trial.py). It is written here rather than with
optuna's SuccessiveHalvingPruner, which `slimtune sweep` uses: optuna prunes a running trial at its intermediate
reports and samples new ones, while here the arms are a fixed list, every rung's run stands alone as a run folder
(paused, then resumed), and the pick needs every rung's cost, which the run folders hold; a study would add a
storage and a sampler with nothing to sample.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, config_from_dict, dump_config, load_config
from ..config.sweep_keys import sweep_base
from ..track import atomic
from .plan import (Candidate, SelectError, SelectPlan, SelectResult, budget_left, decides, promoted, ranked,
                   rung_fractions)

Log = Callable[[str], Any]
OPTIONS = ("models", "methods", "budget_minutes", "budget_kwh", "memory", "tolerance", "eta", "min_fraction", "name")


def prepare(config: str | Path | dict | RunConfig, overrides: list[str] | None = None,
            **options: Any) -> tuple[RunConfig, str]:
    """The config with the select options given here set over its `select:` section (the command line's flags and
    the YAML's keys go through the same checks), and the select folder's name."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"select: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(OPTIONS)}")
    cfg = load_config(config, overrides)
    src = str(config) if isinstance(config, (str, Path)) else "the config"
    given = {k: v for k, v in options.items() if v is not None}
    if cfg.select is None and "models" not in given:
        raise ConfigError(f"{src} has no `select:` section and no --models were given; give the candidates, for "
                          "example --models org/model-a,path/to/model-b, or\nselect:\n  models: [org/model-a, "
                          "path/to/model-b]\n  methods: [lora, ia3]")
    if given:
        data = cfg.model_dump(mode="json", exclude_unset=True)
        data["select"] = {**(data.get("select") or {}), **given}
        cfg = config_from_dict(data, f"{src} with the select options given")
    stem = Path(config).stem if isinstance(config, (str, Path)) else None
    return cfg, cfg.select.name or (f"select-{stem}" if stem else "select")


def check_models(models: list[str], cfg: RunConfig) -> None:
    """Every candidate model resolves (a folder with config.json, a .gguf file, a Hub id in the cache) before any
    trial runs."""
    from ..config.sections import is_factory_spec
    from ..errors import ModelError
    from ..models import resolve
    from ..models.factory import factory_source

    for name in models:
        try:
            if is_factory_spec(name):
                factory_source(name)  # imported as model.factory is: the user named this code
                continue
            resolve(name, None, cfg.model.revision)
        except ModelError as e:
            reason = str(e).removeprefix("model.name: ")
            raise ConfigError(f"select.models: {name!r} does not resolve: {reason} (accepted: a folder with a "
                              "config.json, a .gguf file, a Hub id that is cached or reachable, or a factory "
                              "'path/file.py:function' / 'package.module:function')") from None


def make_plan(cfg: RunConfig, name: str) -> tuple[SelectPlan, int]:
    """The plan, and the number of classes of the data (for the memory estimate). The data is read once here: its
    errors show before any trial, and the rungs' sample counts come from its size."""
    from ..tasks import get_task

    section = cfg.select
    check_models(section.models, cfg)
    splits = get_task(cfg.task).load_data(cfg)
    methods = section.methods or [cfg.method.name]
    base = sweep_base(cfg)
    base.pop("select", None)
    plan = SelectPlan(
        select_dir=(Path(cfg.output.dir) / name).resolve(), name=name, base=base,
        candidates=tuple(Candidate(m, k) for m in section.models for k in methods),
        fractions=rung_fractions(section.eta, section.min_fraction), train_samples=len(splits.train),
        max_steps=cfg.train.max_steps, eta=section.eta, tolerance=section.tolerance, monitor=cfg.monitor,
        higher_is_better=cfg.higher_is_better, budget_minutes=section.budget_minutes, budget_kwh=section.budget_kwh,
        memory_bytes=section.memory_bytes, latency_examples=section.latency_examples)
    if plan.budget_kwh is not None and not cfg.track.energy:
        raise ConfigError("select.budget_kwh needs the trials' energy: set track.energy: true (codecarbon), or give "
                          "select.budget_minutes instead")
    return plan, len(splits.meta.get("labels") or [])


def select(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, *, log: Log = print,
           report: bool = True, **options: Any) -> SelectResult:
    """Choose the model and the PEFT method for the config's data within the budget (see the module docstring).
    `options`: the select section's keys (models, methods, budget_minutes, budget_kwh, memory, tolerance, eta,
    min_fraction, name), set over the config's. Re-running the same command resumes: finished trials are read back."""
    from .memory import estimates, too_big
    from .outputs import finish, write_progress

    cfg, name = prepare(config, overrides, **options)
    plan, num_labels = make_plan(cfg, name)
    plan.select_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(plan.select_dir / "select.yaml", dump_config(cfg))
    sizes = estimates(cfg, list(plan.candidates), num_labels) if plan.memory_bytes is not None else {}
    dropped = {}
    for c in plan.candidates:
        why = too_big(sizes.get(c.label, {}), plan.memory_bytes, cfg.select.memory)
        if why:
            dropped[c.label] = why
            log(f"[select] dropped {c.label}: {why}")
    racing = [c for c in plan.candidates if c.label not in dropped]
    if not racing:
        raise SelectError(f"every candidate was dropped: {'; '.join(f'{k}: {v}' for k, v in dropped.items())}")
    log(f"[select] {plan.select_dir}  {len(racing)} candidates  rungs {', '.join(f'{f:.3g}' for f in plan.fractions)}"
        f" of each run's steps on {plan.train_samples} examples  eta {plan.eta}  "
        f"{'max' if plan.higher_is_better else 'min'} {plan.monitor}" + _budget_text(plan))
    started = time.time()
    rows, stopped, decided = race(plan, racing, log, lambda rs: write_progress(plan, sizes, dropped, rs))
    return finish(plan, sizes, dropped, rows, stopped, decided, time.time() - started, report=report)


def _budget_text(plan: SelectPlan) -> str:
    if plan.budget_kwh is not None:
        return f"  budget {plan.budget_kwh:g} kWh"
    return f"  budget {plan.budget_minutes:g} min" if plan.budget_minutes is not None else ""


def race(plan: SelectPlan, racing: list[Candidate], log: Log,
         progress: Callable[[list[dict]], None]) -> tuple[list[dict], str | None, int | None]:
    """Successive halving: (every trial's row, why the budget stopped it or None, the rung that decides)."""
    from .trial import is_completed, run_trial

    rows: list[dict] = []
    survivors = racing
    for rung, fraction in enumerate(plan.fractions):
        for candidate in survivors:
            why = None if is_completed(plan, candidate, rung) else budget_left(rows, candidate, rung, plan)
            if why:
                log(f"[select] stopped: {why}")
                return rows, why, _complete_rung(rows, rung)
            row = run_trial(plan, candidate, rung, log)
            rows.append(row)
            progress(rows)
            log(_trial_line(row, plan))
        here = [r for r in rows if r["rung"] == rung]
        if not ranked(here, plan.higher_is_better):
            errors = "; ".join(f"{r['label']}: {r['error']}" for r in here if r.get("error"))
            raise SelectError(f"every trial of rung {rung} failed: {errors or 'no monitored value'}")
        if decides(len(here), plan.eta, fraction):
            return rows, None, rung
        going = {r["label"] for r in promoted(here, plan.eta, plan.higher_is_better)}
        survivors = [c for c in survivors if c.label in going]
    return rows, None, len(plan.fractions) - 1


def _complete_rung(rows: list[dict], stopped_at: int) -> int | None:
    """The rung that decides when the budget stops the race in `stopped_at`: the one before (all its trials ran),
    or rung 0's finished trials when rung 0 itself was cut short; None when no trial ran."""
    if stopped_at > 0:
        return stopped_at - 1
    return 0 if rows else None


def _trial_line(row: dict, plan: SelectPlan) -> str:
    if row["metric"] is None:
        return f"[select] {row['label']} rung {row['rung']}: {row['status']} {row.get('error') or ''}".rstrip()
    secs = row.get("train_seconds") or 0.0
    return (f"[select] {row['label']} rung {row['rung']}: {plan.monitor}={row['metric']:.4f}  train {secs:.1f}s"
            + ("  (finished before: read back)" if row.get("reused") else ""))
