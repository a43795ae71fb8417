"""What every CLI module shares: the two consoles, the `--trust-run-code` option, and how a user error ends a
command (`error: <message>`, exit 2). Only a `SlimtuneError` is a user error; anything else is a bug and keeps
its traceback."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from .errors import SlimtuneError

err = Console(stderr=True)
out = Console()


def say_error(problem: BaseException | str) -> None:
    """`error: <problem>` on stderr, the message as it is (never read as markup)."""
    err.print(f"[bold red]error:[/] {escape(str(problem))}", markup=True, highlight=False)


def fail(problem: BaseException | str, code: int = 2) -> NoReturn:
    """Say the error and end the command."""
    say_error(problem)
    raise typer.Exit(code)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """A SlimtuneError inside the block ends the command with its message."""
    try:
        yield
    except SlimtuneError as e:
        fail(e)


def trust_option() -> bool:
    return typer.Option(False, "--trust-run-code", help="load a run folder whose model runs code (its config sets "
                        "model.trust_remote_code, or the model comes from a factory); a copied run folder is code")
