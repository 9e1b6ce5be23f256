"""The ResNet block tail relu(bn(x) + residual): bnfused.BatchNormAddReLU2d against the eager unfused chain
(nn.BatchNorm2d, +, relu) and torch.compile of that chain, float32 NCHW, training forward+backward and eval
forward, every peer's rounds interleaved so a slow phase of a shared machine hits them alike."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bnfused
from .measure import Timing, time_interleaved

ADD_RELU_SHAPES = ((64, 64, 56, 56), (32, 256, 28, 28))
ADD_RELU_MODES = ("train fwd+bwd", "eval fwd")
PEERS = ("eager", "compile", "bnfused")


class UnfusedTail(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x, residual):
        return F.relu(self.bn(x) + residual)


@dataclass(frozen=True)
class AddReLUResult:
    shape: tuple[int, ...]
    mode: str
    timings: dict[str, Timing]  # peer -> timing


def _step(forward, module: nn.Module, mode: str, x: torch.Tensor, r: torch.Tensor, grad_out: torch.Tensor):
    module.train(mode != "eval fwd")
    if mode == "eval fwd":
        xe, re = x.detach(), r.detach()

        def run():
            with torch.no_grad():
                return forward(xe, re)
        return run
    inputs = [x, r, *module.parameters()]

    def run():
        return torch.autograd.grad(forward(x, r), inputs, grad_out)
    return run


def run_add_relu(device: torch.device, threads: int, *, min_time: float, max_time: float, min_samples: int,
                 with_compile: bool = True) -> list[AddReLUResult]:
    results = []
    for shape in ADD_RELU_SHAPES:
        x = torch.randn(shape, device=device).requires_grad_()
        r = torch.randn(shape, device=device).requires_grad_()
        grad_out = torch.randn(shape, device=device)
        unfused, fused = UnfusedTail(shape[1]).to(device), bnfused.BatchNormAddReLU2d(shape[1]).to(device)
        compiled = UnfusedTail(shape[1]).to(device)
        forwards = {"eager": (unfused, unfused), "bnfused": (fused, fused)}
        if with_compile:
            forwards["compile"] = (torch.compile(compiled), compiled)
        for mode in ADD_RELU_MODES:
            names = [p for p in PEERS if p in forwards]
            fns = [_step(forwards[p][0], forwards[p][1], mode, x, r, grad_out) for p in names]
            timings = time_interleaved(fns, device, threads, min_time=min_time, max_time=max_time,
                                       min_samples=min_samples)
            results.append(AddReLUResult(shape, mode, dict(zip(names, timings))))
    return results


def add_relu_table(results: list[AddReLUResult]) -> str:
    """Markdown: median ms per peer (slowest/fastest round median in parentheses), bnfused's speedups."""
    lines = ["| shape | mode | eager ms | compile ms | bnfused ms | vs eager | vs compile |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        t = res.timings

        def cell(peer):
            return f"{t[peer].median * 1e3:.2f} ({t[peer].spread:.2f}x)" if peer in t else "-"

        def speedup(peer):
            return f"{t[peer].median / t['bnfused'].median:.2f}x" if peer in t else "-"

        lines.append(f"| {'x'.join(map(str, res.shape))} | {res.mode} | {cell('eager')} | {cell('compile')} | "
                     f"{cell('bnfused')} | {speedup('eager')} | {speedup('compile')} |")
    return "\n".join(lines)
