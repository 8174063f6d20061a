"""The suite's timing rule: wall clock of one call, device synchronised, with peak memory.

``timed_call`` is used by every system's test step and by the performance harness, so a
runtime in the leaderboard and a figure from ``regbench perf`` mean the same thing.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the call (MB); on CPU,
the peak resident set size of the process sampled every ``rss_interval_s`` during the call
(MB, from ``/proc/self/statm``; where that is missing, the process's lifetime peak
``ru_maxrss``). CPU figures therefore include the process's baseline (Python, torch, data).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["CallStats", "RssSampler", "timed_call", "current_rss_mb", "peak_rss_mb", "device_description"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_mb() -> float:
    """Resident set size of this process now, MB (lifetime peak where /proc is absent)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own memory image, MB (``VmHWM``).

    Not ``ru_maxrss``: on Linux that survives ``exec``, so a child started with
    ``subprocess`` (fork, then exec of a fresh interpreter) reports its parent's peak when
    the parent was larger (measured: a 14 MB child of an 800 MB parent read 790 MB; a
    FireANTs child read 3,687 MB, regbench's own peak, for its real ~2,437 MB). ``VmHWM``
    belongs to the address space, which ``exec`` replaces. Falls back to ``ru_maxrss``
    where ``/proc`` is absent.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class CallStats:
    """Wall-clock seconds and peak memory (MB) of one call."""

    seconds: float
    peak_mem_mb: float


class RssSampler:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.peak = current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss_mb())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mb())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # pragma: no cover - no mps in CI
        torch.mps.synchronize()


def timed_call(fn: Callable[[], Any], device: torch.device | str = "cpu", rss_interval_s: float = 0.005) -> tuple[Any, CallStats]:
    """Run ``fn()`` once, timed between device synchronisations.

    Returns:
        ``(fn's result, CallStats(seconds, peak_mem_mb))``.
    """
    device = torch.device(device)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        dt = time.perf_counter() - t0
        return out, CallStats(dt, torch.cuda.max_memory_allocated(device) / 2**20)
    with RssSampler(rss_interval_s) as sampler:
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        dt = time.perf_counter() - t0
    return out, CallStats(dt, sampler.peak)


def device_description(device: torch.device | str) -> dict[str, Any]:
    """Device name, torch threads and versions, for run records."""
    device = torch.device(device)
    info: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        import platform

        info["device_name"] = platform.processor() or platform.machine()
        info["cpu_count"] = os.cpu_count()
    return info
