"""The run config: typed, validated before any model is loaded.

One YAML file (plus `a.b=value` overrides) -> `RunConfig`. The field
descriptions are the reference documentation (`slimtune schema` prints the JSON
schema); unknown keys and bad values raise `ConfigError` naming the key, the
value given and what is accepted.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .methods import MethodConfig
from .methods.lora import LoraConfig
from .schema import StrictModel, plain_name
from .sweep.space import SweepConfig
from .track.config import TrackConfig

TASKS = ("text-classification", "causal-lm", "image-classification")


class ConfigError(ValueError):
    """A config problem found before any compute; the message says what to change."""


class ModelConfig(StrictModel):
    name: str | None = Field(
        None,
        description="Hugging Face model id, a local folder, or a .gguf file. Well-known ids fall back to "
        "pip-packaged offline copies when the Hub cannot be reached. Required unless `factory` is given.",
    )
    factory: str | None = Field(
        None, description="image-classification: a function that builds your own torch.nn.Module, "
        "'package.module:function' or 'path/file.py:function', called with num_labels, labels and factory_args")
    factory_args: dict = Field(default_factory=dict, description="keyword arguments for the factory")
    gguf_file: str | None = Field(None, description="GGUF file name inside the folder `name` (or give the file path as `name`)")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run code shipped with the model; off unless you trust it")
    max_length: int = Field(256, ge=8, description="sequences are truncated to this many tokens")

    @model_validator(mode="after")
    def _name_or_factory(self):
        if (self.name is None and self.factory is None) or (self.factory and self.name not in (None, self.factory)):
            raise ValueError("model.name: required key is missing; give model.name (Hub id, folder, .gguf) "
                             "or model.factory (module:function), not both")
        if self.name is None:
            self.name = self.factory  # run names, summaries and the index show the factory
        return self


class DataConfig(StrictModel):
    train: str = Field(
        ...,
        description="training data: a .csv/.tsv/.jsonl/.json/.parquet/.txt file, a saved `datasets` folder, "
        "'hf:<name>[:<split>]' for a Hub dataset, or 'builtin:<name>' for a dataset shipped by a package",
    )
    eval: str | None = Field(None, description="evaluation data (same forms); carved out of train when absent")
    test: str | None = Field(None, description="test data, evaluated once with the best checkpoint at the end")
    text_column: str = Field("text", description="column with the input text")
    text_pair_column: str | None = Field(None, description="optional second text column (sentence pairs)")
    label_column: str = Field("label", description="column with the class label (text- and image-classification)")
    image_column: str = Field("image", description="image-classification: column with image paths (relative to the "
                              "file's folder) or a `datasets` image column")
    bad_images: Literal["fail", "skip"] = Field("fail", description="unreadable or truncated images: fail naming them, "
                                                "or skip them with a count in the data report")
    label_names: list[str] | None = Field(None, description="names of integer labels 0..N-1 (idx / npz files), e.g. "
                                          "Fashion-MNIST's classes")
    format: Literal["auto", "text", "chat", "instruction"] = Field(
        "auto",
        description="causal-lm record format: 'text' (plain text, packed into blocks), 'chat' (a messages "
        "column of {role, content}), 'instruction' (prompt and response columns); 'auto' picks from the columns",
    )
    messages_column: str = Field("messages", description="column with chat messages (format: chat)")
    prompt_column: str = Field("prompt", description="column with the instruction (format: instruction)")
    response_column: str = Field("response", description="column with the response (format: instruction)")
    train_on_prompt: bool = Field(False, description="causal-lm: also compute the loss on prompt / user tokens")
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="share of train carved out for eval when eval is absent")
    split_seed: int = Field(0, description="seed of the train/eval split")
    max_train_samples: int | None = Field(None, ge=1, description="use only this many training examples (seeded sample)")
    max_eval_samples: int | None = Field(None, ge=1, description="use only this many eval examples")
    min_class_examples: int = Field(2, ge=1, description="a class with fewer examples than this cannot be split and fails validation")


class EarlyStoppingConfig(StrictModel):
    patience: int | None = Field(None, ge=1, description="stop after this many evaluations without improvement (off when null)")
    min_delta: float = Field(0.0, ge=0.0, description="smallest change of the monitored metric that counts as improvement")


class UnfreezeConfig(StrictModel):
    every_steps: int | None = Field(None, ge=1, description="unfreeze one more group every N optimizer steps")
    every_epochs: float | None = Field(None, gt=0, description="... or every this many epochs")
    start: int = Field(1, ge=1, description="groups trainable at the start, from the top (1 = the head)")

    @model_validator(mode="after")
    def _one_interval(self):
        if (self.every_steps is None) == (self.every_epochs is None):
            raise ValueError("give exactly one of every_steps and every_epochs")
        return self


class StagedConfig(StrictModel):
    head_fraction: float = Field(0.1, gt=0, lt=1, description="share of the steps for stage 1 (head only)")
    head_lr_mult: float = Field(1.0, gt=0, description="stage-1 learning rate as a multiple of train.lr")


class TrainConfig(StrictModel):
    epochs: float = Field(3.0, gt=0, description="number of passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="number of optimizer steps; overrides epochs")
    batch_size: int = Field(16, ge=1, description="examples per device per forward pass")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimizer step")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW); when not set, the method's default: 5e-4 for "
                      "the LoRA family, larger for vector / probe methods, smaller for full fine-tuning (README, Methods)")
    schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="learning-rate decay after warmup")
    warmup: float = Field(0.06, ge=0, description="warmup: a fraction of all steps if < 1, else a number of steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and norms)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm (off when null)")
    seed: int = Field(42, description="seed for initialisation, data order and dropout")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="'auto': bf16 autocast where the hardware supports it (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32"
    )
    group_by_length: bool = Field(True, description="batch examples of similar length together (less padding)")
    spread_duplicates: bool = Field(
        True, description="with group_by_length: copies of one example (same tokens and labels) go to different batches "
        "(sorting by length would put them side by side); swaps with the nearest batch, so padding grows only where "
        "there are copies")
    fast_dropout: bool = Field(
        True, description="CPU training: dropout masks from 16-bit random slices (4 per 64-bit draw) instead of one "
        "draw per element; same p (to 1/65536) and distribution, torch's generator (resume stays exact). Dropout was 37% "
        "of a CPU LoRA step on MiniLM: x1.2 the throughput of HF Trainer with group_by_length on SST-2; same quality on "
        "SST-2 (3 seeds), the quickstart (8 seeds) and SmolLM2 chat (2 seeds) (benchmarks/RESULTS.md). No effect on GPUs, "
        "whose dropout kernel is fast already; false: torch's dropout")
    scored_logits_only: bool = Field(
        True, description="causal LM: project to the vocabulary only the positions whose next token is scored "
        "(responses of chat / instruction data): same loss, less compute")
    loss_tokens: Literal["epoch", "batch"] = Field(
        "epoch", description="causal LM: divide a batch's summed token loss by the mean number of scored tokens per "
        "batch over the epoch ('epoch': every token weighs the same whatever batch it lands in, which length-grouped "
        "batches need) or by its own count ('batch': the per-batch mean most trainers use)")
    log_every: int = Field(10, ge=1, description="log training loss / lr / throughput every N optimizer steps")
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    # transfer-learning techniques (train/groups.py, train/transfer.py)
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="layer-wise lr decay (BEiT / ELECTRA): the head gets lr, the top block lr*d, "
        "each group below d times the one above, down to the embeddings. Off by default: with LoRA on MiniLM it did not "
        "help (Banking77 -0.1 pt, SST-2 1 epoch -10 pt and unstable; benchmarks/RESULTS.md, bench_transfer)")
    lr_ratio_min: float | None = Field(
        None, gt=0, le=1, description="discriminative learning rates (fastai slice(lo, hi)): a geometric spread from "
        "lr*lr_ratio_min (embeddings) to lr (head) over the parameter groups. Off by default (like layer_decay, it lowers "
        "the rate of the lower adapters, which short LoRA runs did not benefit from)")
    head_lr: float | None = Field(
        None, gt=0, description="the head's own learning rate. Default for a newly initialised text-classification head: "
        "10x train.lr, at most 2e-2, never below train.lr (at the adapters' rate a random head learns too slowly: "
        "Banking77 66.5% -> 87.8% test accuracy; benchmarks/RESULTS.md, bench_transfer); image classification: train.lr "
        "(there the 10x head cost accuracy on Fashion-MNIST). Set it to train.lr for one rate")
    unfreeze: UnfreezeConfig | None = Field(
        None, description="gradual unfreezing (ULMFiT); off when null. Off by default: with LoRA on MiniLM it cost "
        "accuracy at the budgets measured (SST-2 -14 pt, Banking77 -1.3 pt; benchmarks/RESULTS.md, bench_transfer); "
        "it was made for long full fine-tuning of language models")
    strategy: Literal["standard", "staged"] = Field(
        "standard", description="'staged': the head alone first (train.staged), then everything the method trains, "
        "each stage with its own warmup and decay (fastai fine_tune). Not the default: it matched plain LoRA on SST-2 "
        "(-0.4 pt) and gained +1.5 pt on Banking77, within the seed spread (benchmarks/RESULTS.md, bench_transfer)")
    staged: StagedConfig = Field(default_factory=lambda: StagedConfig())
    seq_len_schedule: list[tuple[float, int]] | None = Field(
        None, description="sequence-length warm-up: [[fraction of training, max tokens], ...] starting at 0.0, "
        "e.g. [[0.0, 32], [0.5, 64]]; sequences are cut to the current length (the final length is model.max_length)")

    image_size_schedule: list[tuple[float, int]] | None = Field(
        None, description="progressive resizing (images): [[fraction of training, image size], ...] starting at 0.0, "
        "e.g. [[0.0, 64], [0.5, 96], [0.8, 128]]; evaluation uses the final size (image.size)")

    @field_validator("image_size_schedule", "seq_len_schedule")
    @classmethod
    def _check_schedule(cls, v, info):
        """A step function of the fraction of training: starts at 0.0, increasing fractions in [0, 1)."""
        if v is None:
            return v
        unit, example = ("pixels", "[[0.0, 64], [0.5, 96]]") if info.field_name == "image_size_schedule" \
            else ("tokens", "[[0.0, 32], [0.5, 64]]")
        if not v or v[0][0] != 0.0:
            raise ValueError(f"must start with an entry at fraction 0.0, e.g. {example}")
        fr = [a for a, _ in v]
        if any(not 0 <= a < 1 for a in fr) or fr != sorted(fr) or len(set(fr)) != len(fr):
            raise ValueError(f"fractions {fr} must be increasing and in [0, 1)")
        if any(b < 8 for _, b in v):
            raise ValueError(f"{'sizes' if unit == 'pixels' else 'lengths'} must be at least 8 {unit}")
        return v

    @model_validator(mode="after")
    def _one_freezing_schedule(self):
        if self.unfreeze is not None and self.strategy == "staged":
            raise ValueError("train.unfreeze and train.strategy=staged both decide what is trainable; use one of them")
        return self


class EvalConfig(StrictModel):
    every_steps: int | None = Field(None, ge=1, description="evaluate every N optimizer steps (overrides every_epochs)")
    every_epochs: float = Field(1.0, gt=0, description="evaluate every this fraction (or multiple) of an epoch")
    metrics: list[str] | None = Field(None, description="metrics to compute; default: accuracy, macro_f1 (classification), loss, perplexity (causal-lm)")
    monitor: str | None = Field(None, description="metric that selects the best checkpoint and drives early stopping; default accuracy / loss")
    mode: Literal["auto", "max", "min"] = Field("auto", description="whether a higher monitored value is better; auto: min for loss/perplexity")
    batch_size: int | None = Field(None, ge=1, description="eval batch size (default 2x train batch size)")


class ImageConfig(StrictModel):
    size: int | None = Field(None, ge=8, description="final image size (square; default: the model's preprocessor config, else 224)")
    mean: list[float] | None = Field(None, description="normalisation mean per channel (default: the model's preprocessor config, else ImageNet)")
    std: list[float] | None = Field(None, description="normalisation std per channel (default: as mean)")
    crop_pct: float | None = Field(None, gt=0, le=1, description="evaluation: resize to size / crop_pct, then centre-crop (default 1.0: resize only)")
    resample: Literal["nearest", "bilinear", "bicubic"] | None = Field(None, description="resize filter (default bilinear)")
    hflip: bool = Field(False, description="training: random horizontal flips")
    random_crop: float | None = Field(None, gt=0, le=1, description="training: random resized crop with at least this share of the area")
    rotate: float = Field(0.0, ge=0, le=180, description="training: random rotation up to +- this many degrees")
    color_jitter: float = Field(0.0, ge=0, lt=1, description="training: brightness and contrast scaled by 1 +- this")


class OutputConfig(StrictModel):
    dir: str = Field("runs", description="root folder of run folders")
    name: str | None = Field(None, description="run folder name under output.dir, a plain folder name without '/' "
                             "or '..' (default: <task>-<model>-<method>-<time>)")
    save_checkpoints: bool = Field(True, description="write a resumable checkpoint at each evaluation")

    _plain_name = field_validator("name")(plain_name)


class RunConfig(StrictModel):
    task: Literal["text-classification", "causal-lm", "image-classification"] = Field(..., description="what the model learns to do")
    model: ModelConfig
    data: DataConfig
    method: MethodConfig = Field(default_factory=LoraConfig, description="PEFT method and its options")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    image: ImageConfig = Field(default_factory=ImageConfig, description="image-classification: preprocessing and augmentation")
    output: OutputConfig = Field(default_factory=OutputConfig)
    track: TrackConfig = Field(default_factory=TrackConfig, description="run index, energy / CO2, MLflow / TensorBoard")
    sweep: SweepConfig | None = Field(None, description="hyperparameter search space and budget for `slimtune sweep` "
                                      "(ignored by `slimtune run`)")

    @field_validator("model", mode="before")
    @classmethod
    def _model_as_name(cls, v):
        return model_section(v)

    @field_validator("method", mode="before")
    @classmethod
    def _default_method_name(cls, v):
        if isinstance(v, dict) and "name" not in v:
            return {"name": "lora", **v}  # `method: {r: 16}` means LoRA
        return v

    @model_validator(mode="after")
    def _method_default_lr(self):
        """No `train.lr` in the config: the method's own default (methods/*.py `default_lr`)."""
        if "lr" not in self.train.model_fields_set:
            from .methods import REGISTRY

            lr = REGISTRY[self.method.name].default_lr
            if lr is not None:
                self.train.lr = lr
                # filled in, not given: `lr` stays out of the fields the user set, so a dump with exclude_unset
                # (a sweep's base config) does not carry this method's rate into a trial of another method
                self.train.model_fields_set.discard("lr")
        return self

    @model_validator(mode="after")
    def _check_metrics(self):
        from .tasks import task_metrics

        known = task_metrics(self.task)
        for m in self.eval.metrics or []:
            if m not in known:
                raise ValueError(f"eval.metrics: {m!r} is not a metric of task {self.task!r}; accepted: {', '.join(known)}")
        if self.eval.monitor is not None and self.eval.monitor not in known:
            raise ValueError(f"eval.monitor: {self.eval.monitor!r} is not a metric of task {self.task!r}; accepted: {', '.join(known)}")
        for key in ("prune_on", "prune_tiebreak"):
            m = getattr(self.sweep, key) if self.sweep is not None else None
            if m is not None and m not in known:
                raise ValueError(f"sweep.{key}: {m!r} is not a metric of task {self.task!r}; accepted: {', '.join(known)}")
        return self

    # resolved defaults ---------------------------------------------------
    @property
    def monitor(self) -> str:
        return self.eval.monitor or ("accuracy" if self.task in ("text-classification", "image-classification") else "loss")

    @property
    def higher_is_better(self) -> bool:
        if self.eval.mode != "auto":
            return self.eval.mode == "max"
        return metric_higher_is_better(self.monitor)


def model_section(value):
    """`model: org/name`, as other trainers' configs write it, is `model: {name: org/name}`."""
    return {"name": value} if isinstance(value, str) else value


def metric_higher_is_better(metric: str) -> bool:
    return metric not in ("loss", "perplexity")


# -- loading -----------------------------------------------------------------

def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value (for example train.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}; use dotted names such as method.r")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} holds {nxt!r}, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = _loc_str(e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _section_model(e["loc"][:-1])
            accepted = ", ".join(parent.model_fields) if parent else "see `slimtune schema`"
            lines.append(f"  {loc}: unknown key (value {e['input']!r}); accepted keys here: {accepted}")
        elif e["type"] == "union_tag_invalid":
            from .methods import REGISTRY

            lines.append(f"  {loc}.name: {e['ctx']['tag']!r} is not a method; accepted: {', '.join(repr(n) for n in REGISTRY)}")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], dict):
                lines.append(f"  {loc}: {e['input']!r} is not accepted: {msg}")
            else:
                lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def _loc_str(loc) -> str:
    """'method.r', dropping the union tag pydantic inserts after 'method'."""
    from .methods import REGISTRY

    parts = list(loc)
    if len(parts) > 1 and parts[0] == "method" and parts[1] in REGISTRY:
        del parts[1]
    return ".".join(str(x) for x in parts)


def _section_model(loc) -> type | None:
    """The pydantic model of the section that `loc` points into."""
    from .methods import REGISTRY

    parts = [p for p in loc if isinstance(p, str)]
    if parts and parts[0] == "method":
        name = parts[1] if len(parts) > 1 and parts[1] in REGISTRY else "lora"
        return REGISTRY[name].config
    if parts and parts[0] == "sweep":  # sweep, or one parameter of its space (sweep.params.<dotted key>)
        from .sweep.space import ParamSpec, SweepConfig

        return ParamSpec if len(parts) == 3 and parts[1] == "params" else SweepConfig if len(parts) == 1 else None
    model: Any = RunConfig
    for part in parts:
        field = model.model_fields.get(part)
        if field is None or not hasattr(field.annotation, "model_fields"):
            return None
        model = field.annotation
    return model


def config_from_dict(data: dict, source: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (task, model, data, ...), got {type(data).__name__}")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None
    if cfg.sweep is not None:  # every swept key and value against the schema, before any compute
        from .sweep.space import check_space

        check_space(cfg, source)
    return cfg


def load_config(path: str | Path | dict | RunConfig, overrides: list[str] | None = None) -> RunConfig:
    """A validated RunConfig from a YAML path, a dict or a RunConfig, with dotted overrides applied."""
    if isinstance(path, RunConfig):  # the keys set, not the filled-in defaults (a method's lr), which reload the same
        data, source = path.model_dump(mode="json", exclude_unset=True), "config"
    elif isinstance(path, dict):
        data, source = path, "config"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        source = str(p)
    if overrides:
        if isinstance(data, dict) and isinstance(data.get("model"), str):  # so that model.max_length=64 finds a section
            data = {**data, "model": model_section(data["model"])}
        data = apply_overrides(data, overrides)
    return config_from_dict(data, source)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
