"""The speed goals of the CPU and GPU paths, checked against one run's numbers.
Reported, never asserted: a goal not reached is a line marked "below goal" in the output."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cases import CNN_SHAPES, MLP_SHAPES
from .peers import COMPILE, EAGER, FUSED
from .results import RunResults

FWD_BWD, FWD = "train fwd+bwd", "train fwd"


@dataclass(frozen=True)
class Check:
    what: str
    measured: str
    goal: str
    met: bool


def _speedup_checks(run: RunResults, shape, dtypes, needs: dict[str, float]) -> list[Check]:
    checks = []
    for cr in run.cases:
        c = cr.case
        if c.shape != shape or c.dtype not in dtypes:
            continue
        for baseline, factor in needs.items():
            s = run.speedup(cr, FWD_BWD, FUSED, baseline)
            if s is not None:
                checks.append(Check(f"{c.label} {FWD_BWD} vs {baseline}", f"{s:.2f}x", f">= {factor}x",
                                    s >= factor))
    return checks


def _per_byte_checks(run: RunResults) -> list[Check]:
    """channels_last and bfloat16 at least as fast per byte as contiguous float32 of the same shape and mode, from
    the pairs timed with interleaved rounds (parity.py)."""
    checks = []
    for r in run.parity:
        gbs, gbs_ref = run.parity_gbs(r)
        checks.append(Check(f"{r.case.label} {r.mode} GB/s vs {r.ref.label}", f"{gbs:.1f} vs {gbs_ref:.1f}",
                            ">= 1.0x per byte", gbs >= gbs_ref))
    return checks


def cpu_checks(run: RunResults) -> list[Check]:
    f32 = (torch.float32,)
    checks = _speedup_checks(run, CNN_SHAPES[0], f32, {EAGER: 8.0, COMPILE: 7.0})
    checks += _speedup_checks(run, CNN_SHAPES[1], f32, {EAGER: 6.0})
    checks += _speedup_checks(run, MLP_SHAPES[0], f32, {EAGER: 3.0})
    for cr in run.cases:  # training forward within 2x of the copy-bandwidth floor = >= 50 % of copy
        what = f"{cr.case.label} {FWD} within 2x of copy floor"
        if cr.floor is not None:  # rounds interleaved with the copy (copy_floor.py)
            gbs = run.gbs(cr.case, FWD, cr.floor.timing)
            pct = 100.0 * gbs / cr.floor.copy_gbs
            checks.append(Check(what, f"{pct:.0f} % of copy ({gbs:.1f} of {cr.floor.copy_gbs:.1f} GB/s, interleaved)",
                                ">= 50 %", pct >= 50.0))
            continue
        t = cr.timings.get((FWD, FUSED))
        if t is not None:
            pct = run.pct_copy(run.gbs(cr.case, FWD, t))
            checks.append(Check(what, f"{pct:.0f} % of copy", ">= 50 %", pct >= 50.0))
    return checks + _per_byte_checks(run)


def gpu_checks(run: RunResults) -> list[Check]:
    checks = []
    for shape in CNN_SHAPES[:2]:
        checks += _speedup_checks(run, shape, (torch.float32, torch.bfloat16), {EAGER: 2.5, COMPILE: 1.2})
    for cr in run.cases:  # per pass, on the goal shapes (launch latency dominates the small ones)
        if cr.case.shape not in CNN_SHAPES[:2]:
            continue
        for k in cr.kernels:
            pct = run.pct_copy(cr.case.numel * cr.case.element_size * k.passes / k.timing.median / 1e9)
            checks.append(Check(f"{cr.case.label} pass {k.op}", f"{pct:.0f} % of copy", ">= 85 %", pct >= 85.0))
    return checks


def check_goals(run: RunResults, device: torch.device) -> tuple[str, list[Check]]:
    if device.type == "cuda":
        return "GPU", gpu_checks(run)
    return "CPU", cpu_checks(run)
