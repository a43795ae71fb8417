"""Checkpoints and adapters of a sharded model hold whole tensors, and a sharded resume continues exactly.

FSDP2 (torch's `fully_shard`) runs on CPU processes over gloo, so two of them shard a tiny LoRA llama here,
the way accelerate's FSDP2 plugin does on GPUs (each decoder layer, then the root). accelerate itself turns
FSDP on only for GPU processes (on CPU `accelerate launch --config_file examples/accelerate/fsdp.yaml` trains
as DDP), so `slimtune run` under FSDP runs where there are GPUs: the last test, skipped without them.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import chat_rows, write_jsonl

EXAMPLES = Path(__file__).parent.parent / "examples" / "accelerate"

# torchrun worker: argv = tiny llama path, output folder
WORKER = r"""
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaForCausalLM

from slimtune.methods import save_adapter
from slimtune.train import checkpoint

model_path, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))


def lora(shard: bool):
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(model_path),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for n, p in model.named_parameters():  # B starts at zero: make the adapter's tensors all tell
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    if shard:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def step(model, optimizer, seed: int):
    torch.manual_seed(seed)  # the same batch on every process: the sharded mean gradient is the plain one
    ids = torch.randint(8, 60, (4, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


plain, plain_opt = lora(shard=False)
model, opt = lora(shard=True)
names = checkpoint.trainable_names(model)
assert checkpoint.sharded(model) and not checkpoint.sharded(plain)
a_name = next(n for n in names if "lora_A" in n)
local = dict(model.named_parameters())[a_name].to_local()
assert local.shape[0] * world == dict(plain.named_parameters())[a_name].shape[0], local.shape  # a shard only
for s in (1, 2):
    step(plain, plain_opt, s)
    step(model, opt, s)
expected = checkpoint.trainable_state(plain)

whole = checkpoint.gathered(model, opt, names)  # every process: collectives
weights, optimized = whole
assert sorted(weights) == sorted(expected)
for n, t in expected.items():
    assert weights[n].shape == t.shape and torch.allclose(weights[n], t, atol=1e-6), n
adapter_whole = checkpoint.trainable_state(model)
if rank == 0:
    checkpoint.save(out / "last", model, opt, {"step": 2}, checkpoint.rank_states([checkpoint.rng_state()]),
                    names=names, whole=whole)
    (out / "adapter").mkdir()
    save_adapter(model, SimpleNamespace(name="lora"), out / "adapter", model_path, "causal-lm", adapter_whole)
    (out / "adapter-plain").mkdir()
    save_adapter(plain, SimpleNamespace(name="lora"), out / "adapter-plain", model_path, "causal-lm")
dist.barrier()

# a resumed run: a fresh sharded model and optimizer take the checkpoint and go on as the first would
model2, opt2 = lora(shard=True)
checkpoint.load(out / "last", model2, opt2)
for s in (3, 4):
    step(plain, plain_opt, s)
    step(model2, opt2, s)
resumed, expected = checkpoint.trainable_state(model2), checkpoint.trainable_state(plain)
for n, t in expected.items():
    assert torch.allclose(resumed[n], t, atol=1e-5), (n, (resumed[n] - t).abs().max())
dist.barrier()
if rank == 0:
    (out / "ok").write_text("ok")
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_checkpoint_and_adapter_hold_whole_tensors_and_resume_exactly(tiny_llama, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script), tiny_llama, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and (out / "ok").is_file(), proc.stdout[-3000:] + proc.stderr[-4000:]
    # the adapter written from the shards is the one an unsharded model of the same weights writes
    sharded, plain = (load_file(str(out / d / "adapter_model.safetensors")) for d in ("adapter", "adapter-plain"))
    assert sorted(sharded) == sorted(plain) and any("lora_A" in k for k in sharded)
    for k, t in plain.items():
        assert sharded[k].shape == t.shape and sharded[k].numel() > 0, k
        assert torch.allclose(sharded[k], t, atol=1e-6), k
    saved = load_file(str(out / "last" / "trainable.safetensors"))
    assert all(t.numel() > 0 for t in saved.values())


def test_fsdp_config_through_accelerate_launch(tiny_llama, tmp_path):
    """`slimtune run` under examples/accelerate/fsdp.yaml: train, evaluate, best checkpoint, adapter."""
    gpus = torch.cuda.device_count()
    if gpus == 0:
        pytest.skip("accelerate enables FSDP only for GPU processes (its state.py sets DistributedType.FSDP for "
                    "MULTI_GPU-like types, never MULTI_CPU): on CPU this launch trains as DDP; it runs where "
                    "there is a GPU")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(48))
    cfg = {"task": "causal-lm", "model": {"name": tiny_llama, "max_length": 32},
           "data": {"train": str(data)}, "method": {"name": "lora", "r": 4},
           "train": {"max_steps": 4, "batch_size": 4, "precision": "bf16"}, "eval": {"every_steps": 2},
           "output": {"dir": str(tmp_path / "runs"), "name": "run"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "fsdp.yaml"),
           "--num_processes", str(min(gpus, 2)), "--main_process_port", str(_free_port()),
           "-m", "slimtune", "run", str(tmp_path / "cfg.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "run"
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert (run / "checkpoints" / "best" / "trainable.safetensors").is_file()


def test_example_accelerate_configs_parse():
    """The example configs are accelerate configs of the sharding they name."""
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {"fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED", "deepspeed_zero3.yaml": "DEEPSPEED"}
    for name, kind in kinds.items():
        cfg = ClusterConfig.from_yaml_file(str(EXAMPLES / name))
        assert str(cfg.distributed_type).endswith(kind), (name, cfg.distributed_type)
    assert ClusterConfig.from_yaml_file(str(EXAMPLES / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2
    assert ClusterConfig.from_yaml_file(str(EXAMPLES / "deepspeed_zero3.yaml")).deepspeed_config["zero_stage"] == 3


def test_fsdp_asked_for_on_cpu_says_it_trains_unsharded(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: accelerate shards its processes, there is nothing to say")
    from slimtune.phases.prepare import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    accelerator = make_accelerator("no")
    assert not str(accelerator.distributed_type).endswith("FSDP")  # accelerate dropped it, silently
    assert "accelerate shards only GPU processes" in capsys.readouterr().err
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    make_accelerator("no")  # the next run in this process gets a plain accelerator again
