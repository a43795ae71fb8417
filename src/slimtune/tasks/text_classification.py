"""Single-label text classification: the label set comes from the training data."""
from __future__ import annotations

import numpy as np
import torch

from ..data.validate import check_unseen_labels, imbalance_warning, label_values, require_columns, text_warnings
from .common import HEAD_MARGIN, Splits, accuracy, head_texts, macro_f1, pad_batch, read_splits, truncation_warning

METRICS = ("accuracy", "macro_f1", "loss")
DEFAULT_METRICS = ("accuracy", "macro_f1", "loss")
PEFT_TASK_TYPE = "SEQ_CLS"
THROUGHPUT_UNIT = "samples"
# the new head trains at api.default_head_lr (10x train.lr) unless train.head_lr is set: measured on
# SST-2 (neutral), Banking77 (+21 points) and the quickstart (no more collapse over seeds); the pooled
# text features are small (MiniLM's pooler output ~0.05), so a head step at the adapters' rate barely
# moves the logits
FAST_NEW_HEAD = True


def _columns(cfg):
    d = cfg.data
    cols = {d.text_column: "data.text_column", d.label_column: "data.label_column"}
    if d.text_pair_column:
        cols[d.text_pair_column] = "data.text_pair_column"
    return cols


def _labels(ds, column, source="data"):
    return label_values(ds[column], source, column)


def _texts(ds, column) -> list[str]:
    return ["" if t is None else str(t) for t in ds[column]]  # a missing JSONL value is empty, not the text 'None'


def load_data(cfg) -> Splits:
    d = cfg.data
    cols = _columns(cfg)
    text_cols = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])
    splits = read_splits(cfg, d.label_column, lambda ds, src: require_columns(ds, list(cols), src, cols), text_cols)
    train_labels = _labels(splits.train, d.label_column)
    for name in ("eval", "test"):
        ds = getattr(splits, name)
        if ds is not None:
            check_unseen_labels(train_labels, _labels(ds, d.label_column), splits.sources[name], d.label_column)
    labels = sorted(set(train_labels), key=lambda x: (len(x), x) if x.isdigit() else (1 << 30, x))
    if len(labels) < 2:
        from ..data.readers import DataError

        raise DataError(f"{d.train}: column {d.label_column!r} has a single label {labels[0]!r}; classification needs at least 2")
    splits.meta["labels"] = labels
    texts = _texts(splits.train, d.text_column)
    others = {"eval": _texts(splits.eval, d.text_column)}
    if splits.test is not None:
        others["test"] = _texts(splits.test, d.text_column)
    text_warnings(splits.report, "train", texts, others)
    imbalance_warning(splits.report, train_labels)
    return splits


def check_eval_data(cfg, splits: Splits) -> None:
    """Checks for a data file evaluated against a finished run (`slimtune eval`)."""
    from ..data.validate import require_nonempty

    cols = _columns(cfg)
    src = splits.sources["test"]
    require_columns(splits.test, list(cols), src, cols)
    require_nonempty(splits.test, "eval", src)
    check_unseen_labels(splits.meta["labels"], _labels(splits.test, cfg.data.label_column, src), src, cfg.data.label_column)


def load_processor(cfg, source):
    """The tokenizer; model.max_length is checked against the model's position limit here, before any data
    is tokenized or a run folder written (a longer input fails inside the model's forward, mid-run)."""
    from ..models import load_tokenizer
    from ..models.checks import check_source_max_length

    tok = load_tokenizer(source, cfg.model.trust_remote_code, cfg.model.revision)
    check_source_max_length(cfg, source, tok)
    return tok


def load_model(cfg, source, splits, **load_kwargs):
    from transformers import AutoModelForSequenceClassification

    from ..models import load_pretrained

    labels = splits.meta["labels"]
    model, new_modules = load_pretrained(
        AutoModelForSequenceClassification, source, cfg.model.trust_remote_code, cfg.model.revision,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
        **load_kwargs,
    )
    # the head is whatever from_pretrained had to initialise (classifier / score), trained in full
    head = sorted({m.split(".")[0] for m in new_modules}) or [n for n in ("classifier", "score") if hasattr(model, n)]
    model._slimtune_head_is_new = bool(new_modules)  # a classifier checkpoint's own head: no fast-head default
    return model, head


def featurize(cfg, tokenizer, splits: Splits):
    d = cfg.data
    label_id = {l: i for i, l in enumerate(splits.meta["labels"])}
    out = {}
    for name, ds in splits.present():
        L = cfg.model.max_length
        # only heads are tokenized: a cut text holds more than max_length tokens, so it is truncated
        texts, cut = head_texts(tokenizer, _texts(ds, d.text_column), L + HEAD_MARGIN)
        pairs = None
        if d.text_pair_column:
            pairs, pair_cut = head_texts(tokenizer, _texts(ds, d.text_pair_column), L + HEAD_MARGIN)
            cut = [a or b for a, b in zip(cut, pair_cut)]
        enc = tokenizer(texts, pairs, truncation=True, max_length=L)
        # of the others, only examples that hit max_length can have been truncated: re-tokenize just those
        at_max = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) >= L and not cut[i]]
        n_trunc = sum(cut)
        if at_max:
            full = tokenizer([texts[i] for i in at_max], [pairs[i] for i in at_max] if pairs else None)["input_ids"]
            n_trunc += sum(len(x) > L for x in full)
        truncation_warning(splits.report, name, n_trunc, len(texts), L)
        labels = [label_id.get(l, -1) for l in _labels(ds, d.label_column)]
        out[name] = [
            {"input_ids": ids, "attention_mask": am, "labels": y}
            for ids, am, y in zip(enc["input_ids"], enc["attention_mask"], labels)
        ]
    return out


def collate(tokenizer):
    pad_id = tokenizer.pad_token_id

    def fn(examples):
        batch = pad_batch(examples, pad_id, keys=("input_ids", "attention_mask"))
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        return batch

    return fn


def count(batch) -> tuple[int, int]:
    return batch["input_ids"].shape[0], batch["attention_mask"].sum()  # a tensor: read at log time


def eval_step(model, batch) -> dict:
    out = model(**batch)
    logits = out.logits.float()
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    return {"pred": logits.argmax(-1), "gold": batch["labels"], "loss": loss}


def compute_metrics(parts: dict, wanted, num_labels: int) -> dict:
    pred, gold = parts["pred"].cpu().numpy(), parts["gold"].cpu().numpy()
    all_metrics = {
        "accuracy": lambda: accuracy(pred, gold),
        "macro_f1": lambda: macro_f1(pred, gold, num_labels),
        "loss": lambda: float(parts["loss"].float().mean()),
    }
    return {m: all_metrics[m]() for m in wanted}


def confusion_matrix(parts: dict, num_labels: int) -> list[list[int]]:
    """counts[true][predicted] over the evaluated examples (for the run report)."""
    pred, gold = parts["pred"].long().cpu().numpy(), parts["gold"].long().cpu().numpy()
    ok = (gold >= 0) & (gold < num_labels) & (pred >= 0) & (pred < num_labels)
    counts = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(counts, (gold[ok], pred[ok]), 1)
    return counts.tolist()


@torch.inference_mode()
def predict(model, tokenizer, texts: list[str], meta: dict, max_length: int = 256, batch_size: int = 32, **_):
    labels = meta["labels"]
    model.eval()
    device = next(model.parameters()).device
    results = []
    for i in range(0, len(texts), batch_size):
        heads, _ = head_texts(tokenizer, texts[i:i + batch_size], max_length + HEAD_MARGIN)
        enc = tokenizer(heads, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
        probs = model(**enc).logits.float().softmax(-1).cpu().numpy()
        for text, p in zip(texts[i:i + batch_size], probs):
            order = np.argsort(-p)
            results.append({
                "text": text,
                "label": labels[int(order[0])],
                "score": float(p[order[0]]),
                "probabilities": {labels[int(j)]: float(p[j]) for j in order},
            })
    return results
