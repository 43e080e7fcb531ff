"""The one timer of every benchmark here, and the environment each result row carries.

GPU: CUDA-graph replay (`triton.testing.do_bench_cudagraph`), else `do_bench` (events), quantiles
p20 / p50 / p80. CPU: the variants run interleaved in rounds (variant A, B, C, then A, B, C again...)
so that a slow spell of a shared machine hits them all alike; each sample times `inner` calls and
reports one call; min, median, p20 and p80 over the rounds. Ratios are only taken between variants
of the same `measure` call.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Timing:
    """Seconds per call."""
    min: float
    p20: float
    median: float
    p80: float
    samples: int

    def as_dict(self, unit: float = 1e6, suffix: str = "us") -> dict:
        return {f"{k}_{suffix}": v * unit for k, v in asdict(self).items() if k != "samples"} | {
            "samples": self.samples}


def _quantile(values, q):
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _timing(samples) -> Timing:
    return Timing(min(samples), _quantile(samples, 0.2), statistics.median(samples), _quantile(samples, 0.8),
                  len(samples))


def _calibrate(fn: Callable, target_s: float) -> int:
    """Calls per sample so that one sample lasts about target_s."""
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(10_000, int(target_s / one)))


def measure(fns: Mapping[str, Callable], device: torch.device | str = "cpu", *, rounds: int = 10,
            sample_s: float = 0.002, warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time each function of `fns` (no arguments). CPU: `rounds` interleaved rounds, each sample
    about `sample_s` long (at least one call; 0: exactly one call), read on `clock` (wall time; with
    one torch thread, `time.thread_time` leaves out the time a shared machine runs other work instead).
    CUDA: graph replay per function."""
    device = torch.device(device)
    if device.type == "cuda":
        return {name: _cuda_timing(fn) for name, fn in fns.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    inner = {name: _calibrate(fn, sample_s) if sample_s > 0 else 1 for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = inner[name]
            t0 = clock()
            for _ in range(n):
                fn()
            samples[name].append((clock() - t0) / n)
    return {name: _timing(s) for name, s in samples.items()}


def _cuda_timing(fn: Callable) -> Timing:
    import triton.testing as tt

    q = [0.5, 0.2, 0.8]
    try:
        ms = tt.do_bench_cudagraph(fn, rep=50, quantiles=q)
    except Exception:  # not capturable: events around each call instead
        torch.cuda.synchronize()
        ms = tt.do_bench(fn, warmup=25, rep=100, quantiles=q)
    p50, p20, p80 = (x * 1e-3 for x in ms)
    return Timing(p20, p20, p50, p80, 0)


def copy_bandwidth(device: torch.device | str) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write), measured now."""
    device = torch.device(device)
    nbytes = 1 << 30 if device.type == "cuda" else 1 << 26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = measure({"copy": lambda: dst.copy_(src)}, device, rounds=5)["copy"]
    return 2 * nbytes / t.median / 1e9


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out + ("-dirty" if dirty else "")) or "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu") -> dict:
    """What every result row carries: the machine, thread count, versions and the commit."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return dict(device=device.type, device_name=name, cpus=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, triton=triton_version, commit=commit(), python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"))
