"""bnfused: fused BatchNorm -> activation -> Dropout for PyTorch (C++/CUDA kernels, forward and backward).

    block = bnfused.BatchNormReLUDropout2d(64, p=0.1)     # == Dropout(ReLU(BatchNorm2d(x)))
    block = bnfused.BatchNormActDropout2d(64, act="silu", p=0.1)   # == Dropout(SiLU(BatchNorm2d(x)))
    y = bnfused.bn_relu_dropout(x, running_mean, running_var, weight, bias, training=True, p=0.1)
    model = bnfused.convert(model)                         # swap BN -> ReLU (-> Dropout) sites in place
    model = bnfused.unconvert(model)                       # and back to the torch.nn modules
"""
from . import ops  # noqa: F401  (loads the extension and registers the ops' fake impls)
from ._extension import CPU_CAPABILITY, WITH_CUDA, empty_cache
from ._version import __version__
from .activation import Activation, resolve_activation
from .autograd import BNAddReLUDropoutFunction, BNReLUDropoutFunction
from .convert import ConvertReport, FusedSite, UnfusedBatchNorm, convert, convert_sync, convert_with_report
from .fold import fold_eval
from .functional import bn_act_dropout, bn_add_act_dropout, bn_add_relu_dropout, bn_relu_dropout
from .modules import (BatchNormActDropout1d, BatchNormActDropout2d, BatchNormActDropout3d, BatchNormAddAct1d,
                      BatchNormAddAct2d, BatchNormAddAct3d, BatchNormAddReLU1d, BatchNormAddReLU2d, BatchNormAddReLU3d,
                      BatchNormReLUDropout1d, BatchNormReLUDropout2d, BatchNormReLUDropout3d)
from .sync import SyncBatchNormActDropout, SyncBatchNormAddAct, SyncBatchNormAddReLU, SyncBatchNormReLUDropout
from .unconvert import unconvert

__all__ = [
    "Activation",
    "BNAddReLUDropoutFunction",
    "BNReLUDropoutFunction",
    "BatchNormActDropout1d",
    "BatchNormActDropout2d",
    "BatchNormActDropout3d",
    "BatchNormAddAct1d",
    "BatchNormAddAct2d",
    "BatchNormAddAct3d",
    "BatchNormAddReLU1d",
    "BatchNormAddReLU2d",
    "BatchNormAddReLU3d",
    "BatchNormReLUDropout1d",
    "BatchNormReLUDropout2d",
    "BatchNormReLUDropout3d",
    "CPU_CAPABILITY",
    "ConvertReport",
    "FusedSite",
    "SyncBatchNormActDropout",
    "SyncBatchNormAddAct",
    "SyncBatchNormAddReLU",
    "SyncBatchNormReLUDropout",
    "UnfusedBatchNorm",
    "WITH_CUDA",
    "bn_act_dropout",
    "bn_add_act_dropout",
    "bn_add_relu_dropout",
    "bn_relu_dropout",
    "convert",
    "convert_sync",
    "convert_with_report",
    "empty_cache",
    "fold_eval",
    "resolve_activation",
    "unconvert",
]
