"""The numbers one benchmark run collects, and the metrics derived from them (speedups, GB/s, % of copy)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .cases import Case
from .copy_floor import FloorResult
from .kernels import KernelTiming
from .measure import Timing
from .parity import ParityResult
from .small_layers import SmallLayerResult


@dataclass
class CaseResult:
    case: Case
    timings: dict[tuple[str, str], Timing] = field(default_factory=dict)   # (mode, peer) -> timing
    saved_bytes: dict[str, int] = field(default_factory=dict)              # peer -> bytes saved for backward
    peak_bytes: dict[str, int] = field(default_factory=dict)               # peer -> peak of a train step (CUDA)
    warmup_s: dict[str, float] = field(default_factory=dict)               # peer -> first calls (compilation)
    kernels: list[KernelTiming] = field(default_factory=list)
    floor: Optional[FloorResult] = None  # bnfused train fwd interleaved with the reference copy (CPU)


@dataclass
class RunResults:
    meta: dict[str, str]        # device, torch version, date, commit, ... (ordered for the results file)
    peers: list[str]
    modes: tuple[str, ...]
    copy_gbs: float
    cases: list[CaseResult] = field(default_factory=list)
    parity: list[ParityResult] = field(default_factory=list)  # per-byte pairs, rounds interleaved
    small: list[SmallLayerResult] = field(default_factory=list)  # per-call overhead, vs the eager chain
    plot_note: str = ""

    def gbs(self, case: Case, mode: str, t: Timing) -> float:
        return case.bytes_moved(mode) / t.median / 1e9

    def parity_gbs(self, r: ParityResult) -> tuple[float, float]:
        """(GB/s of the case, GB/s of its float32 reference) of one interleaved parity measurement."""
        return self.gbs(r.case, r.mode, r.timing), self.gbs(r.ref, r.mode, r.ref_timing)

    def pct_copy(self, gbs: float) -> float:
        return 100.0 * gbs / self.copy_gbs

    @staticmethod
    def speedup(cr: CaseResult, mode: str, peer: str, baseline: str) -> Optional[float]:
        t, base = cr.timings.get((mode, peer)), cr.timings.get((mode, baseline))
        if t is None or base is None:
            return None
        return base.median / t.median
