"""Packed causal-LM training (data.packing): best-fit decreasing rows, attention that stays inside each example
(transformers' block-causal mask from per-example position ids), the same loss and gradients as unpacked
batches, exact resume, truncation vs splitting, and the real-token accounting."""
from __future__ import annotations

import json
import random

import pytest
import torch

import slimtune
from slimtune.config import load_config
from slimtune.data import packing
from slimtune.errors import ConfigError, ModelError
from slimtune.train.state import TrainState

from conftest import chat_rows, write_jsonl

IMPLEMENTATIONS = ["sdpa", "eager"]


def _model(path: str, attn: str = "sdpa", lora: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                 init_lora_weights=False))  # non-zero B: the adapter matters
    return model


def _example(rng: random.Random, n: int, vocab: int, prompt: int = 0) -> dict:
    ids = [rng.randrange(8, vocab) for _ in range(n)]
    return {"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * prompt + ids[prompt:]}


# -- best-fit decreasing ---------------------------------------------------------------------------------------

def _reference_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing by exhaustive search over the open rows (ties: the row that has had its free space
    longest), the rule the segment tree implements in O(log capacity)."""
    rows: list[dict] = []
    clock = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in rows if r["free"] >= lengths[i]]
        if fits:
            row = min(fits, key=lambda r: (r["free"], r["since"]))
        else:
            row = {"ids": [], "free": capacity}
            rows.append(row)
        row["ids"].append(i)
        row["free"] -= lengths[i]
        row["since"], clock = clock, clock + 1
    return [r["ids"] for r in rows]


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_places_every_example_once_within_capacity(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 37, 64])
    lengths = [rng.randint(1, capacity) if rng.random() < 0.2 else rng.randint(1, capacity // 3) for _ in range(300)]
    rows = packing.best_fit_decreasing(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    assert rows == _reference_bfd(lengths, capacity)
    assert rows == packing.best_fit_decreasing(lengths, capacity)  # deterministic
    # the bound of first/best-fit decreasing: no more rows than 11/9 of the optimum (+1), which is >= the volume
    assert len(rows) <= 11 / 9 * -(-sum(lengths) // capacity) + 1


def test_best_fit_decreasing_takes_the_tightest_row():
    # 5 and 4 open two rows (free 3 and 4); a 3 goes into the row with 3 free, not the first row that fits it
    assert packing.best_fit_decreasing([4, 5, 3], 8) == [[1, 2], [0]]
    assert packing.best_fit_decreasing([5, 4, 3, 3, 2, 8, 1], 8) == [[5], [0, 2], [1, 3, 6], [4]]
    with pytest.raises(ValueError):
        packing.best_fit_decreasing([9], 8)


def test_rows_restart_positions_and_do_not_predict_an_example_from_the_previous_one():
    rng = random.Random(0)
    examples = [_example(rng, n, 50, prompt=2) for n in (6, 5, 3, 1)] + [_example(rng, 4, 50, prompt=4)]
    rows, stats = packing.pack_examples(examples, 12)
    # the 1-token example and the one without a response token score nothing: left out
    assert stats == {"examples": 5, "pieces": 3, "rows": 2, "fill": 14 / 24}
    first = rows[0]
    assert first["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    assert first["input_ids"] == examples[0]["input_ids"] + examples[1]["input_ids"]
    assert first["labels"] == [-100, -100] + examples[0]["input_ids"][2:] + [-100, -100] + examples[1]["input_ids"][2:]
    batch = packing.packed_batch(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see data/packing.py
    assert batch["position_ids"][1].tolist() == [0, 1, 2] + [0] * 8  # padding: a position 0 each
    samples, tokens = packing.count_tokens(batch)
    assert (int(samples), int(tokens)) == (3, 14)
    # the task's accounting: real tokens over the positions a batch holds; unpacked, the same examples pad more
    from slimtune.tasks import get_task
    from slimtune.tasks.common import pad_batch

    task = get_task("causal-lm")
    assert [int(x) for x in task.count(batch)] == [3, 14] and task.token_slots(batch) == 2 * 11
    plain = pad_batch([e for e in examples if packing.scores_something(e)], 0)
    assert int(task.count(plain)[1]) == 14 and task.token_slots(plain) == 3 * 6


# -- attention stays inside each example ----------------------------------------------------------------------

def _logits(model, batch: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}, **kwargs).logits


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
def test_an_example_packed_behind_another_has_its_logits_alone(tiny_llama, attn, lora):
    model = _model(tiny_llama, attn, lora).eval()
    vocab = model.config.vocab_size
    rng = random.Random(1)
    a, b, c = (_example(rng, n, vocab) for n in (7, 6, 5))
    rows, _ = packing.pack_examples([a, b, c], 13)  # [a, b] and [c], the second row padded
    assert rows[0]["position_ids"][7] == 0 and len(rows) == 2
    alone = _logits(model, {"input_ids": torch.tensor([b["input_ids"]])})[0]
    packed = _logits(model, packing.packed_batch(rows, 0), **packing.PACKED_FORWARD_KWARGS)
    torch.testing.assert_close(packed[0, 7:13], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1, :5], _logits(model, {"input_ids": torch.tensor([c["input_ids"]])})[0],
                               atol=1e-5, rtol=1e-4)
    # other tokens in front of b: b's logits do not move
    a2 = {**a, "input_ids": [(t + 5) % vocab for t in a["input_ids"]]}
    rows2, _ = packing.pack_examples([a2, b, c], 13)
    changed = _logits(model, packing.packed_batch(rows2, 0), **packing.PACKED_FORWARD_KWARGS)
    assert not torch.allclose(changed[0, :7], packed[0, :7])
    torch.testing.assert_close(changed[0, 7:13], packed[0, 7:13], atol=1e-6, rtol=1e-5)
    # the two ways it silently falls back to causal attention over the whole row: a cache (use_cache, the
    # config's default) or an attention mask; b then sees a, and its logits differ from its logits alone
    for fallback in ({}, {"attention_mask": torch.ones(2, 13, dtype=torch.long), "use_cache": False}):
        mixed = _logits(model, packing.packed_batch(rows, 0), **fallback)
        assert not torch.allclose(mixed[0, 7:13], alone, atol=1e-3)


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
def test_the_probe_before_training_catches_a_fallback(tiny_llama, attn):
    model = _model(tiny_llama, attn, lora=True)
    packing.check_block_causal(model, {"num_items_in_batch": 3.0, **packing.PACKED_FORWARD_KWARGS})
    assert model.training  # the probe runs in eval mode and gives the mode back
    with pytest.raises(ModelError, match="data.packing"):
        packing.check_block_causal(model, {})  # with a cache: full causal attention across the row


def test_prompt_learning_cannot_pack(tiny_llama):
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(_model(tiny_llama), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ModelError, match="prompt-learning"):
        packing.check_block_causal(model, packing.PACKED_FORWARD_KWARGS)


# -- loss and gradients -----------------------------------------------------------------------------------------

def _loss_and_grads(model, task, cfg, examples: list[dict], collate) -> tuple[float, dict]:
    hooks = task.loss_hooks(cfg, model, examples, batches_per_epoch=2)  # as if the epoch held two such batches
    batch = collate(examples)
    model.zero_grad(set_to_none=True)
    loss = hooks.loss_fn(model, batch) if hooks.loss_fn is not None else model(**batch, **hooks.forward_kwargs).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_packed_step_has_the_loss_and_gradients_of_the_unpacked_one(tiny_llama):
    """Through the model's own loss and the scored-logits one, under both train.loss_tokens rules."""
    from transformers import AutoTokenizer

    from slimtune.tasks import get_task

    task = get_task("causal-lm")
    collate = task.collate(AutoTokenizer.from_pretrained(tiny_llama))
    model = _model(tiny_llama, lora=True)
    rng = random.Random(2)
    examples = [_example(rng, n, model.config.vocab_size, prompt=p) for n, p in ((14, 5), (9, 3), (8, 2), (6, 1))]
    rows, stats = packing.pack_examples(examples, 24)
    assert stats["rows"] == 2  # [14, 9] and [8, 6]
    losses = set()
    for scored_only in (True, False):
        for loss_tokens in ("epoch", "batch"):
            cfg = load_config({"task": "causal-lm", "model": {"name": tiny_llama, "max_length": 24},
                               "data": {"train": "x.jsonl", "packing": True},
                               "train": {"scored_logits_only": scored_only, "loss_tokens": loss_tokens}})
            loss, grads = _loss_and_grads(model, task, cfg, examples, collate)
            packed_loss, packed_grads = _loss_and_grads(model, task, cfg, rows, collate)
            assert packed_loss == pytest.approx(loss, rel=1e-5)
            for name in grads:
                torch.testing.assert_close(packed_grads[name], grads[name], atol=1e-6, rtol=1e-4)
            losses.add(round(loss, 4))
    assert len(losses) == 2  # 'epoch' divides by half the scored tokens, 'batch' by all of them


# -- a run: resume, accounting, truncation vs split ------------------------------------------------------------

class _Interrupt:
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, loop):
        if loop.state.step == self.at:
            raise KeyboardInterrupt


def _run_cfg(model: str, tmp_path, name: str, packing_mode=True, **train) -> dict:
    data = tmp_path / "chat.jsonl"
    if not data.exists():  # responses of 1 to 4 sentences: unpacked batches hold padding
        rows = chat_rows(32, 3)
        for i, row in enumerate(rows):
            row["messages"][1]["content"] = " ".join([row["messages"][1]["content"]] * (1 + i % 4))
        write_jsonl(data, rows)
    return {"task": "causal-lm", "model": {"name": model, "max_length": 48},
            "data": {"train": str(data), "packing": packing_mode},
            "method": {"name": "lora", "r": 4, "dropout": 0.1},
            "train": {"epochs": 2, "batch_size": 3, "grad_accum": 2, "lr": 5e-3, "precision": "fp32",
                      "log_every": 1, **train},
            "eval": {"every_steps": 2}, "output": {"dir": str(tmp_path / "runs"), "name": name},
            "track": {"energy": False, "index": False}}


def test_a_packed_run_resumes_exactly_and_counts_real_tokens(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    full = slimtune.run(_run_cfg(tiny_llama, tmp_path, "full"))
    report = json.loads((full.run_dir / "data_report.json").read_text())
    stats = report["stats"]["train_packing"]
    assert stats["rows"] < stats["pieces"] <= stats["examples"]
    assert report["sizes"]["train"] == stats["rows"]  # the training split is the rows
    s = full.summary
    assert s["samples_seen"] == 2 * stats["pieces"]  # examples, not rows: two epochs
    assert s["tokens_seen"] == pytest.approx(2 * stats["fill"] * 48 * stats["rows"])
    assert 0.9 < s["real_token_share"] <= 1.0
    with pytest.raises(KeyboardInterrupt):
        slimtune.run(_run_cfg(tiny_llama, tmp_path, "cut"), callbacks=[_Interrupt(3)])
    resumed = slimtune.run(None, resume=tmp_path / "runs" / "cut")
    r = resumed.summary
    assert (r["steps"], r["best_step"]) == (s["steps"], s["best_step"]) and s["steps"] >= 4
    assert r["final"] == pytest.approx(s["final"], abs=1e-6)
    assert (r["samples_seen"], r["tokens_seen"], r["real_token_share"]) == \
        (s["samples_seen"], s["tokens_seen"], s["real_token_share"])
    wa, wb = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (full.run_dir,
                                                                                         resumed.run_dir))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def _featurize(tiny_llama: str, tmp_path, mode, max_length: int = 24):
    from transformers import AutoTokenizer

    from slimtune.tasks import get_task

    rows = chat_rows(6, 0)
    rows[2]["messages"][1]["content"] = " ".join(["cats are great"] * 12)  # ~36 response tokens: over 24
    train = write_jsonl(tmp_path / f"long-{mode}.jsonl", rows)
    evals = write_jsonl(tmp_path / f"eval-{mode}.jsonl", rows[:3])
    cfg = load_config({"task": "causal-lm", "model": {"name": tiny_llama, "max_length": max_length},
                       "data": {"train": str(train), "eval": str(evals), "packing": mode}})
    task = get_task("causal-lm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    splits = task.load_data(cfg)
    features = task.featurize(cfg, tokenizer, splits)
    whole, _ = task.encode_chat(tokenizer, rows[2]["messages"], 10_000, False)
    return features, splits.report, whole["input_ids"]


def _pieces(row: dict) -> list[list[int]]:
    """The examples of a packed row, cut where the position restarts."""
    out: list[list[int]] = []
    for tok, pos in zip(row["input_ids"], row["position_ids"]):
        if pos == 0:
            out.append([])
        out[-1].append(tok)
    return out


def test_a_long_example_is_truncated_and_split_only_with_split(tiny_llama, tmp_path):
    n = 24
    features, report, long_ids = _featurize(tiny_llama, tmp_path, True, n)
    assert len(long_ids) > n + 4
    pieces = [p for row in features["train"] for p in _pieces(row)]
    assert long_ids[:n] in pieces and not any(p == long_ids[n:2 * n] for p in pieces)
    assert all(len(row["input_ids"]) <= n for row in features["train"])
    assert report.stats["train_truncated"] == 1
    unpacked_eval = features["eval"]

    features, report, _ = _featurize(tiny_llama, tmp_path, "split", n)
    pieces = [p for row in features["train"] for p in _pieces(row)]
    chunks = [long_ids[i:i + n] for i in range(0, len(long_ids), n)]
    assert len(chunks) >= 2 and all(c in pieces for c in chunks if len(c) > 1)  # a 1-token chunk scores nothing
    assert all(len(row["input_ids"]) <= n for row in features["train"])
    assert report.stats["train_split"] == 1 and any("split into chunks" in w for w in report.warnings)
    # evaluation examples are neither packed nor split: as without packing
    assert features["eval"] == unpacked_eval
    assert all("position_ids" not in e and len(e["input_ids"]) <= n for e in features["eval"])
    plain, _, _ = _featurize(tiny_llama, tmp_path, False, n)
    assert plain["eval"] == unpacked_eval and "position_ids" not in plain["train"][0]


# -- config and state -------------------------------------------------------------------------------------------

def test_packing_is_for_the_tasks_that_can_pack():
    base = {"model": {"name": "m"}, "data": {"train": "x.csv"}}
    with pytest.raises(ConfigError) as err:
        load_config({**base, "task": "text-classification", "data": {"train": "x.csv", "packing": True}})
    assert "data.packing" in str(err.value) and "causal-lm" in str(err.value)
    with pytest.raises(ConfigError, match="data.packing"):
        load_config({**base, "task": "causal-lm", "data": {"train": "x.csv", "packing": "pack"}})
    with pytest.raises(ConfigError, match="seq_len_schedule"):
        load_config({**base, "task": "causal-lm", "data": {"train": "x.csv", "packing": "split"},
                     "train": {"seq_len_schedule": [[0.0, 16]]}})
    assert load_config({**base, "task": "causal-lm"}).data.packing is False  # not the default
    assert load_config({**base, "task": "causal-lm"}, ["data.packing=split"]).data.packing == "split"


def test_a_state_saved_before_slots_were_counted_reports_no_share():
    old = TrainState(step=3, tokens=120).to_json()
    del old["token_slots"]
    assert TrainState.from_json(old).token_slots is None
    assert TrainState.from_json(TrainState(step=3, tokens=120, token_slots=130).to_json()).token_slots == 130
