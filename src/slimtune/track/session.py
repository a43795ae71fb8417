"""Everything that follows a run beside the training loop, behind a few calls in `runner.run()`'s phases:

    tracking = RunTracking(cfg, files, accelerator, resumed)  # the run folder exists; trackers are importable
    callbacks.insert(0, tracking)                   # evaluations: index progress, confusion matrix
    base = tracking.begin(base)                     # training starts: index 'running', energy + clocks on
    summary = tracking.end(summary, loop)           # completed / interrupted / failed: cost into the summary

`begin` registers the run in `<output.dir>/index.sqlite` and starts codecarbon; `end` stops it,
adds the `cost` block (time, memory, data seen, FLOPs, energy, CO2) and the start / end times
to the summary, updates the index and closes MLflow / TensorBoard. Only the main process
measures and writes. Tracking never fails a finished run: its own errors become warnings.
"""
from __future__ import annotations

import importlib.util
import os
import resource
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..tasks import task_spec
from . import atomic
from .cost import FLOPS_FORMULA, CostClock, accumulate, matmul_params, training_flops
from .energy import EnergyMeter
from .runinfo import config_hash
from .trackers import MISSING, open_sinks, safe_call

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..config import RunConfig
    from ..train.loop import Loop
    from .rundir import RunDir


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _warn(msg: str) -> None:
    print(f"[tracking warning] {msg}", file=sys.stderr)


def peak_memory() -> dict:
    out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def index_root(cfg: RunConfig) -> Path:
    """Where the run's index lives: its output.dir; a sweep's trial goes to the index of the
    sweep's own output root (the sweep folder's parent), beside the sweep's row."""
    return Path(cfg.track.sweep).parent if cfg.track.sweep else Path(cfg.output.dir)


class RunTracking:
    def __init__(self, cfg: RunConfig, files: RunDir, accelerator: Accelerator, resumed: bool = False):
        self.cfg, self.files, self.accelerator = cfg, files, accelerator
        self.t = cfg.track
        self.main = accelerator.is_main_process
        self.config = cfg.model_dump(mode="json")
        self.config_hash = config_hash(self.config)
        self.previous: dict = {}
        if resumed and (files.path / "summary.json").is_file():
            try:
                self.previous = files.read_json("summary.json")
            except ValueError as e:  # said, not silent: the earlier sessions' cost is lost from the totals
                _warn(f"{files.path / 'summary.json'} is damaged ({e}); this run's cost will count from this session "
                      "on, without the earlier sessions' time and energy")
                self.previous = {}
            if not isinstance(self.previous, dict):
                _warn(f"{files.path / 'summary.json'} holds no summary object; "
                      "the earlier sessions' cost is not counted")
                self.previous = {}
        self.started_at = self.previous.get("started_at") or _now()
        self.meter: EnergyMeter | None = None
        # wall / CPU time from here (the run folder exists, the model is about to load); energy from begin()
        self.clock = CostClock(accelerator.num_processes if accelerator.device.type == "cuda" else 0)
        self.sinks: list = []
        self.confusion: dict = {}
        self.figures: dict = {}  # eval_figures.json
        self.base: dict = {}
        self.final: dict | None = None  # the summary end() wrote
        for on, mod, key in ((self.t.mlflow, "mlflow", "mlflow"), (self.t.tensorboard, "tensorboard", "tensorboard")):
            if on and importlib.util.find_spec(mod) is None:  # before any training, with the install line
                raise ImportError(MISSING.format(what=mod, key=key))

    # -- start -------------------------------------------------------------------
    def begin(self, base_summary: dict) -> dict:
        """Training starts: returns the base summary with the run's identity (hash, start, process)."""
        base = {**base_summary, "config_hash": self.config_hash, "started_at": self.started_at,
                "pid": os.getpid(), "host": socket.gethostname()}
        self.base = base
        if not self.main:
            return base
        if self.t.energy:
            self.meter = EnergyMeter(self.t.country, self.t.region, self.t.carbon_intensity, self.t.measure_secs,
                                     machine_wide=self.accelerator.num_processes > 1)
            self.meter.start()
        try:
            config_text = (self.files.path / "config.yaml").read_text(encoding="utf-8")
            self.sinks = open_sinks(self.cfg, self.files.path, config_text, self.previous.get("trackers"))
        except Exception as e:
            _warn(f"external trackers not opened: {type(e).__name__}: {e}")
        if self.sinks:
            self.files.sinks.append(self._to_sinks)
        self._index({"status": "running", **base})
        return base

    def _to_sinks(self, record: dict) -> None:
        self.sinks = safe_call(self.sinks, "__call__", record)

    def _index(self, summary: dict) -> None:
        if not (self.main and self.t.index):
            return
        from . import index

        root = index_root(self.cfg)
        try:
            index.register_run(root, self.files.path, self.config, summary)
        except Exception as e:  # a locked / read-only index must not stop training
            _warn(f"run index {index.index_file(root)} not updated: {type(e).__name__}: {e}")

    # -- loop events -------------------------------------------------------------
    def on_eval_end(self, loop: Loop, metrics: dict) -> None:
        state = loop.state
        if state.best_step == state.step:  # improved
            self._confusion("eval", loop)
            self._index({"status": "running", "step": state.step, "monitor": self.cfg.monitor,
                         "best": state.best_metrics, "config_hash": self.config_hash, "started_at": self.started_at,
                         "pid": os.getpid(), "host": socket.gethostname()})
        if self.main:
            try:
                atomic.write_json(self.files.path / "summary.json", self.progress(loop))
            except Exception as e:  # measuring must not stop training
                _warn(f"cost so far not recorded: {type(e).__name__}: {e}")

    def progress(self, loop: Loop) -> dict:
        """summary.json while training (status running) with the cost so far of all sessions, this one included:
        written when training starts and at each evaluation (after its checkpoint). A session that is killed (kill -9,
        a lost machine) never reaches end(); the resume reads this cost as the previous sessions', so the killed
        one counts once, up to its last checkpoint (its energy, which codecarbon gives only when stopped, does not),
        and a kill before the first checkpoint keeps the earlier sessions' cost."""
        cost = accumulate({**self._session_cost(loop), "sessions": 1}, self.previous.get("cost"))
        return {"status": "running", **self.base, "step": loop.state.step, "cost": cost}

    def on_test_end(self, loop: Loop, metrics: dict) -> None:
        """After the test set was evaluated with the best checkpoint."""
        self._confusion("test", loop)

    def _confusion(self, split: str, loop: Loop) -> None:
        """confusion_matrix.json and eval_figures.json from the last evaluation's per-example outputs."""
        if not (self.main and loop.last_parts):
            return
        matrix = loop.task.confusion_matrix(loop.last_parts, loop.num_labels)
        meta = self._meta()
        figures = loop.task.eval_figures(loop.last_parts, meta)
        step = loop.state.best_step if split == "test" else loop.state.step  # test: the best checkpoint
        if matrix is not None:
            self.confusion = self._kept("confusion_matrix.json", self.confusion)
            self.confusion["labels"] = meta.get("labels")
            self.confusion[split] = {"step": step, "matrix": matrix,
                                     "rows": "true label", "columns": "predicted label"}
            self.files.write_json("confusion_matrix.json", self.confusion)
        if figures:
            self.figures = self._kept("eval_figures.json", self.figures)
            self.figures[split] = {"step": step, "figures": figures}
            self.files.write_json("eval_figures.json", self.figures)

    def _meta(self) -> dict:
        try:
            return self.files.read_json("meta.json") if (self.files.path / "meta.json").is_file() else {}
        except ValueError:
            return {}

    def _kept(self, name: str, held: dict) -> dict:
        """What this session holds, else the file's blocks: a resumed run keeps the eval block of its best step."""
        if held or not (self.files.path / name).is_file():
            return held
        try:
            kept = self.files.read_json(name)
        except ValueError:
            return held
        return kept if isinstance(kept, dict) else held

    # -- end -----------------------------------------------------------------------
    def end(self, summary: dict, loop: Loop | None = None) -> dict:
        """Final summary of this session: with `cost`, start / end times; index and trackers updated."""
        if self.final is not None:  # written already (an interrupt after the end): that summary stands
            return self.final
        try:
            summary = self._finish(summary, loop)
        except Exception as e:  # measuring must not hide the run's own result or error
            _warn(f"cost not recorded: {type(e).__name__}: {e}")
        self.final = summary
        return summary

    def _session_cost(self, loop: Loop | None) -> dict:
        """This session's time and memory; data seen and FLOPs of the whole run (the loop state carries them)."""
        clock = self.clock.read()
        state = loop.state if loop is not None else None
        cost = {**clock, **peak_memory(), "train_seconds": state.train_seconds if state else None,
                "samples_seen": state.samples if state else None, "tokens_seen": state.tokens if state else None}
        if loop is not None and task_spec(self.cfg.task).inputs != "tokens":  # images: FLOPs are not tokens x weights
            cost.update(flops=None, flops_formula=f"not estimated for {self.cfg.task} (the formula counts text tokens)")
        elif loop is not None:
            n, n_train = matmul_params(self.accelerator.unwrap_model(loop.model))
            cost.update(flops=training_flops(n, n_train, state.tokens or 0), flops_formula=FLOPS_FORMULA,
                        matmul_params=n, matmul_params_trainable=n_train)
        return cost

    def _finish(self, summary: dict, loop: Loop | None) -> dict:
        cost = self._session_cost(loop)
        if self.meter is not None:
            energy = self.meter.stop()
            cost["energy"] = energy
            cost["energy_kwh"], cost["co2_kg"] = energy.get("energy_kwh"), energy.get("co2_kg")
        cost["sessions"] = 1
        cost = accumulate(cost, self.previous.get("cost"))
        out = {**summary, "config_hash": self.config_hash, "started_at": self.started_at, "ended_at": _now(),
               "cost": cost}
        if self.sinks:
            ids = {f"{s.name}_run_id": s.run_id for s in self.sinks if hasattr(s, "run_id")}
            if ids:
                out["trackers"] = ids
        if self.main:
            if self._to_sinks in self.files.sinks:
                self.files.sinks.remove(self._to_sinks)
            # the summary is on disk before MLflow copies it as an artifact
            atomic.write_json(self.files.path / "summary.json", out)
            self.sinks = safe_call(self.sinks, "finish", out, self.files.path)
            self._index(out)
            e = cost.get("energy") or {}
            if e.get("energy_kwh") is not None and out.get("status") == "completed":
                where = e["country"] or "world average"
                self.accelerator.print(f"energy: {e['energy_kwh']:.3g} kWh, {e['co2_kg']:.3g} kg CO2e "
                                       f"({e['method']}; grid: {where})")
            elif e.get("error"):
                _warn(f"energy not measured: {e['error']}")
        return out
