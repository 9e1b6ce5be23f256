"""Real model code (torchvision's and timm's own definitions, tests/real_models.py): per model, the BatchNorm sites
bnfused.convert() fuses, the bytes autograd saves for backward in one training forward, unconverted against
converted, and the training step's time ratio (rounds alternating between the two). Goals (reported, never
asserted): saved bytes >= 25 % less on efficientnet_b0 and mobilenet_v2, >= 10 % less on mobilenet_v3_large, and a
step at least as fast as the unconverted one. Models whose library is absent are left out with a line saying so."""
from __future__ import annotations

import copy
import statistics
import warnings
from dataclasses import dataclass

import torch
from torch import nn

import bnfused

from .end_to_end import train_step
from .measure import Timing, saved_bytes, time_interleaved
from .models import real_models

CLASSES = 10
BATCH, SIZE = 8, 128
QUICK_MODELS = ("tv_mobilenet_v2",)
# Saved-bytes goals (fraction saved at least) for the models the issue of fusing every activation names.
SAVED_GOALS = {"tv_mobilenet_v2": 0.25, "tv_efficientnet_b0": 0.25, "timm_efficientnet_b0": 0.25,
               "tv_mobilenet_v3_large": 0.10, "timm_mobilenetv3_large_100": 0.10}


@dataclass(frozen=True)
class RealModelResult:
    name: str
    batch_norms: int
    fused: int
    saved_unconverted: int
    saved_converted: int
    unconverted: Timing
    converted: Timing

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.saved_converted / self.saved_unconverted

    @property
    def speedup(self) -> float:
        """Median over rounds of unconverted / converted step time (the rounds alternate)."""
        return statistics.median(u / c for u, c in zip(self.unconverted.round_medians, self.converted.round_medians))


def measure(name: str, device: torch.device, threads: int, *, quick: bool) -> RealModelResult | None:
    model = real_models.build(name)
    if model is None:
        return None
    model = model.to(device).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted, report = bnfused.convert_with_report(copy.deepcopy(model))
    images = torch.randn(BATCH, 3, SIZE, SIZE, device=device)
    labels = torch.randint(0, CLASSES, (BATCH,), device=device)
    saved = [saved_bytes(lambda m=m: m(images)) for m in (model, converted)]
    steps = [train_step(model, images, labels), train_step(converted, images, labels)]
    for step in steps:  # warm-up: allocator, momentum buffers
        step()
    min_time, max_time, min_samples, rounds = (0.05, 0.5, 2, 2) if quick else (0.5, 3.0, 3, 5)
    timings = time_interleaved(steps, device, threads, min_time=min_time, max_time=max_time,
                               min_samples=min_samples, rounds=rounds)
    batch_norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return RealModelResult(name, batch_norms, report.num_fused, saved[0], saved[1], *timings)


def run(device: torch.device, threads: int, quick: bool = False) -> tuple[list[RealModelResult], list[str]]:
    """The results, and the models left out (library absent)."""
    results, absent = [], []
    for name in (QUICK_MODELS if quick else tuple(real_models.MODELS)):
        r = measure(name, device, threads, quick=quick)
        (results.append(r) if r is not None else absent.append(name))
    return results, absent


def markdown(results: list[RealModelResult], absent: list[str]) -> str:
    lines = [f"Input {BATCH}x3x{SIZE}x{SIZE}, one training step (forward, cross-entropy backward, SGD); saved = the "
             "distinct tensors autograd saves in the forward.", "",
             "| model | BNs fused / all | saved MB unconverted -> converted | saved less | goal | step speedup | goal |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        goal = SAVED_GOALS.get(r.name)
        saved_goal = "-" if goal is None else (f">= {goal:.0%}" + ("" if r.saved_fraction >= goal else " below goal"))
        step_goal = ">= 1.0x" + ("" if r.speedup >= 1.0 else " below goal")
        lines.append(f"| {r.name} | {r.fused} / {r.batch_norms} | {r.saved_unconverted / 2**20:.1f} -> "
                     f"{r.saved_converted / 2**20:.1f} | {r.saved_fraction:.1%} | {saved_goal} | "
                     f"{r.speedup:.2f}x ({r.unconverted.median * 1e3:.0f} -> {r.converted.median * 1e3:.0f} ms) | "
                     f"{step_goal} |")
    if absent:
        lines += ["", "Not measured (torchvision or timm not installed): " + ", ".join(absent)]
    return "\n".join(lines)
