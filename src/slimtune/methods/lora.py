"""The LoRA family through peft: lora, dora, rslora, pissa, olora, eva, lora-plus, qlora.

One peft LoraConfig underneath; the variants differ only in a few switches, so each
variant is a config class (its own defaults and help) mapped to those switches, not
an `if` chain. peft owns the on-disk format; we add target discovery and the head as
`modules_to_save`. PiSSA / OLoRA change the base weights at initialisation, so their
adapters are converted at save time into plain LoRA adapters against the original
base (peft's `path_initial_model_for_weight_conversion`), which anyone can load.
"""
from __future__ import annotations

import tempfile
import weakref
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from .base import Method, MethodContext, MethodError, TargetedConfig
from .targets import find_targets

if TYPE_CHECKING:
    import torch


class LoraOptions(TargetedConfig):
    r: int = Field(8, ge=1, description="rank of the update matrices")
    alpha: float = Field(16.0, gt=0,
                         description="lora_alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases to train")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    init: Literal["default", "gaussian", "pissa", "olora", "eva"] = Field("default",
                                                                         description="initialisation of A and B")


class LoraConfig(LoraOptions):
    name: Literal["lora"] = "lora"


class DoraConfig(LoraOptions):
    """DoRA (Liu et al. 2024): LoRA on the direction, a trained magnitude vector."""
    name: Literal["dora"] = "dora"
    use_dora: bool = True


class RsLoraConfig(LoraOptions):
    """rsLoRA (Kalajdzievski 2023): scaling alpha / sqrt(r), stable at high rank."""
    name: Literal["rslora"] = "rslora"
    use_rslora: bool = True


class PissaConfig(LoraOptions):
    """PiSSA (Meng et al. 2024): A and B from the principal singular vectors of W."""
    name: Literal["pissa"] = "pissa"
    init: Literal["pissa"] = "pissa"
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input (PiSSA uses none)")


class OloraConfig(LoraOptions):
    """OLoRA (Büyükakyüz 2024): orthonormal A and B from a QR decomposition of W."""
    name: Literal["olora"] = "olora"
    init: Literal["olora"] = "olora"
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")


class EvaConfig(LoraOptions):
    """EVA (Paischer et al. 2024): A from the SVD of layer inputs on training batches; ranks redistributed."""
    name: Literal["eva"] = "eva"
    init: Literal["eva"] = "eva"
    rho: float = Field(2.0, ge=1.0, description="max rank of a layer as a multiple of r when ranks are redistributed")
    eva_batches: int = Field(8, ge=1, description="training batches used for the SVD")


class LoraPlusConfig(LoraOptions):
    """LoRA+ (Hayou et al. 2024): the B matrices learn `ratio` times faster than A."""
    name: Literal["lora-plus"] = "lora-plus"
    ratio: float = Field(16.0, gt=0, description="learning-rate ratio of B over A (loraplus_lr_ratio)")


class QloraConfig(LoraOptions):
    """QLoRA (Dettmers et al. 2023): 4-bit NF4 base weights (bitsandbytes, CUDA) + LoRA."""
    name: Literal["qlora"] = "qlora"
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="quantize the quantization constants too")


def _peft_config(cfg: LoraOptions, targets, ctx: MethodContext):
    from peft import LoraConfig as PeftLoraConfig

    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "eva": "eva"}[cfg.init]
    extra = {}
    if cfg.init == "eva":
        from peft import EvaConfig as PeftEva

        extra["eva_config"] = PeftEva(rho=getattr(cfg, "rho", 2.0))
    return PeftLoraConfig(
        task_type=ctx.task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        bias=cfg.bias, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init_lora_weights=init,
        modules_to_save=ctx.head_modules or None, **extra,
    )


def apply(model, cfg: LoraOptions, ctx: MethodContext):
    from peft import get_peft_model

    targets = find_targets(model, cfg.targets, exclude=ctx.head_modules)
    if cfg.name == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_cfg = _peft_config(cfg, targets, ctx)
    if cfg.init == "eva":
        return _apply_eva(model, cfg, peft_cfg, ctx)
    model = get_peft_model(model, peft_cfg)
    if cfg.init in ("pissa", "olora"):
        _remember_initial_adapter(model)
    return model


def _apply_eva(model, cfg, peft_cfg, ctx):
    from peft import get_peft_model, initialize_lora_eva_weights

    if ctx.sample_batches is None:  # counting parameters only (inspect): EVA keeps LoRA's rank budget
        peft_cfg.init_lora_weights = True
        return get_peft_model(model, peft_cfg)
    peft_model = get_peft_model(model, peft_cfg, low_cpu_mem_usage=True)
    batches = []
    for i, b in enumerate(ctx.sample_batches()):
        if i >= cfg.eva_batches:
            break
        batches.append({k: v for k, v in b.items() if k != "labels"})
    if not batches:
        raise MethodError("method eva: no training batches to initialise from")
    initialize_lora_eva_weights(peft_model, batches)
    return peft_model


# PiSSA / OLoRA: the folder of each model's initial adapter, kept as long as the model lives
_INITIAL_ADAPTERS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def _remember_initial_adapter(model: torch.nn.Module) -> None:
    """PiSSA / OLoRA: save the initial adapter (peft's recipe) to convert the trained one into plain LoRA at save."""
    cfg = model.peft_config["default"]
    original = cfg.init_lora_weights
    cfg.init_lora_weights = True  # peft expects the initial adapter saved as a plain LoRA config
    path = tempfile.mkdtemp(prefix="slimtune-initial-adapter-")
    try:
        model.save_pretrained(path, save_embedding_layers=False)
    finally:
        cfg.init_lora_weights = original
    _INITIAL_ADAPTERS[model] = path


def before_save(model: torch.nn.Module, tmp_root: str) -> dict:
    path = _INITIAL_ADAPTERS.get(model)
    return {"path_initial_model_for_weight_conversion": path} if path else {}


def lora_plus_scale(name: str, cfg) -> tuple[str, float] | None:
    return ("lora_B", cfg.ratio) if "lora_B" in name or "lora_embedding_B" in name else None


def check_qlora(cfg) -> None:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise MethodError("method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none. "
                          "Use method.name=lora: the same adapters on a full-precision base")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MethodError("method qlora needs bitsandbytes: pip install bitsandbytes")


def qlora_load_kwargs(cfg) -> dict:
    import torch
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type, bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16),
        "device_map": {"": torch.cuda.current_device()}}


def qlora_merge_load_kwargs(cfg) -> dict:
    """The 16-bit dtype QLoRA computes in (bnb_4bit_compute_dtype), for the base a merge loads unquantized."""
    import torch

    gpu_without_bf16 = torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
    return {"dtype": torch.float16 if gpu_without_bf16 else torch.bfloat16}


METHODS = [
    Method("lora", LoraConfig, apply, summary="low-rank updates of the block linear layers"),
    Method("dora", DoraConfig, apply, summary="LoRA + learned magnitude (weight-decomposed)"),
    Method("rslora", RsLoraConfig, apply, summary="LoRA with rank-stabilised scaling"),
    Method("pissa", PissaConfig, apply, before_save=before_save,
           summary="LoRA initialised from principal singular vectors"),
    Method("olora", OloraConfig, apply, before_save=before_save, summary="LoRA initialised orthonormally (QR)"),
    Method("eva", EvaConfig, apply, summary="LoRA initialised from activations (data-driven ranks)"),
    Method("lora-plus", LoraPlusConfig, apply, lr_scale=lora_plus_scale, default_lr=2e-4,
           summary="LoRA with a higher lr for B"),
    Method("qlora", QloraConfig, apply, load_kwargs=qlora_load_kwargs, merge_load_kwargs=qlora_merge_load_kwargs,
           check_environment=check_qlora,
           summary="LoRA on a 4-bit base (CUDA)"),
]
