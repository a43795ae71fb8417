"""Seed robustness of an example config: the same run over several seeds, per variant of overrides.

A small imbalanced data set can make a fine-tune a seed lottery; a default that only works for the
seed it was tried with is not a default. This runs `slimtune.run(config)` once per (variant, seed), each
in its own process, and reports per seed the best eval value of the monitored metric and the accuracy at
that evaluation, with mean / min / max per variant.

    python benchmarks/bench_seeds.py [--config examples/quickstart.yaml] [--seeds 42,43,...]
        [--variant NAME=key=value,key=value ...] [--result benchmarks/results/bench_seeds.json]

Without --variant: the config as it is ("default"). Example (fast dropout vs torch's):
    python benchmarks/bench_seeds.py --variant default= --variant fast_dropout=train.fast_dropout=true
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, run_result_child, versions  # noqa: E402


def one(config: str, overrides: list[str], seed: int, out: str) -> dict:
    import slimtune

    res = slimtune.run(config, overrides=[*overrides, f"train.seed={seed}", f"output.dir={out}"])
    evals = [json.loads(line) for line in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("type") == "eval"]
    monitor = res.summary.get("monitor") or "accuracy"
    key = f"eval_{monitor}"
    best = max(evals, key=lambda e: e[key])
    return {"seed": seed, "monitor": monitor, "best": best[key], "accuracy_at_best": best.get("eval_accuracy"),
            "final": evals[-1][key], "curve": [round(e[key], 4) for e in evals],
            "train_s": res.summary["train_seconds"]}


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=key=value,key=value (or NAME= for the config as it is)")
    return name, [x for x in rest.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    ap.add_argument("--seeds", default="42,43,44,45,46,47,48,49")
    ap.add_argument("--variant", action="append", default=None, metavar="NAME=k=v,k=v")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "bench_seeds.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(one(args.config, spec["overrides"], spec["seed"], args.out)))
        return
    variants = [parse_variant(v) for v in (args.variant or ["default="])]
    out = tempfile.mkdtemp(prefix="bench-seeds-")
    rows = []
    for name, overrides in variants:
        for seed in [int(s) for s in args.seeds.split(",")]:
            cmd = [sys.executable, __file__, "--config", args.config, "--out", out,
                   "--child", json.dumps({"overrides": overrides, "seed": seed})]
            row, err = run_result_child(cmd, args.wait_quiet)
            if row is None:
                print(f"{name} seed {seed} failed:\n{err[-2000:]}", file=sys.stderr)
                continue
            rows.append({"variant": name, "overrides": overrides, **row})
            print(json.dumps({k: rows[-1][k] for k in ("variant", "seed", "best", "accuracy_at_best")}),
                  file=sys.stderr, flush=True)
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps({"machine": machine(), "versions": versions(), "config": args.config,
                                             "seeds": args.seeds, "rows": rows}, indent=2))
    print(f"\n{args.config}, seeds {args.seeds}: best eval value of the monitored metric per run\n")
    print("| variant | monitored | mean | min | max | accuracy at best, mean | per seed |")
    print("|---|---|---|---|---|---|---|")
    for name, _ in variants:
        r = [x for x in rows if x["variant"] == name]
        if not r:
            continue
        b = [x["best"] for x in r]
        acc = [x["accuracy_at_best"] for x in r if x["accuracy_at_best"] is not None]
        print(f"| {name} | {r[0]['monitor']} | {statistics.mean(b):.3f} | {min(b):.3f} | {max(b):.3f} | "
              f"{statistics.mean(acc):.3f} | {', '.join(f'{x:.3f}' for x in b)} |" if acc else "")


if __name__ == "__main__":
    main()
