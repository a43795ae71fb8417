"""grid_lora_lr: LoRA's learning rate on encoder classifiers, measured on more than one dataset and seed.

LoRA's default rate (5e-4) came from the causal-LM side; every encoder benchmark since (bench_core's sweep,
bench_regression, bench_token_classification, the multi-label grid) trained LoRA at 2e-3. This grid measures
the rate on bench_select's two text-classification sets (SST-2, Banking77: the same files, model and budget:
all-MiniLM-L6-v2, 2,000 training rows, 2 epochs, batch 32, max_length 64), at several seeds, and also at
select's rung sizes (223 and 667 rows), where a slow-starting rate loses the race.

    flock /tmp/slimtune-bench.lock python benchmarks/grid_lora_lr.py --datasets ../shared/datasets \
        --lrs 5e-4,1e-3,2e-3 --seeds 42,43 --out benchmarks/results/grid_lora_lr.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine, versions  # noqa: E402
from bench_select import SETS, base_config  # noqa: E402


def one(files: dict, out: Path, lr: float, seed: int, rows: int | None, epochs: float) -> dict:
    """One LoRA run (bench_select's config: r 8, alpha 16, dropout 0.05) at this rate, seed and row count."""
    from slimtune.runner import run

    cfg = base_config(files, str(out), epochs, 32)
    cfg["train"].update({"seed": seed, "lr": lr})
    if rows is not None:
        cfg["data"]["max_train_samples"] = rows
    cfg["output"]["name"] = f"lora-lr{lr}-s{seed}-n{rows}"
    res = run(cfg)
    s = res.summary
    return {"method": "lora", "lr": lr, "seed": seed,
            "rows": rows or files["n_train"], "dev_accuracy": (s.get("best") or {}).get("accuracy"),
            "test_accuracy": (res.test_metrics or {}).get("accuracy"),
            "train_seconds": (s.get("cost") or {}).get("train_seconds") or s.get("train_seconds")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--sets", default="sst2,banking77")
    ap.add_argument("--lrs", default="5e-4,1e-3,2e-3")
    ap.add_argument("--seeds", default="42,43")
    ap.add_argument("--rungs", default="223,667", help="row counts of the short runs (seed = the first one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="slimtune-grid-lora-lr-"))
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    rungs = [int(x) for x in args.rungs.split(",") if x]
    out = {"machine": machine(), "versions": versions(), "rows": []}
    for name in args.sets.split(","):
        files = SETS[name](Path(args.datasets), tmp, 2000)
        if files is None:
            print(f"SKIP {name}: not found under {args.datasets} (set --datasets)")
            continue
        jobs = [(lr, seed, None) for lr in lrs for seed in seeds] + [(lr, seeds[0], n) for n in rungs for lr in lrs]
        for lr, seed, rows in jobs:
            row = {"set": name, **one(files, tmp / name, lr, seed, rows, 2.0)}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
