"""`slimtune export` (registered in cli.py): a finished causal-LM run as a merged model, a GGUF file, or a GGUF
with an Ollama Modelfile. Thin: parse, call api.export, print."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_common import exit_on_user_error, out, trust_option


def export_cmd(run_dir: Path = typer.Argument(..., help="a finished causal-LM run folder"),
               out_dir: Path = typer.Argument(..., help="new folder for the export"),
               fmt: str = typer.Option("merged", "--format", help="merged (safetensors + tokenizer), gguf "
                                       "(model.gguf for llama.cpp) or ollama (model.gguf + Modelfile)"),
               dtype: Optional[str] = typer.Option(None, "--dtype", help="merged: bf16 (default), fp16 or fp32"),
               quant: Optional[str] = typer.Option(None, "--quant", help="gguf / ollama: f16 (default) or q8_0"),
               name: Optional[str] = typer.Option(None, "--name", help="the model's name in the GGUF and for "
                                                  "ollama create (default: the run folder's name)"),
               trust_run_code: bool = trust_option()):
    """Export a fine-tuned language model: merged weights, GGUF, or GGUF + Ollama Modelfile."""
    from . import api

    with exit_on_user_error():
        res = api.export(run_dir, out_dir, format=fmt, dtype=dtype, quant=quant, name=name,
                         trust_run_code=trust_run_code)
    plain = {"markup": False, "highlight": False, "soft_wrap": True}  # paths as they are, on one line each
    out.print(f"{res.format} export written to {res.path}: {', '.join(res.files)}", **plain)
    if res.ollama_create:
        out.print(res.ollama_create, **plain)
