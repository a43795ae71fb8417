"""`RunConfig`: the whole run config, its cross-section checks and the defaults it resolves from the task.

What a task accepts (its metrics, its default monitor, which way each metric improves) comes from the task
registry (`slimtune.tasks.task_spec`): no task is named here.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..methods import MethodConfig
from ..methods.lora import LoraConfig
from ..schema import StrictModel
from ..tasks import TASKS as TASK_SPECS
from ..tasks import task_spec
from ..track.config import TrackConfig
from .sections import DataConfig, EvalConfig, ImageConfig, ModelConfig, OutputConfig, TrainConfig
from .select import SelectConfig
from .sweep import SweepConfig

TASKS = tuple(TASK_SPECS)


class RunConfig(StrictModel):
    task: Literal[TASKS] = Field(..., description="what the model learns to do")
    model: ModelConfig = Field(..., description="the base model: a Hub id, a folder, a .gguf file or a factory")
    data: DataConfig = Field(..., description="training / eval / test data and their columns")
    method: MethodConfig = Field(default_factory=LoraConfig, description="PEFT method and its options")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation: steps, batch, lr, schedule")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="when to evaluate, what, and the best step")
    image: ImageConfig = Field(default_factory=ImageConfig,
                               description="image-classification: preprocessing and augmentation")
    output: OutputConfig = Field(default_factory=OutputConfig, description="where the run folder is written")
    track: TrackConfig = Field(default_factory=TrackConfig, description="run index, energy / CO2, MLflow / TensorBoard")
    sweep: SweepConfig | None = Field(None, description="hyperparameter search space and budget for `slimtune sweep` "
                                      "(ignored by `slimtune run`)")
    select: SelectConfig | None = Field(None, description="candidate models and methods and the budget for "
                                        "`slimtune select` (ignored by `slimtune run`)")

    @field_validator("model", mode="before")
    @classmethod
    def _model_as_name(cls, value: object) -> object:
        return model_section(value)

    @field_validator("method", mode="before")
    @classmethod
    def _default_method_name(cls, value: object) -> object:
        if isinstance(value, dict) and "name" not in value:
            return {"name": "lora", **value}  # `method: {r: 16}` means LoRA
        return value

    @model_validator(mode="after")
    def _method_default_lr(self) -> RunConfig:
        """No `train.lr` in the config: the method's own default (methods/*.py `default_lr`), else the task's
        (tasks/spec.py `default_lr`: the LoRA family's rate differs between a new head's tasks and causal LMs)."""
        if "lr" not in self.train.model_fields_set:
            from ..methods import REGISTRY

            self.train.lr = REGISTRY[self.method.name].default_lr or task_spec(self.task).default_lr
            # filled in, not given: `lr` stays out of the fields the user set, so a dump with exclude_unset
            # (a sweep's base config) does not carry this method's rate into a trial of another method
            self.train.model_fields_set.discard("lr")
        return self

    @model_validator(mode="after")
    def _check_metrics(self) -> RunConfig:
        named = [("eval.metrics", m) for m in self.eval.metrics or []] + [("eval.monitor", self.eval.monitor)]
        if self.sweep is not None:
            named += [(f"sweep.{key}", getattr(self.sweep, key)) for key in ("prune_on", "prune_tiebreak")]
        known = monitorable = task_spec(self.task).metrics
        gen = self.eval.generate
        if gen is not None:
            if not task_spec(self.task).generates:
                raise ValueError(f"eval.generate: task {self.task!r} does not generate text; it is for tasks "
                                 f"{', '.join(n for n, s in TASK_SPECS.items() if s.generates)}")
            monitored = [f"gen_{m}" for m in gen.metrics]
            if self.eval.monitor in monitored and gen.every != "eval":
                raise ValueError(f"eval.monitor: {self.eval.monitor!r} is computed only at the end with "
                                 "eval.generate.every: end; set eval.generate.every: eval to monitor it")
            if gen.every == "eval":
                monitorable = monitorable + tuple(monitored)
        for key, metric in named:
            if metric is not None and metric not in (monitorable if key == "eval.monitor" else known):
                raise ValueError(f"{key}: {metric!r} is not a metric of task {self.task!r}; accepted: "
                                 f"{', '.join(monitorable if key == 'eval.monitor' else known)}")
        return self

    @model_validator(mode="after")
    def _check_packing(self) -> RunConfig:
        packing = self.data.packing
        if packing is False:
            return self
        accepted = [name for name, spec in TASK_SPECS.items() if spec.packing]
        if not task_spec(self.task).packing:
            raise ValueError(f"data.packing: {packing!r} is not accepted for task {self.task!r}; packing is for "
                             f"task {', '.join(accepted)}; set data.packing: false")
        if self.train.seq_len_schedule:
            raise ValueError("data.packing and train.seq_len_schedule: packed rows are up to model.max_length long "
                             "from the first step; use one of them")
        return self

    @model_validator(mode="after")
    def _check_task_keys(self) -> RunConfig:
        """train.loss, train.huber_delta and data.target_columns only where the task reads them."""
        spec, loss = task_spec(self.task), self.train.loss
        if loss != "auto" and loss not in spec.losses:
            takers = [name for name, s in TASK_SPECS.items() if loss in s.losses]
            raise ValueError(f"train.loss: {loss!r} is not accepted for task {self.task!r} (accepted: "
                             f"{', '.join(('auto', *spec.losses))}); it is a loss of task {', '.join(takers)}")
        # a value other than the default: a run folder's config.yaml holds every key, the default one too
        if self.train.huber_delta != type(self.train).model_fields["huber_delta"].default and loss != "huber":
            raise ValueError(f"train.huber_delta is set but train.loss is {loss!r}; set train.loss: huber or drop it")
        if self.data.target_columns and not spec.target_columns:
            takers = [name for name, s in TASK_SPECS.items() if s.target_columns]
            raise ValueError(f"data.target_columns is read by task {', '.join(takers)} only; task {self.task!r} "
                             "takes its labels from data.label_column")
        return self

    # resolved defaults ---------------------------------------------------
    @property
    def monitor(self) -> str:
        return self.eval.monitor or task_spec(self.task).default_monitor

    @property
    def higher_is_better(self) -> bool:
        if self.eval.mode != "auto":
            return self.eval.mode == "max"
        return task_spec(self.task).higher_is_better(self.monitor)


def model_section(value: object) -> object:
    """`model: org/name`, as other trainers' configs write it, is `model: {name: org/name}`."""
    return {"name": value} if isinstance(value, str) else value


def metric_higher_is_better(metric: str, task: str | None = None) -> bool:
    """Whether a larger value of `metric` is better: as `task` says, or, without a task, as every task that has
    the metric says (a metric no task knows counts as higher-is-better)."""
    specs = [task_spec(task)] if task is not None else [s for s in TASK_SPECS.values() if metric in s.metrics]
    return all(spec.higher_is_better(metric) for spec in specs)
