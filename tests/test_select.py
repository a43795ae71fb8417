"""`slimtune select`: the race's rules by hand, and races of tiny random models (tiny_bert, tiny_llama as a
classifier, and a BERT with every weight zero, which cannot learn: its eval accuracy is the majority rate, 0.5
on the balanced eval split)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import _tokenizer, cls_config, sentiment_rows, write_csv, write_jsonl
from typer.testing import CliRunner

from slimtune.config import ConfigError, load_config
from slimtune.config.select import parse_memory
from slimtune.select.plan import (Candidate, SelectPlan, budget_left, decides, forecast, pick, promoted,
                                  rung_fractions)

RUNNER = CliRunner(env={"COLUMNS": "400"})  # no wrapping: the messages are checked word for word


# -- the rules, by hand ------------------------------------------------------------------------------------------

def test_rungs_promotion_and_the_end_of_the_race():
    assert rung_fractions(3, 0.1) == pytest.approx((1 / 9, 1 / 3, 1.0))
    assert rung_fractions(2, 0.25) == (0.25, 0.5, 1.0)
    assert rung_fractions(2, 0.3) == (0.5, 1.0)
    assert rung_fractions(3, 1.0) == (1.0,)
    rows = [{"label": k, "metric": m, "train_seconds": 1.0} for k, m in (("a", 0.6), ("b", 0.9), ("c", None),
                                                                          ("d", 0.7), ("e", 0.8))]
    assert [r["label"] for r in promoted(rows, 2, higher=True)] == ["b", "e", "d"]  # ceil(5/2); failed c never
    assert [r["label"] for r in promoted(rows, 3, higher=False)] == ["a", "d"]  # lower is better: ceil(5/3) = 2
    assert decides(3, 3, 1 / 3) and decides(2, 2, 0.5) and decides(4, 2, 1.0)
    assert not decides(4, 3, 1 / 9) and not decides(3, 2, 0.5)


def _row(label: str, metric: float, secs: float, rung: int = 0, **kw) -> dict:
    return {"label": label, "metric": metric, "train_seconds": secs, "rung": rung, **kw}


def test_pick_is_the_best_or_the_cheapest_within_the_tolerance():
    rows = [_row("A", 0.90, 100.0), _row("B", 0.897, 10.0), _row("C", 0.80, 1.0)]
    assert pick(rows, 0.0, True, "accuracy")[0]["label"] == "A"
    chosen, rule = pick(rows, 0.5, True, "accuracy")  # 0.003 below the best, within 0.005; C is 0.1 below
    assert chosen["label"] == "B" and "within 0.5 points (0.005)" in rule and "A" in rule
    assert pick(rows, 0.2, True, "accuracy")[0]["label"] == "A"  # 0.003 > 0.002
    losses = [_row("A", 1.000, 50.0), _row("B", 1.004, 5.0)]
    assert pick(losses, 0.5, False, "loss")[0]["label"] == "B"
    assert pick(losses, 0.3, False, "loss")[0]["label"] == "A"
    assert pick([_row("A", float("nan"), 1.0)], 0.0, True, "accuracy")[0] is None


def _plan(**kw) -> SelectPlan:
    values = dict(select_dir=Path("/x"), name="s", base={}, candidates=(), fractions=(0.25, 0.5, 1.0),
                  train_samples=100, max_steps=None, eta=2, tolerance=0.0, monitor="accuracy", higher_is_better=True,
                  budget_minutes=None, budget_kwh=None, memory_bytes=None, latency_examples=4)
    return SelectPlan(**{**values, **kw})


def test_rung_sizes_and_the_budget_by_hand():
    plan = _plan(max_steps=40)
    assert [plan.steps(r) for r in range(3)] == [10, 20, 40]
    a, b = Candidate("m1", "lora"), Candidate("m2", "lora")
    rows = [_row(a.label, 0.8, 50.0, wall_seconds=60.0), _row(b.label, 0.7, 50.0, wall_seconds=30.0)]
    plan = _plan(budget_minutes=4.0)
    # a rung continues the trial: rung 1 adds 0.5 - 0.25 of the run, as many steps as rung 0 took (1 min)
    assert forecast(rows, a, 1, plan) == pytest.approx(1.0)
    assert forecast([*rows, _row(a.label, 0.8, 50.0, rung=1, wall_seconds=60.0)], a, 2, plan) == pytest.approx(2.0)
    assert budget_left(rows, a, 1, plan) is None  # 1.5 min spent + 1 min ahead <= 4
    assert "would take about 1 more" in budget_left(rows, a, 1, _plan(budget_minutes=2.0))
    assert budget_left(rows, a, 1, _plan(budget_minutes=1.5)).startswith("budget spent: 1.5 of 1.5 min")
    assert forecast(rows, Candidate("m3", "lora"), 0, plan) == pytest.approx(0.75)  # the mean of rung 0
    kwh = _plan(budget_kwh=1.0)
    assert "not measured" in budget_left([_row("x", 0.5, 1.0, energy_kwh=None)], a, 0, kwh)


def test_memory_sizes():
    assert parse_memory("16GB") == 16 * 2**30
    assert parse_memory("16 GiB") == 16 * 2**30
    assert parse_memory("512MB") == 512 * 2**20
    assert parse_memory("1.5t") == int(1.5 * 2**40)
    for bad in ("16", "16 gigs", "0GB", "-1GB", "GB"):
        with pytest.raises(ValueError, match="512MB, 16GB"):
            parse_memory(bad)


# -- races of tiny models ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dead_bert(tmp_path_factory) -> str:
    """A BERT whose every weight is zero: each input reaches the head as the same zero vector, so nothing but the
    head's bias can learn and it predicts one class for every example."""
    import torch
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("dead-bert")
    tok = _tokenizer("bert")
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=128))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("select-data")
    return {"train": str(write_csv(folder / "train.csv", sentiment_rows(160, 0)))}


def _config(tmp_path: Path, data: dict, model: str, **train) -> dict:
    cfg = cls_config(model, data, tmp_path / "out", **train)
    cfg["eval"] = {"every_steps": 10}
    cfg["track"] = {"energy": False, "index": False}
    return cfg


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def race(tmp_path_factory, tiny_bert, tiny_llama, dead_bert, data):
    """One race: three candidates paused at 0.5 of their steps, the best ceil(3/2) = 2 trained on to the end, which
    decides."""
    from slimtune.select import select

    tmp = tmp_path_factory.mktemp("race")
    cfg = _config(tmp, data, tiny_bert)
    cfg["select"] = {"models": [tiny_bert, tiny_llama, dead_bert], "methods": ["lora"], "eta": 2,
                     "min_fraction": 0.5, "latency_examples": 3}
    path = _write(tmp / "my.yaml", cfg)
    result = select(path, log=lambda s: None)
    return {"result": result, "config": path, "tmp": tmp, "models": (tiny_bert, tiny_llama, dead_bert)}


def _best_accuracy(run_dir: str) -> float:
    return json.loads((Path(run_dir) / "summary.json").read_text())["best"]["accuracy"]


def test_race_promotes_the_learners_and_picks_the_best(race):
    result, (bert, llama, dead) = race["result"], race["models"]
    summary = json.loads((result.select_dir / "summary.json").read_text())
    assert result.select_dir.name == "select-my" and summary["status"] == "completed"
    assert summary["train_samples"] == 144  # 160 - 16 carved for eval: 9 steps an epoch, 90 in all
    by_model = {c["model"]: c for c in summary["candidates"]}
    assert by_model[dead]["metric_per_rung"] == {"0": 0.5}  # one class for all: the majority rate, 8 of 16
    assert by_model[dead]["rung_reached"] == 0 and by_model[dead]["dropped"].startswith("not promoted after rung 0")
    for live in (bert, llama):
        entry = by_model[live]
        assert entry["rung_reached"] == 1 and entry["metric_per_rung"]["0"] > 0.5 and entry["dropped"] is None
        assert entry["latency_s"] > 0 and entry["adapter_bytes"] > 0 and entry["peak_memory_mb"] > 0
        assert entry["train_seconds"] > 0
        # one run folder, paused at rung 0 (45 of its 90 steps) and continued to the end at rung 1; each rung's row
        # holds what that rung cost, and they add up to the run's
        first, second = entry["trials"]
        assert first["status"] == "paused" and first["steps"] == 45 and first["samples"] == 45 * 16
        assert second["run_dir"] == first["run_dir"] and second["status"] == "completed" and second["steps"] == 90
        run_cost = json.loads((Path(first["run_dir"]) / "summary.json").read_text())["cost"]
        assert first["train_seconds"] + second["train_seconds"] == pytest.approx(run_cost["train_seconds"])
        assert 0 < first["train_seconds"] < run_cost["train_seconds"]
        assert load_config(Path(first["run_dir"]) / "config.yaml").data.max_train_samples is None
    assert by_model[dead]["trials"][0]["status"] == "paused" and by_model[dead]["trials"][0]["steps"] == 45
    finals = {m: _best_accuracy(by_model[m]["trials"][1]["run_dir"]) for m in (bert, llama)}
    best_model = max(finals, key=finals.get)
    if finals[bert] != finals[llama]:
        assert result.pick.model == best_model
    assert summary["pick"]["metric"] == max(finals.values()) and summary["decided_rung"] == 1
    assert "the best accuracy" in summary["rule"]
    page = (result.select_dir / "report.html").read_text()
    assert "Pareto" in page and "(pick)" in page and "not promoted after rung 0" in page


def test_best_yaml_loads_and_runs(race):
    from slimtune.runner import run

    best = race["result"].best_config
    cfg = load_config(best)
    assert cfg.model.name == race["result"].pick.model and cfg.method.name == "lora" and cfg.select is None
    assert cfg.data.max_train_samples is None and cfg.output.name == "select-my-best"
    out = run(best, overrides=["train.max_steps=2"])
    assert out.status == "completed" and (out.run_dir / "adapter").is_dir()


def test_a_killed_select_resumes_without_rerunning_finished_trials(race, monkeypatch):
    """The same race again in a new folder, interrupted inside the first rung-1 continuation (a checkpoint is
    saved), then run again: rung 0 is read back, the interrupted trial resumes from its checkpoint, the other one
    continues from its rung-0 pause, and every metric and the pick's value are the uninterrupted race's."""
    import slimtune.runner
    from slimtune.select import select
    from slimtune.select import trial as trial_mod

    tmp = race["tmp"] / "again"
    cfg = yaml.safe_load(race["config"].read_text())
    cfg["output"]["dir"] = str(tmp)
    path = _write(race["tmp"] / "again.yaml", {**cfg, "select": {**cfg["select"], "name": "select-my"}})
    killed = []

    class Kill(trial_mod.LatencyProbe):
        def on_step_end(self, loop):
            if loop.state.step == 48 and not killed:  # 3 steps into rung 1 (rung 0 paused at 45)
                killed.append(loop.run.path)
                raise KeyboardInterrupt

    monkeypatch.setattr(trial_mod, "LatencyProbe", Kill)
    with pytest.raises(KeyboardInterrupt):
        select(path, log=lambda s: None)
    monkeypatch.undo()
    assert json.loads((killed[0] / "summary.json").read_text())["status"] == "interrupted"
    calls = []
    real = slimtune.runner.run

    def counting(config, *args, **kwargs):
        calls.append(kwargs.get("resume"))
        return real(config, *args, **kwargs)

    monkeypatch.setattr(slimtune.runner, "run", counting)
    again = select(path, log=lambda s: None)
    assert len(calls) == 2 and all(c is not None for c in calls) and killed[0] in calls  # rung 0 read back
    summary = json.loads((again.select_dir / "summary.json").read_text())
    assert all(t["reused"] for c in summary["candidates"] for t in c["trials"] if t["rung"] == 0)
    # the resumed and the continued trial end where the uninterrupted race's did: the same metrics, the same pick
    per_rung = {c["label"]: c["metric_per_rung"] for c in race["result"].candidates}
    assert {c["label"]: c["metric_per_rung"] for c in summary["candidates"]} == per_rung
    assert summary["pick"]["metric"] == race["result"].summary["pick"]["metric"]


def test_a_candidate_over_the_memory_is_dropped_with_its_estimate(tmp_path, tiny_bert, data):
    from transformers import BertConfig

    from slimtune.select import select

    big = tmp_path / "big-bert"  # a config and no weights: the estimate builds the model on the meta device
    tok = _tokenizer("bert")
    BertConfig(vocab_size=len(tok), hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
               intermediate_size=2048).save_pretrained(big)
    tok.save_pretrained(big)
    cfg = _config(tmp_path, data, tiny_bert, max_steps=4)
    logs = []
    result = select(_write(tmp_path / "m.yaml", cfg), models=f"{tiny_bert},{big}", memory="20MB",
                    log=logs.append)
    entry = {c["model"]: c for c in result.candidates}
    # ~12.6M parameters: 50 MB of weights alone, over 20 MB; tiny_bert's ~23k parameters fit
    assert entry[str(big)]["dropped"].startswith("estimated training memory") and "exceeds --memory 20MB" in \
        entry[str(big)]["dropped"]
    assert entry[str(big)]["memory_estimate_bytes"] > 50 * 10**6 and entry[str(big)]["trials"] == []
    assert entry[tiny_bert]["memory_estimate_bytes"] < 20 * 2**20 and result.pick.model == tiny_bert
    assert any("dropped" in line and "big-bert" in line for line in logs)


def test_the_budget_stops_the_race(tmp_path, tiny_bert, data):
    from slimtune.select import select

    cfg = _config(tmp_path, data, tiny_bert, max_steps=4)
    result = select(_write(tmp_path / "b.yaml", cfg), models=tiny_bert, methods="lora,ia3", budget_minutes=0.001,
                    log=lambda s: None)
    ran = [c for c in result.candidates if c["trials"]]
    assert len(ran) == 1 and ran[0]["method"] == "lora"  # the first trial starts, and spends the 0.06 s
    assert result.stopped.startswith("budget spent") and result.decided_rung == 0
    other = next(c for c in result.candidates if c["method"] == "ia3")
    assert other["dropped"].startswith("not run: budget spent") and result.pick.method == "lora"
    assert json.loads((result.select_dir / "summary.json").read_text())["status"] == "stopped by the budget"


# -- the command line and the YAML section ----------------------------------------------------------------------------

def test_the_cli_and_the_yaml_section_give_the_same_plan(tmp_path, tiny_bert, tiny_llama, data, monkeypatch):
    import slimtune.select
    from slimtune.cli import app
    from slimtune.select.race import make_plan, prepare

    plain = _config(tmp_path, data, tiny_bert)
    section = {"models": [tiny_bert, tiny_llama], "methods": ["lora", "ia3"], "budget_minutes": 30.0,
               "memory": "16GB", "tolerance": 0.5, "eta": 2, "min_fraction": 0.25, "name": "pick"}
    yaml_plan = make_plan(*prepare(_write(tmp_path / "with.yaml", {**plain, "select": section})))[0]
    seen = {}

    def fake(config, overrides, report=True, log=print, **options):
        seen["plan"] = make_plan(*prepare(config, overrides, **options))[0]
        raise ConfigError("stop here")

    monkeypatch.setattr(slimtune.select, "select", fake)
    out = RUNNER.invoke(app, ["select", str(_write(tmp_path / "without.yaml", plain)), "--models",
                                   f"{tiny_bert},{tiny_llama}", "--methods", "lora,ia3", "--budget-minutes", "30",
                                   "--memory", "16GB", "--tolerance", "0.5", "--eta", "2", "--min-fraction", "0.25",
                                   "--name", "pick"])
    assert out.exit_code == 2 and "stop here" in out.output
    assert seen["plan"] == yaml_plan
    assert len(yaml_plan.candidates) == 4 and yaml_plan.fractions == (0.25, 0.5, 1.0)
    assert yaml_plan.memory_bytes == 16 * 2**30 and yaml_plan.select_dir.name == "pick"


@pytest.mark.parametrize("flags, says", [
    (["--methods", "lora,fancy"], ["'fancy' is not a method; accepted:", "lora", "ia3"]),
    (["--memory", "16 gigs"], ["'16 gigs'", "512MB, 16GB"]),
    (["--models", "{bert},/no/such/model"], ["'/no/such/model' does not resolve", "a folder with a config.json"]),
    (["--budget-minutes", "1", "--budget-kwh", "1"], ["give one budget"]),
])
def test_bad_input_names_the_value_and_what_is_accepted(tmp_path, tiny_bert, data, flags, says):
    from slimtune.cli import app

    path = _write(tmp_path / "c.yaml", _config(tmp_path, data, tiny_bert))
    flags = [f.format(bert=tiny_bert) for f in flags]
    if "--models" not in flags:
        flags += ["--models", tiny_bert]
    out = RUNNER.invoke(app, ["select", str(path), *flags])
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    for piece in says:
        assert piece in text


def test_no_candidates_says_how_to_give_them(tmp_path, tiny_bert, data):
    from slimtune.select.race import prepare

    with pytest.raises(ConfigError, match="no `select:` section and no --models"):
        prepare(_write(tmp_path / "n.yaml", _config(tmp_path, data, tiny_bert)))


# -- a decoder as a sequence classifier ----------------------------------------------------------------------------

def _sequence_task_config(task: str, tmp_path: Path, data: dict, model: str) -> dict:
    """The same texts as text-classification, regression (a rating per text) or multi-label (a set per text)."""
    cfg = _config(tmp_path, data, model, max_steps=2)
    if task == "text-classification":
        return cfg
    rows = sentiment_rows(32, 0)
    for i, r in enumerate(rows):
        r["label"] = float(i % 5) if task == "regression" else (["pos", "long"] if i % 3 else ["pos"])
    cfg.update(task=task, data={"train": str(write_jsonl(tmp_path / f"{task}.jsonl", rows))})
    if task == "regression":
        cfg["data"]["target_columns"] = ["label"]
    return cfg


@pytest.mark.parametrize("task", ["text-classification", "regression", "multi-label-classification"])
def test_a_decoder_classifier_pools_the_last_real_token(tmp_path, data, task):
    """A checkpoint whose pad is its EOS (as SmolLM2's): the tokenizer gets a distinct pad, and the classifier's
    config must name that pad, else last-token pooling takes a pad position of every right-padded row; the same
    for every task with a sequence-level head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.finished import load_run
    from slimtune.runner import run

    torch.manual_seed(0)
    path = tmp_path / "eos-pad-llama"
    tok = _tokenizer("llama")
    tok.pad_token = tok.eos_token
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.eos_token_id,
                                 eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    result = run(_sequence_task_config(task, tmp_path, data, str(path)))
    loaded = load_run(result.run_dir, device="cpu")
    pad = loaded.tokenizer.pad_token_id
    assert pad != tok.eos_token_id and loaded.model.config.pad_token_id == pad
    texts = ["good movie", "the movie was very good really"]
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -1] == pad  # right-padded
    with torch.no_grad():
        together = loaded.model(**batch).logits[0]
        alone = loaded.model(**loaded.tokenizer(texts[:1], return_tensors="pt")).logits[0]
    assert torch.allclose(together, alone, atol=1e-5)
    assert not math.isnan(float(together[0]))
