"""The activations bnfused fuses after BatchNorm, and the one resolver that turns what users write into one.

An activation is given the way timm's ``BatchNormAct2d`` takes it: a name (``"silu"``, ``"relu6"``, ...), an
``nn.Module`` class (``nn.SiLU``) or instance (``nn.LeakyReLU(0.2)``), a functional (``F.hardswish``), or ``None``
for identity; ``act_kwargs`` adds constructor arguments to a name or class. :func:`resolve_activation` returns an
:class:`Activation`, which the kernels receive as a code and two parameters (``csrc/activation.h``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Kernel codes: csrc/activation.h's Act (part of the op schemas: never renumber).
_CODES = {"identity": 0, "relu": 1, "hardtanh": 2, "leaky_relu": 3, "silu": 4, "hardswish": 5, "gelu": 6,
          "gelu_tanh": 7, "elu": 8, "mish": 9}
# Activations whose derivative is 0 or 1 everywhere: one bit per element holds their gradient gate, which is what the
# block tail's fused kernels save.
_GATE_BITS = frozenset({"identity", "relu", "hardtanh"})


@dataclasses.dataclass(frozen=True)
class Activation:
    """One activation with its parameters: ``hardtanh`` takes ``alpha = min_val``, ``beta = max_val`` (ReLU6 is
    ``hardtanh(0, 6)``), ``leaky_relu`` ``alpha = negative_slope``, ``elu`` ``alpha``; the others none."""

    kind: str
    alpha: float = 0.0
    beta: float = 0.0

    def __post_init__(self):
        if self.kind not in _CODES:
            raise ValueError(f"unknown activation kind {self.kind!r}; expected one of {', '.join(_CODES)}")
        if self.kind == "hardtanh" and not self.alpha < self.beta:
            raise ValueError(f"hardtanh: min_val ({self.alpha}) must be smaller than max_val ({self.beta})")
        # Made once: every fused call passes them (a small layer's call feels a tuple built per call).
        object.__setattr__(self, "op_args", (_CODES[self.kind], float(self.alpha), float(self.beta)))

    # (act, act_alpha, act_beta): the trailing arguments of the ops.
    op_args: tuple[int, float, float] = dataclasses.field(init=False, repr=False, compare=False)

    @property
    def code(self) -> int:
        """The kernels' code (the ops' ``act`` argument)."""
        return _CODES[self.kind]

    @property
    def has_gate_bits(self) -> bool:
        """Whether the derivative is 0 or 1 everywhere (identity, ReLU, Hardtanh/ReLU6): the block tail fuses these."""
        return self.kind in _GATE_BITS

    @property
    def is_relu6(self) -> bool:
        return self.kind == "hardtanh" and self.alpha == 0.0 and self.beta == 6.0

    def __call__(self, z: Tensor) -> Tensor:
        """The unfused activation (torch.nn.functional), e.g. for the reference and the unfused routes."""
        k = self.kind
        if k == "identity":
            return z
        if k == "relu":
            return torch.relu(z)
        if k == "hardtanh":
            return F.hardtanh(z, self.alpha, self.beta)
        if k == "leaky_relu":
            return F.leaky_relu(z, self.alpha)
        if k == "silu":
            return F.silu(z)
        if k == "hardswish":
            return F.hardswish(z)
        if k == "gelu":
            return F.gelu(z)
        if k == "gelu_tanh":
            return F.gelu(z, approximate="tanh")
        if k == "elu":
            return F.elu(z, self.alpha)
        return F.mish(z)

    def module(self) -> nn.Module:
        """The torch.nn module computing this activation (unconvert and fold_eval put it back)."""
        k = self.kind
        if k == "identity":
            return nn.Identity()
        if k == "relu":
            return nn.ReLU()
        if k == "hardtanh":
            return nn.ReLU6() if self.is_relu6 else nn.Hardtanh(self.alpha, self.beta)
        if k == "leaky_relu":
            return nn.LeakyReLU(self.alpha)
        if k == "silu":
            return nn.SiLU()
        if k == "hardswish":
            return nn.Hardswish()
        if k in ("gelu", "gelu_tanh"):
            return nn.GELU(approximate="tanh" if k == "gelu_tanh" else "none")
        if k == "elu":
            return nn.ELU(self.alpha)
        return nn.Mish()

    def __str__(self) -> str:
        if self.is_relu6:
            return "relu6"
        if self.kind == "hardtanh":
            return f"hardtanh({self.alpha:g}, {self.beta:g})"
        if self.kind in ("leaky_relu", "elu"):
            return f"{self.kind}({self.alpha:g})"
        return self.kind


RELU = Activation("relu")
IDENTITY = Activation("identity")


def _leaky_relu(negative_slope: float = 0.01, inplace: bool = False) -> Activation:
    return Activation("leaky_relu", float(negative_slope))


def _hardtanh(min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> Activation:
    return Activation("hardtanh", float(min_val), float(max_val))


def _elu(alpha: float = 1.0, inplace: bool = False) -> Activation:
    return Activation("elu", float(alpha))


def _gelu(approximate: str = "none") -> Activation:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return Activation("gelu_tanh" if approximate == "tanh" else "gelu")


def _plain(kind: str) -> Callable[..., Activation]:
    def make(inplace: bool = False) -> Activation:
        return Activation(kind)
    return make


# Names (timm's spellings included) -> constructor taking the nn module's arguments.
_BY_NAME: dict[str, Callable[..., Activation]] = {
    "identity": _plain("identity"), "linear": _plain("identity"), "none": _plain("identity"),
    "relu": _plain("relu"),
    "relu6": lambda inplace=False: Activation("hardtanh", 0.0, 6.0),
    "hardtanh": _hardtanh, "hard_tanh": _hardtanh,
    "leaky_relu": _leaky_relu, "leakyrelu": _leaky_relu,
    "silu": _plain("silu"), "swish": _plain("silu"),
    "hardswish": _plain("hardswish"), "hard_swish": _plain("hardswish"),
    "gelu": _gelu, "gelu_tanh": lambda: Activation("gelu_tanh"),
    "elu": _elu,
    "mish": _plain("mish"),
}

# torch.nn classes -> how to read an instance.
_BY_CLASS: dict[type, Callable[[nn.Module], Activation]] = {
    nn.Identity: lambda m: IDENTITY,
    nn.ReLU: lambda m: RELU,
    nn.ReLU6: lambda m: Activation("hardtanh", 0.0, 6.0),
    nn.Hardtanh: lambda m: Activation("hardtanh", float(m.min_val), float(m.max_val)),
    nn.LeakyReLU: lambda m: Activation("leaky_relu", float(m.negative_slope)),
    nn.SiLU: lambda m: Activation("silu"),
    nn.Hardswish: lambda m: Activation("hardswish"),
    nn.GELU: lambda m: _gelu(m.approximate),
    nn.ELU: lambda m: Activation("elu", float(m.alpha)),
    nn.Mish: lambda m: Activation("mish"),
}

# timm's own activation modules that compute one of the functions above (timm.layers.activations and its
# memory-efficient activations_me): matched by module and class name, so that timm need not be importable. Those
# spelled as PyTorch's formula differently (Swish: x * sigmoid(x); HardSwish: x * relu6(x + 3) / 6) are the same
# function; their gradients differ from PyTorch's only at HardSwish's kinks x = +-3 exactly.
_TIMM_MODULES = ("timm.layers.activations", "timm.layers.activations_me", "timm.models.layers.activations",
                 "timm.models.layers.activations_me")
_TIMM_CLASSES: dict[str, Activation] = {
    "Swish": Activation("silu"), "SwishMe": Activation("silu"), "Mish": Activation("mish"),
    "MishMe": Activation("mish"), "HardSwish": Activation("hardswish"), "HardSwishMe": Activation("hardswish"),
    "GELU": Activation("gelu"), "GELUTanh": Activation("gelu_tanh"),
}


def _read_module(module: nn.Module) -> Optional[Activation]:
    """The Activation an activation module computes (None: not one bnfused fuses)."""
    read = _BY_CLASS.get(type(module))
    if read is not None:
        return read(module)
    cls = type(module)
    if cls.__module__ in _TIMM_MODULES:
        return _TIMM_CLASSES.get(cls.__qualname__)
    return None


def activation_of_module(module: nn.Module) -> Optional[Activation]:
    """The Activation that ``module`` (exactly a torch.nn activation class, or one of timm's listed above)
    computes, or None: what convert() fuses after a BatchNorm (nn.Identity is not an activation there)."""
    if type(module) is nn.Identity:
        return None
    try:
        return _read_module(module)
    except ValueError:  # e.g. a Hardtanh with min_val >= max_val
        return None


# torch functionals (the default arguments; F.leaky_relu etc. with other arguments are given as a name + act_kwargs
# or an nn instance).
_BY_FUNCTION: dict[Any, str] = {
    torch.relu: "relu", F.relu: "relu", F.relu6: "relu6", F.hardtanh: "hardtanh", F.leaky_relu: "leaky_relu",
    F.silu: "silu", F.hardswish: "hardswish", F.gelu: "gelu", F.elu: "elu", F.mish: "mish",
}

ActivationLike = Union[None, str, Activation, nn.Module, type, Callable[..., Any]]


def resolve_activation(act: ActivationLike, act_kwargs: Optional[dict] = None) -> Activation:
    """The :class:`Activation` of ``act``: ``None`` (identity), a name (``"relu"``, ``"relu6"``, ``"hardtanh"``,
    ``"leaky_relu"``, ``"silu"``/``"swish"``, ``"hardswish"``/``"hard_swish"``, ``"gelu"``, ``"gelu_tanh"``,
    ``"elu"``, ``"mish"``, ``"identity"``), a torch.nn activation class or instance (or one of timm's that
    compute the same function: Swish, Mish, HardSwish, GELU, GELUTanh and their ``*Me`` forms), one of the functionals
    (``F.silu``, ...), or an :class:`Activation`. ``act_kwargs`` are the constructor arguments for a name or class
    (``resolve_activation("leaky_relu", dict(negative_slope=0.2))``). Raises ``ValueError`` for an activation
    bnfused does not fuse, ``TypeError`` for arguments it does not take."""
    kwargs = dict(act_kwargs or {})
    if isinstance(act, Activation):
        if kwargs:
            raise TypeError("act_kwargs cannot be combined with an Activation")
        return act
    if act is None:
        return IDENTITY
    if isinstance(act, str):
        make = _BY_NAME.get(act.lower())
        if make is None:
            raise ValueError(f"unsupported activation {act!r}; bnfused fuses "
                             f"{', '.join(sorted(k for k in _BY_NAME if k not in ('linear', 'none')))}")
        return make(**kwargs)
    if isinstance(act, type) and issubclass(act, nn.Module):
        return resolve_activation(act(**kwargs))
    if isinstance(act, nn.Module):
        if kwargs:
            raise TypeError("act_kwargs cannot be combined with an activation module instance")
        found = _read_module(act)
        if found is None:
            raise ValueError(f"unsupported activation module {type(act).__name__}; bnfused fuses "
                             f"{', '.join(c.__name__ for c in _BY_CLASS)} (and timm's "
                             f"{', '.join(_TIMM_CLASSES)})")
        return found
    if isinstance(act, functools.partial) and act.func in _BY_FUNCTION:
        return _BY_NAME[_BY_FUNCTION[act.func]](*act.args, **{**act.keywords, **kwargs})
    if callable(act) and act in _BY_FUNCTION:
        return _BY_NAME[_BY_FUNCTION[act]](**kwargs)
    raise ValueError(f"unsupported activation {act!r}: give a name, a torch.nn activation class or instance, or a "
                     "torch.nn.functional activation")
