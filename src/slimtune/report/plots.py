"""The report's plots: matplotlib figures rendered to data: URIs (SVG or PNG), ready for an <img>.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot): no global state, no
GUI backend, safe to call from any thread. Every function returns None when there is
nothing to draw, and the page leaves the plot out.
"""
from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg", force=False)  # harmless when pyplot is not used; keeps a notebook's backend if set
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
LOWER_IS_BETTER = ("loss", "perplexity")


def _t(x) -> str:
    """Text from a run folder (run names, metric names, labels, parameter groups) as matplotlib should
    draw it: literally. A `$` would start mathtext (and an unbalanced one stops the whole page with a
    parse error), so it is escaped; matplotlib escapes <, > and & itself when it writes SVG."""
    return str(x).replace("$", r"\$")


def _label(x) -> str:
    """Legend text from data: as _t, and a leading `_` (which matplotlib reads as 'leave me out of the
    legend') is kept in the legend."""
    s = _t(x)
    return " " + s if s.startswith("_") else s


def to_data_uri(fig: Figure, fmt: str = "svg") -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, bbox_inches="tight", dpi=110)
    mime = "image/svg+xml" if fmt == "svg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _fig(w: float = 6.4, h: float = 3.4, ncols: int = 1):
    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, list(axes)


def _series(records: list[dict], kind: str, key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        if r.get("type") == kind and isinstance(r.get(key), (int, float)) and math.isfinite(r[key]):
            xs.append(r.get("step", 0))
            ys.append(r[key])
    return xs, ys


def eval_metric_names(records: list[dict]) -> list[str]:
    names = []
    for r in records:
        if r.get("type") == "eval":
            for k in r:
                if k.startswith("eval_") and k[5:] not in names:
                    names.append(k[5:])
    return names


# -- one run -------------------------------------------------------------------

def loss_curves(records: list[dict], fmt: str = "svg") -> str | None:
    tx, ty = _series(records, "train", "loss")
    ex, ey = _series(records, "eval", "eval_loss")
    if not tx and not ex:
        return None
    fig, (ax,) = _fig()
    if tx:
        ax.plot(tx, ty, color=PALETTE[0], lw=1.5, label="train loss")
    if ex:
        ax.plot(ex, ey, color=PALETTE[1], lw=1.5, marker="o", ms=4, label="eval loss")
    test = [r for r in records if r.get("type") == "test" and isinstance(r.get("test_loss"), (int, float))]
    if test:
        ax.axhline(test[-1]["test_loss"], color=PALETTE[2], ls="--", lw=1,
                   label=f"test loss ({test[-1]['test_loss']:.4f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.legend(frameon=False)
    return to_data_uri(fig, fmt)


def metric_curves(records: list[dict], fmt: str = "svg") -> str | None:
    names = [n for n in eval_metric_names(records) if n != "loss"]
    if not names:
        return None
    fig, axes = _fig(w=min(4.2 * len(names), 12.8), h=3.2, ncols=len(names))
    test = next((r for r in reversed(records) if r.get("type") == "test"), {})
    for ax, name in zip(axes, names):
        xs, ys = _series(records, "eval", f"eval_{name}")
        ax.plot(xs, ys, color=PALETTE[1], marker="o", ms=4, lw=1.5, label=_label(f"eval {name}"))
        best = [(r["step"], r[f"eval_{name}"]) for r in records
                if r.get("type") == "eval" and r.get("best") and f"eval_{name}" in r]
        if best:
            ax.plot([best[-1][0]], [best[-1][1]], marker="*", ms=14, color=PALETTE[3], ls="none",
                    label="best checkpoint")
        if isinstance(test.get(f"test_{name}"), (int, float)):
            ax.axhline(test[f"test_{name}"], color=PALETTE[2], ls="--", lw=1,
                       label=f"test ({test[f'test_{name}']:.4f})")
        ax.set_xlabel("optimizer step")
        ax.set_title(_t(name))
        ax.legend(frameon=False, fontsize=8)
    return to_data_uri(fig, fmt)


def lr_schedule(records: list[dict], fmt: str = "svg") -> str | None:
    groups: dict[str, tuple[list, list]] = {}
    for r in records:
        if r.get("type") == "train" and isinstance(r.get("lr"), dict):
            for g, v in r["lr"].items():
                xs, ys = groups.setdefault(str(g), ([], []))
                xs.append(r.get("step", 0))
                ys.append(v)
        elif r.get("type") == "train" and isinstance(r.get("lr"), (int, float)):
            xs, ys = groups.setdefault("all", ([], []))
            xs.append(r.get("step", 0))
            ys.append(r["lr"])
    if not groups:
        return None
    fig, (ax,) = _fig()
    for i, (g, (xs, ys)) in enumerate(sorted(groups.items())):
        ax.plot(xs, ys, color=PALETTE[i % len(PALETTE)], lw=1.5, ls=("-", "--", ":", "-.")[i % 4], label=_label(g))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate per parameter group")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.legend(frameon=False, title="group", fontsize=8)
    return to_data_uri(fig, fmt)


def confusion(labels: list[str] | None, matrix: list[list[int]], title: str, fmt: str = "svg") -> str | None:
    n = len(matrix)
    if n == 0:
        return None
    labels = [_t(x) for x in (labels or range(n))]
    size = min(max(3.6, 0.45 * n + 1.8), 14.0)
    fig = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = fig.subplots()
    row_sums = [max(sum(r), 1) for r in matrix]
    shares = [[c / s for c in r] for r, s in zip(matrix, row_sums)]
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = range(n)
    fs = 9 if n <= 12 else max(4, 9 - n // 12)
    ax.set_xticks(ticks, labels, rotation=90 if n > 6 else 0, fontsize=fs)
    ax.set_yticks(ticks, labels, fontsize=fs)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=fs,
                        color="white" if shares[i][j] > 0.6 else "black")
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    total = sum(sum(r) for r in matrix)
    correct = sum(matrix[i][i] for i in range(n))
    ax.set_title(_t(f"{title}: {correct}/{total} correct"))
    return to_data_uri(fig, fmt)


def param_share(trainable: int | None, total: int | None, fmt: str = "svg") -> str | None:
    if not (isinstance(trainable, int) and isinstance(total, int) and 0 < trainable <= total):
        return None  # nothing counted, or a summary.json edited into something that is not a share
    fig, (ax,) = _fig(h=1.6)
    share = trainable / total
    ax.barh([0], [share], color=PALETTE[2], label=f"trainable {trainable:,}")
    ax.barh([0], [1 - share], left=[share], color="#d9d9d9", label=f"frozen {total - trainable:,}")
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title(f"Trainable parameters: {share:.2%} of {total:,}")
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncols=2)
    return to_data_uri(fig, fmt)


def energy_split(energy: dict, fmt: str = "svg") -> str | None:
    parts = [(k.upper(), energy.get(f"{k}_kwh")) for k in ("cpu", "gpu", "ram")]
    parts = [(k, v) for k, v in parts if isinstance(v, (int, float)) and v > 0]
    if not parts:
        return None
    fig, (ax,) = _fig(w=5.2, h=2.6)
    ax.barh([k for k, _ in parts], [v * 1000 for _, v in parts], color=[PALETTE[i] for i in range(len(parts))])
    for i, (_, v) in enumerate(parts):
        ax.text(v * 1000, i, f" {v * 1000:.3g} Wh", va="center", fontsize=8)
    ax.set_xlabel("energy (Wh)")
    ax.set_title(_t(f"Energy by component ({energy.get('method') or 'method unknown'})"), fontsize=10)
    ax.margins(x=0.25)
    return to_data_uri(fig, fmt)


# -- several runs ----------------------------------------------------------------

def overlay(runs: list[tuple[str, list[dict]]], kind: str, key: str, title: str, ylabel: str,
            fmt: str = "svg") -> str | None:
    drawn = 0
    fig, (ax,) = _fig(w=6.8, h=3.6)
    for i, (name, records) in enumerate(runs):
        xs, ys = _series(records, kind, key)
        if not xs:
            continue
        ax.plot(xs, ys, color=PALETTE[i % len(PALETTE)], ls=("-", "--", ":", "-.")[(i // len(PALETTE)) % 4], lw=1.5,
                marker="o" if kind == "eval" else None, ms=3, label=_label(name))
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(_t(ylabel))
    ax.set_title(_t(title))
    if drawn <= 12:
        ax.legend(frameon=False, fontsize=7)
    return to_data_uri(fig, fmt)


def pareto_front(points: list[tuple[float, float]], higher_better: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and quality, by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if higher_better else points[i][1]))
    front, best = [], None
    for i in order:
        q = points[i][1]
        if best is None or (q > best if higher_better else q < best):
            front.append(i)
            best = q
    return front


def pareto(runs: list[dict], quality: str, higher_better: bool, fmt: str = "svg") -> str | None:
    """runs: [{'name', 'quality', 'train_seconds', 'energy_wh'}]; one panel per cost with any values."""
    costs = [(k, lab) for k, lab in (("train_seconds", "training time (s)"), ("energy_wh", "energy (Wh)"))
             if sum(isinstance(r.get(k), (int, float)) for r in runs
                    if isinstance(r.get("quality"), (int, float))) >= 1]
    if not costs:
        return None
    fig, axes = _fig(w=6.0 * len(costs), h=4.0, ncols=len(costs))
    for ax, (key, label) in zip(axes, costs):
        pts = [(r[key], r["quality"], r["name"]) for r in runs
               if isinstance(r.get(key), (int, float)) and isinstance(r.get("quality"), (int, float))]
        front = set(pareto_front([(x, y) for x, y, _ in pts], higher_better))
        for i, (x, y, name) in enumerate(pts):
            on = i in front
            ax.scatter([x], [y], s=60 if on else 30, color=PALETTE[3] if on else PALETTE[0], zorder=3,
                       edgecolors="black" if on else "none")
            ax.annotate(_t(name if len(name) <= 28 else name[:12] + "..." + name[-12:]), (x, y),
                        textcoords="offset points", xytext=(5, 4), fontsize=7)
        fx = sorted((pts[i][0], pts[i][1]) for i in front)
        if len(fx) > 1:
            ax.step([p[0] for p in fx], [p[1] for p in fx], where="post", color=PALETTE[3], lw=1, alpha=0.7,
                    label="Pareto front")
            ax.legend(frameon=False, fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(_t(quality) + (" (higher is better)" if higher_better else " (lower is better)"))
        ax.set_title(_t(f"{quality} vs {label.split(' (')[0]}"))
        ax.margins(0.15)
    return to_data_uri(fig, fmt)


def scatter(x: list, y: list, title: str, x_label: str, y_label: str, fmt: str = "svg",
            max_points: int = 5000) -> str | None:
    """y against x (a regression's predictions against the truth) with the y = x line; at most max_points,
    an even stride through the list, so a large eval split stays a small page."""
    pts = [(a, b) for a, b in zip(x, y) if isinstance(a, (int, float)) and isinstance(b, (int, float))
           and not isinstance(a, bool) and not isinstance(b, bool) and math.isfinite(a) and math.isfinite(b)]
    if not pts:
        return None
    stride = max(1, math.ceil(len(pts) / max_points))
    shown = pts[::stride]
    fig, (ax,) = _fig(w=4.6, h=4.2)
    ax.scatter([p[0] for p in shown], [p[1] for p in shown], s=8, alpha=0.5, color=PALETTE[0], linewidths=0)
    lo = min(min(p) for p in shown)
    hi = max(max(p) for p in shown)
    ax.plot([lo, hi], [lo, hi], color="#7f7f7f", linewidth=1, linestyle="--", label="y = x")
    ax.set_xlabel(_t(x_label))
    ax.set_ylabel(_t(y_label))
    note = f" ({len(shown)} of {len(pts)} shown)" if stride > 1 else ""
    ax.set_title(_t(title + note), fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    return to_data_uri(fig, fmt)
