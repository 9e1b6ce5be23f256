#!/usr/bin/env python
"""torch.compile of whole models and of the block alone: the unconverted model against bnfused.convert() of a copy
of it, each eager and compiled, in three modes (train with dropout p > 0, train with p = 0, eval), the four
peers' rounds interleaved in one process. The goal: converted >= 1.0x unconverted, eager and compiled alike.

    python benchmarks/compiled_models.py [--quick] [--only NAME]   # prints the markdown table
    run(suite, device, threads) -> list[Row]; markdown(rows) -> str  # for bench.py
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bnfused  # noqa: E402
from measure import Timing, time_interleaved  # noqa: E402

P_TRAIN = 0.1
MODES = ("train p>0", "train p=0", "eval")
PEERS = ("eager", "bnfused", "compile", "bnfused+compile")  # unconverted / converted, eager / torch.compile


def small_cnn(p: float) -> nn.Module:
    """Conv -> BN -> ReLU -> Dropout, twice, then a linear head (3x32x32 images)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.Dropout(p),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.Dropout(p),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def vgg_bn(p: float) -> nn.Module:
    """A narrow vgg11_bn: Conv -> BN -> ReLU stages with max pooling, classifier Linear -> ReLU -> Dropout."""
    layers: list[nn.Module] = []
    cin = 3
    for v in (32, "M", 64, "M", 128, 128, "M", 256, 256, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(256 * 2 * 2, 256), nn.ReLU(True), nn.Dropout(p),
                         nn.Linear(256, 256), nn.ReLU(True), nn.Dropout(p), nn.Linear(256, 10))


class _BasicBlock(nn.Module):
    """torchvision's BasicBlock with a Dropout after the first ReLU (the pair convert() fuses)."""

    def __init__(self, cin: int, cout: int, stride: int, p: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.body = nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.Dropout(p))
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(self.body(self.conv1(x)))) + self.downsample(x))


def resnet_like(p: float) -> nn.Module:
    """A narrow resnet: Conv -> BN -> ReLU stem and three stages of basic blocks."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        _BasicBlock(32, 32, 1, p), _BasicBlock(32, 64, 2, p), _BasicBlock(64, 128, 2, p),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def block(channels: int) -> Callable[[float], nn.Module]:
    return lambda p: nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(p))


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[float], nn.Module]   # the unconverted model for a dropout probability
    shape: tuple[int, ...]                # input (N, C, H, W)
    classes: int = 0                      # > 0: cross-entropy over a head; 0: backward of a random grad_out


def workloads(suite: str) -> list[Workload]:
    if suite == "quick":
        return [Workload("small CNN", small_cnn, (8, 3, 16, 16), 10)]
    return [Workload("small CNN", small_cnn, (32, 3, 32, 32), 10),
            Workload("VGG-bn style", vgg_bn, (16, 3, 32, 32), 10),
            Workload("ResNet style", resnet_like, (16, 3, 32, 32), 10),
            Workload("block 64x64x56x56", block(64), (64, 64, 56, 56)),
            Workload("block 32x256x28x28", block(256), (32, 256, 28, 28))]


@dataclass(frozen=True)
class Row:
    workload: str
    mode: str
    timings: dict[str, Timing]  # peer -> timing

    def ratio(self, faster: str, slower: str) -> float:
        return self.timings[slower].median / self.timings[faster].median


def _set_p(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Dropout, bnfused.modules._BatchNormReLUDropout)):
            m.p = p


def _step(forward: Callable, model: nn.Module, mode: str, x: torch.Tensor, target: torch.Tensor,
          classes: int) -> Callable[[], object]:
    if mode == "eval":
        def run_eval():
            with torch.no_grad():
                return forward(x)
        return run_eval

    def run_train():
        model.zero_grad(set_to_none=True)
        out = forward(x)
        loss = nn.functional.cross_entropy(out, target) if classes else (out * target).sum()
        loss.backward()
    return run_train


def measure(work: Workload, device: torch.device, threads: int, min_time: float, max_time: float,
            min_samples: int, say: Callable[[str], None] = print) -> list[Row]:
    torch.manual_seed(0)
    unconverted = work.build(P_TRAIN).to(device)
    converted = bnfused.convert(copy.deepcopy(unconverted))
    models = {"eager": unconverted, "bnfused": converted, "compile": unconverted, "bnfused+compile": converted}
    compiled = {"compile": torch.compile(unconverted), "bnfused+compile": torch.compile(converted)}
    x = torch.randn(work.shape, device=device)
    if work.classes:
        target = torch.randint(0, work.classes, (work.shape[0],), device=device)
    else:
        target = torch.randn(work.shape, device=device)
    rows = []
    for mode in MODES:
        start = time.perf_counter()
        for model in (unconverted, converted):
            _set_p(model, 0.0 if mode == "train p=0" else P_TRAIN)
            model.train(mode != "eval")
        fns = [_step(compiled.get(peer, models[peer]), models[peer], mode, x, target, work.classes) for peer in PEERS]
        for fn in fns[2:]:  # compile before timing: time_interleaved's first call is its run-time estimate
            fn()
        timings = time_interleaved(fns, device, threads, min_time=min_time, max_time=max_time,
                                   min_samples=min_samples)
        row = Row(work.name, mode, dict(zip(PEERS, timings)))
        rows.append(row)
        say(f"    {work.name:<19} {mode:<10} | "
            + " | ".join(f"{peer} {row.timings[peer].median * 1e3:.2f} ms" for peer in PEERS)
            + f" | eager {row.ratio('bnfused', 'eager'):.2f}x, compile {row.ratio('bnfused+compile', 'compile'):.2f}x"
            + f" | {time.perf_counter() - start:.0f} s")
    torch._dynamo.reset()
    return rows


SUITE_TIMES = {"quick": (0.05, 0.2, 3), "default": (0.25, 1.0, 7), "full": (0.5, 3.0, 10)}


def run(suite: str, device: torch.device, threads: int, only: str | None = None,
        say: Callable[[str], None] = print) -> list[Row]:
    min_time, max_time, min_samples = SUITE_TIMES[suite]
    rows = []
    for work in workloads(suite):
        if only is None or only.lower() in work.name.lower():
            rows += measure(work, device, threads, min_time, max_time, min_samples, say)
    return rows


def _cell(t: Timing) -> str:
    return f"{t.median * 1e3:.2f} ({t.iqr * 1e3:.2f})"


def _verdict(ratio: float) -> str:
    return f"{ratio:.2f}x" + ("" if ratio >= 1.0 else " below goal")


def markdown(rows: list[Row]) -> str:
    lines = [f"Per step, median ms (IQR); train p>0 uses p = {P_TRAIN}. Ratio = unconverted / converted time (goal: "
             ">= 1.0x); the four peers' rounds are interleaved.", "",
             "| model | mode | eager ms | bnfused ms | compile ms | bnfused+compile ms | eager ratio | compile ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.workload} | {r.mode} | " + " | ".join(_cell(r.timings[p]) for p in PEERS)
                     + f" | {_verdict(r.ratio('bnfused', 'eager'))} | {_verdict(r.ratio('bnfused+compile', 'compile'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true", help="longer timing runs")
    parser.add_argument("--only", help="run the workloads whose name contains this")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    suite = "quick" if args.quick else "full" if args.full else "default"
    start = time.perf_counter()
    rows = run(suite, torch.device("cpu"), args.threads, args.only)
    print(markdown(rows))
    print(f"total: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
