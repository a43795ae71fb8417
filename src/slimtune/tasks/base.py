"""The task contract: what the run, evaluation and prediction call on a task.

A task module defines `class X(Task)` with `spec = TASKS[...]` and `TASK = X()`. The members without a body
here are required; the others have the documented no-op default, so no caller probes a task with hasattr
(the shape of peft's BaseTuner and torchtune's recipe interfaces).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig
    from ..data.batching import BatchShape
    from ..models.sources import ModelSource
    from .common import Splits
    from .spec import TaskSpec

Example = dict[str, Any]
Batch = dict[str, "torch.Tensor"]


class LoadedModel(NamedTuple):
    model: Any  # a transformers / torch module, before the method is applied
    head: list[str]  # top-level modules trained in full (a new classification head); [] for none
    head_is_new: bool = True  # False: the checkpoint had this head already (no fast-head default lr)


@dataclass(frozen=True)
class LossHooks:
    """How the training loss is computed, fixed before the loop is built."""

    forward_kwargs: dict = field(default_factory=dict)  # extra arguments of the model's forward (num_items_in_batch)
    # (model, batch) -> loss where the task computes it itself; None: model(**batch).loss
    loss_fn: Callable | None = None
    note: dict | None = None  # what loss.json records about the rule, when there is one


class Task:
    spec: TaskSpec

    # -- data (no model needed) ---------------------------------------------------------------------------
    def load_data(self, cfg: RunConfig) -> Splits:
        """Read, validate and split the config's data; every data error is raised here, before a model loads."""
        raise NotImplementedError

    def read_eval(self, cfg: RunConfig, source: str) -> Any:
        """`slimtune eval`'s data file as a table (the checks run in check_eval_data)."""
        from ..data.readers import read_source

        return read_source(source)

    def check_eval_data(self, cfg: RunConfig, splits: Splits) -> None:
        """Checks for a data file evaluated against a finished run (`splits.test` holds it)."""
        raise NotImplementedError

    def data_preview(self, cfg: RunConfig, processor: Any, splits: Splits) -> list[str]:
        """Lines `slimtune validate` prints about the data as the model will see it (a rendered example, the
        length distribution); [] where the task has nothing to show."""
        return []

    def generation_prompts(self, cfg: RunConfig, processor: Any, splits: Splits, n: int) -> list[dict]:
        """eval.generate's inputs from the first n eval records: [{"prompt_ids", "prompt", "reference"}]; config
        validation lets only a task whose spec says it generates get here."""
        return []

    # -- model and inputs -----------------------------------------------------------------------------------
    def load_processor(self, cfg: RunConfig, source: ModelSource) -> Any:
        """The tokenizer; model.max_length is checked against the model's position limit here, before any data
        is tokenized or a run folder written (a longer input fails inside the model's forward, mid-run)."""
        from ..models import load_tokenizer
        from ..models.checks import check_source_max_length

        tokenizer = load_tokenizer(source, cfg.model.trust_remote_code, cfg.model.revision)
        check_source_max_length(cfg, source, tokenizer)
        return tokenizer

    def largest_input(self, cfg: RunConfig, source: ModelSource) -> int:
        """The largest input one training example gives the model (the memory estimate of `slimtune select
        --memory` is made at it): model.max_length tokens; an image task's side in pixels."""
        return cfg.model.max_length

    def load_model(self, cfg: RunConfig, source: ModelSource, splits: Splits, **load_kwargs) -> LoadedModel:
        raise NotImplementedError

    def featurize(self, cfg: RunConfig, processor: Any, splits: Splits) -> dict[str, list[Example]]:
        """Model inputs per split (train, eval, test when given); truncation goes into splits.report."""
        raise NotImplementedError

    def collate(self, processor: Any) -> Callable[[list[Example]], Batch]:
        """Evaluation batches (dynamic padding)."""
        raise NotImplementedError

    def train_collate(self, processor: Any, shape: BatchShape) -> Callable[[list[Example]], Batch] | None:
        """Training batches that differ from evaluation's (augmentation, progressive resizing read from `shape`);
        None: the evaluation collate, cut to `shape.max_length` under a sequence-length schedule."""
        return None

    # -- training and evaluation ----------------------------------------------------------------------------
    def loss_hooks(self, cfg: RunConfig, model: torch.nn.Module, train_examples: list[Example],
                   batches_per_epoch: int) -> LossHooks:
        """The training loss: by default the model's own (`model(**batch).loss`)."""
        return LossHooks()

    def count(self, batch: Batch) -> tuple[Any, Any]:
        """(samples, tokens) of a training batch, for throughput; tensors are fine (read at log time)."""
        raise NotImplementedError

    def token_slots(self, batch: Batch) -> Any:
        """The token positions a training batch holds, padding included (rows x padded length): the summary's
        real-token share is tokens / slots; None where the task has no tokens."""
        return None

    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-example outputs of one eval batch, gathered across processes by the loop."""
        raise NotImplementedError

    def compute_metrics(self, parts: dict[str, torch.Tensor], wanted: Iterable[str],
                        num_labels: int) -> dict[str, float]:
        raise NotImplementedError

    def confusion_matrix(self, parts: dict[str, torch.Tensor], num_labels: int) -> list[list[int]] | None:
        """counts[true][predicted] for the run report; None where the task has no classes."""
        return None

    def eval_figures(self, parts: dict[str, torch.Tensor], meta: dict) -> list[dict] | None:
        """Task-specific figures of one evaluation for the run report (JSON-able; `meta` is the run's meta.json).
        Each is {"kind": "table", "title", "columns": [...], "rows": [[...], ...]} or {"kind": "scatter", "title",
        "x": [...], "y": [...], "x_label", "y_label"}; the report renders both kinds, so a task adds figures
        without touching report/. None: none."""
        return None

    def fit_after_training(self, model: torch.nn.Module, eval_parts: Callable[[], dict[str, torch.Tensor]],
                           meta: dict) -> dict:
        """Fit what belongs to the best checkpoint (decision thresholds, calibration) once training is over: the
        best weights are loaded, the adapter is not saved yet and the test split not evaluated. `eval_parts()`
        gives the eval split's per-example outputs with these weights (gathered across processes: every process
        calls it, or none does). The task sets what it fitted on `model` for the test evaluation and returns it;
        the returned keys are merged into meta.json, where evaluate and predict read them back. {}: nothing."""
        return {}

    def predict(self, model: torch.nn.Module, processor: Any, inputs: list[str], meta: dict, **kwargs) -> list[dict]:
        """Predictions for raw inputs (texts, prompts, image paths), with the run's meta (labels, format)."""
        raise NotImplementedError
