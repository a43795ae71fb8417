"""The optuna storage URL: which one a sweep connects to, and the masked form that is all any file holds.

The password of a database URL (postgresql://user:password@host/db) is never written: sweep.yaml, the plan
file of the worker processes, summary.json and the run index see `mask_url(url)`; the real URL lives in
memory, comes from --storage, $SLIMTUNE_SWEEP_STORAGE or the config file at run time, and reaches worker
processes in their environment.
"""
from __future__ import annotations

import os
import re

STORAGE_ENV = "SLIMTUNE_SWEEP_STORAGE"  # the storage URL at run time, instead of --storage

MASK = "***"
_SECRET_QUERY = re.compile(r"([?&;](?:password|passwd|pwd|sslpassword|secret|token)=)[^&;#]*", re.IGNORECASE)
_MASKED = re.compile(r"(?:^|[:/])\*\*\*@|=\*\*\*(?:[&;#]|$)")


def mask_url(url: str) -> str:
    """The URL as it may be shown or written to a file: the password (what follows 'user:' before the last '@')
    and password-like query values replaced by ***. Done on the text, not by a URL parser, so that a URL no
    parser reads (a password with '@' or '/' in it) is masked too; a user part without ':' is masked whole
    unless it is a plain user name."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # not a URL; 'user:pw@host' still has its secret before the last '@'
        scheme, rest = "", url
    if "@" in rest and not rest.startswith("/"):  # sqlite:////abs/path has no user part
        userinfo, host = rest.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        plain_user = re.fullmatch(r"[\w.+-]*", user) is not None
        rest = (f"{user}:{MASK}" if colon and plain_user else userinfo if plain_user else MASK) + "@" + host
    return _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, scheme + sep + rest)


def is_masked(url: str) -> bool:
    return _MASKED.search(url) is not None


def is_sqlite(url: str) -> bool:
    """SQLite is one machine's storage: a trial's process id there says whether its worker still runs."""
    return url.startswith("sqlite:")


def storage_url(saved: str | None, given: str | None = None) -> str | None:
    """The storage URL to connect to: `given` (--storage), else $SLIMTUNE_SWEEP_STORAGE, else the config's
    sweep.storage; None: SQLite in the sweep folder. Only its masked form is ever written (sweep.yaml, the plan
    file, summary.json), so a saved URL that was masked needs the real one again at run time."""
    from ..config import ConfigError

    url = given or os.environ.get(STORAGE_ENV) or saved
    if not url:
        return None
    if is_masked(url):
        raise ConfigError(f"sweep.storage {url!r} is masked (the password is never saved); give the URL again: "
                          f"pass --storage URL or set {STORAGE_ENV}=URL")
    try:
        from sqlalchemy.engine import make_url

        make_url(url)
    except Exception:
        raise ConfigError(f"sweep.storage {mask_url(url)!r} is not a database URL; accepted: sqlite:///path/study.db, "
                          "postgresql://user:password@host/db (or another SQLAlchemy URL)") from None
    return url
