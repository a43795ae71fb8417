"""PEFT methods: one module per family (config classes + Method records), registered here.

`MethodConfig` is the union the run config validates `method:` against, keyed by
`name`; `apply_method` turns a loaded model into the model to train;
`save_adapter` / `load_adapter` / `merge` handle both peft-saved and slimtune-saved
methods. A new method = a config class with a `name` Literal and a `Method(...)`
record in a module's METHODS list, imported below.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Union

from pydantic import Field

from ..errors import RunFolderError, RunNotFound
from . import lora, partial, peft_other, prompt
from .base import Method, MethodContext, MethodError  # noqa: F401

REGISTRY: dict[str, Method] = {m.name: m for mod in (lora, peft_other, prompt, partial) for m in mod.METHODS}

_configs = tuple(m.config for m in REGISTRY.values())
MethodConfig = Annotated[Union[_configs], Field(discriminator="name")] if len(_configs) > 1 else _configs[0]

NATIVE_FILE = "slimtune_adapter.json"
NATIVE_WEIGHTS = "adapter_model.safetensors"


def get_method(name: str) -> Method:
    return REGISTRY[name]


def apply_method(model, cfg, ctx: MethodContext):
    return REGISTRY[cfg.name].apply(model, cfg, ctx)


def save_adapter(model, cfg, path: Path, base_name: str, task: str, whole: dict | None = None) -> None:
    """Write the trained adapter into `path` (an empty folder). `whole`: the trainable tensors gathered whole
    beforehand on every process, where the model is sharded (FSDP2, ZeRO-3) and its own parameters are shards."""
    method = REGISTRY[cfg.name]
    if method.saved_by == "peft":
        extra = method.before_save(model, str(path.parent)) if method.before_save else {}
        if whole is not None:
            extra["state_dict"] = whole
        try:
            model.save_pretrained(str(path), save_embedding_layers=False, **extra)  # 'auto' would ask the Hub
        finally:
            if extra.get("path_initial_model_for_weight_conversion"):
                import shutil

                shutil.rmtree(extra["path_initial_model_for_weight_conversion"], ignore_errors=True)
        if extra.get("path_initial_model_for_weight_conversion"):
            _add_missing_head(model, path)
        return
    from safetensors.torch import save_file

    tensors = whole if whole is not None else {
        n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(path / NATIVE_WEIGHTS))
    (path / NATIVE_FILE).write_text(json.dumps({
        "format": "slimtune-native/1", "method": cfg.name, "method_config": cfg.model_dump(mode="json"),
        "task": task, "base_model_name_or_path": base_name, "parameters": sorted(tensors),
        "how_to_load": "base = <AutoModelFor...>.from_pretrained(base_model_name_or_path); "
                       "base.load_state_dict(safetensors.torch.load_file('adapter_model.safetensors'), strict=False)",
    }, indent=2), encoding="utf-8")


def _add_missing_head(model, path: Path) -> None:
    """peft's PiSSA/OLoRA -> LoRA conversion keeps only the LoRA tensors; put the trained head back."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    file = path / "adapter_model.safetensors"
    saved = load_file(str(file))
    for k, v in get_peft_model_state_dict(model).items():
        if "lora_" not in k and k not in saved:
            saved[k] = v.detach().cpu().contiguous()
    save_file(saved, str(file), metadata={"format": "pt"})


def adapter_kind(path: Path) -> str:
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return "peft"
    if (path / NATIVE_FILE).is_file():
        return "slimtune"
    raise RunNotFound(f"{path}: neither adapter_config.json (peft) nor {NATIVE_FILE} (slimtune) found")


def adapter_weights(path: Path) -> Path:
    """The adapter's weights file, checked to be there and whole. Without this, peft takes a missing local
    file for a Hub id and blames the network ("outgoing traffic has been disabled")."""
    from ..models.checks import check_weight_file

    path = Path(path)
    names = (NATIVE_WEIGHTS, "adapter_model.bin") if adapter_kind(path) == "peft" else (NATIVE_WEIGHTS,)
    file = next((path / n for n in names if (path / n).is_file()), None)
    if file is None:
        raise RunNotFound(f"{path / NATIVE_WEIGHTS}: missing; the adapter's weights are gone from the run "
                                f"folder (it holds: {', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'})")
    check_weight_file(file)
    return file


def load_adapter(base, path: Path):
    """The base model with the adapter at `path` applied (peft or slimtune layout)."""
    path = Path(path)
    adapter_weights(path)
    if adapter_kind(path) == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(path))
        inner = model.base_model
        if type(inner).__name__ == "AdaLoraModel" and "trainable_adapter_name" not in vars(inner):
            # peft sets it only for training; its forward reads it when a loss is computed
            inner.trainable_adapter_name = "default"
        return model
    from safetensors.torch import load_file

    tensors = load_file(str(path / NATIVE_WEIGHTS))
    missing, unexpected = base.load_state_dict(tensors, strict=False)
    if unexpected:
        raise RunFolderError(f"{path}: {len(unexpected)} tensors do not belong to the base model, "
                             f"e.g. {unexpected[:3]}")
    return base


def merge(model, path: Path):
    """A plain transformers model with the adapter folded into its weights."""
    kind = adapter_kind(path)
    if kind == "slimtune":
        return model  # the trained tensors are already the model's own
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    if cfg.get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"):
        kind = cfg["peft_type"].lower().replace("_", "-")
        raise MethodError(f"{path}: a {kind} adapter adds virtual tokens and cannot be merged into the weights; "
                          "serve it with peft (PeftModel.from_pretrained)")
    return model.merge_and_unload()
