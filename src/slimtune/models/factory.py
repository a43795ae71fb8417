"""A user's own `torch.nn.Module` as the model: `model: {factory: "my_pkg.models:build"}`
(or `"path/to/file.py:build"`), for anything transformers does not load (timm-style code,
research models, pip-packaged weights).

The factory is called as `build(num_labels=N, labels=[...], **model.factory_args)` and returns an
`nn.Module` whose `forward(pixel_values, labels=None)` returns an object with `.logits` (and
`.loss` when labels are given). `ImageClassifier` below turns a backbone that maps images to
logits into exactly that. Optional attributes slimtune reads from the module:
  head_modules  names of the modules trained in full (default: `classifier`, `head` or `fc`)
  image_size, image_mean, image_std   the preprocessing the weights expect (the `image:` section overrides)
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .sources import ModelError, ModelSource


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None

    def __getitem__(self, key):  # peft / transformers code sometimes indexes outputs
        return getattr(self, key)


class ImageClassifier(nn.Module):
    """`backbone(pixel_values) -> logits` as a model slimtune trains: cross-entropy loss from labels.
    `classifier`: the name (inside the backbone) of the new head, trained in full."""

    def __init__(self, backbone: nn.Module, classifier: str = "classifier", image_size: int | None = None,
                 image_mean=None, image_std=None):
        super().__init__()
        self.backbone = backbone
        self.head_modules = [f"backbone.{classifier}"]
        if image_size:
            self.image_size = image_size
        if image_mean is not None:
            self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    def forward(self, pixel_values=None, labels=None, **_):
        logits = self.backbone(pixel_values)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ClassifierOutput(logits=logits, loss=loss)


def _import(spec: str):
    if ":" not in spec:
        raise ModelError(f"model.factory: {spec!r} must look like 'package.module:function' or 'path/file.py:function'")
    where, _, fn_name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise ModelError(f"model.factory: file {where!r} not found (working directory: {Path.cwd()})")
            name = f"slimtune_factory_{path.stem}"
            mod = sys.modules.get(name)
            if mod is None or getattr(mod, "__file__", None) != str(path):
                s = importlib.util.spec_from_file_location(name, path)
                mod = importlib.util.module_from_spec(s)
                sys.modules[name] = mod
                s.loader.exec_module(mod)
        else:
            mod = importlib.import_module(where)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"model.factory: cannot import {where!r}: {type(e).__name__}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ModelError(f"model.factory: {where!r} has no function {fn_name!r}")
    return fn


def factory_source(spec: str) -> ModelSource:
    """A factory as a model source; a file path is made absolute so a run folder works from anywhere."""
    where, _, fn = spec.rpartition(":")
    if where.endswith(".py"):
        spec = f"{Path(where).expanduser().resolve()}:{fn}"
    _import(spec)  # fail early, before data is featurized
    return ModelSource(spec, None, None, "factory")


def build(spec: str, num_labels: int, labels: list[str],
          factory_args: dict | None = None) -> tuple[nn.Module, list[str]]:
    """(model, head module names) from the user's factory."""
    fn = _import(spec)
    try:
        # under a fixed seed: weights the factory initialises at random (a backbone without pretrained
        # weights) come out the same in the run, in `load_run` / `eval` / `predict` and in `merge`; only
        # the trained tensors are saved with the adapter
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = fn(num_labels=num_labels, labels=list(labels), **(factory_args or {}))
    except Exception as e:
        raise ModelError(f"model.factory {spec!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    names = dict(model.named_modules())
    heads = list(getattr(model, "head_modules", None) or [n for n in ("classifier", "head", "fc") if n in names])
    missing = [h for h in heads if h not in names]
    if missing or not heads:
        raise ModelError(f"model.factory {spec!r}: head module(s) {missing or '(none)'} not found; set `head_modules` "
                         "on the returned module (names from named_modules()) or name the head `classifier`")
    model.float()
    return model, heads
