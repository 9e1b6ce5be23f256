"""SyncBatchNormReLUDropout: the fused counterpart of nn.SyncBatchNorm -> ReLU -> Dropout over torch.distributed.

Training statistics are taken over the whole process group's batch:
  forward:  local ops.batch_stats -> all_gather of (mean, M2, count) per rank -> Chan merge (float64) -> global
            mean/rstd, running stats (identical on every rank) -> ops.forward (on the CPU, forward_keep_bits:
            the 1-bit mask is saved and read back by both backward ops instead of running Philox again)
  backward: local ops.backward_reduce -> one all_reduce of [sum_g, sum_g_xhat] -> ops.backward_input with the
            sums divided by the global count.
Weight/bias gradients are the LOCAL sums, as nn.SyncBatchNorm returns them: DistributedDataParallel's gradient
averaging then gives the gradient of the mean of the ranks' losses, exactly as for every other parameter.
A rank with an empty batch takes part in every collective (count 0 contributes nothing) and gets zero gradients.
Each rank's dropout mask is keyed by (seed, offset + global rank): different on every rank, reproducible from
torch.manual_seed. Outside training, without an initialized process group, or in a group of one process, the
module is exactly the single-process BatchNormReLUDropout (no communication), as nn.SyncBatchNorm falls back to
F.batch_norm.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional, ops
from .autograd import _saves_keep_bits
from .modules import _BatchNormReLUDropout


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


class SyncBNReLUDropoutFunction(torch.autograd.Function):
    """y = dropout(relu(bn(x))) with statistics over a process group; the backward all-reduces Σg and Σg·x̂."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, rstd, key, p, global_count, group):
        ctx.p, ctx.global_count, ctx.group = p, global_count, group
        keep_bits = None
        if x.numel() == 0:
            out = torch.empty_like(x)
        elif _saves_keep_bits(x, p) and any(ctx.needs_input_grad):  # as BNReLUDropoutFunction: no Philox in backward
            out, keep_bits = ops.forward_keep_bits(x, mean, rstd, weight, bias, key, p, True)
        else:
            out = ops.forward(x, mean, rstd, weight, bias, key, p, True)
        ctx.save_for_backward(x, weight, bias, mean, rstd, key, keep_bits)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, rstd, key, keep_bits = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        channels = x.shape[1]
        if x.numel() == 0:
            # Nothing to reduce locally, but the peers' all_reduce needs this rank. Zero (not None) parameter
            # gradients, so that DDP's reducer sees every parameter's gradient on this rank too.
            if need_x:
                dist.all_reduce(torch.zeros(2 * channels, dtype=mean.dtype, device=x.device), group=ctx.group)
            return (torch.zeros_like(x) if need_x else None,
                    torch.zeros_like(weight) if need_w and weight is not None else None,
                    torch.zeros_like(bias) if need_b and bias is not None else None,
                    None, None, None, None, None, None)
        sum_g, sum_g_xhat = ops.backward_reduce(grad_out, x, mean, rstd, weight, bias, key, ctx.p, keep_bits)
        grad_x = None
        if need_x:
            # As nn.SyncBatchNorm: only the input gradient needs the global sums.
            sums = torch.cat([sum_g, sum_g_xhat])
            dist.all_reduce(sums, group=ctx.group)
            global_sum_g, global_sum_g_xhat = sums.split(channels)
            grad_x = ops.backward_input(grad_out, x, mean, rstd, weight, bias, key, ctx.p, global_sum_g,
                                        global_sum_g_xhat, ctx.global_count, keep_bits)
        grad_w = sum_g_xhat.to(weight.dtype) if need_w and weight is not None else None
        grad_b = sum_g.to(bias.dtype) if need_b and bias is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class SyncBatchNormReLUDropout(_BatchNormReLUDropout):
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

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device=None, dtype=None, *,
                 p: float = 0.5, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, p=p, bias=bias)
        self.process_group = process_group

    @classmethod
    def from_batchnorm(cls, bn, p: float = 0.0, process_group: Any = None, **kwargs) -> "SyncBatchNormReLUDropout":
        """As BatchNormReLUDropout2d.from_batchnorm (bn's own Parameter and buffer objects), synchronising over
        ``process_group``: an nn.SyncBatchNorm's own group when None (the world when that is None too)."""
        if process_group is None:
            process_group = getattr(bn, "process_group", None)
        return super().from_batchnorm(bn, p, process_group=process_group, **kwargs)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.size(1) == 0:
            raise ValueError("SyncBatchNormReLUDropout number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        sync = _sync_group(self.process_group) if self.training else None  # eval never communicates
        if sync is None:
            return super().forward(input)  # the single-process module, as nn.SyncBatchNorm falls back
        group, world_size = sync
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        momentum = 0.0 if self.momentum is None else self.momentum
        # One value per channel on this rank is fine when others have more (checked globally below); an expanded
        # view of such an input passes the local check and shares every other check with the single-process path.
        checked = input.expand(2, *input.shape[1:]) if input.numel() == input.shape[1] else input
        functional.check_inputs(checked, running_mean, running_var, self.weight, self.bias, True, momentum,
                                self.eps, self.p)

        channels = input.shape[1]
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
            return functional.bn_relu_dropout_unchecked(input, running_mean, running_var, self.weight, self.bias,
                                                        True, factor, self.eps, self.p)

        mean, m2 = _merge_moments(gathered, channels)
        var = m2 / global_count
        if running_mean is not None:
            with torch.no_grad():
                unbiased = m2 / (global_count - 1)
                running_mean.copy_(running_mean.double() * (1 - factor) + mean * factor)
                running_var.copy_(running_var.double() * (1 - factor) + unbiased * factor)
        acc = ops.acc_dtype(input.dtype)
        rstd = torch.rsqrt(var + self.eps).to(acc)
        mean = mean.to(acc)

        if self.p > 0.0:
            key = ops.philox_key(input.device)
            key[1] += dist.get_rank()  # global rank: masks differ between all processes, not only within a group
        else:
            key = torch.zeros(2, dtype=torch.int64, device=input.device)
        return SyncBNReLUDropoutFunction.apply(input, self.weight, self.bias, mean, rstd, key, self.p,
                                               global_count, group)
