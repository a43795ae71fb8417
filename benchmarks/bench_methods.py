"""Every PEFT method at its defaults on all-MiniLM-L6-v2 + SST-2: which method should I use?

Same data (a fixed train subset), steps, batch size, lr schedule and seed for every
method; each method runs in its own process so peak memory is its own. Prints a
markdown table: test accuracy, trainable share, wall time, samples/s, peak RSS,
adapter size on disk.

    python benchmarks/bench_methods.py [--train 2000] [--epochs 1] [--methods lora,ia3,...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, run_result_child, versions  # noqa: E402
SST2 = ROOT.parent / "shared" / "datasets" / "sst2"
# each method's own default lr (methods/*.py `default_lr`, chosen from this benchmark); the LoRA family
# (no default_lr: train.lr's 5e-4) runs at 1e-3, the rate the LoRA rows of RESULTS.md were measured at
LORA_FAMILY_LR = 1e-3
LR: dict[str, float] = {}


def lr_for(method: str) -> float:
    if method in LR:
        return LR[method]
    from slimtune.methods import REGISTRY

    return REGISTRY[method].default_lr or LORA_FAMILY_LR


def one(method: str, args) -> dict:
    import slimtune

    cfg = {
        "task": "text-classification",
        "model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "max_length": 64},
        "data": {"train": str(SST2 / "train.tsv"), "eval": str(SST2 / "dev.tsv"), "test": str(SST2 / "test.tsv"),
                 "text_column": "sentence", "max_train_samples": args.train, "max_eval_samples": 500},
        "method": {"name": method},
        "train": {"epochs": args.epochs, "batch_size": 32, "lr": lr_for(method), "seed": 0},
        "eval": {"every_epochs": 1.0},
        "output": {"dir": args.out, "name": method},
    }
    res = slimtune.run(cfg)
    adapter = res.run_dir / "adapter"
    size = sum(f.stat().st_size for f in adapter.iterdir() if f.suffix == ".safetensors")
    s = res.summary
    return {"method": method, "test_accuracy": res.test_metrics["accuracy"], "share": s["trainable_share"],
            "trainable": s["trainable_params"], "wall_s": s["wall_seconds"], "train_s": s["train_seconds"],
            "samples_per_s": s["samples_per_s"], "peak_rss_mb": s["cost"]["host_peak_rss_mb"],
            "adapter_mb": size / 2**20, "lr": cfg["train"]["lr"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--methods", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each method wait up to S seconds until other processes use < 0.3 cores")
    ap.add_argument("--lr", default="", help="per-method lr overrides: method=lr,method=lr (default: the LR table)")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "bench_methods.json"))
    args = ap.parse_args()
    for item in filter(None, args.lr.split(",")):
        name, _, value = item.partition("=")
        LR[name.strip()] = float(value)
    if not SST2.is_dir():
        print(f"skipped: {SST2} not found (the shared datasets folder is not part of the repository)")
        return
    if args.child:
        print("RESULT " + json.dumps(one(args.child, args)))
        return
    from slimtune.methods import REGISTRY

    methods = args.methods.split(",") if args.methods else [m for m in REGISTRY if m not in ("qlora", "prefix-tuning")]
    out = args.out or tempfile.mkdtemp(prefix="bench-methods-")
    rows = []
    for m in methods:
        cmd = [sys.executable, __file__, "--child", m, "--train", str(args.train), "--epochs", str(args.epochs),
               "--out", out, "--lr", args.lr]
        row, err = run_result_child(cmd, args.wait_quiet)
        if row is None:
            print(f"{m}: failed\n{err[-2000:]}", file=sys.stderr)
            rows.append({"method": m, "error": err.strip().splitlines()[-1] if err.strip() else "failed"})
            continue
        rows.append(row)
        print(f"{m}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"\nall-MiniLM-L6-v2, SST-2: {args.train} train examples, {args.epochs} epoch(s), batch 32, max_length 64, "
          f"linear schedule, seed 0, bf16 autocast where available; test = SST-2 dev (872)\n")
    print("| method | test acc | trainable | share | lr | train s | samples/s | peak RSS MB | adapter MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r.get("test_accuracy", -1)):
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error'][:60]} | | | | | | | |")
            continue
        print(f"| {r['method']} | {r['test_accuracy']:.4f} | {r['trainable']:,} | {r['share']:.3%} | {r['lr']:g} | "
              f"{r['train_s']:.1f} | {r['samples_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['adapter_mb']:.2f} |")
    record = {"machine": machine(), "versions": versions(), "train": args.train, "epochs": args.epochs, "rows": rows}
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(record, indent=2))
    print(f"\nraw results: {args.result}")


if __name__ == "__main__":
    main()
