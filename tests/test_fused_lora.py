"""FusedLoraLinear: peft's LoRA forward with the scaling and residual add in one addmm; the same function,
the same dropout masks, the same gradients."""
from __future__ import annotations

import copy

import pytest
import torch

from slimtune.train.dropout import use_fast_dropout
from slimtune.train.fused_lora import FusedLoraLinear, fuse_lora_forward


def _pair(tiny_bert, **lora):
    """The same LoRA model twice (B made non-zero so the adapters matter): peft's forward, then the fused one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                             target_modules=["query", "value", "dense"], **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    use_fast_dropout(model)
    fused = copy.deepcopy(model)
    return model, fused, fuse_lora_forward(fused)


def _step(model, ids, labels, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_same_logits_and_gradients_as_peft_with_the_same_masks(tiny_bert, dropout):
    model, fused, n = _pair(tiny_bert, lora_dropout=dropout)
    n_lora = sum(1 for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    assert n == n_lora > 0
    assert all(type(m) is FusedLoraLinear for m in fused.modules() if hasattr(m, "lora_A"))
    ids = torch.randint(5, model.config.vocab_size, (4, 12))
    labels = torch.tensor([0, 1, 2, 1])
    model.train(), fused.train()
    for seed in (1, 2):
        a_logits, a_grads = _step(model, ids, labels, seed)
        b_logits, b_grads = _step(fused, ids, labels, seed)
        assert torch.allclose(a_logits, b_logits, atol=1e-5)
        assert a_grads.keys() == b_grads.keys()
        for name in a_grads:
            assert torch.allclose(a_grads[name], b_grads[name], atol=1e-5, rtol=1e-4), name
    if dropout:  # the masks matter: another seed gives other logits in both
        assert not torch.allclose(_step(fused, ids, labels, 3)[0], b_logits)
    model.eval(), fused.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, fused(input_ids=ids).logits, atol=1e-5)


def test_state_dict_and_peft_operations_are_peft_s(tiny_bert):
    model, fused, _ = _pair(tiny_bert, lora_dropout=0.1)
    assert model.state_dict().keys() == fused.state_dict().keys()
    ids = torch.randint(5, model.config.vocab_size, (2, 9))
    fused.eval()
    with torch.no_grad():
        with_lora = fused(input_ids=ids).logits
        with fused.disable_adapter():  # the base model alone: peft's own path
            base = fused(input_ids=ids).logits
        merged = copy.deepcopy(fused).merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(with_lora, base, atol=1e-3)
    assert torch.allclose(with_lora, merged, atol=1e-5)


def test_dora_and_lora_bias_keep_peft_s_forward(tiny_bert):
    """What the fused path does not cover goes through peft's forward, with peft's result."""
    for lora in ({"use_dora": True}, {"lora_bias": True}):
        model, fused, _ = _pair(tiny_bert, **lora)
        ids = torch.randint(5, model.config.vocab_size, (2, 7))
        model.eval(), fused.eval()
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, fused(input_ids=ids).logits, atol=1e-6)


def test_bf16_autocast_matches_peft(tiny_bert):
    model, fused, _ = _pair(tiny_bert, lora_dropout=0.1)
    ids = torch.randint(5, model.config.vocab_size, (2, 10))
    labels = torch.tensor([0, 2])
    model.train(), fused.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, a_grads = _step(model, ids, labels, 5)
        b, b_grads = _step(fused, ids, labels, 5)
    assert a.dtype == b.dtype
    assert torch.allclose(a.float(), b.float(), atol=5e-2)
    # gradients equal up to bf16 rounding (~3% of the norm at the first layer, peft's own order of additions
    # against the addmm's and the input's two gradients added in bf16); a missing 1 / (1 - p) is far outside
    for name in a_grads:
        assert (a_grads[name] - b_grads[name]).norm() <= 5e-2 * a_grads[name].norm() + 1e-6, name
