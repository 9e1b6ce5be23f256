"""Autograd for the fused op: one backward shared by the custom op (register_autograd, used by the functional
and torch.compile) and the user-facing BNReLUDropoutFunction."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops


def input_grads(grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], key: Tensor, p: float, batch_stats: bool,
                needs_input_grad: tuple[bool, bool, bool]) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_input, grad_weight, grad_bias) of y = dropout(relu(bn(x))); None where not needed."""
    need_x, need_w, need_b = needs_input_grad
    grad_x = grad_w = grad_b = None
    sums = None
    if (need_x and batch_stats) or need_w or need_b:
        sums = ops.backward_reduce(grad_out, x, mean, rstd, weight, bias, key, p)
    if need_x:
        sum_g, sum_g_xhat = sums if batch_stats else (None, None)
        grad_x = ops.backward_input(grad_out, x, mean, rstd, weight, bias, key, p, sum_g, sum_g_xhat,
                                    x.numel() // x.shape[1])
    if need_w and weight is not None:
        grad_w = sums[1].to(weight.dtype)
    if need_b and bias is not None:
        grad_b = sums[0].to(bias.dtype)
    return grad_x, grad_w, grad_b


def _setup_context(ctx, inputs, output):
    x, mean, rstd, weight, bias, key, p, batch_stats = inputs
    ctx.save_for_backward(x, mean, rstd, weight, bias, key)
    ctx.p = p
    ctx.batch_stats = batch_stats


def _backward(ctx, grad_out):
    x, mean, rstd, weight, bias, key = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
    gx, gw, gb = input_grads(grad_out, x, mean, rstd, weight, bias, key, ctx.p, ctx.batch_stats, needs)
    return gx, None, None, gw, gb, None, None, None


torch.library.register_autograd("bnfused::forward", _backward, setup_context=_setup_context)


class BNReLUDropoutFunction(torch.autograd.Function):
    """The raw autograd node: y = dropout(relu((x - mean) * rstd * weight + bias)).

    apply(x, mean, rstd, weight, bias, key, p, batch_stats): mean/rstd are per-channel constants (no grad);
    with batch_stats=True they are the batch's statistics and the input gradient includes their terms.
    key is the int64[2] Philox key (see bnfused.ops.philox_key). Saves x, mean, rstd and the key only.
    """

    # forward(ctx, ...) rather than a separate setup_context: apply() then skips an inspect.signature bind per call.
    @staticmethod
    def forward(ctx, x, mean, rstd, weight, bias, key, p, batch_stats):
        _setup_context(ctx, (x, mean, rstd, weight, bias, key, p, batch_stats), None)
        # Straight to the kernel: the op's own autograd wrapper (register_autograd, Python) would add ~50 us a call.
        with torch._C._AutoDispatchBelowAutograd():
            return ops.forward(x, mean, rstd, weight, bias, key, p, batch_stats)

    backward = staticmethod(_backward)
