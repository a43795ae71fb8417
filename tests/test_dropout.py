"""FastDropout: the same Bernoulli dropout as nn.Dropout, with cheaper masks (CPU training)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimtune.train.dropout import FastDropout, keep_mask, use_fast_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_rate_scale_and_unbiased_output(p):
    torch.manual_seed(0)
    mask, scale = keep_mask((1000, 1000), p)
    assert mask.dtype == torch.bool
    assert mask.float().mean().item() == pytest.approx(1 - p, abs=2e-3)
    assert scale == pytest.approx(1 / (1 - p), rel=1e-4)
    x = torch.ones(1000, 1000)
    y = FastDropout(p).train()(x)
    assert y.mean().item() == pytest.approx(1.0, abs=5e-3)  # E[y] = x
    vals = torch.unique(y).tolist()
    assert len(vals) == 2 and vals[0] == 0.0 and vals[1] == pytest.approx(scale, rel=1e-6)


def test_masks_are_uniform_over_positions():
    """Each of the four 16-bit slices of a 64-bit draw must be uniform (a biased top bit would not be)."""
    torch.manual_seed(1)
    mask, _ = keep_mask((250_000, 4), 0.5)
    assert torch.allclose(mask.float().mean(0), torch.full((4,), 0.5), atol=5e-3)


def test_eval_mode_and_zero_p_are_identity_and_gradient_is_the_mask():
    x = torch.randn(64, 32, requires_grad=True)
    d = FastDropout(0.2)
    assert d.eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    torch.manual_seed(3)
    y = d.train()(x)
    y.sum().backward()
    kept = y != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.8), rtol=1e-4)
    assert torch.all(x.grad[~kept] == 0)


def test_reproducible_from_torch_rng_state():
    """Masks come from torch's generator, whose state checkpoints save: same state, same mask."""
    x = torch.randn(128, 16)
    d = FastDropout(0.3).train()
    state = torch.get_rng_state()
    a = d(x)
    torch.set_rng_state(state)
    assert torch.equal(a, d(x))
    assert not torch.equal(a, d(x))


def test_use_fast_dropout_replaces_plain_dropouts_including_lora_inputs(tiny_bert):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, lora_dropout=0.1,
                                             target_modules=["query", "value"]))
    plain = [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]
    n = use_fast_dropout(model)
    assert n == len(plain) > 0
    assert not any(type(m) is nn.Dropout and m.p > 0 for m in model.modules())
    lora_drop = [m for name, m in model.named_modules() if "lora_dropout" in name and isinstance(m, FastDropout)]
    assert lora_drop and all(m.p == 0.1 for m in lora_drop)
    ids = torch.randint(5, model.config.vocab_size, (4, 12))
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(input_ids=ids).logits
    assert torch.equal(a, b)  # eval: no dropout


def _lora_bert(tiny_bert, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, lora_dropout=0.1, target_modules=targets))
    use_fast_dropout(model)
    return model.train()


def test_lora_adapters_reading_one_tensor_share_its_dropped_copy(tiny_bert):
    """query / key / value read the same hidden states: one mask for the three (what peft does for a fused qkv
    projection); the attention output's adapter reads another tensor and draws its own."""
    model = _lora_bert(tiny_bert, ["query", "key", "value", "attention.output.dense"])
    seen = {}
    for name, m in model.named_modules():
        if name.endswith("lora_A.default"):
            m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, args[0]))
    ids = torch.randint(5, model.config.vocab_size, (4, 12))
    model(input_ids=ids).logits.sum().backward()
    blocks = sorted({n.split(".attention.")[0] for n in seen})
    assert len(blocks) == model.config.num_hidden_layers
    for block in blocks:
        q, k, v, o = (seen[f"{block}.attention.{part}.lora_A.default"]
                      for part in ("self.query", "self.key", "self.value", "output.dense"))
        assert q is k is v and o is not q
        assert (q == 0).any() and (q != 0).any()  # dropped: some zeros, the rest scaled
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if "lora_B" in n)  # B starts at zero, so only its gradient is nonzero at step 1


def test_sharing_needs_the_same_tensor_unchanged_and_the_same_p():
    x = torch.randn(64, 64)
    a, b, c = (FastDropout(0.3, share_input=True).train() for _ in range(3))
    y = a(x)
    assert b(x) is y  # another sharing dropout, same tensor, same p: the same dropped copy
    assert not torch.equal(FastDropout(0.3, share_input=True).train()(x.clone()), y)  # another tensor
    assert not torch.equal(FastDropout(0.2, share_input=True).train()(x), y)  # another p
    y = a(x)
    torch.rand(1)  # anything drawn in between ends the sharing
    assert c(x) is not y
    y = a(x)
    x.mul_(1.0)  # changed in place (its version moves): drawn again
    assert c(x) is not y
    plain = FastDropout(0.3).train()  # the model's own dropouts never share
    assert not torch.equal(plain(x), plain(x))


def test_shared_mask_gradient_is_the_sum_over_its_readers():
    x = torch.randn(32, 16, requires_grad=True)
    d1, d2 = FastDropout(0.5, share_input=True).train(), FastDropout(0.5, share_input=True).train()
    w1, w2 = torch.randn(16), torch.randn(16)
    y1 = d1(x)
    y2 = d2(x)
    assert y2 is y1
    ((y1 * w1).sum() + (y2 * w2).sum()).backward()
    expected = torch.where(y1 != 0, (w1 + w2) * 2.0, torch.zeros(()))
    torch.testing.assert_close(x.grad, expected.expand_as(x.grad))
