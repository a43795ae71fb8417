"""What a sweep leaves in its folder, read back from the study (so any worker, on any machine,
can write it): the table of trials, the best trial's config, a summary."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..track import atomic
from .plan import SweepPlan

if TYPE_CHECKING:
    import optuna


def trial_rows(study: optuna.Study, monitor: str, order: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, params, evaluations, duration, test metrics, run folder.
    `order`: the search space's keys, for the order of the param columns."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    keys = list(order or [])
    for t in trials:
        keys += [k for k in t.params if k not in keys]
    rows = []
    for t in trials:
        attrs = t.user_attrs
        # a pruned trial's value is its last report to the pruner (sweep.prune_on, tie-break): not the objective
        value = t.value if t.state.name == "COMPLETE" else None
        row = {"number": t.number, "state": t.state.name.lower(), monitor: value}
        row.update({k: t.params.get(k) for k in keys})
        row["evals"] = attrs.get("evals")
        row["pruned_at_eval"] = t.last_step if t.state.name == "PRUNED" else None
        row["seconds"] = attrs.get("seconds")
        row.update({k: v for k, v in attrs.items() if k.startswith("test_")})
        row["retry_of"] = attrs.get("retry_of")
        row["worker"] = f"{attrs['host']}:{attrs['pid']}" if "pid" in attrs else None
        row["run_dir"] = attrs.get("run_dir")
        row["error"] = attrs.get("error")
        rows.append(row)
    return rows


def write_table(study: optuna.Study, sweep_dir: Path, monitor: str,
                order: list[str] | None = None) -> list[dict[str, Any]]:
    rows = trial_rows(study, monitor, order)
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols or ["number"])
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic.write_text(Path(sweep_dir) / "trials.csv", buf.getvalue())
    return rows


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        best = study.best_trial
    except ValueError:  # no completed trial
        return None
    return best if best.value is not None and not math.isnan(best.value) else None


def best_config(plan: SweepPlan, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The best trial's config as `slimtune run` takes it: base config + its values, its own output name."""
    from .space import choice_value, trial_config

    space = plan.sweep.params
    params = {k: (choice_value(v, space[k]) if k in space and space[k].kind == "categorical" else v)
              for k, v in trial.params.items()}
    data = trial_config(plan.base, params)
    data["output"] = {**(data.get("output") or {}), "name": f"{plan.sweep_name}-best"}
    return data


def write_best(plan: SweepPlan, study: optuna.Study, sweep_dir: Path) -> Path | None:
    best = best_trial(study)
    if best is None:
        return None
    data = best_config(plan, best)
    from ..config import config_from_dict

    config_from_dict(data, "best config")  # it must load as it is
    head = (f"# best trial of sweep {plan.sweep_name!r}: trial {best.number}, {plan.monitor}={best.value:.6g}\n"
            f"# run it with: slimtune run {Path(sweep_dir) / 'best.yaml'}\n")
    path = Path(sweep_dir) / "best.yaml"
    atomic.write_text(path, head + yaml.safe_dump(data, sort_keys=False))
    return path
