"""What a run cost: time, memory, data seen, compute, energy.

Training FLOPs are estimated with the standard dense-transformer approximation (Kaplan et
al. 2020, "Scaling laws", section 2.1), split for frozen weights:

    flops ~= tokens x (2 N  +  2 N  +  2 N_trainable)
                      forward  backward   backward
                               (inputs)   (weight gradients, trainable weights only)

where N counts the weights of the matrix multiplications (every nn.Linear, transformers'
Conv1D, LoRA's A / B, and an output layer tied to the embeddings), and tokens are the
non-padding training tokens. Embedding lookups, attention scores (which grow with sequence
length), norms and evaluation passes are left out. With all weights trainable this is the
familiar 6 N tokens; with LoRA it is close to 4 N tokens.
"""
from __future__ import annotations

import resource
import time

import torch

ADDITIVE = ("wall_seconds", "cpu_seconds", "gpu_seconds")
ENERGY_ADDITIVE = ("energy_kwh", "co2_kg", "cpu_kwh", "gpu_kwh", "ram_kwh", "duration_s")
FLOPS_FORMULA = "tokens * (4 * N_matmul + 2 * N_matmul_trainable)"


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(N, N_trainable): weights of the layers that multiply activations by a matrix."""
    n = n_train = 0
    seen = set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            n += w.numel()  # counted per module: a tied output layer is a second matmul with the same weights
            if w.requires_grad and id(w) not in seen:
                n_train += w.numel()
            seen.add(id(w))
    return n, n_train


def training_flops(n: int, n_trainable: int, tokens: int) -> float:
    return float(tokens) * (4.0 * n + 2.0 * n_trainable)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class CostClock:
    """Wall and CPU time from `start()`; GPU time as device-seconds held (wall x GPUs in use)."""

    def __init__(self, n_gpus: int = 0):
        self.n_gpus = n_gpus
        self.t0 = time.perf_counter()
        self.c0 = cpu_seconds()

    def read(self) -> dict:
        wall = time.perf_counter() - self.t0
        return {"wall_seconds": wall, "cpu_seconds": cpu_seconds() - self.c0, "gpu_seconds": wall * self.n_gpus}


def accumulate(cost: dict, previous: dict | None) -> dict:
    """A resumed run's cost: this session's plus the earlier sessions' (time, energy); peaks are maxima."""
    if not previous:
        return cost
    out = dict(cost)
    for k in ADDITIVE:
        if isinstance(previous.get(k), (int, float)):
            out[k] = (out.get(k) or 0.0) + previous[k]
    for k in ("host_peak_rss_mb", "device_peak_mb"):
        if isinstance(previous.get(k), (int, float)):
            out[k] = max(out.get(k) or 0.0, previous[k])
    pe, e = previous.get("energy") or {}, dict(out.get("energy") or {})
    if pe.get("energy_kwh") is not None and e.get("energy_kwh") is not None:
        for k in ENERGY_ADDITIVE:
            if isinstance(pe.get(k), (int, float)):
                e[k] = (e.get(k) or 0.0) + pe[k]
        if e["energy_kwh"] > 0:
            e["carbon_intensity_g_per_kwh"] = e["co2_kg"] / e["energy_kwh"] * 1000.0
        out["energy"] = e
        out["energy_kwh"], out["co2_kg"] = e["energy_kwh"], e["co2_kg"]
    elif pe.get("energy_kwh") is not None and "energy" not in cost:  # this session measured none (the cost so far
        out["energy"] = pe                                               # while training): the earlier ones' stands
        out["energy_kwh"], out["co2_kg"] = pe["energy_kwh"], pe.get("co2_kg")
    out["sessions"] = int(previous.get("sessions", 1)) + 1
    return out
