"""Resumable checkpoints holding only what training changes.

A PEFT run changes only its trainable parameters, so a checkpoint is those
(safetensors), the optimizer state, the loop state and the RNG state: megabytes,
not a copy of the base model. Each checkpoint folder is written to a temporary
sibling and renamed into place, so a crash leaves the previous one intact.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..track import atomic


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"checkpoint has parameters the model lacks: {missing[:5]} (was the method or model changed?)")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save(path: Path, model, optimizer=None, loop_state: dict | None = None, rng: dict | None = None) -> None:
    with atomic.folder(path) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if rng is not None:
            torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(loop_state or {}, indent=2, default=str), encoding="utf-8")


def load(path: Path, model, optimizer=None) -> tuple[dict, dict | None]:
    """Restore weights (and optimizer); returns (loop_state, rng_state)."""
    path = Path(path)
    load_trainable(model, load_file(str(path / "trainable.safetensors")))
    if optimizer is not None and (path / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True) if (path / "rng.pt").exists() else None
    return json.loads((path / "state.json").read_text(encoding="utf-8")), rng
