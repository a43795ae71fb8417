"""Generation-based evaluation (eval.generate): batched left-padded generation, the scores against hand-known
values, generations.jsonl and the report's samples table, a generation metric as eval.monitor, the end-of-run
mode with the best checkpoint, and `slimtune predict` with a system prompt and multi-turn input."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import slimtune
from slimtune.cli import app
from slimtune.config import ConfigError, load_config
from slimtune.report.html import run_page
from slimtune.tasks.chat_encoding import end_of_turn_ids
from slimtune.tasks.generation import generate_batch, normalize_answer, score
from slimtune.track.runinfo import read_run

from conftest import chat_rows, write_jsonl

runner = CliRunner(env={"COLUMNS": "1000"})


def test_scores_against_hand_known_values():
    total, per = score(["The cat!", "a b c", "dogs"], ["cat", "a b d", "dogs"], ["exact_match", "rouge_l"])
    assert normalize_answer("  The  Cat, an  apple! ") == "cat apple"
    assert [p["exact_match"] for p in per] == [1.0, 0.0, 1.0]
    assert total["exact_match"] == pytest.approx(2 / 3)
    # ROUGE-L of "a b c" against "a b d": LCS 2 of 3 tokens each way, F1 2/3; "The cat!" vs "cat": P 1/2, R 1
    assert [p["rouge_l"] for p in per] == pytest.approx([2 / 3, 2 / 3, 1.0], abs=1e-4)
    same, _ = score(["the cat sat on the mat"], ["the cat sat on the mat"], ["chrf", "bleu"])
    assert same == {"chrf": pytest.approx(100.0), "bleu": pytest.approx(100.0)}
    apart, per = score(["xyz"], ["the cat sat on the mat"], ["chrf", "bleu"])
    assert apart["bleu"] == 0.0 and apart["chrf"] < 5 and set(per[0]) == {"chrf", "bleu"}


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True, add_generation_prompt=True,
                                       return_dict=False)
               for t in ("tell me about cats", "hello", "what time is it today please tell me")]
    end = end_of_turn_ids(tok)
    batched = generate_batch(model, tok, prompts, 6, end, batch_size=3)
    alone = [generate_batch(model, tok, [p], 6, end, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert all(len(ids) + stopped <= 6 for ids, stopped in batched)
    # a reply cut at its end-of-turn token: with every token an end token, nothing is kept and it stopped
    assert generate_batch(model, tok, prompts[:1], 4, set(range(len(tok)))) == [([], True)]


def gen_cfg(tiny_llama, tmp_path, name: str, **generate) -> dict:
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(96))
    return {"task": "causal-lm", "model": {"name": tiny_llama, "max_length": 48}, "data": {"train": str(data)},
            "method": {"name": "lora", "r": 8, "alpha": 16},
            "train": {"max_steps": 24, "batch_size": 8, "lr": 3e-2, "precision": "fp32"},
            "eval": {"every_steps": 8, "generate": {"examples": 6, "max_new_tokens": 5, **generate}},
            "output": {"dir": str(tmp_path / "runs"), "name": name}}


def test_generation_each_evaluation_as_the_monitor(tiny_llama, tmp_path):
    cfg = gen_cfg(tiny_llama, tmp_path, "every", every="eval", metrics=["chrf", "exact_match"])
    cfg["eval"]["monitor"] = "gen_chrf"
    res = slimtune.run(cfg)
    run = res.run_dir
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    evals = [r for r in evals if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [8, 16, 24]
    assert all({"eval_loss", "eval_gen_chrf", "eval_gen_exact_match"} <= set(r) for r in evals)
    best = max(evals, key=lambda r: r["eval_gen_chrf"])
    assert res.summary["best_step"] == best["step"] and res.summary["monitor"] == "gen_chrf"
    lines = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 18 and [ln["step"] for ln in lines[::6]] == [8, 16, 24]
    eval_refs = [r["messages"][1]["content"] for r in chat_rows(96)]
    for ln in lines:
        assert ln["reference"] in eval_refs and ln["prompt"].startswith("tell me about")
        assert set(ln["scores"]) == {"chrf", "exact_match"} and ln["finish_reason"] in ("stop", "length")
    last = [ln for ln in lines if ln["step"] == 24]
    assert sum(ln["scores"]["exact_match"] for ln in last) / 6 == pytest.approx(evals[-1]["eval_gen_exact_match"])
    html = run_page(read_run(run, records=True))
    assert "Generations" in html and f"step {best['step']}: replies generated" in html


def test_generation_at_the_end_with_the_best_checkpoint(tiny_llama, tmp_path):
    res = slimtune.run(gen_cfg(tiny_llama, tmp_path, "end", metrics=["exact_match", "rouge_l"]))
    summary, run = res.summary, res.run_dir
    assert {"loss", "gen_exact_match", "gen_rouge_l"} <= set(summary["best"])
    lines = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {ln["step"] for ln in lines} == {summary["best_step"]}
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "generate"] == [summary["best_step"]]
    assert not any("eval_gen_rouge_l" in r for r in recs if r["type"] == "eval")


def test_eval_generates_for_another_file_as_the_run_did(tiny_llama, tmp_path):
    """`slimtune eval` on a chat run: with the run's eval.generate it generates for the file's first records and
    reproduces the replies and scores the run wrote with its best checkpoint (the same records, the saved
    adapter); --generate N asks for N, 0 for none, --generations keeps the replies."""
    rows = chat_rows(96)
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", rows[:80])),
             "eval": str(write_jsonl(tmp_path / "eval.jsonl", rows[80:]))}
    cfg = gen_cfg(tiny_llama, tmp_path, "eval-cli", metrics=["exact_match", "rouge_l"])
    cfg["data"] = files
    res = slimtune.run(cfg)
    written = [json.loads(x) for x in (res.run_dir / "generations.jsonl").read_text().splitlines()]
    out = tmp_path / "replies.jsonl"
    cli = runner.invoke(app, ["eval", str(res.run_dir), "--data", files["eval"], "--generations", str(out)])
    assert cli.exit_code == 0, cli.output
    got = json.loads(cli.stdout)
    assert got["gen_rouge_l"] == pytest.approx(res.summary["best"]["gen_rouge_l"], abs=1e-6)
    assert got["gen_exact_match"] == pytest.approx(res.summary["best"]["gen_exact_match"], abs=1e-6)
    replies = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["output"] for r in replies] == [w["output"] for w in written]
    assert [r["reference"] for r in replies] == [r["messages"][1]["content"] for r in rows[80:86]]
    fewer = slimtune.evaluate(res.run_dir, files["eval"], generate=2, generations=out)
    assert len(out.read_text().splitlines()) == 2 and "gen_rouge_l" in fewer
    assert not any(k.startswith("gen_") for k in slimtune.evaluate(res.run_dir, files["eval"], generate=0))


def test_generation_config_errors(tiny_llama, tmp_path):
    cfg = gen_cfg(tiny_llama, tmp_path, "x")
    cfg["eval"]["monitor"] = "gen_chrf"  # computed only at the end by default
    with pytest.raises(ConfigError, match="gen_chrf.*computed only at the end.*every: eval"):
        load_config(cfg)
    cfg["eval"]["generate"]["every"] = "eval"
    cfg["eval"]["monitor"] = "gen_bleu"  # not among the generation metrics asked for
    with pytest.raises(ConfigError, match="eval.monitor: 'gen_bleu' is not a metric.*accepted: loss, perplexity, "
                                          "gen_chrf, gen_rouge_l, gen_exact_match"):
        load_config(cfg)
    cls = {"task": "text-classification", "model": {"name": "m"}, "data": {"train": "t.csv"},
           "eval": {"generate": {}}}
    with pytest.raises(ConfigError, match="eval.generate: task 'text-classification' does not generate text"):
        load_config(cls)
    from slimtune.finished import _generate_config
    from slimtune.tasks import get_task

    cls.pop("eval")
    with pytest.raises(ConfigError, match="--generate: a text-classification run does not generate text"):
        _generate_config(load_config(cls), get_task("text-classification"), 2)
    text = tmp_path / "corpus.txt"
    text.write_text("the movie was good and the story was nice\n\n" * 200)
    cfg = gen_cfg(tiny_llama, tmp_path, "txt")
    cfg["data"]["train"] = str(text)
    with pytest.raises(slimtune.errors.DataError, match="eval.generate needs chat or instruction records"):
        slimtune.run(cfg)


def test_predict_with_system_prompt_and_conversations(tiny_llama, tmp_path, monkeypatch):
    cfg = gen_cfg(tiny_llama, tmp_path, "p")
    del cfg["eval"]["generate"]
    run = slimtune.run(cfg).run_dir
    conv = tmp_path / "conv.jsonl"
    write_jsonl(conv, [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"},
                                     {"role": "user", "content": "tell me about dogs"}]},
                       [{"role": "user", "content": "tell me about cats"}]])
    res = runner.invoke(app, ["predict", str(run), "--text", "tell me about time", "--system", "you are user",
                              "--messages", str(conv), "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert [r["prompt"] for r in rows] == ["tell me about time", "tell me about dogs", "tell me about cats"]
    assert all(r["finish_reason"] in ("stop", "length") and 1 <= r["new_tokens"] <= 4 for r in rows)
    # the system prompt and the earlier turns are in the prompts the model continues
    from slimtune.api import load_run
    from slimtune.tasks import causal_lm

    loaded, seen = load_run(run), []
    real = causal_lm.generate_batch
    monkeypatch.setattr(causal_lm, "generate_batch", lambda m, t, prompts, *a: seen.extend(prompts) or real(
        m, t, prompts, *a))
    loaded.task.predict(loaded.model, loaded.tokenizer, ["tell me about time"], loaded.meta, max_new_tokens=4,
                        system="you are user", conversations=[json.loads(conv.read_text().splitlines()[0])["messages"]])
    texts = [loaded.tokenizer.decode(ids) for ids in seen]
    # (the test tokenizer is word-level: "<|im_start|>user" decodes as [UNK])
    assert texts[0] == "[UNK] you are user <|im_end|> [UNK] tell me about time <|im_end|> [UNK]"
    assert texts[1] == "[UNK] you are user <|im_end|> [UNK] hello <|im_end|> [UNK] yes <|im_end|> [UNK] tell me " \
                       "about dogs <|im_end|> [UNK]"
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]])
    res = runner.invoke(app, ["predict", str(run), "--messages", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl: record 1: the last message is 'assistant'" in res.output
