"""The tokenizer part of a GGUF file: the `tokenizer.*` metadata llama.cpp tokenizes with.

Two sources. A base model that came from a GGUF file (a `.gguf` model.name, the packaged SmolLM2) has that
file's metadata copied key for key, which is exactly what llama.cpp read before the fine-tune (its
`tokenizer.ggml.pre` included). Otherwise the metadata is built from the run's tokenizer the way llama.cpp's
convert_hf_to_gguf.py builds it: byte-level BPE as `gpt2` (tokens, token types, merges), BPE with byte
fallback (SentencePiece-style, Llama 2 / Mistral) as `llama` through gguf's LlamaHfVocab, and the special ids,
`add_*_token` flags and chat template through gguf.SpecialVocab.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ModelError

# The split regexes of the pre-tokenizers llama.cpp implements under these `tokenizer.ggml.pre` names, as a
# tokenizer.json spells them (Split + ByteLevel without its own regex). convert_hf_to_gguf.py names a
# pre-tokenizer by hashing the encoding of a probe text, which needs the original vocabulary to check; the
# regex itself says how the text is split, which is what the name tells llama.cpp.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def warn(warnings: list[str], text: str) -> None:
    warnings.append(text)
    print(f"[export] warning: {text}", file=sys.stderr)


def add_tokenizer(writer: Any, tokenizer: Any, meta: dict, n_vocab: int, warnings: list[str]) -> None:
    """Write the tokenizer.* keys for a model with `n_vocab` embedding rows."""
    source = source_gguf(meta)
    if source is not None and copy_from_gguf(writer, source, tokenizer, n_vocab, warnings):
        return
    build_from_tokenizer(writer, tokenizer, n_vocab, warnings)


def source_gguf(meta: dict) -> Path | None:
    """The GGUF file the run's base model was read from, when it was one and is still there."""
    src = meta.get("model_source") or {}
    if not src.get("gguf_file"):
        return None
    path = Path(src.get("path") or ".") / src["gguf_file"]
    return path if path.is_file() else None


def copy_from_gguf(writer: Any, source: Path, tokenizer: Any, n_vocab: int, warnings: list[str]) -> bool:
    """Copy every tokenizer.* key of `source`; False (nothing written) when its vocabulary does not fit."""
    import gguf

    fields = {k: f for k, f in gguf.GGUFReader(str(source)).fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != n_vocab:
        warn(warnings, f"{source.name}: its vocabulary does not match the model's {n_vocab} embedding rows; "
                       "the tokenizer metadata is built from the run's tokenizer instead")
        return False
    # the chat template the run was trained with (a fallback one where the file had none) is the one to serve
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    for key, field in fields.items():
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = template if key == "tokenizer.chat_template" and template else field.contents()
        writer.add_key_value(key, value, vtype, sub_type)
    if "tokenizer.chat_template" not in fields and template:
        writer.add_chat_template(template)
    return True


def build_from_tokenizer(writer: Any, tokenizer: Any, n_vocab: int, warnings: list[str]) -> None:
    """convert_hf_to_gguf.py's set_vocab for the llama family, from the run's saved tokenizer files."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        if not path.is_file():
            raise ModelError("GGUF export needs the run's tokenizer as a fast tokenizer (tokenizer.json); "
                             f"{type(tokenizer).__name__} wrote none")
        spec = json.loads(path.read_text(encoding="utf-8"))
        kind = spec.get("model", {}).get("type")
        if kind == "BPE" and spec["model"].get("byte_fallback"):
            _sentencepiece_bpe(writer, Path(tmp), warnings)
            return
        if kind != "BPE":
            raise ModelError(f"the run's tokenizer is a {kind} model, which llama.cpp cannot run for this "
                             "architecture; GGUF export writes byte-level BPE tokenizers (GPT-2 style, "
                             "tokenizer.ggml.model 'gpt2') and SentencePiece-style BPE ones ('llama')")
        tokens, types = bpe_tokens(tokenizer, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(spec, warnings))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _sentencepiece_bpe(writer: Any, folder: Path, warnings: list[str]) -> None:
    """convert_hf_to_gguf.py's _set_vocab_llama_hf: the vocabulary as gguf's LlamaHfVocab reads tokenizer.json."""
    import gguf

    vocab = gguf.LlamaHfVocab(folder)
    tokens, scores, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    warn(warnings, "SentencePiece-style tokenizer written from tokenizer.json with the placeholder scores "
                   "llama.cpp's converter gives it when there is no tokenizer.model; tokenization in llama.cpp may "
                   "differ from transformers' for some texts")


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special: added tokens some models do not mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def bpe_tokens(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and token types by id, as convert_hf_to_gguf.py's get_vocab_base lists them: embedding rows
    without a token become `[PADi]` (unused), added tokens control (special) or user-defined."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ModelError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} "
                         "embedding rows")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # llama.cpp matches user-defined tokens pre-normalized
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def pre_tokenizer_name(spec: dict, warnings: list[str]) -> str:
    """The `tokenizer.ggml.pre` whose splitting llama.cpp implements the way this tokenizer.json splits text;
    'default' (with a warning) for one that is not recognised."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    byte_level = kinds[-1:] == ["ByteLevel"] and not last.get("add_prefix_space", False)
    name = None
    if byte_level and kinds == ["ByteLevel"] and last.get("use_regex", True):
        name = "gpt-2"  # GPT-2's own regex
    elif byte_level and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and last.get("use_regex", True):
        name = "smollm"  # single digits, then GPT-2's regex (SmolLM, SmolLM2)
    elif byte_level and kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        name = SPLITS.get((steps[0].get("pattern") or {}).get("Regex"))
    if name is None:
        warn(warnings, "the tokenizer's pre-tokenizer is not one slimtune recognises (GPT-2, SmolLM, Llama 3, "
                       "Qwen2); tokenizer.ggml.pre is 'default', so tokenization in llama.cpp may differ from "
                       "transformers'")
        return "default"
    return name
