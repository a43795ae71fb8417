"""Single-label text classification: the label set comes from the training data."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ..data.readers import DataError
from ..data.validate import (check_unseen_labels, imbalance_warning, label_values, require_columns, require_nonempty,
                             text_warnings)
from . import TASKS
from .base import Batch, Example, LoadedModel
from .common import (HEAD_MARGIN, Classification, Splits, encode_texts, head_texts, label_order, ranked_labels,
                     read_splits, sequence_count, sequence_label_collate)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import RunConfig
    from ..models.sources import ModelSource


def _columns(cfg: RunConfig) -> dict[str, str]:
    d = cfg.data
    cols = {d.text_column: "data.text_column", d.label_column: "data.label_column"}
    if d.text_pair_column:
        cols[d.text_pair_column] = "data.text_pair_column"
    return cols


def _labels(ds, column: str, source: str = "data") -> list[str]:
    return label_values(ds[column], source, column)


def _texts(ds, column: str) -> list[str]:
    return ["" if t is None else str(t) for t in ds[column]]  # a missing JSONL value is empty, not the text 'None'


class TextClassification(Classification):
    spec = TASKS["text-classification"]

    def load_data(self, cfg: RunConfig) -> Splits:
        d = cfg.data
        cols = _columns(cfg)
        text_cols = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])
        splits = read_splits(cfg, d.label_column, lambda ds, src: require_columns(ds, list(cols), src, cols), text_cols)
        train_labels = _labels(splits.train, d.label_column)
        for name in ("eval", "test"):
            ds = getattr(splits, name)
            if ds is not None:
                check_unseen_labels(train_labels, _labels(ds, d.label_column), splits.sources[name], d.label_column)
        labels = label_order(train_labels)
        if len(labels) < 2:
            raise DataError(f"{d.train}: column {d.label_column!r} has a single label {labels[0]!r}; "
                            "classification needs at least 2")
        splits.meta["labels"] = labels
        texts = _texts(splits.train, d.text_column)
        others = {"eval": _texts(splits.eval, d.text_column)}
        if splits.test is not None:
            others["test"] = _texts(splits.test, d.text_column)
        text_warnings(splits.report, "train", texts, others)
        imbalance_warning(splits.report, train_labels)
        return splits

    def check_eval_data(self, cfg: RunConfig, splits: Splits) -> None:
        cols = _columns(cfg)
        src = splits.sources["test"]
        require_columns(splits.test, list(cols), src, cols)
        require_nonempty(splits.test, "eval", src)
        check_unseen_labels(splits.meta["labels"], _labels(splits.test, cfg.data.label_column, src), src,
                            cfg.data.label_column)

    def load_model(self, cfg: RunConfig, source: ModelSource, splits: Splits, **load_kwargs) -> LoadedModel:
        from transformers import AutoModelForSequenceClassification

        from ..models import load_pretrained

        labels = splits.meta["labels"]
        # the pad the batches hold goes into the config where the model is built for them (models.use_batch_pad)
        model, new_modules = load_pretrained(
            AutoModelForSequenceClassification, source, cfg.model.trust_remote_code, cfg.model.revision,
            num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)},
            **load_kwargs,
        )
        # the head is whatever from_pretrained had to initialise (classifier / score), trained in full; a
        # classifier checkpoint's own head is not new (no fast-head default lr)
        head = sorted({m.split(".")[0] for m in new_modules}) \
            or [n for n in ("classifier", "score") if hasattr(model, n)]
        return LoadedModel(model, head, head_is_new=bool(new_modules))

    def featurize(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> dict[str, list[Example]]:
        d = cfg.data
        label_id = {lab: i for i, lab in enumerate(splits.meta["labels"])}
        out = {}
        for name, ds in splits.present():
            pairs = _texts(ds, d.text_pair_column) if d.text_pair_column else None
            enc = encode_texts(tokenizer, _texts(ds, d.text_column), pairs, cfg.model.max_length, splits.report, name)
            labels = [label_id.get(lab, -1) for lab in _labels(ds, d.label_column)]
            out[name] = [
                {"input_ids": ids, "attention_mask": am, "labels": y}
                for ids, am, y in zip(enc["input_ids"], enc["attention_mask"], labels)
            ]
        return out

    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[Example]], Batch]:
        return sequence_label_collate(tokenizer.pad_token_id, "labels", torch.long)

    def count(self, batch: Batch) -> tuple[int, torch.Tensor]:
        return sequence_count(batch)

    @torch.inference_mode()
    def predict(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], meta: dict,
                max_length: int = 256, batch_size: int = 32, **_) -> list[dict]:
        labels = meta["labels"]
        model.eval()
        device = next(model.parameters()).device
        results = []
        for i in range(0, len(texts), batch_size):
            heads, _ = head_texts(tokenizer, texts[i:i + batch_size], max_length + HEAD_MARGIN)
            enc = tokenizer(heads, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
            probs = model(**enc).logits.float().softmax(-1).cpu().numpy()
            results += [{"text": text, **ranked_labels(labels, p)} for text, p in zip(texts[i:i + batch_size], probs)]
        return results


TASK = TextClassification()
