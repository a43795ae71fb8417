"""A full disk is said as such, whichever library was writing."""
from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import pytest

from slimtune import cli
from slimtune.track import diskspace

Usage = namedtuple("Usage", "total used free")


def test_errno_28_and_library_wordings_are_a_full_disk(tmp_path):
    assert diskspace.is_full(OSError(errno.ENOSPC, "No space left on device"))
    assert diskspace.is_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          "message: \"No space left on device\" }) (os error 28)"))
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert diskspace.is_full(wrapped)
    assert not diskspace.is_full(OSError(errno.EACCES, "Permission denied"))
    assert not diskspace.is_full(RuntimeError("CUDA out of memory"))


def test_torch_writer_failure_is_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch):
    torch_words = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * 2**30, 10 * 2**30, 2**20))
    err = diskspace.no_space(torch_words, tmp_path / "ckpt" / "optimizer.pt", need_bytes=50 * 2**20)
    assert isinstance(err, diskspace.NoSpaceError) and err.errno == errno.ENOSPC
    text = str(err)
    assert "no space left" in text and "ckpt" in text and "needs about 50 MB" in text and "1 MB free" in text
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * 2**30, 2**30, 9 * 2**30))
    assert diskspace.no_space(torch_words, tmp_path / "ckpt", need_bytes=50 * 2**20) is None


def test_the_cli_says_no_space_instead_of_a_traceback(tmp_path, monkeypatch, capsys):
    from slimtune import api

    target = tmp_path / "runs" / "r" / "summary.json"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(api, "evaluate", full)
    (tmp_path / "runs" / "r").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(tmp_path / "runs" / "r"), "--data", "x.csv"])
    assert e.value.code == 2
    said = capsys.readouterr().err.replace("\n", "")  # rich wraps at the terminal width
    assert "no space left on the disk of" in said and "summary.json" in said and "Traceback" not in said
    assert "damaged" not in said


def test_the_cli_keeps_the_traceback_of_other_errors(tmp_path, monkeypatch):
    from slimtune import api

    def bug(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api, "evaluate", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["eval", str(tmp_path), "--data", "x.csv"])


def test_a_checkpoint_on_a_full_disk_says_so_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """torch.save's own words on a full disk name neither the disk nor space; the checkpoint's error does."""
    import torch

    from slimtune.train import checkpoint

    model = torch.nn.Linear(512, 512)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "checkpoints" / "last"
    checkpoint.save(path, model, opt, {"step": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def torch_full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", torch_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * 2**30, 10 * 2**30, 2**20))
    with pytest.raises(diskspace.NoSpaceError) as e:
        checkpoint.save(path, model, opt, {"step": 2})
    assert "checkpoints" in str(e.value) and "needs about 3 MB" in str(e.value)  # 262,656 fp32 weights x 3
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert not [p for p in path.parent.iterdir() if p.name != "last"]  # no half-written sibling left
