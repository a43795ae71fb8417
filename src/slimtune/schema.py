"""Base class for every typed config section.

`extra="forbid"` makes an unknown key an error that names the key; the field
descriptions are the help text and go into the JSON schema (`slimtune schema`).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
