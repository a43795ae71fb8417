"""Length-grouped training batches: a permutation per epoch, deterministic, and copies of one example
spread over batches instead of sorted next to each other."""
from collections import Counter

import numpy as np

from slimtune.data.batching import LengthGroupedBatches, spread_copies


def _data(n_distinct=60, copies=(1, 2, 3, 5), seed=0):
    rng = np.random.default_rng(seed)
    lengths, keys = [], []
    for k in range(n_distinct):
        length = int(rng.integers(5, 80))
        for _ in range(copies[k % len(copies)]):
            lengths.append(length)
            keys.append(k)
    return lengths, keys


def _repeats(batches, keys):
    return sum(c - 1 for b in batches for c in Counter(keys[i] for i in b).values())


def _padded(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_copies_are_spread_and_every_example_is_seen_once_per_epoch():
    lengths, keys = _data()
    plain = LengthGroupedBatches(lengths, 8, seed=3, mega=50)
    spread = LengthGroupedBatches(lengths, 8, seed=3, mega=50, keys=keys)
    for epoch in range(3):
        plain.set_epoch(epoch)
        spread.set_epoch(epoch)
        a, b = plain.global_batches(), spread.global_batches()
        assert sorted(i for x in b for i in x) == list(range(len(lengths)))
        assert [len(x) for x in a] == [len(x) for x in b]
        assert _repeats(a, keys) > 10  # sorting by length put copies together
        assert _repeats(b, keys) == 0
        # swaps are with the nearest batches, the closest length first: padded tokens grow by ~11% on this
        # copy-heavy data (2.6 copies per example on average), where sorting alone would pack copies together
        assert _padded(b, lengths) <= 1.15 * _padded(a, lengths)


def test_spreading_is_deterministic_and_a_no_op_without_copies():
    lengths, keys = _data()
    s1 = LengthGroupedBatches(lengths, 8, seed=5, keys=keys)
    s2 = LengthGroupedBatches(lengths, 8, seed=5, keys=list(keys))
    assert s1.global_batches() == s2.global_batches()
    unique = list(range(len(lengths)))
    assert LengthGroupedBatches(lengths, 8, seed=5, keys=unique).global_batches() == \
        LengthGroupedBatches(lengths, 8, seed=5).global_batches()


def test_spread_copies_never_adds_a_repeat_when_copies_outnumber_batches():
    keys = [0] * 7 + list(range(1, 6))  # 7 copies of one example, 3 batches of 4
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    spread_copies(batches, keys)
    assert sorted(i for b in batches for i in b) == list(range(12))
    # 7 copies in 3 batches of 4: at best 3 + 2 + 2 -> at least 4 repeats remain, never more than before
    assert 4 <= _repeats(batches, keys) < 6


def test_resume_position_and_sharding_unchanged_by_spreading():
    lengths, keys = _data()
    full = LengthGroupedBatches(lengths, 4, seed=1, keys=keys, num_replicas=2, rank=0)
    full.set_epoch(1)
    whole = list(full)
    resumed = LengthGroupedBatches(lengths, 4, seed=1, keys=keys, num_replicas=2, rank=0)
    resumed.set_epoch(1, start=3)
    assert list(resumed) == whole[3:]
    other = LengthGroupedBatches(lengths, 4, seed=1, keys=keys, num_replicas=2, rank=1)
    other.set_epoch(1)
    seen = [i for b in whole + list(other) for i in b]
    assert set(seen) == set(range(len(lengths)))
