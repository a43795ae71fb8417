"""Callbacks: features hook into the loop through a small closed set of events.

Events: on_train_begin(loop), on_optimizer_step(loop) (after the step, before the
gradients are cleared), on_step_end(loop), on_eval_end(loop, metrics), on_train_end(loop). Stopping is an exception (`StopTraining`), not a flag.

A callback that keeps training state of its own (AdaLoRA's rank allocator) sets `state_key` and has
`state_dict(loop) -> (tensors, JSON data)` and `load_state_dict(loop, that pair or None)`: checkpoints/last
holds it as `<state_key>.safetensors` + `<state_key>.json` and a resume gives it back (None: a checkpoint
written before the callback had state).
"""
from __future__ import annotations


class StopTraining(Exception):
    """Raised by a callback to end training cleanly (the best checkpoint is kept)."""

    status = "completed"  # the run's summary status when this ends it

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class PruneTraining(StopTraining):
    """Raised by a sweep's pruning callback: the run ends cleanly with status 'pruned' (no test evaluation)."""

    status = "pruned"


class EarlyStopping:
    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = patience
        self.min_delta = min_delta

    def on_eval_end(self, loop, metrics: dict) -> None:
        if loop.state["evals_since_best"] >= self.patience:
            raise StopTraining(
                f"early stopping: {loop.monitor} did not improve by more than {self.min_delta} for {self.patience} evaluations "
                f"(best {loop.state['best_value']:.4f} at step {loop.state['best_step']})"
            )


def fire(callbacks, event: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(*args)
