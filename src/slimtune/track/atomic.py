"""Atomic writes: a reader (or a crash) never sees a half-written file or folder.

Files and folders get the modes any other file of the user gets (0666 / 0777 less the umask), not
the 0600 / 0700 of `mkstemp` / `mkdtemp` (or of safetensors' writer): a run folder is shared with
other users and serving containers like the rest of the user's files.

Replacing a folder takes two renames (`path` -> `.path.old-PID`, then the finished temporary folder
-> `path`). A kill between them leaves `path` missing and its previous version, complete, under the
`.old-` name: `recover` (run by `clean_leftovers` at the start of every run and resume) puts it back.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once (once per process, at import)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def _chmod(path: Path | str, mode: int) -> None:
    os.chmod(path, mode & ~UMASK)


def write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _chmod(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path | str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _usual_modes(root: Path) -> None:
    """What the writers put in the folder gets the usual modes too: some write 0600 (safetensors' save_file)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            _chmod(os.path.join(dirpath, d), 0o777)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                _chmod(p, 0o777 if os.stat(p).st_mode & stat.S_IXUSR else 0o666)


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old-{os.getpid()}")


@contextlib.contextmanager
def folder(path: Path | str):
    """Yield a temporary sibling folder; on success it replaces `path` (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _chmod(tmp, 0o777)
        yield tmp
        _usual_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = _old_name(path)
        if old.exists():  # a leftover of an earlier write by a process with our pid
            shutil.rmtree(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:  # keep the previous version in place rather than none
            with contextlib.suppress(OSError):
                os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover(root: Path | str) -> list[Path]:
    """Put back folders that a kill between `folder`'s two renames left only as `.NAME.old-PID`
    (the previous, complete version); returns the folders restored."""
    restored = []
    for p in sorted(Path(root).rglob(".*.old-*")):
        name = p.name[1:].rsplit(".old-", 1)[0]
        target = p.with_name(name)
        if p.is_dir() and name and not target.exists():
            with contextlib.suppress(FileNotFoundError):  # another process of the same run got there first
                os.replace(p, target)
                restored.append(target)
    return restored


def clean_leftovers(root: Path) -> None:
    """Restore what `recover` can, then remove the temporary folders / files an interrupted write left behind
    (a `.tmp-` folder may be half-written; its complete predecessor is the one kept)."""
    recover(root)
    for p in Path(root).rglob(".*"):
        if ".tmp-" in p.name or ".old-" in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
