"""Bad inputs to reading data and to `predict`: each is a message naming the file and what is wrong,
not a traceback or a wrong cause. Fast: generated files, the tiny BERT from conftest."""
from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import cls_config, write_jsonl
from slimtune.cli import app
from slimtune.data.readers import DataError, read_source

runner = CliRunner(env={"COLUMNS": "1000"})


def flat(text: str) -> str:
    return " ".join(text.split())


def test_jsonl_labels_of_mixed_types_name_the_column_and_records(tmp_path):
    rows = [{"text": f"t {i}", "label": 1 if i % 3 else "1"} for i in range(12)]
    f = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError) as e:
        read_source(str(f))
    msg = str(e.value)
    assert str(f) in msg and "column 'label' mixes value types" in msg, msg
    assert "string in record(s) 1, 4, 7, 10 (4 in all)" in msg, msg
    assert "number in record(s) 2, 3, 5, 6, 8, ... (8 in all)" in msg, msg
    # ints and floats in one column are one type to Arrow: still read
    ok = write_jsonl(tmp_path / "num.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1.5}])
    assert read_source(str(ok))["label"] == [1.0, 1.5]


@pytest.fixture(scope="module")
def finished_run(tiny_bert, tmp_path_factory):
    import slimtune
    from conftest import sentiment_rows, write_csv

    tmp = tmp_path_factory.mktemp("predict-run")
    data = {"train": str(write_csv(tmp / "train.csv", sentiment_rows(40)))}
    return slimtune.run(cls_config(tiny_bert, data, tmp / "runs", max_steps=2)).run_dir


def test_predict_file_not_utf8_names_file_and_offset(tmp_path):
    f = tmp_path / "inputs.txt"
    f.write_bytes("great film\ncaf\xe9 au lait\n".encode("latin-1"))
    res = runner.invoke(app, ["predict", str(tmp_path / "no-run"), "--file", str(f)])
    out = flat(res.output)
    assert res.exit_code == 2, out
    assert str(f) in out and "not valid UTF-8" in out and "offset 14" in out and "line 2" in out, out


def test_predict_empty_file_says_it_is_empty(tmp_path):
    f = tmp_path / "inputs.txt"
    f.write_text("\n  \n", encoding="utf-8")
    res = runner.invoke(app, ["predict", str(tmp_path / "no-run"), "--file", str(f)])
    out = flat(res.output)
    assert res.exit_code == 2 and str(f) in out and "the file is empty" in out, out
    assert "give --text" not in out


def test_predict_missing_file(tmp_path):
    res = runner.invoke(app, ["predict", str(tmp_path / "no-run"), "--file", str(tmp_path / "absent.txt")])
    assert res.exit_code == 2 and "absent.txt: file not found" in flat(res.output)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_predict_with_damaged_adapter_weights_names_the_file(finished_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    if damage == "deleted":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-100])
    res = runner.invoke(app, ["predict", str(run), "--text", "great film"])
    out = flat(res.output)
    assert res.exit_code == 2, out
    assert str(weights) in out and ("missing" if damage == "deleted" else "truncated") in out, out
    assert "outgoing traffic" not in out and "Traceback" not in out


def test_predict_on_an_intact_run_still_works(finished_run):
    res = runner.invoke(app, ["predict", str(finished_run), "--text", "great film", "--json"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout.splitlines()[0])["probabilities"]) == {"neg", "pos"}
