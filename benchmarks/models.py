"""The models the end-to-end parts train: the test suite's torchvision-structured zoo (tests/torchvision_like.py,
one zoo for tests and benchmarks), its real torchvision / timm models (tests/real_models.py) and a small CNN of
Conv -> BN -> ReLU -> Dropout blocks."""
from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

# The zoo lives beside the tests that check convert() on it; this is the one place the benchmarks reach it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import real_models  # noqa: E402, F401  (torchvision's and timm's own model code, when installed)
import torchvision_like as tv  # noqa: E402, F401


def small_cnn(p: float = 0.1, width: int = 32, classes: int = 10) -> nn.Sequential:
    """Four Conv -> BN -> ReLU -> Dropout(p) blocks (the last two with stride 2) and a linear head, for 3-channel
    images of any size."""
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Dropout(p)]

    return nn.Sequential(*block(3, width, 1), *block(width, width, 1), *block(width, 2 * width, 2),
                         *block(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, classes))


def count_sites(model: nn.Module) -> dict[str, int]:
    """Fusable sites by structure (tests/torchvision_like.count_sites), plus the BN -> ReLU pairs of a model that is
    itself an nn.Sequential (small_cnn)."""
    counts = tv.count_sites(model)
    if type(model) is nn.Sequential:
        layers = list(model)
        counts["bn_relu"] += sum(isinstance(a, nn.BatchNorm2d) and isinstance(b, nn.ReLU)
                                 for a, b in zip(layers, layers[1:]))
    return counts
