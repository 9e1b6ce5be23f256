"""End to end: one training step (forward, cross-entropy backward, SGD) of a small CNN and of torchvision-structured
models (models.py), each unconverted against bnfused.convert() of a copy, timed with measure.time_interleaved (rounds
alternating between the two), and the sites convert() fused out of the sites the model holds."""
from __future__ import annotations

import copy
import statistics
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

import bnfused

from .measure import Timing, time_interleaved
from .models import count_sites, small_cnn, tv

CLASSES = 10
# name -> (builder, batch, image size): the torchvision structures at full depth (every site of the real model),
# widths cut so that one step takes tens of milliseconds on a 2-core CPU.
MODELS = {
    "small CNN": (partial(small_cnn, p=0.1, classes=CLASSES), 32, 32),
    "resnet18": (partial(tv.resnet18, width=16, num_classes=CLASSES), 8, 64),
    "resnet50": (partial(tv.resnet50, width=8, num_classes=CLASSES), 8, 64),
    "densenet121": (partial(tv.densenet121, growth_rate=8, num_init_features=16, num_classes=CLASSES), 8, 64),
    "vgg11_bn": (partial(tv.vgg11_bn, width=16, num_classes=CLASSES, hidden=64, pool=1), 8, 64),
    "mobilenet_v2": (partial(tv.mobilenet_v2, width_mult=0.5, num_classes=CLASSES), 8, 64),
}
QUICK_MODELS = ("small CNN", "resnet18")


@dataclass(frozen=True)
class ModelResult:
    name: str
    batch: int
    image_size: int
    fused_sites: int
    sites: dict            # kind -> count in the model (models.count_sites)
    unfused: Timing        # one training step, the quietest round
    converted: Timing

    @property
    def round_ratios(self) -> tuple[float, ...]:
        """Per round: unfused median / converted median (the rounds alternate, so a slow phase hits both)."""
        return tuple(u / c for u, c in zip(self.unfused.round_medians, self.converted.round_medians))

    @property
    def speedup(self) -> float:
        return statistics.median(self.round_ratios)

    @property
    def speedup_iqr(self) -> tuple[float, float]:
        q = statistics.quantiles(self.round_ratios, n=4) if len(self.round_ratios) > 1 else [self.speedup] * 3
        return q[0], q[2]


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()

    return step


def measure_model(name: str, device: torch.device, threads: int, *, min_time: float, max_time: float,
                  min_samples: int, rounds: int) -> ModelResult:
    builder, batch, size = MODELS[name]
    torch.manual_seed(0)
    unfused = builder().to(device).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a model with nothing to fuse (MobileNetV2's ReLU6) warns
        converted, report = bnfused.convert_with_report(copy.deepcopy(unfused))
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    steps = [train_step(unfused, images, labels), train_step(converted, images, labels)]
    for step in steps:  # warm-up: allocator, oneDNN/cuDNN kernel selection, momentum buffers
        step()
    unfused_t, converted_t = time_interleaved(steps, device, threads, min_time=min_time, max_time=max_time,
                                              min_samples=min_samples, rounds=rounds)
    return ModelResult(name, batch, size, report.num_fused, count_sites(unfused), unfused_t, converted_t)


def run(device: torch.device, threads: int, quick: bool = False) -> list[ModelResult]:
    names = QUICK_MODELS if quick else tuple(MODELS)
    min_time, max_time, min_samples, rounds = (0.05, 0.3, 3, 3) if quick else (0.6, 2.0, 10, 7)
    return [measure_model(name, device, threads, min_time=min_time, max_time=max_time, min_samples=min_samples,
                          rounds=rounds) for name in names]


def _ms(t: Timing) -> str:
    return f"{t.median * 1e3:.1f} ({t.iqr * 1e3:.1f})"


def markdown(results: list[ModelResult]) -> str:
    """The table: sites fused / existing, step times, speedup (median and IQR over rounds) and the goal (a faster
    step for every model with a fused site; no fused site: nothing to gain, the step must not be slower)."""
    lines = ["| network | input | sites fused / existing | unfused step ms (IQR) | converted step ms (IQR) | "
             "speedup (IQR over rounds) | goal |", "|---|---|---|---|---|---|---|"]
    for r in results:
        existing = sum(r.sites.values())
        kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in r.sites.items() if n)
        lo, hi = r.speedup_iqr
        goal = ("goal" if r.speedup >= 1.0 else "below goal") if r.fused_sites else "- (nothing fused: same model)"
        lines.append(f"| {r.name} | {r.batch}x3x{r.image_size}x{r.image_size} | {r.fused_sites} / {existing} "
                     f"({kinds}) | {_ms(r.unfused)} | {_ms(r.converted)} | {r.speedup:.2f}x ({lo:.2f}-{hi:.2f}) | "
                     f"{goal} |")
    return "\n".join(lines)
