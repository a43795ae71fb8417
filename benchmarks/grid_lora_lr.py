"""grid_lora_lr: LoRA's learning rate on encoder classifiers, measured on more than one dataset and seed.

LoRA's default rate (5e-4) came from the causal-LM side; every encoder benchmark since (bench_core's sweep,
bench_regression, bench_token_classification, the multi-label grid) trained LoRA at 2e-3. This grid measures
the rate on bench_select's two text-classification sets (SST-2, Banking77: the same files, model and budget:
all-MiniLM-L6-v2, 2,000 training rows, 2 epochs, batch 32, max_length 64), at several seeds, and also at
select's rung sizes (223 and 667 rows), where a slow-starting rate loses the race.

    flock /tmp/slimtune-bench.lock python benchmarks/grid_lora_lr.py --datasets ../shared/datasets \
        --lrs 5e-4,1e-3,2e-3 --seeds 42,43 --out benchmarks/results/grid_lora_lr.json

`--model` measures another backbone on the same grid, `--head-lrs` the new head's rate: a decoder as a classifier
(SmolLM2-135M-Instruct, last-token pooling) was unstable at the encoder's rates (probe_decoder_head), and the
features its head reads are ~27x larger than MiniLM's (`--scale-only` prints the mean L1 norm of the head's input
on each set's first 32 training rows, for both models):

    flock /tmp/slimtune-bench.lock python benchmarks/grid_lora_lr.py --model HuggingFaceTB/SmolLM2-135M-Instruct \
        --sets sst2 --lrs 2e-3 --head-lrs default,2e-3,7e-4 --seeds 42,43 --rungs "" \
        --out benchmarks/results/grid_lora_lr_smollm2.json
    python benchmarks/grid_lora_lr.py --scale-only
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
from bench_select import MINILM, SETS, base_config  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def one(files: dict, out: Path, lr: float, seed: int, rows: int | None, epochs: float, model: str | None = None,
        head_lr: float | None = None) -> dict:
    """One LoRA run (bench_select's config: r 8, alpha 16, dropout 0.05) at this rate, seed and row count; `model`
    replaces MiniLM, `head_lr` sets the head's rate (None: the default, 10x lr at most 2e-2)."""
    from slimtune.runner import run

    cfg = base_config(files, str(out), epochs, 32)
    cfg["train"].update({"seed": seed, "lr": lr})
    if model:
        cfg["model"]["name"] = model
    if head_lr is not None:
        cfg["train"]["head_lr"] = head_lr
    if rows is not None:
        cfg["data"]["max_train_samples"] = rows
    cfg["output"]["name"] = f"lora-lr{lr}-h{head_lr}-s{seed}-n{rows}"
    res = run(cfg)
    s = res.summary
    evals = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"method": "lora", "lr": lr, "head_lr": cfg["train"].get("head_lr", "default"), "seed": seed,
            "dev_curve": [round(r["eval_accuracy"], 4) for r in evals if r["type"] == "eval"],
            "rows": rows or files["n_train"], "dev_accuracy": (s.get("best") or {}).get("accuracy"),
            "test_accuracy": (res.test_metrics or {}).get("accuracy"),
            "train_seconds": (s.get("cost") or {}).get("train_seconds") or s.get("train_seconds")}


def head_input_l1(model_name: str, files: dict, n: int = 32) -> float:
    """The mean L1 norm of what a new classification head reads (its first linear layer's input; for a decoder,
    at the last non-pad token, which transformers' `*ForSequenceClassification` pools) on the first n training
    texts, max_length 64: an AdamW step moves a logit by about the head's rate x this norm."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from slimtune.data.readers import read_source
    from slimtune.models import resolve

    src = resolve(model_name)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(src.path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(src.path, num_labels=2, **kw).eval()
    model.config.pad_token_id = tok.pad_token_id
    head = model.score if hasattr(model, "score") else model.classifier
    first = next(m for m in head.modules() if isinstance(m, torch.nn.Linear))
    seen = []
    first.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    texts = [str(t) for t in read_source(files["train"])[files["text_column"]][:n]]
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    x = seen[0]
    if x.dim() == 3:
        last = (torch.arange(x.shape[1]) * (batch["input_ids"] != tok.pad_token_id).int()).argmax(-1)
        x = x[torch.arange(len(x)), last]
    return round(x.abs().sum(-1).mean().item(), 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--sets", default="sst2,banking77")
    ap.add_argument("--lrs", default="5e-4,1e-3,2e-3")
    ap.add_argument("--seeds", default="42,43")
    ap.add_argument("--rungs", default="223,667", help="row counts of the short runs (seed = the first one)")
    ap.add_argument("--model", default=None, help="the backbone (default: bench_select's all-MiniLM-L6-v2)")
    ap.add_argument("--head-lrs", default="default", help="the head's rates, e.g. default,2e-3,7e-4")
    ap.add_argument("--scale-only", action="store_true", help="print the head input's L1 norm per set and model")
    ap.add_argument("--out", default=None, help="JSON file; rows already in it are kept and added to")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="slimtune-grid-lora-lr-"))
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    rungs = [int(x) for x in args.rungs.split(",") if x]
    heads = [None if x == "default" else float(x) for x in args.head_lrs.split(",")]
    out = {"machine": machine(), "versions": versions(), "rows": []}
    if args.out and Path(args.out).is_file():  # a grid measured in pieces: rows accumulate (delete it to restart)
        out["rows"] = json.loads(Path(args.out).read_text())["rows"]
    for name in args.sets.split(","):
        files = SETS[name](Path(args.datasets), tmp, 2000)
        if files is None:
            print(f"SKIP {name}: not found under {args.datasets} (set --datasets)")
            continue
        if args.scale_only:
            for model in (MINILM, SMOLLM2):
                print(f"{name} {model}: head input L1 {head_input_l1(model, files)}", flush=True)
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
