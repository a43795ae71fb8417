"""Other adapter families through peft: AdaLoRA, VeRA, LoHa, LoKr, OFT, BOFT, IA3.

Each is a config class with the paper's main options and a mapping to the peft config;
targets are found by structure (targets.py) like LoRA's.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from .base import Method, MethodContext, MethodError, TargetedConfig
from .targets import block_linear_shapes, find_targets


class AdaLoraConfig(TargetedConfig):
    """AdaLoRA (Zhang et al. 2023): SVD-form updates whose ranks are pruned to a budget during training."""
    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, ge=1, description="initial rank of each update")
    target_r: int = Field(8, ge=1, description="average rank after budget allocation")
    alpha: float = Field(16.0, gt=0, description="scaling (lora_alpha)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the input")
    tinit: float = Field(0.1, ge=0, lt=1, description="share of steps before rank pruning starts")
    tfinal: float = Field(0.3, ge=0, lt=1, description="share of final steps with the budget fixed")
    delta_t: int = Field(10, ge=1, description="steps between budget allocations")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the orthogonality regulariser")


class VeraConfig(TargetedConfig):
    """VeRA (Kopiczko et al. 2024): frozen shared random matrices, trained scaling vectors."""
    name: Literal["vera"] = "vera"
    r: int = Field(256, ge=1, description="rank of the shared random projections")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input")
    d_initial: float = Field(0.1, gt=0, description="initial value of the d scaling vector")


class LohaConfig(TargetedConfig):
    """LoHa (Hyeon-Woo et al. 2022): Hadamard product of two low-rank updates."""
    name: Literal["loha"] = "loha"
    r: int = Field(8, ge=1, description="rank")
    alpha: float = Field(8.0, gt=0, description="scaling alpha / r")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="dropout of ranks during training")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="probability of disabling a module during training")


class LokrConfig(TargetedConfig):
    """LoKr (Yeh et al. 2024): Kronecker product of a small matrix and a low-rank one."""
    name: Literal["lokr"] = "lokr"
    r: int = Field(8, ge=1, description="rank")
    alpha: float = Field(8.0, gt=0, description="scaling alpha / r")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="dropout of ranks during training")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="probability of disabling a module during training")
    decompose_both: bool = Field(False, description="low-rank decompose the left factor too")


class OftConfig(TargetedConfig):
    """OFT (Qiu et al. 2023): block-diagonal orthogonal rotation of the weights."""
    name: Literal["oft"] = "oft"
    block_size: int | Literal["auto"] = Field("auto", description="size of the orthogonal blocks ('auto': 32, or "
                                                                  "the largest divisor of the layer widths up to 32)")
    dropout: float = Field(0.0, ge=0, lt=1, description="module dropout")


class BoftConfig(TargetedConfig):
    """BOFT (Liu et al. 2024): orthogonal fine-tuning with butterfly factorisation."""
    name: Literal["boft"] = "boft"
    block_size: int | Literal["auto"] = Field("auto", description="BOFT block size ('auto': 4, "
                                                                  "or a divisor of the layer widths)")
    n_butterfly_factor: int = Field(1, ge=1, description="number of butterfly factors")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout")


class Ia3Config(TargetedConfig):
    """IA3 (Liu et al. 2022): learned vectors rescaling keys, values and feed-forward activations."""
    name: Literal["ia3"] = "ia3"
    targets: Literal["auto"] | list[str] = Field("auto", description="'auto': key/value projections and the feed-"
                                                                     "forward output layer; or module-name suffixes")
    feedforward: list[str] | None = Field(None, description="which targets are feed-forward layers "
                                                            "(scaled on the input); default from the model type")


def _block_size(requested, model, ctx, default: int) -> int:
    if requested != "auto":
        return int(requested)
    dims = [d for shape in block_linear_shapes(model, ctx.head_modules) for d in shape]
    g = 0
    for d in dims:
        g = math.gcd(g, d)
    for b in range(min(default, g), 0, -1):
        if g % b == 0:
            return b
    return 1


def apply_adalora(model, cfg: AdaLoraConfig, ctx: MethodContext):
    from peft import AdaLoraConfig as P, get_peft_model

    total = ctx.total_steps or 1000
    tinit, tfinal = int(cfg.tinit * total), int(cfg.tfinal * total)
    if tinit + tfinal >= total:
        raise MethodError(f"method.tinit + method.tfinal ({cfg.tinit} + {cfg.tfinal}) "
                          f"leave no steps for rank allocation in {total} steps")
    pc = P(task_type=ctx.task_type, init_r=cfg.init_r, target_r=cfg.target_r, lora_alpha=cfg.alpha,
           lora_dropout=cfg.dropout, tinit=tinit, tfinal=tfinal, deltaT=cfg.delta_t,
           orth_reg_weight=cfg.orth_reg_weight, total_step=total,
           target_modules=find_targets(model, cfg.targets, exclude=ctx.head_modules),
           modules_to_save=ctx.head_modules or None)
    return get_peft_model(model, pc)


def adalora_step(model, step: int) -> None:
    """AdaLoRA's budget allocation uses the gradients: after optimizer.step(), before zero_grad()."""
    model.base_model.update_and_allocate(step)


ALLOCATOR_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # peft's RankAllocator: per-parameter importance and its EMAs
ALLOCATOR_FORMAT = "slimtune-adalora-allocator/1"


def _allocator(model):
    inner = model.base_model
    return inner.rankallocator, inner.peft_config[inner.trainable_adapter_name]


def adalora_save_state(model) -> tuple[dict, dict]:
    """What AdaLoRA's allocation depends on beside the parameters: the rank allocator's importance scores
    (smoothed over every step so far) and the rank pattern it last chose (applied at every step of the
    final phase). peft keeps both outside the model's state dict."""
    alloc, pc = _allocator(model)
    tensors = {f"{kind}/{n}": t for kind in ALLOCATOR_SCORES for n, t in getattr(alloc, kind).items()}
    return tensors, {"format": ALLOCATOR_FORMAT, "rank_pattern": pc.rank_pattern}


def adalora_load_state(model, saved, step: int) -> None:
    alloc, pc = _allocator(model)
    if saved is None:
        if step == 0:
            return
        from ..errors import ConfigError

        raise ConfigError(f"this AdaLoRA run's checkpoint (step {step}) was written before slimtune saved "
                          "AdaLoRA's rank allocator state (importance scores, rank pattern), so it cannot resume "
                          "exactly; start the run again (slimtune run with its config.yaml)")
    tensors, data = saved
    params = dict(model.base_model.model.named_parameters())  # the allocator's names: those of the wrapped model
    for kind in ALLOCATOR_SCORES:
        getattr(alloc, kind).clear()
    for key, t in tensors.items():
        kind, name = key.split("/", 1)
        getattr(alloc, kind)[name] = t.to(params[name].device, params[name].dtype)
    pc.rank_pattern = data.get("rank_pattern")


def adalora_before_save(model, _folder) -> dict:
    """The adapter as the model computes it. peft cuts each update to the ranks of `rank_pattern` (the allocator's
    last choice), but between two allocations the optimizer moves masked singular values off zero again, so a best
    step there would lose part of its update in the saved adapter. The pattern of the non-zero singular values
    drops only ranks that contribute nothing (in the final phase, masked at every step, it is the allocator's)."""
    inner = model.base_model
    adapter = getattr(inner, "trainable_adapter_name", "default")
    inner.peft_config[adapter].rank_pattern = {n: (p.detach() != 0).view(-1).tolist()
                                               for n, p in inner.model.named_parameters() if f"lora_E.{adapter}" in n}
    return {}


def apply_vera(model, cfg: VeraConfig, ctx):
    from peft import VeraConfig as P, get_peft_model

    return get_peft_model(model, P(task_type=ctx.task_type, r=cfg.r, vera_dropout=cfg.dropout, d_initial=cfg.d_initial,
                                   target_modules=find_targets(model, cfg.targets, exclude=ctx.head_modules),
                                   modules_to_save=ctx.head_modules or None))


def apply_loha(model, cfg: LohaConfig, ctx):
    from peft import LoHaConfig as P, get_peft_model

    return get_peft_model(model, P(task_type=ctx.task_type, r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.rank_dropout,
                                   module_dropout=cfg.module_dropout, modules_to_save=ctx.head_modules or None,
                                   target_modules=find_targets(model, cfg.targets, exclude=ctx.head_modules)))


def apply_lokr(model, cfg: LokrConfig, ctx):
    from peft import LoKrConfig as P, get_peft_model

    return get_peft_model(model, P(task_type=ctx.task_type, r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.rank_dropout,
                                   module_dropout=cfg.module_dropout, decompose_both=cfg.decompose_both,
                                   modules_to_save=ctx.head_modules or None,
                                   target_modules=find_targets(model, cfg.targets, exclude=ctx.head_modules)))


def apply_oft(model, cfg: OftConfig, ctx):
    from peft import OFTConfig as P, get_peft_model

    bs = _block_size(cfg.block_size, model, ctx, 32)
    return get_peft_model(model, P(task_type=ctx.task_type, r=0, oft_block_size=bs, module_dropout=cfg.dropout,
                                   modules_to_save=ctx.head_modules or None,
                                   target_modules=find_targets(model, cfg.targets, exclude=ctx.head_modules)))


def apply_boft(model, cfg: BoftConfig, ctx):
    from peft import BOFTConfig as P, get_peft_model

    bs = _block_size(cfg.block_size, model, ctx, 4)
    return get_peft_model(model, P(task_type=ctx.task_type, boft_block_size=bs, boft_block_num=0,
                                   boft_n_butterfly_factor=cfg.n_butterfly_factor, boft_dropout=cfg.dropout,
                                   modules_to_save=ctx.head_modules or None,
                                   target_modules=find_targets(model, cfg.targets, exclude=ctx.head_modules)))


IA3_KEYS = ("k_proj", "v_proj", "key", "value", "c_attn", "qkv")
IA3_FF = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "wo")


def apply_ia3(model, cfg: Ia3Config, ctx):
    """Keys, values and the feed-forward output layer (its input is scaled), as in the paper."""
    from peft import IA3Config as P, get_peft_model

    from .targets import block_linear_names

    if cfg.targets != "auto":
        targets, ff = cfg.targets, cfg.feedforward or []
    else:
        names = block_linear_names(model, ctx.head_modules)
        targets = [n for n in names if n.split(".")[-1] in IA3_KEYS]
        # BERT-style FFN output: `<block>.output.dense` (not `attention.output.dense`)
        ff = [n for n in names if (n.split(".")[-1] in IA3_FF or n == "output.dense")
              and "attn" not in n and "attention" not in n]
        targets = sorted(set(targets) | set(ff))
        if not targets:
            raise MethodError("method ia3: found no key / value / feed-forward layers; "
                              "set method.targets and method.feedforward")
    if cfg.targets == "auto":
        from .targets import block_regex

        pc = P(task_type=ctx.task_type, target_modules=block_regex(model, targets),
               feedforward_modules=block_regex(model, ff) if ff else [], modules_to_save=ctx.head_modules or None)
    else:
        pc = P(task_type=ctx.task_type, target_modules=targets, feedforward_modules=ff,
               modules_to_save=ctx.head_modules or None)
    return get_peft_model(model, pc)


METHODS = [
    Method("adalora", AdaLoraConfig, apply_adalora, on_optimizer_step=adalora_step,
           save_state=adalora_save_state, load_state=adalora_load_state, before_save=adalora_before_save,
           default_lr=5e-3, summary="LoRA with adaptive rank budget"),
    Method("vera", VeraConfig, apply_vera, default_lr=1e-2, summary="shared frozen random matrices + trained vectors"),
    Method("loha", LohaConfig, apply_loha, default_lr=5e-3, summary="Hadamard product of low-rank updates"),
    Method("lokr", LokrConfig, apply_lokr, default_lr=5e-3, summary="Kronecker-product updates"),
    Method("oft", OftConfig, apply_oft, default_lr=1e-3, summary="orthogonal block rotations"),
    Method("boft", BoftConfig, apply_boft, default_lr=5e-3, summary="orthogonal butterfly rotations"),
    Method("ia3", Ia3Config, apply_ia3, default_lr=1e-2, summary="learned rescaling vectors (tiny)"),
]
