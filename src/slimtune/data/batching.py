"""Length-grouped, seeded, resumable batches for training; length-sorted batches for eval.

Padding is the largest waste in text batches. We shuffle, cut the order into
mega-batches of `mega` batches, sort each by length and cut it into batches, then
shuffle the batch order (the longest batch goes first, so an out-of-memory shows at
step 1, not hours in). The order depends only on (seed, epoch), and the sampler
shards batches across processes itself, so a resumed run sees exactly the
batches the interrupted one would have seen.
"""
from __future__ import annotations

import math

import numpy as np


class LengthGroupedBatches:
    def __init__(self, lengths, batch_size: int, seed: int, group_by_length: bool = True,
                 num_replicas: int = 1, rank: int = 0, mega: int = 50):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group_by_length
        self.num_replicas = num_replicas
        self.rank = rank
        self.mega = mega
        self.epoch = 0
        self.start = 0
        self.shared: dict | None = None  # set_epoch writes the epoch here too (read by collate functions)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch`, skipping this process's first `start` batches (resume)."""
        self.epoch, self.start = epoch, start
        if self.shared is not None:
            self.shared["epoch"] = epoch

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
            batches += [mb[j:j + bs].tolist() for j in range(0, len(mb), bs)]
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


def eval_batches(lengths, batch_size: int) -> list[list[int]]:
    """Batches of similar length (order does not matter for metrics, padding does)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
