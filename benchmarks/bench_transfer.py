"""Transfer-learning techniques vs plain LoRA, same budget, 3 seeds, two datasets.

all-MiniLM-L6-v2 with LoRA (r 8) on SST-2 (binary) and Banking77 (77 intents):
plain, + layer-wise lr decay (0.8), staged (head first, 10%), gradual unfreezing
(one group per 1/6 of the steps), the head at 10x the lr (throughout, or staged). Mean and spread of
test accuracy, and wall time.

    python benchmarks/bench_transfer.py [--seeds 0,1,2] [--sst2-train 1500] [--banking-train 2500] [--variants a,b]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, run_result_child, versions  # noqa: E402

VARIANTS = {
    "lora": {},  # the defaults (a new head at 10x the lr, at most 2e-2: api.default_head_lr)
    "lora_head_1x": lambda lr: {"head_lr": lr},  # one rate for head and adapters (the default before)
    "lora+layer_decay": {"layer_decay": 0.8},
    "staged": {"strategy": "staged", "staged": {"head_fraction": 0.1, "head_lr_mult": 1.0}},
    "gradual_unfreeze": {"unfreeze": {"every_epochs": 0.15, "start": 1}},
    # the randomly initialised head at 10x the adapters' lr: throughout, or in a head-only first stage
    "head_lr_x10": lambda lr: {"head_lr": 10 * lr},
    "staged_x10": {"strategy": "staged", "staged": {"head_fraction": 0.1, "head_lr_mult": 10.0}},
}


def dataset_cfg(name: str, args) -> dict:
    if name == "sst2":
        d = DATA / "sst2"
        return {"train": str(d / "train.tsv"), "eval": str(d / "dev.tsv"), "test": str(d / "test.tsv"),
                "text_column": "sentence", "max_train_samples": args.sst2_train, "max_eval_samples": 500}
    d = DATA / "banking77"
    return {"train": str(d / "train.csv"), "test": str(d / "test.csv"), "label_column": "category",
            "max_train_samples": args.banking_train, "eval_fraction": 0.1}


def one(ds: str, variant: str, seed: int, args) -> dict:
    import slimtune

    lr = 1e-3 if ds == "sst2" else 3e-3
    extra = VARIANTS[variant](lr) if callable(VARIANTS[variant]) else VARIANTS[variant]
    cfg = {
        "task": "text-classification",
        "model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "max_length": 64},
        "data": dataset_cfg(ds, args),
        "method": {"name": "lora", "r": 8},
        "train": {"epochs": 1 if ds == "sst2" else 3, "batch_size": 32, "lr": lr,
                  "seed": seed, **extra},
        "eval": {"every_epochs": 1.0},
        "output": {"dir": args.out, "name": f"{ds}-{variant}-{seed}"},
        "track": {"energy": False},
    }
    if ds == "banking77":
        cfg["data"]["split_seed"] = seed
    res = slimtune.run(cfg)
    return {"dataset": ds, "variant": variant, "seed": seed, "test_accuracy": res.test_metrics["accuracy"],
            "wall_s": res.summary["wall_seconds"], "train_s": res.summary["train_seconds"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sst2-train", type=int, default=1500)
    ap.add_argument("--banking-train", type=int, default=2500)
    ap.add_argument("--datasets", default="sst2,banking77")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each run wait up to S seconds until other processes use < 0.3 cores")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "bench_transfer.json"))
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} not found (the shared datasets folder is not part of the repository)")
        return
    if args.child:
        ds, variant, seed = args.child.split(":")
        print("RESULT " + json.dumps(one(ds, variant, int(seed), args)))
        return
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; accepted: {', '.join(VARIANTS)}")
    out = args.out or tempfile.mkdtemp(prefix="bench-transfer-")
    rows = []
    for ds in args.datasets.split(","):
        for variant in args.variants.split(","):
            for seed in args.seeds.split(","):
                cmd = [sys.executable, __file__, "--child", f"{ds}:{variant}:{seed}", "--out", out,
                       "--sst2-train", str(args.sst2_train), "--banking-train", str(args.banking_train)]
                row, err = run_result_child(cmd, args.wait_quiet)
                if row is None:
                    print(f"{ds} {variant} {seed} failed:\n{err[-2000:]}", file=sys.stderr)
                    continue
                rows.append(row)
                print(rows[-1], file=sys.stderr, flush=True)
    record = {"machine": machine(), "versions": versions(),
              "args": {k: v for k, v in vars(args).items() if k != "child"}, "rows": rows}
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(record, indent=2))
    print(f"\nall-MiniLM-L6-v2 + LoRA r8, max_length 64, batch 32, seeds {args.seeds}; SST-2: {args.sst2_train} train, "
          f"1 epoch, lr 1e-3, test = GLUE dev (872); Banking77: {args.banking_train} train, 3 epochs, lr 3e-3, "
          "test 3,080\n")
    print("| dataset | variant | test acc mean | std | min | max | train s (mean) |")
    print("|---|---|---|---|---|---|---|")
    for ds in args.datasets.split(","):
        for variant in args.variants.split(","):
            r = [x for x in rows if x["dataset"] == ds and x["variant"] == variant]
            if not r:
                continue
            acc = [x["test_accuracy"] for x in r]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            print(f"| {ds} | {variant} | {statistics.mean(acc):.4f} | {sd:.4f} | {min(acc):.4f} | {max(acc):.4f} | "
                  f"{statistics.mean(x['train_s'] for x in r):.1f} |")


if __name__ == "__main__":
    main()
