"""The sections of the run config (model, data, train, eval, image, output): typed, with one help text per key.

The field descriptions are the reference documentation (`slimtune schema` prints them); measurements behind a
default are in benchmarks/RESULTS.md, not here.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..schema import StrictModel, plain_name


def is_factory_spec(name: str) -> bool:
    """Whether a model string is a factory ('package.module:function' or 'path/file.py:function') rather than a Hub
    id, folder or .gguf file (none of which has a ':' followed by a Python name; a Windows drive's 'C:\\' is not)."""
    where, sep, fn = name.rpartition(":")
    return bool(sep and where and fn.isidentifier()
                and (where.endswith(".py") or all(part.isidentifier() for part in where.split("."))))


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
    gguf_file: str | None = Field(None, description="GGUF file name inside the folder `name` (or give the file path as "
        "`name`)")
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
    label_column: str = Field("label", description="column with the class label (text- and image-classification) "
                              "or the float target (regression)")
    target_columns: list[str] | None = Field(
        None, min_length=1, description="regression with several targets: the columns of float targets, one model "
        "output each (metrics are averaged over them); default: data.label_column as the one target")
    label_separator: str | None = Field(
        None, min_length=1, description="multi-label-classification: data.label_column holds each row's labels as "
        "one text split at this string, e.g. ',' ('billing, refund'); each label is stripped of whitespace and an "
        "empty cell is a row with no labels. Not needed for lists (JSONL / Parquet)")
    label_columns: list[str] | None = Field(
        None, min_length=1, description="multi-label-classification: one column per label holding 1 (the row has "
        "it) or 0, instead of data.label_column; the column names are the labels, in this order")

    @model_validator(mode="after")
    def _one_label_layout(self):
        cols = self.label_columns
        if cols is None:
            return self
        if self.label_separator is not None:
            raise ValueError("data.label_columns and data.label_separator: 0/1 label columns hold no text to split; "
                             "give one of them")
        if "label_column" in self.model_fields_set:
            raise ValueError("data.label_column and data.label_columns: give one (label_column: one column holding "
                             "each row's labels; label_columns: one 0/1 column per label)")
        twice = sorted({c for c in cols if cols.count(c) > 1})
        texts = [c for c in cols if c in (self.text_column, self.text_pair_column)]
        if twice or texts:
            raise ValueError(f"data.label_columns: {(twice or texts)[0]!r} "
                             + ("is listed twice" if twice else "is also the text column"))
        return self

    @field_validator("target_columns")
    @classmethod
    def _distinct_targets(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"names a column twice: {v}; give each target column once")
        return v

    image_column: str = Field("image", description="image-classification: column with image paths (relative to the "
                              "file's folder) or a `datasets` image column")
    bad_images: Literal["fail", "skip"] = Field("fail", description="unreadable or truncated images: fail naming them, "
                                                "or skip them with a count in the data report")
    label_names: list[str] | None = Field(None, description="names of integer labels 0..N-1 (idx / npz files), e.g. "
                                          "Fashion-MNIST's classes")
    format: Literal["auto", "text", "chat", "sharegpt", "alpaca", "instruction"] = Field(
        "auto",
        description="causal-lm record format: 'text' (plain text, packed into blocks), 'chat' (a list of messages "
        "per record: OpenAI {role, content} or ShareGPT {from, value}; a 'tools' column goes to the template), "
        "'sharegpt' (chat with ShareGPT's {from, value} required), 'alpaca' (instruction / input / output "
        "columns), 'instruction' (prompt and response columns, or prompt / completion; strings or message lists); "
        "'auto' picks from the columns. A 'system' column is the system prompt of alpaca / instruction records",
    )
    messages_column: str = Field("messages", description="column with chat messages (format: chat / sharegpt; "
                                 "a 'conversations' column is used when this one is absent)")
    prompt_column: str = Field("prompt", description="column with the instruction (format: instruction)")
    response_column: str = Field("response", description="column with the response (format: instruction; a "
                                 "'completion' column is used when this one is absent)")
    train_on_prompt: bool = Field(False, description="causal-lm: also compute the loss on prompt / user tokens")
    packing: bool | Literal["split"] = Field(
        False, description="causal-lm training: false: one example per row, padded; true: examples (truncated to "
        "model.max_length) packed into rows of up to max_length tokens by best-fit decreasing, attention kept inside "
        "each example; 'split': as true, but an example longer than max_length is cut into max_length chunks packed "
        "separately instead of truncated. Evaluation batches are never packed")
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="share of train carved out for eval when eval is "
        "absent")
    split_seed: int = Field(0, description="seed of the train/eval split")
    max_train_samples: int | None = Field(None, ge=1, description="use only this many training examples "
        "(seeded sample)")
    max_eval_samples: int | None = Field(None, ge=1, description="use only this many eval examples")
    min_class_examples: int = Field(2, ge=1, description="a class with fewer examples than this cannot be split and "
        "fails validation")
    tokens_column: str = Field("tokens", description="token-classification (JSONL / Parquet / datasets): column with "
                               "each sentence's words, a list of strings")
    tags_column: str = Field("tags", description="token-classification (JSONL / Parquet / datasets): column with one "
                             "tag per word ('B-PER', 'O', ...), a list as long as the words; integer tags are named by "
                             "the dataset's ClassLabel names or data.label_names")
    tag_scheme: Literal["auto", "BIO", "BIOES", "IOB1"] = Field(
        "auto", description="token-classification tags: 'BIO' (B- begins an entity, I- continues it), 'BIOES' (also "
        "E- ends one, S- is a one-word entity), 'IOB1' (CoNLL-2003's original files: I- begins an entity unless it "
        "follows one of its type; converted to BIO); 'auto': BIOES when the training tags hold E- or S-, else BIO")
    conll: bool = Field(False, description="token-classification: read every data file as CoNLL columns (one word "
                        "per line, a blank line between sentences) whatever its extension, e.g. .txt; "
                        ".conll / .iob / .bio files always are")
    conll_token_column: int = Field(0, description="CoNLL files: the column holding the word (0 = first; negative "
                                    "counts from the end)")
    conll_tag_column: int = Field(-1, description="CoNLL files: the column holding the tag (-1 = last)")


class EarlyStoppingConfig(StrictModel):
    patience: int | None = Field(None, ge=1, description="stop after this many evaluations without improvement (off "
        "when null)")
    min_delta: float = Field(0.0, ge=0.0, description="smallest change of the monitored metric that counts as "
        "improvement")


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
    epochs: float = Field(3.0, gt=0, description="number of passes over the training data (ignored when max_steps is "
        "set)")
    max_steps: int | None = Field(None, ge=1, description="number of optimizer steps; overrides epochs")
    batch_size: int = Field(16, ge=1, description="examples per device per forward pass")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimizer step")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW); when not set, the method's default: for "
                      "the LoRA family 2e-3 (5e-4 for causal-lm), larger for vector / probe methods, smaller for full "
                      "fine-tuning (README, Methods)")
    schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="learning-rate decay after warmup")
    warmup: float = Field(0.06, ge=0, description="warmup: a fraction of all steps if < 1, else a number of steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and norms)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm (off when null)")
    seed: int = Field(42, description="seed for initialisation, data order and dropout")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="'auto': bf16 autocast where the hardware supports it (CUDA with bf16, CPUs with "
            "AVX512-BF16/AMX), else fp32"
    )
    group_by_length: bool = Field(True, description="batch examples of similar length together (less padding)")
    spread_duplicates: bool = Field(
        True, description="with group_by_length: copies of one example (same tokens and labels) go to different "
            "batches "
        "(sorting by length would put them side by side); swaps with the nearest batch, so padding grows only where "
        "there are copies")
    fast_dropout: bool = Field(
        True, description="CPU training: dropout masks from 16-bit random slices (same p and distribution, exact "
        "resume, faster steps; measurements: benchmarks/RESULTS.md), the attention probabilities' dropout included "
        "where the model's attention runs on transformers' sdpa; no effect on GPUs; false: torch's dropout")
    scored_logits_only: bool = Field(
        True, description="causal LM: project to the vocabulary only the positions whose next token is scored "
        "(responses of chat / instruction data): same loss, less compute")
    pooled_position_only: bool = Field(
        True, description="sequence classifiers that read the first token (BERT, RoBERTa, XLM-R, ELECTRA): the last "
        "block computes what follows its self-attention at that position only (same logits, less compute; "
        "models/pooled.py); false: at every position")
    loss_tokens: Literal["epoch", "batch"] = Field(
        "epoch", description="causal LM: divide a batch's summed token loss by the mean number of scored tokens per "
        "batch over the epoch ('epoch': every token weighs the same whatever batch it lands in, which length-grouped "
        "batches need) or by its own count ('batch': the per-batch mean most trainers use)")
    gradient_checkpointing: bool | Literal["offload"] = Field(
        False, description="recompute the transformer blocks' activations in the backward pass instead of keeping "
        "them (less memory, slower steps; measurements: benchmarks/RESULTS.md); 'offload': also keep each block's "
        "input in host memory (CUDA only)")
    loss: Literal["auto", "mse", "huber"] = Field(
        "auto", description="training loss where the task offers a choice: 'auto' is the task's own (cross-entropy "
        "for classifiers, mse for regression); regression: 'mse' or 'huber' on the standardised targets")
    huber_delta: float = Field(1.0, gt=0, description="train.loss=huber: where the loss turns from squared to "
                               "linear, in standard deviations of the target")
    log_every: int = Field(10, ge=1, description="log training loss / lr / throughput every N optimizer steps")
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig,
                                                description="stop when eval.monitor stops improving")
    # transfer-learning techniques (train/groups.py, train/transfer.py)
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="layer-wise lr decay (BEiT / ELECTRA): the head gets lr, each group below d "
        "times the one above; off by default (measurements: benchmarks/RESULTS.md)")
    lr_ratio_min: float | None = Field(
        None, gt=0, le=1, description="discriminative learning rates (fastai slice(lo, hi)): geometric from "
        "lr*lr_ratio_min (embeddings) to lr (head); off by default (measurements: benchmarks/RESULTS.md)")
    head_lr: float | None = Field(
        None, gt=0, description="the head's own learning rate; default: 10x train.lr (at most 2e-2) for a new "
        "text-classification head, else train.lr (measurements: benchmarks/RESULTS.md); train.lr: one rate")
    unfreeze: UnfreezeConfig | None = Field(
        None, description="gradual unfreezing (ULMFiT); off when null, the default (measurements: "
            "benchmarks/RESULTS.md)")
    strategy: Literal["standard", "staged"] = Field(
        "standard", description="'staged': the head alone first (train.staged), then everything the method trains, "
        "each stage with its own warmup and decay (fastai fine_tune; measurements: benchmarks/RESULTS.md)")
    staged: StagedConfig = Field(default_factory=lambda: StagedConfig(),
                                 description="train.strategy=staged: the head-only first stage")
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


GENERATION_METRICS = ("chrf", "bleu", "rouge_l", "exact_match")


class GenerateConfig(StrictModel):
    examples: int = Field(64, ge=1, description="eval records whose last assistant reply is generated (the first N "
                          "of the eval split)")
    max_new_tokens: int = Field(128, ge=1, description="tokens generated per reply at most")
    metrics: list[Literal["chrf", "bleu", "rouge_l", "exact_match"]] = Field(
        ["chrf", "rouge_l", "exact_match"], description="scores of each reply against the reference: chrf and bleu "
        "(sacrebleu, corpus level), rouge_l (rouge-score F1, mean), exact_match (after lower-casing and removing "
        "punctuation, articles and extra spaces); they go into the eval metrics as gen_<name>")
    every: Literal["eval", "end"] = Field("end", description="eval: at every evaluation (eval.monitor may then be "
                                          "a gen_ metric); end: once, with the best checkpoint")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    batch_size: int = Field(8, ge=1, description="prompts generated together (left-padded, with the KV cache)")


class EvalConfig(StrictModel):
    every_steps: int | None = Field(None, ge=1, description="evaluate every N optimizer steps (overrides every_epochs)")
    every_epochs: float = Field(1.0, gt=0, description="evaluate every this fraction (or multiple) of an epoch")
    metrics: list[str] | None = Field(None, description="metrics to compute; default: accuracy, macro_f1 "
        "(classification), loss, perplexity (causal-lm), rmse, mae, r2, pearson, spearman (regression)")
    monitor: str | None = Field(None, description="metric that selects the best checkpoint and drives early stopping; "
        "default accuracy / loss / rmse (regression)")
    mode: Literal["auto", "max", "min"] = Field("auto", description="whether a higher monitored value is better; auto: "
        "min for loss/perplexity, rmse/mae")
    batch_size: int | None = Field(None, ge=1, description="eval batch size (default 2x train batch size)")
    generate: GenerateConfig | None = Field(None, description="causal-lm chat / instruction data: generate replies "
                                            "for eval records and score them against the references "
                                            "(generations.jsonl, the report's samples table)")


class ImageConfig(StrictModel):
    size: int | None = Field(None, ge=8, description="final image size (square; default: the model's preprocessor "
        "config, else 224)")
    mean: list[float] | None = Field(None, description="normalisation mean per channel (default: the model's "
        "preprocessor config, else ImageNet)")
    std: list[float] | None = Field(None, description="normalisation std per channel (default: as mean)")
    crop_pct: float | None = Field(None, gt=0, le=1, description="evaluation: resize to size / crop_pct, then "
        "centre-crop (default 1.0: resize only)")
    resample: Literal["nearest", "bilinear", "bicubic"] | None = Field(None, description="resize filter (default "
        "bilinear)")
    hflip: bool = Field(False, description="training: random horizontal flips")
    random_crop: float | None = Field(None, gt=0, le=1, description="training: random resized crop with at least this "
        "share of the area")
    rotate: float = Field(0.0, ge=0, le=180, description="training: random rotation up to +- this many degrees")
    color_jitter: float = Field(0.0, ge=0, lt=1, description="training: brightness and contrast scaled by 1 +- this")


class OutputConfig(StrictModel):
    dir: str = Field("runs", description="root folder of run folders")
    name: str | None = Field(None, description="run folder name under output.dir, a plain folder name without '/' "
                             "or '..' (default: <task>-<model>-<method>-<time>)")
    save_checkpoints: bool = Field(True, description="write a resumable checkpoint at each evaluation")

    _plain_name = field_validator("name")(plain_name)
