"""Two processes on CPU (gloo) through `accelerate launch`: the users' launcher on GPUs.

On a CPU-only machine `accelerate launch --cpu` starts a single process; the multi-process
launcher (`--multi_gpu`, which runs torchrun) with slimtune's Accelerator(cpu=True) forms
a gloo group of CPU processes. The launches hide any GPU (CUDA_VISIBLE_DEVICES=""): on a machine
with one GPU the two processes would otherwise both ask for a CUDA device of their own.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cls_config, sentiment_rows, write_csv

# `slimtune ARGS...` as the CLI runs it, with a callback that writes what each process's model holds (a hash of
# the trainable tensors) before and after training, and that can stop the run: `interrupt:N` raises Ctrl-C's
# KeyboardInterrupt after step N on every process, `kill-after-eval:N` ends every process abruptly right after
# the evaluation (and checkpoint) of step N, as a crash or a killed job would
CLI_WITH_PROBE = """
import hashlib, json, os, sys
import slimtune.api as api
from slimtune.cli import app

out, action = sys.argv[1], sys.argv[2]
what, _, at = action.partition(":")

def digest(loop):
    model = loop.accelerator.unwrap_model(loop.model)
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode() + p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

class Probe:
    def on_train_begin(self, loop):
        self.begin = digest(loop)

    def on_step_end(self, loop):
        if what == "interrupt" and loop.state.step == int(at):
            raise KeyboardInterrupt

    def on_eval_end(self, loop, metrics):
        if what == "kill-after-eval" and loop.state.step == int(at):
            os._exit(3)

    def on_train_end(self, loop):
        path = os.path.join(out, f"rank{loop.accelerator.process_index}.json")
        json.dump({"begin": self.begin, "end": digest(loop), "processes": loop.accelerator.num_processes},
                  open(path, "w"))

run = api.run
api.run = lambda *a, callbacks=None, **k: run(*a, callbacks=[*(callbacks or []), Probe()], **k)
app(sys.argv[3:])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, out: Path, action: str, *cli: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of 2 CPU processes running `slimtune CLI...` with the probe; hashes land in `out`."""
    script = tmp / "cli_with_probe.py"
    script.write_text(CLI_WITH_PROBE)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), str(out), action, *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _tail(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + proc.stderr[-3000:]


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def two_process(tiny_bert, tmp_path_factory) -> dict:
    """One uninterrupted 2-process run: 144 training examples, batch 16 per process, 2 epochs (10 steps), an
    evaluation every 5 steps, LoRA dropout 0.1 and BERT's own dropouts: each process draws its own masks."""
    tmp = tmp_path_factory.mktemp("two-process")
    data = {"train": str(write_csv(tmp / "train.csv", sentiment_rows(160, 0))),
            "test": str(write_csv(tmp / "test.csv", sentiment_rows(40, 1)))}

    def config(name: str) -> Path:
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cls_config(tiny_bert, data, tmp / name, epochs=2)))
        return path

    proc = _launch(tmp, tmp / "full-hashes", "none", "run", str(config("full")))
    assert proc.returncode == 0, _tail(proc)
    return {"tmp": tmp, "config": config, "runs": tmp / "full", "ranks": _ranks(tmp / "full-hashes")}


def test_two_process_accelerate_launch(two_process):
    runs = [p for p in two_process["runs"].iterdir() if p.is_dir()]
    assert [p.name for p in runs] == ["run"]  # one run folder, written by the main process only
    from slimtune.track import index

    (row,) = index.rows(two_process["runs"])  # registered once, by the main process
    assert row["name"] == "run" and row["status"] == "completed" and row["energy_kwh"] > 0
    summary = _summary(runs[0])
    assert summary["status"] == "completed"
    assert summary["num_processes"] == 2
    # 144 training examples, batch 16 per process: 5 steps per epoch instead of 9
    assert summary["steps"] == 10
    assert summary["samples_seen"] >= 2 * 144
    assert (runs[0] / "adapter" / "adapter_model.safetensors").is_file()
    # gradients are synchronised: both processes trained, changed the weights, and ended with identical ones
    ranks = two_process["ranks"]
    assert all(r["processes"] == 2 for r in ranks)
    assert ranks[0]["begin"] == ranks[1]["begin"] and ranks[0]["end"] != ranks[0]["begin"]
    assert ranks[0]["end"] == ranks[1]["end"]
    evals = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
    # the last checkpoint holds each process's own RNG state
    rng = torch.load(runs[0] / "checkpoints" / "last" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2


@pytest.mark.slow  # four 2-process launches (~3 min on 2 cores); CI runs it with the other slow checks
def test_a_crashed_then_interrupted_two_process_run_resumes_to_the_same_weights(two_process):
    """Killed right after the evaluation of step 5 (the checkpoint holds every process's RNG state, gathered),
    resumed, interrupted by Ctrl-C at step 7 (the main process saves the checkpoint, the other its own RNG
    state), resumed again: both processes end with the weights of the uninterrupted run. With one RNG state put
    on both processes, process 1's dropout masks after each resume would differ and so would the weights."""
    tmp, run = two_process["tmp"], two_process["tmp"] / "cut" / "run"
    proc = _launch(tmp, tmp / "cut-1", "kill-after-eval:5", "run", str(two_process["config"]("cut")))
    assert proc.returncode != 0 and _summary(run)["status"] == "running", _tail(proc)
    saved = torch.load(run / "checkpoints" / "last" / "rng.pt", weights_only=True)["ranks"]
    # the two processes' random streams have diverged by step 5, or this test could not tell them apart
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"])

    proc = _launch(tmp, tmp / "cut-2", "interrupt:7", "run", "--resume", str(run))
    assert proc.returncode != 0, _tail(proc)
    assert _summary(run)["status"] == "interrupted" and _summary(run)["step"] == 7, _tail(proc)
    main = torch.load(run / "checkpoints" / "last" / "rng.pt", weights_only=True)["ranks"]
    other = torch.load(run / "checkpoints" / "rng_state_1.pt", weights_only=True)
    assert json.loads((run / "checkpoints" / "last" / "state.json").read_text())["step"] == 7
    assert other["step"] == 7 and not torch.equal(main[0]["torch"], other["state"]["torch"])

    proc = _launch(tmp, tmp / "cut-3", "none", "run", "--resume", str(run))
    assert proc.returncode == 0, _tail(proc)
    assert _summary(run)["status"] == "completed" and _summary(run)["steps"] == 10
    resumed, full = _ranks(tmp / "cut-3"), two_process["ranks"]
    assert resumed[0]["end"] == resumed[1]["end"] == full[0]["end"]


def test_each_process_resumes_from_its_own_rng_state(tmp_path, recwarn):
    from slimtune.train import checkpoint

    states = [{"torch": torch.full((4,), i, dtype=torch.uint8)} for i in range(3)]
    gathered = checkpoint.rank_states(states)
    assert [checkpoint.rng_for_rank(gathered, r, 5, tmp_path)["torch"][0] for r in range(3)] == [0, 1, 2]
    # a checkpoint written before each process had its own: every process takes the one state, silently
    legacy = {"torch": torch.zeros(4, dtype=torch.uint8)}
    assert all(checkpoint.rng_for_rank(legacy, r, 5, tmp_path) is legacy for r in range(3))
    assert checkpoint.rng_for_rank(None, 1, 5, tmp_path) is None
    assert not recwarn.list
    # an interrupt's checkpoint: process 0's state inside, process 1's beside it, for the step it stopped at
    interrupted = checkpoint.rank_states([states[0]])
    checkpoint.save_rank_rng(tmp_path, 1, 5, states[1])
    assert checkpoint.rng_for_rank(interrupted, 1, 5, tmp_path)["torch"][0] == 1
    assert not recwarn.list and [p.name for p in tmp_path.iterdir()] == ["rng_state_1.pt"]
    # process 1's own state is of another step (it stopped before saving this one), or process 2 has none:
    # process 0's, and a warning that the run does not continue exactly
    for rank, step in ((1, 7), (2, 5)):
        with pytest.warns(UserWarning, match=f"no RNG state of process {rank} at step {step}"):
            assert checkpoint.rng_for_rank(interrupted, rank, step, tmp_path)["torch"][0] == 0
