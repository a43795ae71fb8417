"""The external trackers' failure paths: a resumed run whose MLflow run is gone says so."""
from __future__ import annotations

import pytest


def test_mlflow_resume_of_a_missing_run_warns_and_names_the_run_id(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from slimtune.track.trackers import MlflowSink

    uri = "file:" + str(tmp_path / "mlruns")
    first = MlflowSink(uri, "exp", "run-a", {"train": {"lr": 1e-3}})
    assert capsys.readouterr().err == ""
    again = MlflowSink(uri, "exp", "run-a", {}, run_id=first.run_id)  # the earlier session's run: continued, silently
    assert again.run_id == first.run_id and capsys.readouterr().err == ""

    gone = "0123456789abcdef0123456789abcdef"
    sink = MlflowSink(uri, "exp", "run-a", {}, run_id=gone)
    err = " ".join(capsys.readouterr().err.split())
    assert f"the MLflow run {gone} of this run's earlier session was not found in {uri}" in err
    assert "logging this session to a new MLflow run" in err and "[tracking warning] mlflow" in err
    assert sink.run_id != gone and sink.client.get_run(sink.run_id).info.run_name == "run-a"
