"""LoRA (Hu et al. 2021) through peft, with its DoRA / rsLoRA switches.

peft does the wrapping and owns the on-disk format; what we add is target
discovery (the linear layers of the transformer blocks, never the head) and the
head as `modules_to_save`, so the saved adapter is complete for the task.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..schema import StrictModel
from .targets import find_targets


class LoraConfig(StrictModel):
    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, description="rank of the update matrices")
    alpha: float = Field(16.0, gt=0, description="lora_alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    targets: Literal["auto", "all-linear", "attention"] | list[str] = Field(
        "auto",
        description="'auto': the linear layers inside the transformer blocks (never the task head); "
        "'attention': only the attention projections; or a list of module-name suffixes as peft takes them",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases to train")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field("default", description="initialisation of A and B")


def apply(model, cfg: LoraConfig, *, task_type: str, head_modules: list[str]):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    targets = find_targets(model, cfg.targets, exclude=head_modules)
    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[cfg.init]
    peft_cfg = PeftLoraConfig(
        task_type=task_type,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init_lora_weights=init,
        modules_to_save=head_modules or None,
    )
    return get_peft_model(model, peft_cfg)
