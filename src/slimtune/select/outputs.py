"""What a select leaves in its folder: summary.json (after every trial, and at the end), best.yaml, report.html."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from ..config import config_from_dict
from ..config.sweep_keys import trial_config
from ..track import atomic
from .plan import Candidate, SelectPlan, SelectResult, decision, ranked


def candidate_entries(plan: SelectPlan, sizes: dict, dropped: dict, rows: list[dict],
                      stopped: str | None = None) -> list[dict[str, Any]]:
    """One entry per candidate: its memory estimate, the rung it reached, its metric per rung, what its trials cost
    together, its last trial's adapter size and latency, and why it did not go further."""
    out = []
    for c in plan.candidates:
        mine = [r for r in rows if r["label"] == c.label]
        size = sizes.get(c.label) or {}
        last = mine[-1] if mine else {}
        energy = [r["energy_kwh"] for r in mine]
        peaks = [r["peak_memory_mb"] for r in mine if r["peak_memory_mb"] is not None]
        out.append({
            "label": c.label, "model": c.model, "method": c.method,
            "memory_estimate_bytes": size.get("bytes"), "memory_note": size.get("note"),
            "rung_reached": last.get("rung"), "metric_per_rung": {str(r["rung"]): r["metric"] for r in mine},
            "train_seconds": sum(r["train_seconds"] or 0.0 for r in mine) if mine else None,
            "wall_seconds": sum(r["wall_seconds"] or 0.0 for r in mine) if mine else None,
            "energy_kwh": sum(energy) if mine and None not in energy else None,
            "peak_memory_mb": max(peaks) if peaks else None, "peak_memory_of": last.get("peak_memory_of"),
            "adapter_bytes": last.get("adapter_bytes"), "latency_s": last.get("latency_s"),
            "dropped": dropped.get(c.label) or _out_of_race(c, rows, plan, stopped),
            "trials": mine,
        })
    return out


def _out_of_race(c: Candidate, rows: list[dict], plan: SelectPlan, stopped: str | None) -> str | None:
    """Why a candidate that raced went no further: its trial failed, it was not promoted, the budget ran out."""
    mine = [r for r in rows if r["label"] == c.label]
    if not mine:
        return f"not run: {stopped}" if stopped else None
    last = mine[-1]
    if last["metric"] is None:
        return f"failed at rung {last['rung']}: {last.get('error') or last.get('status')}"
    here = [r for r in rows if r["rung"] == last["rung"]]
    later = [r for r in rows if r["rung"] == last["rung"] + 1]
    if later:
        order = [r["label"] for r in ranked(here, plan.higher_is_better)]
        return (f"not promoted after rung {last['rung']}: ranked {order.index(c.label) + 1} of {len(here)} by "
                f"{plan.monitor}")
    return None


def _summary(plan: SelectPlan, sizes: dict, dropped: dict, rows: list[dict], status: str,
             stopped: str | None = None) -> dict[str, Any]:
    return {
        "select_dir": str(plan.select_dir), "status": status, "monitor": plan.monitor,
        "direction": "maximize" if plan.higher_is_better else "minimize", "eta": plan.eta,
        "fractions": list(plan.fractions), "train_samples": plan.train_samples,
        "rung_steps": [plan.steps(r) for r in range(len(plan.fractions))],
        "tolerance": plan.tolerance, "budget_minutes": plan.budget_minutes, "budget_kwh": plan.budget_kwh,
        "memory_bytes": plan.memory_bytes, "stopped": stopped,
        "trial_wall_seconds": sum(r["wall_seconds"] or 0.0 for r in rows),
        "trial_train_seconds": sum(r["train_seconds"] or 0.0 for r in rows),
        "candidates": candidate_entries(plan, sizes, dropped, rows, stopped),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_progress(plan: SelectPlan, sizes: dict, dropped: dict, rows: list[dict]) -> None:
    """summary.json as the race stands (status 'running'): a killed select leaves what it knew."""
    atomic.write_json(plan.select_dir / "summary.json", _summary(plan, sizes, dropped, rows, "running"))


def best_config(plan: SelectPlan, chosen: Candidate) -> dict[str, Any]:
    """The user's config with the pick's model and method (the config's method options where that method has
    them, as in the trials), its own output name; the full data and steps."""
    data = trial_config(plan.base, {"model.name": chosen.model, "method.name": chosen.method})
    data["output"] = {**(data.get("output") or {}), "name": f"{plan.name}-best"}
    return data


def write_best(plan: SelectPlan, chosen: Candidate, rule: str, row: dict) -> Path:
    data = best_config(plan, chosen)
    config_from_dict(data, "best config")  # it must load as it is
    path = plan.select_dir / "best.yaml"
    head = (f"# pick of select {plan.name!r}: {chosen.label}\n# rule: {rule}\n"
            f"# run it with: slimtune run {path}\n" + _trial_note(row))
    atomic.write_text(path, head + yaml.safe_dump(data, sort_keys=False))
    return path


def _trial_note(row: dict) -> str:
    """The pick's trial trained this same config (its own folder): say how far, and how to go on from it."""
    if row.get("status") == "paused":
        return (f"# the race's trial of it is this run paused at step {row.get('steps')}; to go on from there "
                f"instead:\n#   slimtune run --resume {row['run_dir']}\n")
    if row.get("status") == "completed":
        return f"# the race's trial of it is this run trained to the end: {row['run_dir']}\n"
    return ""


def finish(plan: SelectPlan, sizes: dict, dropped: dict, rows: list[dict], stopped: str | None,
           decided: int | None, wall: float, report: bool = True) -> SelectResult:
    """The pick, best.yaml, summary.json and the report page."""
    chosen_row, rule = decision(plan, rows, decided)
    chosen = Candidate(chosen_row["model"], chosen_row["method"]) if chosen_row else None
    best = write_best(plan, chosen, rule, chosen_row) if chosen else None
    summary = _summary(plan, sizes, dropped, rows, "stopped by the budget" if stopped else "completed", stopped)
    summary.update({
        "decided_rung": decided, "rule": rule, "wall_seconds": wall, "best_config": str(best) if best else None,
        "pick": None if chosen_row is None else {
            "label": chosen_row["label"], "model": chosen_row["model"], "method": chosen_row["method"],
            "metric": chosen_row["metric"], "rung": chosen_row["rung"], "run_dir": chosen_row["run_dir"]},
    })
    page = None
    if report:
        from .report import write_report

        page = write_report(plan, summary)
        summary["report"] = str(page)
    atomic.write_json(plan.select_dir / "summary.json", summary)
    return SelectResult(plan.select_dir, chosen, rule, decided, stopped, summary["candidates"], best, page, summary)
