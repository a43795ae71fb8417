"""Checks on the data before any compute: errors stop the run, warnings are reported.

Errors: missing file / non-UTF-8 (readers.py), missing column, empty split,
eval labels never seen in training, a class too small to split.
Warnings: duplicates, train/eval overlap, class imbalance (truncation share is
measured after tokenization, in the task).
"""
from __future__ import annotations

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
                f"{source}: column {col!r} not found (set by {key}); the file has columns: {', '.join(ds.column_names) or '(none)'}"
            )


def require_nonempty(ds: Dataset, split: str, source: str) -> None:
    if len(ds) == 0:
        raise DataError(f"{source}: the {split} split is empty (0 examples)")


def check_class_sizes(labels: list[str], source: str, minimum: int) -> None:
    counts = Counter(labels)
    small = {k: v for k, v in counts.items() if v < minimum}
    if small:
        shown = ", ".join(f"{k!r} ({v})" for k, v in sorted(small.items(), key=lambda kv: kv[1])[:10])
        raise DataError(
            f"{source}: {len(small)} class(es) have fewer than {minimum} examples, too few to split into train and eval: "
            f"{shown}; add examples, drop or merge these classes, or give a separate eval file (data.eval)"
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
        report.warn(f"{split}: {dup} duplicate example(s) ({dup / max(1, len(texts)):.1%}); copies have the same length, "
                    "so length-grouped batches tend to hold several copies of one example: deduplicate, or set "
                    "train.group_by_length: false")
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
            report.warn(f"class imbalance: {big!r} has {hi} examples, {small!r} only {lo} ({hi / lo:.0f}x); consider macro_f1 as the monitored metric")
