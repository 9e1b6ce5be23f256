"""Autograd for the fused op: one backward shared by the custom op (register_autograd, used by the functional
and torch.compile) and the user-facing BNReLUDropoutFunction."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops

GlobalSums = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def input_grads(grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], key: Tensor, p: float, batch_stats: bool,
                needs_input_grad: tuple[bool, bool, bool], keep_bits: Optional[Tensor] = None,
                global_sums: Optional[GlobalSums] = None, count: Optional[int] = None,
                act: tuple[int, float, float] = (1, 0.0, 0.0)) -> tuple[Optional[Tensor], ...]:
    """(grad_input, grad_weight, grad_bias) of y = dropout(act(bn(x))); None where not needed. keep_bits (CPU,
    from ops.forward_keep_bits) replaces the key as the mask's source; act is Activation.op_args.

    The one backward of this op family: the custom op's registered autograd, BNReLUDropoutFunction and
    SyncBNReLUDropoutFunction all call it (csrc/eager_function.cpp computes the same steps in C++, pinned to
    this by the eager-path parity tests). SyncBatchNormReLUDropout passes global_sums (this rank's (sum_g,
    sum_g_xhat) -> the process group's) and the group's element count: only grad_input reads them;
    grad_weight/grad_bias stay the local sums, as nn.SyncBatchNorm returns them."""
    need_x, need_w, need_b = needs_input_grad
    grad_x = None
    sums = None
    if (need_x and batch_stats) or need_w or need_b:
        sums = ops.backward_reduce(grad_out, x, mean, rstd, weight, bias, key, p, keep_bits, *act)
    if need_x:
        sum_g, sum_g_xhat = sums if batch_stats else (None, None)
        if sum_g is not None and global_sums is not None:
            sum_g, sum_g_xhat = global_sums(sum_g, sum_g_xhat)
        grad_x = ops.backward_input(grad_out, x, mean, rstd, weight, bias, key, p, sum_g, sum_g_xhat,
                                    x.numel() // x.shape[1] if count is None else count, keep_bits, *act)
    grad_w, grad_b = _param_grads(sums, weight.dtype if need_w and weight is not None else None,
                                  bias.dtype if need_b and bias is not None else None)
    return grad_x, grad_w, grad_b


def _param_grads(sums: Optional[tuple[Tensor, Tensor]], weight_dtype: Optional[torch.dtype],
                 bias_dtype: Optional[torch.dtype]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(grad_weight, grad_bias) = (sum g*xhat, sum g) in the parameters' dtypes; None where the dtype is None (no
    such parameter or no gradient wanted). The sums are in the accumulation dtype; .to() is skipped when that is
    already the parameter's (a few us of argument parsing per call, which small batches feel)."""
    def cast(t: Tensor, dtype: Optional[torch.dtype]) -> Optional[Tensor]:
        return None if dtype is None else t if t.dtype == dtype else t.to(dtype)
    if sums is None:
        return None, None
    return cast(sums[1], weight_dtype), cast(sums[0], bias_dtype)


def _act_args(rest: tuple) -> tuple[int, float, float]:
    """The (act, act_alpha, act_beta) arguments that follow an op's fixed ones (their defaults: ReLU)."""
    return tuple(rest) + (1, 0.0, 0.0)[len(rest):]


def _setup_context(ctx, inputs, output, keep_bits=None):
    x, mean, rstd, weight, bias, key, p, batch_stats, *act = inputs
    ctx.save_for_backward(x, mean, rstd, weight, bias, key, keep_bits)
    ctx.p = p
    ctx.batch_stats = batch_stats
    ctx.act = _act_args(act)


def _backward(ctx, grad_out):
    x, mean, rstd, weight, bias, key, keep_bits = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
    gx, gw, gb = input_grads(grad_out, x, mean, rstd, weight, bias, key, ctx.p, ctx.batch_stats, needs, keep_bits,
                             act=ctx.act)
    return gx, None, None, gw, gb, None, None, None, None, None, None


torch.library.register_autograd("bnfused::forward", _backward, setup_context=_setup_context)


def _setup_context_keep_bits(ctx, inputs, output):
    _setup_context(ctx, inputs, output, keep_bits=output[1])


def _backward_keep_bits(ctx, grad_out, _grad_keep_bits):
    return _backward(ctx, grad_out)


# The compiled CPU path (functional under torch.compile) calls forward_keep_bits; its bits output is uint8, so
# autograd never sends a gradient for it.
torch.library.register_autograd("bnfused::forward_keep_bits", _backward_keep_bits,
                                setup_context=_setup_context_keep_bits)


def _saves_keep_bits(x: Tensor, p: float) -> bool:
    """Whether the training forward packs the keep bits for the backward: on the CPU, when 0 < p < 1. Reading
    the bits saves both backward passes a Philox run (64x64x56x56 float32, module forward+backward: NCHW
    backward_reduce 7.5 -> 5.7 ms and backward_input 10.6 -> 8.1 ms; channels_last 28.2 -> 23.2 ms in all) for
    +0.2-0.5 ms of forward. channels_last packs them in memory order, so a tile's bits are written sequentially."""
    return x.device.type == "cpu" and 0.0 < p < 1.0


class BNReLUDropoutFunction(torch.autograd.Function):
    r"""The raw autograd node: ``y = dropout(act((x - mean) * rstd * weight + bias))`` with given statistics.

    For callers that compute or own the statistics themselves; :func:`bnfused.bn_relu_dropout` and the modules
    compute them and use this node's backward formula. ``mean`` and ``rstd`` are per-channel constants (no
    gradient flows into them); with ``batch_stats=True`` they are the batch's own statistics and the input
    gradient includes their terms, as ``F.batch_norm`` in training; with ``False`` (running statistics) it is
    ``weight * rstd * g``.

    Saves x, mean, rstd and the key; on the CPU with 0 < p < 1 also the keep mask packed 1 bit per element, which
    the backward reads instead of running Philox twice more. Double backward raises.

    Args (of ``apply``):
        x: :math:`(N, C, *)` input (float32, float64, float16, bfloat16)
        mean, rstd: :math:`(C,)` per-channel mean and :math:`1/\sqrt{\mathrm{var} + \epsilon}`, float32 (float64
            for float64 input)
        weight, bias: optional :math:`(C,)` affine parameters (``None`` for 1 and 0)
        key: int64[2] Philox (seed, offset) key on x's device, see :func:`bnfused.ops.philox_key`
        p: drop probability in [0, 1] (0: no dropout, the key is not read)
        batch_stats: whether mean / rstd are this batch's statistics
        act, act_alpha, act_beta: the activation, ``bnfused.resolve_activation(...).op_args``. Default: ReLU

    Examples::

        >>> x = torch.randn(4, 3, 6, requires_grad=True)
        >>> var, mean = torch.var_mean(x.detach(), dim=(0, 2), unbiased=False)
        >>> rstd = torch.rsqrt(var + 1e-5)
        >>> key = bnfused.ops.philox_key(x.device, seed=0)
        >>> y = bnfused.BNReLUDropoutFunction.apply(x, mean, rstd, None, None, key, 0.0, True)
        >>> torch.allclose(y, F.relu(F.batch_norm(x, None, None, training=True)), atol=1e-5)
        True
        >>> y.sum().backward()
    """

    # forward(ctx, ...) rather than a separate setup_context: apply() then skips an inspect.signature bind per call.
    @staticmethod
    def forward(ctx, x, mean, rstd, weight, bias, key, p, batch_stats, act=1, act_alpha=0.0, act_beta=0.0):
        inputs = (x, mean, rstd, weight, bias, key, p, batch_stats, act, act_alpha, act_beta)
        # Straight to the kernel: the op's own autograd wrapper (register_autograd, Python) would add ~50 us a call.
        with torch._C._AutoDispatchBelowAutograd():
            if _saves_keep_bits(x, p) and any(ctx.needs_input_grad):
                out, keep_bits = ops.forward_keep_bits(*inputs)
                _setup_context(ctx, inputs, None, keep_bits)
                return out
            _setup_context(ctx, inputs, None)
            return ops.forward(*inputs)

    # The backward ops have no derivatives of their own: a double backward through this node raises instead of
    # silently returning zeros. (Through the raw op's register_autograd, the backward ops' Autograd kernel in
    # ops.cpp raises; torch.compile rejects double backward itself.)
    backward = staticmethod(once_differentiable(_backward))


# ---- BN + residual add + ReLU (+ dropout) ----

def add_relu_grads(grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                   bias_dtype: Optional[torch.dtype], pass_bits: Tensor, p: float, batch_stats: bool,
                   needs_input_grad: tuple[bool, bool, bool, bool], global_sums: Optional[GlobalSums] = None,
                   count: Optional[int] = None) -> tuple[Optional[Tensor], ...]:
    """(grad_input, grad_residual, grad_weight, grad_bias) of y = dropout(act(bn(x) + residual)); None where not
    needed. The pass bits hold the keep mask and the activation's gate (identity, relu, hardtanh), so the backward
    is the same for every activation. The residual's gradient g = grad_out * pass / (1 - p) comes out of the
    input-gradient pass, which
    reads grad_out, x and the pass bits once and writes both gradients.

    The one backward of the block tail (the ops' registered autograd, BNAddReLUDropoutFunction,
    SyncBNAddReLUDropoutFunction; the C++ eager Function pinned to it by parity tests). global_sums and count:
    as for input_grads."""
    need_x, need_r, need_w, need_b = needs_input_grad
    grad_x = grad_r = None
    sums = None
    if (need_x and batch_stats) or need_w or need_b:
        sums = ops.add_relu_backward_reduce(grad_out, x, mean, rstd, pass_bits, p)
    if need_x or need_r:
        # Only grad_input reads the sums (the residual's gradient alone needs none: grad_input is then dropped).
        sum_g, sum_g_xhat = sums if need_x and batch_stats else (None, None)
        if sum_g is not None and global_sums is not None:
            sum_g, sum_g_xhat = global_sums(sum_g, sum_g_xhat)
        grad_x, grad_r = ops.add_relu_backward_input(grad_out, x, mean, rstd, weight, pass_bits, p, sum_g,
                                                     sum_g_xhat, x.numel() // x.shape[1] if count is None else count)
    grad_w, grad_b = _param_grads(sums, weight.dtype if need_w and weight is not None else None,
                                  bias_dtype if need_b else None)
    return (grad_x if need_x else None), (grad_r if need_r else None), grad_w, grad_b


def _add_setup_context(ctx, inputs, pass_bits):
    x, residual, mean, rstd, weight, bias, key, p, batch_stats, *_act = inputs
    ctx.save_for_backward(x, mean, rstd, weight, pass_bits)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.p = p
    ctx.batch_stats = batch_stats


def _add_backward(ctx, grad_out):
    x, mean, rstd, weight, pass_bits = ctx.saved_tensors
    n = ctx.needs_input_grad
    gx, gr, gw, gb = add_relu_grads(grad_out, x, mean, rstd, weight, ctx.bias_dtype, pass_bits, ctx.p,
                                    ctx.batch_stats, (n[0], n[1], n[4], n[5]))
    return gx, gr, None, None, gw, gb, None, None, None, None, None, None


def _add_setup_context_bits(ctx, inputs, output):
    _add_setup_context(ctx, inputs, output[1])


def _add_backward_bits(ctx, grad_out, _grad_pass_bits):
    return _add_backward(ctx, grad_out)


# The functional's compiled path calls add_relu_forward_bits when grad is enabled; its uint8 bits get no gradient.
torch.library.register_autograd("bnfused::add_relu_forward_bits", _add_backward_bits,
                                setup_context=_add_setup_context_bits)


def _add_setup_context_plain(ctx, inputs, output):
    # The raw add_relu_forward op, differentiated directly, has no pass bits: it keeps the residual and the key to
    # recompute them in the backward (the functional and the modules use add_relu_forward_bits instead).
    x, residual, mean, rstd, weight, bias, key, p, batch_stats, *act = inputs
    ctx.save_for_backward(x, residual, mean, rstd, weight, bias, key)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.p = p
    ctx.batch_stats = batch_stats
    ctx.act = _act_args(act)


def _add_backward_plain(ctx, grad_out):
    x, residual, mean, rstd, weight, bias, key = ctx.saved_tensors
    with torch.no_grad():
        pass_bits = ops.add_relu_forward_bits(x, residual, mean, rstd, weight, bias, key, ctx.p, ctx.batch_stats,
                                              *ctx.act)[1]
    n = ctx.needs_input_grad
    gx, gr, gw, gb = add_relu_grads(grad_out, x, mean, rstd, weight, ctx.bias_dtype, pass_bits, ctx.p,
                                    ctx.batch_stats, (n[0], n[1], n[4], n[5]))
    return gx, gr, None, None, gw, gb, None, None, None, None, None, None


torch.library.register_autograd("bnfused::add_relu_forward", _add_backward_plain,
                                setup_context=_add_setup_context_plain)


class BNAddReLUDropoutFunction(torch.autograd.Function):
    """The raw autograd node of y = dropout(act((x - mean) * rstd * weight + bias + residual)).

    apply(x, residual, mean, rstd, weight, bias, key, p, batch_stats, act=1, act_alpha=0, act_beta=0), arguments
    as BNReLUDropoutFunction's plus the residual (x's shape, dtype and device); act one whose derivative is 0 or 1
    (identity, relu, hardtanh). When any gradient is needed the forward also packs the pass bits (keep AND
    act'(bn(x) + residual) = 1, 1 bit per element) and saves x, the per-channel tensors and those bits: not the
    residual, not the key.
    """

    @staticmethod
    def forward(ctx, x, residual, mean, rstd, weight, bias, key, p, batch_stats, act=1, act_alpha=0.0, act_beta=0.0):
        inputs = (x, residual, mean, rstd, weight, bias, key, p, batch_stats, act, act_alpha, act_beta)
        with torch._C._AutoDispatchBelowAutograd():
            if any(ctx.needs_input_grad):
                out, pass_bits = ops.add_relu_forward_bits(*inputs)
                _add_setup_context(ctx, inputs, pass_bits)
                return out
            return ops.add_relu_forward(*inputs)

    backward = staticmethod(once_differentiable(_add_backward))
