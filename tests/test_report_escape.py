"""A run folder is data from anywhere (copied from another machine, a sweep's trial, edited by hand):
markup in its run name, metric names, labels, config keys and values, data warnings or parameter
groups must come out of every report page (run, comparison, sweep) as text, never as a tag or an
attribute, and a `$` in a name must not stop the plots (matplotlib's mathtext)."""
from __future__ import annotations

import base64
import html
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimtune.cli import app

runner = CliRunner(env={"COLUMNS": "1000"})
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
PAYLOADS = (SCRIPT, IMG)


def hostile_run(folder: Path, variant: int = 0) -> Path:
    """A complete run folder whose every free-text field holds markup (no training needed)."""
    folder.mkdir(parents=True)
    metric = SCRIPT  # the monitored metric's name
    config = {
        "task": f"text-classification {IMG}",
        "model": {"name": f"org/{IMG}"},
        "method": {"name": SCRIPT, "r": 4 + variant, IMG: SCRIPT},
        "train": {"lr": 0.01 * (variant + 1), "note": IMG if variant else SCRIPT},
        SCRIPT: {IMG: f"value {variant} {SCRIPT}"},
        "eval": {"monitor": metric},
        "output": {"dir": str(folder.parent), "name": folder.name},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    summary = {
        "status": "completed", "monitor": metric, "best_step": 2, "steps": 4, "total_steps": 4,
        "best": {metric: 0.5 + variant / 10, IMG: 0.25, "loss": 0.7},
        "final": {metric: 0.45, "loss": 0.75}, "test": {metric: 0.55 + variant / 10, IMG: 0.3},
        "precision": SCRIPT, "started_at": IMG, "ended_at": SCRIPT, "config_hash": IMG,
        "stopped_early": SCRIPT, "trainable_params": 10, "total_params": 100,
        "cost": {"train_seconds": 3.0 + variant, "wall_seconds": 5.0, "energy_kwh": 1e-4 * (variant + 1),
                 "co2_kg": 5e-5, "flops": 1e9, "flops_formula": SCRIPT,
                 "energy": {"energy_kwh": 1e-4, "co2_kg": 5e-5, "method": IMG, "tool": SCRIPT, "tracking_mode": IMG,
                            "methods": {"ram": SCRIPT}, "carbon_intensity_g_per_kwh": 475,
                            "carbon_intensity_source": IMG, "cpu_kwh": 6e-5, "ram_kwh": 4e-5}},
    }
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    records = []
    for step in (1, 2, 3, 4):
        records.append({"type": "train", "step": step, "loss": 1.0 / step,
                        "lr": {IMG: 0.01, f"head {SCRIPT} $a_$": 0.02}})
        if step % 2 == 0:
            records.append({"type": "eval", "step": step, "eval_loss": 0.8 / step, f"eval_{metric}": 0.25 * step,
                            f"eval_{IMG} $x^$": 0.1 * step, "best": step == 2})
    records.append({"type": "test", "step": 2, f"test_{metric}": 0.55, "test_loss": 0.6})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    labels = [SCRIPT, IMG, "$x^$"]  # an even count of $: mathtext, and a bad formula
    block = {"step": 2, "matrix": [[3, 1, 0], [0, 2, 1], [1, 0, 4]]}
    (folder / "confusion_matrix.json").write_text(json.dumps({"labels": labels, "eval": block,
                                                              "test": {**block, "step": IMG}}),
                                                  encoding="utf-8")
    (folder / "data_report.json").write_text(json.dumps({"warnings": [
        f"train: 3 duplicate example(s), e.g. {SCRIPT}", f"class imbalance: {IMG!r} has 9 examples"]}),
        encoding="utf-8")
    (folder / "meta.json").write_text(json.dumps({"labels": labels}), encoding="utf-8")
    return folder


class Tags(HTMLParser):
    """Every element and attribute the page really has, as a browser would parse it."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def assert_inert(page: str) -> None:
    """No element or attribute comes from data; the data is there, as text; every plot is inert too."""
    p = Tags()
    p.feed(page)
    names = {t for t, _ in p.tags}
    assert names <= {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "div", "main", "section",
                     "table", "thead", "tbody", "tr", "th", "td", "span", "p", "ul", "li", "pre", "figure",
                     "figcaption", "img", "footer"}, names
    for tag, attrs in p.tags:
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        assert set(attrs) <= {"lang", "charset", "name", "content", "class", "id", "src", "alt"}, (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith(("data:image/svg+xml;base64,", "data:image/png;base64,")), attrs["src"][:80]
    assert "<script" not in page.lower()
    assert not re.search(r"<[a-z][^>]*onerror\s*=", page)
    text = "".join(p.text)
    assert SCRIPT in text and IMG in text  # the data reached the page, as text
    for src in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', page):
        svg = base64.b64decode(src).decode("utf-8")
        assert "<script" not in svg
        for el in ET.fromstring(svg).iter():  # well-formed XML: matplotlib escaped the text it wrote
            assert not el.tag.endswith(("script", "foreignObject")), el.tag
            assert not [a for a in el.attrib if a.lower().startswith("on")], el.attrib


@pytest.fixture()
def hostile(tmp_path) -> Path:
    """Two hostile runs side by side, and a sweep folder (with a hostile name) holding both as trials."""
    root = tmp_path / "runs"
    hostile_run(root / f"{IMG} a$b $x^")
    hostile_run(root / "r<script>alert(1)", variant=1)
    for k, src in enumerate(sorted(root.iterdir())):
        hostile_run(root / f"sweep-{IMG}" / "trials" / f"trial-{k} {SCRIPT.replace('/', '')}", variant=k)
    return root


def test_run_page_escapes_everything_from_the_folder(hostile, tmp_path):
    for fmt in ("svg", "png"):
        out = tmp_path / f"run-{fmt}.html"
        res = runner.invoke(app, ["report", str(hostile / f"{IMG} a$b $x^"), "--out", str(out), "--format", fmt])
        assert res.exit_code == 0, res.output
        page = out.read_text(encoding="utf-8")
        assert_inert(page)
        for alt in ("loss curves", "metric curves", "learning-rate schedule", "eval confusion matrix",
                    "test confusion matrix", "trainable-parameter share", "energy split"):
            assert f'alt="{alt}"' in page, alt  # every plot was drawn, `$` in labels and names included
        assert html.escape("duplicate example(s), e.g. " + SCRIPT) in page  # the data warnings, as text


def test_compare_and_sweep_pages_escape_everything(hostile, tmp_path):
    a, b = hostile / f"{IMG} a$b $x^", hostile / "r<script>alert(1)"
    out = tmp_path / "cmp.html"
    res = runner.invoke(app, ["report", "--compare", str(a), str(b), "--out", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text(encoding="utf-8")
    assert_inert(page)
    assert "Pareto plot" in page and "training loss overlaid" in page and "eval metric overlaid" in page
    # the metric name
    assert html.escape(f"quality: test {SCRIPT}") in page and html.escape(f"Pareto front of test {SCRIPT}") in page
    # a folder that cannot be read is named on the page, escaped like the rest
    broken = hostile / f"broken {IMG}"
    broken.mkdir()
    (broken / "config.yaml").write_text(f"task: [{IMG}", encoding="utf-8")
    res = runner.invoke(app, ["report", "--compare", str(a), str(broken), "--out", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text(encoding="utf-8")
    assert_inert(page)
    assert "left out:" in page

    sweep = hostile / f"sweep-{IMG}"
    res = runner.invoke(app, ["report", str(sweep)])
    assert res.exit_code == 0, res.output
    page = (sweep / "report.html").read_text(encoding="utf-8")
    assert_inert(page)
    assert html.escape(f"Sweep sweep-{IMG}") in page and "Config differences" in page
    assert html.escape(f"value 1 {SCRIPT}") in page  # a trial's config value that differs


def test_escape_helpers_keep_built_markup_and_escape_the_rest():
    from slimtune.report.markup import Html, esc, h, table

    assert esc(IMG) == "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"
    assert esc(Html("<b>")) == "<b>"
    cell = h("<td title=\"{}\">{}</td>", IMG, Html("<i>ok</i>"))
    assert cell == '<td title="&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"><i>ok</i></td>'
    assert isinstance(Html("<p>") + SCRIPT, Html) and Html("<p>") + SCRIPT == "<p>&lt;script&gt;alert(1)&lt;/script&gt;"
    assert SCRIPT + Html("<p>") == "&lt;script&gt;alert(1)&lt;/script&gt;<p>"
    t = table([SCRIPT], [[SCRIPT, Html("<b>x</b>")]])
    assert "<script" not in t and "<b>x</b>" in t
