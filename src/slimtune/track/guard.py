"""What a run folder may make slimtune do: a run folder is untrusted input.

- `RunLock`: one trainer per run folder. A second `--resume` of a run that is still training would
  interleave two loops' checkpoints and metrics in one folder. The lock is an OS file lock
  (`fcntl.flock`), so a killed trainer (kill -9, a crash, a lost machine) releases it with its process:
  no stale lock file to clean up by hand.
- `resume_config`: what a resume may change. The saved config is what the checkpoint was trained with;
  an override that changes the model, data, method, optimizer or batching would continue from weights
  and optimizer state that do not belong to it, silently. Only the length of training may grow.
- `check_run_code`: a copied run folder is code when its config sets `model.trust_remote_code` (the
  model's own Python files run on load) or its model comes from a factory (the module or file that
  `meta.json` names is imported). Loading such a folder needs the user to say they trust it.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

import yaml

from ..config import RunConfig, load_config
from ..errors import ConfigError
from .rundir import RunDir
from .runinfo import flat

# the keys a resume may change: the length of training (its lr schedule is re-spread from the resume step on)
RESUME_MAY_CHANGE = ("train.epochs", "train.max_steps")


class RunBusy(ConfigError):
    """The run folder is held by another trainer."""


class RunComplete(ConfigError):
    """A resume of a run that has nothing left to train."""


class UntrustedRun(ConfigError):
    """Loading the run folder would run code it names."""


class RunLock:
    """An exclusive lock on `<run>/.lock`, held while a process trains in the folder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunBusy(f"{self.path.parent}: another process is training in this run folder ({self._holder()}); "
                          "wait for it to finish or stop it, then resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self.fd = fd
        return self

    def _holder(self) -> str:
        try:
            who = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            return f"pid {int(who['pid'])} on {str(who.get('host', '?'))[:100]}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def resume_config(run_dir: Path, overrides: list[str] | None) -> tuple[RunConfig, dict]:
    """(the config to resume with, {key: [saved, new]} of what the overrides change).

    Refuses, before anything is written, overrides of keys a resume cannot change, and a resume of a
    completed run that does not extend it."""
    saved = load_config(run_dir / "config.yaml")
    cfg = load_config(run_dir / "config.yaml", overrides) if overrides else saved
    before, after = flat(saved.model_dump(mode="json")), flat(cfg.model_dump(mode="json"))
    changed = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k)}
    refused = [k for k in changed if k not in RESUME_MAY_CHANGE]
    if refused:
        shown = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused[:5])
        raise ConfigError(
            f"{run_dir}: a resume continues the run as it was configured; it cannot change {shown}. A resume may only "
            f"extend training ({', '.join(RESUME_MAY_CHANGE)}). To train with other settings start a new run: "
            f"slimtune run {run_dir / 'config.yaml'} {' '.join(overrides or [])}")
    status = _status(run_dir)
    if status == "completed" and not changed:
        raise RunComplete(f"{run_dir}: the run is complete; there is nothing to resume. To train it longer, extend it: "
                          f"slimtune run --resume {run_dir} train.epochs=N (or train.max_steps=N)")
    return cfg, changed


def check_extension(run_dir: Path, changed: dict, step: int, total_steps: int) -> None:
    """An extended resume must leave steps to train."""
    if changed and total_steps <= step:
        shown = ", ".join(f"{k}={v[1]}" for k, v in changed.items())
        raise ConfigError(f"{run_dir}: {shown} gives {total_steps} optimizer steps, and the run is already at step "
                          f"{step}; give a larger value to train longer")


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def check_run_code(run_dir: Path, cfg: RunConfig, meta: dict, trusted: bool) -> None:
    """Refuse to load a run folder that would run code, unless the user said they trust it."""
    if trusted:
        return
    why = []
    if cfg.model.trust_remote_code:
        why.append(f"its config.yaml sets model.trust_remote_code: true (the Python files of model {cfg.model.name!r} "
                   "would run)")
    source = meta.get("model_source") if isinstance(meta, dict) else None
    if cfg.model.factory or (isinstance(source, dict) and source.get("origin") == "factory"):
        named = (source or {}).get("path") if isinstance(source, dict) else None
        why.append(f"its model is built by the factory {str(named or cfg.model.factory)!r} (that module or file "
                   "would be imported and run)")
    if why:
        raise UntrustedRun(f"{run_dir}: loading this run folder runs code: {'; and '.join(why)}. A run folder from "
                           "elsewhere is code; if you trust it, pass --trust-run-code (Python: trust_run_code=True)")


def read_meta(run_dir: Path) -> dict:
    try:
        meta = json.loads((Path(run_dir) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def record_extension(files: RunDir, changed: dict, total_steps: int) -> None:
    """A resume that extends training: refused if it leaves nothing to train; else config.yaml takes the new length
    (the next resume continues from it) and resumes.jsonl says at which step the schedule changed."""
    if not changed:
        return
    step = int(json.loads((files.path / "checkpoints" / "last" / "state.json").read_text(encoding="utf-8"))["step"])
    check_extension(files.path, changed, step, total_steps)
    cfg_text = (files.path / "config.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(cfg_text) or {}
    for key, (_, new) in changed.items():
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = new
    files.write_text("config.yaml", yaml.safe_dump(data, sort_keys=False))
    if files.main:
        with open(files.path / "resumes.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"at_step": step, "total_steps": total_steps, "changed": changed,
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
