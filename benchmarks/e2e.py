"""End-to-end: a small CNN of Conv -> BN -> ReLU -> Dropout blocks trained for a few SGD steps on random
images, unfused vs bnfused.convert() of a copy of it; images/s from the median step time."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

import bnfused

from measure import Timing, first_call_seconds, synchronize


def small_cnn(width: int = 32, p: float = 0.1, classes: int = 10) -> nn.Sequential:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Dropout(p)]

    return nn.Sequential(*block(3, width, 1), *block(width, width, 1), *block(width, 2 * width, 2),
                         *block(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, classes))


@dataclass(frozen=True)
class E2EResult:
    name: str
    batch: int
    image_size: int
    step: Timing

    @property
    def images_per_s(self) -> float:
        return self.batch / self.step.median


def _step_times(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> Timing:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()

    for _ in range(2):  # warm-up: allocator, oneDNN/cuDNN kernel selection, momentum buffers
        train_step()
    times = torch.tensor([first_call_seconds(train_step, images.device) for _ in range(steps)], dtype=torch.float64)
    q25, q50, q75 = torch.quantile(times, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return Timing(q50, q75 - q25, steps)


def run_e2e(device: torch.device, steps: int, p: float = 0.1) -> list[E2EResult]:
    batch, size = (256, 32) if device.type == "cuda" else (32, 32)
    torch.manual_seed(0)
    unfused = small_cnn(p=p).to(device).train()
    fused = bnfused.convert(copy.deepcopy(unfused))
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    results = []
    for name, model in (("unfused (nn.BatchNorm2d -> ReLU -> Dropout)", unfused), ("bnfused.convert(model)", fused)):
        results.append(E2EResult(name, batch, size, _step_times(model, images, labels, steps)))
        synchronize(device)
    return results
