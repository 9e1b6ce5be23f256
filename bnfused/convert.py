"""convert(): swap BatchNormXd -> ReLU (-> Dropout) chains inside nn.Sequential for the fused module
(SyncBatchNormReLUDropout with sync=True / convert_sync)."""
from __future__ import annotations

import torch
from torch import nn

from .modules import BatchNormReLUDropout1d, BatchNormReLUDropout2d, BatchNormReLUDropout3d
from .sync import SyncBatchNormReLUDropout

_FUSED_FOR = {
    nn.BatchNorm1d: BatchNormReLUDropout1d,
    nn.BatchNorm2d: BatchNormReLUDropout2d,
    nn.BatchNorm3d: BatchNormReLUDropout3d,
}


def _fused_for(bn: nn.modules.batchnorm._BatchNorm, p: float, sync: bool, process_group) -> nn.Module:
    """The fused module taking bn's place, sharing its Parameter and buffer objects."""
    if sync:
        return SyncBatchNormReLUDropout.from_batchnorm(bn, p, process_group)
    return _FUSED_FOR[type(bn)].from_batchnorm(bn, p)


def _convert_sequential(seq: nn.Sequential, sync: bool, process_group) -> None:
    names = list(seq._modules.keys())
    matched = (*_FUSED_FOR, nn.SyncBatchNorm) if sync else tuple(_FUSED_FOR)
    i = 0
    while i < len(names):
        bn = seq._modules[names[i]]
        nxt = seq._modules[names[i + 1]] if i + 1 < len(names) else None
        if type(bn) in matched and type(nxt) is nn.ReLU:
            drop = seq._modules[names[i + 2]] if i + 2 < len(names) else None
            has_dropout = type(drop) is nn.Dropout  # element-wise only; Dropout2d/3d drop whole channels
            p = drop.p if has_dropout else 0.0
            # Keep indices (and so state_dict keys) stable: the fused block takes BN's slot, the rest become Identity.
            fused = _fused_for(bn, p, sync, process_group)
            seq._modules[names[i]] = fused
            seq._modules[names[i + 1]] = nn.Identity()
            if has_dropout:
                seq._modules[names[i + 2]] = nn.Identity()
            i += 3 if has_dropout else 2
        else:
            i += 1


def convert(module: nn.Module, sync: bool = False, process_group=None) -> nn.Module:
    """Replace, in place, every nn.BatchNormXd -> nn.ReLU -> nn.Dropout (and nn.BatchNormXd -> nn.ReLU, p = 0)
    chain inside an nn.Sequential (at any depth) by the fused module, copying parameters, buffers and mode.

    Returns ``module``. Only exact nn.BatchNorm1d/2d/3d, nn.ReLU and element-wise nn.Dropout are matched.
    With ``sync=True`` nn.SyncBatchNorm chains are matched too and every chain becomes a
    SyncBatchNormReLUDropout over ``process_group`` (an nn.SyncBatchNorm's own group when None; the world when
    that is None too), as nn.SyncBatchNorm.convert_sync_batchnorm does for the unfused layer.
    """
    if process_group is not None and not sync:
        raise ValueError("convert(): process_group is only used with sync=True")
    for child in module.modules():
        if isinstance(child, nn.Sequential):
            _convert_sequential(child, sync, process_group)
    return module


def convert_sync(module: nn.Module, process_group=None) -> nn.Module:
    """convert(module, sync=True, process_group=process_group): chains of nn.BatchNormXd or nn.SyncBatchNorm ->
    ReLU (-> Dropout) become SyncBatchNormReLUDropout."""
    return convert(module, sync=True, process_group=process_group)
