"""Cost and energy: codecarbon offline with the measuring method stated, the grid from config /
environment / world average, FLOPs, resumed runs summing their sessions, and the optional
MLflow / TensorBoard trackers writing to their local stores."""
from __future__ import annotations

import json
import sys

import pytest
import torch

import slimtune
from slimtune.config import ConfigError, load_config
from slimtune.track.cost import accumulate, matmul_params, training_flops
from slimtune.track.energy import EnergyMeter, grid

from conftest import cls_config, sentiment_rows, write_csv

KNOWN_CPU_METHODS = {"RAPL", "TDP estimate", "Intel Power Gadget", "powermetrics", "Windows EMI"}


def measure(**kw) -> dict:
    meter = EnergyMeter(measure_secs=1.0, **kw)
    meter.start()
    x = torch.randn(256, 256)
    for _ in range(40):
        x = torch.tanh(x @ x.T / 256)
    return meter.stop()


def test_energy_is_measured_and_says_how(monkeypatch):
    monkeypatch.delenv("SLIMTUNE_COUNTRY", raising=False)
    monkeypatch.delenv("SLIMTUNE_REGION", raising=False)
    e = measure()
    assert e.get("error") is None, e
    assert e["energy_kwh"] > 0 and e["co2_kg"] > 0 and e["duration_s"] > 0
    assert e["energy_kwh"] == pytest.approx(e["cpu_kwh"] + e["gpu_kwh"] + e["ram_kwh"], rel=1e-6)
    assert e["methods"]["cpu"] in KNOWN_CPU_METHODS and e["methods"]["cpu"] in e["method"]
    if torch.cuda.is_available():
        assert e["methods"]["gpu"].startswith("GPU power")
    # no country anywhere: the world-average intensity, and the result says so
    assert e["country"] is None and "world average" in e["carbon_intensity_source"]
    assert e["carbon_intensity_g_per_kwh"] == pytest.approx(475.0, rel=1e-3)
    assert e["tool"].startswith("codecarbon ")


def test_grid_from_environment_config_and_override(monkeypatch):
    monkeypatch.setenv("SLIMTUNE_COUNTRY", "fra")
    e = measure()
    assert e["country"] == "FRA" and "FRA" in e["carbon_intensity_source"]
    assert 10 < e["carbon_intensity_g_per_kwh"] < 200  # France's grid is mostly nuclear
    assert grid("USA", "california", None) == {"country": "USA", "region": "california", "forced_intensity": None,
                                               "intensity_source": "grid mix of USA / california"}
    e = measure(country="DEU", carbon_intensity=123.0)
    assert e["carbon_intensity_g_per_kwh"] == pytest.approx(123.0, rel=1e-3)
    assert e["carbon_intensity_source"] == "track.carbon_intensity"
    with pytest.raises(ConfigError, match="track.country"):
        load_config({"task": "causal-lm", "model": {"name": "m"}, "data": {"train": "t.txt"},
                     "track": {"country": "France"}})
    assert load_config({"task": "causal-lm", "model": {"name": "m"}, "data": {"train": "t.txt"},
                        "track": {"country": "deu"}}).track.country == "DEU"


def test_missing_codecarbon_is_reported_not_fatal(monkeypatch):
    monkeypatch.setitem(sys.modules, "codecarbon", None)  # import fails
    e = measure()
    assert e["energy_kwh"] is None and "codecarbon is not installed" in e["error"]


def test_flops_estimate_counts_matmul_weights():
    lin = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    lin[3].weight = torch.nn.Parameter(torch.randn(10, 8))
    for p in lin[1].parameters():
        p.requires_grad_(False)
    n, n_train = matmul_params(lin)
    assert (n, n_train) == (4 * 8 + 8 * 10, 8 * 10)  # embeddings are lookups, not matmuls
    assert training_flops(n, n_train, 1000) == 1000 * (4 * n + 2 * n_train)
    assert training_flops(n, n, 1) == 6 * n  # everything trainable: the familiar 6 N per token


def test_resumed_cost_adds_sessions():
    first = {"wall_seconds": 10.0, "cpu_seconds": 8.0, "gpu_seconds": 0.0, "host_peak_rss_mb": 900.0, "sessions": 1,
             "energy": {"energy_kwh": 0.5, "co2_kg": 0.2, "cpu_kwh": 0.3, "gpu_kwh": 0.0, "ram_kwh": 0.2,
                        "duration_s": 9.0}}
    second = {"wall_seconds": 5.0, "cpu_seconds": 4.0, "gpu_seconds": 0.0, "host_peak_rss_mb": 700.0, "sessions": 1,
              "energy": {"energy_kwh": 0.25, "co2_kg": 0.1, "cpu_kwh": 0.15, "gpu_kwh": 0.0, "ram_kwh": 0.1,
                         "duration_s": 4.0}}
    total = accumulate(second, first)
    assert total["wall_seconds"] == 15.0 and total["cpu_seconds"] == 12.0 and total["host_peak_rss_mb"] == 900.0
    assert total["energy_kwh"] == 0.75 and total["co2_kg"] == pytest.approx(0.3) and total["sessions"] == 2
    assert total["energy"]["carbon_intensity_g_per_kwh"] == pytest.approx(400.0)


class _Interrupt:
    def on_step_end(self, loop):
        if loop.state["step"] == 3:
            raise KeyboardInterrupt


def test_trackers_write_to_local_stores_and_resume_sums_cost(tiny_bert, tmp_path):
    """A run with MLflow + TensorBoard on, interrupted and resumed: both stores hold its metrics,
    the MLflow run is continued, the cost of both sessions is summed, the index follows."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    data = {"train": str(write_csv(tmp_path / "train.csv", sentiment_rows(96, 0)))}
    cfg = cls_config(tiny_bert, data, tmp_path / "runs", max_steps=6, log_every=1)
    cfg["eval"] = {"every_steps": 2}
    cfg["track"] = {"mlflow": True, "tensorboard": True, "country": "SWE"}
    with pytest.raises(KeyboardInterrupt):
        slimtune.run(cfg, callbacks=[_Interrupt()])
    run_dir = tmp_path / "runs" / "run"
    first = json.loads((run_dir / "summary.json").read_text())
    assert first["status"] == "interrupted" and first["cost"]["energy"]["energy_kwh"] > 0
    from slimtune.track import index

    assert index.find(tmp_path / "runs", "run")["status"] == "interrupted"

    result = slimtune.run(None, resume=run_dir)
    s = result.summary
    assert s["status"] == "completed" and s["cost"]["sessions"] == 2
    assert s["cost"]["energy_kwh"] > first["cost"]["energy_kwh"]
    assert s["cost"]["wall_seconds"] > first["cost"]["wall_seconds"]
    assert s["cost"]["energy"]["country"] == "SWE" and s["started_at"] == first["started_at"]
    assert s["trackers"]["mlflow_run_id"] == first["trackers"]["mlflow_run_id"]
    row = index.find(tmp_path / "runs", "run")
    assert row["status"] == "completed" and row["energy_kwh"] == pytest.approx(s["cost"]["energy_kwh"])

    # MLflow: the local file store under output.dir
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="file:" + str((tmp_path / "runs" / "mlruns").resolve()))
    mrun = client.get_run(s["trackers"]["mlflow_run_id"])
    assert mrun.info.status == "FINISHED" and mrun.data.params["method.r"] == "4"
    assert mrun.data.tags["slimtune.status"] == "completed" and mrun.data.tags["slimtune.energy_method"]
    steps = sorted({m.step for m in client.get_metric_history(mrun.info.run_id, "train/loss")})
    assert steps == [1, 2, 3, 4, 5, 6]
    assert client.get_metric_history(mrun.info.run_id, "eval/accuracy")
    assert mrun.data.metrics["cost/energy_kwh"] == pytest.approx(s["cost"]["energy_kwh"])
    assert {a.path for a in client.list_artifacts(mrun.info.run_id)} >= {"config.yaml", "summary.json"}

    # TensorBoard: event files in the run folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, tags = set(), set()
    for f in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        ea = EventAccumulator(str(f))
        ea.Reload()
        tags |= set(ea.Tags()["scalars"])
        if "train/loss" in ea.Tags()["scalars"]:
            steps |= {e.step for e in ea.Scalars("train/loss")}
    assert {"train/loss", "train/lr/decay", "eval/accuracy", "eval/loss", "cost/energy_kwh"} <= tags
    assert steps == {1, 2, 3, 4, 5, 6}
