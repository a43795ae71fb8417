"""`slimtune validate`: everything `run` checks before training, without training or loading weights.

The config (keys, values), the data (readers, columns, labels, splits: the task's load_data, as in
`run`), and the model: its source resolves (Hub cache / Hub, folder, GGUF file, offline package, or
a factory that imports), its config loads, its weights files are there and their headers are whole
(safetensors headers are read, not the tensors), and `model.max_length` fits its positions. A factory
is imported, which runs the user's module, as `run` would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig, load_config
from .models.checks import check_weights_folder, model_config, position_limit
from .models.sources import ModelError, ModelSource, resolve
from .tasks import get_task
from .tasks.base import Task


@dataclass
class Validation:
    cfg: RunConfig
    splits: object  # tasks.common.Splits
    model: str  # one line: what the model source is and what was checked
    warnings: list[str] = field(default_factory=list)
    preview: list[str] = field(default_factory=list)  # the task's view of the data through the processor


def validate(config: str | Path | dict | RunConfig, overrides: list[str] | None = None) -> Validation:
    """Raises the error `run` would raise first (ConfigError, DataError, ModelError, FileNotFoundError)."""
    cfg = load_config(config, overrides)
    task = get_task(cfg.task)
    splits = task.load_data(cfg)  # data first, as in run: every data error shows before the model is touched
    model, notes, processor = check_model(cfg, task)
    preview = task.data_preview(cfg, processor, splits)
    return Validation(cfg, splits, model, list(splits.report.warnings) + notes, preview)


def check_model(cfg: RunConfig, task: Task) -> tuple[str, list[str], object]:
    """(a line saying what was checked, warnings of the model's preprocessing, the processor)."""
    if cfg.model.factory:
        from .models.factory import factory_source

        src = factory_source(cfg.model.factory)  # imports it: a module that does not import fails here
        processor = task.load_processor(cfg, src)
        return f"{cfg.model.factory} (factory, imports)", list(getattr(processor, "notes", [])), processor
    src = resolve(cfg.model.name, cfg.model.gguf_file, cfg.model.revision)
    config = model_config(src, cfg.model.trust_remote_code, cfg.model.revision)
    weights = source_weights(src, cfg.model.revision)
    processor = task.load_processor(cfg, src)  # text: the tokenizer loads and model.max_length fits
    tokens = task.spec.inputs == "tokens"
    limit, _ = position_limit(config, processor if tokens else None)
    kind = getattr(config, "model_type", None) or type(config).__name__
    where = src.path if src.origin != "gguf" else str(Path(src.path, src.gguf_file))
    line = f"{where} ({src.origin}; {kind}" + (f", up to {limit} tokens" if limit and tokens else "") \
        + f"; weights: {weights})"
    return line, list(getattr(processor, "notes", [])), processor


def source_weights(src: ModelSource, revision: str | None = None) -> str:
    """The weights files of a resolved source, checked without loading them; what was checked, in words."""
    if src.gguf_file:
        f = Path(src.path, src.gguf_file)
        with open(f, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelError(f"{f}: not a GGUF file (no GGUF magic at its start)")
        return f.name
    if src.origin != "hub":
        return _names(check_weights_folder(Path(src.path)))
    cached = _cached_snapshot(src.path, revision)
    if cached is not None:
        try:
            return _names(check_weights_folder(cached)) + " (Hub cache)"
        except ModelError:
            pass  # config cached, weights not (yet): ask the Hub for the headers, as run would download them
    return _hub_weights(src.path, revision)


def _names(files: list[Path]) -> str:
    return files[0].name if len(files) == 1 else f"{len(files)} shards ({files[0].name}, ...)"


def _cached_snapshot(model_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(model_id, "config.json", revision=revision)
    return Path(hit).parent if isinstance(hit, str) else None


def _hub_weights(model_id: str, revision: str | None) -> str:
    """The safetensors headers read from the Hub (HTTP range requests: no weights are downloaded)."""
    from huggingface_hub import get_safetensors_metadata

    try:
        meta = get_safetensors_metadata(model_id, revision=revision)
    except Exception as e:
        raise ModelError(f"model.name: cannot read the weights headers of {model_id!r} from the Hub "
                         f"({type(e).__name__}: {e}); run would fail to download them") from None
    return f"{len(meta.files_metadata)} safetensors file(s) on the Hub"


__all__ = ["Validation", "validate", "check_model", "source_weights"]
