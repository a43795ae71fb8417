#!/usr/bin/env python
"""The overhead of run tracking on training throughput: the run index, energy / CO2 measurement
(codecarbon in its background threads) and per-step logging, on and off.

Job: the core benchmark's classification job (benchmarks/bench_core.py `cls`):
all-MiniLM-L6-v2 + LoRA r=8 / alpha 16 / dropout 0.05 on every linear layer of the blocks,
SST-2 (first N training rows, a 500-row dev set), batch 32, lr 5e-4 linear with 6% warmup,
bf16 autocast, max_length 128, one epoch, no checkpoints.

Variants, measured in the same process in the order A B B A (on / off alternate, so slow drift
cancels) after a short discarded warm-up run; each repeat is a fresh process (order reversed
every other repeat). The overhead is given two ways: from the medians of all runs, and as the
median over processes of 1 - mean(on) / mean(off) within the process (the paired figure, less
sensitive to what else the machine does between processes).
  off      track.index=false, track.energy=false, train.log_every=10**9 (no per-step records)
  on       the defaults (index + codecarbon energy) with train.log_every=1: a metrics.jsonl record
           at every optimizer step, the most logging there is
  on+ext   `on` plus MLflow (local file store) and TensorBoard fed at every step (reference only)

Throughput is the loop's own: samples / summary.train_seconds (the training loop only, the same
timing bench_core uses); the wall time of the whole run() call is recorded too. Evaluation
runs once, at the end, in every variant. On a shared machine each run also records how many
cores other processes kept busy meanwhile; runs above 0.2 cores are marked disturbed and left
out of the medians and the pairs. A last section measures each part of tracking alone (a
metrics.jsonl record, an index write, codecarbon's background CPU use, its start / stop), which
bounds the overhead independently of the machine's noise.

    flock /tmp/slimtune-bench.lock python benchmarks/bench_tracking.py            # 2000 rows, 3 processes
    flock /tmp/slimtune-bench.lock python benchmarks/bench_tracking.py --quick    # 640 rows, 2 processes
    ... --wait-quiet 300        # on a shared machine: wait for idle CPUs before each process
    ... --model FOLDER --n-train 20000 --variants off,on    # e.g. on a GPU, with a MiniLM-shaped model

Results: benchmarks/results/bench_tracking[_quick].json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
VARIANTS = ("off", "on", "on+ext")
TARGET = 0.02
CLEAN = 0.2  # a run during which other processes kept more than this many cores busy is disturbed and left out


def config(files: dict, n_train: int, variant: str, out_dir: str, name: str, model: str = MINILM) -> dict:
    steps = -(-n_train // 32)
    on = variant != "off"
    return {
        "task": "text-classification",
        "model": {"name": model, "max_length": 128},
        "data": {"train": files["train"], "eval": files["dev"], "text_column": "sentence", "label_column": "label"},
        "method": {"name": "lora", "r": 8, "alpha": 16.0, "dropout": 0.05, "targets": "auto"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 5e-4, "schedule": "linear", "warmup": int(round(0.06 * steps)),
                  "precision": "bf16", "group_by_length": True, "weight_decay": 0.01, "max_grad_norm": 1.0, "seed": 42,
                  "log_every": 1 if on else 10**9},
        "eval": {"every_steps": 10**9, "metrics": ["accuracy", "loss"]},
        "output": {"dir": out_dir, "name": name, "save_checkpoints": False},
        "track": {"index": on, "energy": on, "mlflow": variant == "on+ext", "tensorboard": variant == "on+ext"},
    }


def cpu_counters() -> tuple[float, float]:
    """(CPU seconds used on the whole machine, CPU seconds used by this process and its children)."""
    import resource

    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    machine = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz  # user nice system irq softirq
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return machine, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def one_run(plan: dict, variant: str) -> dict:
    import slimtune

    out = tempfile.mkdtemp(prefix=f"track-{variant}-", dir=plan["tmp"])
    n_train = plan["n_warmup"] if variant == "warmup" else plan["n_train"]
    m0, own0 = cpu_counters()
    t0 = time.perf_counter()
    res = slimtune.run(config(plan["files"], n_train, "off" if variant == "warmup" else variant, out, "run",
                              plan.get("model", MINILM)))
    wall = time.perf_counter() - t0
    m1, own1 = cpu_counters()
    others = max(0.0, (m1 - m0) - (own1 - own0)) / wall  # cores other processes kept busy meanwhile
    s = res.summary
    records = sum(1 for _ in open(res.run_dir / "metrics.jsonl"))
    energy = (s.get("cost") or {}).get("energy") or {}
    shutil.rmtree(out, ignore_errors=True)
    return {
        "variant": variant, "samples_per_s": s["samples_seen"] / s["train_seconds"],
        "train_seconds": s["train_seconds"],
        "run_wall_seconds": wall, "steps": s["steps"], "samples": s["samples_seen"], "metrics_records": records,
        "dev_accuracy": (s.get("final") or {}).get("accuracy"), "energy_kwh": energy.get("energy_kwh"),
        "device_peak_mb": (s.get("cost") or {}).get("device_peak_mb"), "precision": s.get("precision"),
        "co2_kg": energy.get("co2_kg"), "energy_method": energy.get("method"), "others_cores": others,
    }


def child(plan_path: str, sequence: str, result_path: str) -> int:
    """Runs in one process: a short warm-up (discarded: first-use costs such as kernel selection and
    caches land there), then the variants in the given order (A B B A: drift cancels)."""
    plan = json.loads(Path(plan_path).read_text())
    results = [one_run(plan, v) for v in ["warmup", *sequence.split(",")]]
    Path(result_path).write_text(json.dumps(results[1:]))
    return 0


def components(tmp: str) -> dict:
    """What each part of tracking costs, measured alone (robust to a noisy machine):
    a metrics.jsonl record, an index write, codecarbon's background CPU use, its start / stop."""
    from slimtune.track import index
    from slimtune.track.energy import EnergyMeter
    from slimtune.track.rundir import RunDir

    d = Path(tmp) / "components"
    (d / "run").mkdir(parents=True)
    rd = RunDir(d / "run")
    rec = {"type": "train", "step": 0, "epoch": 0.01, "loss": 0.6931, "lr": {"decay": 5e-4, "no_decay": 5e-4},
           "samples_per_s": 301.5, "tokens_per_s": 9012.3}
    n = 3000
    t0 = time.perf_counter()
    for i in range(n):
        rec["step"] = i
        rd.log(rec)
    log_us = (time.perf_counter() - t0) / n * 1e6
    cfg = {"task": "text-classification", "model": {"name": MINILM}, "method": {"name": "lora", "r": 8}}
    t0 = time.perf_counter()
    for i in range(30):
        index.register_run(d, d / f"r{i % 3}", cfg,
                           {"status": "running", "monitor": "accuracy", "best": {"accuracy": 0.5}})
    index_ms = (time.perf_counter() - t0) / 30 * 1000
    sinks = {}
    try:  # the optional trackers, per record (MLflow's local file store, TensorBoard event files)
        from slimtune.track.trackers import MlflowSink, TensorBoardSink

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        for name, sink in (("mlflow_record_ms", MlflowSink("file:" + str(d / "mlruns"), "bench", "r", cfg)),
                           ("tensorboard_record_ms", TensorBoardSink(d / "tb", "a: 1"))):
            t0 = time.perf_counter()
            for i in range(200):
                rec["step"] = i
                sink(rec)
            sinks[name] = (time.perf_counter() - t0) / 200 * 1000
    except ImportError:
        pass
    m = EnergyMeter(measure_secs=10.0)
    t0 = time.perf_counter()
    m.start()
    start_s = time.perf_counter() - t0
    c0, w0 = time.process_time(), time.perf_counter()
    time.sleep(21.0)  # the main thread idles: the process's CPU time is codecarbon's threads (two measure intervals)
    bg_share = (time.process_time() - c0) / (time.perf_counter() - w0)
    t0 = time.perf_counter()
    e = m.stop()
    stop_s = time.perf_counter() - t0
    return {"log_record_us": log_us, "index_write_ms": index_ms, "energy_start_s": start_s, "energy_stop_s": stop_s,
            "codecarbon_cpu_share_of_one_core": bg_share, "energy_method": e.get("method"), **sinks}


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of this machine's CPU time in use over a short window (everyone's processes)."""
    return (busy_cores(seconds) or 0.0) / (os.cpu_count() or 1)


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to max_wait seconds) until others' work leaves the CPUs mostly idle; returns the last reading."""
    _, busy = wait_until_quiet(max_wait, threshold * (os.cpu_count() or 1))
    return (busy or 0.0) / (os.cpu_count() or 1)


from _common import busy_cores, wait_until_quiet, write_subset  # noqa: E402  (shared with the other benchmarks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="640 training rows, 2 repeats")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--model", default=MINILM,
                    help="model id or folder (same shape, same cost: e.g. a MiniLM with random weights)")
    ap.add_argument("--datasets", default=os.environ.get("SLIMTUNE_BENCH_DATASETS", str(DEFAULT_DATASETS)))
    ap.add_argument("--out", default=None)
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="before each process, wait up to this many seconds for the CPUs to be mostly idle "
                         "(a shared machine)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--components", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.plan, args.child, args.result)
    if args.components:
        print(json.dumps(components(args.components)))
        return 0

    sst2 = Path(args.datasets) / "sst2"
    if not (sst2 / "train.tsv").is_file():
        print(f"SKIP: {sst2} not found (set SLIMTUNE_BENCH_DATASETS or --datasets)")
        return 0
    variants = [v for v in args.variants.split(",") if v]
    n_train = args.n_train or (640 if args.quick else 2000)
    repeats = args.repeats or (2 if args.quick else 3)
    tmp = tempfile.mkdtemp(prefix="slimtune-bench-tracking-")
    try:
        files = {"train": str(Path(tmp) / "train.tsv"), "dev": str(Path(tmp) / "dev.tsv")}
        n_train = write_subset(sst2 / "train.tsv", Path(files["train"]), n_train)
        write_subset(sst2 / "dev.tsv", Path(files["dev"]), 500)
        plan = Path(tmp) / "plan.json"
        plan.write_text(json.dumps({"files": files, "n_train": n_train, "n_warmup": min(n_train, 640), "tmp": tmp,
                                    "model": args.model}))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        if (ROOT / "src").is_dir():
            env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        paired: dict[str, list[float]] = {}  # per process: 1 - mean(variant) / mean(off)
        load = {"start": os.getloadavg()}
        print(f"n_train={n_train} repeats={repeats} variants={variants} load={load['start']}", flush=True)
        for rep in range(repeats):
            order = variants if rep % 2 == 0 else list(reversed(variants))
            sequence = order + list(reversed(order))  # A B B A
            res = Path(tmp) / f"res-{rep}.json"
            busy = wait_quiet(args.wait_quiet) if args.wait_quiet else cpu_busy()
            la = os.getloadavg()[0]
            proc = subprocess.run([sys.executable, __file__, "--child", ",".join(sequence), "--plan", str(plan),
                                   "--result", str(res)],
                                  env=env, cwd=str(ROOT), capture_output=True, text=True)
            if proc.returncode != 0 or not res.exists():
                print(proc.stdout[-2000:], proc.stderr[-4000:], f"FAILED {sequence}", sep="\n")
                return 1
            got = json.loads(res.read_text())
            for r in got:
                r["load_before"], r["cpu_busy_before"], r["process"] = la, busy, rep
                runs[r["variant"]].append(r)
                print(f"[{rep + 1}/{repeats}] {r['variant']:7s} {r['samples_per_s']:7.1f} samples/s  "
                      f"train {r['train_seconds']:6.1f} s  "
                      f"wall {r['run_wall_seconds']:6.1f} s  records {r['metrics_records']}  other processes: "
                      f"{r['others_cores']:.2f} cores{'' if r['others_cores'] <= CLEAN else '  (disturbed: left out)'}",
                      flush=True)
            ok = [r for r in got if r["others_cores"] <= CLEAN]
            base = [r["samples_per_s"] for r in ok if r["variant"] == "off"]
            for v in variants:
                mine = [r["samples_per_s"] for r in ok if r["variant"] == v]
                if v != "off" and base and mine:
                    paired.setdefault(v, []).append(1 - statistics.mean(mine) / statistics.mean(base))
        load["end"] = os.getloadavg()
        comp = json.loads(subprocess.run([sys.executable, __file__, "--components", tmp], env=env, cwd=str(ROOT),
                                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        clean = {v: [r for r in rs if r["others_cores"] <= CLEAN] or rs for v, rs in runs.items()}
        med = {v: statistics.median(r["samples_per_s"] for r in rs) for v, rs in clean.items()}
        wall = {v: statistics.median(r["run_wall_seconds"] for r in rs) for v, rs in clean.items()}
        lines = ["| variant | samples/s (median of undisturbed runs) | runs (disturbed in brackets) | vs off "
                 "| run wall s (median) | metrics records | energy (Wh) | method |",
                 "|---|---|---|---|---|---|---|---|"]
        for v, rs in runs.items():
            rel = (med[v] / med["off"] - 1) * 100 if "off" in med else 0.0
            e = rs[0]["energy_kwh"]
            each = ", ".join(("%.1f" if r["others_cores"] <= CLEAN else "(%.1f)") % r["samples_per_s"] for r in rs)
            wh = "-" if e is None else "%.3f" % (e * 1000)
            lines.append(f"| {v} | {med[v]:.1f} | {each} | {rel:+.1f}% | {wall[v]:.1f} | "
                         f"{rs[0]['metrics_records']} | {wh} | {rs[0]['energy_method'] or '-'} |")
        overhead = {v: 1 - med[v] / med["off"] for v in med if v != "off" and "off" in med}
        verdict = {v: ("met" if paired.get(v) and statistics.median(paired[v]) <= TARGET else "NOT met")
                   for v in overhead}
        table = "\n".join(lines)
        print("\n" + table + "\n")
        sps = med.get("off") or next(iter(med.values()))
        step_ms = 32 / sps * 1000
        bound = comp["log_record_us"] / 1000 / step_ms + comp["codecarbon_cpu_share_of_one_core"]
        comp.update(step_ms_off=step_ms, per_step_bound=bound)
        print(f"components (measured alone): a metrics.jsonl record {comp['log_record_us']:.0f} us "
              f"({comp['log_record_us'] / 1000 / step_ms:.3%} of a {step_ms:.0f} ms step); codecarbon's threads "
              f"{comp['codecarbon_cpu_share_of_one_core']:.3%} of one core; "
              f"an index write {comp['index_write_ms']:.1f} ms "
              f"(3 + 1 per improved evaluation per run); energy start {comp['energy_start_s']:.2f} s, "
              f"stop {comp['energy_stop_s']:.2f} s "
              f"(outside the loop) -> at most {bound:.2%} of the loop's time; optional trackers per record: MLflow "
              f"{comp.get('mlflow_record_ms', float('nan')):.2f} ms, "
              f"TensorBoard {comp.get('tensorboard_record_ms', float('nan')):.2f} ms")
        paired_med = {v: statistics.median(x) for v, x in paired.items()}
        for v in overhead:
            paired.setdefault(v, [])
            paired_med.setdefault(v, float("nan"))
        for v, o in overhead.items():
            print(f"- tracking overhead ({v} vs off): {o * 100:+.2f}% throughput, medians of all runs; "
                  f"{paired_med[v] * 100:+.2f}% as the median of the per-process A/B pairs "
                  f"({', '.join('%+.2f%%' % (x * 100) for x in paired[v])}) (target <= {TARGET:.0%}: {verdict[v]})")
        out = Path(args.out) if args.out else HERE / "results" / ("bench_tracking_quick.json" if args.quick
                                                                 else "bench_tracking.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "command": " ".join(["python", "benchmarks/bench_tracking.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(), "cpus": os.cpu_count(),
            "n_train": n_train, "repeats": repeats, "model": args.model, "load_average": load,
            "median_samples_per_s": med,
            "median_run_wall_seconds": wall, "overhead": overhead, "overhead_paired": paired,
            "overhead_paired_median": paired_med, "clean_threshold_cores": CLEAN, "target": TARGET, "verdict": verdict,
            "components": comp, "runs": runs, "table_md": table,
        }, indent=2))
        print(f"results written to {out}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
