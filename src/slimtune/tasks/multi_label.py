"""Multi-label text classification: each text has a set of labels (none, one or several), learned with one sigmoid
per label (binary cross-entropy: transformers' problem_type "multi_label_classification", float multi-hot labels).

Labels come as lists (JSONL / Parquet) in data.label_column, as one text cell split at data.label_separator, or as
one 0/1 column per label (data.label_columns). After training, each label's decision threshold is tuned on the eval
split's outputs of the best checkpoint (the threshold maximising that label's F1; 0.5 for a label without a positive
eval example) and kept in meta.json, where evaluate and predict read it back. Metrics come at 0.5 (micro_f1, ...)
and at the tuned thresholds (tuned_micro_f1, ...): on the eval split the tuned ones are optimistic (the thresholds
were fitted on those very examples; during training they are tuned afresh at each evaluation); on the test split
and on `slimtune eval` data they use the eval split's thresholds, an honest estimate.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch

from ..data.readers import DataError, read_source
from ..data.validate import (DataReport, empty_text_warning, imbalance_warning, require_columns, require_nonempty,
                             text_warnings)
from . import TASKS
from .base import Batch, Example, LoadedModel, Task
from .common import (HEAD_MARGIN, Splits, encode_texts, gather_splits, head_texts, label_order, limit_samples,
                     sequence_count, sequence_label_collate)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import RunConfig
    from ..models.sources import ModelSource

RECORD = "__record__"  # each row's 1-based record number in its file, kept through the eval carve-out and sampling
LABEL_SETS = "__label_sets__"  # each row's parsed labels, added as its file is read: the split, the stratified
# subset, the checks and featurize read them there instead of parsing every cell again
_TRUE, _FALSE = {"1", "1.0", "true"}, {"0", "0.0", "false"}
THRESHOLD_RULE = ("per label, the threshold maximising its F1 on the eval split's outputs of the best checkpoint "
                  "(midway between the lowest probability kept and the highest one left out); 0.5 for a label "
                  "without a positive eval example. Eval metrics at these thresholds are optimistic (fitted on the "
                  "same examples); test metrics at them are not")


# -- reading label sets ---------------------------------------------------------------------------------------

def _columns(cfg: RunConfig) -> dict[str, str]:
    """The columns a data file needs, with the key that names each."""
    d = cfg.data
    cols = {d.text_column: "data.text_column"}
    if d.text_pair_column:
        cols[d.text_pair_column] = "data.text_pair_column"
    if d.label_columns:
        cols.update({c: "data.label_columns" for c in d.label_columns})
    else:
        cols[d.label_column] = "data.label_column"
    return cols


def _texts(ds, column: str) -> list[str]:
    return ["" if t is None else str(t) for t in ds[column]]  # a missing JSONL value is empty, not the text 'None'


def _records(ds) -> list[int]:
    return ds[RECORD] if RECORD in ds.column_names else list(range(1, len(ds) + 1))


def _flag(value: Any) -> bool | None:
    """A 0/1 cell as a bool (also true / false, 1.0 / 0.0); None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


def _cell_labels(value: Any, separator: str | None) -> list[str]:
    """One label cell as its labels, in order, without repeats; DataError (without the place) when it is not."""
    if isinstance(value, (list, tuple)):
        items = list(value)
        if any(x is None or isinstance(x, (list, dict)) or not str(x).strip() for x in items):
            raise DataError(f"the list {value!r} holds an empty or non-text label; give labels as strings")
    elif value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError("the labels are missing; give [] (or, with data.label_separator, an empty text) for a row "
                        "with no labels")
    elif isinstance(value, str) and separator is not None:
        items = [x for x in value.split(separator) if x.strip()]
    elif isinstance(value, str):
        raise DataError(f"the labels are a text, {value!r}, and data.label_separator is not set; set it (e.g. "
                        "data.label_separator: ',') or give each row's labels as a list")
    else:
        raise DataError(f"{value!r} is not a list of labels; give a list of strings, a text split at "
                        "data.label_separator, or one 0/1 column per label (data.label_columns)")
    return list(dict.fromkeys(str(x).strip() for x in items))


def label_sets(ds, cfg: RunConfig, source: str) -> list[list[str]]:
    """Each row's labels; every cell is checked, an error names the file, column, record and value (or the
    LABEL_SETS column, once they were)."""
    if LABEL_SETS in ds.column_names:
        return ds[LABEL_SETS]
    d = cfg.data
    records = _records(ds)
    if d.label_columns:
        sets: list[list[str]] = [[] for _ in records]
        for col in d.label_columns:
            for i, value in enumerate(ds[col]):
                flag = _flag(value)
                if flag is None:
                    raise DataError(f"{source}: column {col!r} (data.label_columns), record {records[i]}: value "
                                    f"{value!r} is not 0 or 1; a label column holds 1 (the row has the label) or 0 "
                                    "(true / false work too)")
                if flag:
                    sets[i].append(col)
        return sets
    out = []
    for rec, value in zip(records, ds[d.label_column]):
        try:
            out.append(_cell_labels(value, d.label_separator))
        except DataError as e:
            raise DataError(f"{source}: column {d.label_column!r}, record {rec}: {e}") from None
    return out


def _check_known(known: Iterable[str], sets: list[list[str]], ds, source: str, cfg: RunConfig) -> None:
    """Labels that no training example has: the model never learned them (DataError naming the first)."""
    known = set(known)
    bad = [(rec, x) for rec, labels in zip(_records(ds), sets) for x in labels if x not in known]
    if bad:
        rec, label = bad[0]
        col = f"column {label!r} (data.label_columns)" if cfg.data.label_columns else \
            f"column {cfg.data.label_column!r}"
        raise DataError(f"{source}: {col}, record {rec}: label {label!r} has no example in the training data "
                        f"({len(bad)} such label(s) in this split), so the model cannot predict it; labels it "
                        f"learned: {', '.join(repr(x) for x in sorted(known)[:20])}. Move examples into the training "
                        "data or drop the label (an eval split carved from train: give data.eval)")


def _rarest(sets: list[list[str]]) -> list[str]:
    """Each row's rarest label (ties by name; '' for none): the stratum of the eval carve-out, so every label
    held by two or more rows keeps training examples."""
    counts = Counter(x for s in sets for x in s)
    return [min(s, key=lambda x: (counts[x], x)) if s else "" for s in sets]


def _set_stats(report: DataReport, split: str, sets: list[list[str]]) -> None:
    report.stats.setdefault("label_sets", {})[split] = {  # empty label sets are allowed, and counted
        "examples": len(sets), "empty": sum(not s for s in sets), "labels_per_example": sum(map(len, sets)) / len(sets)}


def _multi_hot(sets: list[list[str]], labels: list[str]) -> list[list[float]]:
    return [[1.0 if x in s else 0.0 for x in labels] for s in map(set, sets)]


# -- metrics and thresholds (numpy; pred / gold are boolean (examples, labels) arrays) ----------------------------

def set_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """micro / macro / samples F1 and subset accuracy. A label absent from both gold and predictions is left out of
    the macro average, as an example with both sets empty counts F1 1 in the samples average; with nothing to
    score at all, micro and macro F1 are 1."""
    tp, fp, fn = (pred & gold).sum(0), (pred & ~gold).sum(0), (~pred & gold).sum(0)
    denom = 2 * tp.sum() + fp.sum() + fn.sum()
    per = 2 * tp + fp + fn
    sizes = pred.sum(1) + gold.sum(1)
    inter = (pred & gold).sum(1)
    return {
        "micro_f1": float(2 * tp.sum() / denom) if denom else 1.0,
        "macro_f1": float(np.mean(2 * tp[per > 0] / per[per > 0])) if (per > 0).any() else 1.0,
        "samples_f1": float(np.mean(np.where(sizes > 0, 2 * inter / np.maximum(sizes, 1), 1.0))),
        "subset_accuracy": float((pred == gold).all(1).mean()),
    }


def best_threshold(probs: np.ndarray, gold: np.ndarray) -> float:
    """The threshold (predict positive at probability >= it) maximising one label's F1, midway between the lowest
    probability kept and the highest one left out; the highest such threshold among equal F1s. 0.5 without a
    positive example."""
    n_pos = int(gold.sum())
    if n_pos == 0:
        return 0.5
    order = np.argsort(-probs, kind="stable")
    p, y = probs[order].astype(np.float64), gold[order]
    f1 = 2 * np.cumsum(y) / (np.arange(1, len(p) + 1) + n_pos)  # the top k kept: 2tp / (2tp + fp + fn)
    f1[:-1][p[:-1] <= p[1:]] = -1.0  # no threshold falls between two equal probabilities
    k = int(np.argmax(f1))
    return float((p[k] + (p[k + 1] if k + 1 < len(p) else 0.0)) / 2)


def tune_thresholds(probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    return np.array([best_threshold(probs[:, j], gold[:, j]) for j in range(probs.shape[1])])


def _arrays(parts: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """probabilities, gold, the thresholds and whether they were given (the model's fitted ones) or tuned here."""
    probs, gold = parts["probs"].float().cpu().numpy(), parts["gold"].cpu().numpy() > 0.5
    if "thresholds" in parts and len(parts["thresholds"]):
        return probs, gold, parts["thresholds"][0].float().cpu().numpy(), True
    return probs, gold, tune_thresholds(probs, gold), False


def _per_label(pred: np.ndarray, gold: np.ndarray) -> list[tuple]:
    """(precision, recall, F1) per label; None where undefined (nothing predicted / no support / neither)."""
    out = []
    for tp, fp, fn in zip((pred & gold).sum(0), (pred & ~gold).sum(0), (~pred & gold).sum(0)):
        out.append((tp / (tp + fp) if tp + fp else None, tp / (tp + fn) if tp + fn else None,
                    2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None))
    return out


def _meta_thresholds(meta: dict) -> list[float]:
    fitted = meta.get("thresholds") or {}
    return [float(fitted.get(x, 0.5)) for x in meta["labels"]]


def prior_bias(model: torch.nn.Module, head: list[str], labels: list[str], counts: dict[str, int], n: int) -> bool:
    """Start a new head's output bias at each label's log prior odds in training (smoothed: (count + 0.5) / (n + 1)),
    so every probability starts at its label's frequency instead of 0.5. Each sigmoid otherwise spends its first
    hundreds of steps (Adam moves a bias about lr per step) pulling all logits down to the negatives' side before
    any label is told apart (Lin et al. 2017, "prior probability" init). On Banking77 intent sets, 12 intents,
    head at 10x: test micro-F1 0.05 -> 0.76 (benchmarks/RESULTS.md, "The multi-label head's defaults"). False
    where the head's output layer has no bias (a decoder's `score`)."""
    out = [m for name in head for m in getattr(model, name).modules()
           if isinstance(m, torch.nn.Linear) and m.out_features == len(labels)]
    if not out or out[-1].bias is None:
        return False
    p = torch.tensor([(counts.get(x, 0) + 0.5) / (n + 1) for x in labels], dtype=torch.float64)
    with torch.no_grad():
        out[-1].bias.copy_((p / (1 - p)).log().to(out[-1].bias.dtype))
    return True


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


class MultiLabelClassification(Task):
    spec = TASKS["multi-label-classification"]

    # -- data ------------------------------------------------------------------------------------------------
    def load_data(self, cfg: RunConfig) -> Splits:
        d = cfg.data
        cols, report = _columns(cfg), DataReport()
        text_cols = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])

        def read(source: str, split: str):
            ds = read_source(source)
            require_columns(ds, list(cols), source, cols)
            require_nonempty(ds, split, source)
            ds = ds.add_column(RECORD, list(range(1, len(ds) + 1)))
            ds = ds.add_column(LABEL_SETS, label_sets(ds, cfg, source))  # every cell checked as the file has it
            for col in text_cols:
                empty_text_warning(report, ds[col], source, col)
            return ds

        # strata of one row stay in train (split_indices), so no label is too rare to split: no minimum class size
        carving = cfg.model_copy(update={"data": d.model_copy(update={"min_class_examples": 1})})
        splits = gather_splits(carving, read, report, lambda train: (_rarest(label_sets(train, cfg, d.train)), d.train))
        limit_samples(cfg, splits, _rarest(label_sets(splits.train, cfg, d.train)) if d.max_train_samples else None)
        self._labels_and_checks(cfg, splits)
        return splits

    def _labels_and_checks(self, cfg: RunConfig, splits: Splits) -> None:
        d, report = cfg.data, splits.report
        sets = {name: label_sets(ds, cfg, splits.sources[name]) for name, ds in splits.present()}
        counts = Counter(x for s in sets["train"] for x in s)
        if not counts:
            raise DataError(f"{d.train}: no training example has a label; a multi-label classifier needs examples "
                            "of each label it predicts")
        labels = list(d.label_columns) if d.label_columns else label_order(counts)
        for name in ("eval", "test"):
            if name in sets:
                _check_known(counts, sets[name], getattr(splits, name), splits.sources[name], cfg)
        never = [x for x in labels if not counts[x]]
        if never:
            report.warn(f"{d.train}: {len(never)} label column(s) are 0 in every training example: "
                        f"{', '.join(repr(x) for x in never[:10])}; the model learns never to predict them")
        for name, s in sets.items():
            _set_stats(report, name, s)
        report.stats["label_counts"] = {x: counts[x] for x in labels}
        if len(counts) > 1:
            imbalance_warning(report, [x for s in sets["train"] for x in s])
        texts = {name: _texts(ds, d.text_column) for name, ds in splits.present()}
        text_warnings(report, "train", texts.pop("train"), texts)
        splits.meta.update(labels=labels, label_counts={x: counts[x] for x in labels})

    def check_eval_data(self, cfg: RunConfig, splits: Splits) -> None:
        cols, src = _columns(cfg), splits.sources["test"]
        require_columns(splits.test, list(cols), src, cols)
        require_nonempty(splits.test, "eval", src)
        counts = splits.meta.get("label_counts") or dict.fromkeys(splits.meta["labels"], 1)
        _check_known([x for x, n in counts.items() if n], label_sets(splits.test, cfg, src), splits.test, src, cfg)

    # -- model and inputs ------------------------------------------------------------------------------------
    def load_model(self, cfg: RunConfig, source: ModelSource, splits: Splits, **load_kwargs) -> LoadedModel:
        from transformers import AutoModelForSequenceClassification

        from ..models import load_pretrained

        labels = splits.meta["labels"]
        model, new_modules = load_pretrained(
            AutoModelForSequenceClassification, source, cfg.model.trust_remote_code, cfg.model.revision,
            num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)},
            problem_type="multi_label_classification", **load_kwargs,
        )
        if splits.meta.get("thresholds"):  # a finished run: its fitted thresholds (evaluate, merge)
            model.config.label_thresholds = _meta_thresholds(splits.meta)
        head = sorted({m.split(".")[0] for m in new_modules}) \
            or [n for n in ("classifier", "score") if hasattr(model, n)]
        if new_modules and splits.meta.get("label_counts") and splits.train is not None:
            prior_bias(model, head, labels, splits.meta["label_counts"], len(splits.train))
        return LoadedModel(model, head, head_is_new=bool(new_modules))

    def featurize(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> dict[str, list[Example]]:
        d, labels = cfg.data, splits.meta["labels"]
        out = {}
        for name, ds in splits.present():
            pairs = _texts(ds, d.text_pair_column) if d.text_pair_column else None
            enc = encode_texts(tokenizer, _texts(ds, d.text_column), pairs, cfg.model.max_length, splits.report,
                               name)
            hot = _multi_hot(label_sets(ds, cfg, splits.sources.get(name, name)), labels)
            out[name] = [{"input_ids": ids, "attention_mask": am, "labels": y}
                         for ids, am, y in zip(enc["input_ids"], enc["attention_mask"], hot)]
        return out

    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[Example]], Batch]:
        return sequence_label_collate(tokenizer.pad_token_id, "labels", torch.float32)

    def count(self, batch: Batch) -> tuple[int, torch.Tensor]:
        return sequence_count(batch)

    # -- evaluation ------------------------------------------------------------------------------------------
    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits = model(**batch).logits.float()
        gold = batch["labels"].float()
        parts = {"probs": logits.sigmoid(), "gold": gold,
                 "loss": torch.nn.functional.binary_cross_entropy_with_logits(logits, gold, reduction="none").mean(1)}
        fitted = getattr(getattr(model, "config", None), "label_thresholds", None)
        if fitted is not None:  # after training: the test split at the eval split's thresholds
            parts["thresholds"] = torch.tensor(fitted, device=logits.device).expand_as(logits)
        return parts

    def compute_metrics(self, parts: dict[str, torch.Tensor], wanted: Iterable[str],
                        num_labels: int) -> dict[str, float]:
        probs, gold, thresholds, _ = _arrays(parts)
        metrics = {**set_metrics(probs >= 0.5, gold), "loss": float(parts["loss"].float().mean())}
        metrics.update({f"tuned_{k}": v for k, v in set_metrics(probs >= thresholds, gold).items()})
        return {m: metrics[m] for m in wanted}

    def eval_figures(self, parts: dict[str, torch.Tensor], meta: dict) -> list[dict] | None:
        labels = meta.get("labels") or []
        probs, gold, thresholds, fitted = _arrays(parts)
        if probs.shape[1] != len(labels):
            return None
        half, tuned = probs >= 0.5, probs >= thresholds
        rows = [[x, int(n), *map(_r, a), _r(t), *map(_r, b)]
                for x, n, a, t, b in zip(labels, gold.sum(0), _per_label(half, gold), thresholds,
                                         _per_label(tuned, gold))]
        where = "the eval split's thresholds" if fitted else "thresholds tuned on these examples (optimistic)"
        per_label = {"kind": "table", "title": f"Per label: at 0.5 and at {where}",
                     "columns": ["label", "support", "precision@0.5", "recall@0.5", "f1@0.5", "threshold",
                                 "precision@tuned", "recall@tuned", "f1@tuned"], "rows": rows}
        sets = {"kind": "table", "title": "Label sets", "columns": ["", "gold", "predicted@0.5", "predicted@tuned"],
                "rows": [["examples with no label", *(int((~m.any(1)).sum()) for m in (gold, half, tuned))],
                         ["labels per example", *(round(float(m.sum(1).mean()), 3) for m in (gold, half, tuned))]]}
        return [per_label, sets]

    def fit_after_training(self, model: torch.nn.Module, eval_parts: Callable[[], dict[str, torch.Tensor]],
                           meta: dict) -> dict:
        parts = eval_parts()
        probs, gold = parts["probs"].float().cpu().numpy(), parts["gold"].cpu().numpy() > 0.5
        thresholds = [float(t) for t in tune_thresholds(probs, gold)]
        model.config.label_thresholds = thresholds  # the test split is scored at them
        return {"thresholds": dict(zip(meta["labels"], thresholds)), "threshold_rule": THRESHOLD_RULE}

    @torch.inference_mode()
    def predict(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], meta: dict,
                max_length: int = 256, batch_size: int = 32, **_) -> list[dict]:
        labels, thresholds = meta["labels"], np.array(_meta_thresholds(meta))
        model.eval()
        device = next(model.parameters()).device
        results = []
        for i in range(0, len(texts), batch_size):
            heads, _ = head_texts(tokenizer, texts[i:i + batch_size], max_length + HEAD_MARGIN)
            enc = tokenizer(heads, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
            for text, p in zip(texts[i:i + batch_size], model(**enc).logits.float().sigmoid().cpu().numpy()):
                order = np.argsort(-p, kind="stable")
                chosen = [labels[j] for j in order if p[j] >= thresholds[j]]
                # label / score: the CLI's table (the labels kept, the top probability)
                results.append({"text": text, "labels": chosen, "label": ", ".join(chosen), "score": float(p[order[0]]),
                                "probabilities": {labels[j]: float(p[j]) for j in order}})
        return results


TASK = MultiLabelClassification()
