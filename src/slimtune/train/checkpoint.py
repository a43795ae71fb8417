"""Resumable checkpoints holding only what training changes.

A PEFT run changes only the parameters its method trains, so a checkpoint is those
(safetensors), the optimizer state, the loop state and the RNG state: megabytes,
not a copy of the base model. Each checkpoint folder is written to a temporary
sibling and renamed into place, so a crash leaves the previous one intact.

The parameters saved are all those the method trains (`trainable_names` before
training starts), not only those trainable at the step saved: under gradual
unfreezing or staged training the best step may lie in a stage where most of them
were frozen, and restoring that step must put back their values of that step too.

Stateful callbacks (AdaLoRA's rank allocator) add their own part: `<key>.safetensors`
(tensors) and `<key>.json` (plain data), never a pickle.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..track import atomic, diskspace


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_state(model, names=None) -> dict[str, torch.Tensor]:
    """The named parameters (default: those trainable now), detached CPU copies."""
    if names is None:
        return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
    wanted = set(names)
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if n in wanted}


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        from ..errors import RunFolderError

        raise RunFolderError(f"checkpoint has parameters the model lacks: {missing[:5]} "
                             "(was the method or model changed?)")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, model, optimizer=None, loop_state: dict | None = None, rng: dict | None = None,
         names=None, extra: dict | None = None) -> None:
    """`names`: the parameters to store (default: those trainable now); `extra`: {key: (tensors, data)}.
    A full disk raises NoSpaceError naming the folder and about what the checkpoint needs (torch.save says
    only 'enforce fail at inline_container.cc'); the previous checkpoint stays in place."""
    try:
        _save(path, model, optimizer, loop_state, rng, names, extra)
    except (OSError, RuntimeError) as e:
        full = diskspace.no_space(e, path, _size(model, names, optimizer))
        if full is None:
            raise
        raise full from e


def _size(model, names, optimizer) -> int:
    """Bytes a checkpoint of these parameters takes, roughly: the weights, and AdamW's two moments each."""
    params = dict(model.named_parameters())
    wanted = names if names is not None else [n for n, p in params.items() if p.requires_grad]
    weights = sum(params[n].numel() * params[n].element_size() for n in wanted if n in params)
    return weights * (3 if optimizer is not None else 1)


def _save(path, model, optimizer, loop_state, rng, names, extra) -> None:
    with atomic.folder(path) as tmp:
        save_file(trainable_state(model, names), str(tmp / "trainable.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if rng is not None:
            torch.save(rng, tmp / "rng.pt")
        for key, (tensors, data) in (extra or {}).items():
            save_file({k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()},
                      str(tmp / f"{key}.safetensors"))
            (tmp / f"{key}.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
        (tmp / "state.json").write_text(json.dumps(loop_state or {}, indent=2, default=str), encoding="utf-8")


def load(path: Path, model, optimizer=None) -> tuple[dict, dict | None]:
    """Restore weights (and optimizer); returns (loop_state, rng_state)."""
    path = Path(path)
    load_trainable(model, load_file(str(path / "trainable.safetensors")))
    if optimizer is not None and (path / "optimizer.pt").exists():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True) if (path / "rng.pt").exists() else None
    return json.loads((path / "state.json").read_text(encoding="utf-8")), rng


def load_extra(path: Path, key: str) -> tuple[dict, dict] | None:
    """A stateful callback's part of the checkpoint, or None (a checkpoint written before it had one)."""
    path = Path(path)
    if not (path / f"{key}.json").is_file():
        return None
    tensors = load_file(str(path / f"{key}.safetensors")) if (path / f"{key}.safetensors").is_file() else {}
    return tensors, json.loads((path / f"{key}.json").read_text(encoding="utf-8"))


def resumable(path: Path) -> bool:
    """Whether there is a checkpoint to resume from at `path` (checkpoints/last): complete in place, or only as
    the previous version a kill between the two renames of its replacement left (atomic.recover puts it back)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return True
    return not path.exists() and any((p / "state.json").is_file() for p in path.parent.glob(f".{path.name}.old-*"))
