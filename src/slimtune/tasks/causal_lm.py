"""Causal-LM fine-tuning on plain text, instruction records or chat records.

Plain text is tokenized, joined with EOS and cut into blocks of max_length
(the usual LM packing). Chat / instruction records go through the model's chat
template; by default the loss is on the assistant tokens only (labels -100
elsewhere), found by rendering the conversation prefix before each assistant
turn and masking up to it. With data.packing the training examples are packed
into rows with per-example position ids (data/packing.py says how attention
stays inside each example); evaluation examples never are.
"""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from ..data import packing
from ..data.readers import DataError
from ..data.validate import require_columns, require_nonempty, text_warnings
from . import TASKS
from .base import Batch, Example, LoadedModel, LossHooks, Task
from .common import HEAD_MARGIN, Splits, head_texts, pad_batch, read_splits, truncation_warning

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import RunConfig
    from ..models.sources import ModelSource

# used when a tokenizer has no chat template of its own (base models)
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def detect_format(cfg: RunConfig, columns: list[str]) -> str:
    d = cfg.data
    if d.format != "auto":
        return d.format
    if d.messages_column in columns:
        return "chat"
    if d.prompt_column in columns and d.response_column in columns:
        return "instruction"
    if d.text_column in columns:
        return "text"
    raise DataError(
        f"{d.train}: cannot tell the record format from the columns {', '.join(columns)}; expected a "
        f"{d.messages_column!r} column (chat), {d.prompt_column!r} + {d.response_column!r} (instruction) or "
        f"{d.text_column!r} (plain text); set data.format and the column names"
    )


def _required(cfg: RunConfig, fmt: str) -> dict[str, str]:
    d = cfg.data
    return {
        "chat": {d.messages_column: "data.messages_column"},
        "instruction": {d.prompt_column: "data.prompt_column", d.response_column: "data.response_column"},
        "text": {d.text_column: "data.text_column"},
    }[fmt]


def _check_messages(ds, column: str, source: str) -> None:
    for i, msgs in enumerate(ds[column]):
        # Arrow gives every message all keys seen in the column, a missing one as None
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and m.get("role") is not None and m.get("content") is not None for m in msgs
        ):
            raise DataError(f"{source}: record {i + 1}, column {column!r}: expected a list of {{'role', 'content'}} "
                            f"messages, got {str(msgs)[:80]!r}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{source}: record {i + 1}, column {column!r}: no 'assistant' message, so nothing to "
                            "learn from")


def _records_to_messages(cfg: RunConfig, ds, fmt: str) -> list[list[dict]]:
    d = cfg.data
    if fmt == "chat":
        return [[{"role": m["role"], "content": str(m["content"])} for m in msgs] for msgs in ds[d.messages_column]]
    return [[{"role": "user", "content": str(p)}, {"role": "assistant", "content": str(r)}]
            for p, r in zip(ds[d.prompt_column], ds[d.response_column])]


def _ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int,
                train_on_prompt: bool) -> tuple[Example, bool]:
    """input_ids and labels with -100 on everything but assistant turns; (example, truncated?)."""
    ids = _ids(tokenizer, messages)
    labels = list(ids) if train_on_prompt else [-100] * len(ids)
    if not train_on_prompt:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(_ids(tokenizer, messages[:i], add_generation_prompt=True))
            end = len(_ids(tokenizer, messages[: i + 1]))
            labels[start:end] = ids[start:end]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, truncated


def _head_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict], n_tokens: int) -> tuple[list[dict], bool]:
    """Each message's content cut to a head of at least n_tokens tokens (the conversation is rendered
    and tokenized once per assistant turn, a huge content each time); (messages, any cut?). A cut content
    alone fills max_length, so whatever follows it lay past the truncation anyway."""
    heads, cut = head_texts(tokenizer, [m["content"] for m in messages], n_tokens)
    return [{**m, "content": h} for m, h in zip(messages, heads)], any(cut)


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
    examples, n_trunc = [], 0
    for msgs in _records_to_messages(cfg, ds, fmt):
        cut = False
        if not whole:
            msgs, cut = _head_messages(tokenizer, msgs, max_length + HEAD_MARGIN)
        ex, trunc = encode_chat(tokenizer, msgs, sys.maxsize if whole else max_length, cfg.data.train_on_prompt)
        n_trunc += trunc or cut or len(ex["input_ids"]) > max_length
        if any(lab != -100 for lab in ex["labels"]):
            examples.append(ex)
    if whole:
        splits.report.stats[f"{name}_split"] = n_trunc
        if n_trunc:
            splits.report.warn(f"{name}: {n_trunc} of {len(ds)} examples are longer than model.max_length="
                               f"{max_length} and were split into chunks (data.packing: split)")
    else:
        truncation_warning(splits.report, name, n_trunc, len(ds), max_length)
    dropped = len(ds) - len(examples)
    if dropped:
        splits.report.warn(f"{name}: {dropped} record(s) had no response tokens left after truncation and were dropped")
    return examples


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
                detected.append(detect_format(cfg, ds.column_names))
            cols = _required(cfg, detected[0])
            require_columns(ds, list(cols), src, cols)
            if detected[0] == "chat":
                _check_messages(ds, cfg.data.messages_column, src)

        splits = read_splits(cfg, None, check)
        d = cfg.data
        fmt = splits.meta["format"] = detected[0]
        key = {"chat": d.messages_column, "instruction": d.prompt_column, "text": d.text_column}[fmt]
        texts = [str(x) for x in splits.train[key]]
        text_warnings(splits.report, "train", texts, {"eval": [str(x) for x in splits.eval[key]]})
        return splits

    def check_eval_data(self, cfg: RunConfig, splits: Splits) -> None:
        src = splits.sources["test"]
        cols = _required(cfg, splits.meta["format"])
        require_columns(splits.test, list(cols), src, cols)
        require_nonempty(splits.test, "eval", src)
        if splits.meta["format"] == "chat":
            _check_messages(splits.test, cfg.data.messages_column, src)

    def load_model(self, cfg: RunConfig, source: ModelSource, splits: Splits, **load_kwargs) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        from ..models import load_pretrained

        model, _ = load_pretrained(AutoModelForCausalLM, source, cfg.model.trust_remote_code, cfg.model.revision,
                                   **load_kwargs)
        return LoadedModel(model, [], head_is_new=False)  # the LM head is the model's own

    def featurize(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> dict[str, list[Example]]:
        fmt = splits.meta["format"]
        if fmt != "text" and not tokenizer.chat_template:
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
            splits.report.warn("the tokenizer has no chat template; using a ChatML fallback "
                               "(<|im_start|>role ... <|im_end|>)")
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

    @torch.inference_mode()
    def predict(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], meta: dict,
                max_new_tokens: int = 64, do_sample: bool = False, **_) -> list[dict]:
        model.eval()
        device = next(model.parameters()).device
        results = []
        for text in texts:
            if meta.get("format") != "text" and tokenizer.chat_template:
                ids = _ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
            else:
                ids = tokenizer(text)["input_ids"]
            inp = torch.tensor([ids], device=device)
            out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
            results.append({"prompt": text, "generated": tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)})
        return results


TASK = CausalLM()
