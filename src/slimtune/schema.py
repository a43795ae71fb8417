"""Base class for every typed config section.

`extra="forbid"` makes an unknown key an error that names the key; the field
descriptions are the help text and go into the JSON schema (`slimtune schema`).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def plain_name(value: str | None) -> str | None:
    """A folder name that stays inside the folder it is created in (output.name, sweep.name): one path
    component, not '.' or '..' (a name with '/', '\\' or '..' would write outside output.dir)."""
    if value is None:
        return value
    if not value.strip() or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise ValueError("must be a plain folder name, created under output.dir: one path component, no '/' or "
                         "'\\', not '..' or '.' (for example my-run-1)")
    return value
