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


def versions(packages=("slimtune", "torch", "transformers", "peft", "accelerate", "datasets")) -> dict:
    """Python and package versions, for the results JSON."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict:
    """CPU count and model, torch threads, bf16 / CUDA availability."""
    import os
    import platform

    info = {"cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["avx512_bf16"] = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
        info["cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    return info


def host_bf16() -> bool:
    """Whether slimtune's `precision: auto` picks bf16 here (a GPU with bf16, or a CPU with AVX512-BF16 / AMX), so
    that a benchmark gives the other side the same precision its defaults give slimtune."""
    from slimtune.loading import resolve_precision

    return resolve_precision("auto") == "bf16"


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(vals) - vals[3] - vals[4], sum(vals)


class BusyMeter:
    """Cores kept busy by every process between start() and stop() (ours included: subtract our own CPU time)."""

    def start(self) -> "BusyMeter":
        import time

        self.j0, self.t0 = _cpu_jiffies(), time.perf_counter()
        return self

    def stop(self) -> float | None:
        import os

        try:
            b1, t1 = _cpu_jiffies()
        except (OSError, ValueError, IndexError):
            return None
        b0, t0 = self.j0
        return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


def busy_cores(seconds: float = 2.0) -> float | None:
    """CPU cores kept busy by all processes over the next `seconds` (this one sleeps meanwhile)."""
    import time

    try:
        m = BusyMeter().start()
        time.sleep(seconds)
        return m.stop()
    except (OSError, ValueError, IndexError):
        return None


def wait_until_quiet(max_wait: float, threshold: float = 0.3) -> tuple[float, float | None]:
    """Wait (up to max_wait s) until other processes use < threshold cores; (seconds waited, busy cores)."""
    import time

    t0 = time.perf_counter()
    busy = busy_cores()
    while busy is not None and busy >= threshold and time.perf_counter() - t0 < max_wait:
        busy = busy_cores(5.0)
    return time.perf_counter() - t0, busy


def child_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes of this one."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_result_child(cmd: list[str], wait_quiet: float = 0.0) -> tuple[dict | None, str]:
    """Run a benchmark child that prints one `RESULT {json}` line; (its result or None, its stderr).

    The result gains `other_cores_during`: the cores that other processes kept busy while it ran
    (> ~0.25 on a 2-core machine means its timings are disturbed), and `waited_for_quiet_s`.
    """
    import json
    import subprocess
    import time

    waited, _ = wait_until_quiet(wait_quiet) if wait_quiet else (0.0, None)
    meter, cpu0, t0 = BusyMeter().start(), child_cpu_seconds(), time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    busy, own = meter.stop(), (child_cpu_seconds() - cpu0) / (time.perf_counter() - t0)
    line = next((out_line for out_line in p.stdout.splitlines() if out_line.startswith("RESULT ")), None)
    if line is None:
        return None, p.stderr
    row = json.loads(line[7:])
    row["other_cores_during"] = None if busy is None else round(max(busy - own, 0.0), 3)
    row["waited_for_quiet_s"] = round(waited, 1)
    return row, p.stderr
