"""The select folder's report.html, built from summary.json with the report package's parts: the page frame, the
escaping table, the Pareto front and the quality vs cost plot (report/plots.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..report import plots
from ..report.html import duration, fmt, page
from ..report.markup import Html, figure, h, join, kv_table, section, table
from ..track import atomic
from .plan import SelectPlan


def _mb(value: Any) -> str:
    return fmt(value / 2**20, " MB") if isinstance(value, (int, float)) else "-"


def _ms(value: Any) -> str:
    return fmt(value * 1000, " ms") if isinstance(value, (int, float)) else "-"


def _points(summary: dict) -> list[dict]:
    """The deciding rung's trials as report/plots.pareto takes them: the ones that compare (same data, same steps)."""
    rung = summary.get("decided_rung")
    points = []
    for c in summary["candidates"]:
        for t in c["trials"]:
            if t["rung"] == rung and isinstance(t.get("metric"), (int, float)):
                wh = t["energy_kwh"] * 1000 if isinstance(t.get("energy_kwh"), (int, float)) else None
                points.append({"name": c["label"], "quality": t["metric"], "train_seconds": t["train_seconds"],
                               "energy_wh": wh})
    return points


def _front(points: list[dict], higher: bool) -> set[str]:
    valid = [p for p in points if isinstance(p["train_seconds"], (int, float))]
    return {valid[i]["name"] for i in plots.pareto_front([(p["train_seconds"], p["quality"]) for p in valid], higher)}


def _candidate_table(summary: dict, front: set[str]) -> Html:
    rungs = range(len(summary["fractions"]))
    pick = (summary.get("pick") or {}).get("label")
    headers = ["candidate", *(f"rung {r} {summary['monitor']}" for r in rungs), "train time", "energy (Wh)",
               "peak memory", "adapter", "latency / example", "memory estimate", "dropped / out"]
    rows, classes = [], []
    for c in summary["candidates"]:
        name = h("<b>{}</b> (pick)", c["label"]) if c["label"] == pick else c["label"]
        per = c["metric_per_rung"]
        energy = c["energy_kwh"] * 1000 if isinstance(c.get("energy_kwh"), (int, float)) else None
        peak = fmt(c["peak_memory_mb"], f" MB ({c['peak_memory_of']})") if c.get("peak_memory_mb") else "-"
        rows.append([name, *(fmt(per.get(str(r))) for r in rungs), duration(c["train_seconds"]), fmt(energy), peak,
                     _mb(c["adapter_bytes"]), _ms(c["latency_s"]), _mb(c["memory_estimate_bytes"]),
                     c.get("dropped") or "-"])
        classes.append("front" if c["label"] in front else "")
    n = len(rungs)
    return table(headers, rows, set(range(1, n + 7)), classes)


def select_page(plan: SelectPlan, summary: dict) -> str:
    higher = plan.higher_is_better
    points = _points(summary)
    front = _front(points, higher)
    pick = summary.get("pick")
    advice = kv_table([
        ("recommendation", pick["label"] if pick else "none"),
        ("rule", summary.get("rule")),
        ("run it with", f"slimtune run {summary['best_config']}" if summary.get("best_config") else "-"),
        ("stopped", summary.get("stopped") or "no: the race ran to its deciding rung"),
        ("rungs", ", ".join(f"{f:.3g} of the run" + (f" ({n} steps)" if n else "") for f, n in
                            zip(summary["fractions"], summary["rung_steps"]))),
        ("trials' time", duration(summary.get("trial_wall_seconds"))),
    ])
    rung = summary.get("decided_rung")
    note = h('<p class="note">highlighted: on the Pareto front of {m} vs training time at rung {r} ({b} is better); '
             "train time, energy and peak memory are of all the candidate's trials together, the adapter and the "
             "latency (one example at a time, best weights) of its last trial.</p>",
             m=summary["monitor"], r=rung if rung is not None else "-", b="higher" if higher else "lower")
    scatter = figure(plots.pareto(points, f"rung {rung} {summary['monitor']}", higher) if points else None,
                     "quality vs cost of the deciding rung's trials; red points are on the Pareto front",
                     "Pareto plot")
    body = join([
        section("Recommendation", advice),
        section("Candidates", join([_candidate_table(summary, front), note])),
        section("Quality vs training time", scatter),
    ])
    return page(f"Select {plan.name}", h("{} candidates &middot; {} {}", len(summary["candidates"]),
                                         "max" if higher else "min", summary["monitor"]), body)


def write_report(plan: SelectPlan, summary: dict) -> Path:
    path = plan.select_dir / "report.html"
    atomic.write_text(path, select_page(plan, summary))
    return path
