"""Tiny random models and generated data, built in the test session: no downloads."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Checks that need a piece slimtune does not depend on (a browser, a PostgreSQL server, a dataset, an optional
# package) skip with a message on a user's machine. CI installs those pieces (.ci/run) and sets SLIMTUNE_CI=1:
# there such a skip means the piece is missing and the check silently did not run, so it fails instead.
CI_INSTALLS = ".ci/run installs it"


def in_ci() -> bool:
    return os.environ.get("SLIMTUNE_CI") == "1"


def require_or_skip(available: bool, what: str, how: str) -> None:
    """Skip (a user's bare machine) or fail (CI) when `what` is not available; `how` says how to get it."""
    if not available:
        pytest.skip(f"{what} is not available: {how} ({CI_INSTALLS})")


def _ci_required(reason: str) -> bool:
    return CI_INSTALLS in reason or ".ci/run does" in reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under SLIMTUNE_CI=1, a skip whose message says .ci/run installs the missing piece is a failure (from
    require_or_skip, or a test's own pytest.skip with that wording)."""
    report = (yield).get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if _ci_required(reason):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, where the piece it needs is installed: {reason}"

WORDS = ("good great fine nice happy bad awful poor sad terrible the a movie film was is very quite "
         "it this plot acting story and but not really hello there how are you i am user assistant "
         "what time today tomorrow yes no thanks please tell me about cats dogs").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + ["\n"] + [str(d) for d in range(10)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", model_max_length=512)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="<|im_end|>", model_max_length=512)
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    tok = _tokenizer("bert")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = _tokenizer("llama")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable task: the label is decided by which sentiment word appears."""
    rng = random.Random(seed)
    pos, neg = ["good", "great", "nice", "happy"], ["bad", "awful", "poor", "sad"]
    filler = ["the", "movie", "film", "was", "very", "quite", "plot", "acting", "story", "really"]
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(filler, rng.randint(2, 8)) + [rng.choice(pos if label == "pos" else neg)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict], sep: str = ",") -> Path:
    cols = list(rows[0])
    lines = [sep.join(cols)] + [sep.join(str(r[c]) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    topics = {"cats": "cats are great", "dogs": "dogs are happy", "time": "it is today"}
    rows = []
    for _ in range(n):
        k = rng.choice(list(topics))
        rows.append({"messages": [{"role": "user", "content": f"tell me about {k}"},
                                  {"role": "assistant", "content": topics[k]}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def cls_data(tmp_path) -> dict:
    return {"train": str(write_csv(tmp_path / "train.csv", sentiment_rows(160, 0))),
            "test": str(write_csv(tmp_path / "test.csv", sentiment_rows(40, 1)))}


def cls_config(model: str, data: dict, out: Path, **train) -> dict:
    return {
        "task": "text-classification",
        "model": {"name": model, "max_length": 32},
        "data": {"train": data["train"], **({"test": data["test"]} if "test" in data else {})},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"epochs": 10, "batch_size": 16, "lr": 1e-2, "log_every": 2, "precision": "fp32", **train},
        "eval": {"every_steps": 5},
        "output": {"dir": str(out), "name": "run"},
    }


@pytest.fixture(scope="session")
def tiny_bert_wide(tmp_path_factory) -> str:
    """A tiny BERT with a larger init scale and widths that every method's block sizes divide."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert-wide")
    tok = _tokenizer("bert")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, initializer_range=0.2)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
