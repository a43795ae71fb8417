"""The report pages: one self-contained HTML file each (inline CSS, plots as data: URIs, no
scripts, no network), for one run or for a comparison of runs."""
from __future__ import annotations

import math
from datetime import datetime

import yaml

from ..track.runinfo import RunInfo, flat
from . import plots
from .figures import generations, task_figures
from .markup import Html, figure, h, join, kv_table, section, table

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;\
margin:0;color:#1f2328;background:#f6f7f9}
header{background:#1f2937;color:#fff;padding:16px 28px}
header h1{margin:0;font-size:21px;font-weight:600;word-break:break-all}
header .sub{opacity:.8;font-size:13px;margin-top:6px}
main{max-width:1280px;margin:0 auto;padding:8px 28px 28px}
section{background:#fff;border:1px solid #e3e6ea;border-radius:8px;padding:14px 18px;margin:16px 0}
h2{font-size:16px;margin:2px 0 12px}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{padding:4px 10px;border-bottom:1px solid #eef0f2;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.scroll{overflow-x:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:14px;align-items:start}
figure{margin:0}
figure.wide{grid-column:1/-1}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:12px;color:#57606a;margin-top:4px}
pre{background:#f6f8fa;padding:10px 12px;overflow:auto;font-size:12px;border-radius:6px;margin:0}
.note{font-size:12px;color:#57606a}
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}.mid{color:#9a6700;font-weight:600}
.front{background:#fff8e6}
footer{font-size:12px;color:#57606a;text-align:center;padding:12px}
"""
STATUS_CLASS = {"completed": "ok", "failed": "bad", "dead": "bad", "missing": "bad", "damaged": "bad"}


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == 0:
            return f"0{unit}"
        a = abs(v)
        if a >= 1e6 or a < 1e-3:
            return f"{v:.3e}{unit}"
        return f"{v:,.4g}{unit}" if a < 1000 else f"{v:,.0f}{unit}"
    return f"{v}{unit}"


def duration(s) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def status_html(status: str | None) -> Html:
    return h('<span class="{}">{}</span>', STATUS_CLASS.get(status, "mid"), status)


def page(title: str, subtitle, body) -> str:
    stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return h('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
             '<meta name="viewport" content="width=device-width, initial-scale=1">'
             "<title>{title}</title><style>{css}</style></head><body>"
             '<header><h1>{title}</h1><div class="sub">{subtitle}</div></header>'
             "<main>{body}</main><footer>slimtune report, written {stamp}</footer></body></html>\n",
             title=title, css=Html(CSS), subtitle=subtitle, body=body, stamp=stamp)


# -- pieces about cost ---------------------------------------------------------

def cost_rows(cost: dict, summary: dict) -> list[tuple[str, object]]:
    e = cost.get("energy") or {}
    rows = [
        ("wall time", duration(cost.get("wall_seconds") or summary.get("wall_seconds"))),
        ("training time (loop)", duration(cost.get("train_seconds") or summary.get("train_seconds"))),
        ("CPU time (main process)", duration(cost.get("cpu_seconds"))),
        ("GPU time (wall x GPUs)", duration(cost.get("gpu_seconds")) if cost.get("gpu_seconds") else "-"),
        ("peak host memory", fmt(cost.get("host_peak_rss_mb") or summary.get("host_peak_rss_mb"), " MB")),
        ("peak device memory", fmt(cost.get("device_peak_mb") or summary.get("device_peak_mb"), " MB")),
        ("samples seen", fmt(cost.get("samples_seen") or summary.get("samples_seen"))),
        ("tokens seen", fmt(cost.get("tokens_seen") or summary.get("tokens_seen"))),
        ("training FLOPs (estimate)",
         f"{fmt(cost.get('flops'))}  = {cost.get('flops_formula', '')}" if cost.get("flops") else "-"),
    ]
    if e.get("energy_kwh") is not None:
        rows += [
            ("energy", f"{fmt(e['energy_kwh'])} kWh ({fmt(e['energy_kwh'] * 1000)} Wh)"),
            ("CO2", f"{fmt(e['co2_kg'])} kg CO2e ({fmt(e['co2_kg'] * 1000)} g)"),
            ("measured with", f"{e.get('method')} (RAM: {((e.get('methods') or {}).get('ram')) or '-'}; "
                              f"{e.get('tool')}, {e.get('tracking_mode')} mode)"),
            ("grid carbon intensity", f"{fmt(e.get('carbon_intensity_g_per_kwh'))} g CO2e/kWh "
                                      f"({e.get('carbon_intensity_source')})"),
        ]
        if cost.get("sessions", 1) > 1:
            rows.append(("sessions", f"{cost['sessions']} (resumed; time and energy are summed)"))
    elif e.get("error"):
        rows.append(("energy", f"not measured: {e['error']}"))
    else:
        rows.append(("energy", "not measured (track.energy: false, or a run written before energy tracking)"))
    return rows


# -- one run -------------------------------------------------------------------

def _dict(x) -> dict:
    """A config section as a dict; a hand-edited run folder may hold anything there."""
    return x if isinstance(x, dict) else {}


def _run_curves(recs: list[dict], fmt_img: str) -> Html:
    return join([
        figure(plots.loss_curves(recs, fmt_img), "training loss (logged every train.log_every steps) and eval loss",
               "loss curves"),
        figure(plots.metric_curves(recs, fmt_img),
               "eval metrics per evaluation; the star marks the best checkpoint, the dashed line the test score",
               "metric curves", wide=len([n for n in plots.eval_metric_names(recs) if n != "loss"]) > 1),
        figure(plots.lr_schedule(recs, fmt_img), "learning rate of each optimizer parameter group",
               "learning-rate schedule"),
    ])


def _confusion_figures(confusion: dict | None, fmt_img: str) -> Html:
    cm = []
    if confusion:
        labels = confusion.get("labels")
        for split, what in (("eval", "eval set, best checkpoint"), ("test", "test set, best checkpoint")):
            block = confusion.get(split)
            if block and block.get("matrix"):
                cm.append(figure(plots.confusion(labels, block["matrix"], f"{split} (step {block.get('step')})",
                                                 fmt_img),
                                 f"confusion matrix, {what}; rows: true label, columns: predicted; "
                                 "colour: share of the row",
                                 f"{split} confusion matrix"))
    return join(cm)


def run_page(info: RunInfo, fmt_img: str = "svg", data_report: dict | None = None) -> str:
    s, c, recs = info.summary, info.config, info.metrics
    method, model = _dict(c.get("method")), _dict(c.get("model"))
    method_desc = ", ".join(f"{k}={v}" for k, v in method.items()
                            if k != "name" and not isinstance(v, (dict, list)))[:200]
    overview = kv_table([
        ("status", status_html(info.status)),
        ("task", c.get("task")), ("model", model.get("name")),
        ("method", f"{method.get('name', 'lora')} ({method_desc})" if method_desc else method.get("name", "lora")),
        ("steps", f"{fmt(s.get('steps') or s.get('step'))} of {fmt(s.get('total_steps'))}"),
        ("best checkpoint",
         f"step {s.get('best_step')} by {s.get('monitor')}" if s.get("best_step") is not None else "-"),
        ("stopped early", s.get("stopped_early") or "no"),
        ("precision / processes", f"{s.get('precision', '-')} / {s.get('num_processes', '-')}"),
        ("started / ended", f"{s.get('started_at', '-')} / {s.get('ended_at', '-')}"),
        ("config hash", (s.get("config_hash") or "-")[:16]),
        ("run folder", str(info.path)),
    ])
    names = []
    for part in ("best", "final", "test"):
        for k in (s.get(part) or {}):
            if k not in names:
                names.append(k)
    metric_rows = [[n, *(fmt((s.get(p) or {}).get(n)) for p in ("best", "final", "test"))] for n in names]
    metrics = table(["metric", "best eval", "final eval", "test (best checkpoint)"], metric_rows, {1, 2, 3}) \
        if names else Html('<p class="note">no evaluation yet</p>')

    curves = _run_curves(recs, fmt_img)
    cm = _confusion_figures(info.confusion, fmt_img)
    details = task_figures(info.figures, fmt_img)
    cost = info.cost
    params = figure(plots.param_share(s.get("trainable_params"), s.get("total_params"), fmt_img),
                    "parameters the method trains (adapters and head) vs frozen base weights",
                    "trainable-parameter share")
    energy_fig = figure(plots.energy_split(cost.get("energy") or {}, fmt_img),
                        "energy by component as codecarbon estimated it", "energy split")
    warnings = (data_report or {}).get("warnings") or []
    data = join(h("<li>{}</li>", w) for w in (warnings if isinstance(warnings, list) else [warnings]))
    body = join([
        section("Overview", overview),
        section("Metrics", metrics),
        section("Curves", h('<div class="grid">{}</div>', curves) if curves
                else Html('<p class="note">no metrics logged yet</p>')),
        section("Confusion matrix", h('<div class="grid">{}</div>', cm) if cm else ""),
        section("Generations", generations(info.generations, s.get("best_step"))),
        section("Evaluation details", h('<div class="grid">{}</div>', details) if details else ""),
        section("Trainable parameters", params),
        section("Cost and energy",
                h('<div class="grid"><div>{}</div>{}</div>', kv_table(cost_rows(cost, s)), energy_fig)),
        section("Data warnings", h("<ul>{}</ul>", data) if data else ""),
        section("Config", h("<pre>{}</pre>", yaml.safe_dump(c, sort_keys=False))),
    ])
    sub = h("{} &middot; {} &middot; {} &middot; {}", c.get("task"), model.get("name"), method.get("name", "lora"),
            status_html(info.status))
    return page(f"Run {info.name}", sub, body)


# -- several runs ----------------------------------------------------------------

def _x1000(v):
    return v * 1000 if isinstance(v, (int, float)) else None


def differing_keys(configs: list[dict]) -> list[str]:
    flats = [flat({k: v for k, v in c.items() if k not in ("output",)}) for c in configs]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]


def quality_of(infos: list[RunInfo]) -> tuple[str | None, str, bool]:
    """(metric, part, higher_is_better): the first run's monitor, on test when every run has it."""
    monitor = next((i.monitor for i in infos if i.monitor), None)
    if monitor is None:
        return None, "best", True
    have_test = [i for i in infos if isinstance((i.summary.get("test") or {}).get(monitor), (int, float))]
    part = "test" if have_test and len(have_test) == len([i for i in infos if i.summary.get("best")]) else "best"
    mode = (infos[0].config.get("eval") or {}).get("mode", "auto")
    higher = mode == "max" if mode != "auto" else monitor not in plots.LOWER_IS_BETTER
    return monitor, part, higher


def _overlay_curves(named: list[tuple[str, list[dict]]], monitor: str | None, fmt_img: str) -> Html:
    return join([
        figure(plots.overlay(named, "train", "loss", "Training loss", "loss", fmt_img), "training loss of each run",
               "training loss overlaid"),
        figure(plots.overlay(named, "eval", f"eval_{monitor}", f"Eval {monitor}", monitor, fmt_img)
               if monitor and monitor != "loss" else None,
               f"eval {monitor} of each run", "eval metric overlaid"),
        figure(plots.overlay(named, "eval", "eval_loss", "Eval loss", "loss", fmt_img), "eval loss of each run",
               "eval loss overlaid"),
    ])


def _cost_table(infos: list[RunInfo]) -> Html:
    return table(["run", "wall", "train", "CPU time", "peak host MB", "samples", "tokens", "FLOPs", "energy (Wh)",
                  "CO2 (g)", "measured with"],
                 [[i.name, duration(i.cost.get("wall_seconds")),
                   duration(i.cost.get("train_seconds") or i.summary.get("train_seconds")),
                   duration(i.cost.get("cpu_seconds")), fmt(i.cost.get("host_peak_rss_mb")),
                   fmt(i.cost.get("samples_seen")), fmt(i.cost.get("tokens_seen")), fmt(i.cost.get("flops")),
                   fmt(_x1000(i.cost.get("energy_kwh"))), fmt(_x1000(i.cost.get("co2_kg"))),
                   (i.cost.get("energy") or {}).get("method") or "-"] for i in infos], set(range(1, 10)))


def compare_page(infos: list[RunInfo], title: str, fmt_img: str = "svg", notes: list[str] | None = None) -> str:
    monitor, part, higher = quality_of(infos)
    diff = differing_keys([i.config for i in infos])
    points = []
    for i in infos:
        q = (i.summary.get(part) or {}).get(monitor) if monitor else None
        wh = i.cost.get("energy_kwh") * 1000 if isinstance(i.cost.get("energy_kwh"), (int, float)) else None
        points.append({"name": i.name, "quality": q,
                       "train_seconds": i.cost.get("train_seconds") or i.summary.get("train_seconds"),
                       "energy_wh": wh})
    front = set()
    valid = [k for k, p in enumerate(points)
             if isinstance(p["quality"], (int, float)) and isinstance(p["train_seconds"], (int, float))]
    if valid:
        front = {valid[j] for j in plots.pareto_front([(points[k]["train_seconds"], points[k]["quality"])
                                                        for k in valid], higher)}
    qlabel = f"{part} {monitor}" if monitor else "quality"
    headers = ["run", "status", *diff[:8], qlabel, "train time", "energy (Wh)", "CO2 (g)", "trainable"]
    rows = []
    for k, i in enumerate(infos):
        fl = flat(i.config)
        rows.append([i.name, status_html(i.status), *(fl.get(d) for d in diff[:8]), fmt(points[k]["quality"]),
                     duration(points[k]["train_seconds"]), fmt(points[k]["energy_wh"]),
                     fmt(_x1000(i.cost.get("co2_kg"))),
                     fmt(i.summary.get("trainable_share") * 100, "%")
                     if isinstance(i.summary.get("trainable_share"), float) else "-"])
    n_diff = len(diff[:8])
    table_html = table(headers, rows, set(range(2 + n_diff, 7 + n_diff)),
                       ["front" if k in front else "" for k in range(len(infos))])
    table_html += h('<p class="note">highlighted: on the Pareto front of {q} vs training time ({better} is better). '
                    "Columns between status and {q}: the config keys that differ{more}.</p>",
                    q=qlabel, better="higher" if higher else "lower",
                    more=" (first 8; all below)" if len(diff) > 8 else "")
    curves = _overlay_curves([(i.name, i.metrics) for i in infos], monitor, fmt_img)
    pareto = figure(plots.pareto(points, qlabel, higher, fmt_img) if monitor else None,
                    "quality vs cost; red points are on the Pareto front (no run is both cheaper and better)",
                    "Pareto plot")
    diff_rows = [[d, *(flat(i.config).get(d) for i in infos)] for d in diff]
    diff_html = table(["config key", *[i.name for i in infos]], diff_rows) if diff_rows \
        else Html('<p class="note">the configs are the same</p>')
    cost_tab = _cost_table(infos)
    note_html = join(h('<p class="note">{}</p>', n) for n in notes or [])
    body = join([
        section("Runs", join([table_html, note_html])),
        section("Quality vs cost", pareto),
        section("Curves", h('<div class="grid">{}</div>', curves) if curves else ""),
        section("Cost and energy", cost_tab),
        section("Config differences", diff_html),
    ])
    return page(title, h("{} runs &middot; quality: {}", len(infos), qlabel), body)
