"""Helpers shared by the benchmark scripts (they run as `python benchmarks/<script>.py`)."""
from __future__ import annotations

from pathlib import Path


def write_subset(src: Path, dst: Path, n: int | None) -> int:
    """Header + the first n data rows (all when n is None), byte for byte."""
    with src.open("r", encoding="utf-8") as f, dst.open("w", encoding="utf-8") as g:
        g.write(f.readline())
        k = 0
        for line in f:
            if n is not None and k >= n:
                break
            g.write(line)
            k += 1
    return k
