"""The search space: the `sweep:` section of the run config and its keys, checked against the config schema.

They are part of the config layer (slimtune/config/sweep.py: ParamSpec, SweepConfig, choice labels;
slimtune/config/sweep_keys.py: check_space, trial_config, sweep_base, applies); the sweep's modules import them
from here. A key is a dotted config path; the trial's config is the base config with the sampled values set
(`trial_config`). No optuna here.
"""
from __future__ import annotations

from ..config.sweep import SCALARS, ParamSpec, SweepConfig, choice_label, choice_value  # noqa: F401
from ..config.sweep_keys import (  # noqa: F401
                                 NOT_SWEEPABLE,
                                 applies,
                                 check_space,
                                 field_of,
                                 method_configs,
                                 method_names,
                                 set_key,
                                 sweep_base,
                                 trial_config,
)
