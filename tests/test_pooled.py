"""The last block of a first-token classifier runs its tail at position 0 only (models/pooled.py): the same logits
and gradients as the unhooked model, one position through the last feed-forward, and only where the head reads
position 0."""
from __future__ import annotations

import copy

import pytest
import torch

from slimtune.models.pooled import last_attention_output, pool_position_only

from conftest import cls_config


def _config(kind: str, **kw):
    from transformers import BertConfig, LlamaConfig, RobertaConfig

    common = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  num_labels=3, **kw)
    if kind == "bert":
        return BertConfig(max_position_embeddings=64, **common)
    if kind == "roberta":
        return RobertaConfig(max_position_embeddings=70, pad_token_id=1, **common)
    return LlamaConfig(max_position_embeddings=64, num_key_value_heads=2, pad_token_id=0, **common)


def _model(kind: str, auto: str = "AutoModelForSequenceClassification", **kw):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, auto).from_config(_config(kind, **kw)).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padded rows: position 0 must not see what the mask hides either
    mask[3, 4:] = 0
    ids[mask == 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _positions_into_last_ffn(model) -> list[int]:
    seen = []
    layer = model.base_model.encoder.layer[-1]
    layer.intermediate.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_first_token_classifier_gives_the_same_logits_from_one_position(kind):
    plain = _model(kind)
    hooked = copy.deepcopy(plain)
    assert pool_position_only(hooked)
    seen = _positions_into_last_ffn(hooked)
    batch = _batch()
    with torch.no_grad():
        want, got = plain(**batch).logits, hooked(**batch).logits
    assert seen == [1]  # 12 positions before: the cut happened
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_lora_gradients_are_the_same_with_the_hook():
    from peft import LoraConfig, get_peft_model

    def grads(hook: bool) -> dict:
        model = _model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=["query", "value", "dense"]))
        if hook:  # on the peft model, as training hooks it once the method is applied
            assert pool_position_only(model)
        model.train()
        out = model(**_batch(), labels=torch.tensor([0, 1, 2, 1]))
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, hooked = grads(False), grads(True)
    assert plain.keys() == hooked.keys() and any("layer.1.output.dense.lora" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(hooked[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind, auto", [("llama", "AutoModelForSequenceClassification"),  # last non-pad token
                                        ("bert", "AutoModelForTokenClassification"),  # every position scored
                                        ("bert", "AutoModel")])
def test_models_that_read_other_positions_are_left_alone(kind, auto):
    model = _model(kind, auto)
    assert last_attention_output(model) is None
    assert not pool_position_only(model)


def test_hooking_twice_adds_one_hook():
    model = _model("bert")
    pool_position_only(model)
    pool_position_only(model)
    assert len(last_attention_output(model)._forward_pre_hooks) == 1


@pytest.mark.parametrize("on", [True, False])
def test_training_and_a_finished_run_use_it_as_the_config_says(tmp_path, tiny_bert, cls_data, on):
    from slimtune.finished import load_run
    from slimtune.runner import run

    cfg = cls_config(tiny_bert, cls_data, tmp_path / "out", epochs=1, pooled_position_only=on)
    widths = []

    class Watch:
        def on_train_begin(self, loop):
            base = loop.accelerator.unwrap_model(loop.model).base_model.model
            base.bert.encoder.layer[-1].intermediate.register_forward_hook(
                lambda m, args, out: widths.append(args[0].shape[1]))

    result = run(cfg, callbacks=[Watch()])
    assert widths
    assert (set(widths) == {1}) if on else (min(widths) > 1)
    loaded = load_run(result.run_dir, device="cpu")
    assert (last_attention_output(loaded.model.base_model.model)._forward_pre_hooks != {}) is on
