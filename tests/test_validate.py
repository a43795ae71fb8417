"""`slimtune validate` checks the model as well as the config and data: the source resolves, its config
loads, its weights files are whole (headers only), a factory imports, and model.max_length fits the
model's positions; the same max_length check stops `run` before anything is written. Fast: the tiny
BERT from conftest, no network, no weights loaded."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import cls_config, sentiment_rows, write_csv
from slimtune.cli import app

runner = CliRunner(env={"COLUMNS": "1000"})


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def data(tmp_path) -> dict:
    return {"train": str(write_csv(tmp_path / "train.csv", sentiment_rows(40)))}


def write_cfg(tmp_path: Path, model: dict, data: dict, task: str = "text-classification") -> Path:
    cfg = cls_config("unused", data, tmp_path / "runs")
    cfg["model"] = model
    cfg["task"] = task
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def validate(path: Path) -> tuple[int, str]:
    res = runner.invoke(app, ["validate", str(path)])
    return res.exit_code, flat(res.output)


def test_a_good_model_is_checked_and_said(tiny_bert, data, tmp_path):
    code, out = validate(write_cfg(tmp_path, {"name": tiny_bert, "max_length": 64}, data))
    assert code == 0, out
    assert "config ok:" in out and "data ok: train=" in out
    assert f"model ok: {tiny_bert} (folder; bert, up to 128 tokens; weights: model.safetensors)" in out, out


def test_an_unresolvable_model_id_fails(data, tmp_path, monkeypatch):
    import slimtune.models.sources as sources

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)  # offline, not in the cache
    code, out = validate(write_cfg(tmp_path, {"name": "no-such-org/no-such-model"}, data))
    assert code == 2, out
    assert "error:" in out and "model.name" in out and "'no-such-org/no-such-model'" in out and "offline" in out


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no weights"])
def test_a_corrupt_weights_folder_fails(tiny_bert, data, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    weights = model / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    else:
        weights.unlink()
    code, out = validate(write_cfg(tmp_path, {"name": str(model), "max_length": 64}, data))
    assert code == 2, out
    expected = {"truncated": f"{weights}: truncated", "garbage": f"{weights}: not a whole safetensors file",
                "no weights": f"{model}: no weights file"}[damage]
    assert expected in out, out


def test_a_folder_whose_config_does_not_parse_fails(tiny_bert, data, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    (model / "config.json").write_text("{not json", encoding="utf-8")
    code, out = validate(write_cfg(tmp_path, {"name": str(model), "max_length": 64}, data))
    assert code == 2 and "error:" in out and str(model) in out and "config" in out, out


@pytest.mark.parametrize("body, said", [("import no_such_module_xyz\n", "No module named 'no_such_module_xyz'"),
                                        ("def build(:\n", "SyntaxError"),
                                        ("x = 1\n", "has no function 'build'")])
def test_a_factory_that_does_not_import_fails(tmp_path, body, said):
    from test_images import write_image_folder

    factory = tmp_path / "my_factory.py"
    factory.write_text(body, encoding="utf-8")
    root = write_image_folder(tmp_path / "imgs", 3, modes=("RGB",))
    code, out = validate(write_cfg(tmp_path, {"factory": f"{factory}:build"}, {"train": str(root)},
                                   "image-classification"))
    assert code == 2, out
    assert "model.factory" in out and said in out, out


def test_max_length_too_long_fails_in_validate_and_before_run_writes(tiny_bert, data, tmp_path):
    import slimtune
    from slimtune.config import ConfigError

    path = write_cfg(tmp_path, {"name": tiny_bert, "max_length": 1000}, data)
    code, out = validate(path)
    assert code == 2, out
    assert "model.max_length: 1000" in out and "at most 128 tokens" in out and "max_position_embeddings=128" in out, out
    with pytest.raises(ConfigError, match="model.max_length: 1000"):
        slimtune.run(path)
    assert not (tmp_path / "runs").exists()  # refused before a run folder is written


def test_max_length_left_at_its_default_takes_the_models_limit(tiny_bert, data, tmp_path):
    from slimtune.config import load_config
    from slimtune.models import resolve
    from slimtune.tasks import get_task

    cfg = load_config(write_cfg(tmp_path, {"name": tiny_bert}, data))  # default 256 > 128 positions
    assert cfg.model.max_length == 256
    get_task(cfg.task).load_processor(cfg, resolve(tiny_bert))
    assert cfg.model.max_length == 128 and "max_length" not in cfg.model.model_fields_set


def test_position_limits_by_config_family():
    from transformers import BertConfig, GPT2Config, RobertaConfig

    from slimtune.models.checks import position_limit

    assert position_limit(BertConfig(max_position_embeddings=512))[0] == 512
    n, where = position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1))
    assert n == 512 and "max_position_embeddings=514" in where and "padding" in where
    assert position_limit(GPT2Config(n_positions=1024))[0] == 1024

    class Tok:
        model_max_length = 300

    class NoPositions:
        model_type = "custom"

    assert position_limit(NoPositions(), Tok()) == (300, "the tokenizer's model_max_length=300")
    Tok.model_max_length = int(1e30)  # transformers' "no limit known"
    assert position_limit(NoPositions(), Tok()) == (None, "")


def test_safetensors_header_is_read_without_the_tensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from slimtune.models.checks import safetensors_header
    from slimtune.models.sources import ModelError

    f = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(3)}, str(f))
    header = safetensors_header(f)
    assert header["a"]["shape"] == [4, 4] and header["b"]["dtype"] == "F32"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(ModelError, match="truncated"):
        safetensors_header(f)
