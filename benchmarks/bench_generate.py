#!/usr/bin/env python
"""Generated replies before and after fine-tuning: SmolLM2-135M-Instruct, base vs a slimtune LoRA fine-tune.

For each dataset the same held-out prompts are answered by the base model and by the fine-tuned one (greedy,
slimtune's batched generation, max 64 new tokens) and scored against the held-out replies with slimtune's
eval.generate scores: chrF (sacrebleu, 0-100), ROUGE-L F1 (rouge-score, 0-1); also the share of replies that
ended with an end-of-turn token within the budget ("stopped") and the mean reply length. The fine-tune is
slimtune's defaults (LoRA r 16 / alpha 32 on every block linear, lr 5e-4 linear, batch 8, max_length 256),
one epoch over the training pairs, `eval.generate: {every: end}` with the best checkpoint.

Datasets (prompt / reply pairs, held-out pairs disjoint, as bench_trl.py builds them):
  chatterbot  the ChatterBot corpus (pip chatterbot-corpus), the first user / assistant turn of each record
  chitchat    the BYU Chit-Chat Challenge corpus (pip chitchat-dataset), one pair of consecutive turns per
              conversation
The pairs are written twice, in two of the formats slimtune reads: OpenAI `messages` for chatterbot and
Alpaca (`instruction` / `output`) for chitchat, so both readers are exercised on real data.

    flock /tmp/slimtune-bench.lock python benchmarks/bench_generate.py                       # ~12 min, 2 cores
    flock /tmp/slimtune-bench.lock python benchmarks/bench_generate.py --pairs 16 --prompts 8  # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine, versions  # noqa: E402
from bench_trl import HP, LORA, SMOLLM, chatterbot_pairs, chitchat_pairs  # noqa: E402

METRICS = ["chrf", "rouge_l"]
FORMATS = {"chatterbot": "messages", "chitchat": "alpaca"}


def write_records(pairs: list[dict], fmt: str, path: Path) -> str:
    if fmt == "messages":
        rows = [{"messages": [{"role": "user", "content": p["prompt"]},
                              {"role": "assistant", "content": p["response"]}]} for p in pairs]
    else:
        rows = [{"instruction": p["prompt"], "input": "", "output": p["response"]} for p in pairs]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def config(train: str, held: str, out: str, prompts: int, max_new: int, max_steps: int | None) -> dict:
    t = {"batch_size": HP["batch_size"], "lr": HP["lr"], "warmup": HP["warmup"], "seed": HP["seed"],
         "precision": "auto", "log_every": 10}
    t.update({"max_steps": max_steps} if max_steps else {"epochs": 1})
    return {"task": "causal-lm", "model": {"name": SMOLLM, "max_length": HP["max_length"]},
            "data": {"train": train, "eval": held}, "method": {"name": "lora", **LORA},
            "train": t, "eval": {"every_epochs": 1, "generate": {"examples": prompts, "max_new_tokens": max_new,
                                                                 "metrics": METRICS, "every": "end"}},
            "output": {"dir": out, "name": "run", "save_checkpoints": False}, "track": {"energy": False}}


def base_scores(cfg_dict: dict) -> dict:
    """The base model on the prompts the fine-tune's eval.generate answers (same records, same rendering)."""
    from transformers import AutoModelForCausalLM

    from slimtune.config import load_config
    from slimtune.models import load_pretrained, load_tokenizer, resolve
    from slimtune.tasks import get_task
    from slimtune.tasks.chat_encoding import end_of_turn_ids
    from slimtune.tasks.generation import generate_batch, score

    cfg = load_config(cfg_dict)
    task = get_task("causal-lm")
    splits = task.load_data(cfg)
    src = resolve(SMOLLM)
    tok = load_tokenizer(src)
    model, _ = load_pretrained(AutoModelForCausalLM, src)
    gen = cfg.eval.generate
    prompts = task.generation_prompts(cfg, tok, splits, gen.examples)
    t0 = time.perf_counter()
    outs = generate_batch(model, tok, [p["prompt_ids"] for p in prompts], gen.max_new_tokens, end_of_turn_ids(tok),
                          gen.batch_size)
    secs = time.perf_counter() - t0
    texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids, _ in outs]
    total, _ = score(texts, [p["reference"] for p in prompts], METRICS)
    return {**total, "stopped": sum(s for _, s in outs) / len(outs),
            "mean_new_tokens": sum(len(ids) for ids, _ in outs) / len(outs), "generate_seconds": round(secs, 1),
            "samples": [{"prompt": p["prompt"], "reference": p["reference"], "output": o}
                        for p, o in list(zip(prompts, texts))[:3]]}


def tuned_scores(cfg_dict: dict) -> dict:
    import slimtune

    res = slimtune.run(cfg_dict)
    lines = [json.loads(x) for x in (Path(res.run_dir) / "generations.jsonl").read_text().splitlines() if x.strip()]
    best = res.summary["best"]
    return {**{m: best[f"gen_{m}"] for m in METRICS},
            "stopped": sum(ln["finish_reason"] == "stop" for ln in lines) / len(lines),
            "eval_loss": best["loss"], "train_seconds": res.summary["train_seconds"],
            "tokens_per_s": res.summary["tokens_per_s"],
            "samples": [{k: ln[k] for k in ("prompt", "reference", "output")} for ln in lines[:3]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=240, help="training pairs per dataset (one epoch)")
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts answered and scored")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=None, help="smoke runs")
    ap.add_argument("--datasets", default="chatterbot,chitchat")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_generate.json"))
    args = ap.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    tmp = tempfile.mkdtemp(prefix="slimtune-bench-gen-")
    results = {}
    try:
        for name in [d for d in args.datasets.split(",") if d]:
            if name == "chitchat":
                try:
                    train, held = chitchat_pairs()
                except ImportError:
                    print("SKIP chitchat: pip install --no-deps chitchat-dataset")
                    continue
            else:
                train, held = chatterbot_pairs(tmp)
            fmt = FORMATS[name]
            tr = write_records(train[:args.pairs], fmt, Path(tmp) / f"{name}-train.jsonl")
            ev = write_records(held[:max(args.prompts, 16)], fmt, Path(tmp) / f"{name}-eval.jsonl")
            cfg = config(tr, ev, str(Path(tmp) / name), args.prompts, args.max_new_tokens, args.max_steps)
            print(f"[{name}] base model ...", flush=True)
            base = base_scores(json.loads(json.dumps(cfg)))
            print(f"  base {({k: base[k] for k in METRICS + ['stopped']})}", flush=True)
            print(f"[{name}] fine-tune ({fmt} records) ...", flush=True)
            tuned = tuned_scores(json.loads(json.dumps(cfg)))
            print(f"  tuned {({k: tuned[k] for k in METRICS + ['stopped']})}", flush=True)
            results[name] = {"format": fmt, "train_pairs": min(args.pairs, len(train)), "prompts": args.prompts,
                             "base": base, "tuned": tuned}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = ["| dataset (format) | model | chrF | ROUGE-L | stopped |", "|---|---|---|---|---|"]
    for name, r in results.items():
        for who in ("base", "tuned"):
            x = r[who]
            rows.append(f"| {name} ({r['format']}) | {who} | {x['chrf']:.1f} | {x['rouge_l']:.3f} | "
                        f"{100 * x['stopped']:.0f}% |")
    md = "\n".join(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/bench_generate.py"] + (argv if argv is not None else sys.argv[1:])),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "versions": versions(
            ("slimtune", "torch", "transformers", "peft", "sacrebleu", "rouge_score")),
        "hyperparameters": HP, "lora": LORA, "max_new_tokens": args.max_new_tokens, "results": results,
        "table_md": md}, indent=2, default=str))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
