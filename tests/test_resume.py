"""Interrupted runs report what an uninterrupted one reports: Ctrl-C (twice, inside a checkpoint save, while
finishing), a kill between two renames, a killed session's cost, and AdaLoRA's rank allocator."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimtune
from slimtune.train import checkpoint
from slimtune.train.loop import Loop

from conftest import cls_config, sentiment_rows, write_csv

TESTS = Path(__file__).parent


class _Interrupt:
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, loop):
        if loop.state["step"] == self.at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("resume-data")
    return {"train": str(write_csv(d / "train.csv", sentiment_rows(96, 0))),
            "eval": str(write_csv(d / "eval.csv", sentiment_rows(24, 2))),
            "test": str(write_csv(d / "test.csv", sentiment_rows(24, 1)))}


def _cfg(model: str, data: dict, out: Path) -> dict:
    # 8 steps of 2 micro-batches; train records at 3 and 6, evaluations (and checkpoints) at 2, 4, 6, 8
    cfg = cls_config(model, data, out, max_steps=8, batch_size=8, grad_accum=2, log_every=3)
    cfg["data"]["eval"] = data["eval"]
    cfg["eval"] = {"every_steps": 2, "monitor": "loss"}
    return cfg


@pytest.fixture(scope="module")
def full(tiny_bert, data, tmp_path_factory):
    return slimtune.run(_cfg(tiny_bert, data, tmp_path_factory.mktemp("full")))


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _same_result(summary: dict, full) -> None:
    assert summary["status"] == "completed" and summary["steps"] == full.summary["steps"]
    assert summary["best_step"] == full.summary["best_step"]
    assert summary["best"] == pytest.approx(full.summary["best"], abs=1e-6)
    assert summary["final"] == pytest.approx(full.summary["final"], abs=1e-6)
    assert summary["test"] == pytest.approx(full.summary["test"], abs=1e-6)


def _eval_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]


def test_interrupted_and_resumed_counts_what_an_uninterrupted_run_counts(tiny_bert, data, full, tmp_path, monkeypatch,
                                                                          capsys):
    """Ctrl-C at step 5 (steps 4-5 not logged yet), pressed twice; then a kill between the two renames of a
    checkpoint replacement; the resume counts the samples, tokens and FLOPs an uninterrupted run counts."""
    real_save = Loop.save_interrupt_checkpoint

    def pressed_again(loop):  # the second Ctrl-C arrives while the interrupt checkpoint is written
        os.kill(os.getpid(), signal.SIGINT)
        real_save(loop)

    monkeypatch.setattr(Loop, "save_interrupt_checkpoint", pressed_again)
    with pytest.raises(KeyboardInterrupt):
        slimtune.run(_cfg(tiny_bert, data, tmp_path), callbacks=[_Interrupt(5)])
    monkeypatch.undo()
    run = tmp_path / "run"
    assert _summary(run)["status"] == "interrupted" and _summary(run)["step"] == 5
    assert "still saving" in capsys.readouterr().err
    last = run / "checkpoints" / "last"
    os.replace(last, last.with_name(".last.old-99999"))  # as a kill between the renames leaves it
    (run / "checkpoints" / ".last.tmp-x1").mkdir()
    res = slimtune.run(None, resume=run)
    _same_result(res.summary, full)
    for key in ("samples_seen", "tokens_seen"):
        assert res.summary[key] == full.summary[key] and res.summary["cost"][key] == full.summary["cost"][key]
    assert res.summary["samples_seen"] == 8 * 2 * 8  # steps x micro-batches x batch size
    assert res.summary["cost"]["flops"] == full.summary["cost"]["flops"] > 0
    assert res.summary["cost"]["sessions"] == 2


def test_ctrl_c_while_finishing_leaves_it_interrupted_and_resume_finishes(tiny_bert, data, full, tmp_path, monkeypatch):
    import slimtune.phases.train as phases_train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # after fit(): the best weights are loaded, the adapter not saved
    monkeypatch.setattr(phases_train, "save_adapter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        slimtune.run(_cfg(tiny_bert, data, tmp_path))
    monkeypatch.undo()
    run = tmp_path / "run"
    assert _summary(run)["status"] == "interrupted"
    res = slimtune.run(None, resume=run)
    _same_result(res.summary, full)
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert _eval_steps(run) == [2, 4, 6, 8]
    # checkpoints/last still holds the final weights, not the best ones loaded before the interrupt
    wa, wb = (load_file(str(r / "checkpoints/last/trainable.safetensors")) for r in (full.run_dir, run))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_ctrl_c_inside_the_best_checkpoint_save(tiny_bert, data, full, tmp_path, monkeypatch):
    """The state never names a best step whose weights are not on disk; the resume does that evaluation again."""
    real, fired = checkpoint.save, []

    def save(path, *args, **kwargs):
        step = (kwargs.get("loop_state") or {}).get("step", 0)
        if Path(path).name == "best" and step >= 4 and not fired:
            fired.append(step)
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save)
    with pytest.raises(KeyboardInterrupt):
        slimtune.run(_cfg(tiny_bert, data, tmp_path))
    monkeypatch.undo()
    assert fired, "no improvement after step 2 in this run: the test needs one"
    run = tmp_path / "run"
    last = json.loads((run / "checkpoints/last/state.json").read_text())
    best = json.loads((run / "checkpoints/best/state.json").read_text())
    assert last["best_step"] == best["step"] < fired[0]
    assert last["last_eval_step"] < fired[0]  # that evaluation is still to do
    res = slimtune.run(None, resume=run)
    _same_result(res.summary, full)
    assert _eval_steps(run) == [2, 4, 6, 8]


def _evals(run: Path) -> dict[int, dict]:
    lines = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in lines if r.get("type") == "eval"}


@pytest.mark.parametrize("fraction", [0.5, 0.375])
def test_a_paused_run_trains_on_as_if_it_had_not_stopped(tiny_bert, data, full, tmp_path, fraction):
    """PauseAt (a select rung) ends the run at its share of the steps (status paused, an evaluation there, no
    test); a resume trains on with the same schedule to the weights of the uninterrupted run. Paused on the
    evaluation grid (step 4), the whole result is the uninterrupted one; off it (step 3) the pause's extra
    evaluation is the only difference."""
    from slimtune.train.callbacks import PauseAt

    paused = slimtune.run(_cfg(tiny_bert, data, tmp_path), callbacks=[PauseAt(fraction)])
    run, at = paused.run_dir, int(8 * fraction)
    assert paused.status == "paused" and paused.test_metrics is None
    assert paused.summary["steps"] == at and max(_evals(run)) == at and (run / "adapter").is_dir()
    again = slimtune.run(None, resume=run, callbacks=[PauseAt(fraction)])  # at its pause step: it stays there
    assert again.status == "paused" and again.summary["steps"] == at
    res = slimtune.run(None, resume=run)
    wa, wb = (load_file(str(r / "checkpoints/last/trainable.safetensors")) for r in (full.run_dir, run))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    mine, theirs = _evals(run), _evals(full.run_dir)
    assert sorted(mine) == sorted({*theirs, at})
    for step, rec in theirs.items():
        assert mine[step]["eval_loss"] == pytest.approx(rec["eval_loss"], abs=1e-6)
    if at in theirs:
        _same_result(res.summary, full)
    else:
        assert res.status == "completed" and res.summary["steps"] == 8 and res.test_metrics is not None


KILL = """
import json, os, sys
import slimtune

class Kill:  # kill -9 at step 5: nothing of the session's end runs
    def on_step_end(self, loop):
        if loop.state["step"] == 5:
            os._exit(9)

cfg, resume = json.loads(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None
slimtune.run(None if resume else cfg, resume=resume, callbacks=[Kill()])
"""


def test_a_killed_sessions_cost_is_counted_on_resume(tiny_bert, data, full, tmp_path):
    cfg, run = _cfg(tiny_bert, data, tmp_path), tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}

    def killed_session(*resume):
        proc = subprocess.run([sys.executable, "-c", KILL, json.dumps(cfg), *map(str, resume)], env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 9, proc.stderr[-2000:]
        return _summary(run)

    first = killed_session()
    assert first["status"] == "running" and first["step"] == 4  # the cost so far, as of the last checkpoint
    before = first["cost"]
    assert before["sessions"] == 1 and before["wall_seconds"] > 0 and before["train_seconds"] > 0
    second = killed_session(run)  # resumed at step 4, killed at 5: before its first checkpoint
    assert second["status"] == "running" and second["cost"]["sessions"] == 2
    assert second["cost"]["wall_seconds"] > before["wall_seconds"]
    res = slimtune.run(None, resume=run)
    cost = res.summary["cost"]
    assert cost["sessions"] == 3
    assert cost["wall_seconds"] > second["cost"]["wall_seconds"] and cost["cpu_seconds"] > second["cost"]["cpu_seconds"]
    assert cost["wall_seconds"] > res.summary["wall_seconds"]  # more than this session alone
    assert res.summary["samples_seen"] == full.summary["samples_seen"]
    _same_result(res.summary, full)


def _adalora_cfg(model: str, data: dict, out: Path) -> dict:
    # 20 steps: importance scores from step 0, budget allocations every 2 steps from step 3, the final allocation
    # at step 14, the rank pattern applied at every step after it
    cfg = cls_config(model, data, out, max_steps=20, batch_size=8, log_every=5)
    cfg["data"]["eval"] = data["eval"]
    cfg["method"] = {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 0.1, "tfinal": 0.3, "delta_t": 2}
    cfg["eval"] = {"every_steps": 5, "monitor": "loss"}
    return cfg


def test_adalora_resumes_exactly_with_its_rank_allocator(tiny_bert, data, tmp_path):
    ref = slimtune.run(_adalora_cfg(tiny_bert, data, tmp_path / "a"))
    cfg = _adalora_cfg(tiny_bert, data, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        slimtune.run(cfg, callbacks=[_Interrupt(9)])  # mid allocation: the scores' averages matter
    run = tmp_path / "b" / "run"
    saved = json.loads((run / "checkpoints/last/method.json").read_text())
    assert saved["rank_pattern"] and load_file(str(run / "checkpoints/last/method.safetensors"))
    legacy = tmp_path / "legacy"
    shutil.copytree(run, legacy)
    for f in ("method.json", "method.safetensors"):
        (legacy / "checkpoints/last" / f).unlink()
    with pytest.raises(slimtune.ConfigError, match="rank allocator"):
        slimtune.run(None, resume=legacy)
    with pytest.raises(KeyboardInterrupt):
        slimtune.run(None, resume=run, callbacks=[_Interrupt(17)])  # in the final phase: the rank pattern is applied
    res = slimtune.run(None, resume=run)
    assert res.summary["best"] == pytest.approx(ref.summary["best"], abs=1e-6)
    assert res.summary["test"] == pytest.approx(ref.summary["test"], abs=1e-6)
    wa, wb = (load_file(str(r / "checkpoints/last/trainable.safetensors")) for r in (ref.run_dir, run))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    assert json.loads((run / "adapter/adapter_config.json").read_text())["rank_pattern"] == \
        json.loads((ref.run_dir / "adapter/adapter_config.json").read_text())["rank_pattern"]
    # the adapter is the best step's model: its metrics on the eval file are summary.best
    got = slimtune.evaluate(run, data["eval"])
    for k, v in res.summary["best"].items():
        assert got[k] == pytest.approx(v, abs=1e-5), k


def test_adalora_adapter_is_the_model_it_was_saved_from(tiny_bert, tmp_path):
    """Between two budget allocations the optimizer moves masked singular values off zero again; the adapter (a
    best step there) must keep them, or it is not the model that was evaluated."""
    from transformers import AutoModelForSequenceClassification

    from slimtune.methods import MethodContext, apply_method, load_adapter, save_adapter
    from slimtune.methods.peft_other import AdaLoraConfig

    def base():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)

    cfg = AdaLoraConfig(init_r=4, target_r=2)
    model = apply_method(base(), cfg, MethodContext("text-classification", "SEQ_CLS", ["classifier"], 100))
    inner = model.base_model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n or "lora_B" in n:
                p.uniform_(0.5, 1.0)
    # the allocator's last choice masked ranks 1 and 3, which have since moved (E no longer zero there)
    inner.peft_config["default"].rank_pattern = {n: [True, False, True, False]
                                                 for n, _ in inner.model.named_parameters() if "lora_E.default" in n}
    batch = {"input_ids": torch.tensor([[2, 12, 14, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    model.eval()
    want = model(**batch).logits
    (tmp_path / "adapter").mkdir()
    save_adapter(model, cfg, tmp_path / "adapter", tiny_bert, "text-classification")
    loaded = load_adapter(base(), tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(**batch).logits, want)
