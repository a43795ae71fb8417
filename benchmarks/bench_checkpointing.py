"""Activation checkpointing (`train.gradient_checkpointing`): memory and step time, off vs on.

SmolLM2-135M-Instruct (the pip-packaged GGUF, dequantized to fp32), LoRA r 16 on every block linear layer,
plain text cut into full 512-token rows, batch 8: a few optimizer steps through `slimtune.run`, each setting
in a fresh process. Measured in that process:

- step memory: the peak resident set during training minus the resident set when training begins (the loaded
  model). Linux's peak-RSS mark (VmHWM) is reset at that moment (/proc/self/clear_refs), so loading the GGUF,
  which peaks higher than the loaded model, does not count. It holds the saved activations, the step's
  temporaries (the 49k-token vocabulary's logits among them, which checkpointing does not touch), the LoRA
  gradients and AdamW state;
- step time: the median of the optimizer steps after the first (which allocates gradients and optimizer state).

The saved activations alone (what checkpointing is for) are read from `slimtune inspect`'s meta-device count
for the same model, batch and length, beside the measurement.

    flock /tmp/slimtune-bench.lock python benchmarks/bench_checkpointing.py --steps 4 \
        --out benchmarks/results/bench_checkpointing.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import machine, versions  # noqa: E402

SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_LENGTH, BATCH = 512, 8
WORDS = ("the a of to and in is it that was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him "
         "two has look more day could go come did number sound no most people my over know water than call "
         "first who may down side been now find any new work part take get place made live where after back "
         "little only round man year came show every good me give our under name very through just form "
         "sentence great think say help low line differ turn cause much mean before move right boy old too").split()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class _Probe:
    """Resets the peak-RSS mark when training begins; the time and the peak after every optimizer step."""

    def __init__(self):
        self.begin_kb, self.times, self.peak_kb = None, [], []

    def on_train_begin(self, loop):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.begin_kb = _status_kb("VmRSS")
        self.times.append(time.perf_counter())

    def on_step_end(self, loop):
        self.times.append(time.perf_counter())
        self.peak_kb.append(_status_kb("VmHWM"))


def _corpus(path: Path, words: int, seed: int) -> None:
    rng = random.Random(seed)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(200)) + "." for _ in range(words // 200)]
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")


def child(setting, steps: int, tmp: str, out: str) -> None:
    import slimtune

    train, evals = Path(tmp) / "train.txt", Path(tmp) / "eval.txt"
    _corpus(train, (steps + 1) * BATCH * MAX_LENGTH, 0)  # about one token per word: enough full rows
    _corpus(evals, 400, 1)
    cfg = {"task": "causal-lm", "model": {"name": SMOLLM, "max_length": MAX_LENGTH},
           "data": {"train": str(train), "eval": str(evals), "format": "text"},
           "method": {"name": "lora", "r": 16, "alpha": 32.0, "dropout": 0.05, "targets": "all-linear"},
           "train": {"max_steps": steps, "batch_size": BATCH, "lr": 5e-4, "warmup": 0, "precision": "auto",
                     "gradient_checkpointing": setting, "log_every": 1, "seed": 42},
           "eval": {"every_steps": 10**9}, "output": {"dir": tmp, "name": f"gc-{setting}", "save_checkpoints": False}}
    probe = _Probe()
    res = slimtune.run(cfg, callbacks=[probe])
    step_s = [b - a for a, b in zip(probe.times, probe.times[1:])]
    Path(out).write_text(json.dumps({
        "setting": setting, "steps": res.summary["steps"], "precision": res.summary["precision"],
        "rss_train_begin_mb": probe.begin_kb / 1024, "peak_rss_train_mb": max(probe.peak_kb) / 1024,
        "step_memory_mb": (max(probe.peak_kb) - probe.begin_kb) / 1024,
        "step_seconds": step_s, "step_seconds_median": statistics.median(step_s[1:] or step_s),
        "train_loss_last": res.final_metrics.get("loss"),
    }))


def inspect_estimate() -> dict:
    import slimtune.inspect as insp

    row = insp.inspect_model(SMOLLM, task="causal-lm", batch_size=BATCH, seq_len=MAX_LENGTH, methods=["lora"])
    row = row["methods"][0]
    keys = ("activation_bytes", "checkpointed_activation_bytes", "step_peak_bytes", "checkpointed_step_peak_bytes")
    return {k.replace("_bytes", "_mb"): row[k] / 2**20 for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_checkpointing.json"))
    ap.add_argument("--child", default=None)
    ap.add_argument("--tmp"), ap.add_argument("--result")
    args = ap.parse_args()
    if args.child is not None:
        child(json.loads(args.child), args.steps, args.tmp, args.result)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = {"machine": machine(), "versions": versions(), "model": SMOLLM, "max_length": MAX_LENGTH,
               "batch_size": BATCH, "method": "lora r16 all-linear", "steps": args.steps, "runs": {}}
    print(f"machine: {results['machine']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for setting in (False, True):
            t0 = time.perf_counter()
            result = Path(tmp) / f"result-{setting}.json"
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(setting), "--steps",
                                   str(args.steps), "--tmp", tmp, "--result", str(result)], env=env, cwd=str(ROOT),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
                raise SystemExit(f"gradient_checkpointing={setting}: exit {proc.returncode}")
            r = results["runs"][str(setting).lower()] = json.loads(result.read_text())
            print(f"gradient_checkpointing={setting}: step memory {r['step_memory_mb']:.0f} MB (peak RSS "
                  f"{r['peak_rss_train_mb']:.0f} MB), step {r['step_seconds_median']:.1f} s "
                  f"({time.perf_counter() - t0:.0f} s wall)", flush=True)
    results["inspect_mb"] = inspect_estimate()
    off, on = results["runs"]["false"], results["runs"]["true"]
    results["step_memory_reduction"] = 1 - on["step_memory_mb"] / off["step_memory_mb"]
    results["step_time_increase"] = on["step_seconds_median"] / off["step_seconds_median"] - 1
    est = results["inspect_mb"]
    results["saved_activation_reduction_inspect"] = 1 - est["checkpointed_activation_mb"] / est["activation_mb"]
    print(json.dumps({k: results[k] for k in ("step_memory_reduction", "step_time_increase",
                                                 "saved_activation_reduction_inspect", "inspect_mb")}, indent=1))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
