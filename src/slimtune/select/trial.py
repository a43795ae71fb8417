"""One trial of the race: a normal `run()` of the user's config with the candidate's model and method and the
rung's share of the data and steps, in its own run folder under `<select>/trials/`; or, when that folder already
holds a finished run of the same config, its summary read back (a killed select resumes without rerunning).

The folder name holds a hash of the trial's config: a changed base config gets new folders, and a completed
folder is always the trial it is named for.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.sweep_keys import trial_config
from ..errors import SlimtuneError
from ..track.runinfo import RunFolderError, read_run
from .plan import Candidate, SelectPlan

if TYPE_CHECKING:
    from ..train.loop import Loop

Log = Callable[[str], Any]
LATENCY_FILE = "latency.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def trial_data(plan: SelectPlan, candidate: Candidate, rung: int) -> dict[str, Any]:
    """The trial's run config: the base with model.name and method.name set (as a sweep's trial sets a sampled
    method: the options the config gives that the candidate's method has are kept) and the rung's
    data.max_train_samples / train.max_steps."""
    params: dict[str, Any] = {"method.name": candidate.method, "model.name": candidate.model}
    samples, steps = plan.samples(rung), plan.steps(rung)
    if samples is not None:
        params["data.max_train_samples"] = samples
    if steps is not None:
        params["train.max_steps"] = steps
    return trial_config(plan.base, params)


def trial_name(plan: SelectPlan, candidate: Candidate, rung: int) -> str:
    data = trial_data(plan, candidate, rung)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
    return f"r{rung}-{candidate.slug()}-{digest}"


def run_config(plan: SelectPlan, candidate: Candidate, rung: int) -> dict[str, Any]:
    """trial_data placed in the select folder: its run folder under trials/, filed under the select folder in the
    run index (as a sweep's trials are)."""
    data = trial_data(plan, candidate, rung)
    data["output"] = {**(data.get("output") or {}), "dir": str(plan.select_dir / "trials"),
                      "name": trial_name(plan, candidate, rung)}
    data["track"] = {**(data.get("track") or {}), "sweep": str(plan.select_dir)}
    return data


class LatencyProbe:
    """Loop callback: once the best weights are loaded, the forward time per example on the first few eval
    examples, one at a time after one warm-up forward, written to the run folder's latency.json. It runs inside
    the trial, where the model and its inputs are already built, for every task alike (the task's own eval_step)."""

    def __init__(self, examples: int):
        self.examples = examples

    def on_best_loaded(self, loop: Loop) -> None:
        from ..train.loop import eval_parts

        examples = loop.data.eval_examples[: self.examples]
        if not examples or not loop.accelerator.is_main_process:
            return
        model = loop.accelerator.unwrap_model(loop.model)
        device = loop.accelerator.device
        eval_parts(model, loop.task, loop.data.collate, examples, [[0]], device, loop.accelerator.autocast)
        if device.type == "cuda":
            import torch

            torch.cuda.synchronize(device)
        started = time.perf_counter()
        eval_parts(model, loop.task, loop.data.collate, examples, [[i] for i in range(len(examples))], device,
                   loop.accelerator.autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - started) / len(examples)
        loop.run.write_json(LATENCY_FILE, {"seconds_per_example": seconds, "examples": len(examples),
                                           "batch_size": 1, "device": str(device)})


def run_trial(plan: SelectPlan, candidate: Candidate, rung: int, log: Log) -> dict[str, Any]:
    """The trial's row: its finished folder read back, else the run (resumed where an interrupt left a checkpoint).
    A trial that fails is a row with its error; an interrupt propagates (the run saved its checkpoint)."""
    from ..runner import run

    path = plan.select_dir / "trials" / trial_name(plan, candidate, rung)
    status = _status(path)
    if status == "completed":
        return trial_row(plan, candidate, rung, path, reused=True)
    probe = [LatencyProbe(plan.latency_examples)]
    try:
        # interrupted (Ctrl-C), or killed outright (its summary still says running): on from its checkpoint
        if status in ("interrupted", "running") and (path / "checkpoints" / "last").is_dir():
            log(f"[select] {candidate.label} rung {rung}: resuming {path}")
            result = run(None, resume=path, callbacks=probe)
        else:
            if path.exists():  # a start that never trained or that failed: nothing of it is kept
                shutil.rmtree(path)
            log(f"[select] {candidate.label} rung {rung}: training on {plan.samples(rung) or plan.train_samples} "
                f"examples" + (f", {plan.steps(rung)} steps" if plan.steps(rung) else ""))
            result = run(run_config(plan, candidate, rung), callbacks=probe)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # this candidate's problem (a method the model cannot take): the race goes on
        kind = "" if isinstance(error, SlimtuneError) else f"{type(error).__name__}: "
        return {**_empty_row(candidate, rung, path), "status": "failed", "error": f"{kind}{error}"[:1000]}
    return trial_row(plan, candidate, rung, result.run_dir, reused=False)


def is_completed(plan: SelectPlan, candidate: Candidate, rung: int) -> bool:
    """Whether the trial's folder holds a finished run (read back, costs nothing: no budget check)."""
    return _status(plan.select_dir / "trials" / trial_name(plan, candidate, rung)) == "completed"


def _status(path: Path) -> str | None:
    if not (path / "config.yaml").is_file():
        return None
    try:
        return read_run(path).status
    except RunFolderError:
        return "damaged"


def _empty_row(candidate: Candidate, rung: int, path: Path) -> dict[str, Any]:
    return {"label": candidate.label, "model": candidate.model, "method": candidate.method, "rung": rung,
            "run_dir": str(path), "status": None, "metric": None, "train_seconds": None, "wall_seconds": None,
            "energy_kwh": None, "peak_memory_mb": None, "peak_memory_of": None, "adapter_bytes": None,
            "latency_s": None, "samples": None, "steps": None, "reused": False, "error": None}


def trial_row(plan: SelectPlan, candidate: Candidate, rung: int, path: Path, reused: bool) -> dict[str, Any]:
    """What the summary, the budget and the pick read of one trial: all from its run folder."""
    info = read_run(path)
    s, cost = info.summary, info.cost
    metric = (s.get("best") or {}).get(plan.monitor)
    device_peak = cost.get("device_peak_mb")
    latency = _read_json(Path(path) / LATENCY_FILE)
    return {**_empty_row(candidate, rung, path), "status": info.status,
            "metric": metric if isinstance(metric, (int, float)) else None,
            "train_seconds": cost.get("train_seconds") or s.get("train_seconds"),
            "wall_seconds": cost.get("wall_seconds") or s.get("wall_seconds"),
            "energy_kwh": cost.get("energy_kwh"),
            "peak_memory_mb": device_peak if device_peak is not None else cost.get("host_peak_rss_mb"),
            "peak_memory_of": "device" if device_peak is not None else "host",
            "adapter_bytes": adapter_bytes(Path(path) / "adapter"),
            "latency_s": latency.get("seconds_per_example"), "samples": s.get("samples_seen"),
            "steps": s.get("steps"), "reused": reused}


def adapter_bytes(folder: Path) -> int | None:
    """Bytes of the weight files the adapter folder holds (the tokenizer saved beside them is not counted)."""
    if not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
