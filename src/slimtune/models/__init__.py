"""Resolve a model source (Hub id, folder, GGUF file, pip-packaged offline copy) and load it."""
from .sources import ModelError, ModelSource, load_pretrained, load_tokenizer, resolve, use_batch_pad  # noqa: F401
from .pooled import pool_position_only  # noqa: F401
