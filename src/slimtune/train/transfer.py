"""Transfer-learning techniques as loop callbacks: gradual unfreezing, staged
fine-tuning, sequence-length warm-up.

Each is a pure function of the step (so a resumed run is in the same state without
saving anything extra) applied through the loop's events. Parameters frozen by a
technique keep `grad=None`, and AdamW skips such parameters entirely, so the
optimizer only steps what is trainable at that moment.
"""
from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Callable

from ..tasks import task_spec
from .callbacks import Callback
from .schedules import lr_factor, warmup_steps

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig
    from ..data.batching import BatchShape
    from .groups import Groups
    from .loop import Loop, StepPlan


def transfer_callbacks(cfg: RunConfig, model: torch.nn.Module, groups: Groups, plan: StepPlan, shape: BatchShape,
                       num_processes: int) -> tuple[list[Callback], Callable[[int], float] | None]:
    """The config's transfer-learning techniques as callbacks, and the lr factor staged fine-tuning brings."""
    t = cfg.train
    callbacks: list[Callback] = []
    lr_fn = None
    if (t.unfreeze or t.strategy == "staged") and num_processes > 1:
        from ..errors import ConfigError

        raise ConfigError("train.unfreeze / train.strategy=staged change which parameters train during the run, "
                          "which DistributedDataParallel does not allow; run them in a single process")
    if t.unfreeze:
        every = t.unfreeze.every_steps or max(1, round(t.unfreeze.every_epochs * plan.steps_per_epoch))
        callbacks.append(GradualUnfreeze(model, groups, every, t.unfreeze.start))
    if t.strategy == "staged":
        head_steps = max(1, round(t.staged.head_fraction * plan.total_steps))
        staged = Staged(model, groups, head_steps, plan.total_steps, t.staged.head_lr_mult,
                        warmup_steps(t.warmup, plan.total_steps - head_steps), t.schedule)
        callbacks.append(staged)
        lr_fn = staged.lr_factor
    if t.seq_len_schedule:
        callbacks.append(SeqLenWarmup(t.seq_len_schedule, plan.total_steps, shape))
    if t.image_size_schedule and task_spec(cfg.task).inputs == "images":  # a text task has no image size
        callbacks.append(ProgressiveResize(t.image_size_schedule, plan.total_steps, shape))
    return callbacks, lr_fn


class _GroupFreezer:
    """Sets requires_grad by group, never enabling what the method froze."""

    def __init__(self, model: torch.nn.Module, groups: Groups):
        self.params = dict(model.named_parameters())
        self.method_trainable = {n for n, p in self.params.items() if p.requires_grad}
        self.groups = groups

    def set_trainable(self, allowed: set[str]) -> None:
        for n, p in self.params.items():
            p.requires_grad = n in self.method_trainable and self.groups.of_param.get(n) in allowed

    def trainable_groups(self) -> list[str]:
        return [g for g in self.groups.names
                if any(p.requires_grad for n, p in self.params.items() if self.groups.of_param.get(n) == g)]


class GradualUnfreeze(Callback):
    """ULMFiT: start with the top `start` groups trainable, unfreeze one more every `every` steps."""

    def __init__(self, model: torch.nn.Module, groups: Groups, every: int, start: int = 1):
        self.f = _GroupFreezer(model, groups)
        self.every, self.start = every, start

    def n_unfrozen(self, step: int) -> int:
        return min(len(self.f.groups.names), self.start + step // self.every)

    def _apply(self, loop: Loop) -> None:
        k = self.n_unfrozen(loop.state.step)
        self.f.set_trainable(set(self.f.groups.names[-k:]))
        loop.log_extras["trainable_groups"] = self.f.trainable_groups()

    on_train_begin = _apply
    on_step_end = _apply


class Staged(Callback):
    """fastai's fine_tune: the head alone for `head_steps`, then everything the method trains;
    each stage with its own warmup + decay (the loop asks `lr_factor(step)`)."""

    def __init__(self, model: torch.nn.Module, groups: Groups, head_steps: int, total_steps: int, head_lr_mult: float,
                 warmup: int, schedule: str):
        self.f = _GroupFreezer(model, groups)
        self.head_steps, self.total = head_steps, total_steps
        self.head_lr_mult, self.warmup, self.schedule = head_lr_mult, warmup, schedule

    def stage(self, step: int) -> int:
        return 1 if step < self.head_steps else 2

    def lr_factor(self, step: int) -> float:
        if self.stage(step) == 1:
            head_warmup = max(0, min(self.warmup, self.head_steps // 5))
            return self.head_lr_mult * lr_factor(step, self.head_steps, head_warmup, self.schedule)
        return lr_factor(step - self.head_steps, self.total - self.head_steps, self.warmup, self.schedule)

    def _apply(self, loop: Loop) -> None:
        step = loop.state.step
        self.f.set_trainable({"head"} if self.stage(step) == 1 else set(self.f.groups.names))
        loop.log_extras["stage"] = self.stage(step)
        loop.log_extras["trainable_groups"] = self.f.trainable_groups()

    on_train_begin = _apply
    on_step_end = _apply


def seq_len_at(schedule: list[tuple[float, int]], progress: float) -> int:
    """The max sequence length at this fraction of training: the last entry whose start <= progress."""
    starts = [s for s, _ in schedule]
    i = max(0, bisect.bisect_right(starts, progress) - 1)
    return schedule[i][1]


class SeqLenWarmup(Callback):
    """Train on shorter sequences first (the text counterpart of progressive resizing)."""

    def __init__(self, schedule: list[tuple[float, int]], total_steps: int, shape: BatchShape):
        self.schedule = sorted((float(a), int(b)) for a, b in schedule)
        self.total = total_steps
        self.shape = shape  # read by the collate function

    def _apply(self, loop: Loop) -> None:
        self.shape.max_length = seq_len_at(self.schedule, loop.state.step / self.total)
        loop.log_extras["max_len"] = self.shape.max_length

    on_train_begin = _apply
    on_step_end = _apply


class ProgressiveResize(Callback):
    """fastai's progressive resizing: small images first, growing to the final size on the schedule
    (the same pure step function as the sequence-length warm-up); the image collate reads shape.image_size."""

    def __init__(self, schedule: list[tuple[float, int]], total_steps: int, shape: BatchShape):
        self.schedule = sorted((float(a), int(b)) for a, b in schedule)
        self.total = total_steps
        self.shape = shape

    def _apply(self, loop: Loop) -> None:
        self.shape.image_size = seq_len_at(self.schedule, loop.state.step / self.total)
        loop.log_extras["image_size"] = self.shape.image_size

    on_train_begin = _apply
    on_step_end = _apply


def truncating_collate(collate: Callable, shape: BatchShape, keep_last: bool) -> Callable:
    """Cut examples to shape.max_length before padding; `keep_last` keeps a final [SEP] / EOS."""

    def fn(examples):
        n = shape.max_length
        if n:
            cut = []
            for e in examples:
                if len(e["input_ids"]) > n:
                    e = dict(e)
                    for k in ("input_ids", "attention_mask", "labels"):
                        if isinstance(e.get(k), list):
                            e[k] = (e[k][: n - 1] + e[k][-1:]) if keep_last else e[k][:n]
                cut.append(e)
            examples = cut
        return collate(examples)

    return fn
