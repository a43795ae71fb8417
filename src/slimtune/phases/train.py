"""Phases 5-8 of a run: model, loop, training, finish (see runner.py)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import RunConfig
from ..data.batching import eval_batches
from ..loading import lengths
from ..methods import MethodContext, apply_method, get_method, save_adapter
from ..models import pool_position_only, use_batch_pad
from ..tasks.base import Task
from ..track import atomic
from ..track.rundir import git_hash, hardware, versions
from ..train import checkpoint
from ..train.activation_checkpointing import check_checkpointing, enable_checkpointing
from ..train.callbacks import UNTESTED, Callback, EarlyStopping, MethodStep, fire
from ..train.fused_lora import fuse_lora_forward
from ..train.groups import Groups, split_groups
from ..train.loop import Loop, LoopData, interrupts_deferred
from ..train.optim import build_optimizer, param_lr_scale, trainable_per_group
from ..train.progress import TrainProgress
from ..train.transfer import transfer_callbacks
from .prepare import Batches, Inputs, RunFolder, Setup


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

# -- 5. model, method, parameter groups, optimizer -----------------------------------------------------------

@dataclass(frozen=True)
class BuiltModel:
    model: torch.nn.Module  # prepared by the accelerator (DDP-wrapped under torchrun)
    optimizer: torch.optim.Optimizer
    groups: Groups
    trainable: int
    total: int


def build_model(setup: Setup, inputs: Inputs, folder: RunFolder, batches: Batches) -> BuiltModel:
    cfg, accelerator = setup.cfg, setup.accelerator
    train = inputs.features["train"]
    check_checkpointing(cfg.train.gradient_checkpointing, get_method(cfg.method.name), accelerator.device)

    def sample_batches():  # for data-driven initialisations (EVA); numpy-seeded, leaves torch's RNG alone
        for idx in batches.sampler.global_batches():
            yield {k: v.to(accelerator.device) for k, v in batches.collate([train[i] for i in idx]).items()}

    model, new_head = model_for_task(cfg, setup.task, inputs, batches.plan.total_steps, sample_batches)
    if cfg.train.fast_dropout and accelerator.device.type == "cpu":  # torch's CUDA dropout kernel is already fast
        from ..train.dropout import use_fast_dropout

        use_fast_dropout(model)
    fuse_lora_forward(model)  # after the dropout swap: the fused forward draws FastDropout's masks itself
    enable_checkpointing(model, cfg.train.gradient_checkpointing)  # before DDP wraps it
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
    accelerator.print(f"run folder: {folder.path}\nmodel: {cfg.model.name} ({inputs.source.origin})  "
                      f"method: {cfg.method.name}  trainable: {trainable:,} / {total:,} ({trainable / total:.2%})  "
                      f"precision: {precision}")
    groups = split_groups(model)
    lr_scale, mults = param_lr_scale(cfg, get_method(cfg.method.name), groups, None if setup.legacy else new_head,
                                     setup.task.spec.new_head_lr_mult)
    if accelerator.is_main_process:
        folder.files.write_json("param_groups.json", {
            "groups": groups.names, "lr_multipliers": mults, "note": groups.note,
            "trainable_per_group": trainable_per_group(model, groups)})
    if groups.note:
        accelerator.print(f"[groups] {groups.note}")
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, lr_scale)
    model, optimizer = accelerator.prepare(model, optimizer)
    return BuiltModel(model, optimizer, groups, trainable, total)


def model_for_task(cfg: RunConfig, task: Task, inputs: Inputs, total_steps: int | None = None,
                   sample_batches: Callable | None = None) -> tuple[torch.nn.Module, list[str]]:
    """The task's model with the method applied; and the new head's modules where it trains at its own default
    rate (the task's spec says so, the checkpoint had no head of its own, the method is not head-only)."""
    method = get_method(cfg.method.name)
    load_kwargs = method.load_kwargs(cfg.method) if method.load_kwargs else {}
    loaded = task.load_model(cfg, inputs.source, inputs.splits, **load_kwargs)
    model = loaded.model
    use_batch_pad(model, inputs.processor)
    ctx = MethodContext(cfg.task, task.spec.peft_task_type, loaded.head, total_steps, sample_batches)
    model = apply_method(model, cfg.method, ctx)
    if cfg.train.pooled_position_only:  # after the method: EVA's initialisation reads every position
        pool_position_only(model)
    peft_cfg = getattr(model, "peft_config", {}).get("default")
    if peft_cfg is not None:  # the id the ecosystem loads the base from, not a site-packages path
        peft_cfg.base_model_name_or_path = inputs.source.hub_id or inputs.source.path
    fast = task.spec.new_head_lr_mult > 1 and loaded.head_is_new and cfg.method.name != "head-only"
    return model, list(loaded.head) if fast else []


# -- 6. callbacks, loss, the loop ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Trainer:
    loop: Loop
    progress: TrainProgress
    base_summary: dict  # what every summary.json of this run holds (model, method, sizes, versions, hardware)


def build_loop(setup: Setup, inputs: Inputs, folder: RunFolder, batches: Batches, built: BuiltModel,
               user_callbacks: list) -> Trainer:
    cfg, task, accelerator, plan = setup.cfg, setup.task, setup.accelerator, batches.plan
    unwrapped = accelerator.unwrap_model(built.model)
    transfer, lr_fn = transfer_callbacks(cfg, unwrapped, built.groups, plan, batches.shape, accelerator.num_processes)
    method = get_method(cfg.method.name)
    callbacks = [folder.tracking, *user_callbacks, *([MethodStep(method)] if method.on_optimizer_step else []),
                 *transfer]
    if cfg.train.early_stopping.patience:
        callbacks.append(EarlyStopping(cfg.train.early_stopping.patience, cfg.train.early_stopping.min_delta))
    if cfg.eval.generate is not None:
        callbacks.append(generation_callback(cfg, task, inputs, folder, accelerator.is_main_process))
    train = inputs.features["train"]
    loss = task.loss_hooks(cfg, unwrapped, train, batches.sampler.per_rank() * accelerator.num_processes)
    if loss.note:
        folder.files.write_json("loss.json", loss.note)
    evals = inputs.features["eval"]
    data = LoopData(batches.loader, batches.sampler, evals, eval_batches(lengths(evals), batches.eval_batch_size),
                    batches.collate, len(inputs.splits.meta.get("labels", [])))
    progress = TrainProgress(plan.total_steps, enabled=accelerator.is_main_process and sys.stderr.isatty())
    loop = Loop(accelerator=accelerator, model=built.model, optimizer=built.optimizer, data=data, plan=plan,
                task=task, cfg=cfg, run=folder.files, callbacks=callbacks, loss=loss, lr_fn=lr_fn, progress=progress)
    if setup.resume is not None:
        loop.restore(folder.path / "checkpoints" / "last")
        folder.files.truncate_metrics(loop.state.step)
        accelerator.print(f"resuming from step {loop.state.step} of {plan.total_steps}")
    base_summary = folder.tracking.begin({
        "run_dir": str(folder.path), "task": cfg.task, "model": cfg.model.name, "method": cfg.method.name,
        "trainable_params": built.trainable, "total_params": built.total,
        "trainable_share": built.trainable / built.total, "precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes, "seed": cfg.train.seed, "total_steps": plan.total_steps,
        "versions": versions(), "git": git_hash(), "hardware": hardware(),
    })
    return Trainer(loop, progress, base_summary)


def generation_callback(cfg: RunConfig, task: Task, inputs: Inputs, folder: RunFolder, main: bool) -> Callback:
    from ..train.generation import GenerationEval

    gen = cfg.eval.generate
    prompts = task.generation_prompts(cfg, inputs.processor, inputs.splits, gen.examples)
    return GenerationEval(gen, prompts, inputs.processor, folder.files, main)


# -- 7. training, and the status of a run that does not finish -----------------------------------------------

class ends_as_status:  # noqa: N801  (used as a context manager, named for how run() reads)
    """An interrupt saves a checkpoint and says how to resume; any other error marks the summary failed."""

    def __init__(self, folder: RunFolder, trainer: Trainer):
        self.folder, self.trainer = folder, trainer
        self.trained = False  # fit() returned: the weights may be the best step's, checkpoints/last the final ones

    def __enter__(self) -> ends_as_status:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            return False
        loop, tracking, files = self.trainer.loop, self.folder.tracking, self.folder.files
        if issubclass(exc_type, KeyboardInterrupt):
            with interrupts_deferred():  # a second Ctrl-C must not cut the checkpoint or the summary short
                if not self.trained:
                    loop.save_interrupt_checkpoint()
                summary = {"status": "interrupted", "step": loop.state.step, **self.trainer.base_summary}
                files.write_json("summary.json", tracking.end(summary, loop))
                loop.leave_together()
            loop.accelerator.print(f"\ninterrupted at step {loop.state.step}; checkpoint saved. Resume with:\n"
                                   f"  slimtune run --resume {self.folder.path}")
        else:
            summary = {"status": "failed", "step": loop.state.step, **self.trainer.base_summary}
            files.write_json("summary.json", tracking.end(summary, loop))
        return False


def fit(folder: RunFolder, trainer: Trainer, ending: ends_as_status) -> None:
    # with the earlier sessions' cost, should this one be killed
    folder.files.write_json("summary.json", folder.tracking.progress(trainer.loop))
    folder.unstarted.path = None  # training starts: from here on the folder holds a run, whatever happens
    with trainer.progress:
        trainer.loop.fit()
    ending.trained = True


# -- 8. best weights, adapter, test, summary -----------------------------------------------------------------

def finish(setup: Setup, inputs: Inputs, folder: RunFolder, batches: Batches, trainer: Trainer) -> RunResult:
    """The run's result is the best evaluation: load it, save the adapter, test it, write the summary."""
    cfg, accelerator, loop = setup.cfg, setup.accelerator, trainer.loop
    state, source = loop.state, inputs.source
    unwrapped = accelerator.unwrap_model(loop.model)
    best = folder.path / "checkpoints" / "best"
    accelerator.wait_for_everyone()
    if (best / "trainable.safetensors").exists():
        checkpoint.load(best, unwrapped)
    fire(loop.callbacks, "on_best_loaded", loop)
    fitted = setup.task.fit_after_training(unwrapped, lambda: best_eval_parts(loop), inputs.splits.meta)
    if fitted:  # the best checkpoint's own facts (thresholds): beside the labels, where evaluate / predict read them
        inputs.splits.meta.update(fitted)
        if accelerator.is_main_process:
            folder.files.write_json("meta.json", {**folder.files.read_json("meta.json"), **fitted})
    whole = checkpoint.trainable_state(unwrapped) if checkpoint.sharded(unwrapped) else None  # on every process
    if accelerator.is_main_process:
        with atomic.folder(folder.path / "adapter") as tmp:
            save_adapter(unwrapped, cfg.method, tmp, source.hub_id or source.path, cfg.task, whole)
            inputs.processor.save_pretrained(str(tmp))
    test_metrics = None
    status = loop.stop_status  # 'pruned' (a sweep stopped it) or 'paused' (a select rung ended): no test evaluation
    if "test" in inputs.features and status not in UNTESTED:
        test_metrics = run_test(loop, inputs.features["test"], batches.eval_batch_size)
    secs = max(state.train_seconds, 1e-9)
    summary = folder.tracking.end({
        "status": status, **trainer.base_summary,
        "steps": state.step, "stopped_early": state.stopped,
        "monitor": cfg.monitor, "best_step": state.best_step, "best": state.best_metrics,
        "final": loop.last_metrics, "test": test_metrics,
        "wall_seconds": time.perf_counter() - setup.started, "train_seconds": state.train_seconds,
        "samples_seen": state.samples, "tokens_seen": state.tokens,
        "samples_per_s": state.samples / secs, "tokens_per_s": state.tokens / secs,
        # real (non-padding) tokens / the token positions of the training batches; packed rows: near 1
        "real_token_share": state.tokens / state.token_slots if state.token_slots else None,
    }, loop)
    folder.files.write_json("summary.json", summary)
    accelerator.wait_for_everyone()
    ended = "paused" if status == "paused" else "done"
    accelerator.print(f"{ended}: best {cfg.monitor}={state.best_value:.4f} at step {state.best_step}; "
                      f"adapter in {folder.path / 'adapter'}")
    return RunResult(folder.path, status, state.best_metrics or {}, loop.last_metrics, test_metrics, summary)


def best_eval_parts(loop: Loop) -> dict:
    """The eval split's per-example outputs with the best weights (loaded): the last evaluation's when it was of
    the best step, else the eval split evaluated again (a resumed run, a best step before the last)."""
    if not (loop.last_parts and loop.state.best_step == loop.state.last_eval_step):
        loop.evaluate()
    return loop.last_parts


def run_test(loop: Loop, test: list[dict], batch_size: int) -> dict:
    """The test split with the best weights; logged as a 'test' record and told to the callbacks."""
    metrics = loop.evaluate(test, eval_batches(lengths(test), batch_size))
    loop.run.log({"type": "test", "step": loop.state.step, **{f"test_{k}": v for k, v in metrics.items()}})
    loop.accelerator.print("test  " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    fire(loop.callbacks, "on_test_end", loop, metrics)
    return metrics
