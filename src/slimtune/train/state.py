"""The loop's progress: everything besides weights, optimizer and RNG that a resumed run needs to continue
exactly where it stopped. It is checkpoints/<name>/state.json (the JSON keys are the field names)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of this epoch already consumed (a resume skips them)
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    last_eval_step: int = -1
    samples: int = 0
    tokens: int = 0
    # token positions of the training batches, padding included (the real-token share is tokens / token_slots);
    # None: not all counted (a run that started before they were)
    token_slots: int | None = 0
    train_seconds: float = 0.0
    stopped: str | None = None  # why training ended early (early stopping, pruning), or None
    best_metrics: dict | None = None
    last_metrics: dict | None = None
    stop_status: str | None = None  # the summary status of an early stop ('completed', 'pruned')
    stopped_of: int | None = None  # the total steps of the run that stopped early (a resume that extends it trains on)

    # keys a checkpoint holds only once they are set (state.json as earlier versions wrote it)
    _OPTIONAL = ("last_metrics", "stop_status", "stopped_of")

    def to_json(self) -> dict:
        data = asdict(self)
        return {k: v for k, v in data.items() if v is not None or k not in self._OPTIONAL}

    @classmethod
    def from_json(cls, data: dict) -> TrainState:
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        if "token_slots" not in data and state.tokens:
            state.token_slots = None
        return state

    def replace(self, **changes) -> TrainState:
        return TrainState(**{**asdict(self), **changes})

    def assign(self, other: TrainState) -> None:
        """Take every field of `other`, in place."""
        for f in fields(self):
            setattr(self, f.name, getattr(other, f.name))

    # callbacks written against the earlier dict form (`loop.state["step"]`) keep working
    def __getitem__(self, key: str):
        return getattr(self, key)

    def __setitem__(self, key: str, value) -> None:
        setattr(self, key, value)
