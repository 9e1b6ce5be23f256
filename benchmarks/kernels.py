"""Per-pass timing of bnfused's training step: each torch.ops.bnfused op on its own, with its own byte count,
so a slow pass shows up (issue 9 asks for >= 85 % of the copy bandwidth per pass on a GPU)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bnfused import ops

from cases import Case
from measure import Timing, time_fn

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
    sum_g, sum_g_xhat = ops.backward_reduce(grad_out, x, mean, rstd, weight, bias, key, p)
    count = x.numel() // c
    calls = {
        "batch_stats_update": lambda: ops.batch_stats_update(x, running_mean, running_var, 0.1, 1e-5),
        "forward": lambda: ops.forward(x, mean, rstd, weight, bias, key, p, True),
        "backward_reduce": lambda: ops.backward_reduce(grad_out, x, mean, rstd, weight, bias, key, p),
        "backward_input": lambda: ops.backward_input(grad_out, x, mean, rstd, weight, bias, key, p, sum_g,
                                                     sum_g_xhat, count),
    }
    return [KernelTiming(op, passes, time_fn(calls[op], device, threads, min_time=min_time, max_time=max_time,
                                             min_samples=min_samples))
            for op, passes in KERNEL_PASSES]
