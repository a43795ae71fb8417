#!/usr/bin/env python
"""Pruning rules replayed on recorded learning curves: which rule keeps the best trial at what cost.

A pruned sweep (bench_sweep.py) answers for one rule, one trial order and one set of parameters, in
11 minutes. This benchmark records the full learning curve of every trial once (every evaluation's
dev accuracy and the seconds from the trial's start to it) and then replays optuna's own pruners on
those curves, exactly as `slimtune sweep` calls them (PruningCallback: report at every evaluation as
step 1, 2, ...; ask should_prune() only after the trial's lr warmup and before its last evaluation),
over many 20-trial sweeps drawn from the recorded trials, in many orders. What a replay cannot show:
how the sampler would have reacted to the pruning (the parameters are fixed); bench_sweep.py measures
that for the rule chosen here.

Setup: bench_sweep.py's (all-MiniLM-L6-v2 + LoRA, SST-2: 1,280 train rows, the first 300 dev rows,
the 872-row test set; 120 steps, 9 evaluations, seed 42). The parameter sets are those the sweeps in
benchmarks/results/bench_sweep*.json sampled (TPE over lr, rank, dropout, warmup), plus --random N
drawn uniformly from the same space. `record` resumes: it adds the sets of bench_sweep runs made since
(the committed curves: the 49 sets of the runs before bench_sweep_rf4.json, and 20 random ones).

    flock /tmp/slimtune-bench.lock python benchmarks/bench_prune_replay.py record    # ~21 s per trial
    python benchmarks/bench_prune_replay.py simulate                                  # seconds; no training

Results: benchmarks/results/prune_curves.json (the curves; `record` resumes it) and
benchmarks/results/bench_prune_replay.json (per rule: mean / worst cost as a fraction of the unpruned
sweep, how often the best trial's test accuracy is at most 0.5 point below).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine, versions, write_subset  # noqa: E402
from bench_sweep import DEFAULT_DATASETS, SPACE, base_config, params  # noqa: E402

CURVES = HERE / "results" / "prune_curves.json"
KEYS = tuple(SPACE)


def _key(p: dict) -> str:
    return json.dumps([round(float(p[k]), 10) for k in KEYS])


def param_sets(random_n: int, seed: int) -> list[dict]:
    """Every distinct parameter set of the recorded bench_sweep runs (same setup), then random draws."""
    out, seen = [], set()
    for f in sorted(glob.glob(str(HERE / "results" / "bench_sweep*.json"))):
        d = json.loads(Path(f).read_text())
        p = d.get("params", {})
        if p.get("evals") != 9 or p.get("n_train") != 1280:
            continue
        for v in ("pruned", "unpruned"):
            for t in d.get("results", {}).get(v, {}).get("trials", []):
                ps = {k: t[k] for k in KEYS}
                if _key(ps) not in seen:
                    seen.add(_key(ps))
                    out.append({**ps, "source": Path(f).name})
    rng = random.Random(seed)
    for _ in range(random_n):
        lr = math.exp(rng.uniform(math.log(SPACE["train.lr"]["low"]), math.log(SPACE["train.lr"]["high"])))
        ps = {"train.lr": lr, "method.r": rng.choice(SPACE["method.r"]),
              "method.dropout": rng.uniform(SPACE["method.dropout"]["low"], SPACE["method.dropout"]["high"]),
              "train.warmup": rng.uniform(SPACE["train.warmup"]["low"], SPACE["train.warmup"]["high"])}
        if _key(ps) not in seen:
            seen.add(_key(ps))
            out.append({**ps, "source": f"random:{seed}"})
    return out


class _Recorder:
    """Loop callback: each evaluation's step, metrics and seconds since the trial started."""

    def __init__(self, t0: float):
        self.t0, self.evals, self.warmup, self.total = t0, [], None, None

    def on_eval_end(self, loop, metrics: dict) -> None:
        self.warmup, self.total = getattr(loop, "warmup", 0) or 0, loop.total_steps
        self.evals.append({"step": loop.state["step"], "accuracy": float(metrics["accuracy"]),
                           "loss": float(metrics.get("loss", float("nan"))), "seconds": time.perf_counter() - self.t0})


def record(args) -> int:
    sst2 = Path(args.datasets) / "sst2"
    if not (sst2 / "train.tsv").is_file():
        print(f"SKIP: {sst2} not found (the shared datasets folder ../shared/datasets is absent; set --datasets)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from slimtune.api import run
    from slimtune.config import load_config

    store = json.loads(CURVES.read_text()) if CURVES.exists() else {"trials": []}
    done = {_key(t["params"]) for t in store["trials"]}
    todo = [p for p in param_sets(args.random, args.seed) if _key(p) not in done]
    if args.limit:
        todo = todo[: args.limit]
    print(f"{len(done)} curves recorded, {len(todo)} to record", flush=True)
    p = params(False)
    tmp = tempfile.mkdtemp(prefix="slimtune-prune-replay-")
    files = {k: str(Path(tmp) / f"sst2_{k}.tsv") for k in ("train", "dev", "test")}
    write_subset(sst2 / "train.tsv", Path(files["train"]), p["n_train"])
    write_subset(sst2 / "dev.tsv", Path(files["dev"]), p["n_dev"])
    write_subset(sst2 / "test.tsv", Path(files["test"]), None)
    plan = {"params": p, "files": files}
    store.update(setup=p, machine=machine(), versions=versions())
    for i, ps in enumerate(todo):
        cfg = base_config(plan, os.path.join(tmp, "runs"))
        cfg["train"]["log_every"] = 1000
        cfg["eval"]["metrics"] = ["accuracy", "loss"]  # loss too: rules that prune on it (sweep.prune_on: loss)
        overrides = [f"{k}={ps[k]}" for k in KEYS]
        t0 = time.perf_counter()
        rec = _Recorder(t0)
        res = run(load_config(cfg, overrides), callbacks=[rec])
        seconds = time.perf_counter() - t0
        store["trials"].append({"params": {k: ps[k] for k in KEYS}, "source": ps["source"], "warmup_steps": rec.warmup,
                                "total_steps": rec.total, "evals": rec.evals, "seconds": seconds,
                                "best_accuracy": max(e["accuracy"] for e in rec.evals),
                                "test_accuracy": (res.test_metrics or {}).get("accuracy")})
        tmp_out = CURVES.with_suffix(".tmp")
        tmp_out.write_text(json.dumps(store, indent=1))
        os.replace(tmp_out, CURVES)
        print(f"[{i + 1}/{len(todo)}] {ps['train.lr']:.2e} r{ps['method.r']} warmup {ps['train.warmup']:.2f}: "
              f"{' '.join('%.2f' % e['accuracy'] for e in rec.evals)}  "
              f"test {store['trials'][-1]['test_accuracy']:.4f}  "
              f"{seconds:.1f}s", flush=True)
    return 0


# -- replay ----------------------------------------------------------------------------------

# A rule's name says it: <pruner>[-rf<N>][-after<N>|-post<N>][-startup<N>][-patience<N>][-loss][-post|-nograce]
#   sh = successive-halving, hyperband, median, none; after = sweep.prune_after (default 1);
#   -post: the resource counts evaluations after the trial's lr warmup (nothing reported during it);
#   -nograce: pruned also while the trial's warmup runs (slimtune never does that);
#   -loss: the pruner compares the eval loss (sweep.prune_on: loss; the objective stays accuracy);
#   -patience<N>: optuna's PatientPruner around it (the pruner is asked only after N evaluations without a new best)
RULES = ("none", "median", "median-after3", "median-startup5-after2", "sh-rf3-after1", "sh-rf3-after2", "sh-rf3-after3",
         "sh-rf4-after1", "sh-rf4-after2", "sh-rf5-after2", "sh-rf6-after2", "sh-rf9-after2", "sh-rf2-after1",
         "sh-rf2-after2", "sh-rf3-after1-nograce", "sh-rf3-after2-nograce", "sh-rf3-post1", "sh-rf3-post2",
         "sh-rf4-post2", "hyperband-rf3-after1", "hyperband-rf3-after2")


def parse_rule(name: str) -> dict:
    parts = name.split("-")
    kind = {"sh": "successive-halving"}.get(parts[0], parts[0])
    if kind not in ("none", "median", "successive-halving", "hyperband"):
        raise SystemExit(f"rule {name!r}: unknown pruner {parts[0]!r} (none, median, sh, hyperband)")
    rule = {"kind": kind, "after": 1, "rf": 3, "startup": 3, "resource": "eval", "patience": None, "metric": "accuracy"}
    for p in parts[1:]:
        if p in ("post", "nograce"):
            rule["resource"] = p
        elif p == "loss":
            rule["metric"] = "loss"
        elif p.startswith("post") and p[4:].isdigit():
            rule["resource"], rule["after"] = "post", int(p[4:])
        else:
            for key in ("rf", "after", "startup", "patience"):
                if p.startswith(key) and p[len(key):].isdigit():
                    rule[key] = int(p[len(key):])
                    break
            else:
                raise SystemExit(f"rule {name!r}: cannot read {p!r}")
    return rule


def make_pruner(rule: dict):
    """The pruner `slimtune sweep` builds for these settings (engine.make_pruner), optionally wrapped."""
    import optuna

    from slimtune.sweep.engine import make_pruner as sweep_pruner

    pruner = sweep_pruner(rule["kind"], startup_trials=rule["startup"], prune_after=rule["after"],
                          reduction_factor=rule["rf"])
    if rule["patience"] is not None and rule["kind"] != "none":  # asks the pruner only once the trial stopped improving
        pruner = optuna.pruners.PatientPruner(pruner, patience=rule["patience"])
    return pruner


def replay(trials: list[dict], rule: dict) -> dict:
    """One sweep over `trials` in this order; returns its cost and which trial it finds best."""
    import optuna

    resource = rule["resource"]
    # a fixed name: hyperband assigns trials to brackets by a hash of the study name and trial number
    study = optuna.create_study(study_name="replay", direction="maximize", pruner=make_pruner(rule))
    cost, done = 0.0, []
    for t in trials:
        trial = study.ask()
        warm_evals = sum(e["step"] <= t["warmup_steps"] for e in t["evals"])
        pruned_at = None
        for i, e in enumerate(t["evals"], 1):
            step = i - warm_evals if resource == "post" else i
            if step < 1:  # "post": nothing reported during the warmup
                continue
            trial.report(e["accuracy"] if rule["metric"] == "accuracy" else -e["loss"], step)
            grace = t["warmup_steps"] if resource != "nograce" else 0
            if grace < e["step"] < t["total_steps"] and trial.should_prune():
                pruned_at = i
                break
        if pruned_at is None:
            value = max(e["accuracy"] for e in t["evals"])
            study.tell(trial, value)
            cost += t["seconds"]
            done.append(t)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            cost += t["evals"][pruned_at - 1]["seconds"]
    return {"cost": cost, "completed": done}


def best_test(trials: list[dict]) -> float | None:
    """Test accuracy of the best trial by dev accuracy; where several tie on dev (1 example in 300 is
    0.33 point), the mean of their test accuracies: which of them a study returns is unspecified."""
    if not trials:
        return None
    top = max(t["best_accuracy"] for t in trials)
    tied = [t["test_accuracy"] for t in trials if t["best_accuracy"] == top]
    return sum(tied) / len(tied)


def evaluate(rule: dict, sweeps: list[list[dict]]) -> dict:
    """A rule over many sweeps: cost (trial seconds against no pruning; the sweep's own overhead aside), how
    often the best trial's test accuracy is at most 0.5 point below the unpruned sweep's, and both at once."""
    costs, kept, within, both, deltas = [], 0, 0, 0, []
    for trials in sweeps:
        r = replay(trials, rule)
        costs.append(r["cost"] / sum(t["seconds"] for t in trials))
        got = r["completed"]
        kept += bool(got) and max(t["best_accuracy"] for t in got) >= max(t["best_accuracy"] for t in trials)
        d = 100 * ((best_test(got) or 0.0) - best_test(trials))
        deltas.append(d)
        within += d >= -0.5
        # the benchmark's two targets (cost <= 0.40x, test >= -0.5 pt) in one sweep
        both += d >= -0.5 and costs[-1] <= 0.40
    n = len(sweeps)
    return {"rule": rule, "mean_cost": sum(costs) / n, "worst_cost": max(costs), "best_kept": kept / n,
            "test_at_most_0.5_below": within / n, "both_targets": both / n, "mean_test_delta_pt": sum(deltas) / n,
            "worst_test_delta_pt": min(deltas)}


def draw_sweeps(pool: list[dict], n: int, size: int, rng: random.Random) -> list[list[dict]]:
    return [rng.sample(pool, min(size, len(pool))) for _ in range(n)]


def simulate(args) -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    store = json.loads(Path(args.curves).read_text())
    pool = [t for t in store["trials"] if t["test_accuracy"] is not None]
    rng = random.Random(args.seed)
    sweeps = draw_sweeps(pool, args.sweeps, args.trials, rng)
    rules = [r.strip() for r in args.rules.split(",")] if args.rules else list(RULES)
    parsed = {name: parse_rule(name) for name in rules}
    out = {}
    print(f"{len(pool)} recorded trials; {len(sweeps)} sweeps of {args.trials} drawn from them (seed {args.seed})"
          + (f"; 90% intervals from {args.bootstrap} resamples of the recorded trials" if args.bootstrap else "")
          + "\n")
    print("| rule | mean cost | worst cost | best kept (dev) | test at most 0.5 pt below | both targets "
          "| mean test delta (pt) | worst delta |")
    print("|---|---|---|---|---|---|---|---|")
    for name in rules:
        o = out[name] = evaluate(parsed[name], sweeps)
        ci = ""
        if args.bootstrap:  # the pool itself is a sample (69 curves, one seed each): resample it, draw the sweeps again
            brng = random.Random(args.seed + 1)
            reps = [evaluate(parsed[name], draw_sweeps(brng.choices(pool, k=len(pool)), args.bootstrap_sweeps,
                                                       args.trials, brng))
                    for _ in range(args.bootstrap)]
            for key in ("test_at_most_0.5_below", "both_targets", "mean_cost"):
                vals = sorted(r[key] for r in reps)
                o[key + "_90"] = [vals[int(0.05 * (len(vals) - 1))], vals[int(round(0.95 * (len(vals) - 1)))]]
            w, b = o["test_at_most_0.5_below_90"], o["both_targets_90"]
            ci = f" ({100 * w[0]:.0f}-{100 * w[1]:.0f})", f" ({100 * b[0]:.0f}-{100 * b[1]:.0f})"
        print(f"| {name} | {o['mean_cost']:.2f}x | {o['worst_cost']:.2f}x | {100 * o['best_kept']:.0f}% | "
              f"{100 * o['test_at_most_0.5_below']:.0f}%{ci[0] if ci else ''} | "
              f"{100 * o['both_targets']:.0f}%{ci[1] if ci else ''} | "
              f"{o['mean_test_delta_pt']:+.2f} | {o['worst_test_delta_pt']:+.2f} |")
    res = {"command": " ".join(["python", "benchmarks/bench_prune_replay.py"] + sys.argv[1:]),
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "pool": len(pool), "sweeps": len(sweeps), "trials": args.trials,
           "seed": args.seed, "bootstrap": args.bootstrap, "rules": out}
    dst = Path(args.out)
    dst.write_text(json.dumps(res, indent=2))
    print(f"\nresults written to {dst}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run every parameter set to the end and store its learning curve")
    r.add_argument("--datasets", default=os.environ.get("SLIMTUNE_BENCH_DATASETS", str(DEFAULT_DATASETS)))
    r.add_argument("--random", type=int, default=0, help="also this many parameter sets drawn uniformly from the space")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--limit", type=int, default=0, help="record at most this many (0: all)")
    s = sub.add_parser("simulate", help="replay the pruning rules on the recorded curves")
    s.add_argument("--sweeps", type=int, default=300, help="number of simulated sweeps")
    s.add_argument("--trials", type=int, default=20, help="trials per simulated sweep")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--curves", default=str(CURVES), help="recorded curves (default: %(default)s)")
    s.add_argument("--out", default=str(HERE / "results" / "bench_prune_replay.json"))
    s.add_argument("--bootstrap", type=int, default=0, metavar="B",
                   help="also 90%% intervals: B resamples (with replacement) of the recorded trials")
    s.add_argument("--bootstrap-sweeps", type=int, default=200, help="sweeps per resample")
    s.add_argument("--rules", default=None, help="comma-separated rule names, e.g. sh-rf3-after2,median-startup5 "
                   f"(default: {', '.join(RULES)})")
    args = ap.parse_args(argv)
    return record(args) if args.cmd == "record" else simulate(args)


if __name__ == "__main__":
    sys.exit(main())
