"""slimtune: parameter-efficient fine-tuning, the whole workflow.

    import slimtune
    result = slimtune.run("examples/quickstart.yaml", overrides=["train.lr=3e-4"])
    result.metrics, result.run_dir
"""
from __future__ import annotations

import warnings

__version__ = "0.1.0"

# peft's PeftModel probes `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning on
# every adapter wrap: a dependency's noise the user can do nothing about (peft/peft_model.py)
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__all__ = ["run", "evaluate", "predict", "merge", "sweep", "lr_find", "load_config", "load_run", "ConfigError",
           "RunResult"]


def __getattr__(name):  # keep `import slimtune` (and `slimtune --help`) fast: torch loads on first use
    if name in ("run", "evaluate", "predict", "merge", "sweep", "lr_find", "load_run", "RunResult"):
        from . import api

        return getattr(api, name)
    if name in ("load_config", "ConfigError"):
        from . import config

        return getattr(config, name)
    raise AttributeError(name)
