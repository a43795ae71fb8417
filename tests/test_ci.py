"""A check whose piece CI installs (.ci/run) skips with a message on a user's machine and fails under
SLIMTUNE_CI=1, where a skip would mean that the piece did not install and the check silently did not run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PIECES = '''
import pytest
from conftest import require_or_skip

def test_needs_a_browser():
    require_or_skip(False, "Chromium", "apt-get install chromium")

def test_own_skip_naming_ci():
    pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql (.ci/run does)")

def test_plain_skip():
    pytest.skip("../shared/datasets/sst2 not present")

def test_present():
    require_or_skip(True, "Chromium", "apt-get install chromium")
'''


def _pytest(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_pieces.py").write_text(PIECES)
    env = {k: v for k, v in os.environ.items() if k != "SLIMTUNE_CI"} | ({"SLIMTUNE_CI": "1"} if ci else {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_missing_pieces_skip_with_a_message_on_a_users_machine(tmp_path):
    res = _pytest(tmp_path, ci=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed, 3 skipped" in res.stdout
    assert "Chromium is not available: apt-get install chromium (.ci/run installs it)" in res.stdout


def test_missing_pieces_fail_in_ci(tmp_path):
    res = _pytest(tmp_path, ci=True)
    assert res.returncode == 1, res.stdout + res.stderr
    said = " ".join(res.stdout.split())
    assert "2 failed, 1 passed, 1 skipped" in said  # the plain skip (not a piece CI installs) stays a skip
    assert "skipped in CI, where the piece it needs is installed: Chromium is not available" in said
    assert "FAILED test_pieces.py::test_own_skip_naming_ci" in said
