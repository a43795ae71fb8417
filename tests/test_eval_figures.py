"""A task's own evaluation figures (Task.eval_figures): written to eval_figures.json for the best eval step and the
test split, and rendered in the run report (tables escaped, scatter plots as images), without the report knowing
the task. A run folder's file is untrusted: a block of the wrong shape is left out."""
from __future__ import annotations

import json
import re

import pytest
import torch

import slimtune
from slimtune.report import figures as report_figures
from slimtune.report.html import run_page
from slimtune.tasks.text_classification import TextClassification
from slimtune.track.runinfo import read_run

from conftest import cls_config, sentiment_rows, write_csv


def figures_of(self, parts: dict[str, torch.Tensor], meta: dict) -> list[dict]:
    """Per-label support and correct count (hand-checkable from the confusion matrix), and gold vs predicted."""
    pred, gold = parts["pred"].tolist(), parts["gold"].tolist()
    rows = [[f"<b>{lab}</b>", sum(g == i for g in gold), sum(g == p == i for g, p in zip(gold, pred))]
            for i, lab in enumerate(meta["labels"])]
    return [{"kind": "table", "title": "per label <i>", "columns": ["label", "support", "correct"], "rows": rows},
            {"kind": "scatter", "title": "gold vs predicted", "x": gold, "y": pred, "x_label": "gold",
             "y_label": "predicted"}]


@pytest.fixture(scope="module")
def run_dir(tiny_bert, tmp_path_factory):
    base = tmp_path_factory.mktemp("figures")
    data = {"train": str(write_csv(base / "train.csv", sentiment_rows(64, 0))),
            "test": str(write_csv(base / "test.csv", sentiment_rows(20, 1)))}
    cfg = cls_config(tiny_bert, data, base / "runs", max_steps=6)
    cfg["eval"] = {"every_steps": 2}
    cfg["output"].update(name="fig", save_checkpoints=False)
    mp = pytest.MonkeyPatch()
    mp.setattr(TextClassification, "eval_figures", figures_of)
    try:
        slimtune.run(cfg)
    finally:
        mp.undo()
    return base / "runs" / "fig"


def test_figures_written_for_best_eval_and_test(run_dir):
    figs = json.loads((run_dir / "eval_figures.json").read_text())
    cm = json.loads((run_dir / "confusion_matrix.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    for split in ("eval", "test"):
        assert figs[split]["step"] == cm[split]["step"] == summary["best_step"]
        table = figs[split]["figures"][0]
        matrix = cm[split]["matrix"]
        # the same evaluation as the confusion matrix: support = row sums, correct = the diagonal
        assert [r[1] for r in table["rows"]] == [sum(row) for row in matrix]
        assert [r[2] for r in table["rows"]] == [matrix[i][i] for i in range(len(matrix))]
    assert sum(r[1] for r in figs["test"]["figures"][0]["rows"]) == 20


def test_report_renders_tables_escaped_and_scatter_plots(run_dir):
    html = run_page(read_run(run_dir, records=True))
    assert "Evaluation details" in html
    assert "&lt;b&gt;neg&lt;/b&gt;" in html and "<b>neg</b>" not in html
    assert "per label &lt;i&gt;" in html
    alts = re.findall(r'<img src="data:image/svg\+xml;base64,[^"]+" alt="([^"]+)"', html)
    assert alts.count("gold vs predicted scatter plot") == 2  # eval and test


def test_malformed_blocks_are_left_out():
    bad = {"eval": {"step": 1, "figures": [
        {"kind": "table", "title": "t", "columns": [1, 2], "rows": [[1, 2]]},  # columns must be strings
        {"kind": "scatter", "title": "s", "x": "1,2", "y": [1]},
        {"kind": "<script>", "title": "x"}, "not a dict"]},
        "test": ["not a block"]}
    assert report_figures.task_figures(bad) == ""
    assert report_figures.task_figures(None) == ""
    ok = {"test": {"step": 3, "figures": [{"kind": "table", "title": "t", "columns": ["a", "b"],
                                           "rows": [[1, 0.123456]] * 250}]}}
    out = report_figures.task_figures(ok)
    assert out.count("<tr>") == 1 + report_figures.MAX_ROWS and "first 200 of 250 rows" in out
    assert "0.1235" in out
