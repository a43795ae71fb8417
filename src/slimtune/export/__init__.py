"""`slimtune export`: a finished causal-LM run in the form a serving stack loads.

  merged  the base model with the adapter folded in (finished.load_merged, as `slimtune merge` does; a QLoRA
          run's base is loaded in 16-bit, never its 4-bit weights), saved as safetensors in --dtype, with the
          tokenizer and its chat template: for transformers, vLLM, TGI, llama.cpp's own converter;
  gguf    model.gguf (export/gguf.py) for llama.cpp, from the merged weights in float32, in --quant;
  ollama  model.gguf plus a Modelfile (export/ollama.py) for `ollama create`.
Each writes a new folder atomically (track/atomic.py): a reader or a crash never sees half of it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OutputExists, RunNotFound, UsageError
from .gguf import QUANTS

FORMATS = ("merged", "gguf", "ollama")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GGUF_NAME = "model.gguf"


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the folder written
    format: str
    files: tuple[str, ...]  # its files' names
    ollama_create: str | None = None  # the command that makes the export an Ollama model
    warnings: tuple[str, ...] = field(default_factory=tuple)


def check_choices(format: str, dtype: str | None, quant: str | None) -> None:
    """Unknown values, and options of another format, are errors naming what is accepted."""
    if format not in FORMATS:
        raise UsageError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if quant is not None and quant not in QUANTS:
        raise UsageError(f"--quant {quant!r}: use one of {', '.join(QUANTS)}")
    if format == "merged" and quant is not None:
        raise UsageError("--quant is for --format gguf / ollama; a merged model is saved in --dtype")
    if format != "merged" and dtype is not None:
        raise UsageError(f"--dtype is for --format merged; --format {format} stores its weights in --quant "
                         f"({', '.join(QUANTS)})")


def check_run(run_dir: Path) -> None:
    """A causal-LM run folder, read from its config before any model is loaded."""
    from ..config import load_config
    from ..tasks import TASKS

    if not (run_dir / "config.yaml").is_file():
        raise RunNotFound(f"{run_dir}: no config.yaml; is this a run folder?")
    task = load_config(run_dir / "config.yaml").task
    language_models = [name for name, spec in TASKS.items() if spec.auto_model == "AutoModelForCausalLM"]
    if task not in language_models:
        raise UsageError(f"{run_dir}: a {task} run; export writes language models, i.e. runs of the task "
                         f"{' / '.join(language_models)} (for other runs use `slimtune merge`)")


def export(run_dir: str | Path, out_dir: str | Path, format: str = "merged", dtype: str | None = None,
           quant: str | None = None, name: str | None = None, trust_run_code: bool = False) -> ExportResult:
    """Write the run's model to the new folder `out_dir` as `format` (merged / gguf / ollama).

    dtype (merged): bf16 (default), fp16 or fp32. quant (gguf, ollama): f16 (default) or q8_0.
    name: the model name in the GGUF and for `ollama create` (default: the run folder's name)."""
    from ..finished import load_merged
    from ..track import atomic

    check_choices(format, dtype, quant)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OutputExists(f"{out_dir}: exists and is not empty; choose a new folder")
    check_run(run_dir)
    loaded, merged = load_merged(run_dir, trust_run_code)
    name = name or run_dir.resolve().name
    warnings: list[str] = []
    create = None
    with atomic.folder(out_dir) as tmp:
        if format == "merged":
            save_merged(merged, loaded.tokenizer, tmp, dtype or "bf16")
        else:
            from .gguf import write_gguf

            warnings += write_gguf(merged, loaded.tokenizer, loaded.meta, tmp / GGUF_NAME, quant or "f16", name)
        if format == "ollama":
            create = write_modelfile(loaded.tokenizer, run_dir, tmp, name, warnings)
            create = f"{create} -f {out_dir / 'Modelfile'}"  # Ollama reads FROM ./model.gguf beside the Modelfile
        files = tuple(sorted(p.name for p in tmp.iterdir()))
    return ExportResult(out_dir, format, files, create, tuple(warnings))


def save_merged(model: object, tokenizer: object, folder: Path, dtype: str) -> None:
    import torch

    from ..errors import ModelError

    if not hasattr(model, "save_pretrained"):
        raise ModelError("export writes transformers models; a model.factory run is written by `slimtune merge`")
    model.to(getattr(torch, DTYPES[dtype]))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))  # its chat template included (chat_template.jinja)


def write_modelfile(tokenizer: object, run_dir: Path, folder: Path, name: str, warnings: list[str]) -> str:
    """Write folder/Modelfile; returns `ollama create NAME`."""
    from .ollama import model_name, modelfile

    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    text, warning = modelfile(template, tokenizer.eos_token, str(run_dir), GGUF_NAME)
    if warning:
        warnings.append(warning)
        print(f"[export] warning: {warning}", file=sys.stderr)
    (folder / "Modelfile").write_text(text, encoding="utf-8")
    return f"ollama create {model_name(name)}"
