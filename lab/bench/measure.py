"""Measurement helpers of the benchmark suites (``lab.bench``) and the comparison: interleaved timing,
memory, machine description.

Model-agnostic on purpose (``ldm`` never imports ``autoencoder``): the script builds the models and hands
callables to these functions.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Median wall seconds per call of each function, the candidates interleaved round-robin.

    Interleaving makes a machine that slows down (other load, thermals) slow every candidate alike, so
    the *ratios* stay meaningful even when the absolute numbers drift.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextmanager
def count_saved_bytes(exclude: Iterable[nn.Parameter] = ()) -> Iterator[dict]:
    """Count the bytes autograd saves for backward inside the block (distinct storages, parameters excluded).

    Yields a dict whose ``"bytes"`` is final when the block exits. Tensors that share a storage (views,
    the same activation saved by two ops) count once, as they occupy memory once.
    """
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}
    result = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water mark of the resident set size of this process (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensors alive during ``fn`` beyond those alive before it: the CPU counterpart of
    CUDA's ``max_memory_allocated``, replayed from the profiler's allocator events.

    Unlike RSS this excludes memory that is not tensors (oneDNN's primitive and weight caches, the malloc
    arena), so it compares models' activation memory the way the CUDA figure does.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw (kineto) events keep every allocation (+bytes) and free (-bytes) with its timestamp; the
    # aggregated FunctionEvents do not, and a peak needs the running sum in time order.
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_memory_growth(fn: Callable[[], object], device: torch.device | str) -> int:
    """Bytes by which ``fn`` raises the peak of allocated tensor memory (CUDA or CPU allocator)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return cpu_peak_allocated_bytes(fn)


def peak_rss_growth(fn: Callable[[], object]) -> int:
    """Bytes by which ``fn`` raises this process's peak RSS (a per-process high-water mark: call it once, in
    a fresh process, before anything else large has run)."""
    before = current_rss_bytes()
    fn()
    return peak_rss_bytes() - before


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What a benchmark result needs next to it: hardware, software, threads, load, date."""
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "load_avg": load_average()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(rows: list[dict]) -> str:
    """Plain-text table per suite (rows carry a ``"suite"`` key)."""
    lines = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        sub = [r for r in rows if r["suite"] == suite]
        keys = list(dict.fromkeys(k for r in sub for k in r if k != "suite"))
        widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in sub)) for k in keys}
        lines += [f"\n[{suite}]", "  ".join(k.ljust(widths[k]) for k in keys)]
        lines += ["  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys) for r in sub]
    return "\n".join(lines)
