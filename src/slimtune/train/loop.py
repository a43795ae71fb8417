"""The training loop: one explicit loop over batches (accumulate, clip, step,
schedule, log, evaluate, checkpoint), with features hooked in through callbacks.

Everything that a resumed run needs to continue exactly where it stopped lives
in `self.state` (plain JSON) plus the checkpointed weights, optimizer and RNG.
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

import torch

from ..track import atomic
from . import checkpoint
from .callbacks import StopTraining, fire
from .schedules import lr_factor


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Loop:
    def __init__(self, *, accelerator, model, optimizer, train_loader, sampler, eval_batches, eval_examples,
                 collate, task, cfg, run, callbacks, total_steps, steps_per_epoch, eval_every, warmup, progress=None,
                 num_labels=None, lr_fn=None):
        self.acc = accelerator
        self.model = model
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.sampler = sampler
        self.eval_batches = eval_batches
        self.eval_examples = eval_examples
        self.collate = collate
        self.task = task
        self.cfg = cfg
        self.run = run
        self.callbacks = callbacks
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.eval_every = eval_every
        self.warmup = warmup
        self.progress = progress
        self.num_labels = num_labels
        # lr multiplier as a function of the step; staged fine-tuning brings its own
        self.lr_fn = lr_fn or (lambda step: lr_factor(step, self.total_steps, self.warmup, self.cfg.train.schedule))
        self.log_extras: dict = {}  # callbacks add what they change (trainable groups, sequence length)
        self.loss_kwargs: dict = {}  # extra forward arguments for the training loss (num_items_in_batch)
        self.loss_fn = None  # (model, batch) -> training loss, where the task computes it itself
        self.monitor = cfg.monitor
        self.higher = cfg.higher_is_better
        self.wanted = cfg.eval.metrics or task.DEFAULT_METRICS
        if self.monitor not in self.wanted:
            self.wanted = tuple(self.wanted) + (self.monitor,)
        self.state = {
            "step": 0, "epoch": 0, "micro_in_epoch": 0, "best_value": None, "best_step": None,
            "evals_since_best": 0, "last_eval_step": -1, "samples": 0, "tokens": 0, "train_seconds": 0.0,
            "stopped": None, "best_metrics": None,
        }
        # what checkpoints hold: every parameter the method trains, frozen for now or not (transfer callbacks
        # freeze some of them from on_train_begin on, after this)
        self.saved_params = checkpoint.trainable_names(accelerator.unwrap_model(model))
        self._pending = [0, 0]  # samples, tokens of the optimizer steps since the last fold into the state
        self._rng = checkpoint.rng_state()
        self.last_metrics: dict = {}
        self.stop_status = "completed"  # or the status of the StopTraining that ended fit()

    # -- the loop ---------------------------------------------------------
    def fit(self) -> dict:
        st = self.state
        fire(self.callbacks, "on_train_begin", self)
        self.model.train()
        accum = self.cfg.train.grad_accum
        window = defaultdict(float)
        try:
            if self._eval_due() and 0 < st["step"] < self.total_steps:
                self.evaluate_and_checkpoint()  # an interrupt cut this step's evaluation short: it is done now
            while st["step"] < self.total_steps and not st["stopped"]:
                self.sampler.set_epoch(st["epoch"], start=st["micro_in_epoch"])
                n_micro = self.sampler.per_rank()
                micro = st["micro_in_epoch"]
                t0 = time.perf_counter()
                group = [0, 0]  # samples, tokens of this accumulation group: counted once its optimizer step is taken
                for batch in self.train_loader:
                    micro += 1
                    group_start = ((micro - 1) // accum) * accum
                    in_group = min(accum, n_micro - group_start)
                    sync = (micro - group_start) == in_group
                    batch = _to(batch, self.acc.device)
                    ctx = contextlib.nullcontext() if sync else self.acc.no_sync(self.model)
                    with ctx, self.acc.autocast():
                        loss = (self.loss_fn(self.model, batch) if self.loss_fn is not None
                                else self.model(**batch, **self.loss_kwargs).loss)
                    self.acc.backward(loss / in_group)
                    # tensors, not Python numbers: no host sync per micro-batch (it stalls a GPU)
                    samples, tokens = self.task.count(batch)
                    window["loss"] = window["loss"] + loss.detach().float() / in_group
                    group[0], group[1] = group[0] + samples, group[1] + tokens
                    if not sync:
                        continue
                    self._optimizer_step()
                    st["step"] += 1
                    st["micro_in_epoch"] = micro
                    st["train_seconds"] += time.perf_counter() - t0
                    self._pending[0], self._pending[1] = self._pending[0] + group[0], self._pending[1] + group[1]
                    group = [0, 0]
                    window["steps"] += 1
                    self._rng = checkpoint.rng_state()
                    if st["step"] % self.cfg.train.log_every == 0 or st["step"] == self.total_steps:
                        self._log_train(window)
                        window = defaultdict(float)
                    fire(self.callbacks, "on_step_end", self)
                    if self._eval_due():
                        self.evaluate_and_checkpoint()
                    if st["step"] >= self.total_steps:
                        break
                    t0 = time.perf_counter()
                else:
                    st["epoch"] += 1
                    st["micro_in_epoch"] = 0
        except StopTraining as stop:
            st["stopped"], st["stop_status"], st["stopped_of"] = stop.reason, stop.status, self.total_steps
            self.stop_status = stop.status
            self._record_stop()
            self.acc.print(stop.reason)
        if window["steps"]:  # steps since the last log (early stop, pruning): their loss too
            self._log_train(window)
        self._fold_counts()
        if st["last_eval_step"] != st["step"]:
            self.evaluate_and_checkpoint()
        fire(self.callbacks, "on_train_end", self)
        return st

    def _eval_due(self) -> bool:
        st = self.state
        return st["last_eval_step"] != st["step"] and (st["step"] % self.eval_every == 0 or st["step"] == self.total_steps)

    def _fold_counts(self) -> None:
        """The samples / tokens of the optimizer steps taken since the last fold go into the state: the one
        host sync for them, at each log and before each checkpoint (a resumed run counts what it saved)."""
        n_proc = self.acc.num_processes
        self.state["samples"] += int(self._pending[0]) * n_proc
        self.state["tokens"] += int(self._pending[1]) * n_proc
        self._pending = [0, 0]

    def _record_stop(self) -> None:
        """Training ended early at this step: the last checkpoint, when it is of this step, says so, so that a
        resume after an interrupt in the finish phase (best reload, adapter, test) finishes instead of training on."""
        path = self.run.path / "checkpoints" / "last" / "state.json"
        if not self.acc.is_main_process or not path.is_file():
            return
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("step") == self.state["step"] and saved.get("last_eval_step") == self.state["step"]:
            atomic.write_json(path, {**saved, **{k: self.state[k] for k in ("stopped", "stop_status", "stopped_of")}})

    def _optimizer_step(self) -> None:
        cfg = self.cfg.train
        if cfg.max_grad_norm:
            self.acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        factor = self.lr_fn(self.state["step"])
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        self.optimizer.step()
        fire(self.callbacks, "on_optimizer_step", self)  # gradients still present (AdaLoRA)
        self.optimizer.zero_grad(set_to_none=True)

    # -- logging ------------------------------------------------------------
    def _log_train(self, window: dict) -> None:
        st = self.state
        n_proc = self.acc.num_processes
        loss = torch.as_tensor(window["loss"] / max(1.0, window["steps"]), dtype=torch.float32).to(self.acc.device)
        loss = float(self.acc.reduce(loss, "mean")) if n_proc > 1 else float(loss)
        self._fold_counts()
        secs = max(st["train_seconds"], 1e-9)
        rec = {
            "type": "train", "step": st["step"], "epoch": round(st["step"] / self.steps_per_epoch, 4), "loss": loss,
            "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)},
            "samples_per_s": st["samples"] / secs, "tokens_per_s": st["tokens"] / secs, **self.log_extras,
        }
        self.run.log(rec)
        if self.progress is not None:
            self.progress.update(st["step"], loss=loss, lr=self.optimizer.param_groups[0]["lr"],
                                 speed=rec[f"{self.task.THROUGHPUT_UNIT}_per_s"], unit=self.task.THROUGHPUT_UNIT)

    # -- evaluation ---------------------------------------------------------
    def evaluate(self, examples=None, batches=None) -> dict:
        """Metrics on the eval split (or the given examples), gathered across processes."""
        from accelerate.utils import gather_object

        examples = self.eval_examples if examples is None else examples
        batches = self.eval_batches if batches is None else batches
        mine = batches[self.acc.process_index::self.acc.num_processes]
        # the unwrapped model: DDP's forward broadcasts buffers, a collective that would hang
        # when processes hold different numbers of eval batches
        local = eval_parts(self.acc.unwrap_model(self.model), self.task, self.collate, examples, mine, self.acc.device, self.acc.autocast)
        if self.acc.num_processes > 1:
            gathered = [g for g in gather_object([local]) if g]
            local = {k: torch.cat([g[k] for g in gathered]) for k in gathered[0]}
        self.last_parts = local  # per-example outputs of this evaluation (the confusion matrix is made from them)
        return self.task.compute_metrics(local, self.wanted, self.num_labels)

    def _improved(self, value: float) -> bool:
        best = self.state["best_value"]
        if best is None or math.isnan(best):
            return not math.isnan(value)
        delta = self.cfg.train.early_stopping.min_delta
        return value > best + delta if self.higher else value < best - delta

    def evaluate_and_checkpoint(self) -> dict:
        st = self.state
        self._fold_counts()
        metrics = self.evaluate()
        value = metrics[self.monitor]
        improved = self._improved(value)
        # the state after this evaluation; the loop takes it only once the checkpoints are on disk, so an
        # interrupt during a save never leaves a best step named whose weights were not written (the saved
        # state says this evaluation is still to do, and a resume does it)
        new = {**st, "last_eval_step": st["step"], "last_metrics": metrics}
        if improved:
            new.update(best_value=value, best_step=st["step"], evals_since_best=0, best_metrics=metrics)
        else:
            new["evals_since_best"] += 1
        unwrapped = self.acc.unwrap_model(self.model)
        if self.acc.is_main_process:
            if improved:
                checkpoint.save(self.run.path / "checkpoints" / "best", unwrapped, loop_state=dict(new),
                                names=self.saved_params)
            if self.cfg.output.save_checkpoints:
                checkpoint.save(self.run.path / "checkpoints" / "last", unwrapped, self.optimizer, dict(new), self._rng,
                                names=self.saved_params, extra=self._extra_state())
        self.acc.wait_for_everyone()
        st.update(new)
        self.last_metrics = metrics
        rec = {"type": "eval", "step": st["step"], "epoch": round(st["step"] / self.steps_per_epoch, 4),
               **{f"eval_{k}": v for k, v in metrics.items()}, "best": improved}
        self.run.log(rec)
        self.acc.print(f"step {st['step']}/{self.total_steps}  " + "  ".join(f"eval_{k}={v:.4f}" for k, v in metrics.items())
                       + ("  (best)" if improved else ""))
        fire(self.callbacks, "on_eval_end", self, metrics)
        return metrics

    def _stateful(self) -> list:
        return [cb for cb in self.callbacks if getattr(cb, "state_key", None)]

    def _extra_state(self) -> dict:
        """{key: (tensors, data)} of the callbacks that hold training state of their own (AdaLoRA's allocator)."""
        return {cb.state_key: cb.state_dict(self) for cb in self._stateful()}

    def save_interrupt_checkpoint(self) -> None:
        """Ctrl-C: keep the state as of the last completed optimizer step."""
        self._fold_counts()
        if self.acc.is_main_process:
            checkpoint.save(self.run.path / "checkpoints" / "last", self.acc.unwrap_model(self.model), self.optimizer,
                            dict(self.state), self._rng, names=self.saved_params, extra=self._extra_state())

    def restore(self, path) -> None:
        loop_state, rng = checkpoint.load(path, self.acc.unwrap_model(self.model), self.optimizer)
        self.state.update(loop_state)
        # a run that stopped early and was interrupted while finishing stays stopped (see _record_stop), unless
        # the resume extends it (another total: it trains on)
        stays = loop_state.get("stop_status") and loop_state.get("stopped_of") == self.total_steps
        self.state["stopped"] = loop_state.get("stopped") if stays else None
        self.stop_status = loop_state["stop_status"] if stays else "completed"
        self.last_metrics = loop_state.get("last_metrics") or {}
        for cb in self._stateful():
            cb.load_state_dict(self, checkpoint.load_extra(path, cb.state_key))
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
def eval_parts(model, task, collate, examples, batches, device, autocast=contextlib.nullcontext) -> dict:
    """Per-example eval outputs (predictions, losses) of the given batches, concatenated."""
    was_training = model.training
    model.eval()
    parts = defaultdict(list)
    with autocast():
        for idx in batches:
            batch = _to(collate([examples[i] for i in idx]), device)
            for k, v in task.eval_step(model, batch).items():
                parts[k].append(v.float().cpu())
    if was_training:
        model.train()
    return {k: torch.cat(v) for k, v in parts.items()}
