"""QLoRA: LoRA on a 4-bit NF4 base (bitsandbytes, CUDA). The positive checks run where a CUDA GPU and
bitsandbytes are present and skip with a message elsewhere; the clear errors are checked everywhere."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import slimtune
from slimtune.methods import MethodError

from conftest import chat_rows, write_jsonl

HAVE_QLORA = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
needs_qlora = pytest.mark.skipif(not HAVE_QLORA,
                                 reason="QLoRA needs a CUDA GPU and bitsandbytes (pip install bitsandbytes)")
PROMPTS = ["tell me about cats", "tell me about dogs"]


def _config(model: str, tmp_path, steps: int = 30) -> dict:
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(96, 0))
    ev = write_jsonl(tmp_path / "eval.jsonl", chat_rows(24, 1))
    return {
        "task": "causal-lm",
        "model": {"name": model, "max_length": 48},
        "data": {"train": str(train), "eval": str(ev)},
        "method": {"name": "qlora", "r": 8},
        "train": {"max_steps": steps, "batch_size": 16, "lr": 1e-2, "log_every": 3, "warmup": 0},
        # one evaluation, at the end: the saved adapter is the final one, whose outputs the callback keeps
        "eval": {"every_steps": steps, "monitor": "loss"},
        "track": {"energy": False},
        "output": {"dir": str(tmp_path / "runs"), "name": "qlora"},
    }


class _FinalOutputs:
    """The trained model's logits on PROMPTS at the end of training, and whether its base was 4-bit."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def on_train_end(self, loop):
        model = loop.accelerator.unwrap_model(loop.model)
        self.four_bit = any(type(m).__name__ == "Linear4bit" for m in model.modules())
        batch = self.tokenizer(PROMPTS, padding=True, return_tensors="pt").to(next(model.parameters()).device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.logits = model(**batch).logits.float().cpu()
        model.train(was_training)


def _train(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    seen = _FinalOutputs(AutoTokenizer.from_pretrained(tiny_llama))
    res = slimtune.run(_config(tiny_llama, tmp_path), callbacks=[seen])
    return res, seen


@needs_qlora
def test_qlora_trains_on_a_4bit_base_and_its_adapter_reloads(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimtune.methods.lora import QloraConfig, qlora_load_kwargs

    res, seen = _train(tiny_llama, tmp_path)
    assert res.status == "completed" and seen.four_bit  # the base really was quantized
    recs = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["type"] == "train"]
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2, losses
    adapter = res.run_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # the saved adapter on the same 4-bit base, built with plain transformers + peft, gives the trained outputs
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, **qlora_load_kwargs(QloraConfig()))
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    batch = seen.tokenizer(PROMPTS, padding=True, return_tensors="pt").to(next(plain.parameters()).device)
    with torch.no_grad():
        got = plain(**batch).logits.float().cpu()
    torch.testing.assert_close(got, seen.logits, atol=1e-3, rtol=1e-3)


@needs_qlora
def test_qlora_run_reloads_on_its_4bit_base(tiny_llama, tmp_path):
    res, seen = _train(tiny_llama, tmp_path)
    loaded = slimtune.load_run(res.run_dir)
    batch = loaded.tokenizer(PROMPTS, padding=True, return_tensors="pt").to(next(loaded.model.parameters()).device)
    with torch.no_grad():
        got = loaded.model(**batch).logits.float().cpu()
    torch.testing.assert_close(got, seen.logits, atol=1e-3, rtol=1e-3)


def test_qlora_without_cuda_names_what_it_needs(tiny_llama, tmp_path, monkeypatch):
    """No GPU: the error says a CUDA GPU is needed, for what, and what to use instead; before any model loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MethodError, match=r"needs a CUDA GPU \(bitsandbytes 4-bit kernels\).*method.name=lora"):
        slimtune.run(_config(tiny_llama, tmp_path, steps=3))
    assert not (tmp_path / "runs" / "qlora" / "adapter").exists()


def test_qlora_without_bitsandbytes_names_the_package(monkeypatch):
    """A GPU but no bitsandbytes: the error names the package and how to install it."""
    from slimtune.methods.lora import QloraConfig, check_qlora

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(MethodError, match="needs bitsandbytes: pip install bitsandbytes"):
        check_qlora(QloraConfig())


def _as_qlora_run(run_dir) -> None:
    """A LoRA run folder relabelled as QLoRA: the adapter layout is the same (plain LoRA tensors), only the base
    the run names is 4-bit, so a merge on a machine without CUDA shows how the QLoRA path loads that base."""
    import yaml

    path = run_dir / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["method"]["name"] = "qlora"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_qlora_merge_folds_the_adapter_into_a_16bit_base(tiny_llama, tmp_path, capsys):
    """`merge` of a QLoRA run loads the base unquantized in 16-bit and merges there, and says so: merging into the
    4-bit weights degrades generations, and bitsandbytes (CUDA) would be needed just to load them."""
    from transformers import AutoModelForCausalLM

    cfg = _config(tiny_llama, tmp_path, steps=6)
    cfg["method"]["name"] = "lora"
    res = slimtune.run(cfg)
    full = slimtune.merge(res.run_dir, tmp_path / "merged-fp32")
    _as_qlora_run(res.run_dir)
    capsys.readouterr()
    out = slimtune.merge(res.run_dir, tmp_path / "merged")
    assert "merged into the base loaded in bfloat16, not into its quantized weights" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    reference = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).eval()
    tokens = torch.tensor([[3, 7, 11, 5, 9]])
    with torch.no_grad():
        want = reference(tokens).logits
        got = merged.float().eval()(tokens).logits
    # the same merged weights, rounded to bf16 (8 bits of mantissa)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    assert not torch.equal(want, AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(tokens).logits)
