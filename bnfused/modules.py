"""BatchNormActDropout1d/2d/3d: drop-in nn.BatchNormXd followed by an activation (ReLU by default) and Dropout(p),
fused; BatchNormAddAct1d/2d/3d: the ResNet block tail, BN + residual -> activation (-> Dropout). The ReLU names
(BatchNormReLUDropoutXd, BatchNormAddReLUXd) are the same classes.

They subclass torch.nn.modules.batchnorm._BatchNorm, so parameters, buffers, state_dict keys,
reset_parameters, momentum=None (cumulative average) and train()/eval() behave exactly like nn.BatchNormXd.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional
from .activation import ActivationLike, resolve_activation

_BUFFERS = frozenset(("running_mean", "running_var", "num_batches_tracked"))
_MISSING = object()
# nn.BatchNormXd's bias= (a weight without a bias) is recent: torch 2.13 has it, 2.11 does not.
_BATCHNORM_TAKES_BIAS = "bias" in inspect.signature(_BatchNorm.__init__).parameters


class _BatchNormReLUDropout(_BatchNorm):
    _expected_dims: tuple[int, ...] = ()
    # The unfused layer each dimension-specific module replaces (None: any, as nn.SyncBatchNorm).
    _replaces: type[_BatchNorm] | None = None
    _ops = ("bn_relu_dropout", "bn_act_dropout")  # the functional named in error messages: ReLU's, or the general

    @property
    def _op(self) -> str:
        return self._ops[0] if self.activation.kind == "relu" else self._ops[1]

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, p: float = 0.5,
                 bias: bool = True, act: ActivationLike = "relu", act_kwargs: dict | None = None) -> None:
        activation = resolve_activation(act, act_kwargs)
        functional.check_p(p)
        functional.check_eps(eps)
        if momentum is not None:  # None: cumulative moving average, as nn.BatchNormXd
            functional.check_number(momentum, "momentum")
        # Recent nn.BatchNormXd take bias= (affine weight without bias); pass it only when False so an
        # older torch (no such argument) keeps working with the default.
        if not bias and not _BATCHNORM_TAKES_BIAS:
            raise TypeError(f"{type(self).__name__}(bias=False) needs a torch whose nn.BatchNormXd takes bias= "
                            f"(torch {torch.__version__}'s does not); use affine=False or a newer torch")
        extra = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra)
        self.p = float(p)
        self.activation = activation  # a bnfused.Activation: not a submodule, not in the state_dict

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, p: float = 0.0, **kwargs):
        """The fused module for ``bn`` followed by the activation (``act=``, default ReLU, in kwargs) and
        Dropout(p), sharing bn's state: the same Parameter
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

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling anything: fail here, by name, instead
        # of on the first Python-only construct of the forward.
        raise RuntimeError(
            f"torch.jit.script does not support bnfused.{type(self).__name__}: its forward runs the fused kernels "
            "through torch.autograd.Function and Python-registered custom ops, which TorchScript cannot compile. "
            "Use torch.compile or torch.export on the converted model, or script the model before bnfused.convert() "
            "(bnfused.unconvert(model) gives back its torch.nn modules).")

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._expected_dims:
            dims = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"expected {dims} input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.activation}, p={self.p}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        weight, bias = self._tensor("weight"), self._tensor("bias")
        running_mean, running_var, bn_training, factor = self._batch_norm_step(input, weight, bias)
        return functional.bn_act_dropout_unchecked(input, running_mean, running_var, weight, bias, bn_training,
                                                   factor, self.eps, self.p, dropout_training=self.training,
                                                   act=self.activation)

    def _tensor(self, name: str) -> Tensor | None:
        """self.<name> for a parameter or buffer, read from its dict: ``self.weight`` goes through
        nn.Module.__getattr__ (~0.5 us a name, 10 names a call: most of the gap to nn.BatchNorm2d -> nn.ReLU on a
        small layer). A name not in the dict (a parametrization's property, ...) takes the attribute lookup."""
        store = self._buffers if name in _BUFFERS else self._parameters
        t = store.get(name, _MISSING)
        return getattr(self, name) if t is _MISSING else t

    def _batch_norm_step(self, input: Tensor, weight: Tensor | None,
                         bias: Tensor | None) -> tuple[Tensor | None, Tensor | None, bool, float]:
        """_BatchNorm.forward's bookkeeping, every check first: (running_mean, running_var, bn_training,
        exponential_average_factor) for the functional, num_batches_tracked advanced in training."""
        running_mean, running_var = self._tensor("running_mean"), self._tensor("running_var")
        training, momentum = self.training, self.momentum
        bn_training = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        exponential_average_factor = 0.0 if momentum is None else momentum
        functional.check_inputs(input, running_mean, running_var, weight, bias, bn_training,
                                exponential_average_factor, self.eps, self.p, self._op)
        if training and self.track_running_stats:
            num_batches_tracked = self._tensor("num_batches_tracked")
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                if momentum is None:  # cumulative moving average
                    exponential_average_factor = 1.0 / float(num_batches_tracked)
        return running_mean, running_var, bn_training, exponential_average_factor


_MODULE_DOC = r"""Applies Batch Normalization, an activation (ReLU by default) and Dropout over a {dims} input with
    fused kernels.

    Computes, per channel, in two passes over memory for the training forward (statistics, then the rest) and
    two for the backward,

    .. math::

        y = \mathrm{{Dropout}}_p\left(\mathrm{{act}}\left(
            \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} * \gamma + \beta\right)\right)

    with the semantics of ``nn.Sequential(nn.{bn}(...), act, nn.Dropout(p))``: in training, batch mean and
    biased variance normalise the input and update :attr:`running_mean` / :attr:`running_var` (the latter with
    the unbiased variance), :attr:`num_batches_tracked` counts the steps and kept elements are scaled by
    :math:`1/(1-p)`; in eval mode the running statistics are used and dropout is the identity. With
    ``track_running_stats=False`` batch statistics are used in both modes. Parameters, buffers, ``state_dict``
    keys, ``reset_parameters`` and ``momentum=None`` are those of ``nn.{bn}``, so ``load_state_dict`` works both
    ways between the two. Statistics accumulate in float32 (float64 for float64 input); float16 / bfloat16
    results are the float32 computation rounded once. The activation is PyTorch's, its gradient at the kinks and
    for NaN included (ReLU passes NaN and ``-0.0`` through like ``torch.relu``); it is not part of the
    ``state_dict``.

    Differences from the unfused layers:

    * The dropout mask is not ``nn.Dropout``'s random stream: it is Philox4x32-10 keyed by an int64 (seed,
      offset) pair drawn from the default generator (so ``torch.manual_seed`` reproduces it) and the element's
      logical index, hence the same on CPU and CUDA and for any memory format. Its law is the same.
    * The drop probability is :attr:`p` rounded to a multiple of :math:`2^{{-16}}`; kept elements are scaled by
      exactly :math:`1/(1-p)`.
    * :attr:`eps` must be positive and finite (``nn.{bn}`` accepts 0 in eval).
    * Double backward is not supported: differentiating a gradient through the block raises.
    * Autograd saves the input, per-channel statistics and the 16-byte key (plus the mask packed 1 bit per element
      in CPU training), not the intermediate results.

    Bad arguments raise what PyTorch raises, before any running statistic changes: ``ValueError`` for a wrong
    number of dimensions, a single value per channel in training, ``p`` outside [0, 1] or ``eps <= 0``;
    ``TypeError`` for a ``p``, ``eps`` or ``momentum`` that is not a number.

    Args:
        num_features: :math:`C` from an expected input of size {shape}
        eps: a value added to the denominator for numerical stability; must be positive. Default: 1e-5
        momentum: the value used for the running_mean and running_var computation. Can be set to ``None`` for
            cumulative moving average (i.e. simple average). Default: 0.1
        affine: a boolean value that when set to ``True``, this module has learnable affine parameters
            :math:`\gamma` (``weight``) and :math:`\beta` (``bias``). Default: ``True``
        track_running_stats: a boolean value that when set to ``True``, this module tracks the running mean and
            variance, and when set to ``False``, it does not (the buffers are ``None``) and uses batch statistics
            in eval mode too. Default: ``True``
        device, dtype: of the parameters and buffers, as for ``nn.{bn}``. Keep them float32 for float16 /
            bfloat16 input (what ``torch.autocast`` does); the input's own dtype works too.
        p (keyword-only): probability of an element to be zeroed in training. Default: 0.5
        bias (keyword-only): with ``affine=True`` and ``bias=False`` the module has a weight but no bias.
            Default: ``True``
        act (keyword-only): the activation, as timm's ``BatchNormAct2d`` takes it: a name (``"relu"``,
            ``"relu6"``, ``"hardtanh"``, ``"leaky_relu"``, ``"silu"``, ``"hardswish"``, ``"gelu"``,
            ``"gelu_tanh"``, ``"elu"``, ``"mish"``, ``"identity"``), a torch.nn activation class or instance
            (``nn.LeakyReLU(0.1)``), a functional, or ``None`` (identity). Default: ``"relu"``
        act_kwargs (keyword-only): constructor arguments for a name or class. Default: ``None``

    Shape:
        - Input: {shape}{layouts}
        - Output: same shape as the input, in the input's memory format

    Examples::

{example}
    """


class BatchNormActDropout1d(_BatchNormReLUDropout):
    __doc__ = _MODULE_DOC.format(
        dims="2D or 3D", bn="BatchNorm1d", shape=r":math:`(N, C)` or :math:`(N, C, L)`", layouts="",
        example="""\
        >>> block = bnfused.BatchNormReLUDropout1d(100, p=0.1)
        >>> x = torch.randn(20, 100)
        >>> block(x).shape
        torch.Size([20, 100])
        >>> # the same layer with its dropout off: nn.BatchNorm1d -> nn.ReLU in eval mode
        >>> bn = nn.BatchNorm1d(100).eval()
        >>> bn.load_state_dict(block.state_dict())
        <All keys matched successfully>
        >>> torch.allclose(block.eval()(x), torch.relu(bn(x)), atol=1e-6)
        True""")

    _expected_dims = (2, 3)
    _replaces = nn.BatchNorm1d


class BatchNormActDropout2d(_BatchNormReLUDropout):
    __doc__ = _MODULE_DOC.format(
        dims="4D", bn="BatchNorm2d", shape=r":math:`(N, C, H, W)`", layouts=", contiguous or channels_last",
        example="""\
        >>> block = bnfused.BatchNormActDropout2d(64, p=0.1, act="silu")
        >>> x = torch.randn(8, 64, 14, 14).to(memory_format=torch.channels_last)
        >>> y = block(x)
        >>> y.shape, y.is_contiguous(memory_format=torch.channels_last)
        (torch.Size([8, 64, 14, 14]), True)
        >>> y.sum().backward()
        >>> block.num_batches_tracked
        tensor(1)""")

    _expected_dims = (4,)
    _replaces = nn.BatchNorm2d


class BatchNormActDropout3d(_BatchNormReLUDropout):
    __doc__ = _MODULE_DOC.format(
        dims="5D", bn="BatchNorm3d", shape=r":math:`(N, C, D, H, W)`", layouts=", contiguous or channels_last_3d",
        example="""\
        >>> block = bnfused.BatchNormReLUDropout3d(16, momentum=None, p=0.2)   # cumulative running average
        >>> x = torch.randn(2, 16, 4, 8, 8, dtype=torch.bfloat16)
        >>> block(x).dtype
        torch.bfloat16""")

    _expected_dims = (5,)
    _replaces = nn.BatchNorm3d


_ADD_DOC = r"""Applies Batch Normalization, a residual add, an activation (ReLU by default) and Dropout over a {dims}
    input with fused kernels: the tail of a ResNet block (cuDNN's and Apex's bn_add_relu), plus dropout.

    .. math::

        y = \mathrm{{Dropout}}_p\left(\mathrm{{act}}\left(\mathrm{{BN}}(x) + r\right)\right)

    ``forward(input, residual)`` has the semantics of ``act(nn.{bn}(...)(input) + residual)`` followed by
    ``nn.Dropout(p)`` (default ``p=0``: no dropout); statistics, ``running_mean`` / ``running_var``,
    ``num_batches_tracked``, ``momentum=None``, ``state_dict`` keys and eval mode are those of ``nn.{bn}``, as for
    :class:`BatchNormActDropout{d}d` (same base class, same dropout mask: Philox keyed by a (seed, offset) pair
    and the logical index, :attr:`p` rounded to a multiple of :math:`2^{{-16}}`). ``residual`` must have the
    input's shape and device (``RuntimeError`` otherwise, before any running statistic moves), in any memory
    format; a residual of another dtype (autocast: a float32 skip connection around a bfloat16 branch) gives the
    unfused layers' promoted result, computed unfused. With identity, ReLU or Hardtanh/ReLU6 (whose derivative is
    0 or 1) the residual's gradient is ``grad * keep / (1 - p) * act'(BN(x) + residual)`` and autograd saves the
    input, per-channel statistics and 1 bit per element, never the residual; other activations are computed by
    F.batch_norm and pointwise ops with the same dropout mask. Double backward is not supported.

    Args:
        num_features: :math:`C` from an expected input of size {shape}
        eps, momentum, affine, track_running_stats, device, dtype: as for ``nn.{bn}`` (``eps`` must be positive)
        p (keyword-only): probability of an element to be zeroed in training. Default: 0.0
        bias (keyword-only): with ``affine=True`` and ``bias=False`` the module has a weight but no bias.
            Default: ``True``
        act, act_kwargs (keyword-only): the activation, as for :class:`BatchNormActDropout{d}d`. Default: ReLU

    Shape:
        - Input, residual: {shape}
        - Output: same shape as the input, in the input's memory format

    Examples::

        >>> block = bnfused.BatchNormAddAct{d}d(4)
        >>> x, identity = torch.randn({example_shape}), torch.randn({example_shape})
        >>> y = block(x, identity)
        >>> bn = nn.{bn}(4)
        >>> torch.allclose(y, torch.relu(bn(x) + identity), atol=1e-6)
        True
    """


class _BatchNormAddReLU(_BatchNormReLUDropout):
    """The fused base with a residual: forward(input, residual) = dropout(act(bn(input) + residual), p)."""

    _ops = ("bn_add_relu_dropout", "bn_add_act_dropout")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, p: float = 0.0,
                 bias: bool = True, act: ActivationLike = "relu", act_kwargs: dict | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, p=p, bias=bias,
                         act=act, act_kwargs=act_kwargs)

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:  # type: ignore[override]
        self._check_input_dim(input)
        functional.check_residual(input, residual)  # before num_batches_tracked moves, like every other check
        weight, bias = self._tensor("weight"), self._tensor("bias")
        running_mean, running_var, bn_training, factor = self._batch_norm_step(input, weight, bias)
        return functional.bn_add_act_dropout_unchecked(input, residual, running_mean, running_var, weight,
                                                       bias, bn_training, factor, self.eps, self.p,
                                                       dropout_training=self.training, act=self.activation)


class BatchNormAddAct1d(_BatchNormAddReLU):
    __doc__ = _ADD_DOC.format(dims="2D or 3D", bn="BatchNorm1d", d=1, shape=r":math:`(N, C)` or :math:`(N, C, L)`",
                              example_shape="8, 4")
    _expected_dims = (2, 3)
    _replaces = nn.BatchNorm1d


class BatchNormAddAct2d(_BatchNormAddReLU):
    __doc__ = _ADD_DOC.format(dims="4D", bn="BatchNorm2d", d=2, shape=r":math:`(N, C, H, W)`",
                              example_shape="2, 4, 3, 3")
    _expected_dims = (4,)
    _replaces = nn.BatchNorm2d


class BatchNormAddAct3d(_BatchNormAddReLU):
    __doc__ = _ADD_DOC.format(dims="5D", bn="BatchNorm3d", d=3, shape=r":math:`(N, C, D, H, W)`",
                              example_shape="2, 4, 2, 3, 3")
    _expected_dims = (5,)
    _replaces = nn.BatchNorm3d


# The ReLU names: the same classes (act defaults to ReLU), so code and checkpoints written for them keep working.
BatchNormReLUDropout1d, BatchNormReLUDropout2d, BatchNormReLUDropout3d = (
    BatchNormActDropout1d, BatchNormActDropout2d, BatchNormActDropout3d)
BatchNormAddReLU1d, BatchNormAddReLU2d, BatchNormAddReLU3d = BatchNormAddAct1d, BatchNormAddAct2d, BatchNormAddAct3d
