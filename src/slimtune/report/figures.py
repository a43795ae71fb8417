"""The task's own evaluation figures (eval_figures.json, written by the tracking session from
`Task.eval_figures`): tables and scatter plots, rendered without the report knowing the task.

The file comes from a run folder, so it is untrusted: a block of the wrong shape is left out, never
rendered as markup (cells are escaped by `table`).
"""
from __future__ import annotations

from . import plots
from .markup import Html, figure, h, join, table

MAX_ROWS = 200  # a table of per-label / per-entity scores; more rows are cut, and the cut is said


def _strings(xs) -> bool:
    return isinstance(xs, list) and all(isinstance(x, str) for x in xs)


def _cell(v) -> object:
    if isinstance(v, float):
        return f"{v:.4g}"
    return v if isinstance(v, (str, int)) or v is None else str(v)


def _table(fig: dict, where: str) -> Html:
    cols, rows = fig.get("columns"), fig.get("rows")
    if not _strings(cols) or not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        return Html("")
    cut = h('<p class="note">first {} of {} rows</p>', MAX_ROWS, len(rows)) if len(rows) > MAX_ROWS else Html("")
    numeric = {j for j in range(len(cols)) if rows and all(isinstance(r[j], (int, float)) for r in rows if j < len(r))}
    body = table(cols, [[_cell(v) for v in r] for r in rows[:MAX_ROWS]], numeric)
    return h('<div class="wide"><h3>{} ({})</h3>{}{}</div>', str(fig.get("title", "")), where, body, cut)


def _scatter(fig: dict, where: str, fmt_img: str) -> Html:
    x, y = fig.get("x"), fig.get("y")
    if not isinstance(x, list) or not isinstance(y, list):
        return Html("")
    title = str(fig.get("title", ""))
    uri = plots.scatter(x, y, f"{title}, {where}", str(fig.get("x_label", "x")), str(fig.get("y_label", "y")),
                        fmt_img)
    return figure(uri, f"{title}, {where}", f"{title} scatter plot")


def task_figures(figures: dict | None, fmt_img: str = "svg") -> Html:
    """The eval block (the best step's evaluation) and the test block, each figure in its kind."""
    out = []
    if not isinstance(figures, dict):
        return Html("")
    for split, what in (("eval", "eval set"), ("test", "test set, best checkpoint")):
        block = figures.get(split)
        if not isinstance(block, dict) or not isinstance(block.get("figures"), list):
            continue
        where = f"{what}, step {block.get('step')}"
        for fig in block["figures"]:
            if not isinstance(fig, dict):
                continue
            if fig.get("kind") == "table":
                out.append(_table(fig, where))
            elif fig.get("kind") == "scatter":
                out.append(_scatter(fig, where, fmt_img))
    return join(out)


SHOWN_GENERATIONS = 20


def generations(rows: list[dict], best_step: int | None) -> Html:
    """eval.generate's samples of the best step (else the latest generation): prompt, reference, output, scores."""
    steps = {r.get("step") for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)}
    if not steps:
        return Html("")
    step = best_step if best_step in steps else max(steps)
    shown = [r for r in rows if r.get("step") == step]
    names = sorted({k for r in shown if isinstance(r.get("scores"), dict) for k in r["scores"]})
    body = table(["#", "prompt", "reference", "output", "finish", *names],
                 [[r.get("index"), str(r.get("prompt", ""))[:400], str(r.get("reference", ""))[:400],
                   str(r.get("output", ""))[:400], r.get("finish_reason"),
                   *(_cell((r.get("scores") or {}).get(n)) for n in names)] for r in shown[:SHOWN_GENERATIONS]],
                 {0, *range(5, 5 + len(names))})
    more = h('<p class="note">first {} of {} samples; all in generations.jsonl</p>', SHOWN_GENERATIONS, len(shown)) \
        if len(shown) > SHOWN_GENERATIONS else Html("")
    return h('<p class="note">step {}: replies generated for eval records, scored against the reference</p>{}{}',
             step, body, more)
