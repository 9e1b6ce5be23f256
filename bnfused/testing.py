"""bnfused.testing: the unfused PyTorch reference, F.batch_norm (+ residual) -> the activation (torch.nn.functional)
-> the Philox keep mask the kernels use, for checking the fused modules in your own tests.

bnfused's tests and benchmarks compare the fused kernels with this; it is slow on purpose (several passes, full
mask).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .activation import ActivationLike, resolve_activation


def _keyed_dropout(y: Tensor, p: float, key: Optional[Tensor], drop: bool, who: str) -> Tensor:
    """Dropout of y with the fused kernels' mask for `key` (when `drop` and p > 0), scaled as ATen's dropout."""
    if drop and p > 0:
        if p >= 1:
            return y * 0.0
        if key is None:
            raise ValueError(f"{who}: a Philox key is needed when dropout is active")
        keep = ops.dropout_mask(key.to(y.device), y.shape, p)
        # As ATen's dropout: input * (mask / (1 - p)).
        y = y * (keep.to(y.dtype) * (1.0 / (1.0 - p)))
    return y


def reference_bn_relu_dropout(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                              weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                              training: bool = False, momentum: float = 0.1, eps: float = 1e-5, p: float = 0.5,
                              key: Optional[Tensor] = None, dropout_training: Optional[bool] = None,
                              act: ActivationLike = "relu") -> Tensor:
    """Unfused equivalent of bnfused.bn_act_dropout (bn_relu_dropout by default) with an explicit Philox key
    (int64[2])."""
    y = resolve_activation(act)(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))
    return _keyed_dropout(y, p, key, training if dropout_training is None else dropout_training,
                          "reference_bn_relu_dropout")


def reference_bn_add_relu_dropout(input: Tensor, residual: Tensor, running_mean: Optional[Tensor],
                                  running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                                  bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1,
                                  eps: float = 1e-5, p: float = 0.0, key: Optional[Tensor] = None,
                                  dropout_training: Optional[bool] = None, act: ActivationLike = "relu") -> Tensor:
    """Unfused equivalent of bnfused.bn_add_act_dropout: F.batch_norm -> + residual -> act -> the same mask."""
    z = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual
    y = resolve_activation(act)(z)
    return _keyed_dropout(y, p, key, training if dropout_training is None else dropout_training,
                          "reference_bn_add_relu_dropout")


class KeyedDropout(nn.Module):
    """nn.Dropout with the fused kernels' mask for a given key (identity in eval or when p = 0)."""

    def __init__(self, p: float, key: Optional[Tensor] = None) -> None:
        super().__init__()
        self.p = p
        self.key = key

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return x * 0.0
        keep = ops.dropout_mask(self.key.to(x.device), x.shape, self.p)
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))


def reference_block(dim: int, num_features: int, p: float = 0.5, key: Optional[Tensor] = None,
                    act: ActivationLike = "relu", **bn_kwargs) -> nn.Sequential:
    """nn.BatchNorm{dim}d -> the activation's nn module -> KeyedDropout: the unfused module a fused block must
    match."""
    bn_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    return nn.Sequential(bn_cls(num_features, **bn_kwargs), resolve_activation(act).module(), KeyedDropout(p, key))
