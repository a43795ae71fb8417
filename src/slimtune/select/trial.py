"""A candidate's trial: one normal `run()` of the user's config with the candidate's model and method, in its own run
folder under `<select>/trials/`, trained rung by rung. Rung r pauses it at fractions[r] of its steps (PauseAt: the
full run's schedule and data order, cut short); promotion resumes it from that checkpoint, so a survivor never
trains its first steps twice, and its last rung is the very run `best.yaml` starts (a resume continues it
exactly). Each rung's row (metric, and what that rung cost: the run's cost so far less the earlier rungs') is
written to the folder's select_rungs.json as it ends, so a killed select reads finished rungs back and resumes an
interrupted one from its checkpoint.

The folder name holds a hash of the trial's config: a changed base config gets new folders, and a folder is always
the trial it is named for.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.sections import is_factory_spec
from ..config.sweep_keys import trial_config
from ..errors import SlimtuneError
from ..track import atomic
from ..track.runinfo import RunFolderError, read_run
from ..train.callbacks import PauseAt, pause_step
from .plan import Candidate, SelectPlan

if TYPE_CHECKING:
    from ..train.loop import Loop

Log = Callable[[str], Any]
LATENCY_FILE = "latency.json"
RUNGS_FILE = "select_rungs.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
COSTS = ("train_seconds", "wall_seconds", "energy_kwh")  # a rung's row holds its own share of these


def trial_data(plan: SelectPlan, candidate: Candidate) -> dict[str, Any]:
    """The trial's run config: the base with model.name and method.name set (as a sweep's trial sets a sampled
    method: the options the config gives that the candidate's method has are kept); a factory candidate sets
    model.factory too, and a named model clears the base's factory."""
    keys = {"method.name": candidate.method, "model.name": candidate.model}
    factory = is_factory_spec(candidate.model)
    if factory or (plan.base.get("model") or {}).get("factory"):
        keys["model.factory"] = candidate.model if factory else None
    return trial_config(plan.base, keys)


def trial_name(plan: SelectPlan, candidate: Candidate) -> str:
    digest = hashlib.sha256(json.dumps(trial_data(plan, candidate), sort_keys=True).encode()).hexdigest()[:8]
    return f"{candidate.slug()}-{digest}"


def trial_path(plan: SelectPlan, candidate: Candidate) -> Path:
    return plan.select_dir / "trials" / trial_name(plan, candidate)


def run_config(plan: SelectPlan, candidate: Candidate) -> dict[str, Any]:
    """trial_data placed in the select folder: its run folder under trials/, filed under the select folder in the
    run index (as a sweep's trials are); checkpoints on, since promotion resumes from them."""
    data = trial_data(plan, candidate)
    data["output"] = {**(data.get("output") or {}), "dir": str(plan.select_dir / "trials"),
                      "name": trial_name(plan, candidate), "save_checkpoints": True}
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


def _runs_the_named_code(path: Path, plan: SelectPlan, candidate: Candidate) -> bool:
    """Whether resuming the trial folder runs only the code this select was told to run: its config.yaml names the
    same factory (or remote-code model) as the candidate's trial config. Then the promotion needs no
    --trust-run-code (the user named that code for this select); a folder whose config.yaml says otherwise is
    refused as any run folder from elsewhere is (track/guard.py)."""
    from ..config import config_from_dict, load_config

    try:
        saved, wanted = load_config(path / "config.yaml").model, config_from_dict(trial_data(plan, candidate)).model
    except Exception:  # unreadable: not trusted, and the resume reports what is wrong with it
        return False
    keys = ("name", "factory", "trust_remote_code", "revision")
    return all(getattr(saved, k) == getattr(wanted, k) for k in keys)


def run_trial(plan: SelectPlan, candidate: Candidate, rung: int, log: Log) -> dict[str, Any]:
    """The trial's row at this rung: read back when recorded, else the run trained on (or started) to the rung's
    pause step. A trial that fails is a row with its error; an interrupt propagates (the run saved its checkpoint)."""
    from ..runner import run

    path = trial_path(plan, candidate)
    record = _read_json(path / RUNGS_FILE)
    if str(rung) in record:
        return {**record[str(rung)], "reused": True}
    status, fraction = _status(path), plan.fractions[rung]
    callbacks = [LatencyProbe(plan.latency_examples), PauseAt(fraction)]
    try:
        if status == "completed" or (status == "paused" and _reached(path, fraction)):
            pass  # ended there already: early stopping before the pause, or a select killed before it recorded
        elif status in ("paused", "interrupted", "running") and (path / "checkpoints" / "last").is_dir():
            # promoted (paused at the last rung), interrupted (Ctrl-C) or killed outright: on from its checkpoint
            log(f"[select] {candidate.label} rung {rung}: {'continuing' if status == 'paused' else 'resuming'} "
                f"{path} to {fraction:.3g} of its steps")
            run(None, resume=path, callbacks=callbacks, trust_run_code=_runs_the_named_code(path, plan, candidate))
        else:
            if path.exists():  # a start that never trained or that failed: nothing of it is kept
                shutil.rmtree(path)
            log(f"[select] {candidate.label} rung {rung}: training on {plan.train_samples} examples to "
                f"{fraction:.3g} of its steps")
            run(run_config(plan, candidate), callbacks=callbacks)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # this candidate's problem (a method the model cannot take): the race goes on
        kind = "" if isinstance(error, SlimtuneError) else f"{type(error).__name__}: "
        return {**_empty_row(candidate, rung, path), "status": "failed", "error": f"{kind}{error}"[:1000]}
    row = trial_row(plan, candidate, rung, path, earlier=[record[k] for k in record if int(k) < rung])
    atomic.write_json(path / RUNGS_FILE, {**record, str(rung): row})
    return row


def is_completed(plan: SelectPlan, candidate: Candidate, rung: int) -> bool:
    """Whether the trial's rung is recorded (read back, costs nothing: no budget check)."""
    return str(rung) in _read_json(trial_path(plan, candidate) / RUNGS_FILE)


def _reached(path: Path, fraction: float) -> bool:
    """Whether a paused run's summary is of a step at or past the pause step of `fraction`."""
    s = read_run(path).summary
    total, steps = s.get("total_steps"), s.get("steps")
    return isinstance(total, int) and isinstance(steps, int) and steps >= pause_step(total, fraction)


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


def trial_row(plan: SelectPlan, candidate: Candidate, rung: int, path: Path, earlier: list[dict]) -> dict[str, Any]:
    """What the summary, the budget and the pick read of one trial at one rung: all from its run folder, its costs
    less those of the earlier rungs' rows (the run's cost adds up over its sessions)."""
    info = read_run(path)
    s, cost = info.summary, info.cost
    metric = (s.get("best") or {}).get(plan.monitor)
    device_peak = cost.get("device_peak_mb")
    latency = _read_json(Path(path) / LATENCY_FILE)
    so_far = {"train_seconds": cost.get("train_seconds") or s.get("train_seconds"),
              "wall_seconds": cost.get("wall_seconds") or s.get("wall_seconds"), "energy_kwh": cost.get("energy_kwh")}
    return {**_empty_row(candidate, rung, path), "status": info.status,
            "metric": metric if isinstance(metric, (int, float)) else None,
            **{k: _less(so_far[k], [r.get(k) for r in earlier]) for k in COSTS},
            "peak_memory_mb": device_peak if device_peak is not None else cost.get("host_peak_rss_mb"),
            "peak_memory_of": "device" if device_peak is not None else "host",
            "adapter_bytes": adapter_bytes(Path(path) / "adapter"),
            "latency_s": latency.get("seconds_per_example"), "samples": s.get("samples_seen"),
            "steps": s.get("steps"), "reused": False}


def _less(total: float | None, parts: list[float | None]) -> float | None:
    if total is None or any(p is None for p in parts):  # energy unmeasured in some session: unknown
        return None
    return max(0.0, total - sum(parts))


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
