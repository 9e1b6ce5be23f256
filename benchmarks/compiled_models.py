"""torch.compile of whole models and of the block alone: the unconverted model against bnfused.convert() of a copy
of it, each eager and compiled, in three modes (train with dropout p > 0, train with p = 0, eval), the four
peers' rounds interleaved in one process. The goal: converted >= 1.0x unconverted, eager and compiled alike.
`python -m benchmarks --only compiled-models` runs this part alone."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import bnfused

from .measure import Timing, time_interleaved
from .models import small_cnn, tv
from .report import fmt_timing

P_TRAIN = 0.1
MODES = ("train p>0", "train p=0", "eval")
PEERS = ("eager", "bnfused", "compile", "bnfused+compile")  # unconverted / converted, eager / torch.compile


def vgg_bn(p: float) -> nn.Module:
    """torchvision's vgg11_bn structure at width 16: Conv -> BN -> ReLU stages (fused with p = 0), classifier
    Linear -> ReLU -> Dropout(p) (unfused in both)."""
    model = tv.vgg11_bn(width=16, num_classes=10, hidden=256, pool=1)
    _set_p(model, p)
    return model


def resnet(p: float) -> nn.Module:
    """torchvision's resnet18 structure at width 16 (no dropout: its BN -> ReLU sites fuse with p = 0)."""
    return tv.resnet18(width=16, num_classes=10)


def block(channels: int) -> Callable[[float], nn.Module]:
    return lambda p: nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(p))


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[float], nn.Module]   # the unconverted model for a dropout probability
    shape: tuple[int, ...]                # input (N, C, H, W)
    classes: int = 0                      # > 0: cross-entropy over a head; 0: backward of a random grad_out
    dropout: bool = True                  # False: the model has no dropout to set, "train p>0" is not run


def workloads(suite: str) -> list[Workload]:
    if suite == "quick":
        return [Workload("small CNN", lambda p: small_cnn(p, width=16), (8, 3, 16, 16), 10)]
    return [Workload("small CNN", small_cnn, (32, 3, 32, 32), 10),
            Workload("block 64x64x56x56", block(64), (64, 64, 56, 56)),
            Workload("block 32x256x28x28", block(256), (32, 256, 28, 28)),
            Workload("vgg11_bn-style", vgg_bn, (16, 3, 32, 32), 10),
            Workload("resnet18-style", resnet, (16, 3, 32, 32), 10, dropout=False)]


@dataclass(frozen=True)
class Row:
    workload: str
    mode: str
    timings: dict[str, Timing]  # peer -> timing

    def ratio(self, faster: str, slower: str) -> float:
        return self.timings[slower].median / self.timings[faster].median


def _droppers(model: nn.Module) -> list[nn.Module]:
    """The model's dropouts with p > 0 (nn.Dropout, or a fused block that took one over): the ones a mode sets."""
    return [m for m in model.modules()
            if isinstance(m, (nn.Dropout, bnfused.modules._BatchNormReLUDropout)) and m.p > 0]


def _set_p(model: nn.Module, p: float, droppers: list[nn.Module] | None = None) -> None:
    for m in _droppers(model) if droppers is None else droppers:
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
            min_samples: int, rounds: int, say: Callable[[str], None] = print) -> list[Row]:
    torch.manual_seed(0)
    unconverted = work.build(P_TRAIN).to(device)
    converted = bnfused.convert(copy.deepcopy(unconverted))
    # Only what had dropout: a fused block standing for BN -> ReLU alone keeps p = 0 in every mode.
    droppers = {id(model): _droppers(model) for model in (unconverted, converted)}
    models = {"eager": unconverted, "bnfused": converted, "compile": unconverted, "bnfused+compile": converted}
    compiled = {"compile": torch.compile(unconverted), "bnfused+compile": torch.compile(converted)}
    x = torch.randn(work.shape, device=device)
    if work.classes:
        target = torch.randint(0, work.classes, (work.shape[0],), device=device)
    else:
        target = torch.randn(work.shape, device=device)
    rows = []
    for mode in MODES if work.dropout else MODES[1:]:
        start = time.perf_counter()
        for model in (unconverted, converted):
            _set_p(model, 0.0 if mode == "train p=0" else P_TRAIN, droppers[id(model)])
            model.train(mode != "eval")
        fns = [_step(compiled.get(peer, models[peer]), models[peer], mode, x, target, work.classes) for peer in PEERS]
        for fn in fns[2:]:  # compile before timing: time_interleaved's first call is its run-time estimate
            fn()
        timings = time_interleaved(fns, device, threads, min_time=min_time, max_time=max_time,
                                   min_samples=min_samples, rounds=rounds)
        row = Row(work.name, mode, dict(zip(PEERS, timings)))
        rows.append(row)
        say(f"    {work.name:<19} {mode:<10} | "
            + " | ".join(f"{peer} {row.timings[peer].median * 1e3:.2f} ms" for peer in PEERS)
            + f" | eager {row.ratio('bnfused', 'eager'):.2f}x, compile {row.ratio('bnfused+compile', 'compile'):.2f}x"
            + f" | {time.perf_counter() - start:.0f} s")
    torch._dynamo.reset()
    return rows


# suite -> (min_time, max_time, min_samples, rounds): more, shorter rounds where a neighbour's burst would otherwise
# land on one peer's only round.
SUITE_TIMES = {"quick": (0.05, 0.2, 3, 2), "default": (0.3, 1.2, 7, 6), "full": (0.6, 3.0, 10, 8)}


def run(suite: str, device: torch.device, threads: int, only: str | None = None,
        say: Callable[[str], None] = print, done: Callable[[list[Row]], None] = lambda rows: None) -> list[Row]:
    """Every workload's rows; done(rows so far) after each workload."""
    min_time, max_time, min_samples, rounds = SUITE_TIMES[suite]
    rows = []
    for work in workloads(suite):
        if only is None or only.lower() in work.name.lower():
            rows += measure(work, device, threads, min_time, max_time, min_samples, rounds, say)
            done(rows)
    return rows


def _verdict(ratio: float) -> str:
    return f"{ratio:.2f}x" + ("" if ratio >= 1.0 else " below goal")


def markdown(rows: list[Row]) -> str:
    lines = [f"One step (train: forward + backward; eval: forward under no_grad), median ms (IQR) of the quietest "
             f"round; the four peers' rounds are interleaved. train p>0 sets every dropout to p = {P_TRAIN} (the "
             "resnet18-style model has none). Ratio = unconverted time / converted time (goal: >= 1.0x).", "",
             "| model | mode | eager ms | bnfused ms | compile ms | bnfused+compile ms | eager ratio | compile ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.workload} | {r.mode} | " + " | ".join(fmt_timing(r.timings[p]) for p in PEERS)
                     + f" | {_verdict(r.ratio('bnfused', 'eager'))} | {_verdict(r.ratio('bnfused+compile', 'compile'))} |")
    return "\n".join(lines)
