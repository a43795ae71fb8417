"""Image data: readers and checks. Images are referenced, not loaded: a table holds one reference
per example (a file path, an index into an array, or a row of a `datasets` table) and its label;
the collate function decodes and transforms a batch at a time.

Sources (data.train / eval / test):
  a folder of class folders      root/<label>/*.png|jpg|...  (the label is the folder name)
  .csv / .tsv / .jsonl / .json / .parquet
                                 a column of paths (data.image_column, relative to the file's folder)
                                 and a label column
  MNIST-style idx files          <prefix>-images-idx3-ubyte[.gz] (labels: <prefix>-labels-idx1-ubyte[.gz])
  .npz                           arrays `images` (or `x`) N x H x W [x C], uint8 or float in [0, 1],
                                 and `labels` (or `y`)
  hf:<name>[:<split>] / a saved `datasets` folder with an image column

Checks before training: every image file is decoded once (unreadable or truncated images are named
by path and either fail the run or are skipped with a count, as `data.bad_images` says); grey, RGBA,
palette and RGB images are all converted to RGB when loaded; label checks as for text.
"""
from __future__ import annotations

import gzip
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .readers import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class ArrayStore:
    """Images held in one numpy array (idx / npz): N x H x W [x C]."""
    images: np.ndarray
    source: str


@dataclass
class ImageTable:
    """refs[i]: a path (str), ("array", store, index) or ("hf", dataset, column, index); labels[i]: str."""
    refs: list
    labels: list[str]
    source: str
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.refs)

    def select(self, idx) -> "ImageTable":
        idx = list(idx)
        return ImageTable([self.refs[i] for i in idx], [self.labels[i] for i in idx], self.source, self.stats)

    def shuffle(self, seed: int) -> "ImageTable":
        return self.select(np.random.default_rng(seed).permutation(len(self)).tolist())

    def __getitem__(self, key):
        if key == "label":
            return self.labels
        if key == "image":
            return self.refs
        raise KeyError(key)

    @property
    def column_names(self) -> list[str]:
        return ["image", "label"]


# -- loading one image -------------------------------------------------------

def load_image(ref):
    """An RGB PIL image for a reference (grey / RGBA / palette converted)."""
    from PIL import Image

    if isinstance(ref, str):
        with Image.open(ref) as im:
            im.load()
            return _rgb(im)
    kind = ref[0]
    if kind == "array":
        return array_to_pil(ref[1].images[ref[2]])
    if kind == "hf":
        value = ref[1][ref[3]][ref[2]]
        if isinstance(value, dict) and value.get("bytes"):
            import io

            with Image.open(io.BytesIO(value["bytes"])) as im:
                im.load()
                return _rgb(im)
        if isinstance(value, dict) and value.get("path"):
            return load_image(value["path"])
        if isinstance(value, str):
            return load_image(value)
        if isinstance(value, np.ndarray) or isinstance(value, list):
            return array_to_pil(np.asarray(value))
        return _rgb(value)
    raise TypeError(f"unknown image reference {ref!r}")


def _rgb(im):
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        from PIL import Image

        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent pixels -> white, not black
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode in ("I;16", "I", "F"):  # 16-bit / float grey: scale to 8 bits
        a = np.asarray(im, dtype=np.float32)
        hi = a.max() or 1.0
        return array_to_pil((a / hi * 255).astype(np.uint8))
    return im.convert("RGB")


def array_to_pil(a: np.ndarray):
    from PIL import Image

    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = np.clip(a * 255.0 if a.max() <= 1.0 else a, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.shape[-1] == 4:
        return _rgb(Image.fromarray(a, "RGBA"))
    return Image.fromarray(a, "RGB")


# -- readers -----------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"magic {raw[:4].hex()} is not an unsigned-byte idx file")
        dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(dims)):
            raise ValueError(f"header says {dims} = {int(np.prod(dims))} values, "
                             f"the file holds {data.size} (truncated?)")
        return data.reshape(dims)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise DataError(f"{path}: not a readable idx file: {e}") from None


def _idx_labels_path(path: Path) -> Path:
    name = path.name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    return path.with_name(name)


def read_idx(path: Path) -> ImageTable:
    images = _read_idx(path)
    lpath = _idx_labels_path(path)
    if lpath == path or not lpath.is_file():
        raise DataError(f"{path}: idx images need their labels file beside them ({lpath.name} not found)")
    labels = _read_idx(lpath)
    if images.ndim not in (3, 4) or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{path}: {images.shape} images do not match {labels.shape} labels in {lpath.name}")
    store = ArrayStore(images, str(path))
    return ImageTable([("array", store, i) for i in range(len(images))], [str(int(y)) for y in labels], str(path),
                      {"modes": {"L" if images.ndim == 3 else "RGB": len(images)}})


def read_npz(path: Path) -> ImageTable:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: cannot read as .npz: {e}") from None
    xk = next((k for k in ("images", "x", "X") if k in z.files), None)
    yk = next((k for k in ("labels", "y", "Y") if k in z.files), None)
    if xk is None or yk is None:
        raise DataError(f"{path}: expected arrays 'images' (or 'x') and 'labels' (or 'y'); "
                        f"the file has: {', '.join(z.files)}")
    images, labels = z[xk], z[yk]
    if images.ndim not in (3, 4) or len(labels) != len(images):
        raise DataError(f"{path}: images {images.shape} and labels {labels.shape} do not match (N x H x W [x C] and N)")
    from .validate import label_values

    store = ArrayStore(images, str(path))
    return ImageTable([("array", store, i) for i in range(len(images))], label_values(labels.tolist(), str(path), yk),
                      str(path))


def read_folder(path: Path) -> ImageTable:
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: an image folder needs one sub-folder per class (root/<label>/*.png); none found")
    refs, labels = [], []
    for c in classes:
        for f in sorted(c.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                refs.append(str(f))
                labels.append(c.name)
    if not refs:
        raise DataError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return ImageTable(refs, labels, str(path))


def read_table(source: str, image_column: str, label_column: str) -> ImageTable:
    from .readers import read_source
    from .validate import label_values, require_columns

    ds = read_source(source)
    require_columns(ds, [image_column, label_column], source,
                    {image_column: "data.image_column", label_column: "data.label_column"})
    labels = label_values(ds[label_column], source, label_column)
    feature = ds.features.get(image_column)
    if type(feature).__name__ == "Image" or not isinstance(ds[0][image_column], str):
        # a `datasets` image column (hf: sources, saved folders): keep the table, decode rows lazily
        ds_raw = ds.cast_column(image_column, type(feature)(decode=False)) if type(feature).__name__ == "Image" else ds
        return ImageTable([("hf", ds_raw, image_column, i) for i in range(len(ds))], labels, source)
    base = Path(source).expanduser().parent if not source.startswith(("hf:", "builtin:")) else Path.cwd()
    refs = []
    for p in ds[image_column]:
        p = Path(str(p).strip()).expanduser()
        refs.append(str(p if p.is_absolute() else base / p))
    return ImageTable(refs, labels, source)


def read_images(source: str, image_column: str = "image", label_column: str = "label") -> ImageTable:
    if source.startswith(("hf:", "builtin:")):
        return read_table(source, image_column, label_column)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: file or folder not found (working directory: {Path.cwd()})")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return read_table(source, image_column, label_column)
        return read_folder(path)
    name = path.name.lower()
    if "idx3" in name or name.endswith((".idx", ".idx.gz")):
        return read_idx(path)
    if name.endswith(".npz"):
        return read_npz(path)
    if path.suffix.lower() in TABLE_SUFFIXES:
        return read_table(source, image_column, label_column)
    raise DataError(f"{source}: not an image data source; give a folder of class folders, "
                    "a .csv/.tsv/.jsonl/.json/.parquet of paths and labels, an idx file (*-images-idx3-ubyte[.gz]), "
                    "an .npz, a saved datasets folder or hf:<name>")


# -- checks ------------------------------------------------------------------

def check_images(table: ImageTable, split: str, policy: str, report) -> ImageTable:
    """Decode every image once: name the unreadable / truncated ones, fail or skip them (`policy`),
    and record the colour modes met (all are converted to RGB when loaded)."""
    from PIL import Image

    modes, bad, sizes = Counter(), [], []
    arrays = [r for r in table.refs if not isinstance(r, str)]
    if arrays and len(arrays) == len(table.refs) and table.refs and table.refs[0][0] == "array":
        imgs = table.refs[0][1].images
        mode = "L" if imgs.ndim == 3 or imgs.shape[-1] == 1 else "RGB" if imgs.shape[-1] == 3 else f"{imgs.shape[-1]}ch"
        modes[mode] = len(arrays)
        sizes = [imgs.shape[1:3]]
    else:
        for i, ref in enumerate(table.refs):
            try:
                if isinstance(ref, str):
                    with Image.open(ref) as im:
                        modes[im.mode] += 1
                        im.load()  # a full decode: verify() misses truncated files
                        sizes.append(im.size[::-1])
                else:
                    im = load_image(ref)
                    modes["decoded"] += 1
                    sizes.append(im.size[::-1])
            except Exception as e:  # PIL raises many kinds: OSError, UnidentifiedImageError, SyntaxError, ...
                bad.append((i, ref if isinstance(ref, str) else f"{table.source} row {ref[-1]}",
                            f"{type(e).__name__}: {e}"))
    report.stats[f"{split}_image_modes"] = dict(modes)
    if sizes:
        hs, ws = [s[0] for s in sizes], [s[1] for s in sizes]
        report.stats[f"{split}_image_sizes"] = {"min": [min(hs), min(ws)], "max": [max(hs), max(ws)]}
    mixed = [m for m in modes if m != "RGB" and m != "decoded"]
    if mixed:
        report.stats[f"{split}_converted_to_rgb"] = sum(modes[m] for m in mixed)
    if not bad:
        return table
    more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
    shown = "; ".join(f"{p} ({why})" for _, p, why in bad[:10]) + more
    if policy == "fail":
        raise DataError(f"{split}: {len(bad)} of {len(table)} image(s) cannot be read: {shown}. "
                        "Fix or remove them, or set data.bad_images: skip to train without them")
    report.warn(f"{split}: skipped {len(bad)} unreadable image(s) of {len(table)}: {shown}")
    report.stats[f"{split}_skipped_images"] = [p for _, p, _ in bad]
    drop = {i for i, _, _ in bad}
    return table.select([i for i in range(len(table)) if i not in drop])
