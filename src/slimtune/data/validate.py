"""Checks on the data before any compute: errors stop the run, warnings are reported.

Errors: missing file / non-UTF-8 (readers.py), missing column, empty split,
empty or missing labels, eval labels never seen in training, a class too small to split.
Warnings: empty or whitespace-only texts, duplicates, train/eval overlap, class imbalance
(truncation share is measured after tokenization, in the task).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from datasets import Dataset

from .readers import DataError


@dataclass
class DataReport:
    warnings: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)


def require_columns(ds: Dataset, columns: list[str], source: str, key_hint: dict[str, str]) -> None:
    for col in columns:
        if col not in ds.column_names:
            key = key_hint.get(col, "data")
            raise DataError(
                f"{source}: column {col!r} not found (set by {key}); "
                f"the file has columns: {', '.join(ds.column_names) or '(none)'}"
            )


def require_nonempty(ds: Dataset, split: str, source: str) -> None:
    if len(ds) == 0:
        raise DataError(f"{source}: the {split} split is empty (0 examples)")


def _blank(value) -> bool:
    """A missing cell: None (JSONL key absent / null), NaN (Parquet, pandas), or only whitespace."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def _records(idx: list[int], shown: int = 5) -> str:
    """1-based record numbers (the first data row of a CSV is record 1), the first few."""
    head = ", ".join(str(i + 1) for i in idx[:shown])
    return f"record {head}" if len(idx) == 1 else f"records {head}" + (", ..." if len(idx) > shown else "")


def label_values(values, source: str, column: str) -> list[str]:
    """The labels as stripped strings. An empty or missing label is an error: read as text it would
    become a class '' (or 'None' / 'nan') that the model is trained to predict."""
    missing = [i for i, v in enumerate(values) if _blank(v)]
    if missing:
        raise DataError(
            f"{source}: column {column!r} has {len(missing)} empty or missing label(s) ({_records(missing)}); "
            "every example needs a label: fill them in or drop those rows"
        )
    return [str(v).strip() for v in values]


def empty_text_warning(report: DataReport, values, source: str, column: str) -> None:
    """Empty or whitespace-only texts train on the special tokens alone: counted, with the first records."""
    empty = [i for i, v in enumerate(values) if _blank(v)]
    if empty:
        report.stats.setdefault("empty_texts", {})[f"{source} ({column})"] = len(empty)
        report.warn(f"{source}: column {column!r} has {len(empty)} empty or whitespace-only text(s) "
                    f"({_records(empty)}); the model sees only its special tokens for them")


def check_class_sizes(labels: list[str], source: str, minimum: int) -> None:
    counts = Counter(labels)
    small = {k: v for k, v in counts.items() if v < minimum}
    if small:
        shown = ", ".join(f"{k!r} ({v})" for k, v in sorted(small.items(), key=lambda kv: kv[1])[:10])
        raise DataError(
            f"{source}: {len(small)} class(es) have fewer than {minimum} examples, "
            f"too few to split into train and eval: {shown}; "
            "add examples, drop or merge these classes, or give a separate eval file (data.eval)"
        )


def check_unseen_labels(train_labels: list[str], eval_labels: list[str], source: str, column: str) -> None:
    unseen = sorted(set(eval_labels) - set(train_labels))
    if unseen:
        raise DataError(
            f"{source}: column {column!r} has labels that the training data never shows: "
            f"{', '.join(repr(u) for u in unseen[:10])}; the model can only predict: "
            f"{', '.join(repr(x) for x in sorted(set(train_labels))[:20])}"
        )


def text_warnings(report: DataReport, split: str, texts: list[str], others: dict[str, list[str]] | None = None) -> None:
    counts = Counter(texts)
    dup = sum(v - 1 for v in counts.values() if v > 1)
    if dup:
        report.warn(f"{split}: {dup} duplicate example(s) ({dup / max(1, len(texts)):.1%}); "
                    "copies have the same length, so length-grouped batches tend to hold several copies of "
                    "one example: deduplicate, or set train.group_by_length: false")
    for name, other in (others or {}).items():
        overlap = len(set(texts) & set(other))
        if overlap:
            report.warn(f"{split}/{name} overlap: {overlap} text(s) appear in both; the {name} metrics are optimistic")


def imbalance_warning(report: DataReport, labels: list[str], threshold: float = 10.0) -> None:
    counts = Counter(labels)
    if len(counts) > 1:
        hi, lo = max(counts.values()), min(counts.values())
        report.stats["class_counts"] = dict(sorted(counts.items(), key=lambda kv: str(kv[0])))
        if hi / lo >= threshold:
            big = max(counts, key=counts.get)
            small = min(counts, key=counts.get)
            report.warn(f"class imbalance: {big!r} has {hi} examples, {small!r} only {lo} ({hi / lo:.0f}x); "
                        "consider macro_f1 as the monitored metric")
