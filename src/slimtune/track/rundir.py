"""The run folder and what goes in it.

    config.yaml          the resolved config (`slimtune run config.yaml` reproduces the run)
    meta.json            task facts: label list, record format, model source
    data_report.json     data checks: warnings and statistics
    metrics.jsonl        one JSON line per logged training step and per evaluation
    adapter/             best adapter, standard PEFT layout (+ head, + tokenizer files)
    checkpoints/last     resumable state (trainable weights, optimizer, loop state, RNG)
    checkpoints/best     trainable weights at the best evaluation
    summary.json         status, best / final / test metrics, cost, versions
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

from . import atomic


def default_run_name(cfg) -> str:
    model = re.sub(r"[^A-Za-z0-9._-]+", "-",
                   Path(cfg.model.name).name if "/" not in cfg.model.name or Path(cfg.model.name).exists()
                   else cfg.model.name.split("/")[-1])
    return f"{cfg.task}-{model}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(cfg) -> Path:
    root = Path(cfg.output.dir)
    name = cfg.output.name or default_run_name(cfg)
    path = root / name
    # the config loader refuses such names (schema.plain_name); this holds for a config built without it
    # (abspath, not resolve: a run folder the user linked elsewhere on purpose stays allowed)
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(root):
        from ..config import ConfigError

        raise ConfigError(f"output.name: {name!r} is not accepted: must be a plain folder name, created under "
                          f"output.dir ({root})")
    i = 1
    while path.exists() and any(path.iterdir()):
        i += 1
        path = root / f"{name}-{i}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunDir:
    def __init__(self, path: Path | str, main: bool = True):
        self.path = Path(path)
        self.main = main
        self.sinks: list = []  # callables that also get every logged record (MLflow, TensorBoard)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj) -> None:
        if self.main:
            atomic.write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        if self.main:
            atomic.write_text(self.path / name, text)

    def read_json(self, name: str):
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def log(self, record: dict) -> None:
        """Append one line to metrics.jsonl (a line is written whole, then flushed)."""
        if not self.main:
            return
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        for sink in self.sinks:
            sink(record)

    def truncate_metrics(self, last_step: int) -> None:
        """On resume: drop the records logged after the checkpoint we resume from, and the test record of an
        earlier finish (a run interrupted while finishing, or one extended): the resumed run tests again at its end."""
        p = self.path / "metrics.jsonl"
        if not self.main or not p.exists():
            return
        keep = []
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= last_step and rec.get("type") != "test":
                keep.append(line)
        atomic.write_text(p, "".join(kept + "\n" for kept in keep))

    def metrics(self) -> list[dict]:
        from .runinfo import read_metrics

        return read_metrics(self.path / "metrics.jsonl")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("slimtune", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_hash() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip() or None
    except Exception:
        return None


def hardware() -> dict:
    import os

    import torch

    info = {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info
