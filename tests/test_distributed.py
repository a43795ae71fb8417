"""Two processes on CPU (gloo) through `accelerate launch`: the users' launcher on GPUs.

On a CPU-only machine `accelerate launch --cpu` starts a single process; the multi-process
launcher (`--multi_gpu`, which runs torchrun) with slimtune's Accelerator(cpu=True) forms
a gloo group of CPU processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from conftest import cls_config


def test_two_process_accelerate_launch(tiny_bert, cls_data, tmp_path):
    cfg = cls_config(tiny_bert, cls_data, tmp_path / "runs", epochs=2)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "slimtune", "run", str(cfg_path)]
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
    evals = [json.loads(l) for l in (runs[0] / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert evals and all(0.0 <= e["eval_accuracy"] <= 1.0 for e in evals)
