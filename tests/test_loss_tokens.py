"""Causal-LM loss normalisation: a batch's summed token loss over the mean scored tokens per batch of
the epoch (`train.loss_tokens: epoch`), so length-grouped batches do not re-weight tokens."""
from __future__ import annotations

import json

import pytest
import torch

import slimtune
from conftest import chat_rows, write_jsonl


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[1, 9:] = -100  # a short response
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("wrap", [False, True])
def test_model_divides_summed_loss_by_the_given_count(tiny_llama, wrap):
    """The feature relies on transformers honouring num_items_in_batch (through peft too): check it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from slimtune.config import RunConfig
    from slimtune.tasks import causal_lm

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if wrap:
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    b = _batch(model.config.vocab_size)
    scored = int((b["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean = model(**b).loss
        summed_over_k = model(**b, num_items_in_batch=7.0).loss
    assert float(summed_over_k) == pytest.approx(float(mean) * scored / 7.0, rel=1e-5)
    cfg = RunConfig.model_validate({"task": "causal-lm", "model": {"name": tiny_llama}, "data": {"train": "x.jsonl"}})
    ex = [{"labels": b["labels"][i].tolist()} for i in range(3)]
    assert causal_lm.loss_kwargs(cfg, model, ex, batches_per_epoch=2) == {"num_items_in_batch": scored / 2}
    cfg.train.loss_tokens = "batch"
    assert causal_lm.loss_kwargs(cfg, model, ex, batches_per_epoch=2) == {}


def test_run_records_the_count_and_batch_mode_turns_it_off(tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    cfg = {"task": "causal-lm", "model": {"name": tiny_llama, "max_length": 48}, "data": {"train": str(train)},
           "method": {"name": "lora", "r": 4}, "train": {"max_steps": 3, "batch_size": 8, "precision": "fp32"},
           "eval": {"every_steps": 3}, "output": {"dir": str(tmp_path / "runs"), "name": "epoch"}}
    res = slimtune.run(cfg)
    rec = json.loads((res.run_dir / "loss.json").read_text())
    assert 1 <= rec["num_items_in_batch"] <= 8 * 48
    cfg["train"]["loss_tokens"] = "batch"
    cfg["output"]["name"] = "batch"
    res = slimtune.run(cfg)
    assert not (res.run_dir / "loss.json").exists()


@pytest.mark.parametrize("divisor", [None, 7.0])
def test_scored_logits_only_gives_the_models_loss_and_gradients(tiny_llama, divisor):
    """Projecting only the scored positions changes the cost, not the loss nor its gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from slimtune.config import RunConfig
    from slimtune.tasks import causal_lm

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    cfg = RunConfig.model_validate({"task": "causal-lm", "model": {"name": tiny_llama}, "data": {"train": "x.jsonl"}})
    kwargs = {} if divisor is None else {"num_items_in_batch": divisor}
    fn = causal_lm.train_loss_fn(cfg, model, kwargs)
    assert fn is not None
    b = _batch(model.config.vocab_size, seed=1)
    b["labels"][0, :8] = -100  # rows scored from different positions
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(loss):
        grads = torch.autograd.grad(loss, trainable)
        return float(loss), grads

    want, g_want = loss_and_grads(model(**b, **kwargs).loss)
    got, g_got = loss_and_grads(fn(model, b))
    assert got == pytest.approx(want, rel=1e-5)
    assert all(torch.allclose(a, c, atol=1e-6, rtol=1e-4) for a, c in zip(g_want, g_got))
    cfg.train.scored_logits_only = False
    assert causal_lm.train_loss_fn(cfg, model, kwargs) is None


def test_scored_logits_only_is_off_for_prompt_learning(tiny_llama):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from slimtune.config import RunConfig
    from slimtune.tasks import causal_lm

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    cfg = RunConfig.model_validate({"task": "causal-lm", "model": {"name": tiny_llama}, "data": {"train": "x.jsonl"}})
    assert causal_lm.train_loss_fn(cfg, model, {}) is None
