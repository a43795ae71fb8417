"""Seeded train/eval splits; stratified by label for classification."""
from __future__ import annotations

import math

import numpy as np


def split_indices(n: int, fraction: float, seed: int, labels: list | None = None) -> tuple[list[int], list[int]]:
    """(train_idx, eval_idx). With labels, every class keeps at least one example on each side."""
    rng = np.random.default_rng(seed)
    if labels is None:
        perm = rng.permutation(n)
        k = max(1, int(round(n * fraction)))
        return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())
    by_class: dict = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, evals = [], []
    for y in sorted(by_class, key=str):
        idx = np.array(by_class[y])
        rng.shuffle(idx)
        k = min(len(idx) - 1, max(1, math.floor(len(idx) * fraction + 0.5)))
        evals += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(evals)


def subset_indices(n: int, k: int, seed: int, labels: list | None = None) -> list[int]:
    """k of n indices, a seeded random sample; with labels, every class that k leaves room for keeps an example
    (one random example of each class first, classes in random order, then the rest at random), so a small
    subset of a many-class set still covers its classes."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    if labels is None or k >= n:
        return sorted(order[:k])
    first: dict = {}
    for i in order:
        first.setdefault(labels[i], i)
    chosen = list(first.values())[:k]
    taken = set(chosen)
    chosen += [i for i in order if i not in taken][:k - len(chosen)]
    return sorted(chosen)
