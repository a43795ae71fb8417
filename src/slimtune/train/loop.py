"""The training loop: one explicit loop over batches (accumulate, clip, step,
schedule, log, evaluate, checkpoint), with features hooked in through callbacks.

Everything that a resumed run needs to continue exactly where it stopped lives
in `self.state` (plain JSON) plus the checkpointed weights, optimizer and RNG.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict

import torch

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
            while st["step"] < self.total_steps:
                self.sampler.set_epoch(st["epoch"], start=st["micro_in_epoch"])
                n_micro = self.sampler.per_rank()
                micro = st["micro_in_epoch"]
                t0 = time.perf_counter()
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
                    window["samples"] += samples
                    window["tokens"] = window["tokens"] + tokens
                    if not sync:
                        continue
                    self._optimizer_step()
                    st["step"] += 1
                    st["micro_in_epoch"] = micro
                    st["train_seconds"] += time.perf_counter() - t0
                    window["steps"] += 1
                    self._rng = checkpoint.rng_state()
                    if st["step"] % self.cfg.train.log_every == 0 or st["step"] == self.total_steps:
                        self._log_train(window)
                        window = defaultdict(float)
                    fire(self.callbacks, "on_step_end", self)
                    if st["step"] % self.eval_every == 0 or st["step"] == self.total_steps:
                        self.evaluate_and_checkpoint()
                    if st["step"] >= self.total_steps:
                        break
                    t0 = time.perf_counter()
                else:
                    st["epoch"] += 1
                    st["micro_in_epoch"] = 0
        except StopTraining as stop:
            st["stopped"] = stop.reason
            self.stop_status = stop.status
            self.acc.print(stop.reason)
        if window["steps"]:  # steps since the last log (early stop, pruning): count their samples and tokens too
            self._log_train(window)
        if st["last_eval_step"] != st["step"]:
            self.evaluate_and_checkpoint()
        fire(self.callbacks, "on_train_end", self)
        return st

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
        st["samples"] += int(window["samples"]) * n_proc
        st["tokens"] += int(window["tokens"]) * n_proc  # the one host sync of the window
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
        metrics = self.evaluate()
        st["last_eval_step"] = st["step"]
        value = metrics[self.monitor]
        improved = self._improved(value)
        if improved:
            st["best_value"], st["best_step"], st["evals_since_best"] = value, st["step"], 0
            st["best_metrics"] = metrics
        else:
            st["evals_since_best"] += 1
        self.last_metrics = metrics
        rec = {"type": "eval", "step": st["step"], "epoch": round(st["step"] / self.steps_per_epoch, 4),
               **{f"eval_{k}": v for k, v in metrics.items()}, "best": improved}
        self.run.log(rec)
        self.acc.print(f"step {st['step']}/{self.total_steps}  " + "  ".join(f"eval_{k}={v:.4f}" for k, v in metrics.items())
                       + ("  (best)" if improved else ""))
        unwrapped = self.acc.unwrap_model(self.model)
        if self.acc.is_main_process:
            if improved:
                checkpoint.save(self.run.path / "checkpoints" / "best", unwrapped, loop_state=dict(st))
            if self.cfg.output.save_checkpoints:
                checkpoint.save(self.run.path / "checkpoints" / "last", unwrapped, self.optimizer, dict(st), self._rng)
        self.acc.wait_for_everyone()
        fire(self.callbacks, "on_eval_end", self, metrics)
        return metrics

    def save_interrupt_checkpoint(self) -> None:
        """Ctrl-C: keep the state as of the last completed optimizer step."""
        if self.acc.is_main_process:
            checkpoint.save(self.run.path / "checkpoints" / "last", self.acc.unwrap_model(self.model), self.optimizer,
                            dict(self.state), self._rng)

    def restore(self, path) -> None:
        loop_state, rng = checkpoint.load(path, self.acc.unwrap_model(self.model), self.optimizer)
        self.state.update(loop_state)
        self.state["stopped"] = None
        if rng is not None:
            checkpoint.set_rng_state(rng)
            self._rng = rng


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
