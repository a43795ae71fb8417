"""Packing tokenized causal-LM examples into rows of at most max_length tokens, and batching the rows.

Rows are filled by best-fit decreasing, as TRL's `pack_dataset(strategy="bfd")`: examples longest first,
each into the open row whose free space is the smallest that still holds it (a segment tree over free
space finds it in O(log max_length)), else into a new row. Packing happens once, before training; the
sampler then shuffles rows per epoch with the run's seed, so the rows and their order are deterministic.

How attention stays inside an example. A row carries `position_ids` that restart at 0 at every example and
no `attention_mask`. transformers' `masking_utils.create_causal_mask` then calls
`find_packed_sequence_indices(position_ids)` (a new sequence wherever the position does not grow by 1) and
ANDs the causal mask with "same sequence": a block-causal mask for sdpa and eager attention. It does so only
when the 2-D attention mask is None *and* no cache is passed; a causal LM's forward builds a DynamicCache
whenever `use_cache` is on (its config's default), which silently gives full causal attention across the
row, so packed forwards pass PACKED_FORWARD_KWARGS. Flash-attention's varlen path reads the same position ids
but only for a single flattened row (`_is_packed_sequence` wants batch size 1); `check_block_causal` runs a
packed probe through the model before training, so any model or method on which the mask falls back (that
one, prompt-learning methods that drop position ids, prefix caches) fails with an error instead of training
on cross-contaminated rows.

The rows of a batch are stacked, each padded at its end: attention costs rows x max_length^2, not
(rows x max_length)^2 as one flattened row would under sdpa's dense mask. Every padding position gets
position 0, so each is a sequence of its own that attends only to itself (no real token sees it, none of
its outputs is scored), and a real example is never shorter than 2 tokens (one that is has nothing to
score), which is how `count_tokens` tells padding from the examples.
"""
from __future__ import annotations

from collections import defaultdict, deque
from typing import Any, Callable

import torch

from ..errors import ModelError

Example = dict[str, Any]

# without a cache the packed position ids reach the mask (see the module docstring)
PACKED_FORWARD_KWARGS = {"use_cache": False}


class _FreeSpace:
    """The free space of the open rows: finds the smallest free space >= a length (a max segment tree)."""

    def __init__(self, capacity: int):
        self.size = 1 << max(0, capacity - 1).bit_length()
        self.tree = [0] * (2 * self.size)

    def _set(self, space: int, value: int) -> None:
        i = self.size + space - 1
        self.tree[i] = value
        while i > 1:
            i >>= 1
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])

    def add(self, space: int) -> None:
        self._set(space, space)

    def remove(self, space: int) -> None:
        self._set(space, 0)

    def smallest_fit(self, length: int) -> int:
        """The smallest free space >= length (0: none)."""
        if self.tree[1] < length:
            return 0
        i = 1
        while i < self.size:
            i = 2 * i if self.tree[2 * i] >= length else 2 * i + 1
        return self.tree[i]


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of total length <= capacity, by best-fit decreasing: longest
    first (equal lengths in their order), each into the row with the least free space that holds it (of
    rows with equal free space, the one that has had it longest), else into a new row."""
    if any(n > capacity or n < 1 for n in lengths):
        raise ValueError(f"every length must be in [1, {capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free = _FreeSpace(capacity)
    rows_with_space: dict[int, deque] = defaultdict(deque)
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        space = free.smallest_fit(n)
        if space:
            row = rows_with_space[space].popleft()
            if not rows_with_space[space]:
                free.remove(space)
        else:
            row, space = [], capacity
            rows.append(row)
        row.append(i)
        left = space - n
        if left:
            rows_with_space[left].append(row)
            free.add(left)
    return rows


def split_example(example: Example, max_length: int) -> list[Example]:
    """An example cut into consecutive chunks of max_length tokens (the last may be shorter)."""
    n = len(example["input_ids"])
    return [{k: example[k][i:i + max_length] for k in ("input_ids", "labels")} for i in range(0, n, max_length)]


def scores_something(example: Example) -> bool:
    """Whether an example has a token to predict: a label past its first position (the first is never
    predicted, there is no token before it)."""
    return any(label != -100 for label in example["labels"][1:])


def pack_examples(examples: list[Example], max_length: int, split: bool = False) -> tuple[list[Example], dict]:
    """Rows of at most max_length tokens holding every example that scores something once; longer examples
    are cut to max_length, or with `split` cut into max_length chunks packed on their own. Each row holds
    input_ids, labels (-100 at every example's first token: it is not predicted from the previous example's
    last) and position_ids (from 0 in every example). Also returns what the data report shows."""
    pieces: list[Example] = []
    for ex in examples:
        if split and len(ex["input_ids"]) > max_length:
            pieces += split_example(ex, max_length)
        else:
            pieces.append({k: ex[k][:max_length] for k in ("input_ids", "labels")})
    pieces = [p for p in pieces if scores_something(p)]
    rows = []
    for members in best_fit_decreasing([len(p["input_ids"]) for p in pieces], max_length):
        row: Example = {"input_ids": [], "labels": [], "position_ids": []}
        for i in members:
            p = pieces[i]
            row["input_ids"] += p["input_ids"]
            row["labels"] += [-100] + p["labels"][1:]
            row["position_ids"] += list(range(len(p["input_ids"])))
        rows.append(row)
    tokens = sum(len(p["input_ids"]) for p in pieces)
    stats = {"examples": len(examples), "pieces": len(pieces), "rows": len(rows),
             "fill": tokens / (max_length * len(rows)) if rows else 0.0}
    return rows, stats


def is_packed(examples_or_batch: list[Example] | dict) -> bool:
    """Packed rows (and their batches) carry position_ids; plain examples do not."""
    first = examples_or_batch[0] if isinstance(examples_or_batch, list) else examples_or_batch
    return "position_ids" in first


def packed_batch(rows: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows stacked into (rows, longest row) tensors: input_ids, labels, position_ids, and no attention_mask
    (its absence is what makes transformers build the block-causal mask from the position ids)."""
    n = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_id, "labels": -100, "position_ids": 0}
    return {k: torch.tensor([r[k] + [v] * (n - len(r[k])) for r in rows], dtype=torch.long) for k, v in fill.items()}


def count_tokens(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(examples, real tokens) of a packed batch, as tensors (no host sync). An example starts where a
    position 0 is followed by 1 (examples hold >= 2 tokens); padding is the positions 0 followed by none."""
    pos = batch["position_ids"]
    starts = ((pos[:, :-1] == 0) & (pos[:, 1:] == 1)).sum()
    return starts, (pos > 0).sum() + starts


@torch.no_grad()
def check_block_causal(model: torch.nn.Module, forward_kwargs: dict, collate: Callable = packed_batch) -> None:
    """Fail unless the model, as trained, keeps attention inside each example of a packed batch: the logits of
    an example packed behind another (in a batch of two rows, the second padded) must be its logits alone."""
    device = next(model.parameters()).device
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 32)
    ids = [[(7 * i + 3) % vocab for i in range(k, k + n)] for k, n in ((0, 5), (11, 4), (23, 3))]
    examples = [{"input_ids": x, "labels": list(x)} for x in ids]
    rows, _ = pack_examples(examples, 9)  # [first, second] and [third]: the probe needs both layouts
    batch = {k: v.to(device) for k, v in collate(rows, 0).items() if k != "labels"}
    kwargs = {k: v for k, v in forward_kwargs.items() if k != "num_items_in_batch"}
    was_training = model.training
    model.eval()
    try:
        packed = model(**batch, **kwargs).logits.float()
        second = torch.tensor([ids[1]], device=device)
        alone = model(input_ids=second, **kwargs).logits.float()
    finally:
        model.train(was_training)
    packed_second = packed[0, packed.shape[1] - 9:][5:9]  # prompt-learning methods prepend virtual tokens
    alone = alone[0, alone.shape[1] - 4:]
    scale = alone.abs().max().clamp(min=1e-6)
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2
    if not torch.allclose(packed_second, alone, rtol=0, atol=float(scale) * tolerance):
        raise ModelError(
            "data.packing: this model and method do not keep attention inside each packed example (an example's "
            "logits change with the example packed before it), so training would mix examples. transformers "
            "builds the per-example mask from position_ids only without an attention mask or a cache; "
            "prompt-learning methods and models that do not build their mask with masking_utils cannot. "
            "Set data.packing: false")
