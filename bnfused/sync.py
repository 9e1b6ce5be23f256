"""SyncBatchNormReLUDropout / SyncBatchNormAddReLU: the fused counterparts of nn.SyncBatchNorm -> ReLU -> Dropout
and of nn.SyncBatchNorm -> + residual -> ReLU (-> Dropout), over torch.distributed.

Training statistics are taken over the whole process group's batch:
  forward:  local ops.batch_stats -> all_gather of (mean, M2, count) per rank -> Chan merge (float64) -> global
            mean/rstd, running stats (identical on every rank) -> ops.forward (on the CPU, forward_keep_bits:
            the 1-bit mask is saved and read back by both backward ops instead of running Philox again), or
            ops.add_relu_forward_bits for the block tail (its 1-bit pass mask, as the single-process module)
  backward: local ops.backward_reduce -> one all_reduce of [sum_g, sum_g_xhat] -> ops.backward_input with the
            sums divided by the global count (add_relu_backward_reduce / add_relu_backward_input for the tail,
            which also gives the residual's gradient).
Weight/bias gradients are the LOCAL sums, as nn.SyncBatchNorm returns them: DistributedDataParallel's gradient
averaging then gives the gradient of the mean of the ranks' losses, exactly as for every other parameter.
A rank with an empty batch takes part in every collective (count 0 contributes nothing) and gets zero gradients.
Each rank's dropout mask is keyed by (seed, offset + global rank): different on every rank, reproducible from
torch.manual_seed. Outside training, without an initialized process group, or in a group of one process, each
module is exactly its single-process counterpart (no communication), as nn.SyncBatchNorm falls back to
F.batch_norm.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional, ops
from .activation import ActivationLike
from .autograd import _saves_keep_bits, add_relu_grads, input_grads
from .modules import _BatchNormAddReLU, _BatchNormReLUDropout


def _sync_group(process_group: Any) -> Optional[tuple[Any, int]]:
    """(group, world size) to synchronise over, or None when there is nothing to synchronise with."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    return (group, world_size) if world_size > 1 else None


def _all_gather(t: Tensor, group: Any, world_size: int) -> Tensor:
    """(world_size, numel of t): every rank's 1-d t, in rank order."""
    if dist.get_backend(group) != "nccl":  # the list form works on every backend (gloo: no single-tensor form)
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t, group=group)
        return torch.stack(parts)
    out = t.new_empty(world_size * t.numel())
    # all_gather_single is torch >= 2.13's name for all_gather_into_tensor (deprecated there)
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_single(out, t, group=group)
    return out.view(world_size, -1)


def _local_moments(x: Tensor) -> Tensor:
    """float64 [mean (C), M2 = count * biased var (C), count (1)] of this rank's batch; zeros for an empty batch.

    float64 keeps counts exact beyond 2^24 elements per channel and makes the merge below cheap to keep exact.
    """
    channels = x.shape[1]
    count = x.numel() // channels
    if count == 0:
        return torch.zeros(2 * channels + 1, dtype=torch.float64, device=x.device)
    mean, var = ops.batch_stats(x.detach())
    return torch.cat([mean.double(), var.double() * count,
                      torch.full((1,), float(count), dtype=torch.float64, device=x.device)])


def _merge_moments(gathered: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """Chan et al.'s parallel merge of the ranks' (mean, M2, count) rows: global (mean, M2), float64.

    Deviations of each rank's mean from the global mean are taken directly (no sum-of-squares cancellation);
    a rank with count 0 has mean = M2 = 0 and adds nothing.
    """
    means, m2s, counts = gathered[:, :channels], gathered[:, channels:2 * channels], gathered[:, 2 * channels:]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return mean, m2


def _all_reduce_sums(sum_g: Tensor, sum_g_xhat: Tensor, group: Any) -> tuple[Tensor, Tensor]:
    """The process group's (sum_g, sum_g_xhat) from this rank's: one all_reduce of both."""
    sums = torch.cat([sum_g, sum_g_xhat])
    dist.all_reduce(sums, group=group)
    return sums.split(sum_g.numel())


def _empty_rank_backward(ctx, x: Tensor, weight: Optional[Tensor], bias_dtype: Optional[torch.dtype],
                         acc: torch.dtype, need_x: bool, need_w: bool, need_b: bool) -> tuple[Optional[Tensor], ...]:
    """(grad_input, grad_weight, grad_bias) of a rank with an empty batch. Nothing to reduce locally, but the
    peers' all_reduce needs this rank; zero (not None) parameter gradients, so that DDP's reducer sees every
    parameter's gradient on this rank too."""
    channels = x.shape[1]
    if need_x:
        _all_reduce_sums(*torch.zeros(2, channels, dtype=acc, device=x.device), ctx.group)
    return (torch.zeros_like(x) if need_x else None,
            torch.zeros_like(weight) if need_w and weight is not None else None,
            torch.zeros(channels, dtype=bias_dtype, device=x.device) if need_b and bias_dtype is not None else None)


class SyncBNReLUDropoutFunction(torch.autograd.Function):
    """y = dropout(relu(bn(x))) with statistics over a process group; the backward all-reduces Σg and Σg·x̂."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, rstd, key, p, global_count, group, act):
        ctx.p, ctx.global_count, ctx.group, ctx.act = p, global_count, group, act
        keep_bits = None
        if x.numel() == 0:
            out = torch.empty_like(x)
        elif _saves_keep_bits(x, p) and any(ctx.needs_input_grad):  # as BNReLUDropoutFunction: no Philox in backward
            out, keep_bits = ops.forward_keep_bits(x, mean, rstd, weight, bias, key, p, True, *act)
        else:
            out = ops.forward(x, mean, rstd, weight, bias, key, p, True, *act)
        ctx.save_for_backward(x, weight, bias, mean, rstd, key, keep_bits)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, rstd, key, keep_bits = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if x.numel() == 0:
            bias_dtype = None if bias is None else bias.dtype
            return (*_empty_rank_backward(ctx, x, weight, bias_dtype, mean.dtype, need_x, need_w, need_b),
                    None, None, None, None, None, None, None)
        grad_x, grad_w, grad_b = input_grads(
            grad_out, x, mean, rstd, weight, bias, key, ctx.p, True, (need_x, need_w, need_b), keep_bits,
            global_sums=lambda sum_g, sum_g_xhat: _all_reduce_sums(sum_g, sum_g_xhat, ctx.group),
            count=ctx.global_count, act=ctx.act)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


class SyncBNAddReLUDropoutFunction(torch.autograd.Function):
    """y = dropout(relu(bn(x) + residual)) with statistics over a process group: BNAddReLUDropoutFunction's
    kernels and saved tensors (x, the per-channel tensors, 1 pass bit per element; not the residual), and the
    backward all-reduces Σg and Σg·x̂ for the input gradient."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, mean, rstd, key, p, global_count, group, act):
        ctx.p, ctx.global_count, ctx.group = p, global_count, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        pass_bits = None
        if x.numel() == 0:
            out = torch.empty_like(x)
        elif any(ctx.needs_input_grad):
            out, pass_bits = ops.add_relu_forward_bits(x, residual, mean, rstd, weight, bias, key, p, True, *act)
        else:
            out = ops.add_relu_forward(x, residual, mean, rstd, weight, bias, key, p, True, *act)
        ctx.save_for_backward(x, weight, mean, rstd, pass_bits)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, rstd, pass_bits = ctx.saved_tensors
        need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        if x.numel() == 0:
            grad_x, grad_w, grad_b = _empty_rank_backward(ctx, x, weight, ctx.bias_dtype, mean.dtype, need_x,
                                                          need_w, need_b)
            grad_r = torch.zeros_like(x) if need_r else None
        else:
            grad_x, grad_r, grad_w, grad_b = add_relu_grads(
                grad_out, x, mean, rstd, weight, ctx.bias_dtype, pass_bits, ctx.p, True,
                (need_x, need_r, need_w, need_b),
                global_sums=lambda sum_g, sum_g_xhat: _all_reduce_sums(sum_g, sum_g_xhat, ctx.group),
                count=ctx.global_count)
        return grad_x, grad_r, grad_w, grad_b, None, None, None, None, None, None, None


class _GroupStatistics(NamedTuple):
    mean: Tensor  # the group's batch mean, in the kernels' accumulation dtype
    rstd: Tensor  # 1 / sqrt(biased variance + eps), same dtype
    key: Tensor  # the dropout key with this rank folded in (a zero placeholder for p == 0)
    count: int  # elements per channel over the whole group


class _SyncedBatchNorm(_BatchNormReLUDropout):
    """What both synchronised modules share: the process group, nn.SyncBatchNorm's input check and
    from_batchnorm, and the training statistics over the group (every check before the first collective)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device=None, dtype=None, *,
                 p: float = 0.5, bias: bool = True, act: ActivationLike = "relu",
                 act_kwargs: Optional[dict] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, p=p, bias=bias,
                         act=act, act_kwargs=act_kwargs)
        self.process_group = process_group

    @classmethod
    def from_batchnorm(cls, bn, p: float = 0.0, process_group: Any = None, **kwargs):
        """As BatchNormReLUDropout2d.from_batchnorm (bn's own Parameter and buffer objects), synchronising over
        ``process_group``: an nn.SyncBatchNorm's own group when None (the world when that is None too)."""
        if process_group is None:
            process_group = getattr(bn, "process_group", None)
        return super().from_batchnorm(bn, p, process_group=process_group, **kwargs)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.size(1) == 0:
            raise ValueError(f"{type(self).__name__} number of input channels should be non-zero")

    def _sync(self) -> Optional[tuple[Any, int]]:
        return _sync_group(self.process_group) if self.training else None  # eval never communicates

    def _group_statistics(self, input: Tensor, group: Any, world_size: int) -> Optional[_GroupStatistics]:
        """Training statistics over the group's batch; running statistics and num_batches_tracked updated
        (identically on every rank). None when every rank's batch is empty (nothing to normalise)."""
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        momentum = 0.0 if self.momentum is None else self.momentum
        # One value per channel on this rank is fine when others have more (checked globally below); an expanded
        # view of such an input passes the local check and shares every other check with the single-process path.
        checked = input.expand(2, *input.shape[1:]) if input.numel() == input.shape[1] else input
        functional.check_inputs(checked, running_mean, running_var, self.weight, self.bias, True, momentum,
                                self.eps, self.p, self._op)

        gathered = _all_gather(_local_moments(input), group, world_size)
        global_count = int(gathered[:, -1].sum().item())
        if global_count == 1:  # every rank sees the same count, so every rank raises: no collective is left hanging
            raise ValueError("Expected more than 1 value per channel when training, got 1 value per channel over "
                             f"the process group (this rank's input size {input.size()})")

        factor = momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        if global_count == 0:  # every rank empty: what the single-process module does on an empty batch
            return None

        mean, m2 = _merge_moments(gathered, input.shape[1])
        var = m2 / global_count
        if running_mean is not None:
            with torch.no_grad():
                unbiased = m2 / (global_count - 1)
                running_mean.copy_(running_mean.double() * (1 - factor) + mean * factor)
                running_var.copy_(running_var.double() * (1 - factor) + unbiased * factor)
        acc = ops.acc_dtype(input.dtype)
        rstd = torch.rsqrt(var + self.eps).to(acc)

        if self.p > 0.0:
            key = ops.philox_key(input.device)
            key[1] += dist.get_rank()  # global rank: masks differ between all processes, not only within a group
        else:
            key = torch.zeros(2, dtype=torch.int64, device=input.device)
        return _GroupStatistics(mean.to(acc), rstd, key, global_count)

class SyncBatchNormReLUDropout(_SyncedBatchNorm):
    r"""Fused ``nn.SyncBatchNorm -> nn.ReLU -> nn.Dropout(p)``: batch statistics over a process group.

    In training, each process computes its batch's per-channel moments, one ``all_gather`` merges them (in float64)
    into the statistics of the whole group's batch, and the backward takes one ``all_reduce`` of two per-channel
    sums; everything else is the fused :class:`BatchNormReLUDropout2d` computation. Conventions of
    ``nn.SyncBatchNorm``: running statistics are identical on every rank; ``weight`` / ``bias`` gradients are the
    rank's local sums (``DistributedDataParallel`` averages them); ranks may hold different batch sizes, empty
    ones included (they take part with count 0 and get zero gradients); a single value per channel is rejected
    only when the whole group has one. Each rank's dropout key is offset by its global rank, so masks differ
    between processes and are reproducible from ``torch.manual_seed``. In eval mode, without an initialised
    process group, or in a group of one process, it is exactly the single-process fused module (no
    communication). The training forward reads the global element count on the host, so it cannot be captured in
    a CUDA graph (neither can ``nn.SyncBatchNorm``'s). The rest is as for :class:`BatchNormReLUDropout2d`: the
    Philox dropout mask, ``p`` rounded to a multiple of :math:`2^{-16}`, the ReLU passing NaN and ``-0.0``
    through, ``eps`` positive, ``momentum=None`` for a cumulative average, no double backward.

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, +)`
        eps: a value added to the denominator for numerical stability; must be positive. Default: 1e-5
        momentum: the value used for the running_mean and running_var computation; ``None`` for a cumulative
            moving average. Default: 0.1
        affine: learnable :math:`\gamma` and :math:`\beta`. Default: ``True``
        track_running_stats: keep running statistics. Default: ``True``
        process_group: the group to synchronise over; ``None`` for the whole world. Default: ``None``
        device, dtype: of the parameters and buffers, as for ``nn.SyncBatchNorm``
        p (keyword-only): probability of an element to be zeroed in training. Default: 0.5
        bias (keyword-only): with ``affine=True`` and ``bias=False``, a weight but no bias. Default: ``True``

    Shape:
        - Input: :math:`(N, C, +)`, at least 2 dims, contiguous or channels_last / channels_last_3d
        - Output: same shape as the input, in the input's memory format

    Examples::

        >>> block = bnfused.SyncBatchNormReLUDropout(32, p=0.1)
        >>> # without an initialised process group it computes what BatchNormReLUDropout2d computes
        >>> block(torch.randn(4, 32, 7, 7)).shape
        torch.Size([4, 32, 7, 7])
        >>> # in a DistributedDataParallel script: model = bnfused.convert_sync(model), then wrap it in DDP
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        sync = self._sync()
        if sync is None:
            return super().forward(input)  # the single-process module, as nn.SyncBatchNorm falls back
        stats = self._group_statistics(input, *sync)
        if stats is None:  # every rank empty
            return functional.bn_act_dropout_unchecked(input, None, None, self.weight, self.bias, True, 0.0,
                                                       self.eps, self.p, act=self.activation)
        return SyncBNReLUDropoutFunction.apply(input, self.weight, self.bias, stats.mean, stats.rstd, stats.key,
                                               self.p, stats.count, sync[0], self.activation.op_args)


class SyncBatchNormAddReLU(_SyncedBatchNorm, _BatchNormAddReLU):
    r"""Fused ``nn.SyncBatchNorm -> + residual -> nn.ReLU (-> nn.Dropout(p))``: the tail of a ResNet block with
    batch statistics over a process group.

    ``forward(input, residual)`` computes :class:`BatchNormAddReLU2d`'s ``dropout(relu(bn(input) + residual))``
    with :class:`SyncBatchNormReLUDropout`'s statistics: one ``all_gather`` of per-channel moments in the training
    forward, one ``all_reduce`` of two per-channel sums in the backward (only when the input needs a gradient; the
    residual's gradient needs none), nn.SyncBatchNorm's conventions for running statistics, local ``weight`` /
    ``bias`` gradients, empty ranks and the per-rank dropout key. The residual has the input's shape and device
    (``RuntimeError`` otherwise, before any communication or state change), and in synchronised training its dtype
    too (the single-process tail also takes another dtype, computed unfused); autograd saves the input,
    per-channel statistics and 1 bit per element, not the residual. In eval mode, without an initialised process
    group, or in a group of one process, it is exactly :class:`BatchNormAddReLU2d` (any dimension >= 2).
    :func:`bnfused.convert_sync` puts it at every ``bn(x) + residual -> relu`` site.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype, bias: as for
            :class:`SyncBatchNormReLUDropout`
        p (keyword-only): probability of an element to be zeroed in training. Default: 0.0

    Shape:
        - Input: :math:`(N, C, +)`, at least 2 dims, contiguous or channels_last / channels_last_3d
        - Residual: the input's shape, any memory format
        - Output: same shape as the input, in the input's memory format

    Examples::

        >>> tail = bnfused.SyncBatchNormAddReLU(32)
        >>> x, identity = torch.randn(4, 32, 7, 7), torch.randn(4, 32, 7, 7)
        >>> # without an initialised process group it computes what BatchNormAddReLU2d computes
        >>> tail(x, identity).shape
        torch.Size([4, 32, 7, 7])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device=None, dtype=None, *,
                 p: float = 0.0, bias: bool = True, act: ActivationLike = "relu",
                 act_kwargs: Optional[dict] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         p=p, bias=bias, act=act, act_kwargs=act_kwargs)
        if not self.activation.has_gate_bits:
            raise ValueError(f"{type(self).__name__}: the synchronised block tail fuses identity, relu and hardtanh "
                             f"(relu6), got {self.activation}")

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:  # type: ignore[override]
        self._check_input_dim(input)
        functional.check_residual(input, residual)  # before any collective or state change
        sync = self._sync()
        if sync is None:
            return super().forward(input, residual)  # the single-process BatchNormAddReLU
        if residual.dtype != input.dtype:  # before any collective: every rank raises alike
            raise RuntimeError(f"SyncBatchNormAddReLU: in synchronised training the residual must have the input's "
                               f"dtype, got {residual.dtype} and {input.dtype} (cast the residual, e.g. to the "
                               "input's dtype)")
        stats = self._group_statistics(input, *sync)
        if stats is None:  # every rank empty
            return functional.bn_add_act_dropout_unchecked(input, residual, None, None, self.weight, self.bias,
                                                           True, 0.0, self.eps, self.p, act=self.activation)
        return SyncBNAddReLUDropoutFunction.apply(input, residual, self.weight, self.bias, stats.mean, stats.rstd,
                                                  stats.key, self.p, stats.count, sync[0], self.activation.op_args)


# The activation-neutral names: the same classes (act defaults to ReLU).
SyncBatchNormActDropout = SyncBatchNormReLUDropout
SyncBatchNormAddAct = SyncBatchNormAddReLU
