"""Generating replies in batches and scoring them against references.

Batches are left-padded (every prompt ends where generation starts) and generated with the KV cache, greedy
unless sampling is asked for; a reply ends at any end-of-turn token of the chat template (not only the
tokenizer's EOS: Llama 3, Gemma and ChatML end a turn with their own token). The scores come from the libraries
the field reports with: sacrebleu's chrF and BLEU (corpus level, 0-100), rouge-score's ROUGE-L F1 (mean, 0-1),
and SQuAD's exact match after normalisation (0-1).
"""
from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INSTALL = "pip install 'slimtune[generate]' (sacrebleu, rouge-score)"


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                   max_new_tokens: int, end_ids: set[int], batch_size: int = 8, do_sample: bool = False,
                   ) -> list[tuple[list[int], bool]]:
    """(generated ids without the end-of-turn token, stopped?) per prompt, in the prompts' order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(end_ids), 0)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths together: less padding
    out: dict[int, tuple[list[int], bool]] = {}
    for at in range(0, len(order), batch_size):
        idx = order[at:at + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=pad, eos_token_id=sorted(end_ids) or None)
        for row, i in zip(gen[:, width:].tolist(), idx):
            cut = next((j for j, t in enumerate(row) if t in end_ids), None)
            out[i] = (row if cut is None else row[:cut], cut is not None)
    if was_training:
        model.train()
    return [out[i] for i in range(len(prompts))]


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"eval.generate.metrics needs the {module.split('.')[0]} package: {INSTALL}") from None


def check_metric_libraries(metrics: list[str]) -> None:
    """Before training: a missing library is said now, not after the first evaluation."""
    if {"chrf", "bleu"} & set(metrics):
        _need("sacrebleu")
    if "rouge_l" in metrics:
        _need("rouge_score.rouge_scorer")


def score(outputs: list[str], references: list[str], metrics: list[str]) -> tuple[dict[str, float], list[dict]]:
    """(corpus scores, per-example scores) of the outputs against the references."""
    per: list[dict] = [{} for _ in outputs]
    total: dict[str, float] = {}
    if {"chrf", "bleu"} & set(metrics):
        sacrebleu = _need("sacrebleu")
        for name, corpus, sentence in (("chrf", sacrebleu.corpus_chrf, sacrebleu.sentence_chrf),
                                       ("bleu", sacrebleu.corpus_bleu, sacrebleu.sentence_bleu)):
            if name in metrics:
                total[name] = float(corpus(outputs, [references]).score)
                for p, o, r in zip(per, outputs, references):
                    p[name] = round(float(sentence(o, [r]).score), 4)
    if "rouge_l" in metrics:
        scorer = _need("rouge_score.rouge_scorer").RougeScorer(["rougeL"], use_stemmer=True)
        for p, o, r in zip(per, outputs, references):
            p["rouge_l"] = round(float(scorer.score(r, o)["rougeL"].fmeasure), 4)
        total["rouge_l"] = sum(p["rouge_l"] for p in per) / max(len(per), 1)
    if "exact_match" in metrics:
        for p, o, r in zip(per, outputs, references):
            p["exact_match"] = float(normalize_answer(o) == normalize_answer(r))
        total["exact_match"] = sum(p["exact_match"] for p in per) / max(len(per), 1)
    return {m: total[m] for m in metrics}, per


def scored_rows(tokenizer: PreTrainedTokenizerBase, prompts: list[dict], outs: list[tuple[int, list[int], bool]],
                metrics: list[str]) -> tuple[dict[str, float], list[dict]]:
    """(corpus scores, one generations.jsonl row per reply) of generated (prompt index, ids, stopped?) against
    the prompts' references: the rows hold index, prompt, reference, output, finish_reason and scores."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for _, ids, _ in outs]
    total, per = score(texts, [prompts[i]["reference"] for i, _, _ in outs], metrics)
    rows = [{"index": i, "prompt": prompts[i]["prompt"], "reference": prompts[i]["reference"], "output": text,
             "finish_reason": "stop" if stopped else "length", "scores": s}
            for (i, _, stopped), text, s in zip(outs, texts, per)]
    return total, rows
