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


def _attention_inputs(b=2, heads=4, kv_heads=4, n=9, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, n, d, generator=g, requires_grad=True)
    k = torch.randn(b, kv_heads, n, d, generator=g, requires_grad=True)
    v = torch.randn(b, kv_heads, n, d, generator=g, requires_grad=True)
    keys = torch.ones(b, 1, n, n, dtype=torch.bool)
    keys[1, ..., 6:] = False  # padding of the second sequence (sdpa's boolean convention: True attends)
    return q, k, v, keys


class _Attn(nn.Module):
    def __init__(self, groups=1, is_causal=False):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, is_causal


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
@pytest.mark.parametrize("groups", [1, 2])
def test_fast_dropout_sdpa_is_torch_math_attention_with_the_same_mask(mask_kind, groups):
    """Against torch's own math attention given the same keep-mask: output and gradients."""
    from slimtune.train.dropout import fast_dropout_sdpa

    p = 0.1
    q, k, v, keys = _attention_inputs(kv_heads=4 // groups)
    mask = {"bool": keys, "float": torch.zeros(keys.shape).masked_fill(~keys, -1e9), "none": None}[mask_kind]
    torch.manual_seed(5)
    keep, scale = keep_mask((2, 4, 9, 9), p)
    torch.manual_seed(5)
    out, weights = fast_dropout_sdpa(_Attn(groups), q, k, v, mask, dropout=p, scaling=0.3)
    assert weights is None and out.shape == (2, 9, 4, 8)  # transformers' layout: [batch, query, heads, dim]
    kk, vv = (k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))
    additive = torch.zeros(keys.shape).masked_fill(~keys, float("-inf")) if mask_kind == "bool" else mask
    # the raw math op takes the additive form (F.scaled_dot_product_attention converts a boolean mask first)
    ref, _ = torch.ops.aten._scaled_dot_product_attention_math(q, kk, vv, additive, 1 - 1 / scale, False, keep,
                                                                scale=0.3)
    ref = ref.transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * torch.linspace(-1, 1, 8)).sum(), (q, k, v))
    for a, b in zip(grads, refs):
        assert torch.allclose(a, b, atol=1e-5)
    # and the mask is applied: without dropout the output differs
    assert not torch.allclose(out, fast_dropout_sdpa(_Attn(groups), q, k, v, mask, dropout=0.0, scaling=0.3)[0])


def test_fast_dropout_sdpa_hands_other_cases_to_transformers_sdpa():
    """p = 0 (eval), the causal case sdpa runs by its is_causal flag, extra arguments: transformers' sdpa itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from slimtune.train.dropout import fast_dropout_sdpa

    q, k, v, keys = _attention_inputs()
    for module, mask, p, extra in ((_Attn(), keys, 0.0, {}), (_Attn(is_causal=True), None, 0.1, {}),
                                   (_Attn(), keys, 0.1, {"position_bias": torch.randn(1, 4, 9, 9)})):
        torch.manual_seed(7)
        a = fast_dropout_sdpa(module, q, k, v, mask, dropout=p, **extra)[0]
        torch.manual_seed(7)
        b = sdpa_attention_forward(module, q, k, v, mask, dropout=p, **extra)[0]
        assert torch.equal(a, b)


def test_use_fast_dropout_switches_sdpa_attention_and_keeps_eval_and_saved_config(tiny_bert, tmp_path):
    import json

    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from slimtune.train.dropout import FAST_DROPOUT_SDPA

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    plain.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == "sdpa"
    use_fast_dropout(model)
    assert model.config._attn_implementation == FAST_DROPOUT_SDPA
    ids = torch.randint(5, model.config.vocab_size, (3, 10))
    att = torch.ones(3, 10, dtype=torch.long)
    att[1, 6:] = 0
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=att).logits,
                           plain(input_ids=ids, attention_mask=att).logits)
    model.train()
    torch.manual_seed(1)
    a = model(input_ids=ids, attention_mask=att, labels=torch.tensor([0, 1, 1]))
    a.loss.backward()
    torch.manual_seed(1)
    assert torch.equal(a.logits, model(input_ids=ids, attention_mask=att).logits)  # reproducible from the RNG
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)  # the implementation's name is not written where another tool would read it
    assert FAST_DROPOUT_SDPA not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    eager = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32),
                                          ).to(torch.float32)
    eager.set_attn_implementation("eager")
    use_fast_dropout(eager)
    assert eager.config._attn_implementation == "eager"  # a chosen eager attention stays as it is
