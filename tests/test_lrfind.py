"""`slimtune lr-find`: the suggestion rule and the divergence stop on synthetic loss curves, then the
range test on a tiny random model (the lr the loop really used, the plot, --apply, nothing else written)."""
from __future__ import annotations

import json
import math
import random

import pytest
import yaml
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.sweep.lrfind import (FALLBACK_RULE, RULE, DivergenceMonitor, RangeTest, lr_schedule, range_config, smooth,
                                   suggest)

from conftest import cls_config

runner = CliRunner(env={"COLUMNS": "200"})


def synthetic_curve(lrs, center=1e-3, width=0.25, blow_up=0.05, noise=0.02, seed=0):
    """Flat, then a sigmoid drop centred at `center` (steepest there), then a blow-up above `blow_up`."""
    rng = random.Random(seed)
    out = []
    for lr in lrs:
        x = math.log10(lr)
        loss = 2.0 - 1.2 / (1 + math.exp(-(x - math.log10(center)) / width))
        if lr > blow_up:
            loss += (3 * (x - math.log10(blow_up))) ** 2
        out.append(loss + rng.gauss(0, noise))
    return out


def test_schedule_is_geometric():
    lrs = lr_schedule(1e-7, 1.0, 100)
    assert len(lrs) == 100 and lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios)) == pytest.approx(10 ** (7 / 99))
    with pytest.raises(ValueError, match="0 < start_lr < end_lr"):
        lr_schedule(1e-2, 1e-3, 100)
    with pytest.raises(ValueError, match="at least 5 steps"):
        lr_schedule(1e-7, 1, 3)


@pytest.mark.parametrize("center", [1e-4, 1e-3, 3e-3])
def test_suggestion_is_the_steepest_descent_of_the_smoothed_loss(center):
    lrs = lr_schedule(1e-7, 1.0, 200)
    losses = synthetic_curve(lrs, center=center)
    s = suggest(lrs, losses)
    assert s.rule == RULE and s.reliable and "steepest descent" in s.rule
    assert abs(math.log10(s.lr) - math.log10(center)) < 0.2, (s.lr, center)  # within a factor 1.6
    # a one-sided (lagging) EMA, written out here, would put the steepest point at a higher lr;
    # the zero-lag one does not
    import numpy as np

    avg, lagging = 0.0, []
    for i, v in enumerate(losses, 1):
        avg = 0.8 * avg + 0.2 * v
        lagging.append(avg / (1 - 0.8 ** i))
    x = np.log10(lrs)
    lagged = lrs[int(np.argmin(np.gradient(np.asarray(lagging), x)[: int(np.argmin(lagging))]))]
    assert math.log10(lagged) - math.log10(center) > abs(math.log10(s.lr) - math.log10(center))


@pytest.mark.parametrize("lowest", [1e-5, 1e-2])
def test_lowest_loss_rule_on_a_curve_with_a_known_minimum(lowest):
    """The other rule of thumb, reported alongside: the lr of the lowest loss / 10. On a parabola in log lr with its
    minimum at `lowest`, that is lowest / 10 (to the grid's resolution: 7 decades in 199 steps)."""
    lrs = lr_schedule(1e-7, 1.0, 200)
    s = suggest(lrs, [1.0 + (math.log10(lr) - math.log10(lowest)) ** 2 for lr in lrs])
    assert abs(math.log10(s.lr_min_div10) - math.log10(lowest / 10)) <= 7 / 199 / 2 + 1e-9, s.lr_min_div10


def test_divergence_stops_the_range_test():
    lrs = lr_schedule(1e-7, 10.0, 200)
    losses = synthetic_curve(lrs)
    mon = DivergenceMonitor()
    stop = next(i for i, loss in enumerate(losses) if mon.update(loss))
    assert 0.05 < lrs[stop] < 10.0  # after the loss starts to blow up, before the end
    assert DivergenceMonitor().update(float("nan"))
    # the suggestion from what was recorded up to the stop
    assert abs(math.log10(suggest(lrs[: stop + 1], losses[: stop + 1]).lr) + 3) < 0.2


def test_flat_or_broken_curves():
    lrs = lr_schedule(1e-7, 1.0, 100)
    flat = [1.0 + 0.001 * math.sin(i) for i in range(100)]
    s = suggest(lrs, flat)
    assert s.rule == FALLBACK_RULE and not s.reliable and "rough guess" in s.note
    curve = synthetic_curve(lrs)
    curve[60:] = [float("nan")] * 40  # the loss went NaN: the suggestion uses what came before
    assert len(suggest(lrs, curve).smoothed) == 60
    with pytest.raises(ValueError, match="need at least 5"):
        suggest(lrs, [1.0, 0.9, float("inf")] + [1.0] * 97)
    assert smooth([1.0] * 10) == pytest.approx([1.0] * 10)


class _LrSeen:
    def __init__(self):
        self.lrs = []

    def on_step_end(self, loop):
        self.lrs.append([g["lr"] for g in loop.optimizer.param_groups])


@pytest.mark.parametrize("train,method,mults", [({}, "lora", [1.0]), ({"head_lr": 5e-2}, "lora", [1.0]),
                                                ({}, "lora-plus", [1.0, 16.0])],
                         ids=["default-head-lr", "explicit-head-lr", "lora-plus"])
def test_range_test_sets_the_lr_of_every_step(tiny_bert, cls_data, tmp_path, train, method, mults):
    import slimtune

    cfg = cls_config(tiny_bert, cls_data, tmp_path / "runs", **train)
    cfg["method"]["name"] = method
    lrs = lr_schedule(1e-4, 1.0, 30)
    test, seen = RangeTest(lrs), _LrSeen()
    data = range_config(cfg, 30, 1e-4, str(tmp_path / "tmp"))
    assert data["train"]["schedule"] == "constant" and data["data"]["test"] is None and "sweep" not in data
    result = slimtune.run(data, callbacks=[test, seen])
    n = len(test.losses)
    # the losses recorded are the ones the loop logged, step by step
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert test.losses == [r["loss"] for r in records if r["type"] == "train"][:n]
    m = min(n, len(seen.lrs))  # the range test may end the run at the last step, before _LrSeen sees it
    assert n >= 10 and m >= n - 1
    # what the optimizer really used: the schedule, 1e-4 x (1e4)^(i/29) at step i; and each loss is recorded with it
    by_hand = [1e-4 * 10 ** (4 * i / 29) for i in range(m)]
    assert [min(row) for row in seen.lrs[:m]] == pytest.approx(by_hand)
    assert test.recorded_lrs[:m] == pytest.approx([min(row) for row in seen.lrs[:m]])
    # every parameter group follows the swept lr at its own multiplier, kept constant (LoRA+'s 16x for B); the new
    # head at 1x: neither its default 10x nor an absolute train.head_lr (head_lr / start_lr would be 500x here)
    ratios = [[x / min(row) for x in row] for row in seen.lrs]
    assert len(ratios[0]) > 1 and all(r == pytest.approx(ratios[0]) for r in ratios)
    assert sorted(set(round(x, 6) for x in ratios[0])) == mults
    assert all(math.isfinite(loss) for loss in test.losses[:5])


def test_lr_find_cli_writes_plot_and_applied_config_only(tiny_bert, cls_data, tmp_path):
    cfg = cls_config(tiny_bert, cls_data, tmp_path / "runs")
    cfg_path = tmp_path / "tune.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    original = cfg_path.read_text()
    out = tmp_path / "lrf"
    res = runner.invoke(app, ["lr-find", str(cfg_path), "train.batch_size=8", "--steps", "40", "--start-lr", "1e-5",
                              "--end-lr", "3", "--out", str(out), "--apply"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout[res.stdout.index("{"):])
    assert "suggested lr" in res.output and "(rule: " in res.output  # the rule is stated with the suggestion
    rec = json.loads((out / "lr_find.json").read_text())
    # the lrs tested: 1e-5 x (3 / 1e-5)^(i/39), and the suggestion is within them
    n = rec["steps_run"]
    assert 5 <= n <= 40 and len(rec["losses"]) == n
    assert rec["lrs"] == pytest.approx([1e-5 * (3 / 1e-5) ** (i / 39) for i in range(n)])
    assert rec["suggestion"] == printed["suggested_lr"] and 1e-5 <= rec["suggestion"] <= rec["lrs"][-1]
    # the rule stated with the suggestion is the one recorded, one of the two documented ones
    said = " ".join(res.output.split())
    assert f"suggested lr: {rec['suggestion']:.3g} (rule: {' '.join(rec['rule'].split())})" in said
    assert rec["rule"].startswith(("steepest descent of the smoothed loss", "the lr of the lowest smoothed loss / 10"))
    assert (out / "lr_find.png").stat().st_size > 5000
    applied = tmp_path / "tune.lr.yaml"
    assert printed["applied_config"] == str(applied)
    new = yaml.safe_load(applied.read_text())
    assert new["train"]["lr"] == float(f"{rec['suggestion']:.2g}") and new["train"]["batch_size"] == 8
    assert new["model"] == cfg["model"] and new["data"] == cfg["data"]
    res = runner.invoke(app, ["validate", str(applied)])
    assert res.exit_code == 0, res.output
    # the config is untouched and no run folder was written
    assert cfg_path.read_text() == original
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
