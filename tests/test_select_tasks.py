"""`slimtune select` and `slimtune inspect` beyond text classification: image models (inspect's estimate of an
image classifier's training memory against a measured CPU step; a race of two image models with one dropped by
--memory) and causal LMs (the race ranks by eval loss, lowest first). Models are tiny and random."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import chat_rows, write_jsonl
from test_images import image_config, tiny_resnet, tiny_vit, write_image_folder
from test_methods import _measured_peak_bytes

import slimtune.inspect as insp
from slimtune.models import resolve


@pytest.fixture(scope="module")
def image_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("image-models")
    (root / "vit").mkdir()
    (root / "resnet").mkdir()
    return {"vit": tiny_vit(root / "vit"), "resnet": tiny_resnet(root / "resnet")}


def _measured(model_name: str, method: str, batch_size: int, size: int) -> int:
    """The peak bytes of a real CPU training step of the model as the image task builds it."""
    from transformers import AutoModelForImageClassification

    from slimtune.methods import MethodContext, apply_method
    from slimtune.tasks.image_classification import adapt_loaded

    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_pretrained(resolve(model_name).path, num_labels=2,
                                                            ignore_mismatched_sizes=True)
    adapt_loaded(model)
    model = apply_method(model, insp.default_method_config(method),
                         MethodContext("image-classification", None, ["classifier"], 100, None))
    model.train()
    batch = {"pixel_values": torch.randn(batch_size, 3, size, size),
             "labels": torch.zeros(batch_size, dtype=torch.long)}
    return _measured_peak_bytes(model, batch)


@pytest.mark.parametrize("kind, size", [("vit", None), ("vit", 48), ("resnet", 64)])
def test_image_model_memory_estimate_matches_a_measured_step(image_models, kind, size):
    """The estimate (meta device) against the peak bytes of a real CPU training step, at the model's own size (its
    preprocessor's, 32 px) and at another one (a ViT then interpolates its position embeddings, as training makes
    it): within 0.1% where the step's peak is made of tensors; a ResNet's convolutions on the CPU also allocate
    scratch space that the meta device does not, and how much depends on the host's kernels (measured at 64-224 px:
    on an AVX2 host LoRA 5-6% and full 10-11% more than the estimate, head-only none; on an AVX512 host, where
    oneDNN reorders to blocked layouts, LoRA 10%, full 14%, head-only 33%), so there the estimate is a lower bound
    within 40%."""
    report = insp.inspect_model(image_models[kind], batch_size=4, image_size=size,
                                methods=["lora", "full", "head-only"])
    assert report["task"] == "image-classification" and report["image_size"] == (size or 32)
    assert "seq_len" not in report
    for row in report["methods"]:
        assert row.get("activation_bytes"), row  # the forward ran on the meta device
        measured = _measured(image_models[kind], row["method"], 4, size or 32)
        if kind == "resnet":
            assert 0.6 * measured <= row["train_memory_bytes"] <= measured, (row, measured)
        else:
            assert row["train_memory_bytes"] == pytest.approx(measured, rel=0.001), (row, measured)


def test_inspect_cli_reads_an_image_model(image_models):
    from typer.testing import CliRunner

    from slimtune.cli import app

    res = CliRunner().invoke(app, ["inspect", image_models["vit"], "--json", "--image-size", "64", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["architecture"] == "ViTForImageClassification" and report["image_size"] == 64
    assert report["head"] == ["classifier"] and report["target_modules"]
    small = insp.inspect_model(image_models["vit"], batch_size=2, methods=["lora"])["methods"][0]
    lora = next(r for r in report["methods"] if r["method"] == "lora")
    assert lora["activation_bytes"] > 2 * small["activation_bytes"]  # 64 patches against 16 per image
    res = CliRunner().invoke(app, ["inspect", image_models["resnet"], "--batch-size", "2"])
    assert res.exit_code == 0 and "32 px images" in res.output, res.output


def test_an_image_race_drops_the_model_over_the_memory_and_races_the_rest(tmp_path, image_models):
    """--memory between the two models' estimates: the larger is dropped with its estimate before any training
    (at the largest size progressive resizing trains at), the other races and is the pick."""
    from slimtune.select import select

    data = write_image_folder(tmp_path / "images", 12)
    cfg = image_config(image_models["resnet"], str(data), tmp_path / "out", epochs=2, image_size_schedule=[
        [0.0, 32], [0.5, 48]])
    cfg["image"] = {"size": 40}
    estimates = {k: insp.inspect_model(m, batch_size=16, image_size=48, num_labels=4, methods=["lora"])
                 ["methods"][0]["train_memory_bytes"] for k, m in image_models.items()}
    big, small = sorted(estimates, key=estimates.get, reverse=True)
    limit = (estimates[big] + estimates[small]) // 2
    logs = []
    models = f"{image_models['vit']},{image_models['resnet']}"
    result = select(cfg, models=models, memory=f"{limit / 1024:.3f}KB", eta=2, min_fraction=0.5, log=logs.append)
    entry = {c["model"]: c for c in result.candidates}
    dropped, raced = entry[image_models[big]], entry[image_models[small]]
    assert dropped["memory_estimate_bytes"] == estimates[big]  # at 48 px: the schedule's largest, over image.size
    assert dropped["dropped"].startswith("estimated training memory") and dropped["trials"] == []
    assert raced["memory_estimate_bytes"] == estimates[small] and raced["trials"]
    assert result.pick.model == image_models[small] and any("dropped" in line for line in logs)


def test_a_causal_lm_race_ranks_by_eval_loss(tmp_path, tiny_llama):
    """A chat fine-tune races by eval loss, lowest first: a model that cannot learn (every weight zero: uniform
    next-token odds, loss ln |vocab|, the highest of the two) is not promoted, and the one that learns is the pick
    (by the highest metric it would have been the dead one)."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimtune.select import select

    dead = tmp_path / "dead-llama"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.save_pretrained(dead)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.save_pretrained(dead)
    cfg = {"task": "causal-lm", "model": {"name": tiny_llama, "max_length": 48},
           "data": {"train": str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(64, 0)))},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"max_steps": 16, "batch_size": 8, "lr": 1e-2, "precision": "fp32", "log_every": 4},
           "eval": {"every_steps": 4}, "track": {"energy": False, "index": False},
           "output": {"dir": str(tmp_path / "out")}}
    result = select(cfg, models=f"{dead},{tiny_llama}", eta=2, min_fraction=0.5, log=lambda s: None)
    summary = json.loads((result.select_dir / "summary.json").read_text())
    assert summary["monitor"] == "loss" and summary["direction"] == "minimize"
    entry = {Path(c["model"]).name: c for c in summary["candidates"]}
    dead_loss, live_loss = entry["dead-llama"]["metric_per_rung"]["0"], entry[Path(tiny_llama).name][
        "metric_per_rung"]["0"]
    assert dead_loss == pytest.approx(math.log(len(tokenizer)), rel=1e-4) and live_loss < dead_loss
    assert summary["decided_rung"] == 0  # one of two goes on: the first rung decides
    assert result.pick.model == tiny_llama and summary["pick"]["metric"] == live_loss


def test_prompt_learning_on_an_image_model_is_refused_with_the_reason(tmp_path, image_models):
    """Virtual tokens need token inputs: training says so before any step, and inspect's row says the same."""
    import slimtune
    from slimtune.methods import MethodError

    data = write_image_folder(tmp_path / "images", 4)
    for name in ("prompt-tuning", "prefix-tuning", "p-tuning"):
        cfg = image_config(image_models["vit"], str(data), tmp_path / name, epochs=1)
        cfg["method"] = {"name": name}
        with pytest.raises(MethodError, match=f"method {name} adds virtual tokens to a token sequence; task "
                                              "image-classification takes images"):
            slimtune.run(cfg)
    rows = insp.inspect_model(image_models["vit"], methods=["prompt-tuning", "lora"])["methods"]
    assert "takes images, not tokens" in rows[0]["error"] and "error" not in rows[1]


def test_factory_candidates_race_resume_and_land_in_best_yaml(tmp_path, image_models, monkeypatch):
    """A candidate may be a factory ('file.py:function', as model.factory takes): its trials build the model with
    it, a promoted one resumes from its checkpoint (the select's own trial, running the code the user named here:
    no --trust-run-code needed), it races without a memory estimate (inspect cannot build user code), and
    best.yaml runs it."""
    import yaml
    from test_vision_e2e import FACTORY

    import slimtune
    from slimtune.select import select

    (tmp_path / "mynet.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    data = write_image_folder(tmp_path / "images", 12)
    cfg = image_config(image_models["resnet"], str(data), tmp_path / "out", epochs=2)
    logs = []
    mixed = select(cfg, models=f"mynet.py:build,{image_models['resnet']}", methods="lora", memory="64GB",
                   eta=2, min_fraction=0.5, name="mixed", log=logs.append)
    entry = {c["model"]: c for c in mixed.candidates}
    factory = entry["mynet.py:build"]
    assert factory["memory_estimate_bytes"] is None and "no estimate" in factory["memory_note"]
    assert entry[image_models["resnet"]]["memory_estimate_bytes"] > 0
    for c in mixed.candidates:
        assert c["trials"] and all(t["status"] != "failed" for t in c["trials"]), c
    trial = yaml.safe_load((Path(factory["trials"][0]["run_dir"]) / "config.yaml").read_text())
    assert trial["model"]["factory"].endswith("mynet.py:build")

    # four methods, eta 2: two promoted, so two factory trials resume from their rung-0 checkpoints
    only = select({**cfg, "model": {"factory": "mynet.py:build"}}, models="mynet.py:build",
                  methods="lora,head-only,full,last-n-layers", eta=2, min_fraction=0.5, name="factory",
                  log=logs.append)
    promoted = [t for c in only.candidates for t in c["trials"] if t["rung"] == 1]
    assert len(promoted) == 2 and all(t["status"] != "failed" for t in promoted), only.candidates
    assert any("continuing" in line for line in logs)
    best = yaml.safe_load((only.select_dir / "best.yaml").read_text())
    assert best["model"]["factory"] == "mynet.py:build" and best["method"]["name"] == only.pick.method
    assert slimtune.run(best).status == "completed"

    # a trial folder whose config.yaml names other code than the candidate is not resumed without --trust-run-code
    from slimtune.select.race import make_plan, prepare
    from slimtune.select.trial import _runs_the_named_code, trial_path

    plan, _ = make_plan(*prepare({**cfg, "model": {"factory": "mynet.py:build"}}, None, models="mynet.py:build",
                                 methods="lora", eta=2, min_fraction=0.5, name="factory"))
    candidate = plan.candidates[0]
    folder = trial_path(plan, candidate)
    assert _runs_the_named_code(folder, plan, candidate)
    saved = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(saved.replace("mynet.py:build", "other.py:build"))
    assert not _runs_the_named_code(folder, plan, candidate)


@pytest.mark.parametrize("name,factory", [
    ("mynet.py:build", True), ("path/to/net.py:make_model", True), ("my_pkg.models:build", True),
    ("org/model", False), ("path/to/folder", False), ("model.gguf", False), ("C:\\models\\bert", False),
    ("org/model:v2", False), (":build", False), ("net.py:", False),
])
def test_which_candidate_strings_are_factories(name, factory):
    from slimtune.config.sections import is_factory_spec

    assert is_factory_spec(name) is factory
