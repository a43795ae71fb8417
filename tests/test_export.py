"""slimtune export: merged weights, GGUF (read back through transformers' GGUF loader), Ollama Modelfile.

A tiny llama (4 query heads, 2 key/value heads, so the q/k rotary permutation differs between q and k) with a
byte-level BPE tokenizer trained here, fine-tuned for a few LoRA steps on chat records."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import slimtune
from slimtune.api import export
from slimtune.errors import ModelError, OutputExists, RunNotFound, UsageError

from conftest import CHATML, chat_rows, require_or_skip, sentiment_rows, write_csv, write_jsonl

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
PROMPT = "<|im_start|>user\ntell me about cats<|im_end|>\n<|im_start|>assistant\n"
# the Go template the Modelfile carries for a ChatML model (written out by hand)
CHATML_GO = ('{{- range $i, $m := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n'
             '<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n'
             '{{ if and $last (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ end }}\n{{- end }}')


def _need_gguf():
    require_or_skip(importlib.util.find_spec("gguf") is not None, "gguf", "pip install 'slimtune[gguf]'")


def bpe_tokenizer():
    """A GPT-2 style byte-level BPE tokenizer (ByteLevel pre-tokenizer, GPT-2's regex) on the chat words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"{r['messages'][0]['content']} {r['messages'][1]['content']}" for r in chat_rows(60)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus + ["user assistant system\n"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<pad>", model_max_length=128)
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bpe-llama")
    tok = bpe_tokenizer()
    # initializer_range 0.1: logits spread well beyond the rounding errors compared below
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def lm_run(bpe_llama, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export-run")
    train = write_jsonl(tmp / "chat.jsonl", chat_rows(48))
    res = slimtune.run({
        "task": "causal-lm", "model": {"name": bpe_llama, "max_length": 48}, "data": {"train": str(train)},
        "method": {"name": "lora", "r": 4, "alpha": 16},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 2e-2, "precision": "fp32"},
        "eval": {"every_steps": 6}, "output": {"dir": str(tmp / "runs"), "name": "chat-lm"}})
    return res.run_dir


@pytest.fixture(scope="module")
def reference(lm_run) -> dict:
    """The run's peft model (base + adapter, unmerged): its logits on the prompt, and the base's alone."""
    loaded = slimtune.load_run(lm_run, device="cpu")
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tuned = loaded.model(input_ids=ids).logits
        with loaded.model.disable_adapter():
            base = loaded.model(input_ids=ids).logits
    return {"ids": ids, "logits": tuned, "base": base, "tokenizer": loaded.tokenizer}


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_export_matches_the_adapter_model(lm_run, reference, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = reference["logits"]
    # the adapter moved the model: equality below is not the base compared with itself
    assert (ref - reference["base"]).abs().max() > 0.05
    res = export(lm_run, tmp_path / "fp32", format="merged", dtype="fp32")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(res.files)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    # folding B @ A * scale into W in float32 only reorders the sums
    assert (_logits(merged, reference["ids"]) - ref).abs().max() < 1e-4
    assert AutoTokenizer.from_pretrained(tmp_path / "fp32").chat_template == CHATML

    export(lm_run, tmp_path / "bf16", format="merged")  # bf16 is the default dtype
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(OutputExists):
        export(lm_run, tmp_path / "bf16", format="merged")


def _gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    fields["tensor types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields


@pytest.mark.parametrize("quant, tol", [
    # F16 keeps ~11 significant bits of each weight: the logits move by ~1e-3 of their spread
    ("f16", 5e-3),
    # Q8_0 rounds each weight to one of 255 steps of its 32-value block's largest magnitude (~0.4% of it), on
    # every matrix, embeddings included: a few percent of the logits' spread, measured ~0.02 here
    ("q8_0", 0.08),
])
def test_gguf_round_trip_through_transformers(lm_run, reference, tmp_path, quant, tol):
    _need_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = export(lm_run, tmp_path / "g", format="gguf", quant=quant)
    assert res.files == ("model.gguf",)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model.gguf", dtype=torch.float32)
    ref = reference["logits"]
    diff = (_logits(reloaded, reference["ids"]) - ref).abs().max().item()
    assert diff < tol * ref.std().item(), (diff, ref.std().item())

    tok = reference["tokenizer"]
    fields = _gguf_fields(tmp_path / "g" / "model.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "chat-lm"
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.context_length"]) \
        == (2, 64, 128)
    assert fields["llama.feed_forward_length"] == 128 and fields["llama.rope.dimension_count"] == 16
    assert fields["general.file_type"] == (7 if quant == "q8_0" else 1)  # llama.cpp's MOSTLY_Q8_0 / MOSTLY_F16
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == len(tok) and fields["tokenizer.ggml.merges"]
    assert fields["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.padding_token_id"] == tok.convert_tokens_to_ids("<pad>")
    assert fields["tokenizer.chat_template"] == CHATML
    types = fields["tensor types"]
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.1.attn_k.weight"] == types["token_embd.weight"] == ("Q8_0" if quant == "q8_0" else "F16")
    # the vocabulary, merges and special tokens rebuild the same tokenizer
    gguf_tok = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="model.gguf")
    text = PROMPT + "dogs are happy, it is today 123<|im_end|>"
    assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"]


def test_ollama_modelfile_holds_template_and_stops(lm_run, tmp_path):
    _need_gguf()
    from slimtune.cli import app

    out = tmp_path / "ollama"
    res = CliRunner().invoke(app, ["export", str(lm_run), str(out), "--format", "ollama", "--quant", "q8_0",
                                   "--name", "Chat LM"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    text = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in text
    assert f'TEMPLATE """{CHATML_GO}"""\n' in text
    assert [line for line in text.splitlines() if line.startswith("PARAMETER")] == ['PARAMETER stop "<|im_end|>"']
    assert f"ollama create chat-lm -f {out / 'Modelfile'}" in res.output


def test_modelfile_templates_by_family():
    from slimtune.export.ollama import modelfile

    llama3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}")
    text, warning = modelfile(llama3, "<|end_of_text|>", "runs/x")
    assert warning is None and "<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n{{ $m.Content }}<|eot_id|>" in text
    assert text.count("PARAMETER stop") == 2 and 'PARAMETER stop "<|eot_id|>"' in text
    gemma = "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    text, _ = modelfile(gemma, "<eos>", "runs/x")
    assert '{{ if eq $m.Role "assistant" }}model{{ else }}{{ $m.Role }}{{ end }}' in text
    assert 'PARAMETER stop "<end_of_turn>"\nPARAMETER stop "<eos>"\n' in text
    text, warning = modelfile("{% for m in messages %}### {{ m['content'] }}{% endfor %}", "</s>", "runs/x")
    assert "TEMPLATE" in warning and 'TEMPLATE """' not in text and 'PARAMETER stop "</s>"' in text


def test_pre_tokenizer_names():
    from slimtune.export.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}

    def seq(*steps):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(steps)}}

    warnings: list[str] = []
    split = {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated"}
    assert pre_tokenizer_name(seq(split, byte_level), warnings) == "llama-bpe"
    assert pre_tokenizer_name(seq({**split, "pattern": {"Regex": QWEN2_SPLIT}}, byte_level), warnings) == "qwen2"
    smollm = seq({"type": "Digits", "individual_digits": True}, {**byte_level, "use_regex": True})
    assert pre_tokenizer_name(smollm, warnings) == "smollm"
    assert warnings == []
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}, warnings) == "default"
    assert len(warnings) == 1 and "may differ" in warnings[0]


def _write_source_gguf(path: Path, tok, pre: str, n_tokens: int) -> None:
    """A GGUF holding only tokenizer metadata, as a base model read from a GGUF file would have."""
    import gguf

    from slimtune.export.gguf_vocab import bpe_tokens

    tokens, types = bpe_tokens(tok, len(tok))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens[:n_tokens])
    w.add_token_types(types[:n_tokens])
    w.add_add_bos_token(False)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ 'source template' }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tokenizer_metadata_copied_from_a_source_gguf(bpe_llama, tmp_path):
    _need_gguf()
    from transformers import AutoModelForCausalLM

    from slimtune.export.gguf import write_gguf

    model = AutoModelForCausalLM.from_pretrained(bpe_llama, dtype=torch.float32)
    tok = bpe_tokenizer()
    _write_source_gguf(tmp_path / "src.gguf", tok, "smollm", len(tok))
    meta = {"model_source": {"path": str(tmp_path), "gguf_file": "src.gguf", "origin": "gguf"}}
    assert write_gguf(model, tok, meta, tmp_path / "a.gguf", "f16", "a") == []
    fields = _gguf_fields(tmp_path / "a.gguf")
    # llama.cpp's own names from the source (not the 'gpt-2' the tokenizer.json would give), its flags too;
    # the chat template is the one the run trained with
    assert fields["tokenizer.ggml.pre"] == "smollm" and fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.eos_token_id"] == 2 and fields["tokenizer.chat_template"] == CHATML
    assert "tokenizer.ggml.merges" not in fields  # copied as the source has it, not rebuilt

    _write_source_gguf(tmp_path / "short.gguf", tok, "smollm", len(tok) - 1)  # does not fit the embedding
    meta["model_source"]["gguf_file"] = "short.gguf"
    warnings = write_gguf(model, tok, meta, tmp_path / "b.gguf", "f16", "b")
    assert len(warnings) == 1 and "does not match" in warnings[0]
    assert _gguf_fields(tmp_path / "b.gguf")["tokenizer.ggml.pre"] == "gpt-2"


def test_qwen2_gguf_round_trip(tmp_path):
    """qwen2: q/k/v biases, no rotary permutation (llama.cpp rotates it as transformers does), untied output."""
    _need_gguf()
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from slimtune.export.gguf import write_gguf

    torch.manual_seed(1)
    tok = bpe_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.1, tie_word_embeddings=False, eos_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # transformers initialises them to zero, which would not check their mapping
    write_gguf(model, tok, {}, tmp_path / "model.gguf", "f16", "qwen")
    fields = _gguf_fields(tmp_path / "model.gguf")
    assert fields["general.architecture"] == "qwen2" and "output.weight" in fields["tensor types"]
    assert fields["tensor types"]["blk.0.attn_q.bias"] == "F32"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    ref = _logits(model, ids)
    assert (_logits(reloaded, ids) - ref).abs().max() < 5e-3 * ref.std()


def test_export_errors(lm_run, tiny_llama, tmp_path):
    _need_gguf()
    import gguf
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from slimtune.export.gguf import gguf_architecture
    from slimtune.export.gguf_vocab import build_from_tokenizer

    with pytest.raises(UsageError, match="merged, gguf, ollama"):
        export(lm_run, tmp_path / "x", format="onnx")
    with pytest.raises(UsageError, match="f16, q8_0"):
        export(lm_run, tmp_path / "x", format="gguf", quant="q4_k")
    with pytest.raises(UsageError, match="bf16, fp16, fp32"):
        export(lm_run, tmp_path / "x", dtype="int8")
    with pytest.raises(UsageError, match="--dtype is for --format merged"):
        export(lm_run, tmp_path / "x", format="gguf", dtype="fp16")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(lm_run, unfinished, ignore=shutil.ignore_patterns("adapter"))
    with pytest.raises(RunNotFound, match="adapter"):
        export(unfinished, tmp_path / "x")
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    rows = write_csv(tmp_path / "cls.csv", sentiment_rows(8))
    (classifier / "config.yaml").write_text(yaml.safe_dump(
        {"task": "text-classification", "model": {"name": tiny_llama}, "data": {"train": str(rows)}}))
    with pytest.raises(UsageError, match="a text-classification run; export writes language models, "
                                         "i.e. runs of the task causal-lm"):
        export(classifier, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=16))
    with pytest.raises(ModelError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.*convert_hf_to_gguf"):
        gguf_architecture(gpt2)
    word_level = AutoTokenizer.from_pretrained(tiny_llama)
    writer = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "llama")
    with pytest.raises(ModelError, match="WordLevel model"):
        build_from_tokenizer(writer, word_level, len(word_level), [])

