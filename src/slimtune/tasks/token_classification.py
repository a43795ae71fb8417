"""Token classification (named entities, chunks, ...): one tag per word, BIO / BIOES tags.

Data: CoNLL-style files or tables with a list of words and a list of tags per record (data/conll.py). Words are
tokenized as pre-split words and aligned with the fast tokenizer's word_ids(): the first sub-token of each word
carries its tag, the other sub-tokens and the special tokens are not scored (-100). The label list is the
training tags, "O" first, then sorted. Metrics: entity-level precision / recall / F1 (micro, seqeval's default
mode, which reads tags as conlleval does), word accuracy, loss; the run report gets the scores per entity type.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from ..data.conll import (CONLL_SUFFIXES, check_scheme, detect_scheme, empty_sentences, entity_scores, entity_spans,
                          from_table, iob1_to_bio, locator, orphan_tags, split_tag, tag_order)
from ..data.readers import DataError, read_conll, read_source
from ..data.validate import DataReport, require_nonempty, text_warnings
from ..errors import ModelError
from . import TASKS
from .base import Batch, Example, LoadedModel, LossHooks, Task
from .common import Splits, confusion_matrix, gather_splits, limit_samples, pad_batch

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from ..config import RunConfig
    from ..models.sources import ModelSource

# predict's words: runs of word characters (keeping inner - ' . &, as in "U.S", "O'Neil", "AT&T") and single
# punctuation marks, the way CoNLL corpora split text
_WORD = re.compile(r"\w+(?:[-'’.&]\w+)*|[^\w\s]")
_PREFIX_CODE = {"O": 0, "B": 1, "I": 2, "E": 3, "S": 4}


# -- data ------------------------------------------------------------------------------------------------------

def _read(cfg: RunConfig, source: str) -> Dataset:
    """A data source in the common shape (data/conll.py); IOB1 tags come back as BIO."""
    d = cfg.data
    path = Path(source).expanduser()
    conll = not source.startswith(("hf:", "builtin:")) and not path.is_dir() and (
        d.conll or path.suffix.lower() in CONLL_SUFFIXES)
    if conll:
        ds = read_conll(source, d.conll_token_column, d.conll_tag_column)
    elif path.suffix.lower() == ".txt":  # read_source would give one text per paragraph, no tags
        raise DataError(f"{source}: a .txt file holds no word / tag lists; if it is CoNLL columns (one word per "
                        "line, a blank line between sentences) set data.conll: true, or name it .conll")
    else:
        ds = from_table(read_source(source), source, d.tokens_column, d.tags_column, d.label_names)
    return iob1_to_bio(ds) if d.tag_scheme == "IOB1" else ds


def _sentences(ds: Dataset, split: str, source: str, report: DataReport) -> Dataset:
    """The records that hold words; records of none (a table can hold them) are dropped with a warning."""
    require_nonempty(ds, split, source)
    ds, empty = empty_sentences(ds)
    if empty:
        report.warn(f"{source}: {empty} record(s) have no words and were left out")
    require_nonempty(ds, split, source)
    return ds


def _check_unseen(known: set[str], ds: Dataset, source: str, train: str) -> None:
    where = locator(ds, source)
    unseen: dict[str, str] = {}
    for row, tags in enumerate(ds["tags"]):
        for i, tag in enumerate(tags):
            if tag not in known and tag not in unseen:
                unseen[tag] = where(row, i)
    if unseen:
        first = next(iter(unseen))
        raise DataError(f"{source}: tag(s) {', '.join(repr(t) for t in list(unseen)[:10])} never occur in the "
                        f"training data ({train}; first at {unseen[first].removeprefix(source + ': ')}); the model "
                        f"can only predict: {', '.join(repr(t) for t in tag_order(known)[:30])}")


def _orphan_warning(report: DataReport, ds: Dataset, source: str, scheme: str) -> None:
    count, first = orphan_tags(ds, source, scheme)
    if count:
        report.stats.setdefault("orphan_inside_tags", {})[source] = count
        report.warn(f"{source}: {count} I- tag(s) follow no entity of their type (first: "
                    f"{first.removeprefix(source + ': ')}); each is read as the start of an entity (conlleval). "
                    "If the file is IOB1 (CoNLL-2003's original files), set data.tag_scheme: IOB1")


def _entity_counts(ds: Dataset) -> dict[str, int]:
    return dict(sorted(Counter(kind for tags in ds["tags"] for kind, _, _ in entity_spans(tags)).items()))


# -- metrics ---------------------------------------------------------------------------------------------------

def _tag_codes(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label's prefix (O B I E S -> 0..4) and entity type index, from the model's id2label: the metrics see
    only tensors, and these rebuild tags that group into the same entities."""
    id2label = model.config.id2label
    names = [str(id2label[i]) for i in range(len(id2label))]
    parts = [split_tag(n) or ("O", "") for n in names]
    types = sorted({t for _, t in parts if t})
    prefix = torch.tensor([[_PREFIX_CODE.get(p, 0) for p, _ in parts]])
    kind = torch.tensor([[types.index(t) if t else -1 for _, t in parts]])
    return prefix, kind


def _sequences(parts: dict[str, torch.Tensor], names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """(gold, predicted) tags per sentence: the scored words of each, in order."""
    gold, pred = parts["gold"].long().tolist(), parts["pred"].long().tolist()
    out_gold, out_pred, at = [], [], 0
    for n in parts["words"].long().tolist():
        out_gold.append([names[g] for g in gold[at:at + n]])
        out_pred.append([names[p] for p in pred[at:at + n]])
        at += n
    return out_gold, out_pred


def _coded_names(parts: dict[str, torch.Tensor]) -> list[str]:
    prefix, kind = parts["tag_prefix"][0].long().tolist(), parts["tag_type"][0].long().tolist()
    letters = "OBIES"
    return ["O" if p == 0 else f"{letters[p]}-T{k}" for p, k in zip(prefix, kind)]


# -- prediction ------------------------------------------------------------------------------------------------

def _words(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _WORD.finditer(text)]


def _prediction(text: str, spans: list[tuple[int, int]], tags: list[str], scores: list[float]) -> dict:
    entities = []
    for kind, a, b in entity_spans(tags):
        start, end = spans[a][0], spans[b][1]
        entities.append({"type": kind, "text": text[start:end], "start": start, "end": end,
                         "score": sum(scores[a:b + 1]) / (b - a + 1)})
    return {"text": text, "entities": entities, "words": [text[a:b] for a, b in spans], "tags": tags,
            "spans": [list(s) for s in spans]}


def _logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of the batch's own positions (prompt-learning methods prepend virtual tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, logits.shape[1] - batch["input_ids"].shape[1]:]


def token_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the scored positions, computed from the logits of the input positions: a model
    given labels under prompt tuning compares them with its longer logits (virtual tokens first) and fails."""
    labels = batch["labels"]
    logits = _logits(model, batch).float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction="sum")
    return loss / (labels != -100).sum().clamp(min=1)


class TokenClassification(Task):
    spec = TASKS["token-classification"]

    def load_data(self, cfg: RunConfig) -> Splits:
        d = cfg.data
        report = DataReport()
        train: dict = {}  # the scheme and the tag set, fixed by the training file (gather_splits reads it first)

        def read(source: str, split: str) -> Dataset:
            ds = _sentences(_read(cfg, source), split, source, report)
            if split == "train":
                tags = [t for row in ds["tags"] for t in row]
                auto = d.tag_scheme == "auto"
                train.update(scheme=detect_scheme(tags) if auto else d.tag_scheme, tags=set(tags),
                             how=f"detected from {source}" if auto else "data.tag_scheme")
            check_scheme(ds, source, train["scheme"], train["how"])
            if split != "train":
                _check_unseen(train["tags"], ds, source, d.train)
            _orphan_warning(report, ds, source, train["scheme"])
            return ds

        splits = gather_splits(cfg, read, report)
        limit_samples(cfg, splits)
        labels = tag_order(train["tags"])
        if len(labels) < 2:
            raise DataError(f"{d.train}: every word is tagged {labels[0]!r}; token classification needs at least "
                            "2 tags (entities tagged B-<type> / I-<type>, the rest 'O')")
        splits.meta.update(labels=labels, tag_scheme="BIO" if train["scheme"] == "IOB1" else train["scheme"])
        report.stats["tag_scheme"] = train["scheme"]
        report.stats["train_entities"] = _entity_counts(splits.train)
        text_warnings(report, "train", [" ".join(t) for t in splits.train["tokens"]],
                      {"eval": [" ".join(t) for t in splits.eval["tokens"]]})
        return splits

    def read_eval(self, cfg: RunConfig, source: str) -> Dataset:
        return _read(cfg, source)

    def check_eval_data(self, cfg: RunConfig, splits: Splits) -> None:
        src = splits.sources["test"]
        splits.test = _sentences(splits.test, "eval", src, splits.report)
        scheme = splits.meta["tag_scheme"]
        check_scheme(splits.test, src, scheme, "the scheme of the run")
        _check_unseen(set(splits.meta["labels"]), splits.test, src, "the run's training data")
        _orphan_warning(splits.report, splits.test, src, scheme)

    def load_processor(self, cfg: RunConfig, source: ModelSource) -> PreTrainedTokenizerBase:
        tokenizer = super().load_processor(cfg, source)
        if not getattr(tokenizer, "is_fast", False):
            raise ModelError(f"model {cfg.model.name!r}: token-classification aligns tags to sub-tokens with a fast "
                             f"tokenizer's word_ids(), and {type(tokenizer).__name__} is not one (no tokenizer.json)")
        return tokenizer

    def load_model(self, cfg: RunConfig, source: ModelSource, splits: Splits, **load_kwargs) -> LoadedModel:
        from transformers import AutoModelForTokenClassification

        from ..models import load_pretrained

        labels = splits.meta["labels"]
        model, new_modules = load_pretrained(
            AutoModelForTokenClassification, source, cfg.model.trust_remote_code, cfg.model.revision,
            num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)},
            ignore_mismatched_sizes=True,  # a token classifier with other tags gets a head sized to these
            **load_kwargs,
        )
        head = sorted({m.split(".")[0] for m in new_modules}) \
            or [n for n in ("classifier", "score") if hasattr(model, n)]
        return LoadedModel(model, head, head_is_new=bool(new_modules))

    def featurize(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> dict[str, list[Example]]:
        label_id = {lab: i for i, lab in enumerate(splits.meta["labels"])}
        # lists: datasets' lazy Column is not a batch the tokenizer takes
        return {name: _encode(tokenizer, list(ds["tokens"]), list(ds["tags"]), label_id, cfg.model.max_length,
                              splits.report, name)
                for name, ds in splits.present()}

    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[Example]], Batch]:
        pad_id = tokenizer.pad_token_id
        return lambda examples: pad_batch(examples, pad_id)

    def loss_hooks(self, cfg: RunConfig, model: torch.nn.Module, train_examples: list[Example],
                   batches_per_epoch: int) -> LossHooks:
        """The model's own loss (the same mean over the scored positions; AdaLoRA adds its regularizer to it),
        except under prompt-learning methods, whose virtual tokens lengthen the logits: token_loss."""
        peft_cfg = getattr(model, "peft_config", None) or {}
        prompt = any(getattr(c, "is_prompt_learning", False) for c in peft_cfg.values())
        return LossHooks(loss_fn=token_loss if prompt else None)

    def count(self, batch: Batch) -> tuple[int, torch.Tensor]:
        return batch["input_ids"].shape[0], batch["attention_mask"].sum()  # a tensor: read at log time

    def token_slots(self, batch: Batch) -> int:
        return batch["input_ids"].numel()

    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Per scored word: the predicted and the gold tag; per sentence: its scored words and summed loss;
        per batch: the labels' prefixes and types (_tag_codes)."""
        labels = batch["labels"]
        mask = labels != -100
        picked = _logits(model, batch)[mask].float()
        gold = labels[mask]
        rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(mask)[mask]
        loss_sum = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add_(
            0, rows, torch.nn.functional.cross_entropy(picked, gold, reduction="none"))
        prefix, kind = _tag_codes(model)
        return {"pred": picked.argmax(-1), "gold": gold, "words": mask.sum(1), "loss_sum": loss_sum,
                "tag_prefix": prefix, "tag_type": kind}

    def compute_metrics(self, parts: dict[str, torch.Tensor], wanted: Iterable[str],
                        num_labels: int) -> dict[str, float]:
        from seqeval.metrics import f1_score, precision_score, recall_score

        gold, pred = _sequences(parts, _coded_names(parts))
        words = parts["words"].sum()

        def entity(fn: Callable) -> Callable[[], float]:
            def score() -> float:
                with warnings.catch_warnings():  # no predicted / gold entities: seqeval warns and gives 0
                    warnings.simplefilter("ignore")
                    return float(fn(gold, pred))
            return score

        values = {
            "f1": entity(f1_score), "precision": entity(precision_score), "recall": entity(recall_score),
            "accuracy": lambda: float((parts["pred"] == parts["gold"]).float().mean()) if words else float("nan"),
            "loss": lambda: float(parts["loss_sum"].sum() / words.clamp(min=1)),
        }
        return {m: values[m]() for m in wanted}

    def confusion_matrix(self, parts: dict[str, torch.Tensor], num_labels: int) -> list[list[int]]:
        """Word-level: counts[gold tag][predicted tag] over the scored words."""
        return confusion_matrix(parts, num_labels)

    def eval_figures(self, parts: dict[str, torch.Tensor], meta: dict) -> list[dict] | None:
        labels = meta.get("labels")
        if not labels:
            return None
        scores = entity_scores(*_sequences(parts, labels))
        rows = [[kind, round(s["precision"], 4), round(s["recall"], 4), round(s["f1"], 4), s["support"]]
                for kind, s in scores.items()]
        return [{"kind": "table", "title": "Entities by type (exact match of type and words)",
                 "columns": ["entity type", "precision", "recall", "f1", "support"], "rows": rows}]

    @torch.inference_mode()
    def predict(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], meta: dict,
                max_length: int = 256, batch_size: int = 32, **_) -> list[dict]:
        """Entities (type, text, character span, mean tag probability) and the tag of each word; the text is split
        into words at whitespace and punctuation (_WORD). Words past max_length tokens are tagged 'O'."""
        labels = meta["labels"]
        model.eval()
        device = next(model.parameters()).device
        results = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            spans = [_words(t) for t in chunk]
            tagged = {j: ([], []) for j in range(len(chunk))}
            todo = [j for j, s in enumerate(spans) if s]
            if todo:
                enc = tokenizer([[chunk[j][a:b] for a, b in spans[j]] for j in todo], is_split_into_words=True,
                                truncation=True, max_length=max_length, padding=True, return_tensors="pt")
                probs = _logits(model, {k: v.to(device) for k, v in enc.items()}).float().softmax(-1).cpu()
                for row, j in enumerate(todo):
                    tagged[j] = _word_tags(enc.word_ids(row), probs[row], len(spans[j]), labels)
            results += [_prediction(t, s, *tagged[j]) for j, (t, s) in enumerate(zip(chunk, spans))]
        return results


def _word_tags(word_ids: list[int | None], probs: torch.Tensor, n_words: int,
               labels: list[str]) -> tuple[list[str], list[float]]:
    """Each word's tag and its probability, read at the word's first sub-token ('O', 0.0 when cut off)."""
    first: dict[int, int] = {}
    for pos, w in enumerate(word_ids):
        if w is not None and w not in first:
            first[w] = pos
    tags, scores = [], []
    for w in range(n_words):
        if w in first:
            p, k = probs[first[w]].max(-1)
            tags.append(labels[int(k)])
            scores.append(float(p))
        else:
            tags.append("O")
            scores.append(0.0)
    return tags, scores


def _encode(tokenizer: PreTrainedTokenizerBase, words: list[list[str]], tags: list[list[str]],
            label_id: dict[str, int], max_length: int, report: DataReport, split: str) -> list[Example]:
    """input_ids / attention_mask / labels per sentence (the tag id at each word's first sub-token, else -100);
    the words cut by max_length and the words with no token go into the report."""
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    examples, cut_sentences, cut_words, tokenless = [], 0, 0, 0
    for i, (sentence, sentence_tags) in enumerate(zip(words, tags)):
        labels, seen = [], set()
        for w in enc.word_ids(i):
            if w is None or w in seen:
                labels.append(-100)
            else:
                labels.append(label_id[sentence_tags[w]])
                seen.add(w)
        last = max(seen, default=-1)
        if len(labels) >= max_length and last < len(sentence) - 1:
            cut_sentences += 1
            cut_words += len(sentence) - 1 - last
        tokenless += last + 1 - len(seen)
        examples.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                         "labels": labels})
    report.stats[f"{split}_truncated"] = cut_sentences
    report.stats[f"{split}_truncated_words"] = cut_words
    if cut_sentences:
        report.warn(f"{split}: {cut_sentences} of {len(words)} sentences ({cut_sentences / len(words):.1%}) are longer "
                    f"than model.max_length={max_length} tokens; {cut_words} word(s) at their ends were cut, neither "
                    "trained on nor scored")
    if tokenless:
        report.stats[f"{split}_words_without_tokens"] = tokenless
        report.warn(f"{split}: {tokenless} word(s) have no tokens (the tokenizer drops them: empty, whitespace or "
                    "control characters) and are not scored")
    return examples


TASK = TokenClassification()
