"""Per-byte parity (issue 5): channels_last and bfloat16 cases against contiguous float32 of the same shape, the
bnfused module timed with the rounds of the two cases interleaved. In the main table the two are measured
minutes apart, so on a shared machine (whose bandwidth drifts 30-40 % between runs) their ratio would also
compare two phases of the machine."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cases import MODES, Case, Suite
from measure import Timing, time_interleaved
from peers import FUSED, Peer, fused_block, step


@dataclass(frozen=True)
class ParityResult:
    case: Case      # channels_last or reduced precision
    ref: Case       # contiguous float32, same shape
    mode: str
    timing: Timing
    ref_timing: Timing


def parity_pairs(cases: tuple[Case, ...]) -> list[tuple[Case, Case]]:
    """(case, its contiguous float32 reference) for every non-reference case whose reference is in `cases`."""
    refs = {c.shape: c for c in cases if c.dtype == torch.float32 and not c.channels_last}
    return [(c, refs[c.shape]) for c in cases
            if (c.dtype, c.channels_last) != (torch.float32, False) and c.shape in refs]


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
            t, t_ref = time_interleaved(fns, device, threads, min_time=suite.min_time, max_time=suite.max_time,
                                        min_samples=suite.min_samples)
            results.append(ParityResult(case, ref, mode, t, t_ref))
        del sides
    return results
