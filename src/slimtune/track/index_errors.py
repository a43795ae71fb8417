"""What an error from the run index's SQLite file means, and what to do about it, said truthfully.

A full disk, a lock held too long, a read-only file or folder and missing permissions leave the
index as it was (SQLite rolls a failed write back): the way out is to fix the cause and run the
command again. Only a real corruption ("file is not a database", "malformed") calls for moving
the file away and rebuilding it from the run folders, which loses the rows whose folders are gone.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

# kind: (SQLite result code names, words of the message, errno values)
_KINDS = (
    ("full", ("SQLITE_FULL",), ("database or disk is full",), (errno.ENOSPC, errno.EDQUOT)),
    ("locked", ("SQLITE_BUSY", "SQLITE_LOCKED"), ("database is locked", "database table is locked"), ()),
    ("read-only", ("SQLITE_READONLY",), ("readonly database", "read-only"), (errno.EROFS,)),
    ("permission", ("SQLITE_PERM", "SQLITE_AUTH", "SQLITE_CANTOPEN"),
     ("unable to open database file", "permission denied"), (errno.EACCES, errno.EPERM)),
    ("damaged", ("SQLITE_CORRUPT", "SQLITE_NOTADB"), ("file is not a database", "malformed", "file is encrypted"), ()),
    ("io", ("SQLITE_IOERR",), ("disk i/o error",), (errno.EIO,)),
)
# a write that failed for one of these left the file as it was; a listing can still show the folders
UNWRITABLE = ("full", "locked", "read-only", "io")


def kind_of(e: BaseException) -> str:
    """full, locked, read-only, permission, damaged, io or other."""
    code = getattr(e, "sqlite_errorname", None) or ""  # Python >= 3.11 sets it on errors from SQLite itself
    msg = str(e).lower()
    num = getattr(e, "errno", None) if isinstance(e, OSError) else None
    for kind, codes, words, errnos in _KINDS:
        if (code and code.startswith(codes)) or any(w in msg for w in words) or (num is not None and num in errnos):
            return kind
    return "other"


def _free(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:,.0f} MB free"
    except OSError:
        return "free space unknown"


def explain(root: str | Path, e: BaseException, busy_timeout_s: float = 60.0) -> str:
    """The message for an error the index at `root` raised: what happened, and advice that holds."""
    path = Path(root) / "index.sqlite"
    folder = path.parent
    kind = kind_of(e)
    if kind == "full":
        return (f"no space left on {folder} ({_free(folder)}): {path} could not be written. Free some space and "
                f"run this again; the index is not damaged (SQLite rolled the write back), do not rebuild it")
    if kind == "locked":
        return (f"{path} is locked: another process (a run or sweep writing to it) held it for more than "
                f"{busy_timeout_s:.0f} s. Run this again when it is done; the index is not damaged")
    if kind == "read-only":
        return (f"{path} is read-only (the file, its folder {folder} or the file system): it cannot be written. "
                f"Make the file and the folder writable (chmod u+w), or work on a writable copy of {folder}; "
                f"the index is not damaged")
    if kind == "permission":
        return (f"{path} cannot be opened ({e}): check that you may read and write the file and its folder "
                f"{folder} (ls -l); SQLite also needs to create {path.name}-wal and {path.name}-shm beside it")
    if kind == "damaged":
        return (f"{path} is damaged ({e}). Move it away, keeping the copy (`sqlite3 COPY .recover` may save rows "
                f"whose folders are gone), and rebuild it from the run folders with "
                f"`slimtune runs add {root} --root {root}`")
    if kind == "io":
        return (f"disk I/O error on {path} ({e}; {_free(folder)} on {folder}): the disk is failing or full, or "
                f"the file system is gone (a network mount). Check it and run this again")
    return f"{path}: {type(e).__name__}: {e}"
