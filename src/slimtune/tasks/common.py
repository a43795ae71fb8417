"""Pieces shared by tasks: split loading and label order, padding, text heads, classification metrics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NoReturn

import numpy as np
import torch
from datasets import Dataset

from ..data.readers import read_source
from ..data.splits import split_indices, subset_indices
from ..data.validate import DataReport, empty_text_warning, label_values, require_nonempty
from .base import Batch, Task

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass
class Splits:
    """The data of a run. Tables are datasets' (text) or data.images.ImageTable (images)."""

    train: Any
    eval: Any
    test: Any | None
    report: DataReport
    meta: dict = field(default_factory=dict)  # task facts kept in the run folder (labels, format)
    sources: dict = field(default_factory=dict)

    def present(self) -> Iterator[tuple[str, Any]]:
        """(name, split) for the splits that exist: train, eval, then test when given."""
        for name in ("train", "eval", "test"):
            split = getattr(self, name)
            if split is not None:
                yield name, split


def read_splits(cfg: RunConfig, stratify_column: str | None, check_columns: Callable[[Dataset, str], None],
                text_columns: Iterable[str] = ()) -> Splits:
    """Read train / eval / test tables, check columns, carve eval out of train when absent, then cut to
    data.max_train_samples / max_eval_samples.

    `stratify_column`: the label column (classification): every file's labels are checked and the
    carved eval split is stratified by them. `text_columns`: empty texts are counted in the report.
    The checks run on each file as read, so the record numbers they name are the file's."""
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

    def carve_labels(train: Dataset) -> tuple[list[str], str]:
        return (label_values(train[stratify_column], cfg.data.train, stratify_column),
                f"{cfg.data.train} (column {stratify_column!r})")

    splits = gather_splits(cfg, read, report, carve_labels if stratify_column else None)
    limit_samples(cfg, splits, label_values(splits.train[stratify_column], cfg.data.train, stratify_column)
                  if stratify_column and cfg.data.max_train_samples else None)
    return splits


def gather_splits(cfg: RunConfig, read: Callable[[str, str], Any], report: DataReport,
                  carve_labels: Callable[[Any], tuple[list[str], str]] | None = None) -> Splits:
    """train, eval and test as `read(source, split)` gives them (a datasets table or an ImageTable); without
    data.eval, eval is data.eval_fraction of train, stratified by `carve_labels(train)` -> (labels, where they
    come from, for the class-size error) when given. The split is a function of data.split_seed only."""
    d = cfg.data
    train = read(d.train, "train")
    sources = {"train": d.train}
    if d.eval:
        evals = read(d.eval, "eval")
        sources["eval"] = d.eval
    else:
        labels = None
        if carve_labels is not None:
            from ..data.validate import check_class_sizes

            labels, where = carve_labels(train)
            check_class_sizes(labels, where, d.min_class_examples)
        if len(train) < 2:
            raise_small(d.train, len(train))
        tr_idx, ev_idx = split_indices(len(train), d.eval_fraction, d.split_seed, labels)
        train, evals = train.select(tr_idx), train.select(ev_idx)
        sources["eval"] = f"{d.eval_fraction:.0%} of {d.train} (seed {d.split_seed})"
        report.stats["eval_carved_out"] = True
    test = None
    if d.test:
        test = read(d.test, "test")
        sources["test"] = d.test
    return Splits(train, evals, test, report, sources=sources)


def limit_samples(cfg: RunConfig, splits: Splits, strata: list | None = None) -> None:
    """data.max_train_samples / max_eval_samples: a seeded random subset of each split, in place. `strata`: each
    training example's class; the training subset then keeps every class it has room for (a random 72 of 77
    intents' examples would leave classes out, and the eval split's labels unseen)."""
    d = cfg.data
    if d.max_train_samples and len(splits.train) > d.max_train_samples:
        splits.train = splits.train.select(subset_indices(len(splits.train), d.max_train_samples, d.split_seed,
                                                          strata))
    if d.max_eval_samples and len(splits.eval) > d.max_eval_samples:
        splits.eval = splits.eval.shuffle(seed=d.split_seed).select(range(d.max_eval_samples))


def label_order(labels: Iterable[str], names: list[str] | None = None) -> list[str]:
    """The class order of a run (class i is the head's output i): data.label_names' order when given, else
    integer-like labels by value, then the others alphabetically."""
    present = set(labels)
    if names:
        return [n for n in names if n in present]
    return sorted(present, key=lambda x: (len(x), x) if x.isdigit() else (1 << 30, x))


def raise_small(source: str, n: int) -> NoReturn:
    from ..data.readers import DataError

    raise DataError(f"{source}: {n} example(s) cannot be split into train and eval; add examples or give data.eval")


def pad_batch(examples: list[dict], pad_id: int, keys: tuple[str, ...] = ("input_ids", "attention_mask", "labels"),
              label_pad: int = -100) -> dict:
    n = max(len(e["input_ids"]) for e in examples)
    out = {}
    for key in keys:
        if key not in examples[0] or not isinstance(examples[0][key], list):
            continue
        fill = {"input_ids": pad_id, "attention_mask": 0, "labels": label_pad}.get(key, 0)
        out[key] = torch.tensor([e[key] + [fill] * (n - len(e[key])) for e in examples], dtype=torch.long)
    return out


def sequence_label_collate(pad_id: int, key: str, dtype: torch.dtype) -> Callable[[list[dict]], dict]:
    """Batches of one token sequence each, padded, with one label tensor per example read from `key`
    (class ids, multi-hot rows, float targets): the collate every sequence-level text task shares."""
    def fn(examples: list[dict]) -> dict:
        batch = pad_batch(examples, pad_id, keys=("input_ids", "attention_mask"))
        batch["labels"] = torch.tensor([e[key] for e in examples], dtype=dtype)
        return batch

    return fn


def sequence_count(batch: dict) -> tuple[int, torch.Tensor]:
    """(samples, real tokens) of a padded batch; the token count stays a tensor, read at log time."""
    return batch["input_ids"].shape[0], batch["attention_mask"].sum()


def truncation_warning(report: DataReport, split: str, n_truncated: int, n: int, max_length: int) -> None:
    report.stats[f"{split}_truncated"] = n_truncated
    if n_truncated:
        report.warn(f"{split}: {n_truncated} of {n} examples ({n_truncated / n:.1%}) are longer than "
                    f"model.max_length={max_length} and were truncated")


# a head holds this many tokens more than it must, so that the last word it cuts lies past the kept tokens
HEAD_MARGIN = 8


def encode_texts(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int, report: DataReport,
                 split: str) -> dict:
    """The tokenizer's encoding of (pairs of) texts cut to max_length, and the split's truncated count in the
    report. Only heads are tokenized (head_texts): a cut text holds more than max_length tokens, so it is counted
    as truncated; of the others only those that reach max_length can have been, and just those are tokenized
    again whole."""
    texts, cut = head_texts(tokenizer, texts, max_length + HEAD_MARGIN)
    if pairs is not None:
        pairs, pair_cut = head_texts(tokenizer, pairs, max_length + HEAD_MARGIN)
        cut = [a or b for a, b in zip(cut, pair_cut)]
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    at_max = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) >= max_length and not cut[i]]
    n_trunc = sum(cut)
    if at_max:
        full = tokenizer([texts[i] for i in at_max], [pairs[i] for i in at_max] if pairs else None)["input_ids"]
        n_trunc += sum(len(x) > max_length for x in full)
    truncation_warning(report, split, n_trunc, len(texts), max_length)
    return enc


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
        ids = tokenizer([cand[i] for i in todo], add_special_tokens=False, truncation=True,
                        max_length=n_tokens)["input_ids"]
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


# -- single-label classification (text and images) ------------------------------------------------------

def ranked_labels(labels: list[str], probs: np.ndarray) -> dict:
    """One prediction: the top label, its probability, and every label's probability, highest first."""
    order = np.argsort(-probs)
    return {"label": labels[int(order[0])], "score": float(probs[order[0]]),
            "probabilities": {labels[int(j)]: float(probs[j]) for j in order}}


def confusion_matrix(parts: dict[str, torch.Tensor], num_labels: int) -> list[list[int]]:
    """counts[true][predicted] over the evaluated examples (for the run report)."""
    pred, gold = parts["pred"].long().cpu().numpy(), parts["gold"].long().cpu().numpy()
    ok = (gold >= 0) & (gold < num_labels) & (pred >= 0) & (pred < num_labels)
    counts = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(counts, (gold[ok], pred[ok]), 1)
    return counts.tolist()


class Classification(Task):
    """What single-label classifiers share: evaluation outputs, metrics, the confusion matrix. `top_k`: the k of
    the top-k accuracies the task offers (its spec's metrics name them)."""

    top_k: tuple[int, ...] = ()

    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits = model(**batch).logits.float()
        gold = batch["labels"]
        parts = {"pred": logits.argmax(-1), "gold": gold,
                 "loss": torch.nn.functional.cross_entropy(logits, gold, reduction="none")}
        if self.top_k:  # rank of the gold class among the logits (0 = predicted): top-k accuracy for any k
            parts["gold_rank"] = (logits > logits.gather(1, gold.clamp(min=0)[:, None])).sum(1)
        return parts

    def compute_metrics(self, parts: dict[str, torch.Tensor], wanted: Iterable[str],
                        num_labels: int) -> dict[str, float]:
        pred, gold = parts["pred"].cpu().numpy(), parts["gold"].cpu().numpy()
        all_metrics = {
            "accuracy": lambda: accuracy(pred, gold),
            "macro_f1": lambda: macro_f1(pred, gold, num_labels),
            "loss": lambda: float(parts["loss"].float().mean()),
        }
        for k in self.top_k:
            all_metrics[f"top{k}_accuracy"] = (lambda k=k: float((parts["gold_rank"] < k).float().mean()))
        return {m: all_metrics[m]() for m in wanted}

    def confusion_matrix(self, parts: dict[str, torch.Tensor], num_labels: int) -> list[list[int]]:
        return confusion_matrix(parts, num_labels)
