"""Per-byte parity (a CPU goal): channels_last and bfloat16 cases against contiguous float32 of the same shape, the
bnfused module timed with the rounds of the two cases interleaved. In the main table the two are measured
minutes apart, so on a shared machine (whose bandwidth drifts 30-40 % between runs) their ratio would also
compare two phases of the machine.

For reduced-precision training modes the dropout mask of the same shape is timed alone too, in the same rounds
(ops.dropout_mask: Philox at its cheapest, one keep byte per element). bfloat16 halves the bytes of every pass
but not the Philox work of its mask, so the table shows that cost next to the time the case would have to take
to match float32 per byte."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bnfused import ops

from .cases import MODES, Case, Suite
from .measure import Timing, time_interleaved
from .peers import FUSED, Peer, fused_block, step


@dataclass(frozen=True)
class ParityResult:
    case: Case      # channels_last or reduced precision
    ref: Case       # contiguous float32, same shape
    mode: str
    timing: Timing
    ref_timing: Timing
    mask_timing: Optional[Timing] = None  # the case's dropout mask alone (reduced-precision training modes)

    @property
    def budget_s(self) -> float:
        """Seconds the case may take to move its bytes as fast as the reference moves its own."""
        return self.ref_timing.median * self.case.bytes_moved(self.mode) / self.ref.bytes_moved(self.mode)


def parity_pairs(cases: tuple[Case, ...]) -> list[tuple[Case, Case]]:
    """(case, its contiguous float32 reference) for every non-reference case whose reference is in `cases`."""
    refs = {c.shape: c for c in cases if c.dtype == torch.float32 and not c.channels_last}
    return [(c, refs[c.shape]) for c in cases
            if (c.dtype, c.channels_last) != (torch.float32, False) and c.shape in refs]


def mask_step(case: Case, p: float, device: torch.device) -> Callable[[], object]:
    """The case's dropout keep mask alone (bool, logical order), from the same Philox stream the kernels use."""
    key = torch.tensor([1234, 0], dtype=torch.int64, device=device)
    return lambda: ops.dropout_mask(key, list(case.shape), p)


def needs_mask_timing(case: Case, ref: Case, mode: str, p: float) -> bool:
    return mode != "eval fwd" and p > 0 and case.element_size < ref.element_size


def measure_parity(suite: Suite, p: float, device: torch.device, threads: int) -> list[ParityResult]:
    results = []
    for case, ref in parity_pairs(suite.cases):
        sides = []
        for c in (case, ref):
            module = fused_block(c, p, device)
            x = c.make_input(device).requires_grad_()
            sides.append((Peer(FUSED, module, module), x, torch.randn_like(x)))
        for mode in MODES:
            fns = [step(peer, mode, x, grad_out) for peer, x, grad_out in sides]
            with_mask = needs_mask_timing(case, ref, mode, p)
            if with_mask:
                fns.append(mask_step(case, p, device))
            timings = time_interleaved(fns, device, threads, min_time=suite.min_time, max_time=suite.max_time,
                                       min_samples=suite.min_samples)
            results.append(ParityResult(case, ref, mode, timings[0], timings[1], timings[2] if with_mask else None))
        del sides
    return results
