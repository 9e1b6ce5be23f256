"""Per-pass timing of bnfused's training step: each torch.ops.bnfused op on its own, with its own byte count,
so a slow pass shows up (the GPU goal is >= 85 % of the copy bandwidth per pass). The ops are the ones
the module's step runs: on the CPU (0 < p < 1) forward_keep_bits, and the backward ops reading its keep bits; on
CUDA forward, and the backward ops regenerating the mask from the key."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bnfused import ops
from bnfused.autograd import _saves_keep_bits

from .cases import Case
from .measure import Timing, time_fn

# Full-tensor passes of each op (element reads + writes); they add up to the 8 passes of train fwd+bwd.
KERNEL_PASSES = (
    ("batch_stats_update", 1),   # read x
    ("forward", 2),              # read x, write y
    ("backward_reduce", 2),      # read dy, x
    ("backward_input", 3),       # read dy, x, write dx
)


@dataclass(frozen=True)
class KernelTiming:
    op: str
    passes: int
    timing: Timing


def time_kernels(case: Case, x: torch.Tensor, grad_out: torch.Tensor, p: float, threads: int, *,
                 min_time: float, max_time: float, min_samples: int) -> list[KernelTiming]:
    device = x.device
    c = case.shape[1]
    x = x.detach()
    running_mean = torch.zeros(c, device=device)
    running_var = torch.ones(c, device=device)
    weight = torch.ones(c, device=device)
    bias = torch.zeros(c, device=device)
    key = ops.philox_key(device, seed=1234)
    mean, rstd = ops.batch_stats_update(x, running_mean, running_var, 0.1, 1e-5)
    bits = ops.forward_keep_bits(x, mean, rstd, weight, bias, key, p, True)[1] if _saves_keep_bits(x, p) else None
    sum_g, sum_g_xhat = ops.backward_reduce(grad_out, x, mean, rstd, weight, bias, key, p, bits)
    count = x.numel() // c
    calls = {
        "batch_stats_update": lambda: ops.batch_stats_update(x, running_mean, running_var, 0.1, 1e-5),
        "forward": lambda: ops.forward(x, mean, rstd, weight, bias, key, p, True),
        "forward_keep_bits": lambda: ops.forward_keep_bits(x, mean, rstd, weight, bias, key, p, True),
        "backward_reduce": lambda: ops.backward_reduce(grad_out, x, mean, rstd, weight, bias, key, p, bits),
        "backward_input": lambda: ops.backward_input(grad_out, x, mean, rstd, weight, bias, key, p, sum_g,
                                                     sum_g_xhat, count, bits),
    }
    timings = []
    for op, passes in KERNEL_PASSES:
        if op == "forward" and bits is not None:
            op = "forward_keep_bits"  # its keep bits (1/32 of a float32 pass) are not counted, as masks are not
        timings.append(KernelTiming(op, passes, time_fn(calls[op], device, threads, min_time=min_time,
                                                        max_time=max_time, min_samples=min_samples)))
    return timings
