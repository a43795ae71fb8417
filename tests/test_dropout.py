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
