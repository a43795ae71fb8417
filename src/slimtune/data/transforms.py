"""Image transforms with PIL, numpy and torch only (PyPI torchvision does not import beside the
CPU torch build on these machines, and timm pulls torchvision).

`ImageSpec` is what a model expects (final size, normalisation), read from the model's
`preprocessor_config.json` and overridden by the config's `image:` section. `to_tensor` turns
one PIL image into a normalised CHW float array at a given size: evaluation resizes (and
centre-crops with `crop_pct`), training adds the augmentations the config asks for. The size
is an argument, not part of the spec, so progressive resizing only changes what the collate
function passes.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass
class Augment:
    hflip: bool = False                  # horizontal flip with probability 0.5
    random_crop: float | None = None     # random resized crop: minimum area share (e.g. 0.6), aspect 3/4..4/3
    rotate: float = 0.0                  # random rotation of up to +- this many degrees
    color_jitter: float = 0.0            # brightness and contrast scaled by 1 +- this


@dataclass
class ImageSpec:
    size: int = 224                                  # final (eval) size, square
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 1.0                            # eval: resize to size / crop_pct, centre-crop size
    resample: str = "bilinear"
    augment: Augment = field(default_factory=Augment)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def _size_of(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, dict):
        for k in ("height", "shortest_edge", "width"):
            if value.get(k):
                return int(value[k])
    return None


def spec_from_processor_config(path: str | Path) -> dict:
    """size / mean / std / crop_pct from a transformers preprocessor_config.json (any image processor);
    an empty dict when there is none."""
    p = Path(path)
    f = p / PROCESSOR_FILE if p.is_dir() else p
    if not f.is_file():
        return {}
    raw = json.loads(f.read_text(encoding="utf-8"))
    if raw.get("slimtune_image_spec"):  # written by save(): the run's own spec, augmentations included
        d = dict(raw["slimtune_image_spec"])
        d["augment"] = Augment(**d.get("augment", {}))
        return d
    out = {}
    size = _size_of(raw.get("crop_size")) if raw.get("do_center_crop") else None
    size = size or _size_of(raw.get("size"))
    if size:
        out["size"] = size
    if raw.get("crop_pct"):
        out["crop_pct"] = float(raw["crop_pct"])
    elif raw.get("do_center_crop") and _size_of(raw.get("crop_size")) and _size_of(raw.get("size")):
        out["crop_pct"] = _size_of(raw["crop_size"]) / _size_of(raw["size"])
    if raw.get("do_normalize", True) and raw.get("image_mean") and raw.get("image_std"):
        mean, std = raw["image_mean"], raw["image_std"]
        out["mean"] = tuple(float(x) for x in (mean if isinstance(mean, list) else [mean] * 3))
        out["std"] = tuple(float(x) for x in (std if isinstance(std, list) else [std] * 3))
    elif raw.get("do_normalize") is False:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


def save(spec: ImageSpec, folder: str | Path) -> None:
    """A preprocessor_config.json that transformers' image processors read (size, mean, std) and that
    keeps slimtune's full spec for `predict`."""
    s = spec.size
    doc = {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": s, "width": s},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(spec.mean), "image_std": list(spec.std), "slimtune_image_spec": spec.to_dict(),
    }
    Path(folder, PROCESSOR_FILE).write_text(json.dumps(doc, indent=2), encoding="utf-8")


def _resample(name: str):
    from PIL import Image

    return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC}.get(name, Image.Resampling.BILINEAR)


def _center_crop_resize(img, size: int, crop_pct: float, resample):
    if crop_pct >= 1.0:
        return img.resize((size, size), resample)
    # shorter side to size / crop_pct, then the central size x size
    big = int(math.ceil(size / crop_pct))
    w, h = img.size
    scale = big / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _random_resized_crop(img, size: int, min_area: float, rng: random.Random, resample):
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(min_area, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), resample, box=(x, y, x + cw, y + ch))
    return img.resize((size, size), resample)


def to_array(img, spec: ImageSpec, size: int, train: bool = False, rng: random.Random | None = None) -> np.ndarray:
    """One RGB PIL image -> float32 CHW array at `size`, normalised with the spec's mean / std."""
    resample = _resample(spec.resample)
    aug = spec.augment
    if train:
        rng = rng or random.Random()
        if aug.rotate:
            img = img.rotate(rng.uniform(-aug.rotate, aug.rotate), resample=_resample("bilinear"))
        if aug.random_crop:
            img = _random_resized_crop(img, size, aug.random_crop, rng, resample)
        else:
            img = _center_crop_resize(img, size, spec.crop_pct, resample)
        if aug.hflip and rng.random() < 0.5:
            from PIL import Image

            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        img = _center_crop_resize(img, size, spec.crop_pct, resample)
    x = np.asarray(img, dtype=np.float32) / 255.0  # HWC
    if train and aug.color_jitter:
        b = 1 + rng.uniform(-aug.color_jitter, aug.color_jitter)
        c = 1 + rng.uniform(-aug.color_jitter, aug.color_jitter)
        m = x.mean()
        x = np.clip((x - m) * c + m * b, 0.0, 1.0)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
