"""Single-label image classification: transformers' image classifiers (AutoModelForImageClassification:
ViT, DeiT, ConvNeXt, ResNet, EfficientNet, MobileNet, Swin, ...) or a user's factory model.

Examples keep a reference to their image (path / array index / table row), never the pixels;
the collate functions decode and transform a batch at a time: `collate` at the final size
(evaluation), `train_collate` with the augmentations and the current size of progressive
resizing (set by train/transfer.py's ProgressiveResize).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..data.images import check_images, load_image, read_images
from ..data.readers import DataError
from ..data.splits import split_indices
from ..data.transforms import PROCESSOR_FILE, Augment, ImageSpec, save as save_spec, spec_from_processor_config, to_array
from ..data.validate import DataReport, check_class_sizes, check_unseen_labels, imbalance_warning, require_nonempty
from .common import Splits, accuracy, macro_f1
from .text_classification import confusion_matrix  # noqa: F401  (the run report reads it from the task)

TOPK = (2, 3, 5)
METRICS = ("accuracy", "macro_f1", "loss") + tuple(f"top{k}_accuracy" for k in TOPK)
DEFAULT_METRICS = ("accuracy", "macro_f1", "loss")
PEFT_TASK_TYPE = None  # peft's plain PeftModel: the model's own forward (pixel_values, labels)
THROUGHPUT_UNIT = "samples"
# no fast new head here (train.head_lr defaults to train.lr): on Fashion-MNIST with EfficientNet-Lite0
# (pooled features of order 1) the 10x head cost 1.3 points at a fixed size and 4.5 with progressive
# resizing (2 seeds; benchmarks/RESULTS.md, bench_vision)
FAST_NEW_HEAD = False


# -- data --------------------------------------------------------------------

def _read(cfg, source: str, split: str, report: DataReport):
    d = cfg.data
    table = read_images(source, d.image_column, d.label_column)
    require_nonempty(table, split, source)
    if d.label_names:
        table.labels = [_named(y, d.label_names, source) for y in table.labels]
    return check_images(table, split, d.bad_images, report)


def _named(y: str, names: list[str], source: str) -> str:
    """Integer labels (idx / npz files) -> data.label_names."""
    if y.isdigit() and int(y) < len(names):
        return names[int(y)]
    if y in names:
        return y
    raise DataError(f"{source}: label {y!r} is neither an index into data.label_names ({len(names)} names) nor one of them")


def load_data(cfg) -> Splits:
    d = cfg.data
    report = DataReport()
    train = _read(cfg, d.train, "train", report)
    sources = {"train": d.train}
    if d.eval:
        ev = _read(cfg, d.eval, "eval", report)
        sources["eval"] = d.eval
    else:
        check_class_sizes(train.labels, f"{d.train} (labels)", d.min_class_examples)
        if len(train) < 2:
            from .common import raise_small

            raise_small(d.train, len(train))
        tr, evi = split_indices(len(train), d.eval_fraction, d.split_seed, train.labels)
        train, ev = train.select(tr), train.select(evi)
        sources["eval"] = f"{d.eval_fraction:.0%} of {d.train} (seed {d.split_seed})"
        report.stats["eval_carved_out"] = True
    test = None
    if d.test:
        test = _read(cfg, d.test, "test", report)
        sources["test"] = d.test
    for name, t in (("eval", ev), ("test", test)):
        if t is not None:
            check_unseen_labels(train.labels, t.labels, sources[name], d.label_column)
    if d.max_train_samples and len(train) > d.max_train_samples:
        train = train.shuffle(d.split_seed).select(range(d.max_train_samples))
    if d.max_eval_samples and len(ev) > d.max_eval_samples:
        ev = ev.shuffle(d.split_seed).select(range(d.max_eval_samples))
    labels = sorted(set(train.labels), key=lambda x: (len(x), x) if x.isdigit() else (1 << 30, x))
    if d.label_names:
        labels = [n for n in d.label_names if n in set(train.labels)]
    if len(labels) < 2:
        raise DataError(f"{d.train}: a single label {labels[0]!r}; classification needs at least 2")
    imbalance_warning(report, train.labels)
    return Splits(train, ev, test, report, meta={"labels": labels}, sources=sources)


def read_eval(cfg, source: str):
    """`slimtune eval`: the data file as a table (the checks run in check_eval_data)."""
    return read_images(source, cfg.data.image_column, cfg.data.label_column)


def check_eval_data(cfg, splits: Splits) -> None:
    src = splits.sources["test"]
    t = splits.test
    require_nonempty(t, "eval", src)
    if cfg.data.label_names:
        t.labels = [_named(y, cfg.data.label_names, src) for y in t.labels]
    splits.test = check_images(t, "eval", cfg.data.bad_images, splits.report)
    check_unseen_labels(splits.meta["labels"], splits.test.labels, src, cfg.data.label_column)


# -- model and preprocessing -----------------------------------------------

class ImageProcessor:
    """What a tokenizer is for text: the model's preprocessing (`spec`) and the current
    progressive-resizing size (`state`, written by the callback, read by train_collate)."""

    pad_token_id = None

    def __init__(self, spec: ImageSpec, seed: int = 0):
        self.spec = spec
        self.state: dict = {}
        self.seed = seed
        self.notes: list[str] = []  # what the model's preprocessing did not say (featurize puts it in the report)

    def example_rng(self, epoch: int, index: int) -> random.Random:
        """The augmentation draws of one example in one epoch: a function of (seed, epoch, index) only,
        so a resumed run (or another process, or a DataLoader worker) draws exactly the same crops and
        flips without any RNG state in the checkpoint."""
        return random.Random(f"{self.seed}:{epoch}:{index}")

    def save_pretrained(self, folder: str) -> None:
        save_spec(self.spec, folder)


def load_processor(cfg, source) -> ImageProcessor:
    """The spec from the model's preprocessor_config.json (a factory: the `image_size`, `image_mean`,
    `image_std` attributes of the factory function), then the config's `image:` keys on top. What neither
    gives falls back to 224 px and ImageNet normalisation, said in `notes` (the data report), since
    weights trained at another size or normalisation lose accuracy silently."""
    base, missing = _model_preprocessing(cfg, source)
    im = cfg.image
    over = {"size": im.size, "mean": tuple(im.mean) if im.mean else None, "std": tuple(im.std) if im.std else None,
            "crop_pct": im.crop_pct, "resample": im.resample}
    base.update({k: v for k, v in over.items() if v is not None})
    base["augment"] = Augment(hflip=im.hflip, random_crop=im.random_crop, rotate=im.rotate, color_jitter=im.color_jitter)
    spec = ImageSpec(**{k: v for k, v in base.items() if k in ImageSpec.__dataclass_fields__})
    processor = ImageProcessor(spec, cfg.train.seed)
    defaulted = [k for k in ("size", "mean", "std") if k not in base]
    if missing and defaulted:
        used = {"size": f"size {spec.size}", "mean": "ImageNet mean", "std": "ImageNet std"}
        processor.notes.append(f"{missing}; using the defaults {', '.join(used[k] for k in defaulted)}: set "
                               f"{', '.join('image.' + k for k in defaulted)} to what the weights were trained with")
    return processor


def _model_preprocessing(cfg, source) -> tuple[dict, str | None]:
    """(spec keys the model itself gives, what was missing in words or None). A preprocessor file that is
    absent (from the folder, the Hub repository, or the offline cache) is missing; any other failure
    (gated repository, network error, unreadable file) is an error, as loading the model would be."""
    from ..models.sources import ModelError

    if source.origin == "factory":
        from ..models.factory import _import

        fn = _import(source.path)
        attrs = {"size": "image_size", "mean": "image_mean", "std": "image_std"}
        base = {k: getattr(fn, a) for k, a in attrs.items() if getattr(fn, a, None) is not None}
        unset = [a for k, a in attrs.items() if k not in base]
        return base, (f"model.factory {source.path!r} sets no {', '.join(unset)}" if unset else None)
    folder = Path(source.path)
    if folder.is_dir():
        file = folder / PROCESSOR_FILE
        if not file.is_file():
            return {}, f"model {cfg.model.name or source.path!r}: no {PROCESSOR_FILE} in {folder}"
    else:  # a Hub id: the cached (or downloaded) file
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            file = Path(hf_hub_download(source.path, PROCESSOR_FILE, revision=cfg.model.revision))
        except LocalEntryNotFoundError:  # before EntryNotFoundError: it is one
            return {}, f"model {source.path!r}: {PROCESSOR_FILE} is not in the local Hub cache and the Hub cannot be reached"
        except EntryNotFoundError:
            return {}, f"model {source.path!r}: the repository has no {PROCESSOR_FILE}"
        except Exception as e:
            raise ModelError(f"model {source.path!r}: cannot fetch its {PROCESSOR_FILE}: {type(e).__name__}: {e}") from None
    try:
        return spec_from_processor_config(file), None
    except (OSError, ValueError, TypeError) as e:  # not JSON, or JSON of another shape
        raise ModelError(f"{file}: cannot read the model's preprocessing: {type(e).__name__}: {e}") from None


def _frozen_batchnorm(model) -> None:
    """BatchNorm keeps the pretrained running statistics during fine-tuning: the saved adapter (which
    holds trained parameters, not buffers) then determines the model completely, and the eval metrics
    seen in training are those of the reloaded model."""
    def keep_eval(module, args):
        module.training = False

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(keep_eval)


def _interpolate_positions(model) -> None:
    """ViT-style models: position embeddings interpolated when the image size differs from the
    pretraining size (progressive resizing, image.size); the default forward would refuse."""
    import inspect

    if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
        def add_kwarg(module, args, kwargs):
            kwargs.setdefault("interpolate_pos_encoding", True)
            return args, kwargs

        model.register_forward_pre_hook(add_kwarg, with_kwargs=True)


def load_model(cfg, source, splits, **load_kwargs):
    labels = splits.meta["labels"]
    if source.origin == "factory":
        from ..models.factory import build

        model, head = build(source.path, len(labels), labels, cfg.model.factory_args)
    else:
        from transformers import AutoModelForImageClassification

        from ..models import load_pretrained

        model, new_modules = load_pretrained(
            AutoModelForImageClassification, source, cfg.model.trust_remote_code, cfg.model.revision,
            num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
            ignore_mismatched_sizes=True,  # an ImageNet head (1000 classes) is replaced by one sized to the labels
            **load_kwargs,
        )
        head = sorted({m.split(".")[0] for m in new_modules} | ({"classifier"} if hasattr(model, "classifier") else set()))
        _interpolate_positions(model)
    _frozen_batchnorm(model)
    return model, head


# -- features and batches ----------------------------------------------------

def featurize(cfg, processor, splits: Splits):
    for note in getattr(processor, "notes", ()):
        splits.report.warn(note)
    label_id = {l: i for i, l in enumerate(splits.meta["labels"])}
    out = {}
    for name, t in splits.present():
        out[name] = [{"image": r, "labels": label_id.get(y, -1), "length": 1, "index": i}
                     for i, (r, y) in enumerate(zip(t.refs, t.labels))]
    return out


def _batch(examples, processor, size, train, epoch=0):
    spec = processor.spec
    x = np.stack([to_array(load_image(e["image"]), spec, size, train, processor.example_rng(epoch, e["index"]) if train else None)
                  for e in examples])
    return {"pixel_values": torch.from_numpy(x), "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long)}


def collate(processor):
    """Evaluation batches: the final size, no augmentation."""
    return lambda examples: _batch(examples, processor, processor.spec.size, False)


def train_collate(processor, holder: dict | None = None):
    """Training batches: augmentations, and the current size of progressive resizing (holder['size'],
    set by train/transfer.py's ProgressiveResize)."""
    holder = processor.state if holder is None else holder
    # holder["epoch"]: written by the batch sampler's set_epoch (api.run), so augmentations differ per epoch
    return lambda examples: _batch(examples, processor, holder.get("size") or processor.spec.size, True,
                                   holder.get("epoch", 0))


def count(batch) -> tuple[int, int]:
    n = batch["pixel_values"].shape[0]
    return n, n  # one "token" per image: throughput in images/s


def eval_step(model, batch) -> dict:
    out = model(**batch)
    logits = out.logits.float()
    gold = batch["labels"]
    loss = torch.nn.functional.cross_entropy(logits, gold, reduction="none")
    # rank of the gold class among the logits (0 = predicted): top-k accuracy for any k
    rank = (logits > logits.gather(1, gold.clamp(min=0)[:, None])).sum(1)
    return {"pred": logits.argmax(-1), "gold": gold, "loss": loss, "gold_rank": rank}


def compute_metrics(parts: dict, wanted, num_labels: int) -> dict:
    pred, gold = parts["pred"].cpu().numpy(), parts["gold"].cpu().numpy()
    all_metrics = {
        "accuracy": lambda: accuracy(pred, gold),
        "macro_f1": lambda: macro_f1(pred, gold, num_labels),
        "loss": lambda: float(parts["loss"].float().mean()),
    }
    for k in TOPK:
        all_metrics[f"top{k}_accuracy"] = (lambda k=k: float((parts["gold_rank"] < k).float().mean()))
    return {m: all_metrics[m]() for m in wanted}


@torch.inference_mode()
def predict(model, processor, paths: list[str], meta: dict, batch_size: int = 32, **_):
    labels = meta["labels"]
    model.eval()
    device = next(model.parameters()).device
    results = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        for p in chunk:
            if not Path(p).is_file():
                raise FileNotFoundError(f"{p}: image file not found")
        x = np.stack([to_array(load_image(str(p)), processor.spec, processor.spec.size) for p in chunk])
        probs = model(pixel_values=torch.from_numpy(x).to(device)).logits.float().softmax(-1).cpu().numpy()
        for p, pr in zip(chunk, probs):
            order = np.argsort(-pr)
            results.append({"image": str(p), "label": labels[int(order[0])], "score": float(pr[order[0]]),
                            "probabilities": {labels[int(j)]: float(pr[j]) for j in order}})
    return results
