"""What the benchmark measures: the cases (shape, dtype, memory format), the modes, the suites
(quick / default / full) and the byte model that turns a time into an effective bandwidth."""
from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("train fwd", "train fwd+bwd", "eval fwd")

# Minimal number of full-tensor passes (each element read or written once = one pass) a mode must make:
#   train fwd     : read x (statistics) + read x (apply) + write y                      = 3
#   train fwd+bwd : train fwd (3) + read dy, x (reduce) + read dy, x (apply) + write dx = 8
#   eval fwd      : read x + write y                                                     = 2
# Per-channel vectors (O(C)) and the dropout mask (regenerated from a key, never stored) add nothing.
PASSES = {"train fwd": 3, "train fwd+bwd": 8, "eval fwd": 2}

BYTE_MODEL = (
    "effective GB/s = (passes x numel x element size) / median time, counting only the full-tensor traffic "
    "any implementation must make: train fwd = read x twice (statistics, apply) + write y = 3 passes; "
    "train fwd+bwd = 3 + read dy and x (reduce) + read dy and x (apply) + write dx = 8 passes; "
    "eval fwd = read x + write y = 2 passes. O(C) vectors and the dropout mask (never stored by bnfused) "
    "are not counted. % copy = effective GB/s / the bandwidth of a large tensor copy (read + write) "
    "measured in the same run on the same device.")

CNN_SHAPES = ((64, 64, 56, 56), (32, 256, 28, 28), (128, 512, 7, 7))
MLP_SHAPES = ((256, 2048), (4096, 1024))
VOLUME_SHAPES = ((8, 32, 16, 32, 32),)
ALL_SHAPES = CNN_SHAPES + MLP_SHAPES + VOLUME_SHAPES

DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@dataclass(frozen=True)
class Case:
    """One input configuration; every peer and mode is measured on it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))} {DTYPE_NAMES[self.dtype]} {self.layout_short}"

    @property
    def layout_short(self) -> str:
        if self.channels_last:
            return "NHWC"
        return {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}[len(self.shape)]

    def bytes_moved(self, mode: str) -> int:
        return PASSES[mode] * self.numel * self.element_size

    def make_input(self, device: torch.device, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        # Shifted and scaled like a real pre-BN activation; made on the CPU so every device sees the same data.
        x = (torch.randn(self.shape, generator=gen) * 2.0 + 0.5).to(device=device, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


@dataclass(frozen=True)
class Suite:
    """Which cases run and how long each measurement may take."""

    name: str
    cases: tuple[Case, ...]
    min_time: float      # seconds of timed runs per measurement, at least
    max_time: float      # ... and at most (slow peers then get fewer samples)
    min_samples: int     # samples wanted when max_time allows


def _dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.bfloat16) + ((torch.float16,) if device.type == "cuda" else ())


def _full_cases(device: torch.device) -> tuple[Case, ...]:
    cases = []
    for shape in ALL_SHAPES:
        for dtype in _dtypes(device):
            for cl in ((False, True) if len(shape) == 4 else (False,)):
                cases.append(Case(shape, dtype, cl))
    return tuple(cases)


def _default_cases(device: torch.device) -> tuple[Case, ...]:
    f32 = torch.float32
    if device.type == "cuda":
        # float32 and bfloat16 in both memory formats on the two shapes with GPU goals, float16 on
        # the first, float32 on the rest; every float16 case is in --full (each case costs a cold compile).
        target = [Case(s, dt, cl) for s in CNN_SHAPES[:2] for dt in (f32, torch.bfloat16) for cl in (False, True)]
        rest = [Case(CNN_SHAPES[0], torch.float16)] + [Case(s, f32) for s in ALL_SHAPES[2:]]
        return tuple(target + rest)
    # CPU (2 cores here): every shape in float32, plus channels_last and bfloat16 on the first shape so their
    # per-byte speed can be compared with contiguous float32 (a CPU goal). Everything else is in --full.
    return (Case(CNN_SHAPES[0], f32), Case(CNN_SHAPES[0], f32, True), Case(CNN_SHAPES[0], torch.bfloat16),
            *(Case(s, f32) for s in ALL_SHAPES[1:]))


def _quick_cases(device: torch.device) -> tuple[Case, ...]:
    # A smoke run: one MLP shape and one 4d channels_last shape cover both kernel layouts.
    return (Case(MLP_SHAPES[0], torch.float32), Case(CNN_SHAPES[2], torch.float32, True))


def make_suite(name: str, device: torch.device) -> Suite:
    if name == "quick":
        return Suite(name, _quick_cases(device), min_time=0.05, max_time=0.3, min_samples=3)
    if name == "default":
        return Suite(name, _default_cases(device), min_time=0.3, max_time=1.5, min_samples=7)
    if name == "full":
        return Suite(name, _full_cases(device), min_time=0.5, max_time=3.0, min_samples=10)
    raise ValueError(f"unknown suite {name!r}")
