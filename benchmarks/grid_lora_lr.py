"""grid_lora_lr: LoRA's learning rate on encoder classifiers, measured on more than one dataset and seed.

LoRA's default rate (5e-4) came from the causal-LM side; every encoder benchmark since (bench_core's sweep,
bench_regression, bench_token_classification, the multi-label grid) trained LoRA at 2e-3. This grid measures
the rate on bench_select's two text-classification sets (SST-2, Banking77: the same files, model and budget:
all-MiniLM-L6-v2, 2,000 training rows, 2 epochs, batch 32, max_length 64), at several seeds, and also at
select's rung sizes (223 and 667 rows), where a slow-starting rate loses the race.

    flock /tmp/slimtune-bench.lock python benchmarks/grid_lora_lr.py --datasets ../shared/datasets \
        --lrs 5e-4,1e-3,2e-3 --seeds 42,43 --out benchmarks/results/grid_lora_lr.json

`--model` measures another backbone on the same grid: a decoder as a classifier (SmolLM2-135M-Instruct, last-token
pooling) was unstable at the encoder's rates (probe_decoder_head), so its rate is measured the same way:

    flock /tmp/slimtune-bench.lock python benchmarks/grid_lora_lr.py --model HuggingFaceTB/SmolLM2-135M-Instruct \
        --lrs 5e-4,1e-3,2e-3 --seeds 42,43 --out benchmarks/results/grid_lora_lr_smollm2.json
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


def one(files: dict, out: Path, lr: float, seed: int, rows: int | None, epochs: float, model: str | None = None,
        head_mult: float | None = None) -> dict:
    """One LoRA run (bench_select's config: r 8, alpha 16, dropout 0.05) at this rate, seed and row count; `model`
    replaces MiniLM, `head_mult` sets the head's rate as a multiple of lr (None: the default, 10x at most 2e-2)."""
    from slimtune.runner import run

    cfg = base_config(files, str(out), epochs, 32)
    cfg["train"].update({"seed": seed, "lr": lr})
    if model:
        cfg["model"]["name"] = model
    if head_mult is not None:
        cfg["train"]["head_lr"] = lr * head_mult
    if rows is not None:
        cfg["data"]["max_train_samples"] = rows
    cfg["output"]["name"] = f"lora-lr{lr}-h{head_mult}-s{seed}-n{rows}"
    res = run(cfg)
    s = res.summary
    evals = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"method": "lora", "lr": lr, "head_lr": cfg["train"].get("head_lr", "default"), "seed": seed,
            "dev_curve": [round(r["eval_accuracy"], 4) for r in evals if r["type"] == "eval"],
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
    ap.add_argument("--model", default=None, help="the backbone (default: bench_select's all-MiniLM-L6-v2)")
    ap.add_argument("--head-mults", default="", help="head lr as multiples of lr, e.g. 1,10 (default: the default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="slimtune-grid-lora-lr-"))
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    rungs = [int(x) for x in args.rungs.split(",") if x]
    heads = [float(x) for x in args.head_mults.split(",") if x] or [None]
    out = {"machine": machine(), "versions": versions(), "rows": []}
    for name in args.sets.split(","):
        files = SETS[name](Path(args.datasets), tmp, 2000)
        if files is None:
            print(f"SKIP {name}: not found under {args.datasets} (set --datasets)")
            continue
        grid = [(lr, h) for lr in lrs for h in heads]
        jobs = [(lr, h, seed, None) for lr, h in grid for seed in seeds] + [(lr, h, seeds[0], n) for n in rungs
                                                                            for lr, h in grid]
        for lr, h, seed, rows in jobs:
            row = {"set": name, "model": args.model or "default",
                   **one(files, tmp / name, lr, seed, rows, 2.0, args.model, h)}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
