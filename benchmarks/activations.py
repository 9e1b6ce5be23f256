"""Every fused activation: bnfused.BatchNormActDropout2d(act=...) against the eager unfused chain
(nn.BatchNorm2d -> the activation's nn module -> nn.Dropout) and torch.compile of that chain, training
forward+backward with dropout, float32 NCHW; and each block against bnfused's own ReLU block, the cost of the
activation's math on top of the memory traffic. Every peer's rounds are interleaved, one activation at a time, so a
slow phase of a shared machine hits them alike. Goals (reported, never asserted): >= 10x eager, >= 5x compile,
<= 1.6x the ReLU block."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import bnfused
from .measure import Timing, saved_bytes, time_interleaved

SHAPE, QUICK_SHAPE = (64, 64, 56, 56), (8, 64, 28, 28)
P = 0.1
ACTIVATIONS = ("relu", "relu6", "leaky_relu", "silu", "hardswish", "gelu", "gelu_tanh", "elu", "mish", "identity")
GOALS = {"eager": 10.0, "compile": 5.0, "relu block": 1.6}


@dataclass(frozen=True)
class ActivationResult:
    act: str
    timings: dict[str, Timing]  # peer -> timing ("eager", "compile", "bnfused", "bnfused relu")
    saved: dict[str, int]       # "eager" / "bnfused" -> bytes saved for backward by one training forward


def _train_step(module: nn.Module, forward, x: torch.Tensor, grad_out: torch.Tensor):
    module.train()
    inputs = [x, *module.parameters()]

    def run():
        return torch.autograd.grad(forward(x), inputs, grad_out)
    return run


def run(device: torch.device, threads: int, *, quick: bool, min_time: float, max_time: float, min_samples: int,
        with_compile: bool = True) -> tuple[tuple[int, ...], list[ActivationResult]]:
    shape = QUICK_SHAPE if quick else SHAPE
    x = (torch.randn(shape, device=device) * 2 + 0.5).requires_grad_()
    grad_out = torch.randn(shape, device=device)
    relu_block = bnfused.BatchNormActDropout2d(shape[1], p=P, act="relu").to(device)
    results = []
    for name in ACTIVATIONS:
        act = bnfused.resolve_activation(name)
        unfused = nn.Sequential(nn.BatchNorm2d(shape[1]), act.module(), nn.Dropout(P)).to(device)
        fused = bnfused.BatchNormActDropout2d(shape[1], p=P, act=act).to(device)
        peers = {"eager": (unfused, unfused), "bnfused": (fused, fused), "bnfused relu": (relu_block, relu_block)}
        if with_compile:
            peers["compile"] = (unfused, torch.compile(unfused, dynamic=False))
        names = list(peers)
        fns = [_train_step(peers[n][0], peers[n][1], x, grad_out) for n in names]
        timings = time_interleaved(fns, device, threads, min_time=min_time, max_time=max_time,
                                   min_samples=min_samples)
        saved = {"eager": saved_bytes(lambda: unfused(x)), "bnfused": saved_bytes(lambda: fused(x))}
        results.append(ActivationResult(str(act), dict(zip(names, timings)), saved))
        torch._dynamo.reset()
    return shape, results


def markdown(shape: tuple[int, ...], results: list[ActivationResult]) -> str:
    """One row per activation: median ms per peer, bnfused's speedups against the goals, its time over the ReLU
    block's, and the bytes each saves for backward."""
    lines = [f"{'x'.join(map(str, shape))} float32 NCHW, train fwd+bwd, p = {P}. Goals: >= {GOALS['eager']:g}x "
             f"eager, >= {GOALS['compile']:g}x compile, <= {GOALS['relu block']:g}x the ReLU block's time.", "",
             "| activation | eager ms | compile ms | bnfused ms | vs eager | vs compile | / ReLU block | "
             "saved MB eager -> bnfused |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r.timings
        ms = {k: f"{v.median * 1e3:.2f}" for k, v in t.items()}
        fused = t["bnfused"].median

        def ratio(peer: str, goal: float) -> str:
            if peer not in t:
                return "-"
            s = t[peer].median / fused
            return f"{s:.1f}x" + ("" if s >= goal else " (below goal)")
        over_relu = fused / t["bnfused relu"].median
        lines.append(f"| {r.act} | {ms['eager']} | {ms.get('compile', '-')} | {ms['bnfused']} | "
                     f"{ratio('eager', GOALS['eager'])} | {ratio('compile', GOALS['compile'])} | "
                     f"{over_relu:.2f}x" + ("" if over_relu <= GOALS["relu block"] else " (below goal)") +
                     f" | {r.saved['eager'] / 2**20:.1f} -> {r.saved['bnfused'] / 2**20:.1f} |")
    return "\n".join(lines)
