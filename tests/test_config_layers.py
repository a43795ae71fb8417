"""The layers under the CLI: the config reads the task registry and loads no torch, every user error shares one
root that the CLI reports (and nothing else), and one process-alive check serves `runs list` and the sweep."""
from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from slimtune import errors
from slimtune.cli import app
from slimtune.config import RunConfig, load_config, metric_higher_is_better
from slimtune.tasks import TASKS
from slimtune.track.procs import process_alive


def test_config_loads_without_torch():
    probe = "import sys, slimtune.config, slimtune.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("task", list(TASKS))
def test_monitor_and_direction_come_from_the_task_spec(task):
    spec = TASKS[task]
    cfg = load_config({"task": task, "model": "some-org/some-model", "data": {"train": "train.csv"}})
    assert cfg.monitor == spec.default_monitor
    assert cfg.higher_is_better == spec.higher_is_better(spec.default_monitor)
    assert set(RunConfig.model_json_schema()["properties"]["task"]["enum"]) == set(TASKS)


def test_metric_direction_without_a_task():
    assert metric_higher_is_better("accuracy") and not metric_higher_is_better("loss")
    assert not metric_higher_is_better("perplexity") and metric_higher_is_better("some_new_score")


def _user_errors() -> list[tuple[type, type]]:
    from slimtune.track import diskspace, guard, index

    return [(errors.ConfigError, ValueError), (errors.DataError, ValueError), (errors.ModelError, ValueError),
            (errors.MethodError, ValueError), (errors.RunFolderError, ValueError), (errors.UsageError, ValueError),
            (errors.RunNotFound, FileNotFoundError), (errors.InputNotFound, FileNotFoundError),
            (errors.OutputExists, FileExistsError), (diskspace.NoSpaceError, OSError),
            (guard.RunBusy, ValueError), (guard.RunComplete, ValueError), (guard.UntrustedRun, ValueError),
            (index.RunIndexError, LookupError), (index.NoRunIndex, FileNotFoundError)]


def test_every_user_error_has_one_root_and_keeps_its_builtin_base():
    for cls, builtin in _user_errors():
        assert issubclass(cls, errors.SlimtuneError) and issubclass(cls, builtin), cls


def test_the_old_modules_still_export_their_errors():
    from slimtune.config import ConfigError
    from slimtune.data.readers import DataError
    from slimtune.methods import MethodError
    from slimtune.models.sources import ModelError
    from slimtune.track.runinfo import RunFolderError

    assert (ConfigError, DataError, MethodError, ModelError, RunFolderError) == (
        errors.ConfigError, errors.DataError, errors.MethodError, errors.ModelError, errors.RunFolderError)


def _report_raising(monkeypatch, tmp_path, raised: BaseException):
    """`slimtune report RUN` with the report raising `raised`."""
    import slimtune.report

    def boom(*args, **kwargs):
        raise raised

    (tmp_path / "config.yaml").write_text("task: causal-lm\n")
    monkeypatch.setattr(slimtune.report, "run_report", boom)
    return CliRunner().invoke(app, ["report", str(tmp_path)])


@pytest.mark.parametrize("raised, code", [
    (errors.ConfigError("train.lr: -1 is not accepted"), 2),
    (errors.MethodError("method ia3: found no key layers"), 2),
    (errors.RunNotFound("runs/x: not a run folder (no config.yaml)"), 2),
    (FileNotFoundError("a bug's missing file"), 1),
    (ValueError("a bug"), 1),
])
def test_the_cli_reports_exactly_the_user_errors(monkeypatch, tmp_path, raised, code):
    res = _report_raising(monkeypatch, tmp_path, raised)
    assert res.exit_code == code, (res.output, res.exception)
    if code == 2:
        assert f"error: {raised}" in " ".join(res.output.split())
    else:
        assert res.exception is raised  # a bug keeps its traceback


def test_a_message_is_printed_as_it_is_not_as_markup(monkeypatch, tmp_path):
    res = _report_raising(monkeypatch, tmp_path, errors.DataError("data.label_column: [bold]label[/bold] not found"))
    assert res.exit_code == 2 and "[bold]label[/bold]" in res.output


def test_process_alive_sees_a_zombie_as_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):  # exited, not yet reaped: a zombie
            with open(f"/proc/{child.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            subprocess.run(["sleep", "0.01"])
        assert not process_alive(child.pid)
    finally:
        child.wait()
    assert not process_alive(child.pid)  # reaped: gone
    assert process_alive(None) and process_alive(child.pid, host="another-machine")  # cannot tell: alive


def test_process_alive_for_a_running_process():
    import os

    assert process_alive(os.getpid())
    assert process_alive(1)  # init, or another user's process (EPERM): there either way
