"""What a select race is given (`SelectPlan`), and its rules as pure functions: the rungs, who goes on, the
budget, the pick. No torch, no runs: everything here is checked by hand in the tests."""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SlimtuneError
from ..train.callbacks import pause_step


class SelectError(SlimtuneError, RuntimeError):
    """A selection that cannot go on (every candidate dropped or failed)."""


@dataclass(frozen=True)
class Candidate:
    model: str
    method: str

    @property
    def label(self) -> str:
        return f"{self.model} + {self.method}"

    def slug(self) -> str:
        """A folder-name part: the model's last path component, the method, and a hash of the full model name (two
        folders both called `model` stay apart)."""
        tail = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model.rstrip("/").split("/")[-1])[:40] or "model"
        return f"{tail}-{self.method}-{hashlib.sha1(self.model.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class SelectPlan:
    select_dir: Path
    """The select folder, absolute: trials/, summary.json, best.yaml, report.html."""
    name: str
    base: dict[str, Any]
    """The keys the user set, without the select section: every trial's and best.yaml's starting point."""
    candidates: tuple[Candidate, ...]
    """Every (model, method) pair, models outer, in the order given."""
    fractions: tuple[float, ...]
    """The share of its steps each rung trains a trial to, ascending, the last 1 (the whole run)."""
    train_samples: int
    """Training examples of the full data (after the config's own data.max_train_samples)."""
    max_steps: int | None
    """The config's train.max_steps (scaled per rung), None when it trains by epochs (the steps follow the data)."""
    eta: int
    tolerance: float
    monitor: str
    higher_is_better: bool
    budget_minutes: float | None
    budget_kwh: float | None
    memory_bytes: int | None
    latency_examples: int

    def steps(self, rung: int) -> int | None:
        """The step a rung pauses its trials at; None where the config trains by epochs (the run knows its steps)."""
        if self.max_steps is None:
            return None
        return pause_step(self.max_steps, self.fractions[rung])


def rung_fractions(eta: int, min_fraction: float) -> tuple[float, ...]:
    """1, 1/eta, 1/eta^2, ... down to the last one not below min_fraction; ascending."""
    out = [1.0]
    while out[-1] / eta >= min_fraction * (1 - 1e-9):
        out.append(out[-1] / eta)
    return tuple(reversed(out))


def better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def ranked(rows: list[dict], higher: bool) -> list[dict]:
    """Rows with a metric, best first; ties go to the shorter training time."""
    done = [r for r in rows if isinstance(r.get("metric"), (int, float)) and math.isfinite(r["metric"])]
    return sorted(done, key=lambda r: ((-r["metric"] if higher else r["metric"]), r.get("train_seconds") or 0.0))


def promoted(rows: list[dict], eta: int, higher: bool) -> list[dict]:
    """The best ceil(n/eta) of a rung's n trials (failed ones never go on)."""
    keep = math.ceil(len(rows) / eta)
    return ranked(rows, higher)[:keep]


def decides(n_trials: int, eta: int, fraction: float) -> bool:
    """Whether this rung ends the race: at most one candidate would go on, or it already had the full data."""
    return math.ceil(n_trials / eta) <= 1 or fraction >= 1


def pick(rows: list[dict], tolerance: float, higher: bool, monitor: str) -> tuple[dict | None, str]:
    """The recommendation among one rung's trials, and the rule that picked it in words.

    The best monitored value; with a tolerance, the shortest training time among those within `tolerance` points
    (tolerance / 100 in the metric's unit) of the best."""
    order = ranked(rows, higher)
    if not order:
        return None, "no candidate finished a trial"
    best = order[0]
    if tolerance <= 0:
        return best, f"the best {monitor} ({best['metric']:.4g})"
    margin = tolerance / 100
    near = [r for r in order if abs(r["metric"] - best["metric"]) <= margin + 1e-12]
    cheapest = min(near, key=lambda r: (r.get("train_seconds") or 0.0))
    if cheapest is best:
        return best, (f"the best {monitor} ({best['metric']:.4g}); no candidate within {tolerance:g} points of it "
                      "trains faster")
    return cheapest, (f"the shortest training time ({cheapest.get('train_seconds') or 0:.1f} s) among the candidates "
                      f"within {tolerance:g} points ({margin:g}) of the best {monitor} ({best['metric']:.4g}, "
                      f"{best['label']}): {cheapest['label']} has {cheapest['metric']:.4g}")


def spent(rows: list[dict], plan: SelectPlan) -> float | None:
    """What the trials so far cost in the budget's unit (minutes or kWh); None: no budget, or energy unmeasured."""
    if plan.budget_kwh is not None:
        values = [r.get("energy_kwh") for r in rows]
        return None if any(v is None for v in values) else sum(values)
    return sum(r.get("wall_seconds") or 0.0 for r in rows) / 60


def forecast(rows: list[dict], candidate: Candidate, rung: int, plan: SelectPlan) -> float:
    """What the next trial will likely cost (the budget's unit): the candidate's own previous rung scaled by the
    steps it adds now (a rung continues the trial: rung r adds fractions[r] - fractions[r - 1] of the run), else
    the mean of this rung's trials so far; 0 when nothing is known yet."""
    key = "energy_kwh" if plan.budget_kwh is not None else "wall_seconds"
    scale = 1.0 if plan.budget_kwh is not None else 1 / 60

    def cost(r: dict) -> float | None:
        v = r.get(key)
        return None if v is None else v * scale

    def added(r: int) -> float:
        return plan.fractions[r] - (plan.fractions[r - 1] if r > 0 else 0.0)

    own = [r for r in rows if r["label"] == candidate.label and r["rung"] == rung - 1 and cost(r) is not None]
    if own:
        return cost(own[-1]) * added(rung) / added(rung - 1)
    same = [cost(r) for r in rows if r["rung"] == rung and cost(r) is not None]
    return sum(same) / len(same) if same else 0.0


def budget_left(rows: list[dict], candidate: Candidate, rung: int, plan: SelectPlan) -> str | None:
    """None when the next trial may start; else why not (said in the summary and the log)."""
    limit = plan.budget_kwh if plan.budget_kwh is not None else plan.budget_minutes
    if limit is None:
        return None
    unit = "kWh" if plan.budget_kwh is not None else "min"
    used = spent(rows, plan)
    if used is None:
        return "the budget is in kWh but a trial's energy was not measured (track.energy: false, or codecarbon absent)"
    if used >= limit:
        return f"budget spent: {used:.4g} of {limit:g} {unit}"
    ahead = forecast(rows, candidate, rung, plan)
    if used + ahead > limit:
        return (f"budget: {used:.4g} of {limit:g} {unit} spent and the next trial ({candidate.label}, rung {rung}) "
                f"would take about {ahead:.4g} more")
    return None


@dataclass
class SelectResult:
    select_dir: Path
    pick: Candidate | None
    rule: str
    decided_rung: int | None
    stopped: str | None
    candidates: list[dict] = field(default_factory=list)
    best_config: Path | None = None
    report: Path | None = None
    summary: dict = field(default_factory=dict)


def decision(plan: SelectPlan, rows: list[dict], decided: int | None) -> tuple[dict | None, str]:
    """The pick's row and the rule in words, from the deciding rung's trials."""
    if decided is None:
        return None, "no trial ran within the budget"
    here = [r for r in rows if r["rung"] == decided]
    chosen, rule = pick(here, plan.tolerance, plan.higher_is_better, plan.monitor)
    return chosen, f"at rung {decided} ({len(here)} trials at {plan.fractions[decided]:.3g} of their steps): {rule}"
