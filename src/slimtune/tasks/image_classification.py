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
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..data.batching import BatchShape
from ..data.images import ImageTable, check_images, load_image, read_images
from ..data.readers import DataError
from ..data.transforms import PROCESSOR_FILE, Augment, ImageSpec, spec_from_processor_config, to_array
from ..data.transforms import save as save_spec
from ..data.validate import DataReport, check_unseen_labels, imbalance_warning, require_nonempty
from ..errors import InputNotFound
from . import TASKS
from .base import Batch, Example, LoadedModel
from .common import Classification, Splits, gather_splits, label_order, limit_samples, ranked_labels

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..models.sources import ModelSource


# -- data --------------------------------------------------------------------

def _read(cfg: RunConfig, source: str, split: str, report: DataReport) -> ImageTable:
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
    raise DataError(f"{source}: label {y!r} is neither an index into data.label_names ({len(names)} names) "
                    "nor one of them")


# -- model and preprocessing -----------------------------------------------

class ImageProcessor:
    """What a tokenizer is for text: the model's preprocessing (`spec`) and the shape of the training batches
    (`shape`: train_collate's default, where no run's schedule gives one)."""

    pad_token_id = None

    def __init__(self, spec: ImageSpec, seed: int = 0):
        self.spec = spec
        self.shape = BatchShape()
        self.seed = seed
        self.notes: list[str] = []  # what the model's preprocessing did not say (featurize puts it in the report)

    def example_rng(self, epoch: int, index: int) -> random.Random:
        """The augmentation draws of one example in one epoch: a function of (seed, epoch, index) only,
        so a resumed run (or another process, or a DataLoader worker) draws exactly the same crops and
        flips without any RNG state in the checkpoint."""
        return random.Random(f"{self.seed}:{epoch}:{index}")

    def save_pretrained(self, folder: str) -> None:
        save_spec(self.spec, folder)


def _model_preprocessing(cfg: RunConfig, source: ModelSource) -> tuple[dict, str | None]:
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
            return {}, (f"model {source.path!r}: {PROCESSOR_FILE} is not in the local Hub cache and the Hub cannot "
                        "be reached")
        except EntryNotFoundError:
            return {}, f"model {source.path!r}: the repository has no {PROCESSOR_FILE}"
        except Exception as e:
            raise ModelError(f"model {source.path!r}: cannot fetch its {PROCESSOR_FILE}: "
                             f"{type(e).__name__}: {e}") from None
    try:
        return spec_from_processor_config(file), None
    except (OSError, ValueError, TypeError) as e:  # not JSON, or JSON of another shape
        raise ModelError(f"{file}: cannot read the model's preprocessing: {type(e).__name__}: {e}") from None


def _frozen_batchnorm(model: torch.nn.Module) -> None:
    """BatchNorm keeps the pretrained running statistics during fine-tuning: the saved adapter (which
    holds trained parameters, not buffers) then determines the model completely, and the eval metrics
    seen in training are those of the reloaded model."""
    def keep_eval(module, args):
        module.training = False

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(keep_eval)


def _interpolate_positions(model: torch.nn.Module) -> None:
    """ViT-style models: position embeddings interpolated when the image size differs from the
    pretraining size (progressive resizing, image.size); the default forward would refuse."""
    import inspect

    if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
        def add_kwarg(module, args, kwargs):
            kwargs.setdefault("interpolate_pos_encoding", True)
            return args, kwargs

        model.register_forward_pre_hook(add_kwarg, with_kwargs=True)


def default_image_size(source: ModelSource, config: Any) -> int:
    """The side a model in a folder is fed at when nothing says otherwise (`slimtune inspect`): its
    preprocessor_config.json's size (what training resizes to), else its config's image_size, else the size
    training falls back to (ImageSpec's default)."""
    try:
        size = spec_from_processor_config(source.path).get("size") if Path(source.path).is_dir() else None
    except (OSError, ValueError, TypeError):  # an unreadable file: training says so; the estimate falls back
        size = None
    size = size or getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else ImageSpec.__dataclass_fields__["size"].default


def adapt_loaded(model: torch.nn.Module) -> None:
    """What training does to a transformers image classifier once it is built, and `slimtune inspect` to its
    meta-device copy (so the estimate runs the forward that training runs): ViT-style position embeddings
    interpolated for other image sizes, BatchNorm statistics frozen."""
    _interpolate_positions(model)
    _frozen_batchnorm(model)


# -- features and batches ----------------------------------------------------

def _batch(examples: list[Example], processor: ImageProcessor, size: int, train: bool, epoch: int = 0) -> Batch:
    spec = processor.spec
    x = np.stack([to_array(load_image(e["image"]), spec, size, train,
                           processor.example_rng(epoch, e["index"]) if train else None) for e in examples])
    return {"pixel_values": torch.from_numpy(x),
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long)}


class ImageClassification(Classification):
    spec = TASKS["image-classification"]
    top_k = (2, 3, 5)

    def load_data(self, cfg: RunConfig) -> Splits:
        d = cfg.data
        report = DataReport()
        splits = gather_splits(cfg, lambda source, split: _read(cfg, source, split, report), report,
                               lambda train: (train.labels, f"{d.train} (labels)"))
        for name in ("eval", "test"):
            table = getattr(splits, name)
            if table is not None:
                check_unseen_labels(splits.train.labels, table.labels, splits.sources[name], d.label_column)
        limit_samples(cfg, splits, splits.train.labels)
        labels = label_order(splits.train.labels, d.label_names)
        if len(labels) < 2:
            raise DataError(f"{d.train}: a single label {labels[0]!r}; classification needs at least 2")
        imbalance_warning(report, splits.train.labels)
        splits.meta["labels"] = labels
        return splits

    def check_eval_data(self, cfg: RunConfig, splits: Splits) -> None:
        src = splits.sources["test"]
        table = splits.test
        require_nonempty(table, "eval", src)
        if cfg.data.label_names:
            table.labels = [_named(y, cfg.data.label_names, src) for y in table.labels]
        splits.test = check_images(table, "eval", cfg.data.bad_images, splits.report)
        check_unseen_labels(splits.meta["labels"], splits.test.labels, src, cfg.data.label_column)

    def read_eval(self, cfg: RunConfig, source: str) -> ImageTable:
        return read_images(source, cfg.data.image_column, cfg.data.label_column)

    def load_processor(self, cfg: RunConfig, source: ModelSource) -> ImageProcessor:
        """The spec from the model's preprocessor_config.json (a factory: the `image_size`, `image_mean`,
        `image_std` attributes of the factory function), then the config's `image:` keys on top. What neither
        gives falls back to 224 px and ImageNet normalisation, said in `notes` (the data report), since
        weights trained at another size or normalisation lose accuracy silently."""
        base, missing = _model_preprocessing(cfg, source)
        im = cfg.image
        over = {"size": im.size, "mean": tuple(im.mean) if im.mean else None, "std": tuple(im.std) if im.std else None,
                "crop_pct": im.crop_pct, "resample": im.resample}
        base.update({k: v for k, v in over.items() if v is not None})
        base["augment"] = Augment(hflip=im.hflip, random_crop=im.random_crop, rotate=im.rotate,
                                  color_jitter=im.color_jitter)
        spec = ImageSpec(**{k: v for k, v in base.items() if k in ImageSpec.__dataclass_fields__})
        processor = ImageProcessor(spec, cfg.train.seed)
        defaulted = [k for k in ("size", "mean", "std") if k not in base]
        if missing and defaulted:
            used = {"size": f"size {spec.size}", "mean": "ImageNet mean", "std": "ImageNet std"}
            processor.notes.append(f"{missing}; using the defaults {', '.join(used[k] for k in defaulted)}: set "
                                   f"{', '.join('image.' + k for k in defaulted)} to what the weights were "
                                   "trained with")
        return processor

    def largest_input(self, cfg: RunConfig, source: ModelSource) -> int:
        """The final size, or a larger one progressive resizing trains at."""
        sizes = [size for _, size in cfg.train.image_size_schedule or []]
        return max([self.load_processor(cfg, source).spec.size, *sizes])

    def load_model(self, cfg: RunConfig, source: ModelSource, splits: Splits, **load_kwargs) -> LoadedModel:
        labels = splits.meta["labels"]
        if source.origin == "factory":
            from ..models.factory import build

            model, head = build(source.path, len(labels), labels, cfg.model.factory_args)
            head_is_new = True
            _frozen_batchnorm(model)
        else:
            from transformers import AutoModelForImageClassification

            from ..models import load_pretrained

            model, new_modules = load_pretrained(
                AutoModelForImageClassification, source, cfg.model.trust_remote_code, cfg.model.revision,
                num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={lab: i for i, lab in enumerate(labels)},
                ignore_mismatched_sizes=True,  # an ImageNet head (1000 classes) is replaced by one sized to the labels
                **load_kwargs,
            )
            own = {"classifier"} if hasattr(model, "classifier") else set()
            head = sorted({m.split(".")[0] for m in new_modules} | own)
            head_is_new = bool(new_modules)
            adapt_loaded(model)
        return LoadedModel(model, head, head_is_new)

    def featurize(self, cfg: RunConfig, processor: ImageProcessor, splits: Splits) -> dict[str, list[Example]]:
        for note in processor.notes:
            splits.report.warn(note)
        label_id = {lab: i for i, lab in enumerate(splits.meta["labels"])}
        return {name: [{"image": ref, "labels": label_id.get(y, -1), "length": 1, "index": i}
                       for i, (ref, y) in enumerate(zip(table.refs, table.labels))]
                for name, table in splits.present()}

    def collate(self, processor: ImageProcessor) -> Callable[[list[Example]], Batch]:
        """Evaluation batches: the final size, no augmentation."""
        return lambda examples: _batch(examples, processor, processor.spec.size, False)

    def train_collate(self, processor: ImageProcessor,
                      shape: BatchShape | None = None) -> Callable[[list[Example]], Batch]:
        """Training batches: augmentations drawn per epoch, at the current size of progressive resizing
        (shape.image_size, set by train/transfer.py's ProgressiveResize; shape.epoch by the batch sampler)."""
        shape = processor.shape if shape is None else shape
        return lambda examples: _batch(examples, processor, shape.image_size or processor.spec.size, True, shape.epoch)

    def count(self, batch: Batch) -> tuple[int, int]:
        n = batch["pixel_values"].shape[0]
        return n, n  # one "token" per image: throughput in images/s

    @torch.inference_mode()
    def predict(self, model: torch.nn.Module, processor: ImageProcessor, paths: list[str], meta: dict,
                batch_size: int = 32, **_) -> list[dict]:
        labels = meta["labels"]
        model.eval()
        device = next(model.parameters()).device
        results = []
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            for p in chunk:
                if not Path(p).is_file():
                    raise InputNotFound(f"{p}: image file not found")
            x = np.stack([to_array(load_image(str(p)), processor.spec, processor.spec.size) for p in chunk])
            probs = model(pixel_values=torch.from_numpy(x).to(device)).logits.float().softmax(-1).cpu().numpy()
            results += [{"image": str(p), **ranked_labels(labels, pr)} for p, pr in zip(chunk, probs)]
        return results


TASK = ImageClassification()
# the steps by name, for scripts and tests that call them one at a time
load_data, load_processor = TASK.load_data, TASK.load_processor
featurize, train_collate = TASK.featurize, TASK.train_collate
