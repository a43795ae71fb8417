"""Read a data source into a `datasets.Dataset`, with errors that name the file.

Sources: .csv / .tsv / .jsonl / .json / .parquet / .txt files, CoNLL-style .conll / .iob / .bio files
(data/conll.py), a folder written by `Dataset.save_to_disk`, `hf:<name>[:<split>]` for a Hub dataset, and
`builtin:<name>` for real datasets that a pip package ships (offline demos).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from datasets import Dataset

from ..errors import DataError
from .conll import CONLL_SUFFIXES, parse_conll

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt") + CONLL_SUFFIXES


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}, line {line}); "
            "re-save the file as UTF-8 (for example `iconv -f latin1 -t utf-8`)"
        ) from None


def _read_delimited(path: Path, delimiter: str) -> Dataset:
    import pandas as pd

    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    try:
        df = pd.read_csv(io.StringIO(text), sep=delimiter, quoting=quoting, keep_default_na=False, dtype=str)
    except Exception as e:  # pandas' ParserError and friends
        raise DataError(f"{path}: cannot parse as {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from None
    return Dataset.from_pandas(df, preserve_index=False)


def _read_jsonl(path: Path) -> Dataset:
    text = _read_text(path)
    rows = []
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i} is not valid JSON ({e.msg}); "
                                "expected one JSON object per line") from None
    if not rows:
        raise DataError(f"{path}: the file is empty (no records)")
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: record {bad} is not a JSON object; expected objects such as {{\"text\": ..., "
                        "\"label\": ...}}")
    import pyarrow as pa

    try:
        return Dataset.from_list(rows)
    except pa.ArrowException as e:  # a column holds values of several JSON types: Arrow needs one per column
        raise DataError(_mixed_types(path, rows) or f"{path}: the records do not form a table ({e})") from None


def _json_type(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true/false"
    return {int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(type(v), type(v).__name__)


def _mixed_types(path: Path, rows: list[dict]) -> str | None:
    """The first column whose values have more than one JSON type, with the first records of each type."""
    for col in dict.fromkeys(k for r in rows for k in r):
        where: dict[str, list[int]] = {}
        for i, r in enumerate(rows, 1):
            t = _json_type(r.get(col))
            if t is not None:
                where.setdefault(t, []).append(i)
        if len(where) > 1:
            parts = "; ".join(f"{t} in record(s) {', '.join(map(str, idx[:5]))}{', ...' if len(idx) > 5 else ''} "
                              f"({len(idx)} in all)" for t, idx in where.items())
            return (f"{path}: column {col!r} mixes value types: {parts}; give every value of a column the same type "
                    f"(for labels, quote them all: \"1\" rather than 1)")
    return None


def read_lines(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file (`predict --file`), with errors that name the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: file not found (working directory: {Path.cwd()})")
    lines = [line for line in _read_text(path).splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: the file is empty (no non-blank lines); give one input per line")
    return lines


def _read_txt(path: Path) -> Dataset:
    text = _read_text(path)
    docs = [d.strip("\n") for d in text.split("\n\n") if d.strip()]
    return Dataset.from_dict({"text": docs})


def read_conll(source: str | Path, token_column: int = 0, tag_column: int = -1) -> Dataset:
    """A CoNLL-style file whatever its extension (a .txt one too), as data/conll.py reads it."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{source}: file not found (working directory: {Path.cwd()})")
    return parse_conll(_read_text(path), source, token_column, tag_column)


def _read_parquet(path: Path) -> Dataset:
    try:
        return Dataset.from_parquet(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot read as Parquet: {e}") from None


def _read_hub(spec: str) -> Dataset:
    from datasets import load_dataset

    name, _, split = spec.partition(":")
    try:
        return load_dataset(name, split=split or "train")
    except Exception as e:
        raise DataError(f"hf:{spec}: cannot load the Hub dataset ({type(e).__name__}: {e})") from None


def read_source(source: str) -> Dataset:
    if source.startswith("hf:"):
        return _read_hub(source[3:])
    if source.startswith("builtin:"):
        from .builtin import load_builtin

        return load_builtin(source[len("builtin:"):])
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: file not found (working directory: {Path.cwd()})")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            from datasets import load_from_disk

            return load_from_disk(str(path))
        raise DataError(f"{source}: a folder, but not one written by datasets' save_to_disk (no dataset_info.json)")
    suffix = path.suffix.lower()
    readers = {
        ".csv": lambda p: _read_delimited(p, ","),
        ".tsv": lambda p: _read_delimited(p, "\t"),
        ".jsonl": _read_jsonl,
        ".json": _read_jsonl,
        ".parquet": _read_parquet,
        ".txt": _read_txt,
        **{suffix: read_conll for suffix in CONLL_SUFFIXES},
    }
    if suffix not in readers:
        raise DataError(f"{source}: unsupported file type {suffix!r}; accepted: {', '.join(SUFFIXES)}, a saved "
                        "datasets folder, hf:<name>, builtin:<name>")
    return readers[suffix](path)
