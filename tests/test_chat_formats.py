"""The causal-LM record formats users bring (OpenAI messages, ShareGPT, Alpaca, prompt / completion, plain text)
from JSONL, JSON, Parquet and CSV, and the guards against silent SFT failures: records with no scored token left,
the end-of-turn token scored, a pad token distinct from EOS, and `slimtune validate`'s rendered example."""
from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

import slimtune
from slimtune.cli import app
from slimtune.config import load_config
from slimtune.data.readers import DataError
from slimtune.models.sources import distinct_pad
from slimtune.tasks import get_task
from slimtune.tasks.chat_encoding import encode_chat, marked_text

from conftest import _tokenizer, write_jsonl

LM = get_task("causal-lm")
runner = CliRunner(env={"COLUMNS": "1000"})

CONV = [("system", "you are user"), ("user", "tell me about cats"), ("assistant", "cats are great"),
        ("user", "and dogs"), ("assistant", "dogs are happy")]


def openai_rows(n: int = 12) -> list[dict]:
    return [{"messages": [{"role": r, "content": c} for r, c in CONV]} for _ in range(n)]


def sharegpt_rows(n: int = 12) -> list[dict]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"conversations": [{"from": names[r], "value": c} for r, c in CONV]} for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return _tokenizer("llama")


def features(tmp_path, train: str, tok, **data) -> tuple[dict, dict]:
    cfg = load_config({"task": "causal-lm", "model": {"name": "unused", "max_length": data.pop("max_length", 64)},
                       "data": {"train": train, "eval": train, **data}, "output": {"dir": str(tmp_path / "runs")}})
    splits = LM.load_data(cfg)
    return LM.featurize(cfg, tok, splits), {"meta": splits.meta, "report": splits.report}


def scored_text(tok, ex: dict) -> str:
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])


def test_openai_messages_score_every_assistant_turn_with_its_end_of_turn(tmp_path, tok):
    feats, info = features(tmp_path, str(write_jsonl(tmp_path / "m.jsonl", openai_rows())), tok)
    assert info["meta"]["format"] == "chat"
    ex = feats["train"][0]
    # both replies and their <|im_end|> are scored (the newline after it too: the template renders it)
    assert scored_text(tok, ex).split() == "cats are great <|im_end|> \n dogs are happy <|im_end|> \n".split()
    assert "you are user" in tok.decode(ex["input_ids"])  # the system prompt is kept as the template renders it


def test_sharegpt_alpaca_and_prompt_completion_give_the_same_examples(tmp_path, tok):
    openai, _ = features(tmp_path, str(write_jsonl(tmp_path / "o.jsonl", openai_rows())), tok)
    share, info = features(tmp_path, str(write_jsonl(tmp_path / "s.jsonl", sharegpt_rows())), tok)
    assert info["meta"]["format"] == "chat" and share["train"] == openai["train"]
    # ShareGPT rows in a Parquet file, named explicitly
    pq = tmp_path / "s.parquet"
    slimtune_ds = __import__("datasets").Dataset.from_list(sharegpt_rows())
    slimtune_ds.to_parquet(str(pq))
    share_pq, info = features(tmp_path, str(pq), tok, format="sharegpt")
    assert info["meta"]["format"] == "sharegpt" and share_pq["train"] == openai["train"]

    one_turn = [{"messages": [{"role": "system", "content": "you are user"},
                              {"role": "user", "content": "tell me about cats\n\nand dogs"},
                              {"role": "assistant", "content": "cats are great"}]}] * 12
    ref, _ = features(tmp_path, str(write_jsonl(tmp_path / "r.jsonl", one_turn)), tok)
    alpaca = tmp_path / "a.json"  # a JSON array, Alpaca's own layout
    alpaca.write_text(json.dumps([{"instruction": "tell me about cats", "input": "and dogs",
                                   "output": "cats are great", "system": "you are user"}] * 12))
    alp, info = features(tmp_path, str(alpaca), tok)
    assert info["meta"]["format"] == "alpaca" and alp["train"] == ref["train"]

    csv = tmp_path / "pc.csv"  # prompt / completion pairs in a CSV
    csv.write_text("system,prompt,completion\n"
                   + "you are user,\"tell me about cats\n\nand dogs\",cats are great\n" * 12)
    pc, info = features(tmp_path, str(csv), tok)
    assert info["meta"]["format"] == "instruction" and pc["train"] == ref["train"]


def test_messages_as_json_strings_in_csv_and_conversational_prompt_completion(tmp_path, tok):
    openai, _ = features(tmp_path, str(write_jsonl(tmp_path / "o.jsonl", openai_rows())), tok)
    csv = tmp_path / "m.csv"
    import csv as csvlib

    with csv.open("w", newline="", encoding="utf-8") as f:
        w = csvlib.writer(f)
        w.writerow(["messages"])
        for r in openai_rows():
            w.writerow([json.dumps(r["messages"])])
    got, _ = features(tmp_path, str(csv), tok)
    assert got["train"] == openai["train"]
    msgs = openai_rows(1)[0]["messages"]
    rows = [{"prompt": msgs[:4], "completion": msgs[4:]}] * 12  # TRL's conversational prompt / completion
    got, _ = features(tmp_path, str(write_jsonl(tmp_path / "pc.jsonl", rows)), tok)
    # the same tokens as the whole conversation, but only the completion's turn is scored (TRL's semantics)
    assert got["train"][0]["input_ids"] == openai["train"][0]["input_ids"]
    assert scored_text(tok, got["train"][0]).split() == "dogs are happy <|im_end|> \n".split()
    weighted = openai_rows()
    for r in weighted:
        r["messages"][2]["weight"] = 0  # OpenAI's fine-tuning format: this reply is context
    got, _ = features(tmp_path, str(write_jsonl(tmp_path / "w.jsonl", weighted)), tok)
    assert scored_text(tok, got["train"][0]).split() == "dogs are happy <|im_end|> \n".split()


@pytest.mark.parametrize("rows, wanted", [
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}],
     r"m\.jsonl: record 1, column 'messages', message 2: unknown role 'robot' \(keys \['content', 'role'\]\); "
     r"accepted: system, user, assistant, tool"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}],
     r"record 1, column 'conversations', message 2: unknown role 'bot' .*accepted: human, user, gpt"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"speaker": "a", "text": "x"}]}],
     # the first message set the record's shape (OpenAI)
     r"record 1, column 'messages', message 2: expected \{role, content\}, got keys \['speaker', 'text'\]"),
    ([{"messages": [{"speaker": "a", "text": "x"}]}],
     r"record 1, column 'messages', message 1: expected \{role, content\} \(OpenAI\) or \{from, value\} "
     r"\(ShareGPT\), got keys \['speaker', 'text'\]"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"record 1, column 'messages': no 'assistant' message"),
    ([{"question": "hi", "answer": "x"}],
     r"m\.jsonl: cannot tell the record format from the columns question, answer; expected 'messages' or "
     r"'conversations' .*'instruction' \+ 'output' \(alpaca\)"),
])
def test_record_errors_name_file_record_keys_and_what_is_accepted(tmp_path, tok, rows, wanted):
    good = openai_rows(3) if "messages" in rows[0] else sharegpt_rows(3) if "conversations" in rows[0] else []
    path = write_jsonl(tmp_path / "m.jsonl", rows + good)
    with pytest.raises(DataError, match=wanted):
        features(tmp_path, str(path), tok)


def test_records_without_a_scored_token_are_named_and_dropped_and_none_left_is_an_error(tmp_path, tok):
    long_prompt = " ".join(["tell me about cats"] * 20)  # 80 words: past max_length 32
    rows = openai_rows(10)
    for i in (2, 5):
        rows[i] = {"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "yes"}]}
    feats, info = features(tmp_path, str(write_jsonl(tmp_path / "m.jsonl", rows)), tok, max_length=32)
    assert len(feats["train"]) == 8
    assert info["report"].stats["train_dropped_records"] == {"count": 2, "records": [3, 6], "numbered_in": "file"}
    assert any("record(s) 3, 6" in w and "model.max_length=32" in w for w in info["report"].warnings)
    bad = write_jsonl(tmp_path / "all.jsonl", [rows[2]] * 6)
    with pytest.raises(DataError, match=r"all\.jsonl: no train record keeps a scored \(response\) token within "
                                        r"model.max_length=32.*data.train_on_prompt: true"):
        features(tmp_path, str(bad), tok, max_length=32)


def test_a_template_without_end_of_turn_gets_eos_appended_and_scored(tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                           "{% if add_generation_prompt %}assistant {% endif %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "and"}, {"role": "assistant", "content": "no"}]
    ex, _ = encode_chat(plain, msgs, 64, False)
    eos = plain.eos_token_id
    assert [plain.convert_ids_to_tokens(t) for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100] == \
        ["yes", "<|im_end|>", "no", "<|im_end|>"]
    assert ex["input_ids"].count(eos) == 2
    # ChatML renders its own end-of-turn: nothing is added
    ex, _ = encode_chat(tok, msgs, 64, False)
    assert ex["input_ids"] == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert marked_text(tok, ex).replace(" ", "").endswith("[[yes<|im_end|>]][UNK]and<|im_end|>[UNK][[no<|im_end|>]]")


def test_pad_is_distinct_from_eos(tok):
    import copy

    same = copy.deepcopy(tok)
    same.pad_token = same.eos_token
    assert distinct_pad(same) == "[PAD]" and same.pad_token_id != same.eos_token_id
    none = copy.deepcopy(tok)
    none.pad_token = None
    assert distinct_pad(none) == "[PAD]"
    own = copy.deepcopy(tok)
    assert distinct_pad(own) is None and own.pad_token == "[PAD]"  # its own distinct pad stays


def test_validate_prints_the_rendered_example_and_lengths(tiny_llama, tmp_path):
    rows = openai_rows(20)
    rows[3] = {"messages": [{"role": "user", "content": " ".join(["tell me about cats"] * 20)},
                            {"role": "assistant", "content": "yes [red]x[/red]"}]}
    cfg = {"task": "causal-lm", "model": {"name": tiny_llama, "max_length": 48},
           "data": {"train": str(write_jsonl(tmp_path / "m.jsonl", rows))}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "training record 1 as the model reads it (chat format; scored tokens between [[ and ]])" in out
    # the test tokenizer is word-level: the template's "<|im_start|>user" words decode as [UNK]
    assert "[UNK][[cats are great <|im_end|>]][UNK] and dogs <|im_end|> [UNK][[dogs are happy <|im_end|>]]" in out
    assert "token lengths (first 18 train records): min 25, median 25, p90 25, max 86 tokens; 1 of 18 (5.6%) " \
           "longer than model.max_length=48 (truncated)" in out
    # record 4's reply lies past max_length; the "[red]" of its text is printed as text, not taken as markup
    assert "scored tokens per record within model.max_length: median 8, min 0; 1 record(s) keep none and will " \
           "be dropped" in out


def learnable_llama(path) -> str:
    """The tiny Llama with a wider initialisation: with the conftest's 0.02 the frozen final norm and embeddings
    cap the logits near uniform (loss ~3.6 whatever LoRA does), so no reply could be learned well enough."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = _tokenizer("llama")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=True, initializer_range=0.5)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_a_short_fine_tune_learns_to_stop(tmp_path):
    model = learnable_llama(tmp_path / "model")
    rows = [{"messages": [{"role": "user", "content": "tell me about cats"},
                          {"role": "assistant", "content": "cats are great"}]}] * 48
    res = slimtune.run({"task": "causal-lm", "model": {"name": model, "max_length": 32},
                        "data": {"train": str(write_jsonl(tmp_path / "c.jsonl", rows))},
                        "method": {"name": "lora", "r": 8, "alpha": 16},
                        "train": {"max_steps": 30, "batch_size": 8, "lr": 1e-2, "precision": "fp32"},
                        "eval": {"every_steps": 30}, "output": {"dir": str(tmp_path / "runs"), "name": "stop"}})
    loaded = slimtune.load_run(res.run_dir)
    out = loaded.task.predict(loaded.model, loaded.tokenizer, ["tell me about cats"], loaded.meta, max_new_tokens=12)
    # the reply, then <|im_end|>: it stopped, 8 tokens before max_new_tokens
    assert out[0]["generated"].split() == ["cats", "are", "great"]
    assert out[0]["finish_reason"] == "stop" and out[0]["new_tokens"] == 4
    with loaded.model.disable_adapter():  # the base model neither says it nor stops
        base = loaded.task.predict(loaded.model, loaded.tokenizer, ["tell me about cats"], loaded.meta,
                                   max_new_tokens=12)[0]
    assert base["generated"].split() != ["cats", "are", "great"]
