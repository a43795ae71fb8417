"""Data: read a source into a `datasets.Dataset`, validate it, split it, batch it."""
from .readers import DataError, read_source  # noqa: F401
