"""A full disk, said as such: which path, how much the write needed, how much is free.

The libraries that write our files fail on a full disk in their own words: Python's OSError (errno 28),
safetensors' "No space left on device (os error 28)", torch.save's "enforce fail at inline_container.cc"
(no mention of space at all). `no_space` recognises them and turns them into one `NoSpaceError`.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

from ..errors import SlimtuneError

MB = 2**20
_FULL_WORDS = ("no space left", "disk is full", "database or disk is full", "os error 28")
_TORCH_WRITER = ("inline_container", "pytorchstreamwriter", "unexpected pos")


class NoSpaceError(SlimtuneError, OSError):
    """A write failed because the disk is full; the message names the path and the space needed."""

    def __init__(self, path: Path | str, need_bytes: int | None = None, free_bytes: int | None = None):
        self.path = Path(path)
        need = f"; it needs about {need_bytes / MB:,.0f} MB" if need_bytes else ""
        free = f", {free_bytes / MB:,.0f} MB free there" if free_bytes is not None else ""
        super().__init__(errno.ENOSPC, f"no space left on the disk of {self.path}{free}{need}. Free some space "
                                       "(or point output.dir at another disk) and resume the run; nothing already "
                                       "saved was lost", str(self.path))

    def __str__(self) -> str:
        return self.strerror


def free_bytes(path: Path | str) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_full(exc: BaseException, path: Path | str | None = None, need_bytes: int | None = None) -> bool:
    """Whether `exc` is a full disk: errno 28 anywhere in its chain, a library's words for it, or a torch writer
    failure while the disk at `path` has less room than the write needed."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc).lower()
        if any(w in text for w in _FULL_WORDS):
            return True
        if path is not None and any(w in text for w in _TORCH_WRITER):
            free = free_bytes(path)
            return free is not None and free < max(need_bytes or 0, 16 * MB)
        exc = exc.__cause__ or exc.__context__
    return False


def no_space(exc: BaseException, path: Path | str, need_bytes: int | None = None) -> NoSpaceError | None:
    """The NoSpaceError to raise instead of `exc`, or None when `exc` is something else."""
    if isinstance(exc, NoSpaceError):
        return exc
    if not is_full(exc, path, need_bytes):
        return None
    return NoSpaceError(getattr(exc, "filename", None) or path, need_bytes, free_bytes(path))
