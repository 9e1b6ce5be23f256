"""Typed wrappers over torch.ops.bnfused.* and their fake (meta) implementations for torch.compile/export.

The C++ schemas live in csrc/ops.cpp; docs/design.md ("Ops") describes them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (registers the ops)

_ops = torch.ops.bnfused


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of statistics and accumulation for an input dtype (float64 stays float64, else float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_memory_format(x: Tensor) -> torch.memory_format:
    """Memory format of the kernels' output for input x (mirrors kernel_memory_format in csrc/ops.cpp)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    if x.is_contiguous():
        return torch.contiguous_format
    suggested = torch._prims_common.suggest_memory_format(x)
    if (suggested == torch.channels_last and x.dim() == 4) or (suggested == torch.channels_last_3d and x.dim() == 5):
        return suggested
    return torch.contiguous_format


def philox_key(device: torch.device, generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> Tensor:
    """The int64[2] (seed, offset) key of one dropout mask, on `device`.

    With `seed`, the key is (seed, 0) on every device (same seed -> same mask on CPU and CUDA). Otherwise it is
    drawn from `generator` (the device's default generator when None), so torch.manual_seed reproduces it and
    CUDA graph replays draw a fresh one on the device.
    """
    if seed is not None:
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {seed}")
        if seed >= 2**63:
            seed -= 2**64
        return torch.tensor([seed, 0], dtype=torch.int64, device=device)
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device, generator=generator)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) over every dim but 1."""
    return _ops.batch_stats.default(x)


def batch_stats_update(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                       eps: float) -> tuple[Tensor, Tensor]:
    """Batch (mean, rstd); running_mean/running_var, when given, updated in place (unbiased variance)."""
    return _ops.batch_stats_update.default(x, running_mean, running_var, momentum, eps)


# act, act_alpha, act_beta: the activation (bnfused.activation.Activation.op_args; 1 = ReLU), in every op that
# applies one.

def forward(x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], key: Tensor,
            p: float, batch_stats: bool, act: int = 1, act_alpha: float = 0.0, act_beta: float = 0.0) -> Tensor:
    """dropout(act((x - mean) * rstd * weight + bias))."""
    return _ops.forward.default(x, mean, rstd, weight, bias, key, p, batch_stats, act, act_alpha, act_beta)


def forward_keep_bits(x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      key: Tensor, p: float, batch_stats: bool, act: int = 1, act_alpha: float = 0.0,
                      act_beta: float = 0.0) -> tuple[Tensor, Tensor]:
    """CPU: forward's output plus the keep pattern packed 1 bit per element (uint8[ceil(numel / 8)], bit k of
    byte b = element 8b + k in the memory order of kernel_memory_format(x): logical NC... order for contiguous
    and 2-d input, (N, spatial..., C) for channels_last; bits past numel are unspecified), for the backward ops to
    read instead of regenerating the mask."""
    return _ops.forward_keep_bits.default(x, mean, rstd, weight, bias, key, p, batch_stats, act, act_alpha, act_beta)


def backward_reduce(grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], key: Tensor, p: float, keep_bits: Optional[Tensor] = None, act: int = 1,
                    act_alpha: float = 0.0, act_beta: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-channel (sum g, sum g*xhat), g = grad_out * keep / (1 - p) * act'(z). keep_bits (CPU), when given, is
    the mask instead of the key: forward_keep_bits' bits of this same x, in the same memory format (the bits
    follow memory order, so channels_last bits do not describe a contiguous copy of x)."""
    return _ops.backward_reduce.default(grad_out, x, mean, rstd, weight, bias, key, p, keep_bits, act, act_alpha,
                                        act_beta)


def backward_input(grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], key: Tensor, p: float, sum_g: Optional[Tensor],
                   sum_g_xhat: Optional[Tensor], count: int = 1, keep_bits: Optional[Tensor] = None, act: int = 1,
                   act_alpha: float = 0.0, act_beta: float = 0.0) -> Tensor:
    """grad_input; with the per-channel sums of g and g*xhat over `count` elements (batch statistics) their
    terms are included, without them (running statistics) it is w * rstd * g. keep_bits: as in
    backward_reduce."""
    return _ops.backward_input.default(grad_out, x, mean, rstd, weight, bias, key, p, sum_g, sum_g_xhat, count,
                                       keep_bits, act, act_alpha, act_beta)


def dropout_mask(key: Tensor, shape: Sequence[int], p: float) -> Tensor:
    """Bool keep pattern the fused kernels use for a tensor of `shape` (logical NC... order), on key's device."""
    return _ops.dropout_mask.default(key, list(shape), p)


def add_relu_forward(x: Tensor, residual: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                     bias: Optional[Tensor], key: Tensor, p: float, batch_stats: bool, act: int = 1,
                     act_alpha: float = 0.0, act_beta: float = 0.0) -> Tensor:
    """dropout(act(bn(x) + residual)); residual of x's shape, dtype and device, in any memory format; act one
    whose derivative is 0 or 1 (identity, relu, hardtanh)."""
    return _ops.add_relu_forward.default(x, residual, mean, rstd, weight, bias, key, p, batch_stats, act, act_alpha,
                                         act_beta)


def add_relu_forward_bits(x: Tensor, residual: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                          bias: Optional[Tensor], key: Tensor, p: float, batch_stats: bool, act: int = 1,
                          act_alpha: float = 0.0, act_beta: float = 0.0) -> tuple[Tensor, Tensor]:
    """add_relu_forward's output plus its pass bits: keep AND act'(bn(x) + residual) = 1, packed like
    forward_keep_bits' keep bits (uint8[ceil(numel / 8)], memory order of kernel_memory_format(x)). With x and the
    per-channel tensors they are all the backward ops need: neither the residual nor the key."""
    return _ops.add_relu_forward_bits.default(x, residual, mean, rstd, weight, bias, key, p, batch_stats, act,
                                              act_alpha, act_beta)


def add_relu_backward_reduce(grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, pass_bits: Tensor,
                             p: float) -> tuple[Tensor, Tensor]:
    """Per-channel (sum g, sum g*xhat), g = grad_out * pass / (1 - p): the residual's gradient."""
    return _ops.add_relu_backward_reduce.default(grad_out, x, mean, rstd, pass_bits, p)


def add_relu_backward_input(grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                            pass_bits: Tensor, p: float, sum_g: Optional[Tensor], sum_g_xhat: Optional[Tensor],
                            count: int = 1) -> tuple[Tensor, Tensor]:
    """(grad_input, grad_residual): g = grad_out * pass / (1 - p), and grad_input from g as in backward_input
    (the batch-statistics terms when the sums over `count` elements are given)."""
    return _ops.add_relu_backward_input.default(grad_out, x, mean, rstd, weight, pass_bits, p, sum_g, sum_g_xhat,
                                                count)


# ---- fake implementations: shapes, dtypes, strides and devices of every op's outputs ----

@torch.library.register_fake("bnfused::batch_stats")
def _batch_stats_fake(x):
    c = x.shape[1]
    dt = acc_dtype(x.dtype)
    return x.new_empty((c,), dtype=dt), x.new_empty((c,), dtype=dt)


@torch.library.register_fake("bnfused::batch_stats_update")
def _batch_stats_update_fake(x, running_mean, running_var, momentum, eps):
    return _batch_stats_fake(x)


@torch.library.register_fake("bnfused::forward")
def _forward_fake(x, mean, rstd, weight, bias, key, p, batch_stats, act=1, act_alpha=0.0, act_beta=0.0):
    return torch.empty_like(x, memory_format=kernel_memory_format(x))


@torch.library.register_fake("bnfused::forward_keep_bits")
def _forward_keep_bits_fake(x, mean, rstd, weight, bias, key, p, batch_stats, act=1, act_alpha=0.0, act_beta=0.0):
    return _forward_fake(x, mean, rstd, weight, bias, key, p, batch_stats), x.new_empty(((x.numel() + 7) // 8,),
                                                                                         dtype=torch.uint8)


@torch.library.register_fake("bnfused::backward_reduce")
def _backward_reduce_fake(grad_out, x, mean, rstd, weight, bias, key, p, keep_bits=None, act=1, act_alpha=0.0,
                          act_beta=0.0):
    c = x.shape[1]
    dt = acc_dtype(x.dtype)
    return x.new_empty((c,), dtype=dt), x.new_empty((c,), dtype=dt)


@torch.library.register_fake("bnfused::backward_input")
def _backward_input_fake(grad_out, x, mean, rstd, weight, bias, key, p, sum_g, sum_g_xhat, count, keep_bits=None,
                         act=1, act_alpha=0.0, act_beta=0.0):
    return torch.empty_like(x, memory_format=kernel_memory_format(x))


@torch.library.register_fake("bnfused::dropout_mask")
def _dropout_mask_fake(key, shape, p):
    return key.new_empty(shape, dtype=torch.bool)


@torch.library.register_fake("bnfused::add_relu_forward")
def _add_relu_forward_fake(x, residual, mean, rstd, weight, bias, key, p, batch_stats, act=1, act_alpha=0.0,
                           act_beta=0.0):
    torch._check(residual.shape == x.shape, lambda: f"residual shape {residual.shape} does not match input {x.shape}")
    return torch.empty_like(x, memory_format=kernel_memory_format(x))


@torch.library.register_fake("bnfused::add_relu_forward_bits")
def _add_relu_forward_bits_fake(x, residual, mean, rstd, weight, bias, key, p, batch_stats, act=1, act_alpha=0.0,
                                act_beta=0.0):
    out = _add_relu_forward_fake(x, residual, mean, rstd, weight, bias, key, p, batch_stats)
    return out, x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.register_fake("bnfused::add_relu_backward_reduce")
def _add_relu_backward_reduce_fake(grad_out, x, mean, rstd, pass_bits, p):
    return _backward_reduce_fake(grad_out, x, mean, rstd, None, None, None, p)


@torch.library.register_fake("bnfused::add_relu_backward_input")
def _add_relu_backward_input_fake(grad_out, x, mean, rstd, weight, pass_bits, p, sum_g, sum_g_xhat, count):
    fmt = kernel_memory_format(x)
    return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, memory_format=fmt)
