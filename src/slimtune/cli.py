"""Command line: parses, calls the API, prints. No logic of its own."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .cli_common import exit_on_user_error, fail, out, say_error, trust_option
from .cli_export import export_cmd
from .cli_report import report_cmd
from .cli_runs import runs_app
from .cli_select import select_cmd
from .cli_sweep import lr_find_cmd, sweep_cmd

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Parameter-efficient fine-tuning, the whole workflow.")


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="YAML config (see examples/)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides: train.lr=3e-4 method.r=16"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue an interrupted run from its folder; "
                                          "overrides may only extend it (train.epochs=N, train.max_steps=N)"),
    trust_run_code: bool = trust_option(),
):
    """Fine-tune: data checks, training, evaluation; writes a run folder."""
    from . import api

    if config is None and resume is None:
        fail("give a config file, or --resume RUN_DIR")
    if resume is not None and config is not None and "=" in str(config):
        overrides = [str(config), *(overrides or [])]
    try:
        with exit_on_user_error():
            result = api.run(config, overrides=overrides, resume=resume, trust_run_code=trust_run_code)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    out.print_json(json.dumps({"run_dir": str(result.run_dir), "best": result.best_metrics,
                               "test": result.test_metrics}))


@app.command("eval")
def eval_(run_dir: Path = typer.Argument(..., help="a finished run folder"),
          data: str = typer.Option(..., "--data", help="data file with the training columns"),
          generate: Optional[int] = typer.Option(None, "--generate", help="causal-lm: generate replies to the "
                                                 "first N records and score them (default: the run's eval.generate; "
                                                 "0: none)"),
          generations: Optional[Path] = typer.Option(None, "--generations", help="causal-lm: write the generated "
                                                     "replies here (JSONL)"),
          trust_run_code: bool = trust_option()):
    """Metrics of a run's adapter on another data file."""
    from . import api

    with exit_on_user_error():
        metrics = api.evaluate(run_dir, data, trust_run_code=trust_run_code, generate=generate,
                               generations=generations)
    out.print_json(json.dumps(metrics))


@app.command()
def predict(run_dir: Path = typer.Argument(..., help="a finished run folder"),
            text: Optional[List[str]] = typer.Option(None, "--text", help="input text (repeatable)"),
            file: Optional[Path] = typer.Option(None, "--file", help="a text file, one input per line"),
            image: Optional[List[Path]] = typer.Option(None, "--image",
                                                       help="image-classification: an image file (repeatable)"),
            max_new_tokens: int = typer.Option(64, help="causal-lm: tokens to generate"),
            system: Optional[str] = typer.Option(None, "--system", help="causal-lm chat runs: the system prompt"),
            messages: Optional[Path] = typer.Option(None, "--messages", help="causal-lm chat runs: a JSONL file, one "
                                                    "conversation per line ({\"messages\": [...]}) ending with "
                                                    "the user turn to reply to"),
            as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
            trust_run_code: bool = trust_option()):
    """Labels + probabilities (classification), values per target (regression) or generated text (causal-lm)."""
    from . import api
    from .data.readers import read_lines

    inputs = list(text or [])
    if file is not None:
        with exit_on_user_error():
            inputs += read_lines(file)  # not found / not UTF-8 / empty: an error naming the file
    inputs += [str(p) for p in image or []]
    chat = {}
    if system is not None:
        chat["system"] = system
    if messages is not None:
        from .data.chat_formats import read_conversations

        with exit_on_user_error():
            chat["conversations"] = read_conversations(str(messages))
    if not inputs and not chat.get("conversations"):
        fail("give --text TEXT (repeatable), --file FILE, --messages FILE or --image PATH")
    with exit_on_user_error():
        results = api.predict(run_dir, inputs, max_new_tokens=max_new_tokens, trust_run_code=trust_run_code, **chat)
    if as_json:
        for r in results:
            print(json.dumps(r))
        return
    table = Table(show_header=True)
    if "label" in results[0]:
        table.add_column("text"), table.add_column("label"), table.add_column("score", justify="right")
        for r in results:
            table.add_row(*_plain(r.get("text", r.get("image")), r["label"], f"{r['score']:.3f}"))
    elif "entities" in results[0]:  # tagged words: each entity as type, text and character span
        table.add_column("text"), table.add_column("entities")
        for r in results:
            table.add_row(*_plain(r["text"], "; ".join(f"{e['type']}: {e['text']} [{e['start']}:{e['end']}]"
                                               for e in r["entities"]) or "-"))
    elif "predictions" in results[0]:  # values named by target (regression)
        names = list(results[0]["predictions"])
        table.add_column("text")
        for n in names:
            table.add_column(n, justify="right")
        for r in results:
            table.add_row(*_plain(r["text"], *(f"{r['predictions'][n]:.4g}" for n in names)))
    else:
        table.add_column("prompt"), table.add_column("generated")
        for r in results:
            table.add_row(*_plain(r["prompt"], r["generated"]))
    out.print(table)


def _plain(*cells) -> list[Text]:
    """Table cells as text, never markup: they quote the user's inputs and the model's outputs."""
    return [Text(str(c)) for c in cells]


@app.command()
def merge(run_dir: Path = typer.Argument(..., help="a finished run folder"),
          out_dir: Path = typer.Argument(..., help="new folder for the merged model"),
          trust_run_code: bool = trust_option()):
    """Fold the adapter into the base weights and save a plain transformers model."""
    from . import api

    with exit_on_user_error():
        path = api.merge(run_dir, out_dir, trust_run_code=trust_run_code)
    out.print(f"merged model written to {path}")


@app.command()
def inspect(model: str = typer.Argument(..., help="Hub id, local folder or .gguf file"),
            task: str = typer.Option("auto", help="a task with a model class (text-classification, causal-lm, "
                                     "image-classification, ...) or auto (from the model's config)"),
            batch_size: int = typer.Option(8, help="batch size for the memory estimate"),
            seq_len: int = typer.Option(128, help="sequence length for the memory estimate"),
            image_size: Optional[int] = typer.Option(None, help="image models: the image side in pixels for the "
                                                     "memory estimate (default: the model's preprocessor size)"),
            num_labels: int = typer.Option(2, help="classes, for the tasks with a new head"),
            as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """What can be adapted in MODEL, and what each method would cost."""
    from . import inspect as insp

    with exit_on_user_error():
        report = insp.inspect_model(model, task=task, batch_size=batch_size, seq_len=seq_len, num_labels=num_labels,
                                    image_size=image_size)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    insp.print_report(report, out)


@app.command()
def validate(config: Path = typer.Argument(...), overrides: Optional[List[str]] = typer.Argument(None)):
    """Check a config, its data and its model (source, config, weights headers, max_length) without training."""
    from .validate import validate as check

    with exit_on_user_error():
        v = check(config, overrides)
    cfg, splits = v.cfg, v.splits
    out.print(f"config ok: task={cfg.task} model={cfg.model.name} method={cfg.method.name}", highlight=False)
    out.print(f"model ok: {v.model}", markup=False, highlight=False)
    tested = f" test={len(splits.test)}" if splits.test is not None else ""
    out.print(f"data ok: train={len(splits.train)} eval={len(splits.eval)}{tested}")
    for line in v.preview:  # data from the user's files: printed as text, never as markup
        out.print(line, markup=False, highlight=False)
    for w in v.warnings:
        out.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)  # a warning quotes the user's data


@app.command()
def schema():
    """The JSON schema of the run config (the reference of every key)."""
    from .config import RunConfig

    print(json.dumps(RunConfig.model_json_schema(), indent=2))


app.command("sweep")(sweep_cmd)  # tuning strategy: sweep/
app.command("lr-find")(lr_find_cmd)
app.command("select")(select_cmd)  # model and method selection: select/
app.add_typer(runs_app, name="runs")  # iterate: the run index and reports, track/ + report/
app.command("report")(report_cmd)
app.command("export")(export_cmd)  # a language model for serving: merged / GGUF / Ollama


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="slimtune")
    except (OSError, RuntimeError) as e:  # a full disk, from whichever library was writing: said as such
        from .track.diskspace import no_space

        full = no_space(e, getattr(e, "filename", None) or Path.cwd())
        if full is None:
            raise
        say_error(full)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
