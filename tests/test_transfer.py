"""Transfer-learning techniques: parameter groups, discriminative / layer-wise rates,
gradual unfreezing, staged fine-tuning (and its resume), sequence-length warm-up."""
from __future__ import annotations

import json

import pytest
import torch

import slimtune
from slimtune.train.groups import Groups, lr_multipliers, split_groups
from slimtune.train.schedules import lr_factor
from slimtune.train.transfer import seq_len_at, truncating_collate

from conftest import cls_config, sentiment_rows, write_csv


def _records(run, kind="train"):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if f'"{kind}"' in line]


def test_splitter_bert_llama_gpt2_and_fallback(tiny_bert, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    g = split_groups(bert)
    assert g.names == ["embeddings", "block.0", "block.1", "head"]
    assert g.of_param["bert.embeddings.word_embeddings.weight"] == "embeddings"
    assert g.of_param["bert.encoder.layer.1.attention.self.query.weight"] == "block.1"
    assert g.of_param["classifier.weight"] == "head" and g.of_param["bert.pooler.dense.weight"] == "head"

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama)
    g = split_groups(llama)
    assert g.names == ["embeddings", "block.0", "block.1", "head"]
    assert g.of_param["model.layers.0.mlp.down_proj.weight"] == "block.0"
    assert g.of_param["model.norm.weight"] == "head"

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    g = split_groups(gpt2)
    assert g.names == ["embeddings", "block.0", "block.1", "block.2", "head"]
    assert g.of_param["transformer.wpe.weight"] == "embeddings"
    assert g.of_param["transformer.h.2.attn.c_attn.weight"] == "block.2"

    # peft-wrapped: adapters land in their block's group
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(target_modules=["q_proj"]))
    g = split_groups(pm)
    assert g.of_param["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"] == "block.1"

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    g = split_groups(mlp)
    assert g.names == ["all"] and "one group" in g.note


def test_lr_multiplier_formulas():
    g = Groups(["embeddings", "block.0", "block.1", "block.2", "head"])
    m = lr_multipliers(g, layer_decay=0.5, lr_ratio_min=None, head_mult=None)
    assert m == {"head": 1.0, "block.2": 0.5, "block.1": 0.25, "block.0": 0.125, "embeddings": 0.0625}
    m = lr_multipliers(g, layer_decay=None, lr_ratio_min=0.01, head_mult=None)
    assert m["embeddings"] == pytest.approx(0.01) and m["head"] == pytest.approx(1.0)
    assert m["block.1"] == pytest.approx(0.1)  # geometric midpoint
    m = lr_multipliers(g, layer_decay=0.5, lr_ratio_min=None, head_mult=3.0)
    assert m["head"] == 3.0 and m["block.2"] == 0.5


# lr multipliers of a 10-step run with 2 warmup steps, by hand: the warmup climbs (s+1)/(w+1) to the peak at
# step index 2, then linear decay spreads 1 -> 0 over the 8 remaining steps (step index s: 1 - (s-2)/8)
LINEAR_10_WARMUP_2 = [1 / 3, 2 / 3, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]


def test_schedule_shapes_by_hand():
    from slimtune.train.schedules import warmup_steps

    assert [lr_factor(s, 10, 2, "linear") for s in range(10)] == pytest.approx(LINEAR_10_WARMUP_2)
    # cosine over 6 steps, no warmup: 0.5 (1 + cos(pi s / 6))
    assert [lr_factor(s, 6, 0, "cosine") for s in range(7)] == pytest.approx(
        [1.0, 0.9330127, 0.75, 0.5, 0.25, 0.0669873, 0.0])
    assert [lr_factor(s, 4, 1, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert warmup_steps(0.25, 8) == 2 and warmup_steps(3, 2) == 2 and warmup_steps(0.0, 8) == 0


def test_group_lrs_in_a_run_follow_the_formula(tiny_bert, cls_data, tmp_path):
    cfg = cls_config(tiny_bert, cls_data, tmp_path, max_steps=10, lr=1e-2, log_every=1, warmup=2, schedule="linear")
    cfg["train"].update(layer_decay=0.5, head_lr=2e-2)
    res = slimtune.run(cfg)
    pg = json.loads((res.run_dir / "param_groups.json").read_text())
    assert pg["groups"] == ["embeddings", "block.0", "block.1", "head"]
    assert pg["trainable_per_group"]["embeddings"] == 0 and pg["trainable_per_group"]["block.0"] > 0
    recs = _records(res.run_dir)
    assert [r["step"] for r in recs] == list(range(1, 11))
    for rec, f in zip(recs, LINEAR_10_WARMUP_2):  # the record of step k shows the rate its optimizer step used
        assert rec["lr"]["block.1"] == pytest.approx(1e-2 * 0.5 * f)
        assert rec["lr"]["block.0"] == pytest.approx(1e-2 * 0.25 * f)
        assert rec["lr"]["head"] == pytest.approx(2e-2 * f)


def test_a_new_head_gets_its_own_default_rate(tiny_bert, cls_data, tmp_path):
    from slimtune.api import default_head_lr

    assert default_head_lr(5e-4) == pytest.approx(5e-3)
    assert default_head_lr(5e-3) == pytest.approx(2e-2)  # at most the linear-probe rate
    assert default_head_lr(3e-2) == pytest.approx(3e-2)  # never below train.lr
    cfg = cls_config(tiny_bert, cls_data, tmp_path, max_steps=2, log_every=1, warmup=0, schedule="constant", lr=1e-3)
    res = slimtune.run(cfg)
    rec = _records(res.run_dir)[0]
    assert rec["lr"]["new_head"] == pytest.approx(1e-2) and rec["lr"]["decay"] == pytest.approx(1e-3)
    assert (json.loads((res.run_dir / "param_groups.json").read_text())["lr_multipliers"]
            == {"new_head": pytest.approx(10.0)})
    # with layer decay the top group ("head": the pooler here) keeps its own rate, the new head its 10x
    cfg = cls_config(tiny_bert, cls_data, tmp_path / "ld", max_steps=2, log_every=1, warmup=0, schedule="constant",
                     lr=1e-3)
    cfg["method"]["targets"] = ["query", "value", "pooler.dense"]
    cfg["train"]["layer_decay"] = 0.5
    rec = _records(slimtune.run(cfg).run_dir)[0]
    assert rec["lr"]["new_head"] == pytest.approx(1e-2) and rec["lr"]["head"] == pytest.approx(1e-3)
    assert rec["lr"]["block.1"] == pytest.approx(5e-4)
    cfg = cls_config(tiny_bert, cls_data, tmp_path / "one", max_steps=2, log_every=1, warmup=0, schedule="constant",
                     lr=1e-3)
    cfg["train"]["head_lr"] = 1e-3  # one rate for all, as asked
    rec = _records(slimtune.run(cfg).run_dir)[0]
    assert rec["lr"]["head"] == pytest.approx(1e-3) and "new_head" not in rec["lr"]
    cfg = cls_config(tiny_bert, cls_data, tmp_path / "probe", max_steps=2, log_every=1, warmup=0,
                     schedule="constant", lr=1e-3)
    cfg["method"] = {"name": "head-only"}  # the method's lr is the head's: no boost
    rec = _records(slimtune.run(cfg).run_dir)[0]
    assert "new_head" not in rec["lr"] and all(v == pytest.approx(1e-3) for v in rec["lr"].values())


def test_a_run_saved_before_the_head_default_resumes_as_it_started(tiny_bert, cls_data, tmp_path, monkeypatch):
    """A config.yaml without train.spread_duplicates comes from before that option and the fast head: the run
    resumes with one lr for the head and copies not spread, so its checkpoint's optimizer groups still fit."""
    import dataclasses

    import yaml

    from slimtune.tasks import TASKS
    from slimtune.tasks.text_classification import TextClassification

    cfg = cls_config(tiny_bert, cls_data, tmp_path, max_steps=6, log_every=1)
    no_fast_head = dataclasses.replace(TextClassification.spec, new_head_lr_mult=1.0)  # as the code was then
    monkeypatch.setattr(TextClassification, "spec", no_fast_head)  # the task and the registry hold the same spec
    monkeypatch.setitem(TASKS, "text-classification", no_fast_head)
    with pytest.raises(KeyboardInterrupt):
        slimtune.run(cfg, callbacks=[_Interrupt(3)])
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["train"]["spread_duplicates"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    res = slimtune.run(None, resume=run_dir)
    assert res.summary["status"] == "completed" and res.summary["steps"] == 6
    assert "new_head" not in _records(run_dir)[-1]["lr"]


def test_lora_plus_composes_with_layer_decay(tiny_bert, cls_data, tmp_path):
    cfg = cls_config(tiny_bert, cls_data, tmp_path, max_steps=2, log_every=1, warmup=0, schedule="constant")
    cfg["method"] = {"name": "lora-plus", "ratio": 4}
    cfg["train"]["layer_decay"] = 0.5
    rec = _records(slimtune.run(cfg).run_dir)[0]
    assert rec["lr"]["block.1/lora_B"] == pytest.approx(4 * rec["lr"]["block.1"])
    assert rec["lr"]["block.0/lora_B"] == pytest.approx(4 * 0.5 * rec["lr"]["block.1"])


class _Snapshot:
    """Records requires_grad per group and the weights of block.0 at every step."""

    def __init__(self):
        self.trainable, self.block0 = {}, {}

    def on_step_end(self, loop):
        m = loop.accelerator.unwrap_model(loop.model)
        params = dict(m.named_parameters())
        self.trainable[loop.state["step"]] = sorted({n.split(".layer.")[1].split(".")[0] for n, p in params.items()
                                                     if p.requires_grad and ".layer." in n})
        self.block0[loop.state["step"]] = {n: p.detach().clone() for n, p in params.items()
                                           if ".layer.0." in n and "lora" in n}


def _flipped_eval(tmp_path) -> str:
    """Eval data whose labels are the opposite of what training teaches: no later evaluation improves on the first
    by train.early_stopping.min_delta (0.05 in these tests), so the best step is the first evaluation, early in
    the run, and the weights move on after it."""
    rows = [{"text": r["text"], "label": "neg" if r["label"] == "pos" else "pos"} for r in sentiment_rows(40, 3)]
    return str(write_csv(tmp_path / "eval-flipped.csv", rows))


def _adapter_reproduces_best(res, eval_file) -> None:
    got = slimtune.evaluate(res.run_dir, eval_file)
    for k, v in res.summary["best"].items():
        assert got[k] == pytest.approx(v, abs=1e-6), (k, got, res.summary["best"], res.summary["final"])
    # and the check can fail: the weights moved on after the best step
    from safetensors.torch import load_file

    final = load_file(str(res.run_dir / "checkpoints/last/trainable.safetensors"))
    saved = {k.replace(".default", ""): v for k, v in final.items()}
    adapter = load_file(str(res.run_dir / "adapter/adapter_model.safetensors"))
    assert any(not torch.equal(adapter[k], saved[k]) for k in adapter if ".layer.0." in k and "lora" in k)


def test_gradual_unfreezing_on_schedule(tiny_bert, cls_data, tmp_path):
    cfg = cls_config(tiny_bert, cls_data, tmp_path, max_steps=9, log_every=1, lr=5e-2)  # block.0 moves far in 3 steps
    cfg["train"]["unfreeze"] = {"every_steps": 3, "start": 1}
    cfg["data"]["eval"] = _flipped_eval(tmp_path)
    cfg["eval"] = {"every_steps": 5, "monitor": "loss"}
    cfg["train"]["early_stopping"] = {"min_delta": 0.05}
    snap = _Snapshot()
    res = slimtune.run(cfg, callbacks=[snap])
    # groups: embeddings, block.0, block.1, head. Steps 1-3: the head; after 3 steps block.1 joins, after 6 block.0
    # (the snapshot sees what trained during each step)
    assert snap.trainable[1] == [] and snap.trainable[3] == []
    assert snap.trainable[4] == ["1"] and snap.trainable[6] == ["1"]
    assert snap.trainable[7] == ["0", "1"]
    # block.0's adapters do not move while frozen (the optimizer skips them), and move once unfrozen
    for n, t in snap.block0[1].items():
        torch.testing.assert_close(snap.block0[6][n], t)
    assert any(not torch.equal(snap.block0[9][n], t) for n, t in snap.block0[1].items())
    recs = _records(res.run_dir)
    assert recs[0]["trainable_groups"] == ["head"]
    assert recs[-1]["trainable_groups"] == ["block.0", "block.1", "head"]  # embeddings: nothing trainable there
    # the best step (5) lies before block.0 was unfrozen; the adapter holds block.0 as it was then
    assert res.summary["best_step"] == 5
    _adapter_reproduces_best(res, cfg["data"]["eval"])


class _Interrupt:
    def __init__(self, at):
        self.at = at

    def on_step_end(self, loop):
        if loop.state["step"] == self.at:
            raise KeyboardInterrupt


def test_staged_fine_tuning_and_resume_in_stage_two(tiny_bert, cls_data, tmp_path):
    eval_file = _flipped_eval(tmp_path)

    def cfg_for(out):
        cfg = cls_config(tiny_bert, cls_data, out, max_steps=20, log_every=1, warmup=2)
        cfg["train"].update(strategy="staged", staged={"head_fraction": 0.25, "head_lr_mult": 2.0})
        cfg["data"]["eval"] = eval_file
        cfg["eval"] = {"every_steps": 4, "monitor": "loss"}
        cfg["train"]["early_stopping"] = {"min_delta": 0.05}
        return cfg

    full = slimtune.run(cfg_for(tmp_path / "a"))
    recs = _records(full.run_dir)
    assert [r["stage"] for r in recs[:6]] == [1, 1, 1, 1, 1, 2]  # 25% of 20 steps: the head alone
    assert recs[0]["trainable_groups"] == ["head"] and "block.0" in recs[6]["trainable_groups"]
    # by hand: stage 1 (5 steps, 1 warmup step, x2): 2 * [1/2, 1, 3/4, 1/2, 1/4]; stage 2 restarts its warmup
    # (2 steps: 1/3, 2/3), peaks, then decays linearly over its 13 remaining steps
    expected = [1.0, 2.0, 1.5, 1.0, 0.5, 1 / 3, 2 / 3, 1.0, 12 / 13, 11 / 13]
    assert [r["lr"]["decay"] for r in recs[:10]] == pytest.approx([1e-2 * f for f in expected])
    # the best step (4) lies in stage 1, when only the head trained: the adapter holds the adapters as they were then
    assert full.summary["best_step"] == 4
    _adapter_reproduces_best(full, eval_file)
    with pytest.raises(KeyboardInterrupt):  # before the evaluation of step 12: the resume does it
        slimtune.run(cfg_for(tmp_path / "b"), callbacks=[_Interrupt(12)])
    resumed = slimtune.run(None, resume=tmp_path / "b" / "run")
    assert resumed.best_metrics == pytest.approx(full.best_metrics, abs=1e-6)
    assert resumed.summary["best_step"] == full.summary["best_step"]
    assert resumed.summary["final"] == pytest.approx(full.summary["final"], abs=1e-6)
    assert [r["step"] for r in _records(resumed.run_dir, "eval")] == [4, 8, 12, 16, 20]


def test_seq_len_schedule_pure_function_and_collate():
    sched = [(0.0, 16), (0.5, 32), (0.8, 64)]
    assert [seq_len_at(sched, p) for p in (0.0, 0.49, 0.5, 0.79, 0.8, 1.0)] == [16, 16, 32, 32, 64, 64]
    from slimtune.data.batching import BatchShape

    fn = truncating_collate(lambda ex: ex, BatchShape(max_length=4), keep_last=True)
    out = fn([{"input_ids": [1, 2, 3, 4, 5, 6], "attention_mask": [1] * 6, "labels": 1}])
    assert out[0]["input_ids"] == [1, 2, 3, 6] and out[0]["attention_mask"] == [1] * 4 and out[0]["labels"] == 1


def test_seq_len_warmup_batches_change_length(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join("the movie was good and the story was nice " * 4 for _ in range(60)))

    class Widths:
        def __init__(self):
            self.seen = []

        def on_step_end(self, loop):
            self.seen.append(loop.log_extras.get("max_len"))

    w = Widths()
    cfg = {"task": "causal-lm", "model": {"name": tiny_llama, "max_length": 32}, "data": {"train": str(text)},
           "train": {"max_steps": 8, "batch_size": 4, "precision": "fp32", "log_every": 1,
                     "seq_len_schedule": [[0.0, 8], [0.5, 16]]}, "output": {"dir": str(tmp_path), "name": "s"}}
    res = slimtune.run(cfg, callbacks=[w])
    recs = _records(res.run_dir)
    # each record shows the length its step trained at: 8 until half-way, then 16
    assert [r["max_len"] for r in recs] == [8, 8, 8, 8, 16, 16, 16, 16]
    assert res.summary["tokens_seen"] == 4 * 4 * 8 + 4 * 4 * 16


def test_bad_transfer_options(tiny_bert, cls_data, tmp_path):
    cfg = cls_config(tiny_bert, cls_data, tmp_path)
    cfg["train"].update(unfreeze={"every_steps": 2}, strategy="staged")
    with pytest.raises(slimtune.ConfigError, match="use one of them"):
        slimtune.run(cfg)
    cfg = cls_config(tiny_bert, cls_data, tmp_path)
    cfg["train"]["seq_len_schedule"] = [[0.2, 16]]
    with pytest.raises(slimtune.ConfigError, match="seq_len_schedule"):
        slimtune.run(cfg)
    cfg = cls_config(tiny_bert, cls_data, tmp_path)
    cfg["train"]["layer_decay"] = 1.5
    with pytest.raises(slimtune.ConfigError, match="layer_decay"):
        slimtune.run(cfg)
