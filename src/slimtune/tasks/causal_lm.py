"""Causal-LM fine-tuning on plain text, instruction records or chat records.

Plain text is tokenized, joined with EOS and cut into blocks of max_length
(the usual LM packing). Records in the formats of data/chat_formats.py (OpenAI
messages, ShareGPT, Alpaca, prompt / completion) become conversations that the
model's chat template renders; by default the loss is on the assistant tokens
only, each reply's end-of-turn token included (tasks/chat_encoding.py). With
data.packing the training examples are packed into rows with per-example
position ids (data/packing.py says how attention stays inside each example);
evaluation examples never are.
"""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from ..data import chat_formats, packing
from ..data.readers import DataError
from ..errors import UsageError
from ..data.validate import require_columns, require_nonempty, text_warnings
from . import TASKS
from .base import Batch, Example, LoadedModel, LossHooks, Task
from .chat_encoding import (FALLBACK_CHAT_TEMPLATE, drop_unscored, encode_chat, end_of_turn_ids, length_summary,
                            marked_text, render_ids)
from .common import HEAD_MARGIN, Splits, head_texts, pad_batch, read_splits, truncation_warning
from .generation import generate_batch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import RunConfig
    from ..models.sources import ModelSource

PREVIEW_RECORDS = 1000  # records `slimtune validate` tokenizes for the length distribution
PREVIEW_CHARS = 2000  # of the rendered example it prints


def _head_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict], n_tokens: int) -> tuple[list[dict], bool]:
    """Each message's content cut to a head of at least n_tokens tokens (the conversation is rendered
    and tokenized once per assistant turn, a huge content each time); (messages, any cut?). A cut content
    alone fills max_length, so whatever follows it lay past the truncation anyway."""
    texts = [i for i, m in enumerate(messages) if isinstance(m["content"], str)]  # not content-part lists
    heads, cut = head_texts(tokenizer, [messages[i]["content"] for i in texts], n_tokens)
    out = list(messages)
    for i, h in zip(texts, heads):
        out[i] = {**messages[i], "content": h}
    return out, any(cut)


def _pack_text(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[Example]:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + ([eos] if eos is not None else [])
    blocks = [stream[i:i + max_length] for i in range(0, len(stream), max_length)]
    blocks = [b for b in blocks if len(b) >= min(16, max_length)]
    return [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)} for b in blocks]


def _chat_examples(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, splits: Splits, name: str, ds,
                   fmt: str, whole: bool = False) -> list[Example]:
    """Chat / instruction records of one split, encoded; truncation and dropped records go into the report.
    `whole`: not truncated (data.packing: split cuts the long ones into chunks later), so not cut to heads either."""
    max_length = cfg.model.max_length
    source = splits.sources.get(name, name)
    tools = chat_formats.record_tools(ds) or [None] * len(ds)
    end_ids = end_of_turn_ids(tokenizer)
    examples, n_trunc = [], 0
    for msgs, tool in zip(chat_formats.conversations(cfg, fmt, ds, source), tools):
        cut = False
        if not whole:
            msgs, cut = _head_messages(tokenizer, msgs, max_length + HEAD_MARGIN)
        ex, trunc = _encode(tokenizer, msgs, sys.maxsize if whole else max_length, cfg.data.train_on_prompt, tool,
                            end_ids, source, len(examples))
        n_trunc += trunc or cut or len(ex["input_ids"]) > max_length
        examples.append(ex)
    if whole:
        splits.report.stats[f"{name}_split"] = n_trunc
        if n_trunc:
            splits.report.warn(f"{name}: {n_trunc} of {len(ds)} examples are longer than model.max_length="
                               f"{max_length} and were split into chunks (data.packing: split)")
    else:
        truncation_warning(splits.report, name, n_trunc, len(ds), max_length)
    d = cfg.data
    as_read = {"train": not splits.report.stats.get("eval_carved_out") and not d.max_train_samples,
               "eval": bool(d.eval) and not d.max_eval_samples}.get(name, True)
    return drop_unscored(splits.report, name, source, examples, max_length, as_read)


def _encode(tokenizer: PreTrainedTokenizerBase, msgs: list[dict], max_length: int, train_on_prompt: bool,
            tools: list | None, end_ids: set[int], source: str, i: int) -> tuple[Example, bool]:
    try:
        return encode_chat(tokenizer, msgs, max_length, train_on_prompt, tools, end_ids)
    except DataError:
        raise
    except Exception as e:  # the template refuses the record (a role or tool call it does not know)
        raise DataError(f"{source}: record {i + 1}: the chat template cannot render it: {type(e).__name__}: "
                        f"{str(e)[:300]} (roles: {[m['role'] for m in msgs]})") from None


def _chat_template(tokenizer: PreTrainedTokenizerBase, splits: Splits) -> None:
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        splits.report.warn("the tokenizer has no chat template; using a ChatML fallback "
                           "(<|im_start|>role ... <|im_end|>)")


def _forward_parameters(model: torch.nn.Module) -> list | None:
    """The parameters of the (peft-wrapped) model's own forward; None where its signature cannot be read."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return list(inspect.signature(base.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def loss_kwargs(cfg: RunConfig, model: torch.nn.Module, train_examples: list[Example], batches_per_epoch: int) -> dict:
    """`num_items_in_batch` for the model's loss: the mean number of scored tokens per batch over an epoch.

    transformers' causal-LM loss divides a batch's summed token loss by this number instead of by the
    batch's own count. With length-grouped batches that matters: a batch of short responses would
    otherwise give each of its tokens several times the weight of a token in a batch of long ones
    (measured on SmolLM2 + ChatterBot chat: per-batch means raised the eval loss); with a constant, every
    token weighs the same whatever batch it lands in, as in random batches. Off with
    `train.loss_tokens: batch`, for a sequence-length schedule (the count changes as sequences grow) and
    for models whose forward takes no extra loss arguments."""
    import inspect

    if cfg.train.loss_tokens != "epoch" or cfg.train.seq_len_schedule or batches_per_epoch < 1:
        return {}
    params = _forward_parameters(model)
    if not params or not any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "num_items_in_batch" for p in params):
        return {}
    scored = sum(sum(1 for lab in ex["labels"][1:] if lab != -100) for ex in train_examples)
    return {"num_items_in_batch": max(1.0, scored / batches_per_epoch)}


def train_loss_fn(cfg: RunConfig, model: torch.nn.Module, forward_kwargs: dict) -> Callable | None:
    """The training loss computed from the logits of the scored positions only, or None (the model's own loss).

    A causal LM's output layer is a large share of its compute (SmolLM2-135M: a 576 x 49,152 matrix,
    ~20% of the forward FLOPs, and a fp32 softmax over 49k classes per token), yet chat and instruction
    data score only the response tokens. transformers' `logits_to_keep` takes the positions to project;
    we pass the positions whose next token is scored in any row of the batch and compute the same
    cross-entropy on them (same sum, same divisor). It goes through the model's own forward (so DDP,
    autocast and peft wrappers see a normal call). Not used for prompt-learning methods (their virtual
    tokens shift positions) or models whose forward lacks `logits_to_keep`. `forward_kwargs`: loss_kwargs'
    divisor, and the extra forward arguments of packed batches."""
    if not cfg.train.scored_logits_only:
        return None
    peft_cfg = getattr(model, "peft_config", None) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in peft_cfg.values()):
        return None
    params = _forward_parameters(model)
    if params is None or all(p.name != "logits_to_keep" for p in params):
        return None
    divisor = forward_kwargs.get("num_items_in_batch")
    extra = {k: v for k, v in forward_kwargs.items() if k != "num_items_in_batch"}

    def loss_fn(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        labels = batch["labels"]
        target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # position p predicts token p + 1
        keep = (target != -100).any(0)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, **extra, logits_to_keep=keep).logits
        target = target[:, keep]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100,
                                                 reduction="sum")
        return loss / (divisor if divisor is not None else (target != -100).sum().clamp(min=1))

    return loss_fn


class CausalLM(Task):
    spec = TASKS["causal-lm"]
    encode_chat = staticmethod(encode_chat)

    def load_data(self, cfg: RunConfig) -> Splits:
        detected: list[str] = []  # the format, detected from train only; eval / test must have the same columns

        def check(ds, src: str) -> None:
            if not detected:
                detected.append(chat_formats.detect_format(cfg, ds.column_names, src))
            self._check_records(cfg, detected[0], ds, src)

        splits = read_splits(cfg, None, check)
        fmt = splits.meta["format"] = detected[0]
        key = chat_formats.text_column(cfg, fmt, splits.train.column_names)
        texts = [str(x) for x in splits.train[key]]
        text_warnings(splits.report, "train", texts, {"eval": [str(x) for x in splits.eval[key]]})
        return splits

    @staticmethod
    def _check_records(cfg: RunConfig, fmt: str, ds, src: str) -> None:
        """Columns, and every record read as its format says (before any model is loaded)."""
        cols = chat_formats.required_columns(cfg, fmt, ds.column_names)
        require_columns(ds, list(cols), src, cols)
        if fmt != "text":
            chat_formats.conversations(cfg, fmt, ds, src)

    def check_eval_data(self, cfg: RunConfig, splits: Splits) -> None:
        src = splits.sources["test"]
        self._check_records(cfg, splits.meta["format"], splits.test, src)
        require_nonempty(splits.test, "eval", src)

    def data_preview(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> list[str]:
        """The first training record as the model reads it (scored tokens between [[ and ]]) and the token
        lengths of the first PREVIEW_RECORDS training records, before truncation."""
        fmt, max_length, ds = splits.meta["format"], cfg.model.max_length, splits.train
        n = min(len(ds), PREVIEW_RECORDS)
        head = ds.select(range(n))
        if fmt == "text":
            lengths = [len(x) for x in tokenizer([str(t) for t in head[cfg.data.text_column]],
                                                 add_special_tokens=False)["input_ids"]]
            return [length_summary(lengths, max_length, f"text lengths (first {n} train records; plain text is "
                                   "joined and cut into blocks, every token scored)")]
        _chat_template(tokenizer, splits)
        source = splits.sources.get("train", "train")
        tools = chat_formats.record_tools(head) or [None] * n
        end_ids = end_of_turn_ids(tokenizer)
        encoded = [_encode(tokenizer, msgs, sys.maxsize, cfg.data.train_on_prompt, tool, end_ids, source, i)[0]
                   for i, (msgs, tool) in enumerate(zip(chat_formats.conversations(cfg, fmt, head, source), tools))]
        first = {k: v[:max_length] for k, v in encoded[0].items()}
        text = marked_text(tokenizer, first)
        cut = " (cut at model.max_length)" if len(encoded[0]["input_ids"]) > max_length else ""
        scored = [sum(lab != -100 for lab in e["labels"][:max_length]) for e in encoded]
        lost = [i + 1 for i, k in enumerate(scored) if k == 0]
        return [f"training record 1 as the model reads it ({fmt} format; scored tokens between [[ and ]]){cut}:",
                text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + f" ... ({len(text)} characters)",
                length_summary([len(e["input_ids"]) for e in encoded], max_length, f"token lengths (first {n} "
                               "train records)"),
                f"scored tokens per record within model.max_length: median {sorted(scored)[len(scored) // 2]}, "
                f"min {min(scored)}"
                + (f"; {len(lost)} record(s) keep none and will be dropped (training split numbering: "
                   f"{', '.join(map(str, lost[:20]))})" if lost else "")]

    def generation_prompts(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, splits: Splits,
                           n: int) -> list[dict]:
        """Each eval record's conversation up to its last trained assistant reply (the reference), rendered with
        the generation prompt; a prompt longer than model.max_length keeps its last tokens."""
        fmt = splits.meta["format"]
        if fmt == "text":
            raise DataError(f"{splits.sources.get('eval', 'eval')}: eval.generate needs chat or instruction records "
                            "(a reply to generate and a reference to score it against); this data is plain text")
        _chat_template(tokenizer, splits)
        head = splits.eval.select(range(min(n, len(splits.eval))))
        source = splits.sources.get("eval", "eval")
        tools = chat_formats.record_tools(head) or [None] * len(head)
        out = []
        for msgs, tool in zip(chat_formats.conversations(cfg, fmt, head, source), tools):
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant" and m.get("weight", 1) != 0)
            context = [{k: v for k, v in m.items() if k != "weight"} for m in msgs[:last]]
            ids = render_ids(tokenizer, context, add_generation_prompt=True, tools=tool)[-cfg.model.max_length:]
            user = next((m["content"] for m in reversed(context) if m["role"] == "user"), "")
            out.append({"prompt_ids": ids, "prompt": str(user), "reference": str(msgs[last]["content"])})
        return out

    def load_model(self, cfg: RunConfig, source: ModelSource, splits: Splits, **load_kwargs) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        from ..models import load_pretrained

        model, _ = load_pretrained(AutoModelForCausalLM, source, cfg.model.trust_remote_code, cfg.model.revision,
                                   **load_kwargs)
        return LoadedModel(model, [], head_is_new=False)  # the LM head is the model's own

    def featurize(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> dict[str, list[Example]]:
        fmt = splits.meta["format"]
        if fmt != "text":
            _chat_template(tokenizer, splits)
        out = {}
        pack = cfg.data.packing
        for name, ds in splits.present():
            if fmt == "text":
                out[name] = _pack_text(tokenizer, [str(t) for t in ds[cfg.data.text_column]], cfg.model.max_length)
            else:
                whole = pack == "split" and name == "train"
                out[name] = _chat_examples(cfg, tokenizer, splits, name, ds, fmt, whole)
            if not out[name]:
                raise DataError(f"{splits.sources.get(name, name)}: no {name} examples left after tokenization")
        if pack:
            out["train"], splits.report.stats["train_packing"] = packing.pack_examples(
                out["train"], cfg.model.max_length, split=pack == "split")
        return out

    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[Example]], Batch]:
        """Padded batches of examples; padding-free batches of packed rows (the training rows under data.packing,
        which carry their position ids)."""
        pad_id = tokenizer.pad_token_id
        return lambda examples: (packing.packed_batch(examples, pad_id) if packing.is_packed(examples)
                                 else pad_batch(examples, pad_id))

    def loss_hooks(self, cfg: RunConfig, model: torch.nn.Module, train_examples: list[Example],
                   batches_per_epoch: int) -> LossHooks:
        """Every scored token weighs the same (loss_kwargs), and only the scored positions' logits are
        computed (train_loss_fn). Packed rows: without a cache (data/packing.py), checked on the model first."""
        forward_kwargs = loss_kwargs(cfg, model, train_examples, batches_per_epoch)
        note = None
        if "num_items_in_batch" in forward_kwargs:
            note = {"num_items_in_batch": forward_kwargs["num_items_in_batch"],
                    "rule": "summed token loss / mean scored tokens per batch over the epoch"}
        if cfg.data.packing:
            forward_kwargs = {**forward_kwargs, **packing.PACKED_FORWARD_KWARGS}
            packing.check_block_causal(model, forward_kwargs)
        return LossHooks(forward_kwargs, train_loss_fn(cfg, model, forward_kwargs), note)

    def count(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        if packing.is_packed(batch):
            return packing.count_tokens(batch)
        return batch["input_ids"].shape[0], batch["attention_mask"].sum()  # a tensor: read at log time

    def token_slots(self, batch: Batch) -> int:
        return batch["input_ids"].numel()

    def eval_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, logits.shape[1] - labels.shape[1]:]  # prompt-learning methods prepend virtual tokens
        shift_labels = labels[:, 1:]
        mask = shift_labels != -100
        # Only the scored positions are upcast to fp32: chat data scores the assistant tokens alone, and a
        # full fp32 copy of (batch, seq, vocab) logits is the largest allocation of an eval step (8 x 128 x
        # 49k vocab = 200 MB for SmolLM2).
        picked = logits[:, :-1][mask].float()
        tok_loss = torch.nn.functional.cross_entropy(picked, shift_labels[mask], reduction="none")
        rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(mask)[mask]
        loss_sum = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add_(0, rows, tok_loss)
        # per-example sums, so gather_for_metrics drops the padding duplicates of the last batch correctly
        return {"loss_sum": loss_sum, "tokens": mask.sum(1).float()}

    def compute_metrics(self, parts: dict[str, torch.Tensor], wanted: Iterable[str],
                        num_labels: int | None = None) -> dict[str, float]:
        loss = float(parts["loss_sum"].sum() / parts["tokens"].sum().clamp(min=1))
        values = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        return {m: values[m] for m in wanted}

    def predict(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], meta: dict,
                max_new_tokens: int = 64, do_sample: bool = False, system: str | None = None,
                conversations: list[list[dict]] | None = None, batch_size: int = 8, **_) -> list[dict]:
        """Replies to each text (a user turn, after `system` when given) and to each conversation (messages
        ending with a user turn), generated in left-padded batches; a plain-text run continues each text."""
        chat = meta.get("format") != "text" and bool(tokenizer.chat_template)
        if (system or conversations) and not chat:
            raise UsageError("--system and multi-turn input are for runs trained on chat / instruction records; "
                             "this run's data was plain text, so give the text to continue")
        head = [{"role": "system", "content": system}] if system else []
        prompts, shown = [], []
        for text in texts:
            prompts.append(render_ids(tokenizer, head + [{"role": "user", "content": text}], True) if chat
                           else tokenizer(text)["input_ids"])
            shown.append(text)
        for conv in conversations or []:
            prompts.append(render_ids(tokenizer, head + conv, True))
            shown.append(str(conv[-1]["content"]))
        outs = generate_batch(model, tokenizer, prompts, max_new_tokens, end_of_turn_ids(tokenizer), batch_size,
                              do_sample)
        # OpenAI's finish_reason: "stop" when the model ended its reply, "length" when max_new_tokens cut it
        return [{"prompt": p, "generated": tokenizer.decode(ids, skip_special_tokens=True),
                 "new_tokens": len(ids) + stopped, "finish_reason": "stop" if stopped else "length"}
                for p, (ids, stopped) in zip(shown, outs)]


TASK = CausalLM()
