"""Image data: readers (folder, CSV, idx, npz), corrupt-image handling, transforms, the progressive
resizing schedule, 1x1-convolution targets. Images are generated here; models are tiny and random."""
from __future__ import annotations

import gzip
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest

QUADRANTS = ("horizontal", "vertical", "checker", "plain")  # the classes: a pattern any frozen random model sees


def quadrant_image(label: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """A learnable pattern over dim noise (uint8 HxW): horizontal or vertical stripes, a checkerboard,
    or noise only. Patterns, not positions: a random frozen ViT's tiny position embeddings barely
    tell patches apart, while its patch embedding sees orientation."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 60, (size, size)).astype(np.uint8)
    i, j = np.indices((size, size))
    mask = [(i // 2) % 2 == 0, (j // 2) % 2 == 0, ((i // 2) + (j // 2)) % 2 == 0, np.zeros((size, size), bool)][label]
    a[mask] = 230
    return a


def write_image_folder(root: Path, n_per_class: int, seed: int = 0, modes=("L", "RGB", "RGBA")) -> Path:
    """root/<quadrant>/<i>.png, in a mix of grey, RGB and RGBA images."""
    from PIL import Image

    for label, name in enumerate(QUADRANTS):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            a = quadrant_image(label, seed=seed * 10_000 + label * 1000 + i)
            mode = modes[i % len(modes)]
            im = Image.fromarray(a, "L")
            if mode != "L":
                im = im.convert(mode)
            im.save(root / name / f"{i}.{'jpg' if i % 4 == 3 and mode != 'RGBA' else 'png'}")
    return root


def write_idx(prefix: Path, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> Path:
    def dump(path, arr, code=0x08):
        head = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
        data = head + arr.astype(np.uint8).tobytes()
        (gzip.open if gz else open)(path, "wb").write(data)

    suffix = ".gz" if gz else ""
    img = prefix.with_name(prefix.name + f"-images-idx3-ubyte{suffix}")
    dump(img, images)
    dump(prefix.with_name(prefix.name + f"-labels-idx1-ubyte{suffix}"), labels)
    return img


def quadrant_arrays(n: int, seed: int = 0):
    labels = np.arange(n) % 4
    return np.stack([quadrant_image(int(y), seed=seed * 10_000 + i) for i, y in enumerate(labels)]), labels


def tiny_vit(path: Path) -> str:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=2)
    ViTForImageClassification(cfg).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_rescale": True}))
    return str(path)


def tiny_resnet(path: Path) -> str:
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=3, num_labels=2)
    ResNetForImageClassification(cfg).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 32}, "crop_pct": 1.0,
        "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return str(path)


def image_config(model: str, train: str, out: Path, **train_kw) -> dict:
    return {
        "task": "image-classification",
        "model": {"name": model},
        "data": {"train": train},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 6, "batch_size": 16, "lr": 1e-2, "log_every": 2, "precision": "fp32", **train_kw},
        "eval": {"every_epochs": 1},
        "track": {"energy": False},
        "output": {"dir": str(out), "name": "run"},
    }


# -- readers ---------------------------------------------------------------

def test_folder_reader_mixed_modes(tmp_path):
    from slimtune.data.images import check_images, load_image, read_images
    from slimtune.data.validate import DataReport

    root = write_image_folder(tmp_path / "imgs", 6)
    t = read_images(str(root))
    assert len(t) == 24 and sorted(set(t.labels)) == sorted(QUADRANTS)
    rep = DataReport()
    check_images(t, "train", "fail", rep)
    assert set(rep.stats["train_image_modes"]) == {"L", "RGB", "RGBA"}
    assert rep.stats["train_converted_to_rgb"] == 16
    for ref in t.refs[:6]:
        im = load_image(ref)
        assert im.mode == "RGB" and im.size == (16, 16)


def test_csv_and_jsonl_reader_relative_paths(tmp_path):
    from slimtune.data.images import read_images

    root = write_image_folder(tmp_path / "imgs", 3)
    rows = [(f"imgs/{q}/{i}.png", q) for q in QUADRANTS for i in range(3) if (root / q / f"{i}.png").exists()]
    (tmp_path / "data.csv").write_text("path,cls\n" + "".join(f"{p},{c}\n" for p, c in rows))
    t = read_images(str(tmp_path / "data.csv"), image_column="path", label_column="cls")
    assert len(t) == len(rows) and all(Path(r).is_file() for r in t.refs)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"image": p, "label": c}) + "\n" for p, c in rows))
    assert read_images(str(tmp_path / "data.jsonl")).labels == [c for _, c in rows]
    from slimtune.data.readers import DataError

    with pytest.raises(DataError, match="data.image_column"):
        read_images(str(tmp_path / "data.csv"), image_column="file", label_column="cls")


def test_idx_and_npz_readers(tmp_path):
    from slimtune.data.images import load_image, read_images
    from slimtune.data.readers import DataError

    x, y = quadrant_arrays(20)
    t = read_images(str(write_idx(tmp_path / "train", x, y)))
    assert len(t) == 20 and t.labels[:4] == ["0", "1", "2", "3"]
    im = load_image(t.refs[1])
    assert im.mode == "RGB" and (np.asarray(im)[0, :, 0] == 230).sum() == 8  # vertical stripes: half of row 0
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    assert read_images(str(tmp_path / "d.npz")).labels == t.labels
    # truncated idx file: named, with what is wrong
    bad = tmp_path / "bad-images-idx3-ubyte"
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    bad.write_bytes(raw[:-10])
    (tmp_path / "bad-labels-idx1-ubyte").write_bytes(gzip.open(tmp_path / "train-labels-idx1-ubyte.gz").read())
    with pytest.raises(DataError, match="bad-images-idx3-ubyte.*truncated"):
        read_images(str(bad))


def test_corrupt_images_fail_or_skip(tmp_path):
    from slimtune.data.readers import DataError
    from slimtune.tasks.image_classification import load_data
    from slimtune.config import load_config

    root = write_image_folder(tmp_path / "imgs", 6, modes=("RGB",))
    good = root / QUADRANTS[0] / "0.png"
    (root / QUADRANTS[0] / "broken.png").write_bytes(good.read_bytes()[:40])  # truncated PNG
    (root / QUADRANTS[1] / "noise.jpg").write_bytes(b"not an image at all")
    cfg = load_config(image_config("unused", str(root), tmp_path / "r"))
    with pytest.raises(DataError) as e:
        load_data(cfg)
    msg = str(e.value)
    assert "2 of 26 image(s) cannot be read" in msg and "broken.png" in msg and "noise.jpg" in msg
    assert "data.bad_images: skip" in msg
    cfg = load_config(image_config("unused", str(root), tmp_path / "r"), ["data.bad_images=skip"])
    splits = load_data(cfg)
    assert len(splits.train) + len(splits.eval) == 24
    assert any("skipped 2 unreadable image(s)" in w for w in splits.report.warnings)


def test_label_checks(tmp_path):
    from slimtune.config import load_config
    from slimtune.data.readers import DataError
    from slimtune.tasks.image_classification import load_data

    x, y = quadrant_arrays(40)
    tr = write_idx(tmp_path / "train", x, y)
    x2, y2 = quadrant_arrays(8, seed=1)
    y2[0] = 7  # a class training never shows
    te = write_idx(tmp_path / "t10k", x2, y2)
    cfg = image_config("unused", str(tr), tmp_path / "r")
    cfg["data"]["test"] = str(te)
    with pytest.raises(DataError, match="never shows: '7'"):
        load_data(load_config(cfg))
    cfg["data"]["test"] = str(tr)
    cfg["data"]["label_names"] = list(QUADRANTS)
    splits = load_data(load_config(cfg))
    assert splits.meta["labels"] == list(QUADRANTS)


def test_empty_image_labels_are_an_error(tmp_path):
    from slimtune.config import load_config
    from slimtune.data.readers import DataError
    from slimtune.tasks.image_classification import load_data

    root = write_image_folder(tmp_path / "imgs", 3, modes=("RGB",))
    rows = [(f"imgs/{q}/{i}.png", q) for q in QUADRANTS for i in range(3) if (root / q / f"{i}.png").exists()]
    rows[1] = (rows[1][0], "")
    (tmp_path / "data.csv").write_text("image,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    with pytest.raises(DataError) as e:
        load_data(load_config(image_config("unused", str(tmp_path / "data.csv"), tmp_path / "r")))
    msg = str(e.value)
    assert str(tmp_path / "data.csv") in msg and "'label'" in msg, msg
    assert "1 empty or missing label(s) (record 2)" in msg, msg


# -- transforms and schedule ---------------------------------------------------

def test_transforms_sizes_and_normalisation():
    from PIL import Image

    from slimtune.data.transforms import Augment, ImageSpec, to_array

    im = Image.fromarray(quadrant_image(0, size=20), "L").convert("RGB")
    spec = ImageSpec(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = to_array(im, spec, 16)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
    assert to_array(im, spec, 8).shape == (3, 8, 8)
    spec.augment = Augment(hflip=True, random_crop=0.5, rotate=10, color_jitter=0.2)
    rng = random.Random(0)
    xs = [to_array(im, spec, 12, train=True, rng=rng) for _ in range(4)]
    assert all(a.shape == (3, 12, 12) for a in xs) and not all(np.allclose(xs[0], a) for a in xs[1:])
    spec.crop_pct = 0.875
    assert to_array(Image.new("RGB", (30, 20)), spec, 16).shape == (3, 16, 16)


def test_processor_config_forms(tmp_path):
    from slimtune.data.transforms import spec_from_processor_config

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
         "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2]}))
    d = spec_from_processor_config(tmp_path)
    assert d["size"] == 224 and d["crop_pct"] == pytest.approx(224 / 256) and d["mean"] == (0.5, 0.4, 0.3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 384, "crop_pct": 0.9}))
    assert spec_from_processor_config(tmp_path) == {"size": 384, "crop_pct": 0.9}
    assert spec_from_processor_config(tmp_path / "missing") == {}


def _processor(cfg_dict, source):
    from slimtune.config import load_config
    from slimtune.tasks.image_classification import load_processor

    return load_processor(load_config(cfg_dict), source)


def test_missing_preprocessor_config_is_said(tmp_path):
    from slimtune.models import ModelSource
    from slimtune.tasks.common import Splits
    from slimtune.data.validate import DataReport
    from slimtune.tasks.image_classification import featurize

    model = Path(tiny_vit(tmp_path / "vit"))
    (model / "preprocessor_config.json").unlink()
    cfg = image_config(str(model), "unused", tmp_path / "r")
    proc = _processor(cfg, ModelSource(str(model), None, None, "folder"))
    assert proc.spec.size == 224  # the fallback: said, not silent
    assert len(proc.notes) == 1, proc.notes
    note = proc.notes[0]
    assert str(model) in note and "no preprocessor_config.json" in note
    assert "size 224" in note and "ImageNet mean" in note
    assert "image.size, image.mean, image.std" in note
    from slimtune.data.images import ImageTable

    splits = Splits(ImageTable([], [], "t"), ImageTable([], [], "e"), None, DataReport(), meta={"labels": ["a", "b"]})
    from slimtune.config import load_config

    featurize(load_config(cfg), proc, splits)
    assert note in splits.report.warnings  # into the data report (data_report.json, printed by run)
    # the config's image: keys cover what is missing: nothing is defaulted, nothing to say
    cfg["image"] = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert _processor(cfg, ModelSource(str(model), None, None, "folder")).notes == []
    # the model's own file: nothing to say either
    intact = tiny_vit(tmp_path / "vit2")
    p = _processor(image_config(intact, "unused", tmp_path / "r"), ModelSource(intact, None, None, "folder"))
    assert p.notes == [] and p.spec.size == 32


@pytest.mark.parametrize("failure, said", [("absent", "the repository has no preprocessor_config.json"),
                                           ("offline", "not in the local Hub cache"),
                                           ("other", None)])
def test_hub_preprocessor_lookup_failures(tmp_path, monkeypatch, failure, said):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from slimtune.models import ModelError, ModelSource

    def fake_download(repo_id, filename, revision=None, **_):
        raise {"absent": EntryNotFoundError("404"), "offline": LocalEntryNotFoundError("no cache"),
               "other": PermissionError("401 gated repository")}[failure]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    src = ModelSource("someone/vit", None, "someone/vit", "hub")
    cfg = image_config("someone/vit", "unused", tmp_path / "r")
    if said is None:  # a real error stays an error, naming the model and the cause
        with pytest.raises(ModelError, match="someone/vit.*PermissionError: 401 gated repository"):
            _processor(cfg, src)
        return
    notes = _processor(cfg, src).notes
    assert len(notes) == 1 and "'someone/vit'" in notes[0] and said in notes[0] and "size 224" in notes[0], notes


def test_factory_without_preprocessing_attributes_is_said(tmp_path):
    from slimtune.models.factory import factory_source

    f = tmp_path / "fac.py"
    f.write_text("def build(num_labels, labels):\n    pass\nbuild.image_size = 64\n", encoding="utf-8")
    cfg = image_config("unused", "unused", tmp_path / "r")
    cfg["model"] = {"factory": f"{f}:build"}
    proc = _processor(cfg, factory_source(f"{f}:build"))
    assert proc.spec.size == 64 and len(proc.notes) == 1
    assert "sets no image_mean, image_std" in proc.notes[0], proc.notes
    assert "ImageNet mean, ImageNet std" in proc.notes[0], proc.notes


def test_unreadable_preprocessor_config_is_an_error(tmp_path):
    from slimtune.models import ModelError, ModelSource

    model = Path(tiny_vit(tmp_path / "vit"))
    (model / "preprocessor_config.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(ModelError, match="preprocessor_config.json: cannot read"):
        _processor(image_config(str(model), "unused", tmp_path / "r"), ModelSource(str(model), None, None, "folder"))


def test_progressive_resizing_schedule_is_a_step_function():
    from slimtune.train.transfer import seq_len_at

    sched = [(0.0, 64), (0.5, 96), (0.8, 128)]
    assert ([seq_len_at(sched, p) for p in (0.0, 0.25, 0.4999, 0.5, 0.79, 0.8, 0.99, 1.0)]
            == [64, 64, 64, 96, 96, 128, 128, 128])


def test_size_schedule_config_checks():
    from slimtune.config import ConfigError, load_config

    base = image_config("m", "d", Path("r"))
    with pytest.raises(ConfigError, match="image_size_schedule"):
        load_config(base, ["train.image_size_schedule=[[0.2, 64]]"])
    with pytest.raises(ConfigError, match="at least 8"):
        load_config(base, ["train.image_size_schedule=[[0.0, 4]]"])
    cfg = load_config(base, ["train.image_size_schedule=[[0.0, 16], [0.5, 32]]"])
    assert cfg.train.image_size_schedule == [(0.0, 16), (0.5, 32)] and cfg.monitor == "accuracy"
    with pytest.raises(ConfigError, match="model.name"):
        load_config({**base, "model": {}})


# -- models and targets ------------------------------------------------------

def test_lora_targets_pointwise_convs_of_resnet(tmp_path):
    from transformers import AutoModelForImageClassification

    from slimtune.methods.targets import block_linear_names, find_targets

    path = tiny_resnet(tmp_path / "resnet")
    model = AutoModelForImageClassification.from_pretrained(path)
    names = block_linear_names(model, ("classifier",))
    assert names and all("convolution" in n for n in names)  # 1x1 convs of the bottleneck layers, no 3x3
    mods = dict(model.named_modules())
    import re

    rx = find_targets(model, "auto", ("classifier",))
    hits = [n for n in mods if re.fullmatch(rx, n)]
    assert hits and all(tuple(mods[n].kernel_size) == (1, 1) for n in hits)


def test_datasets_image_column(tmp_path):
    """A `datasets` table with an Image column (what hf:<name> gives), saved with save_to_disk."""
    from datasets import Dataset, Image as ImageFeature
    from PIL import Image

    from slimtune.data.images import check_images, load_image, read_images
    from slimtune.data.validate import DataReport

    imgs = [Image.fromarray(quadrant_image(i % 4, seed=i), "L") for i in range(8)]
    ds = Dataset.from_dict({"img": imgs, "label": [QUADRANTS[i % 4] for i in range(8)]})
    ds = ds.cast_column("img", ImageFeature())
    ds.save_to_disk(str(tmp_path / "saved"))
    t = read_images(str(tmp_path / "saved"), image_column="img")
    assert len(t) == 8 and t.labels[1] == QUADRANTS[1]
    check_images(t, "train", "fail", DataReport())
    im = load_image(t.refs[2])
    assert im.mode == "RGB" and im.size == (16, 16)


def test_progressive_resize_callback_sets_the_size():
    from slimtune.data.batching import BatchShape
    from slimtune.train.state import TrainState
    from slimtune.train.transfer import ProgressiveResize

    class FakeLoop:
        def __init__(self):
            self.state, self.log_extras = TrainState(), {}

    shape, loop = BatchShape(), FakeLoop()
    cb = ProgressiveResize([[0.0, 16], [0.5, 24], [0.75, 32]], 8, shape)
    seen = []
    cb.on_train_begin(loop)
    for step in range(1, 9):
        seen.append(shape.image_size)
        loop.state.step = step
        cb.on_step_end(loop)
    assert seen == [16, 16, 16, 16, 24, 24, 32, 32] and loop.log_extras["image_size"] == 32


def test_augmentations_depend_on_seed_epoch_and_index_only(tmp_path):
    """A resumed run must draw the same crops and flips as an uninterrupted one: the draws of an
    example are a function of (seed, epoch, index), not of an RNG stream that a checkpoint would lose."""
    from slimtune.data.batching import BatchShape, LengthGroupedBatches
    from slimtune.data.transforms import Augment, ImageSpec
    from slimtune.tasks.image_classification import ImageProcessor, train_collate

    imgs = [str(p) for p in sorted(write_image_folder(tmp_path / "imgs", 2).rglob("*.png"))]
    ex = [{"image": p, "labels": 0, "length": 1, "index": i} for i, p in enumerate(imgs)]
    spec = ImageSpec(size=12, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                     augment=Augment(hflip=True, random_crop=0.5, rotate=10, color_jitter=0.2))

    def batch(epoch, examples, seed=0):
        shape = BatchShape()
        sampler = LengthGroupedBatches([1] * len(ex), 4, seed)
        sampler.shape = shape
        sampler.set_epoch(epoch)  # what the training loop does before each epoch
        return train_collate(ImageProcessor(spec, seed), shape)(examples)["pixel_values"]

    first = batch(1, ex[:4])
    assert torch_equal(first, batch(1, ex[:4]))              # a fresh process (a resume) draws the same
    assert torch_equal(first[2:], batch(1, ex[2:4]))          # independent of the batch's other examples
    assert not torch_equal(first, batch(2, ex[:4]))           # another epoch, other draws
    assert not torch_equal(first, batch(1, ex[:4], seed=1))   # another seed, other draws


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
