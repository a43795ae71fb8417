"""Callbacks: features hook into the loop through a small closed set of events (`Callback`'s methods).

Stopping is an exception (`StopTraining`), not a flag. User callbacks passed to `run(callbacks=...)` may be
plain objects with any subset of the events; slimtune's own derive from `Callback`.

A callback that keeps training state of its own (AdaLoRA's rank allocator) sets `state_key` and has
`state_dict(loop) -> (tensors, JSON data)` and `load_state_dict(loop, that pair or None)`: checkpoints/last
holds it as `<state_key>.safetensors` + `<state_key>.json` and a resume gives it back (None: a checkpoint
written before the callback had state).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..methods.base import Method
    from .loop import Loop

EVENTS = ("on_train_begin", "on_optimizer_step", "on_step_end", "on_eval_end", "on_best_loaded", "on_test_end",
          "on_train_end")


class Callback:
    """No-op events; a subclass overrides those it needs.

    A callback that keeps training state of its own sets `state_key` and overrides state_dict / load_state_dict."""

    state_key: str | None = None

    def state_dict(self, loop: Loop) -> tuple[dict, dict]:
        """(tensors, JSON data) for checkpoints/last."""
        return {}, {}

    def load_state_dict(self, loop: Loop, saved: tuple[dict, dict] | None) -> None:
        """What state_dict saved, or None for a checkpoint written before the callback had state."""

    def on_train_begin(self, loop: Loop) -> None:
        """Before the first step (also of a resumed run)."""

    def on_optimizer_step(self, loop: Loop) -> None:
        """After an optimizer step, before the gradients are cleared (AdaLoRA reads them)."""

    def on_step_end(self, loop: Loop) -> None:
        """After an optimizer step and its logging, before a due evaluation."""

    def eval_metrics(self, loop: Loop) -> dict:
        """Metrics this callback adds to an evaluation, before the monitored one is read (generation scores)."""
        return {}

    def on_eval_end(self, loop: Loop, metrics: dict) -> None:
        """After an evaluation and its checkpoints."""

    def on_best_loaded(self, loop: Loop) -> None:
        """After training, once the best checkpoint's weights are in the model (before the adapter is saved)."""

    def on_test_end(self, loop: Loop, metrics: dict) -> None:
        """After the test split was evaluated with the best weights (the run's finish)."""

    def on_train_end(self, loop: Loop) -> None:
        """After the last step and its evaluation."""


class StopTraining(Exception):
    """Raised by a callback to end training cleanly (the best checkpoint is kept)."""

    status = "completed"  # the run's summary status when this ends it

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class PruneTraining(StopTraining):
    """Raised by a sweep's pruning callback: the run ends cleanly with status 'pruned' (no test evaluation)."""

    status = "pruned"


class PauseTraining(StopTraining):
    """Raised to end a run part way through its schedule (a select trial at the end of its rung): status 'paused',
    no test evaluation; `slimtune run --resume` trains it on with the same schedule, exactly as if it had not
    stopped (unlike an early stop, which a resume of the same length keeps)."""

    status = "paused"


UNTESTED = ("pruned", "paused")  # the statuses of runs that end without a test evaluation
RESUMED_ON = ("paused",)  # early stops that a resume trains on from (the others it keeps)


class PauseAt(Callback):
    """Pause the run once `fraction` of its total steps are done (ceil; 1 or more: never). It checks before the
    first step too, so a run resumed at or past its pause step pauses again without training."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def _check(self, loop: Loop) -> None:
        if self.fraction < 1 and loop.state.step >= pause_step(loop.total_steps, self.fraction):
            raise PauseTraining(f"paused at step {loop.state.step} of {loop.total_steps} ({self.fraction:.3g} of "
                                "the run); `slimtune run --resume` trains it on")

    on_train_begin = _check
    on_step_end = _check


def pause_step(total_steps: int, fraction: float) -> int:
    """The step PauseAt(fraction) pauses a run of total_steps at."""
    return max(1, math.ceil(total_steps * fraction - 1e-9))


class EarlyStopping(Callback):
    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = patience
        self.min_delta = min_delta

    def on_eval_end(self, loop: Loop, metrics: dict) -> None:
        state = loop.state
        if state.evals_since_best >= self.patience:
            raise StopTraining(
                f"early stopping: {loop.monitor} did not improve by more than {self.min_delta} for {self.patience} "
                f"evaluations (best {state.best_value:.4f} at step {state.best_step})"
            )


def fire(callbacks: list, event: str, *args) -> None:
    """Call `event` on every callback that has it (a user's plain object may have only some)."""
    assert event in EVENTS, event
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(*args)


def extra_metrics(callbacks: list, loop: Loop) -> dict:
    """The metrics callbacks add to an evaluation (Callback.eval_metrics)."""
    out: dict = {}
    for cb in callbacks:
        fn = getattr(cb, "eval_metrics", None)
        if fn is not None:
            out.update(fn(loop))
    return out


class MethodStep(Callback):
    """A method's per-step hook (AdaLoRA's rank allocation) as a loop callback; the state the hook keeps
    (the method's `save_state` / `load_state`) goes into checkpoints/last as the loop's `method` part."""

    def __init__(self, method: Method):
        self.method = method
        if method.save_state:
            self.state_key = "method"

    def on_optimizer_step(self, loop: Loop) -> None:
        self.method.on_optimizer_step(loop.accelerator.unwrap_model(loop.model), loop.state.step)

    def state_dict(self, loop: Loop) -> tuple[dict, dict]:
        return self.method.save_state(loop.accelerator.unwrap_model(loop.model))

    def load_state_dict(self, loop: Loop, saved: tuple[dict, dict] | None) -> None:
        self.method.load_state(loop.accelerator.unwrap_model(loop.model), saved, loop.state.step)
