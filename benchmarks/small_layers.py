"""Small layers, where the fixed cost of a call (Python, op dispatch, the autograd node) outweighs the memory
passes: bnfused's module against the unfused eager nn chain on a few small float32 inputs, their rounds
interleaved. On the CPU the eager module runs as one C++ call with a C++ autograd node (functional.py,
csrc/eager_function.cpp); this table shows what that buys where the byte model says nothing."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cases import Case, Suite
from .measure import Timing, time_interleaved
from .peers import EAGER, FUSED, Peer, fused_block, step, unfused_block

SMALL_SHAPES = ((4, 8), (32, 128), (64, 256), (16, 32, 8, 8))
SMALL_MODES = ("train fwd", "train fwd+bwd")


@dataclass(frozen=True)
class SmallLayerResult:
    case: Case
    mode: str
    unfused: Timing
    fused: Timing

    @property
    def speedup(self) -> float:
        return self.unfused.median / self.fused.median


def run_small_layers(suite: Suite, p: float, device: torch.device, threads: int) -> list[SmallLayerResult]:
    results = []
    for shape in SMALL_SHAPES:
        case = Case(shape, torch.float32)
        x = case.make_input(device).requires_grad_()
        grad_out = torch.randn_like(x)
        unfused_module, fused_module = unfused_block(case, p, device), fused_block(case, p, device)
        peers = [Peer(EAGER, unfused_module, unfused_module), Peer(FUSED, fused_module, fused_module)]
        for mode in SMALL_MODES:
            fns = [step(peer, mode, x, grad_out) for peer in peers]
            unfused, fused = time_interleaved(fns, device, threads, min_time=suite.min_time,
                                              max_time=suite.max_time, min_samples=suite.min_samples)
            results.append(SmallLayerResult(case, mode, unfused, fused))
    return results
