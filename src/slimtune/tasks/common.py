"""Pieces shared by tasks: split loading, padding, metrics."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset

from ..data.readers import read_source
from ..data.splits import split_indices
from ..data.validate import DataReport, empty_text_warning, label_values, require_nonempty


@dataclass
class Splits:
    train: Dataset
    eval: Dataset
    test: Dataset | None
    report: DataReport
    meta: dict = field(default_factory=dict)  # task facts kept in the run folder (labels, format)
    sources: dict = field(default_factory=dict)

    def present(self):
        """(name, split) for the splits that exist: train, eval, then test when given."""
        for name in ("train", "eval", "test"):
            split = getattr(self, name)
            if split is not None:
                yield name, split


def read_splits(cfg, stratify_column: str | None, check_columns, text_columns=()) -> Splits:
    """Read train / eval / test, check columns, carve eval out of train when absent.

    `stratify_column`: the label column (classification): every file's labels are checked and the
    carved eval split is stratified by them. `text_columns`: empty texts are counted in the report.
    The checks run on each file as read, so the record numbers they name are the file's."""
    d = cfg.data
    report = DataReport()

    def read(source: str, split: str) -> Dataset:
        ds = read_source(source)
        check_columns(ds, source)
        require_nonempty(ds, split, source)
        if stratify_column:
            label_values(ds[stratify_column], source, stratify_column)
        for col in text_columns:
            empty_text_warning(report, ds[col], source, col)
        return ds

    train = read(d.train, "train")
    sources = {"train": d.train}
    if d.eval:
        ev = read(d.eval, "eval")
        sources["eval"] = d.eval
    else:
        labels = None
        if stratify_column:
            from ..data.validate import check_class_sizes

            labels = label_values(train[stratify_column], d.train, stratify_column)
            check_class_sizes(labels, f"{d.train} (column {stratify_column!r})", d.min_class_examples)
        if len(train) < 2:
            raise_small(d.train, len(train))
        tr_idx, ev_idx = split_indices(len(train), d.eval_fraction, d.split_seed, labels)
        ev = train.select(ev_idx)
        train = train.select(tr_idx)
        sources["eval"] = f"{d.eval_fraction:.0%} of {d.train} (seed {d.split_seed})"
        report.stats["eval_carved_out"] = True
    test = None
    if d.test:
        test = read(d.test, "test")
        sources["test"] = d.test
    if d.max_train_samples and len(train) > d.max_train_samples:
        train = train.shuffle(seed=d.split_seed).select(range(d.max_train_samples))
    if d.max_eval_samples and len(ev) > d.max_eval_samples:
        ev = ev.shuffle(seed=d.split_seed).select(range(d.max_eval_samples))
    return Splits(train, ev, test, report, sources=sources)


def raise_small(source: str, n: int):
    from ..data.readers import DataError

    raise DataError(f"{source}: {n} example(s) cannot be split into train and eval; add examples or give data.eval")


def pad_batch(examples: list[dict], pad_id: int, keys=("input_ids", "attention_mask", "labels"), label_pad: int = -100) -> dict:
    n = max(len(e["input_ids"]) for e in examples)
    out = {}
    for key in keys:
        if key not in examples[0] or not isinstance(examples[0][key], list):
            continue
        fill = {"input_ids": pad_id, "attention_mask": 0, "labels": label_pad}.get(key, 0)
        out[key] = torch.tensor([e[key] + [fill] * (n - len(e[key])) for e in examples], dtype=torch.long)
    return out


def truncation_warning(report: DataReport, split: str, n_truncated: int, n: int, max_length: int) -> None:
    report.stats[f"{split}_truncated"] = n_truncated
    if n_truncated:
        report.warn(f"{split}: {n_truncated} of {n} examples ({n_truncated / n:.1%}) are longer than model.max_length={max_length} and were truncated")


# a head holds this many tokens more than it must, so that the last word it cuts lies past the kept tokens
HEAD_MARGIN = 8


def head_texts(tokenizer, texts: list[str], n_tokens: int) -> tuple[list[str], list[bool]]:
    """Each text cut to a head holding at least `n_tokens` tokens, or left whole; and whether it was cut.

    A fast tokenizer tokenizes a whole text before it truncates, so one 50 MB cell cost 10 GB of memory
    and minutes, while only the first max_length tokens are kept. A cut head ends at a whitespace (no
    word split, so its first tokens are those of the whole text); it starts at 16 characters per wanted
    token and doubles until it holds enough tokens (whitespace runs and long words hold few)."""
    heads, cut = list(texts), [False] * len(texts)
    budget = 16 * n_tokens + 256
    todo = [i for i, t in enumerate(texts) if len(t) > budget]
    while todo:
        todo = [i for i in todo if len(texts[i]) > budget]  # the others are whole, as they were
        if not todo:
            break
        cand = {i: texts[i][:_space_before(texts[i], budget)] for i in todo}
        ids = tokenizer([cand[i] for i in todo], add_special_tokens=False, truncation=True, max_length=n_tokens)["input_ids"]
        short = []
        for i, x in zip(todo, ids):
            if len(x) >= n_tokens:
                heads[i], cut[i] = cand[i], True
            else:
                short.append(i)
        todo, budget = short, budget * 2
    return heads, cut


def _space_before(text: str, end: int) -> int:
    """The last whitespace before `end` (in its second half), else `end`."""
    j = max(text.rfind(c, end // 2, end) for c in " \n\t")
    return j if j > 0 else end


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean()) if len(gold) else float("nan")


def macro_f1(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> float:
    f1s = []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (gold == c))
        fp = np.sum((pred == c) & (gold != c))
        fn = np.sum((pred != c) & (gold == c))
        if tp + fp + fn == 0:
            continue  # class absent from both: not part of the average
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")
