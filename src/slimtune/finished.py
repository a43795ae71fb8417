"""Using a finished run folder: load_run(), evaluate(), predict(), merge() (re-exported by api.py).

The folder is untrusted input: a model that would run code needs `trust_run_code` (track/guard.py)."""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig, load_config
from .data.batching import eval_batches
from .errors import OutputExists, RunNotFound
from .loading import lengths, resolve_model, resolve_precision
from .methods import get_method, load_adapter
from .models import pool_position_only, use_batch_pad
from .tasks import get_task
from .tasks.base import Task
from .track import atomic, guard
from .track.rundir import RunDir


@dataclass
class LoadedRun:
    cfg: RunConfig
    meta: dict
    model: torch.nn.Module
    tokenizer: object
    task: Task


def load_run(run_dir: str | Path, device: str | None = None, trust_run_code: bool = False,
             for_merge: bool = False) -> LoadedRun:
    """The base model with the run's adapter, its tokenizer and task facts.

    `trust_run_code`: load a run folder whose model runs code (model.trust_remote_code, a factory); refused
    otherwise, since a copied run folder is code (track/guard.py). `for_merge`: the base a merge folds the
    adapter into (the method's merge_load_kwargs: QLoRA's in 16-bit, not 4-bit)."""
    from .tasks.common import Splits

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    if not ((adapter / "adapter_config.json").is_file() or (adapter / "slimtune_adapter.json").is_file()):
        raise RunNotFound(f"{run_dir}: no adapter/adapter_config.json; is this a finished run folder? "
                          f"(a run that was interrupted can be finished with `slimtune run --resume {run_dir}`)")
    cfg = load_config(run_dir / "config.yaml")
    meta = RunDir(run_dir).read_json("meta.json")
    guard.check_run_code(run_dir, cfg, meta, trust_run_code)
    task = get_task(cfg.task)
    from .models import ModelSource

    saved = meta.get("model_source") or {}
    source = ModelSource(**saved) if saved.get("origin") == "factory" else resolve_model(cfg)
    tokenizer = task.load_processor(cfg, ModelSource(str(adapter), None, None, "folder"))
    splits = Splits(None, None, None, None, meta=meta)
    method = get_method(cfg.method.name)  # the base as it was trained (QLoRA: 4-bit), not a full-precision copy
    if for_merge and method.merge_load_kwargs:
        load_kwargs = method.merge_load_kwargs(cfg.method)
    else:
        load_kwargs = method.load_kwargs(cfg.method) if method.load_kwargs else {}
    base = task.load_model(cfg, source, splits, **load_kwargs).model
    use_batch_pad(base, tokenizer)
    if cfg.train.pooled_position_only:
        pool_position_only(base)
    model = load_adapter(base, adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return LoadedRun(cfg, meta, model, tokenizer, task)


def evaluate(run_dir: str | Path, data: str, batch_size: int | None = None, trust_run_code: bool = False,
             generate: int | None = None, generations: str | Path | None = None) -> dict:
    """Metrics of a finished run's adapter on another data file (same columns as training). A causal-lm run also
    generates replies to the first records and scores them (gen_<metric>) as its eval.generate says, or to the
    first `generate` records with those settings (0: none); `generations`: a JSONL file for the replies."""
    from .data.validate import DataReport
    from .tasks.common import Splits
    from .train.loop import eval_parts

    loaded = load_run(run_dir, trust_run_code=trust_run_code)
    cfg, task = loaded.cfg, loaded.task
    ds = task.read_eval(cfg, data)
    splits = Splits(None, None, ds, DataReport(), meta=loaded.meta, sources={"test": data})
    task.check_eval_data(cfg, splits)
    examples = task.featurize(cfg, loaded.tokenizer, splits)["test"]
    bs = batch_size or cfg.eval.batch_size or 2 * cfg.train.batch_size
    device = next(loaded.model.parameters()).device
    prec = resolve_precision(cfg.train.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if prec == "bf16" \
        else contextlib.nullcontext
    parts = eval_parts(loaded.model, task, task.collate(loaded.tokenizer), examples,
                       eval_batches(lengths(examples), bs), device, autocast)
    wanted = cfg.eval.metrics or task.spec.default_metrics
    metrics = task.compute_metrics(parts, wanted, len(loaded.meta.get("labels", [])))
    gen = _generate_config(cfg, task, generate)
    if gen is not None:
        with autocast():
            metrics.update(_generated(loaded, Splits(None, ds, None, DataReport(), meta=loaded.meta,
                                                     sources={"eval": data}), gen, generations))
    for w in splits.report.warnings:
        print(f"[data warning] {w}", file=sys.stderr)
    return {"data": data, "examples": len(examples), **metrics}


def _generate_config(cfg: RunConfig, task: Task, generate: int | None):
    """The run's eval.generate with `generate` examples where given; None where nothing is generated."""
    from .config.sections import GenerateConfig
    from .errors import ConfigError

    if generate == 0:
        return None
    if generate and not task.spec.generates:
        raise ConfigError(f"--generate: a {cfg.task} run does not generate text; only causal-lm runs do")
    if generate is None:
        return cfg.eval.generate  # only a generating task's config may hold one (config/run.py)
    return (cfg.eval.generate or GenerateConfig()).model_copy(update={"examples": generate})


def _generated(loaded: LoadedRun, splits, gen, out: str | Path | None) -> dict:
    """gen_<metric> of replies generated for the records' prompts; the replies to `out` as JSONL."""
    from .tasks.chat_encoding import end_of_turn_ids
    from .tasks.generation import check_metric_libraries, generate_batch, scored_rows

    check_metric_libraries(list(gen.metrics))
    prompts = loaded.task.generation_prompts(loaded.cfg, loaded.tokenizer, splits, gen.examples)
    outs = generate_batch(loaded.model, loaded.tokenizer, [p["prompt_ids"] for p in prompts], gen.max_new_tokens,
                          end_of_turn_ids(loaded.tokenizer), gen.batch_size, gen.do_sample)
    total, rows = scored_rows(loaded.tokenizer, prompts, [(i, ids, stop) for i, (ids, stop) in enumerate(outs)],
                              list(gen.metrics))
    if out is not None:
        atomic.write_text(Path(out), "".join(json.dumps(r) + "\n" for r in rows))
    return {f"gen_{k}": v for k, v in total.items()}


def predict(run_dir: str | Path, inputs: list[str], trust_run_code: bool = False, **kwargs) -> list[dict]:
    """Labels and probabilities (classification) or generated text (causal-lm) for the inputs."""
    loaded = load_run(run_dir, trust_run_code=trust_run_code)
    kwargs.setdefault("max_length", loaded.cfg.model.max_length)
    return loaded.task.predict(loaded.model, loaded.tokenizer, list(inputs), loaded.meta, **kwargs)


def load_merged(run_dir: str | Path, trust_run_code: bool = False) -> tuple[LoadedRun, torch.nn.Module]:
    """The run loaded on the CPU as a merge needs it (QLoRA: its base in 16-bit) and the model with the adapter
    folded into its weights; `slimtune merge` and `slimtune export` write the same merged weights."""
    from .methods import merge as merge_adapter

    loaded = load_run(run_dir, device="cpu", trust_run_code=trust_run_code, for_merge=True)
    if get_method(loaded.cfg.method.name).merge_load_kwargs:
        dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
        print(f"[merge] {loaded.cfg.method.name}: the adapter is merged into the base loaded in {dtype}, not into its "
              "quantized weights (merging into 4-bit weights degrades generations)", file=sys.stderr)
    return loaded, merge_adapter(loaded.model, Path(run_dir) / "adapter")


def merge(run_dir: str | Path, out_dir: str | Path, trust_run_code: bool = False) -> Path:
    """Write the base model with the run's adapter folded into its weights (a plain transformers model)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OutputExists(f"{out_dir}: exists and is not empty; choose a new folder")
    loaded, merged = load_merged(run_dir, trust_run_code)
    with atomic.folder(out_dir) as tmp:
        if hasattr(merged, "save_pretrained"):
            merged.save_pretrained(str(tmp))
        else:  # a factory model (model.factory): its weights, and what rebuilds the module around them
            _save_factory_model(merged, loaded, tmp)
        loaded.tokenizer.save_pretrained(str(tmp))
    return out_dir


def _save_factory_model(model: torch.nn.Module, loaded: LoadedRun, folder: Path) -> None:
    """`model.safetensors` (the merged state dict) and `slimtune_model.json`: the factory and its
    arguments, so `build(**args).load_state_dict(load_file("model.safetensors"))` restores the model;
    no transformers class exists to do it for a user's own module."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    labels = loaded.meta.get("labels")
    factory = (loaded.meta.get("model_source") or {}).get("path") or loaded.cfg.model.factory
    info = {"factory": factory, "factory_args": loaded.cfg.model.factory_args, "labels": labels,
            "num_labels": len(labels) if labels else None, "task": loaded.cfg.task,
            "load": "build(num_labels=..., labels=..., **factory_args).load_state_dict("
                    "safetensors.torch.load_file('model.safetensors'))"}
    (folder / "slimtune_model.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
