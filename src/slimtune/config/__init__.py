"""The run config: typed, validated before any model is loaded.

One YAML file (plus `a.b=value` overrides) -> `RunConfig`. The field descriptions are the reference
documentation (`slimtune schema` prints the JSON schema); unknown keys and bad values raise `ConfigError`
naming the key, the value given and what is accepted.

    sections.py    model, data, train, eval, image, output
    sweep.py       the `sweep:` section (search space, budget, sampler, pruner)
    run.py         RunConfig: the sections together, cross-section checks, defaults from the task registry
    validation.py  dict -> RunConfig, pydantic's errors said per key
    sweep_keys.py  the search space's keys against the schema, a trial's config
    loading.py     YAML / dict / RunConfig + overrides -> a checked RunConfig

Nothing here imports torch: `slimtune validate`, `slimtune schema` and the sweep's checks stay fast.
"""
from __future__ import annotations

from ..errors import ConfigError
from .loading import apply_overrides, config_from_dict, dump_config, load_config, parse_override
from .run import TASKS, RunConfig, metric_higher_is_better, model_section
from .sections import (
                       DataConfig,
                       EarlyStoppingConfig,
                       EvalConfig,
                       ImageConfig,
                       ModelConfig,
                       OutputConfig,
                       StagedConfig,
                       TrainConfig,
                       UnfreezeConfig,
)
from .sweep import ParamSpec, SweepConfig

__all__ = [
    "TASKS", "ConfigError", "DataConfig", "EarlyStoppingConfig", "EvalConfig", "ImageConfig", "ModelConfig",
    "OutputConfig", "ParamSpec", "RunConfig", "StagedConfig", "SweepConfig", "TrainConfig", "UnfreezeConfig",
    "apply_overrides", "config_from_dict", "dump_config", "load_config", "metric_higher_is_better", "model_section",
    "parse_override",
]
