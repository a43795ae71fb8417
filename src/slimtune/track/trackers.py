"""Optional external trackers, off by default: MLflow and TensorBoard.

Each is a sink: it receives every record written to metrics.jsonl (train / eval / test) and,
at the end, the summary. They are fed from the main process only. A tracker that cannot
be imported fails the run before training with the install line; one that fails while
logging is switched off with a warning rather than failing the run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .runinfo import flat

MISSING = "{what} is not installed; pip install 'slimtune[track]' (or set track.{key}: false)"


def _numbers(record: dict) -> dict[str, float]:
    """A metrics.jsonl record -> flat scalar series names: train/loss, train/lr/<group>, eval/accuracy, test/loss."""
    kind = record.get("type", "train")
    out = {}
    for k, v in record.items():
        if k in ("type", "step", "epoch", "best"):
            continue
        if isinstance(v, dict):
            for g, x in v.items():
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    out[f"{kind}/{k}/{g}"] = float(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            name = k.removeprefix(f"{kind}_")
            out[f"{kind}/{name}"] = float(v)
    return out


def _final_numbers(summary: dict) -> dict[str, float]:
    out = {}
    cost = summary.get("cost") or {}
    for k in ("wall_seconds", "cpu_seconds", "gpu_seconds", "train_seconds", "flops", "energy_kwh", "co2_kg",
              "host_peak_rss_mb", "device_peak_mb", "samples_seen", "tokens_seen"):
        if isinstance(cost.get(k), (int, float)):
            out[f"cost/{k}"] = float(cost[k])
    for part in ("best", "test"):
        for k, v in (summary.get(part) or {}).items():
            if isinstance(v, (int, float)):
                out[f"{part}/{k}"] = float(v)
    if isinstance(summary.get("trainable_share"), (int, float)):
        out["trainable_share"] = float(summary["trainable_share"])
    return out


class MlflowSink:
    """Params (the flat config), per-step metrics, final cost, config / summary as artifacts.

    The default store is MLflow's local file store, `file:<output.dir>/mlruns`. MLflow 3
    keeps that store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which is set for
    this process when the URI is a file store; give a `sqlite:///...` URI for its database store."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, config: dict, run_id: str | None = None):
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ImportError(MISSING.format(what="mlflow", key="mlflow")) from None
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None and self._resume(run_id):  # a resumed run continues its MLflow run
            return
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                             tags={"slimtune.run_name": run_name}).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flat(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _resume(self, run_id: str) -> bool:
        """Continue the MLflow run of the run folder's earlier session; if that run is gone (another tracking
        URI, a deleted or unreachable store), say so: the metrics then go to a new MLflow run."""
        from ..sweep.storage import mask_url

        try:
            self.client.get_run(run_id)
        except Exception as e:
            what, err = f"was not found in {mask_url(self.uri)}", e
        else:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return True
            except Exception as e:
                what, err = "could not be reopened", e
        detail = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"[tracking warning] mlflow: the MLflow run {run_id} of this run's earlier session {what} "
              f"({type(err).__name__}: {detail}); logging this session to a new MLflow run", file=sys.stderr)
        return False

    def __call__(self, record: dict) -> None:
        import time

        from mlflow.entities import Metric

        ts, step = int(time.time() * 1000), int(record.get("step", 0))
        metrics = [Metric(k, v, ts, step) for k, v in _numbers(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict, run_dir: Path) -> None:
        import time

        from mlflow.entities import Metric

        ts, step = int(time.time() * 1000), int(summary.get("steps") or summary.get("step") or 0)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in _final_numbers(summary).items()])
        energy = (summary.get("cost") or {}).get("energy") or {}
        if energy.get("method"):
            self.client.set_tag(self.run_id, "slimtune.energy_method", energy["method"])
        self.client.set_tag(self.run_id, "slimtune.status", summary.get("status", ""))
        self.client.set_tag(self.run_id, "slimtune.run_dir", str(run_dir))
        for f in ("config.yaml", "summary.json"):
            if (run_dir / f).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / f))
        ended = {"completed": "FINISHED", "interrupted": "KILLED", "paused": "KILLED"}
        status = ended.get(summary.get("status"), "FAILED")
        self.client.set_terminated(self.run_id, status=status)


class TensorBoardSink:
    """Scalars per step (train/loss, train/lr/<group>, eval/<metric>, test/<metric>), the final cost,
    the config as text."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, config_yaml: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(MISSING.format(what="tensorboard", key="tensorboard")) from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=30)
        self.writer.add_text("config", "```yaml\n" + config_yaml + "\n```", 0)

    def __call__(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for k, v in _numbers(record).items():
            self.writer.add_scalar(k, v, step)

    def finish(self, summary: dict, run_dir: Path) -> None:
        step = int(summary.get("steps") or summary.get("step") or 0)
        for k, v in _final_numbers(summary).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        self.writer.close()


def open_sinks(cfg, run_dir: Path, config_yaml: str, previous_ids: dict | None = None) -> list:
    """The trackers the config turns on (raises ImportError naming the install line)."""
    t, sinks = cfg.track, []
    if t.mlflow:
        uri = t.mlflow_uri or "file:" + str((Path(cfg.output.dir) / "mlruns").resolve())
        sinks.append(MlflowSink(uri, t.mlflow_experiment, run_dir.name, cfg.model_dump(mode="json"),
                                (previous_ids or {}).get("mlflow_run_id")))
    if t.tensorboard:
        # a shared folder gets one subfolder per run, so TensorBoard shows them side by side
        sinks.append(TensorBoardSink(Path(t.tensorboard_dir) / run_dir.name if t.tensorboard_dir
                                     else run_dir / "tensorboard", config_yaml))
    return sinks


def safe_call(sinks: list, fn_name: str, *args) -> list:
    """Call each sink; one that raises is dropped with a warning (the run goes on)."""
    kept = []
    for s in sinks:
        try:
            getattr(s, fn_name)(*args)
            kept.append(s)
        except Exception as e:
            print(f"[tracking warning] {s.name} failed and is switched off for this run: {type(e).__name__}: {e}",
                  file=sys.stderr)
    return kept
