"""The implementations compared on every case, and the per-mode step each one runs.

Peers: eager unfused nn.BatchNormXd -> nn.ReLU -> nn.Dropout (on CUDA eager BatchNorm uses cuDNN by default,
so a second eager peer runs with cuDNN disabled), torch.compile of that same block, bnfused's fused module,
and torch.compile of the fused module (its ops have fake and autograd registrations, so it compiles).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import Tensor, nn

import bnfused

from .cases import Case

_BATCHNORM = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_FUSED = {2: bnfused.BatchNormReLUDropout1d, 4: bnfused.BatchNormReLUDropout2d, 5: bnfused.BatchNormReLUDropout3d}

EAGER, EAGER_NO_CUDNN, COMPILE, FUSED, FUSED_COMPILE = (
    "eager", "eager no-cuDNN", "compile", "bnfused", "bnfused+compile")


@dataclass
class Peer:
    name: str
    module: nn.Module                        # train()/eval() is set on this one
    forward: Callable[[Tensor], Tensor]      # the module itself or its torch.compile wrapper
    compiled: bool = False
    context: Callable[[], ContextManager] = field(default=contextlib.nullcontext)  # entered around its runs


def unfused_block(case: Case, p: float, device: torch.device) -> nn.Sequential:
    # Parameters stay float32 for reduced-precision input (mixed-dtype batch norm, as under autocast).
    bn = _BATCHNORM[len(case.shape)](case.shape[1], device=device)
    return nn.Sequential(bn, nn.ReLU(), nn.Dropout(p))


def fused_block(case: Case, p: float, device: torch.device) -> nn.Module:
    return _FUSED[len(case.shape)](case.shape[1], p=p, device=device)


def _no_cudnn() -> ContextManager:
    return torch.backends.cudnn.flags(enabled=False)


def peer_names(device: torch.device, with_compile: bool) -> list[str]:
    """Names of the peers make_peers() builds, in its order."""
    names = [EAGER] + ([EAGER_NO_CUDNN] if device.type == "cuda" else []) + ([COMPILE] if with_compile else [])
    return names + [FUSED] + ([FUSED_COMPILE] if with_compile else [])


def make_peers(case: Case, p: float, device: torch.device, with_compile: bool) -> list[Peer]:
    unfused = unfused_block(case, p, device)
    fused = fused_block(case, p, device)
    peers = [Peer(EAGER, unfused, unfused)]
    if device.type == "cuda":
        peers.append(Peer(EAGER_NO_CUDNN, unfused, unfused, context=_no_cudnn))
    if with_compile:
        # dynamic=False: one static graph per case; bench.py resets dynamo between cases.
        peers.append(Peer(COMPILE, unfused, torch.compile(unfused, dynamic=False), compiled=True))
    peers.append(Peer(FUSED, fused, fused))
    if with_compile:
        peers.append(Peer(FUSED_COMPILE, fused, torch.compile(fused, dynamic=False), compiled=True))
    return peers


def step(peer: Peer, mode: str, x: Tensor, grad_out: Tensor) -> Callable[[], object]:
    """A no-argument callable running one `mode` step of `peer` on x (sets the module's train/eval mode).

    Training steps take x with requires_grad; fwd+bwd returns the gradients of x and the parameters through
    torch.autograd.grad, so no .grad accumulation pass is timed. Eval runs under no_grad on a detached x.
    Callers run it inside peer.context() (a global switch, so it is not paid per call).
    """
    peer.module.train(mode != "eval fwd")
    fwd = peer.forward
    if mode == "eval fwd":
        x_eval = x.detach()

        def run():
            with torch.no_grad():
                return fwd(x_eval)
    elif mode == "train fwd":
        def run():
            return fwd(x)
    elif mode == "train fwd+bwd":
        inputs = [x] + [t for t in peer.module.parameters() if t.requires_grad]

        def run():
            return torch.autograd.grad(fwd(x), inputs, grad_out)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return run
