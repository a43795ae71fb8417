"""Two processes on CPU (gloo) through `accelerate launch`: the users' launcher on GPUs.

On a CPU-only machine `accelerate launch --cpu` starts a single process; the multi-process
launcher (`--multi_gpu`, which runs torchrun) with slimtune's Accelerator(cpu=True) forms
a gloo group of CPU processes.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import yaml

from conftest import cls_config

# `slimtune run CONFIG` as the CLI runs it, with a callback that writes what each process's model holds
# (a hash of the trainable tensors) before and after training: DDP must end with the same weights everywhere
CLI_WITH_HASHES = """
import hashlib, json, os, sys
import slimtune.api as api
from slimtune.cli import app

def digest(loop):
    model = loop.accelerator.unwrap_model(loop.model)
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode() + p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

class Hashes:
    def on_train_begin(self, loop):
        self.begin = digest(loop)

    def on_train_end(self, loop):
        out = os.path.join(sys.argv[2], f"rank{loop.accelerator.process_index}.json")
        json.dump({"begin": self.begin, "end": digest(loop), "processes": loop.accelerator.num_processes},
                  open(out, "w"))

run = api.run
api.run = lambda *a, callbacks=None, **k: run(*a, callbacks=[*(callbacks or []), Hashes()], **k)
app(["run", sys.argv[1]])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_launch(tiny_bert, cls_data, tmp_path):
    cfg = cls_config(tiny_bert, cls_data, tmp_path / "runs", epochs=2)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "cli_with_hashes.py"
    script.write_text(CLI_WITH_HASHES)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), str(cfg_path), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert [p.name for p in runs] == ["run"]  # one run folder, written by the main process only
    from slimtune.track import index

    (row,) = index.rows(tmp_path / "runs")  # registered once, by the main process
    assert row["name"] == "run" and row["status"] == "completed" and row["energy_kwh"] > 0
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["num_processes"] == 2
    # 144 training examples, batch 16 per process: 5 steps per epoch instead of 9
    assert summary["steps"] == 10
    assert summary["samples_seen"] >= 2 * 144
    assert (runs[0] / "adapter" / "adapter_model.safetensors").is_file()
    # gradients are synchronised: both processes trained, changed the weights, and ended with identical ones
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["processes"] == 2 for r in ranks)
    assert ranks[0]["begin"] == ranks[1]["begin"] and ranks[0]["end"] != ranks[0]["begin"]
    assert ranks[0]["end"] == ranks[1]["end"]
    evals = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
