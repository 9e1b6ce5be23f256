"""The training forward against the copy-bandwidth floor (the CPU goal "within 2x of the copy floor"), with the rounds
of the bnfused module and of the reference copy interleaved. The run's copy bandwidth is measured at its start
and end, minutes away from a case, and a shared machine's bandwidth drifts up to 2x in that time; interleaved, a
slow phase hits both sides alike."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cases import Suite
from .measure import COPY_BYTES, Timing, copy_gbs, copy_step, time_interleaved
from .peers import Peer, step

FWD = "train fwd"


@dataclass(frozen=True)
class FloorResult:
    timing: Timing    # the bnfused module's training forward
    copy_gbs: float   # the reference copy, timed in the same rounds


def measure_floor(peer: Peer, x: torch.Tensor, grad_out: torch.Tensor, suite: Suite, threads: int,
                  nbytes: int = COPY_BYTES) -> FloorResult:
    fns = [step(peer, FWD, x, grad_out), copy_step(x.device, nbytes)]
    with peer.context():
        t, t_copy = time_interleaved(fns, x.device, threads, min_time=suite.min_time, max_time=suite.max_time,
                                     min_samples=suite.min_samples)
    return FloorResult(t, copy_gbs(t_copy, nbytes))
