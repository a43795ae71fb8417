"""The verbs, the same as the CLI's: run(), evaluate(), predict().

`run()` follows one config from YAML to an adapter on disk:
config -> data checks -> tokenizer -> features -> model + method -> loop -> run folder.
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import RunConfig, dump_config, load_config
from .data.batching import LengthGroupedBatches, eval_batches
from .methods import MethodContext, apply_method, get_method, load_adapter, save_adapter
from .models import load_tokenizer, resolve
from .tasks import get_task
from .track import atomic, guard
from .track.rundir import RunDir, git_hash, hardware, new_run_dir, versions
from .track.session import RunTracking
from .train import checkpoint
from .train.callbacks import EarlyStopping
from .train.loop import Loop, interrupts_deferred
from .train.optim import build_optimizer
from .train.groups import lr_multipliers, split_groups
from .train.progress import TrainProgress
from .train.transfer import GradualUnfreeze, SeqLenWarmup, Staged, truncating_collate
from .train.schedules import warmup_steps


@dataclass
class RunResult:
    run_dir: Path
    status: str
    best_metrics: dict
    final_metrics: dict
    test_metrics: dict | None
    summary: dict = field(default_factory=dict)

    @property
    def metrics(self) -> dict:
        return self.best_metrics


def resolve_precision(precision: str) -> str:
    """accelerate's mixed_precision value: 'bf16', 'fp16' or 'no'."""
    if precision == "fp32":
        return "no"
    if precision == "fp16":
        if not torch.cuda.is_available():
            raise ValueError("train.precision: 'fp16' needs a CUDA GPU; use 'bf16' or 'auto' on CPU")
        return "fp16"
    if precision == "bf16":
        return "bf16"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if cpu_bf16 else "no"


def _precision_name(mixed_precision: str) -> str:
    """accelerate's 'no' (no mixed precision) as a user reads it."""
    return "fp32" if mixed_precision == "no" else mixed_precision


def peak_memory_mb() -> dict:
    out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _accelerator(mixed_precision: str):
    """An Accelerator for this run. accelerate keeps its state in a process-wide singleton;
    a second run() in the same process (tests, sweeps, notebooks) with another precision
    needs that state reset, while the distributed part (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # cpu=True where there is no GPU: accelerate then forms a gloo group under torchrun /
    # `accelerate launch`; without it each process would train alone
    accel = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return Accelerator(mixed_precision=mixed_precision, cpu=not accel)


def _print_report(acc, report) -> None:
    """Data warnings go to stderr, with the other warnings; stdout keeps what a script reads."""
    if acc.is_main_process:
        for w in report.warnings:
            print(f"[data warning] {w}", file=sys.stderr)


def _model_for_task(cfg, task, source, splits, tokenizer, total_steps=None, sample_batches=None):
    method = get_method(cfg.method.name)
    load_kw = method.load_kwargs(cfg.method) if method.load_kwargs else {}
    model, head = task.load_model(cfg, source, splits, **load_kw)
    if getattr(getattr(model, "config", None), "pad_token_id", None) is None and getattr(tokenizer, "pad_token_id", None) is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    ctx = MethodContext(cfg.task, task.PEFT_TASK_TYPE, head, total_steps, sample_batches)
    model = apply_method(model, cfg.method, ctx)
    peft_cfg = getattr(model, "peft_config", {}).get("default")
    if peft_cfg is not None:  # the id the ecosystem loads the base from, not a site-packages path
        peft_cfg.base_model_name_or_path = source.hub_id or source.path
    # the randomly initialised head, for its own default lr (_lr_scale) where the task asks for it; not when the
    # checkpoint had its head already, nor for head-only (the method's lr is the head's)
    fast = getattr(task, "FAST_NEW_HEAD", False) and getattr(model, "_slimtune_head_is_new", True) \
        and cfg.method.name != "head-only"
    model._slimtune_new_head = list(head) if fast else []
    return model


class _MethodStep:
    """A method's per-step hook (AdaLoRA's rank allocation) as a loop callback; the state the hook keeps
    (the method's `save_state` / `load_state`) goes into checkpoints/last as the loop's `method` part."""

    def __init__(self, method):
        self.method = method
        if method.save_state:
            self.state_key = "method"

    def on_optimizer_step(self, loop):
        self.method.on_optimizer_step(loop.acc.unwrap_model(loop.model), loop.state["step"])

    def state_dict(self, loop) -> tuple[dict, dict]:
        return self.method.save_state(loop.acc.unwrap_model(loop.model))

    def load_state_dict(self, loop, saved) -> None:
        self.method.load_state(loop.acc.unwrap_model(loop.model), saved, loop.state["step"])


HEAD_LR_MULT, HEAD_LR_MAX = 10.0, 2e-2


def default_head_lr(lr: float) -> float:
    """The lr of a newly initialised text-classification head when train.head_lr is not set: 10x train.lr, at most 2e-2
    (the linear-probe rate of the method table, `head-only`), never below train.lr. A head that starts
    from random weights at the adapters' rate learns too slowly: the adapters then reshape the features
    for a head that barely moves, and small imbalanced runs collapse onto the majority classes
    (benchmarks/RESULTS.md, bench_transfer: Banking77 66.5 -> 87.8% test accuracy; SST-2 unchanged)."""
    return max(lr, min(HEAD_LR_MULT * lr, HEAD_LR_MAX))


def _is_head_param(name: str, head: list[str]) -> bool:
    dotted = "." + name
    return any(f".{h}." in dotted for h in head)


def _lr_scale(cfg, method, groups, head: list[str] | None = None):
    """Per-parameter (group, lr multiplier): layer-wise / discriminative rates composed with the method's own
    (LoRA+), and the rate of a newly initialised head (`head`: its module names)."""
    t = cfg.train
    mults = None
    if t.layer_decay is not None or t.lr_ratio_min is not None or t.head_lr is not None:
        mults = lr_multipliers(groups, t.layer_decay, t.lr_ratio_min, t.head_lr / t.lr if t.head_lr else None)
    # the new head's default rate (train.head_lr unset): its own parameters only, not the pooler / final
    # norm / soft prompts that share the top group
    head_mult = default_head_lr(t.lr) / t.lr if head and t.head_lr is None else 1.0

    def scale(name):
        g, m = None, 1.0
        if mults is not None:
            g = groups.of_param.get(name, "head")
            m = mults[g]
        if head_mult != 1.0 and _is_head_param(name, head):  # its own group: "head" may also hold the pooler /
            g, m = "new_head", m * head_mult                      # norms / soft prompts at another rate
        own = method.lr_scale(name, cfg.method) if method.lr_scale else None
        if own:
            g, m = (f"{g}/{own[0]}" if g else own[0]), m * own[1]
        return (g, m) if g else None

    reported = mults
    if head_mult != 1.0:  # param_groups.json: the new head's multiplier as applied
        reported = {**(mults or {}), "new_head": (mults or {}).get("head", 1.0) * head_mult}
    return (scale if (reported is not None or method.lr_scale) else None), reported


def _trainable_per_group(model, groups) -> dict:
    out = {g: 0 for g in groups.names}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[groups.of_param.get(n, "head")] += p.numel()
    return out


def _transfer_callbacks(cfg, model, groups, total_steps, steps_per_epoch, seq_len, acc):
    t = cfg.train
    cbs, lr_fn = [], None
    if (t.unfreeze or t.strategy == "staged") and acc.num_processes > 1:
        raise ValueError("train.unfreeze / train.strategy=staged change which parameters train during the run, "
                         "which DistributedDataParallel does not allow; run them in a single process")
    if t.unfreeze:
        every = t.unfreeze.every_steps or max(1, round(t.unfreeze.every_epochs * steps_per_epoch))
        cbs.append(GradualUnfreeze(model, groups, every, t.unfreeze.start))
    if t.strategy == "staged":
        head_steps = max(1, round(t.staged.head_fraction * total_steps))
        staged = Staged(model, groups, head_steps, total_steps, t.staged.head_lr_mult,
                        warmup_steps(t.warmup, total_steps - head_steps), t.schedule)
        cbs.append(staged)
        lr_fn = staged.lr_factor
    if t.seq_len_schedule:
        cbs.append(SeqLenWarmup(t.seq_len_schedule, total_steps, seq_len))
    if t.image_size_schedule and cfg.task == "image-classification":
        from .train.transfer import ProgressiveResize

        cbs.append(ProgressiveResize(t.image_size_schedule, total_steps, seq_len))
    return cbs, lr_fn


def _resolve_model(cfg):
    if cfg.model.factory:
        from .models.factory import factory_source

        return factory_source(cfg.model.factory)
    return resolve(cfg.model.name, cfg.model.gguf_file, cfg.model.revision)


def _load_processor(task, cfg, source):
    """The tokenizer (text), or the task's own preprocessor (images)."""
    if hasattr(task, "load_processor"):
        return task.load_processor(cfg, source)
    return load_tokenizer(source, cfg.model.trust_remote_code, cfg.model.revision)


def _lengths(examples) -> list[int]:
    return [e["length"] if "length" in e else len(e["input_ids"]) for e in examples]


def _content_keys(examples) -> list[int] | None:
    """Equal keys for copies of one tokenized example (tokens and labels), so that length grouping can
    spread them over batches; None for examples without tokens (images: equal length anyway)."""
    if not examples or "input_ids" not in examples[0]:
        return None
    return [hash((tuple(e["input_ids"]), tuple(e["labels"]) if isinstance(e.get("labels"), list) else e.get("labels")))
            for e in examples]


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _legacy_defaults(saved: Path, cfg) -> bool:
    """A run saved before `train.spread_duplicates` and the new head's own default lr existed resumes with the
    behaviour it started with (copies not spread, one lr for the head): its batches and optimizer groups
    must match its checkpoint. Such a config.yaml lacks the key (every later one holds all defaults)."""
    import yaml

    train = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("train") or {}
    if "spread_duplicates" in train:
        return False
    cfg.train.spread_duplicates = False
    return True


def _read_meta(run_dir: Path) -> dict:
    try:
        meta = json.loads((Path(run_dir) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _record_extension(rd: RunDir, changed: dict, total_steps: int) -> None:
    """A resume that extends training: refused if it leaves nothing to train; else config.yaml takes the new length
    (the next resume continues from it) and resumes.jsonl says at which step the schedule changed."""
    if not changed:
        return
    step = int(json.loads((rd.path / "checkpoints" / "last" / "state.json").read_text(encoding="utf-8"))["step"])
    guard.check_extension(rd.path, changed, step, total_steps)
    cfg_text = (rd.path / "config.yaml").read_text(encoding="utf-8")
    import yaml

    data = yaml.safe_load(cfg_text) or {}
    for key, (_, new) in changed.items():
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = new
    rd.write_text("config.yaml", yaml.safe_dump(data, sort_keys=False))
    if rd.main:
        with open(rd.path / "resumes.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"at_step": step, "total_steps": total_steps, "changed": changed,
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def run(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, resume: str | Path | None = None,
        callbacks: list | None = None, trust_run_code: bool = False) -> RunResult:
    """Fine-tune as the config says; returns the metrics and the run folder.

    `resume`: a run folder; training continues from its last checkpoint with its saved config. Overrides
    may only extend training (train.epochs / train.max_steps; track/guard.py says why).
    `callbacks`: extra objects with on_train_begin / on_step_end / on_eval_end / on_train_end.
    `trust_run_code`: resume a run folder whose model runs code (trust_remote_code, a factory).
    """
    with contextlib.ExitStack() as held:  # the run folder's lock, released however run() ends
        return _run(config, overrides, resume, callbacks, trust_run_code, held)


def _run(config, overrides, resume, callbacks, trust_run_code: bool, held: contextlib.ExitStack) -> RunResult:
    from accelerate.utils import broadcast_object_list, set_seed

    wall0 = time.perf_counter()
    changed: dict = {}
    if resume is not None:
        resume = Path(resume)
        if not (resume / "config.yaml").is_file():
            raise FileNotFoundError(f"{resume}: not a run folder (no config.yaml)")
        if not checkpoint.resumable(resume / "checkpoints" / "last"):
            raise FileNotFoundError(f"{resume}: no checkpoint to resume from (checkpoints/last is missing)")
        cfg, changed = guard.resume_config(resume, overrides)
        guard.check_run_code(resume, cfg, _read_meta(resume), trust_run_code)
        legacy = _legacy_defaults(resume / "config.yaml", cfg)
    else:
        cfg = load_config(config, overrides)
        legacy = False
    task = get_task(cfg.task)
    env_check = get_method(cfg.method.name).check_environment
    if env_check:
        env_check(cfg.method)
    acc = _accelerator(resolve_precision(cfg.train.precision))
    if resume is not None and acc.is_main_process:  # before anything in the folder is written
        held.enter_context(guard.RunLock(resume))
    set_seed(cfg.train.seed)

    # data first: every data error shows before a model is loaded
    splits = task.load_data(cfg)
    source = _resolve_model(cfg)
    tokenizer = _load_processor(task, cfg, source)
    features = task.featurize(cfg, tokenizer, splits)
    _print_report(acc, splits.report)

    if resume is not None:
        run_path = resume
    else:
        holder = [str(new_run_dir(cfg)) if acc.is_main_process else None]
        if acc.num_processes > 1:
            broadcast_object_list(holder)
        run_path = Path(holder[0])
        if acc.is_main_process:
            held.enter_context(guard.RunLock(run_path))
    unstarted = held.enter_context(_Unstarted(run_path if resume is None and acc.is_main_process else None))
    rd = RunDir(run_path, main=acc.is_main_process)
    if acc.is_main_process:
        atomic.clean_leftovers(run_path)  # and puts back a checkpoint a kill left half-renamed
    meta = {**splits.meta, "task": cfg.task, "model_source": source.__dict__, "data_sources": splits.sources}
    if resume is None:
        rd.write_text("config.yaml", dump_config(cfg))
    rd.write_json("meta.json", meta)
    rd.write_json("data_report.json", {"warnings": splits.report.warnings, "stats": splits.report.stats,
                                       "sizes": {k: len(v) for k, v in features.items()}})
    tracking = RunTracking(cfg, rd, acc, resumed=resume is not None)  # index, cost, energy / CO2, MLflow / TensorBoard

    train_ex = features["train"]
    sampler = LengthGroupedBatches(_lengths(train_ex), cfg.train.batch_size, cfg.train.seed,
                                   cfg.train.group_by_length, acc.num_processes, acc.process_index,
                                   keys=_content_keys(train_ex) if cfg.train.group_by_length and cfg.train.spread_duplicates else None)
    collate = task.collate(tokenizer)
    # read by the collate function: the current max length (image size) under train.seq_len_schedule
    # (image_size_schedule), and the epoch (the sampler writes it; image augmentations are drawn per epoch)
    seq_len = {}
    sampler.shared = seq_len
    train_collate = truncating_collate(collate, seq_len, keep_last=cfg.task == "text-classification") \
        if cfg.train.seq_len_schedule else collate
    if hasattr(task, "train_collate"):  # images: augmentation + progressive resizing
        train_collate = task.train_collate(tokenizer, seq_len)
    # its own generator: a DataLoader draws a base seed from the global RNG at each epoch, which would
    # shift the dropout stream of a resumed run
    loader = torch.utils.data.DataLoader(train_ex, batch_sampler=sampler, collate_fn=train_collate, generator=torch.Generator())
    steps_per_epoch = math.ceil(sampler.per_rank() / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    if resume is not None:
        _record_extension(rd, changed, total_steps)
    eval_every = cfg.eval.every_steps or max(1, round(cfg.eval.every_epochs * steps_per_epoch))
    eval_bs = cfg.eval.batch_size or 2 * cfg.train.batch_size
    ev = features["eval"]

    def sample_batches():  # for data-driven initialisations (EVA); numpy-seeded, leaves torch's RNG alone
        for idx in sampler.global_batches():
            yield _to_device(collate([train_ex[i] for i in idx]), acc.device)

    model = _model_for_task(cfg, task, source, splits, tokenizer, total_steps, sample_batches)
    if cfg.train.fast_dropout and acc.device.type == "cpu":  # torch's CUDA dropout kernel is already fast
        from .train.dropout import use_fast_dropout

        use_fast_dropout(model)
    trainable, total = count_params(model)
    acc.print(f"run folder: {run_path}\nmodel: {cfg.model.name} ({source.origin})  method: {cfg.method.name}  "
              f"trainable: {trainable:,} / {total:,} ({trainable / total:.2%})  precision: {_precision_name(acc.mixed_precision)}")
    method = get_method(cfg.method.name)
    groups = split_groups(model)
    lr_scale, mults = _lr_scale(cfg, method, groups, None if legacy else getattr(model, "_slimtune_new_head", None))
    if acc.is_main_process:
        rd.write_json("param_groups.json", {"groups": groups.names, "lr_multipliers": mults, "note": groups.note,
                                            "trainable_per_group": _trainable_per_group(model, groups)})
    if groups.note:
        acc.print(f"[groups] {groups.note}")
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, lr_scale)
    transfer_cbs, lr_fn = _transfer_callbacks(cfg, model, groups, total_steps, steps_per_epoch, seq_len, acc)
    model, optimizer = acc.prepare(model, optimizer)

    cbs = list(callbacks or [])
    cbs.insert(0, tracking)
    if method.on_optimizer_step:
        cbs.append(_MethodStep(method))
    cbs += transfer_cbs
    if cfg.train.early_stopping.patience:
        cbs.append(EarlyStopping(cfg.train.early_stopping.patience, cfg.train.early_stopping.min_delta))
    progress = TrainProgress(total_steps, enabled=acc.is_main_process and sys.stderr.isatty())
    loop = Loop(accelerator=acc, model=model, optimizer=optimizer, train_loader=loader, sampler=sampler,
                eval_batches=eval_batches(_lengths(ev), eval_bs), eval_examples=ev,
                collate=collate, task=task, cfg=cfg, run=rd, callbacks=cbs, total_steps=total_steps,
                steps_per_epoch=steps_per_epoch, eval_every=eval_every,
                warmup=warmup_steps(cfg.train.warmup, total_steps), progress=progress,
                num_labels=len(splits.meta.get("labels", [])), lr_fn=lr_fn)
    if hasattr(task, "loss_kwargs"):  # causal LM: every token weighs the same in the loss (see causal_lm.loss_kwargs)
        loop.loss_kwargs = task.loss_kwargs(cfg, acc.unwrap_model(model), train_ex, sampler.per_rank() * acc.num_processes)
        if loop.loss_kwargs:
            rd.write_json("loss.json", {"num_items_in_batch": loop.loss_kwargs["num_items_in_batch"],
                                        "rule": "summed token loss / mean scored tokens per batch over the epoch"})
    if hasattr(task, "train_loss_fn"):  # causal LM: logits of the scored positions only
        loop.loss_fn = task.train_loss_fn(cfg, acc.unwrap_model(model), loop.loss_kwargs)
    if resume is not None:
        loop.restore(run_path / "checkpoints" / "last")
        rd.truncate_metrics(loop.state["step"])
        acc.print(f"resuming from step {loop.state['step']} of {total_steps}")

    base_summary = {
        "run_dir": str(run_path), "task": cfg.task, "model": cfg.model.name, "method": cfg.method.name,
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "precision": acc.mixed_precision, "num_processes": acc.num_processes, "seed": cfg.train.seed,
        "total_steps": total_steps, "versions": versions(), "git": git_hash(), "hardware": hardware(),
    }
    base_summary = tracking.begin(base_summary)
    rd.write_json("summary.json", tracking.progress(loop))  # with the earlier sessions' cost, should this one be killed
    unstarted.path = None  # training starts: from here on the folder holds a run, whatever happens
    trained = False
    try:
        with progress:
            loop.fit()
        trained = True
        return _finish(cfg, acc, loop, rd, tracking, features, source, tokenizer, base_summary, eval_bs, wall0)
    except KeyboardInterrupt:
        with interrupts_deferred():  # a second Ctrl-C must not cut the checkpoint or the summary short
            if not trained:  # after fit() the weights may be the best step's; checkpoints/last holds the final ones
                loop.save_interrupt_checkpoint()
            rd.write_json("summary.json", tracking.end({"status": "interrupted", "step": loop.state["step"], **base_summary}, loop))
        acc.print(f"\ninterrupted at step {loop.state['step']}; checkpoint saved. Resume with:\n"
                  f"  slimtune run --resume {run_path}")
        raise
    except BaseException:
        rd.write_json("summary.json", tracking.end({"status": "failed", "step": loop.state["step"], **base_summary}, loop))
        raise


class _Unstarted:
    """A new run folder that fails before training starts (a corrupt model, a full disk) is removed: it would hold
    no result and no summary, and `runs list` would never show it. `path = None` once training starts."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self.path is not None:
            import shutil

            shutil.rmtree(self.path, ignore_errors=True)
        return False


def _finish(cfg, acc, loop, rd, tracking, features, source, tokenizer, base_summary, eval_bs, wall0) -> RunResult:
    """The run's result is the best evaluation: load it, save the adapter, test it, write the summary."""
    state, run_path = loop.state, rd.path
    unwrapped = acc.unwrap_model(loop.model)
    best_path = run_path / "checkpoints" / "best"
    acc.wait_for_everyone()
    if (best_path / "trainable.safetensors").exists():
        checkpoint.load(best_path, unwrapped)
    if acc.is_main_process:
        with atomic.folder(run_path / "adapter") as tmp:
            save_adapter(unwrapped, cfg.method, tmp, source.hub_id or source.path, cfg.task)
            tokenizer.save_pretrained(str(tmp))
    test_metrics = None
    status = loop.stop_status  # 'pruned' when a sweep stopped it: no test evaluation
    if "test" in features and status != "pruned":
        test = features["test"]
        test_metrics = loop.evaluate(test, eval_batches(_lengths(test), eval_bs))
        rd.log({"type": "test", "step": state["step"], **{f"test_{k}": v for k, v in test_metrics.items()}})
        acc.print("test  " + "  ".join(f"{k}={v:.4f}" for k, v in test_metrics.items()))
        tracking.on_test_end(loop)
    secs = max(state["train_seconds"], 1e-9)
    summary = {
        "status": status, **base_summary,
        "steps": state["step"], "stopped_early": state["stopped"],
        "monitor": cfg.monitor, "best_step": state["best_step"], "best": state["best_metrics"],
        "final": loop.last_metrics, "test": test_metrics,
        "wall_seconds": time.perf_counter() - wall0, "train_seconds": state["train_seconds"],
        "samples_seen": state["samples"], "tokens_seen": state["tokens"],
        "samples_per_s": state["samples"] / secs, "tokens_per_s": state["tokens"] / secs,
        **peak_memory_mb(),
    }
    summary = tracking.end(summary, loop)
    rd.write_json("summary.json", summary)
    acc.wait_for_everyone()
    acc.print(f"done: best {cfg.monitor}={state['best_value']:.4f} at step {state['best_step']}; adapter in {run_path / 'adapter'}")
    return RunResult(run_path, status, state["best_metrics"] or {}, loop.last_metrics, test_metrics, summary)


# -- using a finished run ------------------------------------------------------

@dataclass
class LoadedRun:
    cfg: RunConfig
    meta: dict
    model: torch.nn.Module
    tokenizer: object
    task: object


def load_run(run_dir: str | Path, device: str | None = None, trust_run_code: bool = False) -> LoadedRun:
    """The base model with the run's adapter, its tokenizer and task facts.

    `trust_run_code`: load a run folder whose model runs code (model.trust_remote_code, a factory); refused
    otherwise, since a copied run folder is code (track/guard.py)."""
    from .tasks.common import Splits

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    if not ((adapter / "adapter_config.json").is_file() or (adapter / "slimtune_adapter.json").is_file()):
        raise FileNotFoundError(f"{run_dir}: no adapter/adapter_config.json; is this a finished run folder? (a run that was "
                                f"interrupted can be finished with `slimtune run --resume {run_dir}`)")
    cfg = load_config(run_dir / "config.yaml")
    meta = RunDir(run_dir).read_json("meta.json")
    guard.check_run_code(run_dir, cfg, meta, trust_run_code)
    task = get_task(cfg.task)
    from .models import ModelSource

    saved = meta.get("model_source") or {}
    source = ModelSource(**saved) if saved.get("origin") == "factory" else _resolve_model(cfg)
    tokenizer = _load_processor(task, cfg, ModelSource(str(adapter), None, None, "folder"))
    splits = Splits(None, None, None, None, meta=meta)
    method = get_method(cfg.method.name)  # the base as it was trained (QLoRA: 4-bit), not a full-precision copy
    base, _ = task.load_model(cfg, source, splits, **(method.load_kwargs(cfg.method) if method.load_kwargs else {}))
    if hasattr(base, "config") and getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = getattr(tokenizer, "pad_token_id", None)
    model = load_adapter(base, adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return LoadedRun(cfg, meta, model, tokenizer, task)


def evaluate(run_dir: str | Path, data: str, batch_size: int | None = None, trust_run_code: bool = False) -> dict:
    """Metrics of a finished run's adapter on another data file (same columns as training)."""
    from .data.readers import read_source
    from .data.validate import DataReport
    from .tasks.common import Splits
    from .train.loop import eval_parts

    lr = load_run(run_dir, trust_run_code=trust_run_code)
    cfg, task = lr.cfg, lr.task
    ds = task.read_eval(cfg, data) if hasattr(task, "read_eval") else read_source(data)
    splits = Splits(None, None, ds, DataReport(), meta=lr.meta, sources={"test": data})
    task.check_eval_data(cfg, splits)
    examples = task.featurize(cfg, lr.tokenizer, splits)["test"]
    bs = batch_size or cfg.eval.batch_size or 2 * cfg.train.batch_size
    device = next(lr.model.parameters()).device
    prec = resolve_precision(cfg.train.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if prec == "bf16" else None
    import contextlib

    parts = eval_parts(lr.model, task, task.collate(lr.tokenizer), examples,
                       eval_batches(_lengths(examples), bs), device, autocast or contextlib.nullcontext)
    wanted = cfg.eval.metrics or task.DEFAULT_METRICS
    metrics = task.compute_metrics(parts, wanted, len(lr.meta.get("labels", [])))
    for w in splits.report.warnings:
        print(f"[data warning] {w}", file=sys.stderr)
    return {"data": data, "examples": len(examples), **metrics}


def predict(run_dir: str | Path, inputs: list[str], trust_run_code: bool = False, **kwargs) -> list[dict]:
    """Labels and probabilities (classification) or generated text (causal-lm) for the inputs."""
    lr = load_run(run_dir, trust_run_code=trust_run_code)
    kwargs.setdefault("max_length", lr.cfg.model.max_length)
    return lr.task.predict(lr.model, lr.tokenizer, list(inputs), lr.meta, **kwargs)


def merge(run_dir: str | Path, out_dir: str | Path, trust_run_code: bool = False) -> Path:
    """Write the base model with the run's adapter folded into its weights (a plain transformers model)."""
    from .methods import merge as merge_adapter

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: exists and is not empty; choose a new folder")
    lr = load_run(run_dir, device="cpu", trust_run_code=trust_run_code)
    merged = merge_adapter(lr.model, Path(run_dir) / "adapter")
    with atomic.folder(out_dir) as tmp:
        if hasattr(merged, "save_pretrained"):
            merged.save_pretrained(str(tmp))
        else:  # a factory model (model.factory): its weights, and what rebuilds the module around them
            _save_factory_model(merged, lr, tmp)
        lr.tokenizer.save_pretrained(str(tmp))
    return out_dir


def _save_factory_model(model, lr: LoadedRun, folder: Path) -> None:
    """`model.safetensors` (the merged state dict) and `slimtune_model.json`: the factory and its
    arguments, so `build(**args).load_state_dict(load_file("model.safetensors"))` restores the model;
    no transformers class exists to do it for a user's own module."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    labels = lr.meta.get("labels")
    info = {"factory": (lr.meta.get("model_source") or {}).get("path") or lr.cfg.model.factory, "factory_args": lr.cfg.model.factory_args, "labels": labels,
            "num_labels": len(labels) if labels else None, "task": lr.cfg.task,
            "load": "build(num_labels=..., labels=..., **factory_args).load_state_dict("
                    "safetensors.torch.load_file('model.safetensors'))"}
    (folder / "slimtune_model.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


def sweep(config, overrides: list[str] | None = None, **kwargs):
    """Hyperparameter search with pruning over the config's `sweep:` section; each trial is a `run()`
    (slimtune.sweep.study.sweep: workers, storage, trials, timeout_minutes, name)."""
    from .sweep.study import sweep as run_sweep

    return run_sweep(config, overrides, **kwargs)


def lr_find(config, overrides: list[str] | None = None, **kwargs):
    """The LR range test for a config: suggested lr, loss-vs-lr plot (slimtune.sweep.lrfind.lr_find)."""
    from .sweep.lrfind import lr_find as range_test

    return range_test(config, overrides, **kwargs)
