"""fold_eval(): fold an eval-mode fused block into the conv/linear before it, like
torch.nn.utils.fusion.fuse_conv_bn_eval.

In eval mode a BatchNormActDropoutXd is act(x * a + b) with per-channel constants a = weight * rstd_running and
b = bias - running_mean * a (dropout is the identity), so the affine part folds into the preceding layer's weight
and bias and only the activation is left.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .modules import _BatchNormAddReLU, _BatchNormReLUDropout


def _check_foldable(layer: nn.Module, block: nn.Module, out_features: int) -> None:
    # AssertionError for the states torch.nn.utils.fusion rejects, with the same wording where they overlap.
    if layer.training or block.training:
        raise AssertionError("Fusion only for eval! Call .eval() on both the layer and the bnfused block "
                             f"(layer.training={layer.training}, block.training={block.training})")
    if block.running_mean is None or block.running_var is None:
        raise AssertionError("bn.running_mean and bn.running_var must not be None: a block built with "
                             "track_running_stats=False normalises with batch statistics even in eval mode, "
                             "so it cannot be folded")
    if out_features != block.num_features:
        raise AssertionError(f"To fuse, the layer's output channels must equal the block's num_features, got "
                             f"{out_features} and {block.num_features}")


def _folded_parameters(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """(weight * scale per output channel, bias * scale + shift) in the layer's dtypes; math in float64."""
    w = layer.weight
    if isinstance(layer, _ConvNd) and layer.transposed:
        # ConvTranspose weight is (in, out / groups, *k): output channel g * (out / groups) + j is slice [g, :, j].
        groups = layer.groups
        grouped = w.detach().double().reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        fused_w = grouped * scale.reshape(groups, 1, w.shape[1], *([1] * (w.dim() - 2)))
    else:  # Conv weight (out, in / groups, *k) and Linear weight (out, in): output channel is dim 0.
        fused_w = w.detach().double() * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b = layer.bias
    b_dtype = w.dtype if b is None else b.dtype
    b_grad = w.requires_grad if b is None else b.requires_grad
    fused_b = shift if b is None else b.detach().double() * scale + shift
    return (nn.Parameter(fused_w.reshape(w.shape).to(w.dtype), w.requires_grad),
            nn.Parameter(fused_b.to(b_dtype), b_grad))


def fold_eval(layer: nn.Module, block: _BatchNormReLUDropout) -> nn.Sequential:
    r"""Fold an eval-mode fused block into the Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear before it.

    In eval mode the block is ``act(x * a + b)`` with per-channel constants ``a = weight / sqrt(running_var +
    eps)`` and ``b = bias - running_mean * a`` (dropout is the identity), so the affine part folds into the
    layer's weight and bias, as ``torch.nn.utils.fusion.fuse_conv_bn_eval`` does for ``nn.BatchNormXd``. The
    folding is computed in float64 and stored in the layer's dtypes; ``layer`` and ``block`` are not modified.

    Args:
        layer: the eval-mode ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear`` whose output feeds
            the block; its output channels must equal ``block.num_features``
        block: an eval-mode :class:`BatchNormActDropout1d` / ``2d`` / ``3d`` (or SyncBatchNormActDropout) with
            running statistics, any activation. Not a BatchNormAddAct (its activation follows the residual add):
            fold that one's batch norm with ``torch.nn.utils.fusion.fuse_conv_bn_eval`` and keep
            ``act(out + residual)``.

    Returns:
        ``nn.Sequential(folded_layer, act)``, ``act`` the torch.nn module of the block's activation
        (``block.activation.module()``: ``nn.ReLU()``, ``nn.SiLU()``, ``nn.LeakyReLU(0.1)``, ...; ``nn.Identity()``
        for identity), equal to ``block(layer(x))`` in eval mode.

    Raises ``TypeError`` for other module types and ``AssertionError``, as ``fuse_conv_bn_eval`` does, when either
    module is in training mode, the block has no running statistics (``track_running_stats=False``) or the
    channel counts differ.

    Examples::

        >>> conv = nn.Conv2d(3, 16, 3, padding=1).eval()
        >>> block = bnfused.BatchNormReLUDropout2d(16, p=0.1).eval()
        >>> folded = bnfused.fold_eval(conv, block)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(folded(x), block(conv(x)), atol=1e-5)
        True
    """
    if isinstance(block, _BatchNormAddReLU):  # act(bn(x) + residual): the act cannot follow the folded layer
        raise TypeError(f"fold_eval(): {type(block).__name__} adds a residual before its ReLU, so it does not fold "
                        "into nn.Sequential(layer, nn.ReLU()); fold its batch norm alone with "
                        "torch.nn.utils.fusion.fuse_conv_bn_eval(layer, block) (it is a BatchNorm module) and "
                        "apply relu(folded(x) + residual)")
    if not isinstance(block, _BatchNormReLUDropout):
        raise TypeError(f"fold_eval(): block must be a bnfused.BatchNormReLUDropoutXd, got {type(block).__name__}")
    if isinstance(layer, nn.Linear):
        _check_foldable(layer, block, layer.out_features)
    elif isinstance(layer, _ConvNd):
        _check_foldable(layer, block, layer.out_channels)
    else:
        raise TypeError(f"fold_eval(): layer must be a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear, got "
                        f"{type(layer).__name__}")
    folded = copy.deepcopy(layer)
    with torch.no_grad():
        rstd = torch.rsqrt(block.running_var.double() + block.eps)
        scale = rstd if block.weight is None else block.weight.double() * rstd
        shift = -block.running_mean.double() * scale
        if block.bias is not None:
            shift = shift + block.bias.double()
        folded.weight, folded.bias = _folded_parameters(layer, scale, shift)
    return nn.Sequential(folded, block.activation.module())
