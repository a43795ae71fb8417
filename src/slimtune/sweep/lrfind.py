"""The LR range test (Smith 2015, "Cyclical Learning Rates"; fastai's `lr_find`).

Train from the config's model, data and method for a few hundred steps while the learning rate
grows exponentially from `start_lr` to `end_lr`; record the training loss at every step; stop
early once the smoothed loss exceeds 4x its minimum (divergence). Suggest the learning rate where
the loss falls fastest (the rule is `RULE`). The training itself is a normal `slimtune.run()` in a
temporary folder (the same model / method / optimizer set-up as a real run, except that a classification
head moves at 1x the swept lr: see range_config) that is deleted
afterwards: no run folder, model or checkpoint is written or changed. What stays: a folder with
lr_find.png (loss vs lr) and lr_find.json (lrs, losses, suggestion, rule), and with `apply`
a copy of the config with train.lr set (`<config stem>.lr.yaml` next to it).

The pure parts (schedule, smoothing, divergence, suggestion) are functions, tested on synthetic curves.
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..train.loop import Loop

BETA = 0.8  # smoothing of the per-step loss (an EMA over about 5 steps, run both ways)
DIVERGE = 4.0  # stop when the smoothed loss exceeds this multiple of its minimum
RULE = ("steepest descent of the smoothed loss: the lr where d(loss)/d(log lr) is most negative, searched from "
        "the start up to the lowest smoothed loss; the loss is smoothed by an exponential moving average "
        f"(beta {BETA}) run forward and backward, so the curve is not shifted to higher lrs")
FALLBACK_RULE = ("the lr of the lowest smoothed loss / 10, within the tested range (the loss fell too little for a "
                 "steepest-descent point)")


def lr_schedule(start: float, end: float, steps: int) -> list[float]:
    """`steps` learning rates growing geometrically from start to end (both included)."""
    if not (0 < start < end):
        raise ConfigError(f"lr-find needs 0 < start_lr < end_lr, got {start} and {end}")
    if steps < 5:
        raise ConfigError(f"lr-find needs at least 5 steps, got {steps}")
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def ema(values: list[float], beta: float = BETA) -> list[float]:
    """Bias-corrected exponential moving average (as fastai smooths its recorded loss)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def smooth(values: list[float], beta: float = BETA) -> list[float]:
    """Zero-lag smoothing: the EMA run forward, then backward over the result."""
    return ema(ema(values, beta)[::-1], beta)[::-1]


class DivergenceMonitor:
    """Online: True once the (causal) smoothed loss is not finite or exceeds DIVERGE x its minimum."""

    def __init__(self, beta: float = BETA, factor: float = DIVERGE, min_steps: int = 5):
        self.beta, self.factor, self.min_steps = beta, factor, min_steps
        self.avg, self.n, self.best = 0.0, 0, math.inf

    def update(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        smoothed = self.avg / (1 - self.beta ** self.n)
        self.best = min(self.best, smoothed)
        return self.n >= self.min_steps and smoothed > self.factor * self.best


@dataclass
class Suggestion:
    lr: float
    index: int
    rule: str
    lr_min_div10: float  # the other common rule of thumb, for reference
    smoothed: list[float] = field(default_factory=list)
    reliable: bool = True
    note: str = ""


def suggest(lrs: list[float], losses: list[float], beta: float = BETA) -> Suggestion:
    """The suggested lr for a recorded range test (see RULE)."""
    import numpy as np

    n = min(len(lrs), len(losses))
    n = next((i for i in range(n) if not math.isfinite(losses[i])), n)  # up to the first non-finite loss
    if n < 5:
        raise ConfigError(f"lr-find recorded {n} finite losses before the loss diverged; need at least 5 "
                         "(more --steps, or a lower --start-lr)")
    x = np.log10(np.asarray(lrs[:n], dtype=float))
    y = np.asarray(smooth([float(v) for v in losses[:n]], beta))
    i_min = int(np.argmin(y))
    lr_min10 = max(float(lrs[i_min]) / 10, float(lrs[0]))
    skip = max(1, n // 20)  # the first points carry the smoothing's start-up
    grads = np.gradient(y, x)
    window = range(skip, i_min + 1)
    drop = (float(y[0]) - float(y[i_min])) / max(abs(float(y[0])), 1e-12)
    if len(window) < 3 or drop < 0.002:
        return Suggestion(lr_min10, i_min, FALLBACK_RULE, lr_min10, y.tolist(), False,
                          f"the smoothed loss fell by only {drop:.1%} over the range; the suggestion is a rough guess")
    i = min(window, key=lambda j: grads[j])
    # fine-tuning losses often move little in a range test; below a 2% drop the point is noisy
    return Suggestion(float(lrs[i]), int(i), RULE, lr_min10, y.tolist(), drop >= 0.02,
                      "" if drop >= 0.02 else f"the smoothed loss fell by only {drop:.1%}; the suggestion is uncertain "
                      "(more --steps or a larger batch give a smoother curve)")


class RangeTest:
    """Loop callback: sets the lr of each step from the schedule (keeping each parameter group's
    multiplier), records the step's training loss, stops on divergence."""

    def __init__(self, lrs: list[float]):
        self.lrs = lrs
        self.recorded_lrs: list[float] = []
        self.losses: list[float] = []
        self.monitor = DivergenceMonitor()
        self.stopped: str | None = None
        self.scales: list[float] = []

    def _set(self, loop: Loop, k: int) -> None:
        for group, scale in zip(loop.optimizer.param_groups, self.scales):
            group["base_lr"] = self.lrs[k] * scale

    def on_train_begin(self, loop: Loop) -> None:
        # groups may have their own multipliers (LoRA+, layer decay): keep them relative to train.lr
        self.scales = [group["base_lr"] / self.lrs[0] for group in loop.optimizer.param_groups]
        self._set(loop, 0)

    def on_step_end(self, loop: Loop) -> None:
        from ..train.callbacks import StopTraining

        k = loop.state.step  # steps done; step k ran at lrs[k - 1]
        record = loop.last_train_record  # the loop logs every step's loss (log_every=1) before on_step_end
        if record is None or record["step"] != k:
            return
        loss = float(record["loss"])
        self.recorded_lrs.append(self.lrs[k - 1])
        self.losses.append(loss)
        if self.monitor.update(loss):
            self.stopped = (f"lr-find: the loss diverged at lr {self.lrs[k - 1]:.3g} "
                            f"(smoothed loss > {DIVERGE:g}x its minimum)")
            raise StopTraining(self.stopped)
        if k < len(self.lrs):
            self._set(loop, k)


@dataclass
class LRFindResult:
    suggestion: float
    rule: str
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    lr_min_div10: float
    out_dir: Path
    plot: Path | None
    applied_config: Path | None
    stopped: str | None
    note: str = ""


def range_config(base: dict[str, Any], steps: int, start_lr: float, out_dir: str) -> dict[str, Any]:
    """The run that the test trains: constant lr (set per step by RangeTest), loss logged every step,
    one small evaluation at the end, no test set, no checkpoints, in a temporary folder."""
    import copy

    data = copy.deepcopy(base)
    data.pop("sweep", None)
    train = data.setdefault("train", {})
    train.update({"max_steps": steps, "lr": start_lr, "schedule": "constant", "warmup": 0, "log_every": 1})
    # The new head moves with the swept lr at 1x, not at its run-time rate (10x train.lr by default, or an
    # absolute train.head_lr, which RangeTest would scale as head_lr / start_lr). At 10x the head's own
    # overshoot turns the curve up an order of magnitude early: on SST-2 the suggestion fell to 2.9e-4 (a run
    # there: test 77.4) while the sweeps' best trials lie at 1.7e-3 to 2.2e-3; at 1x it is 2.4e-3 (test 79.5).
    # head_lr == lr is a multiplier of 1 for the head and changes no other group's rate.
    train["head_lr"] = start_lr
    train["early_stopping"] = {**(train.get("early_stopping") or {}), "patience": None}
    data["eval"] = {**(data.get("eval") or {}), "every_steps": steps + 1}
    d = data.setdefault("data", {})
    d["test"] = None
    d["max_eval_samples"] = min(d.get("max_eval_samples") or 64, 64)
    data["output"] = {**(data.get("output") or {}), "dir": out_dir, "name": "lr-find", "save_checkpoints": False}
    # the throwaway run is not indexed, measured or logged anywhere
    data["track"] = {**(data.get("track") or {}), "index": False, "energy": False, "mlflow": False,
                     "tensorboard": False}
    return data


def lr_find(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, *, steps: int = 100,
            start_lr: float = 1e-7, end_lr: float = 1.0, out: str | Path | None = None,
            apply: bool = False) -> LRFindResult:
    """Run the LR range test for a config; returns the suggestion and writes the plot (see module doc)."""
    from ..config import load_config
    from ..runner import run
    from ..track import atomic
    from .space import sweep_base

    cfg = load_config(config, overrides)
    lrs = lr_schedule(start_lr, end_lr, steps)
    base = sweep_base(cfg)
    out_dir = Path(out) if out is not None else Path(cfg.output.dir) / f"lr-find-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out_dir / "summary.json").exists() or (out_dir / "adapter").exists():
        raise ConfigError(f"{out_dir} is a run folder; lr-find writes its plot into a folder of its own (--out)")
    if apply and not isinstance(config, (str, Path)):
        raise ConfigError("apply=True needs a config file (the copy is written next to it)")
    tmp = tempfile.mkdtemp(prefix="slimtune-lr-find-")
    test = RangeTest(lrs)
    try:
        run(range_config(base, steps, start_lr, tmp), callbacks=[test])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = suggest(test.recorded_lrs, test.losses)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = _plot(test.recorded_lrs, test.losses, found, out_dir / "lr_find.png")
    applied = _apply(Path(config), overrides, found.lr) if apply else None
    result = LRFindResult(found.lr, found.rule, test.recorded_lrs, test.losses, found.smoothed, found.lr_min_div10,
                          out_dir, plot, applied, test.stopped, found.note)
    atomic.write_json(out_dir / "lr_find.json", {
        "suggestion": found.lr, "rule": found.rule, "lr_min_div10": found.lr_min_div10, "reliable": found.reliable,
        "note": found.note, "stopped": test.stopped, "start_lr": start_lr, "end_lr": end_lr, "steps_planned": steps,
        "steps_run": len(test.losses), "config": str(config) if isinstance(config, (str, Path)) else None,
        "overrides": list(overrides or []), "applied_config": str(applied) if applied else None,
        "lrs": test.recorded_lrs, "losses": test.losses, "smoothed": found.smoothed,
    })
    return result


def _plot(lrs: list[float], losses: list[float], found: Suggestion, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(lrs, losses, color="0.75", lw=1, label="loss per step")
    ax.plot(lrs[:len(found.smoothed)], found.smoothed, color="C0", lw=2, label="smoothed")
    ax.axvline(found.lr, color="C3", ls="--", label=f"suggested lr {found.lr:.2e}")
    ax.axvline(found.lr_min_div10, color="C2", ls=":", label=f"min / 10: {found.lr_min_div10:.2e}")
    ax.set_xscale("log")
    lo = min(found.smoothed)
    ref = max(found.smoothed[: found.smoothed.index(lo) + 1])  # the descending part; the blow-up is cut off
    span = max(ref - lo, 0.05 * abs(lo), 1e-6)
    ax.set_ylim(lo - 0.15 * span, ref + span)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    rule = "steepest descent of the smoothed loss" if found.rule == RULE else "min / 10 (fallback)"
    ax.set_title(f"LR range test: {rule}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _apply(config: Path, overrides: list[str] | None, lr: float) -> Path:
    """`<stem>.lr.yaml` next to the config: the file as written (+ overrides) with train.lr set."""
    import yaml

    from ..config import apply_overrides, load_config
    from ..track import atomic

    data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    if overrides:
        data = apply_overrides(data, overrides)
    rounded = float(f"{lr:.2g}")
    data.setdefault("train", {})["lr"] = rounded
    path = config.with_name(f"{config.stem}.lr.yaml")
    text = (f"# {config.name} with train.lr={rounded:g} suggested by `slimtune lr-find` ({RULE.split(':')[0]})\n"
            + yaml.safe_dump(data, sort_keys=False))
    atomic.write_text(path, text)
    load_config(path)  # it must load as it is
    return path
