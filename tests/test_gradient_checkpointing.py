"""train.gradient_checkpointing: the same loss and gradients as without, less memory (measured with the
allocator), a run that trains end to end with it, and the errors of what cannot use it."""
from __future__ import annotations

import json
import os

import pytest
import torch

import slimtune
import slimtune.inspect as insp
from slimtune.errors import ConfigError, MethodError, ModelError
from slimtune.methods import REGISTRY, MethodContext, apply_method
from slimtune.train.activation_checkpointing import check_checkpointing, enable_checkpointing

from conftest import chat_rows, write_jsonl

TASK_TYPES = {"causal-lm": "CAUSAL_LM", "text-classification": "SEQ_CLS"}


def _model(path: str, task: str, method: str, checkpointing, **options) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)  # the same base, head and adapter initialisation for both settings
    if task == "causal-lm":
        model, heads = AutoModelForCausalLM.from_pretrained(path), []
    else:
        model, heads = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), ["classifier"]
    cfg = REGISTRY[method].config(**options)
    model = apply_method(model, cfg, MethodContext(task, TASK_TYPES[task], heads, 100, None))
    enable_checkpointing(model, checkpointing)
    return model.train()


def _step(model: torch.nn.Module, batch: dict) -> tuple[float, dict]:
    torch.manual_seed(1)  # dropout draws the same masks in both settings
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _batch(task: str, batch_size: int, seq_len: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(8, vocab, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding, as collated batches have
    labels = ids.masked_fill(mask == 0, -100) if task == "causal-lm" else torch.tensor([0, 1] * (batch_size // 2))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _checkpointed_blocks(model: torch.nn.Module) -> int:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules())


@pytest.mark.parametrize("model_fixture,task,method,options", [
    ("tiny_llama", "causal-lm", "lora", {"dropout": 0.0}),
    ("tiny_llama", "causal-lm", "lora", {"dropout": 0.2}),  # torch's checkpoint replays the RNG: same masks
    ("tiny_llama", "causal-lm", "prompt-tuning", {"num_virtual_tokens": 4}),
    ("tiny_bert", "text-classification", "dora", {"dropout": 0.0}),
    ("tiny_bert", "text-classification", "ia3", {}),
    ("tiny_bert", "text-classification", "adalora", {"dropout": 0.0}),
    ("tiny_llama", "causal-lm", "last-n-layers", {"n": 1}),
])
def test_same_loss_and_gradients(model_fixture, task, method, options, request):
    path = request.getfixturevalue(model_fixture)
    plain = _model(path, task, method, False, **options)
    checkpointed = _model(path, task, method, True, **options)
    assert _checkpointed_blocks(plain) == 0 and _checkpointed_blocks(checkpointed) == 2
    batch = _batch(task, 4, 12, plain.config.vocab_size)
    loss, grads = _step(plain, batch)
    loss_ckpt, grads_ckpt = _step(checkpointed, batch)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in grads.values())


@pytest.fixture(scope="module")
def llama_deep(tmp_path_factory) -> str:
    """Deep and wide enough that the saved activations dwarf the weights, small enough for a fast step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama-deep")
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
                     ).save_pretrained(path)
    return str(path)


def _allocator_peak_bytes(model: torch.nn.Module, batch: dict) -> int:
    """The most bytes the CPU allocator held during one forward + backward beyond what was there before, from
    the profiler's allocation events (torch's CPU allocator keeps no peak of its own)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**batch).loss.backward()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_lower_peak_memory_measured_and_as_inspect_estimates(llama_deep):
    """The allocator's peak of a LoRA step falls by more than half with checkpointing (6 blocks keep only their
    inputs; one block's activations are recomputed at a time), and inspect's meta-device estimate of both
    settings follows the measurement."""
    batch = {"input_ids": torch.randint(8, 256, (2, 192))}
    batch["labels"] = batch["input_ids"].clone()
    measured = {}
    for setting in (False, True):
        model = _model(llama_deep, "causal-lm", "lora", setting)  # inspect's default options: LoRA dropout 0.05
        _allocator_peak_bytes(model, batch)  # the first step allocates the gradients: measure the second
        for p in model.parameters():
            p.grad = None
        measured[setting] = _allocator_peak_bytes(model, batch)
    assert measured[True] < 0.5 * measured[False], measured
    row = insp.inspect_model(llama_deep, task="causal-lm", batch_size=2, seq_len=192, methods=["lora"])["methods"][0]
    assert row["checkpointed_activation_bytes"] < 0.2 * row["activation_bytes"], row
    assert row["checkpointed_step_peak_bytes"] == pytest.approx(measured[True], rel=0.01), (row, measured)
    assert row["step_peak_bytes"] == pytest.approx(measured[False], rel=0.01), (row, measured)


def _chat_config(model: str, tmp_path, name: str, **train) -> dict:
    train_file = tmp_path / "chat.jsonl"
    if not train_file.exists():
        write_jsonl(train_file, chat_rows(48))
    return {"task": "causal-lm", "model": {"name": model, "max_length": 48}, "data": {"train": str(train_file)},
            "method": {"name": "lora", "r": 4},
            "train": {"max_steps": 8, "batch_size": 8, "lr": 1e-2, "precision": "fp32", "log_every": 2, **train},
            "eval": {"every_steps": 4}, "output": {"dir": str(tmp_path / "runs"), "name": name}}


def test_run_trains_with_checkpointing_and_its_adapter_loads(tiny_llama, tmp_path):
    """A run with train.gradient_checkpointing: true takes the same steps as one without (CPU training is
    deterministic, dropout masks included), and its adapter loads with plain peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = slimtune.run(_chat_config(tiny_llama, tmp_path, "plain"))
    ckpt = slimtune.run(_chat_config(tiny_llama, tmp_path, "ckpt", gradient_checkpointing=True))
    assert ckpt.status == "completed" and ckpt.summary["steps"] == 8
    assert ckpt.final_metrics["loss"] == pytest.approx(plain.final_metrics["loss"], rel=1e-5)
    losses = [json.loads(line)["loss"] for line in (ckpt.run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    assert losses[-1] < losses[0]
    ids = torch.tensor([[8, 9, 10, 11, 12]])
    logits = []
    for run in (plain, ckpt):  # plain peft loads the adapter, and it is the one the run trained
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        with torch.no_grad():
            logits.append(PeftModel.from_pretrained(base, str(run.run_dir / "adapter")).eval()(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits[1], AutoModelForCausalLM.from_pretrained(tiny_llama)(input_ids=ids).logits)
    data = str(tmp_path / "chat.jsonl")
    evaluated = [slimtune.evaluate(run.run_dir, data)["loss"] for run in (plain, ckpt)]
    assert evaluated[1] == pytest.approx(evaluated[0], rel=1e-5)


def test_offload_needs_cuda_and_says_true_works(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match=r"needs a CUDA GPU.*gradient_checkpointing: true"):
        slimtune.run(_chat_config(tiny_llama, tmp_path, "offload", gradient_checkpointing="offload"))
    check_checkpointing("offload", REGISTRY["lora"], torch.device("cuda"))  # a CUDA device: accepted


def test_prefix_tuning_refuses_naming_method_and_key(tiny_llama, tmp_path):
    cfg = _chat_config(tiny_llama, tmp_path, "prefix", gradient_checkpointing=True)
    cfg["method"] = {"name": "prefix-tuning", "num_virtual_tokens": 4}
    with pytest.raises(MethodError, match=r"prefix-tuning cannot be combined with train\.gradient_checkpointing"):
        slimtune.run(cfg)
    # what the refusal stands for: transformers drops the prefix's cache in checkpointed blocks
    model = _model(tiny_llama, "causal-lm", "prefix-tuning", True, num_virtual_tokens=4)
    with pytest.raises(RuntimeError):
        _step(model, _batch("causal-lm", 2, 8, model.config.vocab_size))


def test_model_without_checkpointing_support_is_said():
    from slimtune.models.factory import ImageClassifier

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(4, 2)

    with pytest.raises(ModelError, match=r"ImageClassifier does not support activation checkpointing"):
        enable_checkpointing(ImageClassifier(Net()), True)
    enable_checkpointing(ImageClassifier(Net()), False)  # off: nothing asked of the model


def test_config_key_values():
    from pydantic import ValidationError

    from slimtune.config.sections import TrainConfig

    assert TrainConfig().gradient_checkpointing is False
    assert TrainConfig(gradient_checkpointing="true").gradient_checkpointing is True  # a CLI override's text
    assert TrainConfig(gradient_checkpointing="offload").gradient_checkpointing == "offload"
    with pytest.raises(ValidationError):
        TrainConfig(gradient_checkpointing="sometimes")


TWO_RUNS = """
import hashlib, json, os, sys
import slimtune

class Digest:
    def __init__(self, name):
        self.name = name

    def on_train_end(self, loop):
        model = loop.accelerator.unwrap_model(loop.model)
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                h.update(name.encode() + p.detach().cpu().contiguous().numpy().tobytes())
        path = os.path.join(sys.argv[1], f"{self.name}-rank{loop.accelerator.process_index}.json")
        json.dump({"digest": h.hexdigest(), "processes": loop.accelerator.num_processes}, open(path, "w"))

for name, config in zip(("plain", "ckpt"), sys.argv[2:]):  # one launch, two runs: the start-up costs once
    slimtune.run(config, callbacks=[Digest(name)])
"""


def test_two_processes_train_the_same_weights_with_checkpointing(tiny_bert, tmp_path):
    """DDP (2 CPU processes over gloo): non-reentrant checkpointing recomputes inside autograd, so DDP's
    gradient hooks fire once per parameter as without it, and both runs end with the same weights."""
    import socket
    import subprocess
    import sys

    import yaml

    from conftest import cls_config, sentiment_rows, write_csv

    data = {"train": str(write_csv(tmp_path / "train.csv", sentiment_rows(64, 0)))}
    script = tmp_path / "two_runs.py"
    script.write_text(TWO_RUNS)
    configs = []
    for name, setting in (("plain", False), ("ckpt", True)):
        configs.append(tmp_path / f"{name}.yaml")
        configs[-1].write_text(yaml.safe_dump(cls_config(tiny_bert, data, tmp_path / name, epochs=1,
                                                         gradient_checkpointing=setting)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(script), str(tmp_path), *map(str, configs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {name: [json.loads((tmp_path / f"{name}-rank{i}.json").read_text()) for i in range(2)]
            for name in ("plain", "ckpt")}
    for ranks in runs.values():
        assert [r["processes"] for r in ranks] == [2, 2] and ranks[0]["digest"] == ranks[1]["digest"]
    assert runs["ckpt"][0]["digest"] == runs["plain"][0]["digest"]
