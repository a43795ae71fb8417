"""The `select:` section of the run config: which pre-trained models and PEFT methods `slimtune select` races,
and within what budget.

    select:
      models: [sentence-transformers/all-MiniLM-L6-v2, path/to/other]
      methods: [lora, ia3, full]          # default: the config's method
      budget_minutes: 30                  # or budget_kwh: 0.05
      memory: 16GB                        # candidates whose estimated training memory exceeds it are dropped
      tolerance: 0.5                      # points of the monitored metric (see `tolerance`)
      eta: 3
      min_fraction: 0.1

Torch-free: the checks here are on the values only; the race itself is `slimtune.select`'s.
"""
from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from ..schema import StrictModel, plain_name

MEMORY_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_MEMORY = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kKmMgGtT])(?:i?[bB])?\s*")
MEMORY_FORMS = "a number with a unit: 512MB, 16GB, 1.5TB (K/M/G/T, optionally with B or iB)"


def parse_memory(text: object) -> int:
    """Bytes of a memory size such as '16GB'. The units are binary (1 GB = 2**30 bytes) whether written GB or
    GiB: the GB a GPU is sold with, and the MB `slimtune inspect` reports, are binary too."""
    match = _MEMORY.fullmatch(str(text))
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a memory size; give {MEMORY_FORMS}")
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])


def split_list(value: object) -> object:
    """'a,b , c' -> ['a', 'b', 'c'] (the command line's form); a list stays a list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class SelectConfig(StrictModel):
    """Model and method selection (`slimtune select`): successive halving over (model, method) pairs, each trial
    a normal run of this config with model.name, method.name, data.max_train_samples and train.max_steps set."""

    models: list[str] = Field(..., description="the candidate pre-trained models: Hub ids, folders, .gguf files "
                              "or factories ('file.py:function', as model.factory; a comma-separated string is "
                              "accepted)")
    methods: list[str] | None = Field(None, description="the candidate PEFT methods (default: the config's method); "
                                      "the config's method options apply to its own method, the others run at "
                                      "their defaults")
    budget_minutes: float | None = Field(None, gt=0, description="budget: wall minutes of all trials together (from "
                                         "their summaries, earlier invocations included); no trial starts that "
                                         "would go past it")
    budget_kwh: float | None = Field(None, gt=0, description="budget: energy of all trials together (their "
                                     "cost.energy_kwh; needs track.energy: true)")
    memory: str | None = Field(None, description="memory available for training, e.g. 16GB: a candidate whose "
                               "estimated training memory (`slimtune inspect`'s estimate at train.batch_size x "
                               "model.max_length) exceeds it is dropped before the race")
    tolerance: float = Field(0.0, ge=0, description="the pick: the cheapest candidate (training time) whose monitored "
                             "metric is within this many points of the best one, one point being 1/100 of the "
                             "metric's unit (0.5 on accuracy: 0.005; 0.5 on eval loss: 0.005); 0: the best")
    eta: int = Field(3, ge=2, description="reduction factor: after each rung the best 1/eta of the candidates "
                     "(rounded up) go on, with eta x more training data and steps")
    min_fraction: float = Field(0.1, gt=0, le=1, description="the smallest share of the training data (and of "
                                "train.max_steps) a rung-0 trial gets; the rungs are 1, 1/eta, 1/eta^2, ... down to "
                                "the last one not below it")
    latency_examples: int = Field(8, ge=1, description="eval examples the inference latency of each trial is "
                                  "measured on (one at a time, with the best weights)")
    name: str | None = Field(None, description="the select folder under output.dir (default: select-<config file "
                             "stem>); re-running the same command resumes it")

    _plain_name = field_validator("name")(plain_name)
    _lists = field_validator("models", "methods", mode="before")(split_list)

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("no candidate model; list at least one (Hub id, folder or .gguf file)")
        return _unique(value, "model")

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        from ..methods import REGISTRY

        if not value:
            raise ValueError(f"no candidate method; list at least one of {', '.join(REGISTRY)}")
        unknown = [m for m in value if m not in REGISTRY]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))} is not a method; accepted: {', '.join(REGISTRY)}")
        return _unique(value, "method")

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None:
            parse_memory(value)
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> SelectConfig:
        if self.budget_minutes is not None and self.budget_kwh is not None:
            raise ValueError("give one budget: budget_minutes or budget_kwh, not both")
        return self

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_memory(self.memory)


def _unique(values: list[str], what: str) -> list[str]:
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise ValueError(f"{what} {', '.join(map(repr, twice))} is listed twice")
    return values
