"""Conversations to training examples through the model's chat template, with the guards against the
silent SFT failures users of other tools report:

- the loss is on the assistant turns only (labels -100 elsewhere; not on one with OpenAI's `weight: 0`, nor
  on a prompt's own assistant turns), found by rendering the conversation prefix before each assistant turn
  and masking up to it;
- each assistant turn's end-of-turn token is scored, so the model learns to stop: a template that renders
  no end-of-turn / EOS token after a reply gets the tokenizer's EOS appended to it (labels and padding are
  by position, never by token id, so a pad token equal to EOS masks nothing: pad_batch pads labels with -100);
- a record whose scored tokens all lie past model.max_length is dropped and named (data_report.json), and
  a split left with none is an error, not a run that learns nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import DataError
from .base import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# end-of-turn tokens of the common chat templates (ChatML, Llama 3, Gemma, Phi-3, Mistral's </s> is its EOS)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
# used when a tokenizer has no chat template of its own (base models)
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHOW_DROPPED = 20  # record numbers named in data_report.json per split


def _known_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return i


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The token ids that end a reply: the tokenizer's EOS and the template end-of-turn tokens it has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return ids | {i for i in (_known_id(tokenizer, t) for t in END_OF_TURN) if i is not None}


def render_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False,
               tools: list | None = None) -> list[int]:
    kw = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False, **kw)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def scored_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict], trained: list[bool],
                 tools: list | None = None) -> list[tuple[int, int]]:
    """[start, end) token spans of the trained assistant turns in the rendered conversation."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and trained[i]:
            spans.append((len(render_ids(tokenizer, messages[:i], True, tools)),
                          len(render_ids(tokenizer, messages[:i + 1], False, tools))))
    return spans


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int, train_on_prompt: bool,
                tools: list | None = None, end_ids: set[int] | None = None) -> tuple[Example, bool]:
    """input_ids and labels (-100 on everything but the assistant turns unless train_on_prompt), every reply
    ending in a scored end-of-turn token; (example, truncated?)."""
    # OpenAI's fine-tuning format: an assistant message with weight 0 is context, not trained on
    trained = [m.get("weight", 1) != 0 for m in messages]
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    ids = render_ids(tokenizer, messages, tools=tools)
    end_ids = end_of_turn_ids(tokenizer) if end_ids is None else end_ids
    scored = [train_on_prompt] * len(ids)
    eos = tokenizer.eos_token_id
    # from the last span back: an inserted EOS leaves the earlier spans' positions as they are
    for start, end in reversed(scored_spans(tokenizer, messages, trained, tools)):
        if eos is not None and not any(t in end_ids for t in ids[start:end]):
            ids.insert(end, eos)
            scored.insert(end, True)
            end += 1
        scored[start:end] = [True] * (end - start)
    truncated = len(ids) > max_length
    ids, scored = ids[:max_length], scored[:max_length]
    labels = [t if s else -100 for t, s in zip(ids, scored)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, truncated


def drop_unscored(report: Any, split: str, source: str, examples: list[Example | None], max_length: int,
                  as_read: bool = True) -> list[Example]:
    """The examples that keep a scored token; the others are counted and named in the report. None of them
    left is an error (training would learn nothing). `as_read`: the split is its file's records in order, so
    the numbers named are the file's; else they are the split's (after the eval carve-out or a sample cap)."""
    kept = [e for e in examples if e is not None and any(lab != -100 for lab in e["labels"])]
    dropped = [i + 1 for i, e in enumerate(examples) if e is None or all(lab == -100 for lab in e["labels"])]
    if dropped:
        report.stats[f"{split}_dropped_records"] = {"count": len(dropped), "records": dropped[:SHOW_DROPPED]}
        more = f" (first {SHOW_DROPPED} of {len(dropped)})" if len(dropped) > SHOW_DROPPED else ""
        which = "record(s)" if as_read else f"{split} example(s) (numbered in the {split} split, not the file)"
        report.stats[f"{split}_dropped_records"]["numbered_in"] = "file" if as_read else f"{split} split"
        report.warn(f"{split}: {len(dropped)} of {len(examples)} record(s) of {source} kept no scored (response) "
                    f"token within model.max_length={max_length} and were dropped: {which} "
                    f"{', '.join(map(str, dropped[:SHOW_DROPPED]))}{more}")
    if not kept:
        raise DataError(f"{source}: no {split} record keeps a scored (response) token within model.max_length="
                        f"{max_length}: every prompt fills it. Raise model.max_length, shorten the prompts, or set "
                        "data.train_on_prompt: true")
    return kept


def marked_text(tokenizer: PreTrainedTokenizerBase, example: Example, open_mark: str = "[[",
                close_mark: str = "]]") -> str:
    """The example as the model reads it, special tokens included, its scored tokens between the marks."""
    out, run, scored = [], [], None
    for tok, lab in zip(example["input_ids"], example["labels"]):
        if scored is not None and (lab != -100) != scored:
            out.append((scored, run))
            run = []
        scored = lab != -100
        run.append(tok)
    if run:
        out.append((scored, run))
    text = ""
    for is_scored, ids in out:
        piece = tokenizer.decode(ids, skip_special_tokens=False)
        text += f"{open_mark}{piece}{close_mark}" if is_scored else piece
    return text


def length_summary(lengths: list[int], max_length: int, what: str) -> str:
    s = sorted(lengths)
    if not s:
        return f"{what}: none"

    def q(p: float) -> int:
        return s[min(len(s) - 1, int(p * len(s)))]

    over = sum(n > max_length for n in s)
    return (f"{what}: min {s[0]}, median {q(0.5)}, p90 {q(0.9)}, max {s[-1]} tokens; {over} of {len(s)} "
            f"({100 * over / len(s):.1f}%) longer than model.max_length={max_length} (truncated)")
