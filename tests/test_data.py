"""Data: readers, checks before training (errors name the file / column / value),
warnings, seeded splits, causal-LM formats and loss masks, builtin datasets.
Fast: generated files, the tiny tokenizers from conftest, no network."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import chat_rows, sentiment_rows, write_csv, write_jsonl
from slimtune.config import load_config
from slimtune.data.readers import DataError, read_source
from slimtune.data.splits import split_indices, subset_indices
from slimtune.tasks import get_task

TC = get_task("text-classification")
LM = get_task("causal-lm")
needs_chatterbot = pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                                      reason="chatterbot_corpus not installed (pip install chatterbot-corpus)")


def unique_rows(n: int, seed: int = 0) -> list[dict]:
    """sentiment_rows with every text distinct (so no duplicate warnings by chance)."""
    return [{"text": f"{r['text']} {i}", "label": r["label"]} for i, r in enumerate(sentiment_rows(n, seed))]


def labelled(counts: dict[str, int], start: int = 0) -> list[dict]:
    rows, i = [], start
    for label, n in counts.items():
        for _ in range(n):
            rows.append({"text": f"text number {i}", "label": label})
            i += 1
    return rows


def cfg_for(task: str, train, model: dict | None = None, **data):
    return load_config({
        "task": task,
        "model": {"name": "unused/never-loaded", **(model or {})},
        "data": {"train": str(train), **{k: str(v) if isinstance(v, Path) else v for k, v in data.items()}},
    })


def data_error(fn, *args) -> str:
    with pytest.raises(DataError) as info:
        fn(*args)
    return str(info.value)


# -- readers ---------------------------------------------------------------------

def test_read_csv_keeps_values_as_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"hello, world",pos\nNA,007\nplain,neg\n', encoding="utf-8")
    ds = read_source(str(path))
    assert ds.column_names == ["text", "label"]
    assert ds["text"] == ["hello, world", "NA", "plain"]  # quoted comma; 'NA' is not turned into a missing value
    assert ds["label"] == ["pos", "007", "neg"]  # no number parsing


@pytest.mark.parametrize("name, content", [
    ("bom.csv", "text,label\ncafé,pos\n"),
    ("bom.jsonl", '{"text": "café", "label": "pos"}\n'),
])
def test_utf8_bom_is_dropped(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8-sig"))
    ds = read_source(str(path))
    assert ds.column_names == ["text", "label"] and ds["text"] == ["café"]


def test_read_tsv_without_quoting(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('text\tlabel\nhe said "hi\tpos\n"starts with a quote\tneg\nok, commas\tpos\n', encoding="utf-8")
    ds = read_source(str(path))
    assert ds.column_names == ["text", "label"]
    assert ds["text"] == ['he said "hi', '"starts with a quote', "ok, commas"]
    assert ds["label"] == ["pos", "neg", "pos"]


def test_read_jsonl(tmp_path):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")  # blank line skipped
    assert read_source(str(path)).to_list() == rows


def test_read_json_array_and_json_lines(tmp_path):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    assert read_source(str(arr)).to_list() == rows
    lines = tmp_path / "lines.json"
    write_jsonl(lines, rows)
    assert read_source(str(lines)).to_list() == rows


def test_json_record_that_is_not_an_object(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"text": "a"}, ["not", "an", "object"]]), encoding="utf-8")
    msg = data_error(read_source, str(path))
    assert str(path) in msg and "record 2" in msg and "JSON object" in msg


def test_invalid_json_array_gives_line(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n', encoding="utf-8")
    msg = data_error(read_source, str(path))
    assert str(path) in msg and "line 3" in msg


def test_read_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    import pandas as pd

    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    path = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(path)
    assert read_source(str(path)).to_list() == rows


def test_corrupt_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet")
    msg = data_error(read_source, str(path))
    assert str(path) in msg and "Parquet" in msg


def test_read_txt_paragraphs(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("first paragraph\nsecond line\n\n\n\nsecond paragraph\n\n", encoding="utf-8")
    ds = read_source(str(path))
    assert ds.column_names == ["text"]
    assert ds["text"] == ["first paragraph\nsecond line", "second paragraph"]


def test_read_saved_datasets_folder(tmp_path):
    from datasets import Dataset

    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert read_source(str(tmp_path / "saved")).to_list() == rows


def test_plain_folder_is_rejected(tmp_path):
    (tmp_path / "folder").mkdir()
    msg = data_error(read_source, str(tmp_path / "folder"))
    assert "folder" in msg and "save_to_disk" in msg


def test_unsupported_suffix_lists_accepted_types(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"whatever")
    msg = data_error(read_source, str(path))
    assert str(path) in msg and "'.xlsx'" in msg
    for suffix in (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt", "builtin:", "hf:"):
        assert suffix in msg.split("accepted", 1)[1]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    msg = data_error(read_source, str(path))
    assert str(path) in msg and "not found" in msg


@pytest.mark.parametrize("suffix, content", [
    (".csv", b"text,label\ngood,pos\ncaf\xe9,neg\n"),
    (".jsonl", b'{"text": "good"}\n{"text": "fine"}\n{"text": "caf\xe9"}\n'),
    (".txt", b"caf\xe9\n"),
])
def test_non_utf8_names_file_and_line(tmp_path, suffix, content):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(content)
    msg = data_error(read_source, str(path))
    line = content[:content.index(b"\xe9")].count(b"\n") + 1
    assert str(path) in msg and "UTF-8" in msg and f"line {line}" in msg and "0xe9" in msg


def test_invalid_jsonl_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n{"text": "d"}\n', encoding="utf-8")
    msg = data_error(read_source, str(path))
    assert str(path) in msg and "line 3" in msg and "not valid JSON" in msg


@pytest.mark.parametrize("name, content", [
    ("e.csv", ""), ("e.tsv", "\n\n"), ("e.jsonl", ""), ("e.jsonl", "\n  \n"), ("e.json", ""), ("e.json", "[]"),
])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    msg = data_error(read_source, str(path))
    assert str(path) in msg and "empty" in msg


def test_empty_txt_fails_as_empty_split(tmp_path):
    path = tmp_path / "e.txt"
    path.write_text(" \n\n", encoding="utf-8")
    assert len(read_source(str(path))) == 0  # paragraphs: none
    msg = data_error(LM.load_data, cfg_for("causal-lm", path))
    assert str(path) in msg and "empty" in msg


# -- text-classification checks (load_data: no model) -----------------------------

def test_load_data_reads_and_carves_eval(tmp_path):
    train = write_csv(tmp_path / "train.csv", unique_rows(100))
    splits = TC.load_data(cfg_for("text-classification", train))
    assert len(splits.train) + len(splits.eval) == 100
    assert splits.meta["labels"] == ["neg", "pos"]
    assert splits.test is None and splits.report.warnings == []
    assert splits.report.stats["eval_carved_out"] is True


def test_numeric_labels_sort_numerically(tmp_path):
    rows = [{"text": f"t {i}", "label": lab} for i, lab in enumerate(["10", "2", "1"] * 4)]
    train = write_csv(tmp_path / "train.csv", rows)
    splits = TC.load_data(cfg_for("text-classification", train, eval=train))
    assert splits.meta["labels"] == ["1", "2", "10"]


def test_missing_label_column(tmp_path):
    rows = [{"text": r["text"], "sentiment": r["label"]} for r in unique_rows(20)]
    train = write_csv(tmp_path / "train.csv", rows)
    msg = data_error(TC.load_data, cfg_for("text-classification", train))
    assert str(train) in msg and "'label'" in msg and "data.label_column" in msg
    assert "text, sentiment" in msg


def test_missing_text_column(tmp_path):
    train = write_csv(tmp_path / "train.csv", unique_rows(20))
    msg = data_error(TC.load_data, cfg_for("text-classification", train, text_column="review"))
    assert str(train) in msg and "'review'" in msg and "data.text_column" in msg and "text, label" in msg


def test_missing_column_in_eval_file_names_eval_file(tmp_path):
    train = write_csv(tmp_path / "train.csv", unique_rows(20))
    ev = write_csv(tmp_path / "eval.csv", [{"sentence": "x", "label": "pos"}])
    msg = data_error(TC.load_data, cfg_for("text-classification", train, eval=ev))
    assert str(ev) in msg and str(train) not in msg and "'text'" in msg and "sentence, label" in msg


def test_empty_eval_file(tmp_path):
    train = write_csv(tmp_path / "train.csv", unique_rows(20))
    ev = tmp_path / "eval.csv"
    ev.write_text("text,label\n", encoding="utf-8")
    msg = data_error(TC.load_data, cfg_for("text-classification", train, eval=ev))
    assert str(ev) in msg and "eval" in msg and "empty" in msg


def test_eval_labels_unseen_in_training(tmp_path):
    train = write_csv(tmp_path / "train.csv", unique_rows(20))
    ev = write_csv(tmp_path / "eval.csv", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neutral"}])
    msg = data_error(TC.load_data, cfg_for("text-classification", train, eval=ev))
    assert str(ev) in msg and "'neutral'" in msg and "'label'" in msg
    assert "'pos'" in msg.split("can only predict", 1)[1]


def test_test_labels_unseen_in_training(tmp_path):
    train = write_csv(tmp_path / "train.csv", unique_rows(20))
    test = write_csv(tmp_path / "test.csv", [{"text": "x", "label": "meh"}])
    msg = data_error(TC.load_data, cfg_for("text-classification", train, test=test))
    assert str(test) in msg and "'meh'" in msg


def test_class_too_small_to_split(tmp_path):
    rows = labelled({"pos": 20, "neg": 20, "rare": 1})
    train = write_csv(tmp_path / "train.csv", rows)
    msg = data_error(TC.load_data, cfg_for("text-classification", train))
    assert str(train) in msg and "'rare' (1)" in msg and "too few to split" in msg
    assert "'pos'" not in msg
    # with a separate eval file nothing is carved out, so the same data is fine
    ev = write_csv(tmp_path / "eval.csv", labelled({"pos": 2, "neg": 2}, start=100))
    splits = TC.load_data(cfg_for("text-classification", train, eval=ev))
    assert "rare" in splits.meta["labels"]


def test_single_label(tmp_path):
    train = write_csv(tmp_path / "train.csv", labelled({"pos": 20}))
    msg = data_error(TC.load_data, cfg_for("text-classification", train))
    assert str(train) in msg and "single label" in msg and "'pos'" in msg and "'label'" in msg


@pytest.mark.parametrize("where", ["train", "eval", "test"])
def test_empty_labels_are_an_error_naming_file_column_records(tmp_path, where):
    rows = unique_rows(40)
    for i in (2, 5, 9):
        rows[i]["label"] = " " if i == 5 else ""
    files = {k: tmp_path / f"{k}.csv" for k in ("train", "eval", "test")}
    for k, f in files.items():
        write_csv(f, rows if k == where else unique_rows(20, seed=3))
    msg = data_error(TC.load_data, cfg_for("text-classification", files["train"], eval=files["eval"],
                                           test=files["test"]))
    assert str(files[where]) in msg and "'label'" in msg and "3 empty or missing label(s)" in msg, msg
    assert "records 3, 6, 10" in msg, msg  # 1-based: the first data row is record 1


def test_missing_jsonl_labels_are_not_a_class_none(tmp_path):
    rows = unique_rows(30)
    rows[4] = {"text": "no label here"}
    rows[7]["label"] = None
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    msg = data_error(TC.load_data, cfg_for("text-classification", train))  # eval carved out of train
    assert str(train) in msg and "2 empty or missing label(s) (records 5, 8)" in msg, msg


def test_empty_labels_in_an_eval_file_for_slimtune_eval(tmp_path):
    from slimtune.data.validate import DataReport
    from slimtune.tasks.common import Splits

    train = write_csv(tmp_path / "train.csv", unique_rows(20))
    cfg = cfg_for("text-classification", train)
    rows = unique_rows(6, seed=2)
    rows[1]["label"] = ""
    other = write_csv(tmp_path / "other.csv", rows)
    splits = Splits(None, None, read_source(str(other)), DataReport(), meta={"labels": ["neg", "pos"]},
                    sources={"test": str(other)})
    msg = data_error(TC.check_eval_data, cfg, splits)
    assert str(other) in msg and "1 empty or missing label(s) (record 2)" in msg, msg


def test_empty_texts_are_counted_in_the_report(tmp_path):
    rows = unique_rows(40)
    rows[0]["text"], rows[3]["text"], rows[8]["text"] = "", "   ", ""
    train = write_csv(tmp_path / "train.csv", rows)
    ev_rows = labelled({"pos": 3, "neg": 3}, start=1000)
    ev_rows[2]["text"] = " "
    ev = write_csv(tmp_path / "eval.csv", ev_rows)
    splits = TC.load_data(cfg_for("text-classification", train, eval=ev))
    empty = [w for w in splits.report.warnings if "empty or whitespace-only" in w]
    assert len(empty) == 2, splits.report.warnings
    assert empty[0].startswith(str(train)) and "'text'" in empty[0]
    assert "3 empty or whitespace-only text(s) (records 1, 4, 9)" in empty[0]
    assert empty[1].startswith(str(ev)) and "1 empty or whitespace-only text(s) (record 3)" in empty[1]
    assert splits.report.stats["empty_texts"] == {f"{train} (text)": 3, f"{ev} (text)": 1}
    clean = TC.load_data(cfg_for("text-classification", write_csv(tmp_path / "clean.csv", unique_rows(40))))
    assert not any("empty" in w for w in clean.report.warnings) and "empty_texts" not in clean.report.stats


def test_duplicates_warn(tmp_path):
    rows = unique_rows(40)
    rows += [dict(rows[0]), dict(rows[0]), dict(rows[1])]  # 3 extra copies
    train = write_csv(tmp_path / "train.csv", rows)
    ev = write_csv(tmp_path / "eval.csv", labelled({"pos": 3, "neg": 3}, start=1000))
    splits = TC.load_data(cfg_for("text-classification", train, eval=ev))
    dup = [w for w in splits.report.warnings if "duplicate" in w]
    assert len(dup) == 1 and "3 duplicate" in dup[0], splits.report.warnings
    assert not any("overlap" in w for w in splits.report.warnings)


def test_train_eval_overlap_warns(tmp_path):
    rows = unique_rows(40)
    train = write_csv(tmp_path / "train.csv", rows)
    ev = write_csv(tmp_path / "eval.csv", rows[:5] + labelled({"pos": 3, "neg": 3}, start=1000))
    splits = TC.load_data(cfg_for("text-classification", train, eval=ev))
    overlap = [w for w in splits.report.warnings if "overlap" in w]
    assert len(overlap) == 1 and "5 text(s)" in overlap[0] and "eval" in overlap[0], splits.report.warnings


@pytest.mark.parametrize("big, small, warns", [(100, 10, True), (90, 10, False), (200, 5, True)])
def test_class_imbalance_warns_at_10x(tmp_path, big, small, warns):
    train = write_csv(tmp_path / "train.csv", labelled({"common": big, "rare": small}))
    ev = write_csv(tmp_path / "eval.csv", labelled({"common": 2, "rare": 2}, start=10_000))
    splits = TC.load_data(cfg_for("text-classification", train, eval=ev))
    imb = [w for w in splits.report.warnings if "imbalance" in w]
    assert bool(imb) == warns, splits.report.warnings
    if warns:
        assert "'common'" in imb[0] and "'rare'" in imb[0] and f"{big // small}x" in imb[0]
    assert splits.report.stats["class_counts"] == {"common": big, "rare": small}
    assert not any("duplicate" in w or "overlap" in w for w in splits.report.warnings)


def test_truncation_share_is_reported(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    long = "the movie was very good and the plot was quite nice but the acting was poor"
    exact = "the movie was very good"  # 5 words + [CLS] + [SEP] = 7 tokens: fits in 8
    six = "the movie was very good film"  # 6 words + 2 = 8 tokens: exactly max_length, not truncated
    rows = ([{"text": f"{long} {i}", "label": "pos" if i % 2 else "neg"} for i in range(3)]
            + [{"text": f"{exact}", "label": "pos"}, {"text": six, "label": "neg"}]
            + [{"text": f"good {i}", "label": "pos" if i % 2 else "neg"} for i in range(5)])
    train = write_csv(tmp_path / "train.csv", rows)
    ev = write_csv(tmp_path / "eval.csv", [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}])
    cfg = cfg_for("text-classification", train, model={"max_length": 8}, eval=ev)
    splits = TC.load_data(cfg)
    feats = TC.featurize(cfg, tok, splits)
    assert all(len(ex["input_ids"]) <= 8 for ex in feats["train"])
    trunc = [w for w in splits.report.warnings if "truncated" in w]
    assert len(trunc) == 1, splits.report.warnings  # eval has none
    assert trunc[0].startswith("train:") and "3 of 10" in trunc[0]
    assert "30.0%" in trunc[0] and "max_length=8" in trunc[0]
    assert splits.report.stats["train_truncated"] == 3 and splits.report.stats["eval_truncated"] == 0
    # labels are the class indices of meta["labels"]
    assert [ex["labels"] for ex in feats["eval"]] == [splits.meta["labels"].index("pos"),
                                                      splits.meta["labels"].index("neg")]

    # a long enough max_length: no warning
    cfg64 = cfg_for("text-classification", train, model={"max_length": 64}, eval=ev)
    splits64 = TC.load_data(cfg64)
    TC.featurize(cfg64, tok, splits64)
    assert not any("truncated" in w for w in splits64.report.warnings)


class SpyTokenizer:
    """A tokenizer that records the longest text it was given (the cost of tokenizing grows with it)."""

    def __init__(self, tok):
        self._tok, self.longest = tok, 0

    def _note(self, *texts):
        for t in texts:
            for x in (t if isinstance(t, list) else [t]):
                if isinstance(x, str):
                    self.longest = max(self.longest, len(x))

    def __call__(self, text, text_pair=None, **kw):
        self._note(text, text_pair)
        return self._tok(text, text_pair, **kw)

    def apply_chat_template(self, messages, **kw):
        self._note([m["content"] for m in messages])
        return self._tok.apply_chat_template(messages, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def huge_text(n_chars: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    words = "the movie was very good and the plot was quite nice but acting poor".split()
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def test_a_huge_text_is_tokenized_as_a_head_only(tmp_path, tiny_bert):
    """A 2 MB cell: the tokenizer only ever sees a bounded head, the example keeps the first max_length
    tokens of the whole text, and the truncation share still counts it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    big, long = huge_text(2_000_000), huge_text(200_000, seed=1)
    rows = unique_rows(20)
    rows[3]["text"], rows[5]["text"] = big, long
    train = write_csv(tmp_path / "train.csv", rows)
    ev = write_csv(tmp_path / "eval.csv", [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}])
    cfg = cfg_for("text-classification", train, model={"max_length": 16}, eval=ev)
    splits = TC.load_data(cfg)
    spy = SpyTokenizer(tok)
    feats = TC.featurize(cfg, spy, splits)
    assert spy.longest < 10_000, spy.longest  # not the 2 MB text
    assert len(feats["train"][3]["input_ids"]) == 16
    # the same tokens as from the whole text (the reference tokenizes it whole: 200 kB, not 2 MB)
    assert feats["train"][5]["input_ids"] == tok(long, truncation=True, max_length=16)["input_ids"]
    assert splits.report.stats["train_truncated"] == 2 and any("2 of 20" in w for w in splits.report.warnings)
    # a text pair: both sides cut, the pair truncated as tokenizing the whole texts would
    from slimtune.tasks.common import HEAD_MARGIN, head_texts

    a, b = big[:3000], huge_text(5000, seed=1)  # the reference tokenizes whole texts: kept small here
    heads, cut = head_texts(spy, [a, "good film", b], 16 + HEAD_MARGIN)
    assert cut == [True, False, True] and heads[1] == "good film" and a.startswith(heads[0]) and len(heads[0]) < 1000
    assert tok(heads[0], heads[2], truncation=True, max_length=16)["input_ids"] == \
        tok(a, b, truncation=True, max_length=16)["input_ids"]


def test_a_head_grows_past_whitespace_runs(tiny_bert):
    from transformers import AutoTokenizer

    from slimtune.tasks.common import head_texts

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    text = " " * 50_000 + "good film " * 10_000  # the first tokens lie far in: the head doubles until it holds them
    heads, cut = head_texts(tok, [text], 20)
    assert cut == [True] and len(tok(heads[0], add_special_tokens=False)["input_ids"]) >= 20


def test_a_huge_chat_message_is_tokenized_as_a_head_only(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = chat_rows(10)
    rows[2] = {"messages": [{"role": "user", "content": "tell me about cats"},
                            # the reference below renders it whole
                            {"role": "assistant", "content": huge_text(200_000)}]}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    ev = write_jsonl(tmp_path / "eval.jsonl", chat_rows(4, seed=1))
    cfg = cfg_for("causal-lm", train, model={"max_length": 32}, eval=ev)
    splits = LM.load_data(cfg)
    spy = SpyTokenizer(tok)
    feats = LM.featurize(cfg, spy, splits)
    assert spy.longest < 10_000, spy.longest
    assert max(len(ex["input_ids"]) for ex in feats["train"]) == 32
    assert splits.report.stats["train_truncated"] == 1
    whole, _ = LM.encode_chat(tok, splits.train[2]["messages"], 32, False)
    assert feats["train"][2] == whole  # the same example as from the whole message


# -- seeded, stratified splits ------------------------------------------------------

def test_split_indices_stratified():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 18 + ["d"] * 2
    tr, ev = split_indices(len(labels), 0.2, seed=0, labels=labels)
    assert sorted(tr + ev) == list(range(len(labels)))  # a partition
    assert not set(tr) & set(ev)
    for y in "abcd":
        assert any(labels[i] == y for i in tr) and any(labels[i] == y for i in ev), y
    assert Counter(labels[i] for i in ev) == {"a": 10, "b": 6, "c": 4, "d": 1}
    assert abs(len(ev) - 0.2 * len(labels)) <= 2
    assert split_indices(len(labels), 0.2, seed=0, labels=labels) == (tr, ev)
    assert split_indices(len(labels), 0.2, seed=1, labels=labels)[1] != ev


def test_split_indices_singleton_class_stays_in_train():
    labels = ["a"] * 10 + ["b"] * 10 + ["solo"]
    tr, ev = split_indices(len(labels), 0.4, seed=0, labels=labels)
    assert 20 in tr and 20 not in ev


def test_split_indices_unstratified():
    tr, ev = split_indices(50, 0.1, seed=3)
    assert len(ev) == 5 and sorted(tr + ev) == list(range(50))
    assert split_indices(50, 0.1, seed=3) == (tr, ev)
    assert split_indices(50, 0.1, seed=4)[1] != ev
    assert len(split_indices(3, 0.1, seed=0)[1]) == 1  # at least one eval example


def test_carved_split_through_load_data(tmp_path):
    rows = [{"text": f"text {i}", "label": lab} for i, lab in enumerate(["x"] * 60 + ["y"] * 30 + ["z"] * 10)]
    train = write_csv(tmp_path / "train.csv", rows)

    def split(seed):
        splits = TC.load_data(cfg_for("text-classification", train, eval_fraction=0.25, split_seed=seed))
        return splits, sorted(splits.eval["text"])

    s0, ev0 = split(0)
    assert set(s0.train["label"]) == set(s0.eval["label"]) == {"x", "y", "z"}
    assert not set(s0.train["text"]) & set(s0.eval["text"])
    assert len(s0.train) + len(s0.eval) == 100
    assert 22 <= len(s0.eval) <= 28
    assert split(0)[1] == ev0
    assert split(1)[1] != ev0
    assert "25%" in s0.sources["eval"] and "seed 0" in s0.sources["eval"]


def test_max_samples(tmp_path):
    train = write_csv(tmp_path / "train.csv", unique_rows(100))
    splits = TC.load_data(cfg_for("text-classification", train, max_train_samples=30, max_eval_samples=4))
    assert len(splits.train) == 30 and len(splits.eval) == 4


def test_a_small_training_subset_of_many_classes_keeps_every_class(tmp_path):
    """40 classes of 10 examples each, intents-like; 48 training examples drawn: a plain random 48 of the 400
    misses several classes (and eval would then hold labels the training data never shows), the stratified one
    keeps all 40 and is the same for the same seed."""
    rows = [{"text": f"example {i} of class {c}", "label": f"intent_{c:02d}"} for c in range(40) for i in range(10)]
    train = write_csv(tmp_path / "train.csv", rows)
    evals = write_csv(tmp_path / "eval.csv", rows[::5])

    def labels(seed: int) -> list[str]:
        splits = TC.load_data(cfg_for("text-classification", train, eval=str(evals), max_train_samples=48,
                                      split_seed=seed))
        assert len(splits.train) == 48 and splits.meta["labels"] == sorted({r["label"] for r in rows})
        return splits.train["text"]

    assert labels(0) == labels(0) and labels(0) != labels(1)
    unstratified = subset_indices(400, 48, 0)
    assert len({rows[i]["label"] for i in unstratified}) < 40  # what the stratification prevents
    picked = subset_indices(400, 48, 0, [r["label"] for r in rows])
    assert len(set(picked)) == 48 and len({rows[i]["label"] for i in picked}) == 40
    assert len({rows[i]["label"] for i in subset_indices(400, 12, 0, [r["label"] for r in rows])}) == 12


# -- causal-lm ---------------------------------------------------------------------

def _lm_rows(kind: str, n: int = 12) -> list[dict]:
    if kind == "chat":
        return chat_rows(n)
    if kind == "instruction":
        return [{"prompt": f"tell me about cats {i}", "response": f"cats are nice {i}"} for i in range(n)]
    return [{"text": f"hello there how are you {i}"} for i in range(n)]


@pytest.mark.parametrize("kind", ["chat", "instruction", "text"])
def test_causal_lm_format_detection(tmp_path, kind):
    train = write_jsonl(tmp_path / "train.jsonl", _lm_rows(kind))
    splits = LM.load_data(cfg_for("causal-lm", train))
    assert splits.meta["format"] == kind
    assert len(splits.train) + len(splits.eval) == 12


def test_causal_lm_explicit_format_wins(tmp_path):
    rows = [{**r, "text": "hello there"} for r in chat_rows(6)]  # both a messages and a text column
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    assert LM.load_data(cfg_for("causal-lm", train)).meta["format"] == "chat"
    assert LM.load_data(cfg_for("causal-lm", train, format="text")).meta["format"] == "text"


def test_causal_lm_chat_without_assistant(tmp_path):
    rows = chat_rows(5)
    rows[2] = {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"}]}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    msg = data_error(LM.load_data, cfg_for("causal-lm", train))
    assert str(train) in msg and "record 3" in msg and "'assistant'" in msg and "'messages'" in msg


@pytest.mark.parametrize("bad", [
    [{"speaker": "user", "text": "hello"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant"}],  # Arrow stores the missing content as None
    [{"content": "hello"}, {"role": "assistant", "content": "hi"}],
    [],
])
def test_causal_lm_malformed_messages(tmp_path, bad):
    rows = chat_rows(4)
    rows[1] = {"messages": bad}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    msg = data_error(LM.load_data, cfg_for("causal-lm", train))
    assert str(train) in msg and "record 2" in msg and ("{role, content}" in msg or "list of messages" in msg)


def test_causal_lm_unrecognised_columns(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}] * 4)
    msg = data_error(LM.load_data, cfg_for("causal-lm", train))
    assert str(train) in msg and "question, answer" in msg
    for expected in ("'messages'", "'prompt'", "'response'", "'text'", "data.format"):
        assert expected in msg


def test_causal_lm_eval_file_with_other_columns_names_eval_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(6))
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"question": "q", "answer": "a"}])
    msg = data_error(LM.load_data, cfg_for("causal-lm", train, eval=ev))
    assert str(ev) in msg and str(train) not in msg and "question, answer" in msg


def test_causal_lm_instruction_missing_response_column(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "reply": "r"}] * 4)
    msg = data_error(LM.load_data, cfg_for("causal-lm", train, format="instruction"))
    assert str(train) in msg and "'response'" in msg and "data.response_column" in msg and "prompt, reply" in msg


def _decode(tok, ids) -> list[str]:
    return tok.decode(ids, skip_special_tokens=True).split()


def test_chat_loss_mask_covers_only_assistant(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    system, user1, asst1 = "i am happy", "tell me about cats please", "yes the film was good"
    user2, asst2 = "what time today", "it is tomorrow"
    rows = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": user1},
                          {"role": "assistant", "content": asst1}, {"role": "user", "content": user2},
                          {"role": "assistant", "content": asst2}]}] * 3
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    ev = write_jsonl(tmp_path / "eval.jsonl", rows[:1])
    cfg = cfg_for("causal-lm", train, model={"max_length": 128}, eval=ev)
    splits = LM.load_data(cfg)
    feats = LM.featurize(cfg, tok, splits)
    ex = feats["train"][0]
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) == len(ex["attention_mask"])
    assert all(label == -100 or label == i for i, label in zip(ids, labels))
    learned_ids = [i for i, label in zip(ids, labels) if label != -100]
    # exactly each answer's tokens plus its end-of-turn token, so the model learns to stop
    # (the tiny tokenizer drops the template's newlines and reads a role header as one [UNK] token)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert learned_ids == enc(asst1) + [tok.eos_token_id] + enc(asst2) + [tok.eos_token_id]
    learned = _decode(tok, learned_ids)
    masked = _decode(tok, [i for i, label in zip(ids, labels) if label == -100])
    assert learned == asst1.split() + asst2.split()  # exactly the assistant turns, in order
    for word in (system + " " + user1 + " " + user2).split():
        assert word in masked and word not in learned, word
    assert "user" not in learned and "assistant" not in learned  # role headers are prompt

    cfg_all = cfg_for("causal-lm", train, model={"max_length": 128}, eval=ev, train_on_prompt=True)
    splits_all = LM.load_data(cfg_all)
    ex_all = LM.featurize(cfg_all, tok, splits_all)["train"][0]
    assert ex_all["labels"] == ex_all["input_ids"] == ids


def test_instruction_records_become_user_assistant(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "tell me about dogs", "response": "yes very happy"}] * 4)
    cfg = cfg_for("causal-lm", train, model={"max_length": 64})
    splits = LM.load_data(cfg)
    ex = LM.featurize(cfg, tok, splits)["train"][0]
    learned_ids = [i for i, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
    assert _decode(tok, learned_ids) == ["yes", "very", "happy"]


# -- builtin datasets --------------------------------------------------------------

@needs_chatterbot
def test_builtin_chatterbot_topics():
    ds = read_source("builtin:chatterbot-topics")
    assert ds.column_names == ["text", "label"]
    counts = Counter(ds["label"])
    assert len(counts) >= 10, counts
    assert min(counts.values()) >= 10, counts
    assert len(set(ds["text"])) == len(ds)
    assert all(t.strip() for t in ds["text"])


@needs_chatterbot
def test_builtin_chatterbot_chat():
    ds = read_source("builtin:chatterbot-chat")
    assert len(ds) > 100
    for msgs in ds["messages"][:200]:
        roles = [m["role"] for m in msgs]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))


def test_unknown_builtin_lists_accepted():
    msg = data_error(read_source, "builtin:nope")
    assert "builtin:nope" in msg and "unknown" in msg
    accepted = msg.split("accepted", 1)[1]
    assert "builtin:chatterbot-topics" in accepted and "builtin:chatterbot-chat" in accepted
