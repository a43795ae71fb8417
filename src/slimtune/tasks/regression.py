"""Text regression: one or more float targets per text (or text pair), one model output per target.

The targets are standardised with the training split's mean and standard deviation (per target, kept in
meta.json as `target_mean` / `target_std` and on the model's config), so the model trains on unit-scale
targets whatever their units; predictions, metrics and figures are turned back into the user's units.
The loss is transformers' own regression loss (MSE, `problem_type: regression`) or, with train.loss=huber,
the Huber loss on the standardised targets (delta in standard deviations of the target).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch

from ..data.validate import DataReport, require_columns, require_nonempty, text_warnings
from ..errors import DataError, ModelError
from . import TASKS
from .base import Batch, Example, LoadedModel, LossHooks, Task
from .common import (HEAD_MARGIN, Splits, encode_texts, head_texts, read_splits, sequence_count, sequence_label_collate)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import RunConfig
    from ..models.sources import ModelSource

ACCEPTED = "finite numbers such as 3.5, -2 or 1e-3 (a dot as decimal separator; empty cells, NaN and inf are not)"
SCATTER_POINTS = 2000  # a figure shows at most this many examples (a seeded sample of larger splits)


# -- targets -----------------------------------------------------------------------------------------------

def target_columns(cfg: RunConfig) -> list[str]:
    """data.target_columns when given, else data.label_column as the one target."""
    d = cfg.data
    return list(d.target_columns) if d.target_columns else [d.label_column]


def _columns(cfg: RunConfig) -> dict[str, str]:
    """Column -> the config key that names it (for the missing-column error)."""
    d = cfg.data
    key = "data.target_columns" if d.target_columns else "data.label_column"
    cols = {d.text_column: "data.text_column", **{c: key for c in target_columns(cfg)}}
    if d.text_pair_column:
        cols[d.text_pair_column] = "data.text_pair_column"
    return cols


def _number(value: Any) -> float | None:
    """A target value as a float; None when it is not a finite number (true/false are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None


def _shown(value: Any) -> str:
    if value is None:
        return "missing (null)"
    if isinstance(value, str) and not value.strip():
        return "empty"
    return repr(value)


def parse_targets(ds: Any, columns: list[str], source: str) -> np.ndarray:
    """The targets of a table as an (examples, targets) float64 array; a value that is not a finite number is a
    DataError naming the file, the column, the 1-based record number, the value and what is accepted."""
    out = np.empty((len(ds), len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        values = ds[col]
        bad = []
        for i, v in enumerate(values):
            x = _number(v)
            if x is None:
                bad.append(i)
            else:
                out[i, j] = x
        if bad:
            i = bad[0]
            more = f" ({len(bad)} such records: {', '.join(str(k + 1) for k in bad[:5])}" \
                   f"{', ...' if len(bad) > 5 else ''})" if len(bad) > 1 else ""
            raise DataError(f"{source}: column {col!r}, record {i + 1}: the target is {_shown(values[i])}, not a "
                            f"number{more}; regression targets must be {ACCEPTED}")
    return out


def target_stats(y: np.ndarray, columns: list[str], source: str) -> tuple[list[float], list[float]]:
    """Per-target mean and standard deviation of the training split; a constant target is an error (its
    standard deviation is 0: nothing to learn, and standardising it would divide by zero)."""
    mean, std = y.mean(axis=0), y.std(axis=0)
    for j, col in enumerate(columns):
        if not std[j] > 0:
            raise DataError(f"{source}: column {col!r} has the same value {y[0, j]:g} in all {len(y)} training "
                            "example(s); a constant target cannot be learned: give targets that vary, or drop "
                            "the column from data.target_columns")
    return [float(m) for m in mean], [float(s) for s in std]


def _range_warnings(report: DataReport, train: np.ndarray, others: dict[str, tuple[np.ndarray, str]],
                    columns: list[str]) -> None:
    """Targets of eval / test outside the training range: the model has rarely seen such values."""
    lo, hi = train.min(axis=0), train.max(axis=0)
    for name, (y, source) in others.items():
        for j, col in enumerate(columns):
            out = int(((y[:, j] < lo[j]) | (y[:, j] > hi[j])).sum())
            if out:
                report.warn(f"{source}: {out} of {len(y)} {name} target(s) in column {col!r} ({out / len(y):.1%}) "
                            f"lie outside the training range [{lo[j]:g}, {hi[j]:g}]; predictions there extrapolate")


def _texts(ds: Any, column: str) -> list[str]:
    return ["" if t is None else str(t) for t in ds[column]]  # a missing JSONL value is empty, not the text 'None'


def _stats_of(mean: list[float], std: list[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


# -- metrics (numpy; per target, then averaged over targets) ------------------------------------------------

def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r; NaN when either side is constant (or fewer than 2 examples)."""
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum())) if len(a) > 1 else 0.0
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def per_target_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, list[float]]:
    """mae, rmse, r2, pearson, spearman of each target (columns of the (examples, targets) arrays)."""
    out: dict[str, list[float]] = {m: [] for m in ("mae", "rmse", "r2", "pearson", "spearman")}
    for j in range(gold.shape[1]):
        p, g = pred[:, j], gold[:, j]
        err = p - g
        total = float(((g - g.mean()) ** 2).sum())
        out["mae"].append(float(np.abs(err).mean()))
        out["rmse"].append(math.sqrt(float((err ** 2).mean())))
        out["r2"].append(1.0 - float((err ** 2).sum()) / total if total > 0 else float("nan"))
        out["pearson"].append(pearson(p, g))
        out["spearman"].append(pearson(average_ranks(p), average_ranks(g)))
    return out


def _arrays(parts: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = parts["pred"].double().cpu().numpy(), parts["gold"].double().cpu().numpy()
    return pred.reshape(len(pred), -1), gold.reshape(len(gold), -1)


def _sample(n: int, k: int) -> np.ndarray:
    """Indices of at most k of n examples (seeded, sorted): the same points at every evaluation."""
    return np.arange(n) if n <= k else np.sort(np.random.default_rng(0).choice(n, k, replace=False))


def _cell(value: float) -> float | None:
    """6 significant digits (the figures file stays small); None for NaN (JSON has no NaN)."""
    return None if math.isnan(value) else float(f"{value:.6g}")


def _round(values: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


# -- the task ----------------------------------------------------------------------------------------------

class Regression(Task):
    spec = TASKS["regression"]

    def load_data(self, cfg: RunConfig) -> Splits:
        d = cfg.data
        cols, targets = _columns(cfg), target_columns(cfg)
        text_cols = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])

        def check(ds: Any, source: str) -> None:  # on each file as read: record numbers are the file's
            require_columns(ds, list(cols), source, cols)
            parse_targets(ds, targets, source)

        splits = read_splits(cfg, None, check, text_cols)
        y = {name: (parse_targets(ds, targets, splits.sources[name]), splits.sources[name])
             for name, ds in splits.present()}
        mean, std = target_stats(y["train"][0], targets, d.train)
        splits.meta.update(targets=targets, target_mean=mean, target_std=std)
        train = y.pop("train")[0]
        splits.report.stats["targets"] = {
            col: {"mean": mean[j], "std": std[j], "min": float(train[:, j].min()), "max": float(train[:, j].max())}
            for j, col in enumerate(targets)}
        _range_warnings(splits.report, train, y, targets)
        others = {name: _texts(ds, d.text_column) for name, ds in splits.present() if name != "train"}
        text_warnings(splits.report, "train", _texts(splits.train, d.text_column), others)
        return splits

    def check_eval_data(self, cfg: RunConfig, splits: Splits) -> None:
        cols = _columns(cfg)
        src = splits.sources["test"]
        require_columns(splits.test, list(cols), src, cols)
        require_nonempty(splits.test, "eval", src)
        parse_targets(splits.test, splits.meta["targets"], src)

    def load_model(self, cfg: RunConfig, source: ModelSource, splits: Splits, **load_kwargs) -> LoadedModel:
        from transformers import AutoModelForSequenceClassification

        from ..models import load_pretrained

        targets = splits.meta["targets"]
        # problem_type set: with several outputs and float labels transformers would otherwise pick
        # multi-label classification (BCE) for the loss
        model, new_modules = load_pretrained(
            AutoModelForSequenceClassification, source, cfg.model.trust_remote_code, cfg.model.revision,
            num_labels=len(targets), problem_type="regression", id2label=dict(enumerate(targets)),
            label2id={t: i for i, t in enumerate(targets)}, **load_kwargs,
        )
        # the standardisation travels with the model (and into a merged model's config.json): outputs * std +
        # mean are the user's units; eval_step reads it here, since it is given the model, not the run's meta
        model.config.target_mean = list(splits.meta["target_mean"])
        model.config.target_std = list(splits.meta["target_std"])
        head = sorted({m.split(".")[0] for m in new_modules}) \
            or [n for n in ("classifier", "score") if hasattr(model, n)]
        return LoadedModel(model, head, head_is_new=bool(new_modules))

    def featurize(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> dict[str, list[Example]]:
        d = cfg.data
        mean, std = np.array(splits.meta["target_mean"]), np.array(splits.meta["target_std"])
        out = {}
        for name, ds in splits.present():
            pairs = _texts(ds, d.text_pair_column) if d.text_pair_column else None
            enc = encode_texts(tokenizer, _texts(ds, d.text_column), pairs, cfg.model.max_length, splits.report, name)
            z = (parse_targets(ds, splits.meta["targets"], splits.sources.get(name, name)) - mean) / std
            # "targets", not "labels": a list under "labels" is per token to the sequence-length schedule's cut
            out[name] = [{"input_ids": ids, "attention_mask": am, "targets": [float(v) for v in row]}
                         for ids, am, row in zip(enc["input_ids"], enc["attention_mask"], z)]
        return out

    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[Example]], Batch]:
        return sequence_label_collate(tokenizer.pad_token_id, "targets", torch.float32)

    def loss_hooks(self, cfg: RunConfig, model: torch.nn.Module, train_examples: list[Example],
                   batches_per_epoch: int) -> LossHooks:
        rule = "on the targets standardised with the training split's mean / std (meta.json)"
        if cfg.train.loss != "huber":
            return LossHooks(note={"loss": "mse", "rule": "transformers' regression loss, mean squared error " + rule})
        delta = cfg.train.huber_delta

        def huber(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            return torch.nn.functional.huber_loss(logits.float().view_as(labels), labels, delta=delta)

        return LossHooks(loss_fn=huber, note={"loss": "huber", "delta": delta,
                                              "rule": f"Huber loss {rule}; delta in standard deviations"})

    def count(self, batch: Batch) -> tuple[int, torch.Tensor]:
        return sequence_count(batch)

    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        labels = batch["labels"].float()
        z = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float().view_as(labels)
        config = model.config
        if getattr(config, "target_mean", None) is None:
            raise ModelError("the model's config holds no target_mean / target_std: load it with the run "
                             "(slimtune.load_run), which sets them from meta.json")
        mean, std = _stats_of(config.target_mean, config.target_std, z.device)
        # loss: the squared error of the standardised targets, averaged over targets (what MSE training minimises)
        return {"pred": z * std + mean, "gold": labels * std + mean, "loss": ((z - labels) ** 2).mean(-1)}

    def compute_metrics(self, parts: dict[str, torch.Tensor], wanted: Iterable[str],
                        num_labels: int) -> dict[str, float]:
        wanted = list(wanted)
        per = per_target_metrics(*_arrays(parts)) if any(m != "loss" for m in wanted) else {}
        return {m: float(parts["loss"].float().mean()) if m == "loss" else float(np.mean(per[m])) for m in wanted}

    def eval_figures(self, parts: dict[str, torch.Tensor], meta: dict) -> list[dict] | None:
        """A table of each target's metrics, then a predicted-vs-true scatter per target (user units)."""
        pred, gold = _arrays(parts)
        targets = meta.get("targets") or [f"target {j}" for j in range(gold.shape[1])]
        per = per_target_metrics(pred, gold)
        figures: list[dict] = [{"kind": "table", "title": "metrics per target", "columns": ["target", *per],
                                "rows": [[t, *(_cell(per[m][j]) for m in per)] for j, t in enumerate(targets)]}]
        idx = _sample(len(gold), SCATTER_POINTS)
        shown = "" if len(idx) == len(gold) else f" ({len(idx):,} of {len(gold):,} examples)"
        for j, t in enumerate(targets):
            figures.append({"kind": "scatter", "title": f"{t}: predicted vs true{shown}",
                            "x": _round(gold[idx, j]), "y": _round(pred[idx, j]),
                            "x_label": f"true {t}", "y_label": f"predicted {t}"})
        return figures

    @torch.inference_mode()
    def predict(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], meta: dict,
                max_length: int = 256, batch_size: int = 32, **_) -> list[dict]:
        """{"text", "predictions": {target column: value in the user's units}} per text."""
        targets = meta["targets"]
        model.eval()
        device = next(model.parameters()).device
        mean, std = _stats_of(meta["target_mean"], meta["target_std"], device)
        results = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            heads, _ = head_texts(tokenizer, chunk, max_length + HEAD_MARGIN)
            enc = tokenizer(heads, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
            values = (model(**enc).logits.float().view(len(chunk), -1) * std + mean).cpu().tolist()
            results += [{"text": t, "predictions": dict(zip(targets, v))} for t, v in zip(chunk, values)]
        return results


TASK = Regression()
