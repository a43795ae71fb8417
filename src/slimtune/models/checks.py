"""Checks on a model source that need no weights in memory: its config's position limit against
`model.max_length`, and its weights files (present, and their safetensors headers whole).

Used before training (the tasks' load_processor), by `slimtune validate`, and before an adapter
is loaded (methods.load_adapter)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import InputNotFound
from .sources import ModelError, ModelSource, _common_kwargs

# config keys that hold how many positions a model has, by architecture family
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# these number positions from padding_idx + 1, so pad_token_id + 1 of max_position_embeddings are never
# usable (RoBERTa: 514 positions, 512 tokens)
PADDING_OFFSET_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "mpnet", "data2vec-text",
                        "ibert", "roberta-prelayernorm", "xmod", "luke", "lilt", "markuplm", "esm"}
NO_LIMIT = 1_000_000  # a tokenizer's model_max_length above this is transformers' "unknown" sentinel


def model_config(src: ModelSource, trust_remote_code: bool = False, revision: str | None = None):
    """The model's config (config.json, or the GGUF metadata) without its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.path, **_common_kwargs(src, trust_remote_code, revision))
    except Exception as e:
        raise ModelError(f"cannot read the config of model {src.path!r}: {type(e).__name__}: {e}") from None


def position_limit(config=None, tokenizer=None) -> tuple[int | None, str]:
    """(most tokens the model takes, where that number comes from); (None, '') when nothing says."""
    for c in (config, getattr(config, "text_config", None)):
        for key in POSITION_KEYS:
            v = getattr(c, key, None) if c is not None else None
            if isinstance(v, int) and v > 0:
                offset = 0
                pad_id = getattr(c, "pad_token_id", None)
                if getattr(c, "model_type", None) in PADDING_OFFSET_TYPES and isinstance(pad_id, int):
                    offset = c.pad_token_id + 1
                note = f" less {offset} (positions start after the padding index)" if offset else ""
                return v - offset, f"{key}={v} in the model's config{note}"
    n = getattr(tokenizer, "model_max_length", None)
    if isinstance(n, int) and 0 < n < NO_LIMIT:
        return n, f"the tokenizer's model_max_length={n}"
    return None, ""


def check_max_length(cfg, config=None, tokenizer=None) -> int | None:
    """`model.max_length` within the model's limit, before any data is tokenized. Set by the user and too
    long: a ConfigError (a longer input fails deep inside the model's forward, mid-run). Left at its
    default and too long: the model's limit is used, so a small model runs without a key the user never set.
    Returns the limit (None when neither the config nor the tokenizer gives one)."""
    from ..errors import ConfigError

    limit, where = position_limit(config, tokenizer)
    if limit is None or cfg.model.max_length <= limit:
        return limit
    if "max_length" in cfg.model.model_fields_set:
        raise ConfigError(f"model.max_length: {cfg.model.max_length} is longer than model {cfg.model.name!r} takes: "
                          f"at most {limit} tokens ({where}); set model.max_length to {limit} or less")
    cfg.model.max_length = limit
    cfg.model.model_fields_set.discard("max_length")  # still the default's, not the user's (a sweep base leaves it out)
    return limit


def check_source_max_length(cfg, src: ModelSource, tokenizer=None) -> int | None:
    """check_max_length with the config of `src` (none for a folder without config.json: the tokenizer's)."""
    has_config = src.origin in ("hub", "package", "gguf") or Path(src.path, "config.json").is_file()
    config = model_config(src, cfg.model.trust_remote_code, cfg.model.revision) if has_config else None
    return check_max_length(cfg, config, tokenizer)


# -- weights files -----------------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def safetensors_header(path: str | Path) -> dict:
    """The header of a .safetensors file (tensor names, dtypes, shapes, offsets), checked against the file's
    size; the tensors are not read. A truncated or foreign file is a ModelError naming it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 1 or 8 + n > size:
            raise ModelError(f"{path}: not a whole safetensors file ({size} bytes; the header says {n} header bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: the safetensors header is not a JSON object")
    ends = [t["data_offsets"][1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
    data = size - 8 - n
    if ends and max(ends) > data:
        raise ModelError(f"{path}: truncated: its tensors need {max(ends)} bytes of data, the file holds {data}; "
                         "download or copy it again")
    return header


def check_weight_file(path: Path) -> None:
    """A weights file is there and whole enough to load: a safetensors header, or a torch zip's directory."""
    if not path.is_file():
        raise InputNotFound(f"{path}: missing")
    if path.suffix == ".safetensors":
        safetensors_header(path)
    elif path.suffix == ".bin":
        import zipfile

        if not zipfile.is_zipfile(path):  # torch.save writes a zip since torch 1.6; a truncated one has no directory
            raise ModelError(f"{path}: not a whole torch checkpoint (no zip directory at its end); download or copy it "
                             "again")


def check_weights_folder(folder: Path) -> list[Path]:
    """The weights files of a model folder, each checked; a ModelError when there are none."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        f = folder / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(f.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise ModelError(f"{f}: not a weights index ({type(e).__name__}: {e})") from None
            files = [folder / s for s in shards]
        else:
            files = [f]
        for s in files:
            check_weight_file(s)
        return files
    raise ModelError(f"{folder}: no weights file ({', '.join(WEIGHT_FILES)})")
