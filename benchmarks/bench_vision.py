"""Images: EfficientNet-Lite0 (ImageNet, pip) + LoRA on Fashion-MNIST (apt), a fixed budget of samples.

Variants, each in its own subprocess, one at a time (wrap the command in `flock /tmp/slimtune-bench.lock`):
  fixed        slimtune, every step at the final size
  progressive  slimtune, train.image_size_schedule (small images first), the same samples in the same order
  plain        a plain PyTorch + peft loop on the fixed-size job: same model factory, LoRA targets, data,
               batches, transforms, optimizer and schedule; no evaluation during training

Printed and saved (benchmarks/results/bench_vision.json): training seconds, samples/s, test accuracy
(every variant evaluated on the same test subset at the final size), and the ratios.

    python benchmarks/bench_vision.py [--train 3000] [--test 1000] [--size 64] [--epochs 1]
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
FACTORY = str(ROOT / "examples" / "efficientnet_lite.py") + ":build"
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _idx(path: Path):
    import numpy as np
    import struct

    raw = gzip.open(path).read()
    nd = raw[3]
    dims = struct.unpack(">" + "I" * nd, raw[4:4 + 4 * nd])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * nd).reshape(dims)


def make_data(tmp: Path, n_train: int, n_test: int) -> dict:
    """Seeded subsets as .npz files: train (eval carved out by slimtune) and test."""
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = _idx(FASHION / "train-images-idx3-ubyte.gz"), _idx(FASHION / "train-labels-idx1-ubyte.gz")
    i = rng.permutation(len(x))[:n_train]
    np.savez(tmp / "train.npz", images=x[i], labels=y[i])
    xt, yt = _idx(FASHION / "t10k-images-idx3-ubyte.gz"), _idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    j = rng.permutation(len(xt))[:n_test]
    np.savez(tmp / "test.npz", images=xt[j], labels=yt[j])
    return {"train": str(tmp / "train.npz"), "test": str(tmp / "test.npz")}


def config(args, data: dict, out: str, name: str, schedule=None) -> dict:
    return {
        "task": "image-classification",
        "model": {"factory": FACTORY},
        "data": {"train": data["train"], "test": data["test"], "label_names": NAMES, "eval_fraction": 0.1},
        "image": {"size": args.size},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"epochs": args.epochs, "batch_size": 32, "lr": 2e-3, "warmup": 0.05, "precision": args.precision,
                  "image_size_schedule": schedule, "log_every": 10, "seed": args.seed,
                  **({"head_lr": args.head_lr} if args.head_lr else {})},
        "eval": {"every_epochs": args.epochs, "batch_size": 128},
        "track": {"energy": False},
        "output": {"dir": out, "name": name},
    }


def child_slimtune(args, data, out, variant) -> dict:
    import slimtune

    sched = [[0.0, args.size // 2], [0.4, (3 * args.size) // 4], [0.7, args.size]] if variant == "progressive" else None
    res = slimtune.run(config(args, data, out, variant, sched))
    s = res.summary
    return {"variant": variant, "train_s": s["train_seconds"], "wall_s": s["wall_seconds"],
            "samples": s["samples_seen"], "samples_per_s": s["samples_per_s"],
            "test_accuracy": res.test_metrics["accuracy"], "test_macro_f1": res.test_metrics["macro_f1"],
            "schedule": sched, "precision": s["precision"]}


def child_plain(args, data, out) -> dict:
    """The same job as `fixed`, written as a user would without slimtune."""
    import math
    import random

    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(ROOT / "examples"))
    from efficientnet_lite import build
    from slimtune.api import resolve_precision
    from slimtune.data.images import array_to_pil
    from slimtune.data.splits import split_indices
    from slimtune.data.transforms import ImageSpec, to_array
    from slimtune.methods.targets import find_targets

    torch.manual_seed(42)
    z = np.load(data["train"])
    x, y = z["images"], z["labels"]
    tr, _ = split_indices(len(x), 0.1, 0, [str(v) for v in y])  # the same train part as slimtune's carve-out
    model = build(10)
    for m in model.modules():  # frozen BatchNorm statistics, as slimtune does
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, a: setattr(mod, "training", False))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, modules_to_save=["backbone._fc"],
                                             target_modules=find_targets(model, "auto", ["backbone._fc"])))
    spec = ImageSpec(size=args.size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    bs = 32
    steps = math.ceil(len(tr) / bs) * int(args.epochs)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=2e-3)
    warm = max(1, round(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm
                                              else max(0.0, (steps - s) / (steps - warm)))
    bf16 = resolve_precision(args.precision) == "bf16"
    rng = random.Random(0)
    model.train()
    t0, seen, step = time.perf_counter(), 0, 0
    for epoch in range(int(args.epochs)):
        order = np.random.default_rng([42, epoch]).permutation(tr)
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            px = torch.from_numpy(np.stack([to_array(array_to_pil(x[k]), spec, args.size, True, rng) for k in idx]))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(pixel_values=px, labels=torch.from_numpy(y[idx].astype(np.int64))).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            seen += len(idx)
            step += 1
    train_s = time.perf_counter() - t0
    zt = np.load(data["test"])
    model.eval()
    correct = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(zt["labels"]), 128):
            px = torch.from_numpy(np.stack([to_array(array_to_pil(a), spec, args.size)
                                            for a in zt["images"][i:i + 128]]))
            correct += int((model(pixel_values=px).logits.argmax(-1).numpy() == zt["labels"][i:i + 128]).sum())
    return {"variant": "plain", "train_s": train_s, "samples": seen, "samples_per_s": seen / train_s,
            "test_accuracy": correct / len(zt["labels"]), "steps": step}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=42, help="slimtune variants: train.seed")
    ap.add_argument("--head-lr", type=float, default=None,
                    help="slimtune variants: train.head_lr (default: slimtune's)")
    ap.add_argument("--variants", default="fixed,progressive,plain")
    ap.add_argument("--repeats", type=int, default=1, help="run the variants this many times, interleaved; medians")
    ap.add_argument("--child")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--result")
    ap.add_argument("--result-file", default=None, help="results JSON (default benchmarks/results/bench_vision.json)")
    args = ap.parse_args()
    if args.child:
        data = json.loads(args.data)
        r = (child_plain(args, data, args.out) if args.child == "plain"
             else child_slimtune(args, data, args.out, args.child))
        Path(args.result).write_text(json.dumps(r))
        return
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        sys.exit("Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist")
    tmp = Path(tempfile.mkdtemp(prefix="slimtune-bench-vision-"))
    data = make_data(tmp, args.train, args.test)
    rows = []
    for rep, v in [(r, v) for r in range(args.repeats) for v in args.variants.split(",")]:
        res = tmp / f"result-{v}-{rep}.json"
        cmd = [sys.executable, __file__, "--child", v, "--data", json.dumps(data), "--out", str(tmp / "runs"),
               "--result", str(res), "--train", str(args.train), "--size", str(args.size), "--epochs", str(args.epochs),
               "--precision", args.precision, "--seed", str(args.seed)]
        cmd += ["--head-lr", str(args.head_lr)] if args.head_lr else []
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        r = json.loads(res.read_text())
        r["process_s"] = time.perf_counter() - t
        rows.append(r)
        print(json.dumps(r), flush=True)
    import statistics

    by = {}  # variant -> medians over repeats
    for v in args.variants.split(","):
        rs = [r for r in rows if r["variant"] == v]
        by[v] = {k: statistics.median(r[k] for r in rs) for k in ("train_s", "samples_per_s", "test_accuracy")}
    summary = {"args": {k: v for k, v in vars(args).items() if k not in ("child", "data", "out", "result")},
               "rows": rows, "medians": by}
    if "fixed" in by and "progressive" in by:
        summary["progressive_speedup"] = by["fixed"]["train_s"] / by["progressive"]["train_s"]
    if "fixed" in by and "plain" in by:
        summary["slimtune_vs_plain_throughput"] = by["fixed"]["samples_per_s"] / by["plain"]["samples_per_s"]
        pairs = [(a, b) for a, b in zip([r for r in rows if r["variant"] == "fixed"],
                                        [r for r in rows if r["variant"] == "plain"])]
        summary["slimtune_vs_plain_per_repeat"] = [a["samples_per_s"] / b["samples_per_s"] for a, b in pairs]
    print(f"\n{'variant':<12} {'train s':>8} {'samples/s':>10} {'test acc':>9}")
    for r in rows:
        print(f"{r['variant']:<12} {r['train_s']:>8.1f} {r['samples_per_s']:>10.1f} {r['test_accuracy']:>9.4f}")
    for k in ("progressive_speedup", "slimtune_vs_plain_throughput"):
        if k in summary:
            print(f"{k}: {summary[k]:.3f}")
    if "slimtune_vs_plain_per_repeat" in summary:
        print("slimtune / plain per repeat:", ", ".join(f"{x:.3f}" for x in summary["slimtune_vs_plain_per_repeat"]))
    out = Path(args.result_file) if args.result_file else ROOT / "benchmarks" / "results" / "bench_vision.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
