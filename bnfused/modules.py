"""BatchNormReLUDropout1d/2d/3d: drop-in nn.BatchNormXd followed by ReLU and Dropout(p), fused.

They subclass torch.nn.modules.batchnorm._BatchNorm, so parameters, buffers, state_dict keys,
reset_parameters, momentum=None (cumulative average) and train()/eval() behave exactly like nn.BatchNormXd.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional


class _BatchNormReLUDropout(_BatchNorm):
    _expected_dims: tuple[int, ...] = ()
    # The unfused layer each dimension-specific module replaces (None: any, as nn.SyncBatchNorm).
    _replaces: type[_BatchNorm] | None = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, p: float = 0.5,
                 bias: bool = True) -> None:
        functional.check_p(p)
        functional.check_eps(eps)
        # Recent nn.BatchNormXd take bias= (affine weight without bias); pass it only when False so an
        # older torch (no such argument) keeps working with the default.
        extra = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra)
        self.p = float(p)

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, p: float = 0.0, **kwargs):
        """The fused module for ``bn`` followed by ReLU (and Dropout(p)), sharing bn's state: the same Parameter
        and buffer objects (an optimizer, a parameter hook or DDP built on bn keeps working on the fused module),
        bn's eps, momentum, affine, track_running_stats and train/eval mode. Module hooks are not carried over
        (as nn.SyncBatchNorm.convert_sync_batchnorm). ``bn`` is any BatchNorm module (nn.BatchNormXd of the
        matching dimension, nn.SyncBatchNorm, another fused module); kwargs go to the constructor.
        """
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"{cls.__name__}.from_batchnorm() expects a BatchNorm module, got {type(bn).__name__}")
        dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
        if cls._replaces is not None and type(bn) in dims and type(bn) is not cls._replaces:
            raise TypeError(f"{cls.__name__}.from_batchnorm() expects a {cls._replaces.__name__} (or a "
                            f"SyncBatchNorm), got {type(bn).__name__}")
        # Built on the meta device (nothing allocated or initialised), then given bn's own tensors.
        fused = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats, device="meta", p=p,
                    bias=not bn.affine or bn.bias is not None, **kwargs)
        for name in ("weight", "bias"):
            fused._parameters[name] = bn._parameters.get(name)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            fused._buffers[name] = bn._buffers.get(name)
        fused.train(bn.training)
        return fused

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._expected_dims:
            dims = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"expected {dims} input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # Same bookkeeping as _BatchNorm.forward, but every check runs before num_batches_tracked moves.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        functional.check_inputs(input, running_mean, running_var, self.weight, self.bias, bn_training,
                                0.0 if self.momentum is None else self.momentum, self.eps, self.p)
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        return functional.bn_relu_dropout_unchecked(
            input, running_mean, running_var, self.weight, self.bias, bn_training, exponential_average_factor,
            self.eps, self.p, dropout_training=self.training)


class BatchNormReLUDropout1d(_BatchNormReLUDropout):
    """Fused BatchNorm1d -> ReLU -> Dropout(p) over (N, C) or (N, C, L) input."""

    _expected_dims = (2, 3)
    _replaces = nn.BatchNorm1d


class BatchNormReLUDropout2d(_BatchNormReLUDropout):
    """Fused BatchNorm2d -> ReLU -> Dropout(p) over (N, C, H, W) input (contiguous or channels_last)."""

    _expected_dims = (4,)
    _replaces = nn.BatchNorm2d


class BatchNormReLUDropout3d(_BatchNormReLUDropout):
    """Fused BatchNorm3d -> ReLU -> Dropout(p) over (N, C, D, H, W) input (contiguous or channels_last_3d)."""

    _expected_dims = (5,)
    _replaces = nn.BatchNorm3d
