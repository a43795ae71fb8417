"""probe_decoder_head: does a decoder classifier's new head start too hot, and would a zero-initialised head make
it an earlier starter? (the question bench_select's SST-2 miss left: SmolLM2-135M + LoRA leads in full but trails
MiniLM at select's rungs).

SmolLM2-135M-Instruct as a sequence classifier + LoRA, on bench_select's data and config (2,000 train rows, 300
dev rows, 2 epochs = 126 steps at batch 32, eval every 1/9 of the run), paused at 1/3 of its steps (select's rung 1)
so the learning-rate schedule is the full run's. Variants: `default` (transformers' head init, normal(0, 0.02)) and
`zero` (the head's weight set to zero before the first step). Reported per dataset and seed: the first logged
training losses and the dev accuracy at each evaluation up to the pause. A measurement for choosing a default, not
a default itself.

    flock /tmp/slimtune-bench.lock python benchmarks/probe_decoder_head.py [--sets sst2,banking77] [--seeds 42,43]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine, versions  # noqa: E402
from bench_select import SETS, base_config  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ZeroHead:
    """Sets the new head's weight (transformers' `score` of a decoder classifier) to zero before the first step."""

    def on_train_begin(self, loop):
        import torch

        model = loop.accelerator.unwrap_model(loop.model)
        heads = [m for n, m in model.named_modules() if n.endswith("score") and hasattr(m, "weight")]
        assert heads, "no score head found"
        with torch.no_grad():
            for m in heads:
                m.weight.zero_()


def one(files: dict, out: str, variant: str, seed: int) -> dict:
    from slimtune.runner import run
    from slimtune.train.callbacks import PauseAt

    cfg = base_config(files, out, 2.0, 32)
    cfg["model"]["name"] = SMOLLM2
    cfg["train"].update(seed=seed, log_every=2)
    cfg["eval"] = {"every_epochs": 2 / 9, "metrics": ["accuracy"]}
    cfg["output"]["name"] = f"{variant}-{seed}"
    callbacks = [PauseAt(1 / 3)] + ([ZeroHead()] if variant == "zero" else [])
    result = run(cfg, callbacks=callbacks)
    recs = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"first_train_losses": [round(r["loss"], 3) for r in recs if r["type"] == "train"][:5],
            "dev_accuracy": {r["step"]: r["eval_accuracy"] for r in recs if r["type"] == "eval"},
            "status": result.status}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="sst2,banking77")
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--variants", default="default,zero")
    ap.add_argument("--datasets", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "probe_decoder_head.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="slimtune-probe-head-"))
    out = {"machine": machine(), "versions": versions(), "runs": {}}
    t0 = time.perf_counter()
    for name in args.sets.split(","):
        files = SETS[name](Path(args.datasets), tmp, 2000)
        if files is None:
            print(f"SKIP {name}: not found under {args.datasets}")
            continue
        for seed in (int(s) for s in args.seeds.split(",")):
            for variant in args.variants.split(","):
                row = one(files, str(tmp / name), variant, seed)
                out["runs"][f"{name}/{seed}/{variant}"] = row
                print(f"RESULT {name} seed {seed} {variant}: {json.dumps(row)}", flush=True)
                out["wall_seconds"] = time.perf_counter() - t0
                Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
