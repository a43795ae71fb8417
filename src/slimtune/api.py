"""The verbs, the same as the CLI's: run(), evaluate(), predict().

`run()` follows one config from YAML to an adapter on disk:
config -> data checks -> tokenizer -> features -> model + method -> loop -> run folder.
"""
from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import RunConfig, dump_config, load_config
from .data.batching import LengthGroupedBatches, eval_batches
from .finished import LoadedRun, evaluate, load_run, merge, predict  # noqa: F401  (the verbs on a finished run)
from .loading import lengths, load_processor, resolve_model, resolve_precision  # noqa: F401
from .methods import MethodContext, apply_method, get_method, save_adapter
from .tasks import get_task
from .track import atomic, guard
from .track.rundir import RunDir, git_hash, hardware, new_run_dir, versions
from .track.session import RunTracking
from .train import checkpoint
from .train.callbacks import EarlyStopping
from .train.loop import Loop, interrupts_deferred
from .train.groups import split_groups
from .train.optim import build_optimizer, default_head_lr, param_lr_scale, trainable_per_group  # noqa: F401
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
        guard.check_run_code(resume, cfg, guard.read_meta(resume), trust_run_code)
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
    source = resolve_model(cfg)
    tokenizer = load_processor(task, cfg, source)
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
    sampler = LengthGroupedBatches(lengths(train_ex), cfg.train.batch_size, cfg.train.seed,
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
        guard.record_extension(rd, changed, total_steps)
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
    lr_scale, mults = param_lr_scale(cfg, method, groups, None if legacy else getattr(model, "_slimtune_new_head", None))
    if acc.is_main_process:
        rd.write_json("param_groups.json", {"groups": groups.names, "lr_multipliers": mults, "note": groups.note,
                                            "trainable_per_group": trainable_per_group(model, groups)})
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
                eval_batches=eval_batches(lengths(ev), eval_bs), eval_examples=ev,
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
        test_metrics = loop.evaluate(test, eval_batches(lengths(test), eval_bs))
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


def sweep(config, overrides: list[str] | None = None, **kwargs):
    """Hyperparameter search with pruning over the config's `sweep:` section; each trial is a `run()`
    (slimtune.sweep.study.sweep: workers, storage, trials, timeout_minutes, name)."""
    from .sweep.study import sweep as run_sweep

    return run_sweep(config, overrides, **kwargs)


def lr_find(config, overrides: list[str] | None = None, **kwargs):
    """The LR range test for a config: suggested lr, loss-vs-lr plot (slimtune.sweep.lrfind.lr_find)."""
    from .sweep.lrfind import lr_find as range_test

    return range_test(config, overrides, **kwargs)
