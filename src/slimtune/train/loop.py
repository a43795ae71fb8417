"""The training loop: one explicit loop over batches (accumulate, clip, step,
schedule, log, evaluate, checkpoint), with features hooked in through callbacks.

Everything that a resumed run needs to continue exactly where it stopped lives
in `self.state` (a TrainState, state.json) plus the checkpointed weights, optimizer and RNG.
The loop is built once from typed pieces (LoopData, StepPlan, LossHooks) and never changed afterwards.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import RunFolderError
from ..tasks.base import LossHooks
from ..track import atomic
from . import checkpoint
from .callbacks import RESUMED_ON, StopTraining, extra_metrics, fire
from .schedules import lr_factor
from .state import TrainState

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..config import RunConfig
    from ..data.batching import LengthGroupedBatches
    from ..tasks.base import Task
    from ..track.rundir import RunDir
    from .progress import TrainProgress


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass(frozen=True)
class StepPlan:
    """The step arithmetic of a run, fixed before it starts."""

    total_steps: int
    steps_per_epoch: int  # optimizer steps per epoch of this process's batches
    eval_every: int  # optimizer steps between evaluations
    warmup: int  # warmup steps of the lr schedule
    grad_accum: int
    log_every: int


@dataclass(frozen=True)
class LoopData:
    train_loader: torch.utils.data.DataLoader
    sampler: LengthGroupedBatches
    eval_examples: list
    eval_batches: list[list[int]]  # indices into eval_examples, length-sorted
    collate: Callable  # evaluation batches
    num_labels: int  # 0 where the task has no classes


class Loop:
    def __init__(self, *, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 data: LoopData, plan: StepPlan, task: Task, cfg: RunConfig, run: RunDir, callbacks: list,
                 loss: LossHooks = LossHooks(), lr_fn: Callable[[int], float] | None = None,
                 progress: TrainProgress | None = None):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.plan = plan
        self.task = task
        self.cfg = cfg
        self.run = run
        self.callbacks = callbacks
        self.loss = loss
        self.progress = progress
        # lr multiplier as a function of the step; staged fine-tuning brings its own
        self.lr_fn = lr_fn or (lambda step: lr_factor(step, plan.total_steps, plan.warmup, cfg.train.schedule))
        self.log_extras: dict = {}  # callbacks add what they change (trainable groups, sequence length)
        self.monitor = cfg.monitor
        self.higher = cfg.higher_is_better
        self.wanted = cfg.eval.metrics or task.spec.default_metrics
        if self.monitor not in self.wanted and self.monitor in task.spec.metrics:  # else a callback's (gen_chrf)
            self.wanted = tuple(self.wanted) + (self.monitor,)
        self.state = TrainState()
        # what checkpoints hold: every parameter the method trains, frozen for now or not (transfer callbacks
        # freeze some of them from on_train_begin on, after this)
        self.saved_params = checkpoint.trainable_names(accelerator.unwrap_model(model))
        self._pending = [0, 0, 0]  # samples, tokens, token slots of the optimizer steps since the last fold
        self._rng = checkpoint.rng_state()
        self.last_metrics: dict = {}
        self.last_parts: dict = {}  # per-example outputs of the last evaluation (the confusion matrix's input)
        self.last_train_record: dict | None = None  # the last "train" record logged (lr-find reads its loss)
        self.stop_status = "completed"  # or the status of the StopTraining that ended fit()

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    @property
    def num_labels(self) -> int:
        return self.data.num_labels

    # -- the loop ---------------------------------------------------------
    def fit(self) -> TrainState:
        state = self.state
        self.model.train()
        window = defaultdict(float)  # the loss and steps since the last train log
        try:
            fire(self.callbacks, "on_train_begin", self)  # may stop it already (a resume at its pause step)
            if self._eval_due() and 0 < state.step < self.total_steps:
                self.evaluate_and_checkpoint()  # an interrupt cut this step's evaluation short: it is done now
            while state.step < self.total_steps and not state.stopped:
                window = self._epoch(window)
        except StopTraining as stop:
            state.stopped, state.stop_status, state.stopped_of = stop.reason, stop.status, self.total_steps
            self.stop_status = stop.status
            self._record_stop()
            self.accelerator.print(stop.reason)
        if window["steps"]:  # steps since the last log (early stop, pruning): their loss too
            self._log_train(window)
        self._fold_counts()
        if state.last_eval_step != state.step:
            self.evaluate_and_checkpoint()
        fire(self.callbacks, "on_train_end", self)
        return state

    def _epoch(self, window: defaultdict) -> defaultdict:
        """The rest of the current epoch (from where a resume left it), or up to the last step."""
        state, accum, accelerator = self.state, self.plan.grad_accum, self.accelerator
        self.data.sampler.set_epoch(state.epoch, start=state.micro_in_epoch)
        n_micro = self.data.sampler.per_rank()
        micro = state.micro_in_epoch
        t0 = time.perf_counter()
        group = [0, 0, 0]  # samples, tokens, token slots of this accumulation group: counted once it steps
        for batch in self.data.train_loader:
            micro += 1
            group_start = ((micro - 1) // accum) * accum
            in_group = min(accum, n_micro - group_start)
            sync = (micro - group_start) == in_group
            batch = _to(batch, accelerator.device)
            ctx = contextlib.nullcontext() if sync else accelerator.no_sync(self.model)
            with ctx, accelerator.autocast():
                loss = (self.loss.loss_fn(self.model, batch) if self.loss.loss_fn is not None
                        else self.model(**batch, **self.loss.forward_kwargs).loss)
            accelerator.backward(loss / in_group)
            # tensors, not Python numbers: no host sync per micro-batch (it stalls a GPU)
            samples, tokens = self.task.count(batch)
            slots = self.task.token_slots(batch)
            window["loss"] = window["loss"] + loss.detach().float() / in_group
            group = [group[0] + samples, group[1] + tokens, group[2] + (slots or 0)]
            if not sync:
                continue
            self._optimizer_step()
            state.step += 1
            state.micro_in_epoch = micro
            state.train_seconds += time.perf_counter() - t0
            self._pending = [p + g for p, g in zip(self._pending, group)]
            group = [0, 0, 0]
            window["steps"] += 1
            self._rng = checkpoint.rng_state()
            if state.step % self.plan.log_every == 0 or state.step == self.total_steps:
                self._log_train(window)
                window = defaultdict(float)
            fire(self.callbacks, "on_step_end", self)
            if self._eval_due():
                self.evaluate_and_checkpoint()
            if state.step >= self.total_steps:
                return window
            t0 = time.perf_counter()
        state.epoch += 1
        state.micro_in_epoch = 0
        return window

    def _eval_due(self) -> bool:
        state = self.state
        return state.last_eval_step != state.step and (
            state.step % self.plan.eval_every == 0 or state.step == self.total_steps)

    def _fold_counts(self) -> None:
        """The samples / tokens of the optimizer steps taken since the last fold go into the state: the one
        host sync for them, at each log and before each checkpoint (a resumed run counts what it saved)."""
        n_proc = self.accelerator.num_processes
        self.state.samples += int(self._pending[0]) * n_proc
        self.state.tokens += int(self._pending[1]) * n_proc
        if self.state.token_slots is not None:
            self.state.token_slots += int(self._pending[2]) * n_proc
        self._pending = [0, 0, 0]

    def _record_stop(self) -> None:
        """Training ended early at this step: the last checkpoint, when it is of this step, says so, so that a
        resume after an interrupt in the finish phase (best reload, adapter, test) finishes instead of training on."""
        path = self.run.path / "checkpoints" / "last" / "state.json"
        if not self.accelerator.is_main_process or not path.is_file():
            return
        saved = json.loads(path.read_text(encoding="utf-8"))
        state = self.state
        if saved.get("step") == state.step and saved.get("last_eval_step") == state.step:
            stop = {"stopped": state.stopped, "stop_status": state.stop_status, "stopped_of": state.stopped_of}
            atomic.write_json(path, {**saved, **stop})

    def _optimizer_step(self) -> None:
        cfg = self.cfg.train
        if cfg.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        factor = self.lr_fn(self.state.step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        self.optimizer.step()
        fire(self.callbacks, "on_optimizer_step", self)  # gradients still present (AdaLoRA)
        self.optimizer.zero_grad(set_to_none=True)

    # -- logging ------------------------------------------------------------
    def _log_train(self, window: dict) -> None:
        state, accelerator = self.state, self.accelerator
        loss = torch.as_tensor(window["loss"] / max(1.0, window["steps"]), dtype=torch.float32).to(accelerator.device)
        loss = float(accelerator.reduce(loss, "mean")) if accelerator.num_processes > 1 else float(loss)
        self._fold_counts()
        secs = max(state.train_seconds, 1e-9)
        rec = {
            "type": "train", "step": state.step, "epoch": round(state.step / self.plan.steps_per_epoch, 4),
            "loss": loss, "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)},
            "samples_per_s": state.samples / secs, "tokens_per_s": state.tokens / secs, **self.log_extras,
        }
        self.run.log(rec)
        self.last_train_record = rec
        if self.progress is not None:
            unit = self.task.spec.throughput_unit
            self.progress.update(state.step, loss=loss, lr=self.optimizer.param_groups[0]["lr"],
                                 speed=rec[f"{unit}_per_s"], unit=unit)

    # -- evaluation ---------------------------------------------------------
    def evaluate(self, examples: list | None = None, batches: list[list[int]] | None = None) -> dict:
        """Metrics on the eval split (or the given examples), gathered across processes."""
        from accelerate.utils import gather_object

        accelerator = self.accelerator
        examples = self.data.eval_examples if examples is None else examples
        batches = self.data.eval_batches if batches is None else batches
        mine = batches[accelerator.process_index::accelerator.num_processes]
        # the unwrapped model: DDP's forward broadcasts buffers, a collective that would hang
        # when processes hold different numbers of eval batches. A sharded model's forward is a collective
        # itself (each layer gathers its weights): a process one batch short runs one more for it alone
        model = accelerator.unwrap_model(self.model)
        short = -(-len(batches) // accelerator.num_processes) - len(mine) if checkpoint.sharded(model) else 0
        local = eval_parts(model, self.task, self.data.collate, examples, mine, accelerator.device,
                           accelerator.autocast, idle_batches=batches[:1] * short)
        if accelerator.num_processes > 1:
            gathered = [g for g in gather_object([local]) if g]
            local = {k: torch.cat([g[k] for g in gathered]) for k in gathered[0]}
        self.last_parts = local
        return self.task.compute_metrics(local, self.wanted, self.num_labels)

    def _improved(self, value: float) -> bool:
        best = self.state.best_value
        if best is None or math.isnan(best):
            return not math.isnan(value)
        delta = self.cfg.train.early_stopping.min_delta
        return value > best + delta if self.higher else value < best - delta

    def evaluate_and_checkpoint(self) -> dict:
        state = self.state
        self._fold_counts()
        metrics = {**self.evaluate(), **extra_metrics(self.callbacks, self)}  # the task's, then e.g. generation's
        value = metrics[self.monitor]
        improved = self._improved(value)
        # the state after this evaluation; the loop takes it only once the checkpoints are on disk, so an
        # interrupt during a save never leaves a best step named whose weights were not written (the saved
        # state says this evaluation is still to do, and a resume does it)
        if improved:
            new = state.replace(last_eval_step=state.step, last_metrics=metrics, best_value=value,
                                best_step=state.step, evals_since_best=0, best_metrics=metrics)
        else:
            new = state.replace(last_eval_step=state.step, last_metrics=metrics,
                                evals_since_best=state.evals_since_best + 1)
        unwrapped = self.accelerator.unwrap_model(self.model)
        # collectives: every process is here, the evaluation just gathered its outputs
        rng = checkpoint.rng_of_every_process(self.accelerator, self._rng) if self.cfg.output.save_checkpoints else None
        whole = checkpoint.gathered(unwrapped, self.optimizer if self.cfg.output.save_checkpoints else None,
                                    self.saved_params)
        if self.accelerator.is_main_process:
            checkpoints = self.run.path / "checkpoints"
            if improved:
                checkpoint.save(checkpoints / "best", unwrapped, loop_state=new.to_json(), names=self.saved_params,
                                whole=whole)
            if self.cfg.output.save_checkpoints:
                checkpoint.save(checkpoints / "last", unwrapped, self.optimizer, new.to_json(), rng,
                                names=self.saved_params, extra=self._extra_state(), whole=whole)
        self.accelerator.wait_for_everyone()
        state.assign(new)  # in place: fit() and callbacks hold this object
        self.last_metrics = metrics
        rec = {"type": "eval", "step": state.step, "epoch": round(state.step / self.plan.steps_per_epoch, 4),
               **{f"eval_{k}": v for k, v in metrics.items()}, "best": improved}
        self.run.log(rec)
        self.accelerator.print(f"step {state.step}/{self.total_steps}  "
                               + "  ".join(f"eval_{k}={v:.4f}" for k, v in metrics.items())
                               + ("  (best)" if improved else ""))
        fire(self.callbacks, "on_eval_end", self, metrics)
        return metrics

    def _stateful(self) -> list:
        return [cb for cb in self.callbacks if getattr(cb, "state_key", None)]

    def _extra_state(self) -> dict:
        """{key: (tensors, data)} of the callbacks that hold training state of their own (AdaLoRA's allocator)."""
        return {cb.state_key: cb.state_dict(self) for cb in self._stateful()}

    def save_interrupt_checkpoint(self) -> None:
        """Ctrl-C: keep the state as of the last completed optimizer step. No collective (see checkpoint.py):
        the main process saves the checkpoint with its RNG state, each other process its own RNG state."""
        self._fold_counts()
        accelerator, checkpoints = self.accelerator, self.run.path / "checkpoints"
        if checkpoint.sharded(accelerator.unwrap_model(self.model)):
            return accelerator.print("the model is sharded: gathering it needs every process, which an interrupt "
                                     f"cannot ask for; a resume starts at step {self.state.last_eval_step}")
        if accelerator.is_main_process:
            checkpoint.save(checkpoints / "last", accelerator.unwrap_model(self.model), self.optimizer,
                            self.state.to_json(), checkpoint.rank_states([self._rng]), names=self.saved_params,
                            extra=self._extra_state())
        else:
            checkpoint.save_rank_rng(checkpoints, accelerator.process_index, self.state.step, self._rng)

    def leave_together(self) -> None:
        """After an interrupt's saves: the launcher stops all processes once one exits, so none leaves before all
        saved. One interrupted inside a collective never comes: the barrier fails (the saves are done: ignored)
        or waits for the launcher's shutdown after Ctrl-C."""
        if self.accelerator.num_processes > 1:
            with contextlib.suppress(RuntimeError):
                self.accelerator.wait_for_everyone()

    def restore(self, path: Path) -> None:
        if str(self.accelerator.distributed_type).endswith("DEEPSPEED"):
            raise RunFolderError("a DeepSpeed run cannot resume: its optimizer state is partitioned across the "
                                 "processes, checkpoints/last holds the main one's part only; start it again")
        saved, rng = checkpoint.load(path, self.accelerator.unwrap_model(self.model), self.optimizer)
        state = TrainState.from_json(saved)
        # a run that stopped early and was interrupted while finishing stays stopped (see _record_stop), unless
        # the resume extends it (another total: it trains on)
        stays = state.stop_status not in (None, *RESUMED_ON) and state.stopped_of == self.total_steps
        if not stays:
            state.stopped = None
        self.stop_status = state.stop_status if stays else "completed"
        self.state = state
        self.last_metrics = state.last_metrics or {}
        for cb in self._stateful():
            cb.load_state_dict(self, checkpoint.load_extra(path, cb.state_key))
        rng = checkpoint.rng_for_rank(rng, self.accelerator.process_index, state.step, Path(path).parent)
        if rng is not None:
            checkpoint.set_rng_state(rng)
            self._rng = rng


@contextlib.contextmanager
def interrupts_deferred(note: str = "still saving the checkpoint and the summary; one moment"):
    """A second Ctrl-C while the block runs (saving after the first one) prints `note` instead of cutting the
    save short; the previous SIGINT handler is back afterwards. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def say(signum, frame):
        print(f"\n{note}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, say)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


@torch.inference_mode()
def eval_parts(model: torch.nn.Module, task: Task, collate: Callable, examples: list, batches: list[list[int]],
               device: torch.device, autocast: Callable = contextlib.nullcontext,
               idle_batches: list[list[int]] = ()) -> dict:
    """Per-example eval outputs (predictions, losses) of the given batches, concatenated; `idle_batches` run
    after them only for the collectives a sharded model's forward takes part in, their outputs dropped."""
    was_training = model.training
    model.eval()
    parts = defaultdict(list)
    with autocast():
        for idx in batches:
            batch = _to(collate([examples[i] for i in idx]), device)
            for k, v in task.eval_step(model, batch).items():
                parts[k].append(v.float().cpu())
        for idx in idle_batches:
            task.eval_step(model, _to(collate([examples[i] for i in idx]), device))
    if was_training:
        model.train()
    return {k: torch.cat(v) for k, v in parts.items()}
