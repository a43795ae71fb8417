"""HTML reports: a run page (curves, lr per group, confusion matrix, parameter share, cost and
energy, config) and comparison pages (runs given, a sweep folder), rendered in headless Chromium
to check that every plot image really loads in a browser."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import slimtune
from slimtune.cli import app
from slimtune.report.plots import pareto_front

from conftest import cls_config, sentiment_rows, write_csv

runner = CliRunner(env={"COLUMNS": "1000"})
IMG = re.compile(r"<img\b[^>]*>")


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory) -> Path:
    """One real tiny run `a`; `b` is a copy with another config and cost (what a second run would
    have written); `sweep-y/trials/` holds two more copies, as a sweep lays out its trials."""
    base = tmp_path_factory.mktemp("report")
    data = {"train": str(write_csv(base / "train.csv", sentiment_rows(96, 0))),
            "test": str(write_csv(base / "test.csv", sentiment_rows(24, 1)))}
    root = base / "runs"
    cfg = cls_config(tiny_bert, data, root, max_steps=8, log_every=1, lr=2e-2)
    cfg["eval"] = {"every_steps": 2}
    cfg["output"].update(name="a", save_checkpoints=False)
    slimtune.run(cfg)
    b = root / "b"
    shutil.copytree(root / "a", b)
    c = yaml.safe_load((b / "config.yaml").read_text())
    c["method"]["r"], c["output"]["name"] = 16, "b"
    (b / "config.yaml").write_text(yaml.safe_dump(c))
    s = json.loads((b / "summary.json").read_text())
    s["test"]["accuracy"] = min(1.0, s["test"]["accuracy"] + 0.1)
    s["cost"]["train_seconds"] *= 2
    s["cost"]["energy_kwh"] *= 3
    (b / "summary.json").write_text(json.dumps(s))
    for t in ("trial-0000", "trial-0001"):
        shutil.copytree(root / ("a" if t.endswith("0") else "b"), root / "sweep-y" / "trials" / t)
    return root


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium here: `apt-get install chromium` (Debian; .ci/run installs it) to run the browser check")


CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)).map(i => i.alt);
  const wide = document.documentElement.scrollWidth;
  document.title = "IMAGES " + imgs.length + " BAD " + bad.length + " WIDTH " + wide + " [" + bad.join("|") + "]";
});
</script>"""


def render(page: Path, tmp_path: Path) -> tuple[int, int, int, str]:
    """(images, images that did not load, page width) as Chromium sees the page."""
    probe = tmp_path / f"probe-{page.stem}.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"), encoding="utf-8")
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,2000", "--virtual-time-budget=15000",
           "--dump-dom", probe.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r"<title>IMAGES (\d+) BAD (\d+) WIDTH (\d+) \[(.*?)\]</title>", proc.stdout)
    assert m, f"no result from Chromium (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)


def self_contained(html: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html), "the page must not fetch anything"
    assert "<script" not in html


def test_run_report(runs, tmp_path):
    res = runner.invoke(app, ["report", str(runs / "a")])
    assert res.exit_code == 0, res.output
    page = runs / "a" / "report.html"
    html = page.read_text()
    self_contained(html)
    alts = re.findall(r'alt="([^"]+)"', " ".join(IMG.findall(html)))
    for want in ("loss curves", "metric curves", "learning-rate schedule", "eval confusion matrix",
                 "test confusion matrix", "trainable-parameter share", "energy split"):
        assert want in alts, (want, alts)
    assert all(src.startswith("data:image/svg+xml;base64,") for src in re.findall(r'<img src="([^"]+)"', html))
    for text in ("Cost and energy", "measured with", "kWh", "g CO2e/kWh", "training FLOPs", "Config", "lora", "decay"):
        assert text in html, text
    n, bad, width, which = render(page, tmp_path)
    assert n == len(alts) and bad == 0, which
    assert width <= 1280  # nothing overflows the window sideways


def test_confusion_matrix_written_for_eval_and_test(runs):
    cm = json.loads((runs / "a" / "confusion_matrix.json").read_text())
    sizes = json.loads((runs / "a" / "data_report.json").read_text())["sizes"]
    summary = json.loads((runs / "a" / "summary.json").read_text())
    assert cm["labels"] == ["neg", "pos"]
    assert sum(map(sum, cm["eval"]["matrix"])) == sizes["eval"]
    assert sum(map(sum, cm["test"]["matrix"])) == sizes["test"] == 24
    assert cm["eval"]["step"] == cm["test"]["step"] == summary["best_step"]  # both from the best checkpoint
    m = cm["test"]["matrix"]
    assert (m[0][0] + m[1][1]) / 24 == pytest.approx(summary["test"]["accuracy"])


def test_compare_and_sweep_pages(runs, tmp_path):
    out = tmp_path / "cmp.html"
    res = runner.invoke(app, ["report", "--compare", str(runs / "a"), str(runs / "b"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    html = out.read_text()
    self_contained(html)
    for text in ("Pareto plot", "training loss overlaid", "eval metric overlaid", "Config differences", "method.r",
                 "test accuracy"):
        assert text in html, text
    assert 'class="front"' in html  # the Pareto front is marked in the table
    n, bad, _, which = render(out, tmp_path)
    assert n >= 4 and bad == 0, which

    res = runner.invoke(app, ["report", str(runs / "sweep-y"), "--format", "png"])
    assert res.exit_code == 0, res.output
    page = runs / "sweep-y" / "report.html"
    html = page.read_text()
    assert "Sweep sweep-y" in html and "trial-0000" in html and "trial-0001" in html
    assert "data:image/png;base64," in html and "svg+xml" not in html
    n, bad, _, which = render(page, tmp_path)
    assert n >= 4 and bad == 0, which


def test_report_errors_are_clear(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["report", str(empty)])
    assert res.exit_code == 2 and "holds no run folders" in res.output
    res = runner.invoke(app, ["report", "no-such-run", "--root", str(tmp_path)])
    assert res.exit_code == 2 and "no such folder" in res.output
    res = runner.invoke(app, ["report", str(runs / "a"), "--format", "gif", "--out", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "svg, png" in res.output
    damaged = tmp_path / "damaged"
    shutil.copytree(runs / "a", damaged)
    (damaged / "summary.json").write_text('{"status": ')
    res = runner.invoke(app, ["report", str(damaged), "--out", str(tmp_path / "d.html")])
    assert res.exit_code == 2 and "summary.json: not valid JSON" in " ".join(res.output.split())
    # in a comparison the damaged run is left out, and the page says so
    res = runner.invoke(app, ["report", "--compare", str(runs / "a"), str(damaged), "--out", str(tmp_path / "c.html")])
    assert res.exit_code == 0, res.output
    assert "left out:" in (tmp_path / "c.html").read_text() and "not valid JSON" in (tmp_path / "c.html").read_text()


def test_pareto_front():
    pts = [(1.0, 0.80), (2.0, 0.85), (3.0, 0.84), (0.5, 0.70), (2.5, 0.90)]
    assert sorted(pareto_front(pts, higher_better=True)) == [0, 1, 3, 4]
    assert sorted(pareto_front([(1, 0.5), (2, 0.4), (3, 0.6)], higher_better=False)) == [0, 1]
