"""Measurements: medians with IQR from torch.utils.benchmark, the copy bandwidth of the device,
saved-for-backward bytes (saved_tensors_hooks) and the peak memory of a training step (CUDA only)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.utils import benchmark


# A measurement whose rounds' medians differ by more than this factor is noisy: a neighbour loaded the machine
# through most of it, and even its best round may be far from what the code costs.
NOISY_SPREAD = 2.0


@dataclass(frozen=True)
class Timing:
    median: float   # seconds
    iqr: float      # seconds, 75th - 25th percentile of the per-run times
    samples: int
    round_medians: tuple[float, ...] = ()  # seconds, every round's median (time_fn); empty when not in rounds

    @property
    def spread(self) -> float:
        """Slowest round's median over the fastest's (1.0 without rounds)."""
        return max(self.round_medians) / min(self.round_medians) if self.round_medians else 1.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Time of one call, synchronized: the warm-up (and, for torch.compile, the compilation) cost."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_fn(fn: Callable[[], object], device: torch.device, threads: int, *, min_time: float, max_time: float,
            min_samples: int, rounds: int = 3) -> Timing:
    """Median and IQR over blocked_autorange's runs; the run time is stretched so that about min_samples
    samples are taken, but never beyond max_time (slow peers then get fewer samples).

    The run time is split into `rounds` rounds and the round with the lowest median is kept: on a shared
    machine a neighbour's burst inflates whole rounds, and the quietest round is the best estimate of what the
    code costs. Every peer and the copy bandwidth are measured the same way, so ratios stay fair.
    """
    return time_interleaved([fn], device, threads, min_time=min_time, max_time=max_time, min_samples=min_samples,
                            rounds=rounds)[0]


def time_interleaved(fns: Sequence[Callable[[], object]], device: torch.device, threads: int, *, min_time: float,
                     max_time: float, min_samples: int, rounds: int = 3) -> list[Timing]:
    """time_fn of each of fns, with their rounds taken in turn (round 1 of each, then round 2 of each, ...): where
    two measurements are compared with each other, a slow phase of the machine then hits both alike."""
    run_times = []
    for fn in fns:
        estimate = first_call_seconds(fn, device)  # also a warm-up call
        run_times.append(min(max(min_time, min_samples * estimate), max_time))
    timers = [benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads) for fn in fns]
    best: list = [None] * len(fns)
    medians: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, rounds)):
        for i, timer in enumerate(timers):
            m = timer.blocked_autorange(min_run_time=run_times[i] / max(1, rounds))
            medians[i].append(m.median)
            if best[i] is None or m.median < best[i].median:
                best[i] = m
    return [Timing(m.median, m.iqr, len(m.times), tuple(r)) for m, r in zip(best, medians)]


COPY_BYTES = 256 * 2**20  # the reference copy: far beyond any cache


def copy_step(device: torch.device, nbytes: int = COPY_BYTES) -> Callable[[], object]:
    """A no-argument callable copying an nbytes float32 tensor (dst.copy_(src))."""
    src = torch.full((nbytes // 4,), 1.0, device=device)  # written once, so every page is touched
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_gbs(t: Timing, nbytes: int = COPY_BYTES) -> float:
    """GB/s of a copy_step of nbytes timed at t: 2 x nbytes moved (read + write) per copy."""
    return 2 * nbytes / t.median / 1e9


def copy_bandwidth(device: torch.device, threads: int, nbytes: int = COPY_BYTES, min_time: float = 0.5) -> float:
    """GB/s of dst.copy_(src) for an nbytes float32 tensor."""
    t = time_fn(copy_step(device, nbytes), device, threads, min_time=min_time, max_time=max(min_time, 2.0),
                min_samples=10)
    return copy_gbs(t, nbytes)


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct tensors autograd saves while fn() runs (views of one storage counted once)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.data_ptr(), t.dtype, tuple(t.shape), t.stride())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def peak_step_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak allocated bytes above what was live before fn() (a training step), CUDA only; None elsewhere."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak
