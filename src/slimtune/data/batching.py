"""Length-grouped, seeded, resumable batches for training; length-sorted batches for eval.

Padding is the largest waste in text batches. We shuffle, cut the order into
mega-batches of `mega` batches, sort each by length and cut it into batches, then
shuffle the batch order (the longest batch goes first, so an out-of-memory shows at
step 1, not hours in). The order depends only on (seed, epoch), and the sampler
shards batches across processes itself, so a resumed run sees exactly the
batches the interrupted one would have seen.

Copies of one example have the same length, so sorting puts them side by side and
a length-grouped batch can hold several copies (a batch of 8 with 3 copies of one
chat record learns from 6 distinct ones). Given content keys, the sampler moves such
copies into the nearest batch of the same mega-batch that lacks them (a swap with a
neighbour of nearly the same length, so padding barely changes). HF Trainer's
group_by_length keeps them together; on the ChatterBot chat data (801 distinct of
1,823 records) that cost eval loss (benchmarks/RESULTS.md, bench_core chat).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass
class BatchShape:
    """What the training batches look like right now, written by the schedules and the sampler and read by the
    collate functions: the max sequence length (train.seq_len_schedule), the image size
    (train.image_size_schedule) and the epoch (image augmentations are drawn per epoch). None: the full size."""

    max_length: int | None = None
    image_size: int | None = None
    epoch: int = 0


class LengthGroupedBatches:
    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True,
                 num_replicas: int = 1, rank: int = 0, mega: int = 50, keys: list | None = None):
        self.lengths = np.asarray(lengths)
        # content keys (equal key = copies of one example): spread copies across batches; None: no spreading
        self.keys = None if keys is None or len(set(keys)) == len(keys) else list(keys)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group_by_length
        self.num_replicas = num_replicas
        self.rank = rank
        self.mega = mega
        self.epoch = 0
        self.start = 0
        self.shape: BatchShape | None = None  # set_epoch writes the epoch here too (read by collate functions)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch`, skipping this process's first `start` batches (resume)."""
        self.epoch, self.start = epoch, start
        if self.shape is not None:
            self.shape.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        bs = self.batch_size
        if not self.group:
            return [order[i:i + bs].tolist() for i in range(0, len(order), bs)]
        batches = []
        chunk = bs * self.mega
        for i in range(0, len(order), chunk):
            mb = order[i:i + chunk]
            mb = mb[np.argsort(-self.lengths[mb], kind="stable")]
            part = [mb[j:j + bs].tolist() for j in range(0, len(mb), bs)]
            if self.keys is not None:
                spread_copies(part, self.keys, self.lengths)
            batches += part
        perm = rng.permutation(len(batches))
        batches = [batches[k] for k in perm]
        longest = max(range(len(batches)), key=lambda k: self.lengths[batches[k]].max())
        batches.insert(0, batches.pop(longest))
        return batches

    def per_rank(self) -> int:
        n = math.ceil(len(self.lengths) / self.batch_size)
        return math.ceil(n / self.num_replicas)

    def __iter__(self):
        batches = self.global_batches()
        need = self.per_rank() * self.num_replicas
        batches += batches[: need - len(batches)]  # every process takes the same number of steps
        yield from batches[self.rank::self.num_replicas][self.start:]

    def __len__(self) -> int:
        return self.per_rank() - self.start


def spread_copies(batches: list[list[int]], keys: list, lengths: np.ndarray | None = None) -> int:
    """Swap copies of an example out of a batch that already holds one, in place, with the item of the
    nearest batch (by position in the length order; of that batch, the item closest in length) that
    neither holds that key nor brings a key the first batch has. Never creates a new repeat; returns the
    number of swaps. Deterministic."""
    held = [Counter(keys[i] for i in batch) for batch in batches]
    swaps, n = 0, len(batches)
    for b in range(n):
        for pos in range(len(batches[b])):
            moved = batches[b][pos]
            k = keys[moved]
            if held[b][k] < 2:
                continue
            for nb in (x for d in range(1, n) for x in (b + d, b - d) if 0 <= x < n):
                if k in held[nb]:
                    continue
                options = [q for q, j in enumerate(batches[nb]) if keys[j] not in held[b]]
                if not options:
                    continue
                q = min(options, key=lambda q: abs(int(lengths[batches[nb][q]]) - int(lengths[moved]))) \
                    if lengths is not None else options[0]
                j = batches[nb][q]
                batches[b][pos], batches[nb][q] = j, moved
                for where, out, into in ((b, k, keys[j]), (nb, keys[j], k)):
                    held[where][out] -= 1
                    if not held[where][out]:
                        del held[where][out]
                    held[where][into] += 1
                swaps += 1
                break
    return swaps


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of similar length (order does not matter for metrics, padding does)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def content_keys(examples: list[dict]) -> list[int] | None:
    """Equal keys for copies of one tokenized example (tokens and labels), so that length grouping can
    spread them over batches; None for examples without tokens (images: equal length anyway)."""
    if not examples or "input_ids" not in examples[0]:
        return None
    return [hash((tuple(e["input_ids"]), tuple(e["labels"]) if isinstance(e.get("labels"), list) else e.get("labels")))
            for e in examples]
