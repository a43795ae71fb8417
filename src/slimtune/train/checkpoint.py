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

Every process draws its own random numbers (dropout masks of batches of its own shapes), so `rng.pt` holds
one RNG state per process, `{"ranks": [state of process 0, state of process 1, ...]}`, gathered to the main
process (the only one that writes checkpoints) at each evaluation, and each process resumes from its own.
An interrupt cannot gather (after Ctrl-C a process may be anywhere, one of them inside a gradient
all-reduce): there the main process stores its own state and every other one writes
`rng_state_<rank>.pt` (with its step) next to the checkpoint folder itself. A checkpoint written before
holds one state, which every process takes, as it did then.

Under sharding (FSDP2's DTensor parameters, DeepSpeed ZeRO-3's partitioned ones) no process holds a whole
parameter: `trainable_state` gathers each one whole (a collective: every process calls it, `sharded` says
when) and `load_trainable` puts each process's part back, so checkpoints and adapters hold full tensors, never
a shard or ZeRO-3's empty `torch.Size([0])` placeholders. FSDP2's optimizer moments are sharded the same way:
`optimizer_state` gathers them into one whole state keyed by parameter name.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..track import atomic, diskspace


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _is_dtensor(p: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")  # DeepSpeed ZeRO-3 marks each partitioned parameter with its id


def sharded(model) -> bool:
    """Whether each process holds only shards of the parameters (FSDP2, ZeRO-3)."""
    return any(_is_dtensor(p) or _zero3(p) for p in model.parameters())


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of the whole parameter; for a sharded one a collective (all-gather)."""
    if _is_dtensor(p):
        return p.detach().full_tensor().to("cpu").contiguous().clone()
    if _zero3(p):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().to("cpu").contiguous().clone()
    return p.detach().to("cpu").contiguous().clone()


def _resharded(model) -> None:
    """FSDP2 registers a module's whole parameters while it is unsharded (the root stays so after a forward until
    the next backward) and its DTensor shards otherwise: put the shards back before reading or writing them."""
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def trainable_state(model, names=None) -> dict[str, torch.Tensor]:
    """The named parameters (default: those trainable now), whole, detached CPU copies. Every process calls it
    when the model is `sharded`: the same parameters in the same order, each gathered."""
    _resharded(model)
    wanted = None if names is None else set(names)
    return {n: _whole(p) for n, p in model.named_parameters() if (p.requires_grad if wanted is None else n in wanted)}


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        from ..errors import RunFolderError

        raise RunFolderError(f"checkpoint has parameters the model lacks: {missing[:5]} "
                             "(was the method or model changed?)")
    _resharded(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            _put(params[n], t)


def _put(p: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter: into this process's shard when sharded (every process reads the
    same file, so each cuts its own part locally; ZeRO-3 gathers, changes and re-partitions)."""
    if _is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        local = whole.to(p.to_local().device, p.dtype)
        p.copy_(distribute_tensor(local, p.device_mesh, p.placements, src_data_rank=None))
    elif _zero3(p):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.copy_(whole.to(p.device, p.dtype))
    else:
        p.copy_(whole.to(p.device, p.dtype))


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state_dict; whole under FSDP2, where each process holds its shards' moments (then a
    collective, keyed by parameter name, on the main process only)."""
    if not any(_is_dtensor(p) for p in model.parameters()):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's wrapper
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered(model, optimizer, names) -> tuple[dict, dict | None] | None:
    """A sharded model's checkpoint: (the `names` parameters, the optimizer's state or None), whole; collectives,
    on every process. None for a model that is not sharded (the main process reads its own parameters)."""
    if not sharded(model):
        return None
    return trainable_state(model, names), optimizer_state(model, optimizer) if optimizer is not None else None


def load_optimizer_state(model, optimizer, state: dict) -> None:
    if not any(_is_dtensor(p) for p in model.parameters()):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_states(states: list[dict | None]) -> dict:
    """rng.pt's content: the RNG state of each process, by process index (None: not known to the writer)."""
    return {"ranks": list(states)}


def rng_of_every_process(accelerator, mine: dict) -> dict:
    """rng.pt's content: each process's RNG state as of its last optimizer step, gathered to every process (a
    collective: every process calls it)."""
    if accelerator.num_processes == 1:
        return rank_states([mine])
    from accelerate.utils import gather_object

    return rank_states(gather_object([mine]))


def rank_rng_file(checkpoints: Path, rank: int) -> Path:
    return Path(checkpoints) / f"rng_state_{rank}.pt"


def save_rank_rng(checkpoints: Path, rank: int, step: int, state: dict) -> None:
    """A non-main process's RNG state at an interrupt, written by that process, renamed into place whole."""
    path = rank_rng_file(checkpoints, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    torch.save({"step": step, "state": state}, tmp)
    os.replace(tmp, path)


def rng_for_rank(saved: dict | None, rank: int, step: int, checkpoints: Path) -> dict | None:
    """The RNG state process `rank` resumes from at `step`: its own from the checkpoint, else its own from the
    interrupt's `rng_state_<rank>.pt` of that step, else (a checkpoint of a single state, written before each
    process had its own) the one state, else process 0's with a warning (the run then does not resume exactly)."""
    if saved is None or "ranks" not in saved:
        return saved
    ranks = saved["ranks"]
    if rank < len(ranks) and ranks[rank] is not None:
        return ranks[rank]
    side = rank_rng_file(checkpoints, rank)
    if side.is_file():
        own = torch.load(side, weights_only=True)
        if own.get("step") == step:
            return own["state"]
    warnings.warn(f"checkpoint holds no RNG state of process {rank} at step {step} (it was written with fewer "
                  "processes, or this process was stopped before it saved its own): it continues from process "
                  "0's, so random draws (dropout) differ from an uninterrupted run", stacklevel=2)
    return ranks[0]


def save(path: Path, model, optimizer=None, loop_state: dict | None = None, rng: dict | None = None,
         names=None, extra: dict | None = None, whole: tuple[dict, dict | None] | None = None) -> None:
    """`names`: the parameters to store (default: those trainable now); `extra`: {key: (tensors, data)};
    `whole`: (`trainable_state`, `optimizer_state`) that every process of a `sharded` model gathered beforehand.
    A full disk raises NoSpaceError naming the folder and about what the checkpoint needs (torch.save says
    only 'enforce fail at inline_container.cc'); the previous checkpoint stays in place."""
    try:
        _save(path, model, optimizer, loop_state, rng, names, extra, whole)
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


def _save(path, model, optimizer, loop_state, rng, names, extra, whole) -> None:
    weights, optimized = whole if whole is not None else (None, None)
    with atomic.folder(path) as tmp:
        save_file(weights if weights is not None else trainable_state(model, names), str(tmp / "trainable.safetensors"))
        if optimizer is not None:
            torch.save(optimized if optimized is not None else optimizer.state_dict(), tmp / "optimizer.pt")
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
        load_optimizer_state(model, optimizer, torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
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
