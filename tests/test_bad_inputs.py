"""Bad input, as a new user gives it: one parametrized test per kind (config, data, model, run folder, faults).

Each case runs the CLI as a user would and asserts three things: it exits with a message (exit 2, no
traceback), the message names what is wrong (the file / key / column, the value, what is accepted), and
nothing the user had was changed (their config, data and run folders are byte-identical; a config or data
error creates no run folder).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import slimtune
from slimtune.cli import app

from conftest import cls_config, sentiment_rows, write_csv, write_jsonl

runner = CliRunner()


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _squeezed(text: str) -> str:
    return "".join(text.split())  # rich wraps long lines at the terminal width, inside paths too


def _check(res, fragments: list[str]) -> None:
    text = _squeezed(res.output)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    for f in fragments:
        assert _squeezed(f) in text, (f, res.output)


@pytest.fixture
def user(tiny_bert, tmp_path):
    """A user's folder: train / test CSVs and a working config."""
    data = {"train": str(write_csv(tmp_path / "train.csv", sentiment_rows(60, 0))),
            "test": str(write_csv(tmp_path / "test.csv", sentiment_rows(20, 1)))}
    cfg = cls_config(tiny_bert, data, tmp_path / "runs", max_steps=2)
    return tmp_path, cfg


# -- config --------------------------------------------------------------------------------------------------

def _set(cfg: dict, dotted: str, value) -> dict:
    node = cfg
    *path, last = dotted.split(".")
    for p in path:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg


CONFIG_CASES = {
    "unknown top-level key": (lambda c: {**c, "trian": {"lr": 1}}, [], ["trian"]),
    "unknown nested key": (lambda c: _set(c, "train.lrr", 1e-3), [], ["train.lrr"]),
    "negative lr": (lambda c: _set(c, "train.lr", -1), [], ["train.lr", "-1"]),
    "unknown schedule": (lambda c: _set(c, "train.schedule", "cubic"), [], ["train.schedule", "cubic", "cosine"]),
    "unknown task": (lambda c: {**c, "task": "summarize"}, [], ["task", "summarize", "text-classification"]),
    "unknown method": (lambda c: _set(c, "method.name", "loraa"), [], ["method.name", "loraa", "lora"]),
    "max_length below 8": (lambda c: _set(c, "model.max_length", 4), [], ["model.max_length", "4"]),
    "run name escapes output.dir": (lambda c: _set(c, "output.name", "../../elsewhere"), [],
                                    ["output.name", "../../elsewhere"]),
    "absolute run name": (lambda c: _set(c, "output.name", "/tmp/elsewhere"), [], ["output.name", "/tmp/elsewhere"]),
    "override without =": (lambda c: c, ["train.lr"], ["train.lr", "key.path=value"]),
    "override of a value as section": (lambda c: c, ["train.lr.x=1"], ["train.lr.x=1"]),
    "eval.monitor not a metric": (lambda c: _set(c, "eval.monitor", "bleu"), [], ["bleu"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config(user, case):
    root, cfg = user
    change, overrides, fragments = CONFIG_CASES[case]
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(change(cfg)))
    before = _snapshot(root)
    res = runner.invoke(app, ["run", str(path), *overrides])
    _check(res, fragments)
    assert _snapshot(root) == before and not (root / "runs").exists() and not (root.parent / "elsewhere").exists()


def test_config_file_problems(user):
    root, cfg = user
    res = runner.invoke(app, ["run", str(root / "missing.yaml")])
    _check(res, ["missing.yaml", "does not exist"])
    bad = root / "bad.yaml"
    bad.write_text("train: {lr: 1e-3\nmodel: [")
    res = runner.invoke(app, ["run", str(bad)])
    _check(res, ["bad.yaml", "not valid YAML"])
    assert not (root / "runs").exists()


# -- data ----------------------------------------------------------------------------------------------------

def _rows_csv(root: Path, name: str, text: str) -> str:
    (root / name).write_bytes(text.encode("latin-1") if "é" in text else text.encode())
    return str(root / name)


DATA_CASES = {
    "missing train file": (lambda r: {"train": str(r / "nope.csv")}, ["nope.csv", "not found"]),
    "missing label column": (lambda r: {"train": _rows_csv(r, "t.csv", "text,lab\n" + "a good,pos\nbad,neg\n" * 20),
                                        "label_column": "label"}, ["t.csv", "label", "lab"]),
    "missing text column": (lambda r: {"train": _rows_csv(r, "t.csv", "txt,label\n" + "good,pos\nbad,neg\n" * 20)},
                            ["t.csv", "text", "txt"]),
    "empty label": (lambda r: {"train": _rows_csv(r, "t.csv", "text,label\n" + "good,pos\nbad,neg\n" * 20 + "sad,\n")},
                    ["t.csv", "label", "empty"]),
    "not UTF-8": (lambda r: {"train": _rows_csv(r, "t.csv", "text,label\n" + "café good,pos\nbad,neg\n" * 20)},
                  ["t.csv", "UTF-8"]),
    "empty file": (lambda r: {"train": _rows_csv(r, "t.csv", "")}, ["t.csv", "empty"]),
    "header only": (lambda r: {"train": _rows_csv(r, "t.csv", "text,label\n")}, ["t.csv", "empty"]),
    "single label": (lambda r: {"train": _rows_csv(r, "t.csv", "text,label\n" + "good,pos\n" * 20)},
                     ["t.csv", "single label", "pos"]),
    "eval label unseen in train": (lambda r: {"train": _rows_csv(r, "t.csv",
                                                                 "text,label\n" + "good,pos\nbad,neg\n" * 20),
                                              "eval": _rows_csv(r, "e.csv", "text,label\ngood,pos\nmeh,neutral\n")},
                                   ["e.csv", "neutral"]),
    "JSONL labels of mixed types": (lambda r: {"train": str(write_jsonl(r / "t.jsonl",
                                                                        [{"text": "good", "label": 1},
                                                                         {"text": "bad", "label": "1"}] * 10))},
                                    ["t.jsonl", "label"]),
    "unsupported file type": (lambda r: {"train": _rows_csv(r, "t.xlsx", "x")}, ["t.xlsx", ".csv"]),
    "bad JSONL line": (lambda r: {"train": _rows_csv(r, "t.jsonl", '{"text": "a", "label": "x"}\n{oops\n')},
                       ["t.jsonl", "line 2"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data(user, case):
    root, cfg = user
    data_cfg, fragments = DATA_CASES[case]
    cfg["data"] = data_cfg(root)
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = _snapshot(root)
    res = runner.invoke(app, ["run", str(path)])
    _check(res, fragments)
    assert _snapshot(root) == before and not (root / "runs").exists()


# -- model ---------------------------------------------------------------------------------------------------

def _corrupt_copy(src: str, root: Path) -> str:
    dst = root / "corrupt-model"
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return str(dst)


def _images(root: Path) -> str:
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(root / "images.npz", images=rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8), labels=np.arange(20) % 2)
    return str(root / "images.npz")


MODEL_CASES = {
    "folder that does not exist": (lambda c, r: _set(c, "model.name", str(r / "no-model")), ["no-model"]),
    "hub id that does not resolve offline": (lambda c, r: _set(c, "model.name", "nobody/no-such-model-xyz"),
                                             ["nobody/no-such-model-xyz"]),
    "corrupt weights": (lambda c, r: _set(c, "model.name", _corrupt_copy(c["model"]["name"], r)),
                        ["corrupt-model", "model.safetensors"]),
    "max_length beyond the model's positions": (lambda c, r: _set(c, "model.max_length", 1000),
                                                ["model.max_length", "1000", "128"]),
    "factory that does not import": (lambda c, r: {**c, "task": "image-classification", "data": {"train": _images(r)},
                                                   "model": {"factory": str(r / "nofile.py") + ":build"}},
                                     ["model.factory", "nofile.py"]),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model(user, case):
    """`slimtune validate` finds model problems without training (and without loading weights)."""
    root, cfg = user
    change, fragments = MODEL_CASES[case]
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(change(cfg, root)))
    before = _snapshot(root)
    res = runner.invoke(app, ["validate", str(path)])
    _check(res, fragments)
    assert _snapshot(root) == before


# -- run folder ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def _finished(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    data = {"train": str(write_csv(root / "train.csv", sentiment_rows(60, 0))),
            "test": str(write_csv(root / "test.csv", sentiment_rows(20, 1)))}
    res = slimtune.run(cls_config(tiny_bert, data, root / "runs", max_steps=2))
    return res.run_dir, data


def _no_adapter_weights(run: Path) -> list[str]:
    (run / "adapter" / "adapter_model.safetensors").unlink()
    return ["predict", str(run), "--text", "good"]


def _factory_meta(run: Path) -> list[str]:
    meta = json.loads((run / "meta.json").read_text())
    meta["model_source"] = {"path": "/elsewhere/evil.py:build", "hub_id": None, "gguf_file": None, "origin": "factory"}
    (run / "meta.json").write_text(json.dumps(meta))
    return ["eval", str(run), "--data", str(run.parent.parent / "test.csv")]


def _latin1_file(run: Path) -> list[str]:
    (run.parent / "inputs.txt").write_bytes("un film très bon\n".encode("latin-1"))
    return ["predict", str(run), "--file", str(run.parent / "inputs.txt")]


def _empty_file(run: Path) -> list[str]:
    (run.parent / "inputs.txt").write_text("\n\n")
    return ["predict", str(run), "--file", str(run.parent / "inputs.txt")]


def _no_checkpoint(run: Path) -> list[str]:
    shutil.rmtree(run / "checkpoints")
    return ["run", "--resume", str(run)]


RUN_CASES = {
    "resume with a changed lr": (lambda run: ["run", "--resume", str(run), "train.lr=1e-3"], ["train.lr", "new run"]),
    "resume of a complete run": (lambda run: ["run", "--resume", str(run)], ["complete", "train.epochs=N"]),
    "resume without a checkpoint": (_no_checkpoint, ["checkpoints/last"]),
    "resume of a folder that is no run": (lambda run: ["run", "--resume", str(run / "adapter")], ["config.yaml"]),
    "eval of a folder without adapter": (lambda run: ["eval", str(run / "checkpoints"), "--data", "x.csv"],
                                         ["adapter"]),
    "predict with the adapter weights deleted": (_no_adapter_weights, ["adapter_model.safetensors"]),
    "a factory named by a copied run": (_factory_meta, ["evil.py", "--trust-run-code"]),
    "predict --file not UTF-8": (_latin1_file, ["inputs.txt", "UTF-8"]),
    "predict --file empty": (_empty_file, ["inputs.txt", "empty"]),
    "eval data missing the label column": (lambda run: ["eval", str(run), "--data",
                                                        _rows_csv(run.parent, "e.csv", "text\ngood\n")],
                                           ["e.csv", "label"]),
    "runs list --where with a malformed number": (lambda run: ["runs", "list", "--root", str(run.parent), "--where",
                                                               "accuracy>=0,9"], ["accuracy>=0,9", "0,9"]),
    "runs list with an unknown column": (lambda run: ["runs", "list", "--root", str(run.parent), "--columns", "nosuch"],
                                         ["nosuch"]),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_bad_run_folder(_finished, tmp_path, case):
    src, _ = _finished
    root = tmp_path / "runs"
    run = Path(shutil.copytree(src, root / src.name))
    shutil.copy(src.parent.parent / "test.csv", tmp_path / "test.csv")
    assert runner.invoke(app, ["runs", "add", str(run), "--root", str(root)]).exit_code == 0  # the copy, indexed
    argv, fragments = RUN_CASES[case]
    argv = argv(run)
    before = _snapshot(tmp_path)
    res = runner.invoke(app, argv)
    _check(res, fragments)
    assert _snapshot(tmp_path) == before


# -- faults --------------------------------------------------------------------------------------------------

def test_disk_full_while_training_is_said_and_resumable(_finished, tmp_path, monkeypatch, capsys):
    """A full disk while the best checkpoint is written: the message says so, the last checkpoint on disk
    stays whole."""
    import errno

    from slimtune import cli
    from slimtune.train import checkpoint

    src, data = _finished
    run = Path(shutil.copytree(src, tmp_path / "run"))
    last = _snapshot(run / "checkpoints" / "last")
    real_save = checkpoint.save

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "save", full)
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--resume", str(run), "train.max_steps=4"])
    assert e.value.code == 2
    said = capsys.readouterr().err.replace("\n", "")
    assert "no space left on the disk of" in said and "checkpoints" in said
    assert _snapshot(run / "checkpoints" / "last") == last
    monkeypatch.setattr(checkpoint, "save", real_save)
    res = slimtune.run(None, overrides=["train.max_steps=4"], resume=run)
    assert res.status == "completed" and res.summary["steps"] == 4
