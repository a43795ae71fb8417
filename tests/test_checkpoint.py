"""Atomic writes and checkpoint folders: file modes, a kill between the two renames of a folder
replacement, a run that fails before training starts."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.track import atomic
from slimtune.train import checkpoint

from conftest import cls_config, sentiment_rows, write_csv


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_written_files_and_folders_follow_the_umask(tmp_path):
    """0666 / 0777 less the user's umask, like any other file (mkstemp / mkdtemp alone give 0600 / 0700)."""
    code = ("import sys; from pathlib import Path; from slimtune.track import atomic; "
            "from slimtune.train import checkpoint\n"
            "import torch; root = Path(sys.argv[1])\n"
            "atomic.write_text(root / 'report.html', 'x'); atomic.write_json(root / 'summary.json', {})\n"
            "with atomic.folder(root / 'adapter') as tmp: (tmp / 'adapter_model.safetensors').write_text('w')\n"
            "checkpoint.save(root / 'ckpt', torch.nn.Linear(2, 2), loop_state={'step': 1})\n")
    for umask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
        root = tmp_path / f"u{umask:o}"
        root.mkdir()
        subprocess.run([sys.executable, "-c", f"import os; os.umask({umask}); exec({code!r})", str(root)], check=True,
                       env={**os.environ, "PYTHONPATH": str(Path(slimtune.__file__).parents[1])})
        assert _mode(root / "report.html") == file_mode and _mode(root / "summary.json") == file_mode
        assert _mode(root / "adapter") == dir_mode and _mode(root / "ckpt") == dir_mode
        assert _mode(root / "ckpt" / "trainable.safetensors") == file_mode


def _killed_between_renames(monkeypatch, target: Path) -> None:
    """Replace `target` with a new version, dying (as kill -9 would) right after its first rename."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        real(src, dst)
        if len(calls) == 1:
            raise SystemExit("killed")

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(SystemExit):
        with atomic.folder(target) as tmp:
            (tmp / "state.json").write_text('{"step": 8}')
    monkeypatch.setattr(atomic.os, "replace", real)


def test_a_kill_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    last = tmp_path / "checkpoints" / "last"
    with atomic.folder(last) as tmp:
        (tmp / "state.json").write_text('{"step": 4}')
    _killed_between_renames(monkeypatch, last)
    assert not last.exists()  # what the kill leaves: the complete previous version under its .old- name only
    assert sorted(p.name.split("-")[0] for p in last.parent.iterdir()) == [".last.old", ".last.tmp"]
    assert checkpoint.resumable(last)  # a resume finds it, before anything is cleaned
    atomic.clean_leftovers(tmp_path)
    assert (last / "state.json").read_text() == '{"step": 4}'
    assert sorted(p.name for p in last.parent.iterdir()) == ["last"]
    # a half-written replacement (the kill came during the writing) is removed, the complete one kept
    (last.parent / ".last.tmp-abc").mkdir()
    atomic.clean_leftovers(tmp_path)
    assert sorted(p.name for p in last.parent.iterdir()) == ["last"]
    assert not checkpoint.resumable(tmp_path / "checkpoints" / "best")


def test_a_failed_rename_keeps_the_previous_folder(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    with atomic.folder(target) as tmp:
        (tmp / "a").write_text("old")
    real = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError):
        with atomic.folder(target) as tmp:
            (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_checkpoint_holds_the_named_parameters_and_extra_state(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    names = checkpoint.trainable_names(model)
    model[0].requires_grad_(False)  # frozen for now (gradual unfreezing), trained later: still saved
    extra = {"method": ({"ema/x": torch.ones(3)}, {"rank_pattern": {"x": [True, False]}})}
    checkpoint.save(tmp_path / "c", model, loop_state={"step": 3}, names=names, extra=extra)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    checkpoint.load(tmp_path / "c", model)
    assert all(p.abs().sum() > 0 for p in model.parameters())
    tensors, data = checkpoint.load_extra(tmp_path / "c", "method")
    assert torch.equal(tensors["ema/x"], torch.ones(3)) and data == {"rank_pattern": {"x": [True, False]}}
    assert checkpoint.load_extra(tmp_path / "c", "other") is None


def test_a_run_that_fails_before_training_leaves_no_folder(tiny_bert, tmp_path):
    """A corrupt model fails after the run folder was made: the folder goes again (no summary, never indexed)."""
    broken = tmp_path / "broken-bert"
    shutil.copytree(tiny_bert, broken)
    weights = next(p for p in broken.iterdir() if p.suffix in (".safetensors", ".bin"))
    weights.write_bytes(b"not a weights file")
    data = {"train": str(write_csv(tmp_path / "train.csv", sentiment_rows(40)))}
    out = tmp_path / "runs"
    out.mkdir()
    (out / "earlier").mkdir()  # what the user had stays
    with pytest.raises(Exception):
        slimtune.run(cls_config(str(broken), data, out, max_steps=2))
    assert sorted(p.name for p in out.iterdir() if p.name != "index.sqlite") == ["earlier"]
