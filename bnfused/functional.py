"""bn_act_dropout() and bn_add_act_dropout(): the functional forms, mirroring F.batch_norm plus the activation and
dropout's p and generator (bn_relu_dropout() and bn_add_relu_dropout(): the same with ReLU).

All argument checks run before any running statistic changes; errors have PyTorch's types and wording.
"""
from __future__ import annotations

import enum
import functools
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import _extension, ops
from .activation import RELU, Activation, ActivationLike, resolve_activation
from .autograd import BNAddReLUDropoutFunction, BNReLUDropoutFunction, _saves_keep_bits  # (registers autograd)

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_number(value, name: str) -> None:
    """TypeError, naming the argument, for a p / eps / momentum that is not a real number. bool is rejected too (a
    flag passed in the wrong place); SymInt/SymFloat pass (torch.compile(dynamic=True) traces numbers as them)."""
    if type(value) is float or type(value) is int:  # the common case, before the ABC check (small layers feel it)
        return
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")


def check_p(p: float) -> None:
    check_number(p, "p")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def check_eps(eps: float, op: str = "bn_relu_dropout") -> None:
    check_number(eps, "eps")
    # Comparisons instead of math.isinf: under torch.compile(dynamic=True) eps may be a SymFloat.
    # The wording keeps PyTorch's "eps must be positive" (what its own module tests match).
    if not 0.0 < eps < math.inf:
        raise ValueError(f"{op} eps must be positive (and finite), but got {eps}")


def check_inputs(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float, eps: float,
                 p: float, op: str = "bn_relu_dropout") -> None:
    """Every check of the fused op, raising what PyTorch raises for the unfused layers; op names the caller."""
    if type(input) is Tensor and _HAS_FAST_CHECK and not torch.compiler.is_compiling():
        # Plain tensors: the tensor conditions in one C++ call (~4 us of Python a layer saved); when one fails, the
        # Python checks below find it and raise (eager_inputs_ok in csrc/eager_function.cpp mirrors their tensor
        # conditions: change both together). p, eps and momentum are checked here either way.
        try:
            tensors_ok = _extension._C.eager_inputs_ok(input, running_mean, running_var, weight, bias, bool(training))
        except TypeError:  # a non-tensor argument: the checks below name it
            tensors_ok = False
        if tensors_ok:
            check_p(p)
            check_eps(eps, op)
            check_number(momentum, "momentum")
            return
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}(): input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(f"\"{op}\" not implemented for '{str(input.dtype).replace('torch.', '')}'"
                                  " (expected float32, float64, float16 or bfloat16 input)")
    if input.dim() < 2:
        raise ValueError(f"{op}(): expected input with at least 2 dims (N, C, ...), got {input.dim()}D input")
    check_p(p)
    check_eps(eps, op)
    check_number(momentum, "momentum")  # None too, as F.batch_norm (the modules pass their factor)
    if input.is_cuda and not _extension.WITH_CUDA:
        raise RuntimeError(f"{op}(): input is a CUDA tensor but bnfused was built without CUDA kernels "
                           "(CPU-only torch or no nvcc at build time); rebuild it on a CUDA machine")
    device = input.device
    if device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"{op}(): unsupported device {device}")
    channels = input.shape[1]
    param_dtypes = (input.dtype, ops.acc_dtype(input.dtype))  # hoisted: small layers feel every microsecond
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}"
                               + ("" if t.dim() == 1 else f" (expected a 1-D tensor, got shape {tuple(t.shape)})"))
        if t.device != device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but {name} is on {t.device} and "
                               f"input is on {device}")
        if not t.is_floating_point():
            raise RuntimeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype not in param_dtypes:
            raise RuntimeError(f"mixed dtype: {name} is {t.dtype} but input is {input.dtype}; expected {input.dtype}"
                               + (" or float32" if input.dtype in (torch.float16, torch.bfloat16) else ""))
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")  # as F.batch_norm
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training:
        size_prods = input.shape[0]
        for d in input.shape[2:]:
            size_prods *= d
        if size_prods == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


_HAS_FAST_CHECK = hasattr(_extension._C, "eager_inputs_ok")


def _empty_batch(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    # As torch.batch_norm on a zero-size batch: an empty result still connected to the graph, no stat update.
    out = input.clone()
    if weight is not None:
        out = out * weight[0]
    if bias is not None:
        out = out + bias[0]
    return out


# The private probes the C++ path's gate needs (present in the torch versions bnfused supports; without them every
# call keeps the Python path rather than failing).
_HAS_MODE_PROBES = all(hasattr(torch._C, name) for name in (
    "_are_functorch_transforms_active", "_is_torch_function_mode_enabled", "_len_torch_dispatch_stack"))


def _eager_cpp_path(input: Tensor) -> bool:
    """Whether the eager call can take the C++ path (_C.bn_relu_dropout_eager / _C.bn_add_relu_dropout_eager: the
    same ops and backward formulas as BNReLUDropoutFunction / BNAddReLUDropoutFunction, without their ~50 us of
    Python per layer and step): a plain CPU tensor, outside
    torch.compile, functorch transforms and torch function / dispatch modes, which keep the Python path."""
    return (_HAS_MODE_PROBES and type(input) is Tensor and input.is_cpu and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active() and not torch._C._is_torch_function_mode_enabled()
            and torch._C._len_torch_dispatch_stack() == 0)


def _onnx_exporting(compiling: bool) -> bool:
    """Under torch.onnx.export, either exporter (torch.export underneath, so `compiling`, or the TorchScript tracer).
    ONNX has no fused op: a block exports as the unfused layers do, relu(F.batch_norm(...) (+ residual))
    (BatchNormalization, Add, Relu), then F.dropout when it drops (a training-mode export)."""
    return (compiling or torch._C._get_tracing_state() is not None) and torch.onnx.is_in_onnx_export()


def _batch_norm_param_dtype(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                            weight: Optional[Tensor], bias: Optional[Tensor]) -> Optional[torch.dtype]:
    """The one dtype F.batch_norm takes the parameters and running statistics in (weight/bias widened to it, never
    narrowed; the running statistics, updated in place, keep theirs), or None where there is none."""
    running = {t.dtype for t in (running_mean, running_var) if t is not None}
    params = {t.dtype for t in (weight, bias) if t is not None}
    if len(running) > 1:
        return None
    acc = ops.acc_dtype(input.dtype)
    dtype = next(iter(running)) if running else acc if acc in params else input.dtype
    return dtype if params <= {dtype, input.dtype} else None


def _unfused_batch_norm_act(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                            weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
                            eps: float, residual: Optional[Tensor] = None, act: Activation = RELU) -> Optional[Tensor]:
    """act(F.batch_norm(...) (+ residual)): what a block compiles to without dropout (eval, p = 0). It is the
    graph the unfused model traces to, so inductor fuses the normalization and the activation with the neighbouring
    ops (their reductions and pointwise passes) and generates the backward, where the opaque fused op would cost
    passes of its own; without dropout the fused kernels have no mask to save either. None where F.batch_norm
    cannot take the parameter dtypes (the caller keeps the fused op)."""
    param_dtype = _batch_norm_param_dtype(input, running_mean, running_var, weight, bias)
    if param_dtype is None:
        return None
    weight = weight if weight is None or weight.dtype == param_dtype else weight.to(param_dtype)
    bias = bias if bias is None or bias.dtype == param_dtype else bias.to(param_dtype)
    z = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return act(z if residual is None else z + residual)


def _statistics(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                momentum: float, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, rstd) the kernels normalise with: the batch's in training (running statistics updated in place when
    given, in one op), else the running ones."""
    if training:
        return ops.batch_stats_update(input.detach(), running_mean, running_var, float(momentum), float(eps))
    acc = ops.acc_dtype(input.dtype)
    return running_mean.detach().to(acc), torch.rsqrt(running_var.detach().to(acc) + eps)


class Route(enum.Enum):
    """Which implementation a call runs; _route() picks it, both functionals (and through them every module) obey.

    ============  =====================================================  ===========================================
    route         when (checked in this order)                           what runs
    ============  =====================================================  ===========================================
    EMPTY         the input has no elements                              torch.batch_norm's empty result, no kernel
    COMPOSITE     block tail with a residual of another dtype            F.batch_norm + promoted add + act + the
                  (autocast) or an activation whose derivative is        keyed mask (the fused tail's pass bits hold
                  not 0 or 1 (SiLU, GELU, ...)                           a 0/1 gate only)
    UNFUSED       torch.compile (not export) and no dropout              act(F.batch_norm(...) (+ residual)), which
                                                                         inductor fuses with its neighbours
                  torch.onnx.export (_onnx_exporting)                    the same, then F.dropout if p > 0: what
                                                                         the unfused layers export to
    EAGER_CPP     eager, plain CPU tensors, no function/dispatch mode    one C++ call: statistics, op, C++ autograd
                  or functorch transform                                 node (csrc/eager_function.cpp)
    CUSTOM_OP     torch.compile / torch.export                           the registered op: one graph node, its
                                                                         fake impl and registered autograd
    FUNCTION      eager otherwise (CUDA, tensor subclasses, modes)       the ops under a torch.autograd.Function
    ============  =====================================================  ===========================================

    Every route but EMPTY and COMPOSITE computes the same result (UNFUSED up to inductor's rounding); UNFUSED falls
    back to CUSTOM_OP where F.batch_norm cannot take the parameter dtypes. The backward of every fused route is
    autograd.input_grads / autograd.add_relu_grads (or its C++ twin on EAGER_CPP).
    """
    EMPTY = "empty"
    COMPOSITE = "composite"
    UNFUSED = "unfused"
    EAGER_CPP = "eager C++"
    CUSTOM_OP = "custom op"
    FUNCTION = "autograd.Function"


# The members as module globals: an Enum member access costs ~70 ns (EnumType.__getattr__), a global ~15 ns, and the
# eager CPU call compares a route up to four times.
_EMPTY, _COMPOSITE, _UNFUSED = Route.EMPTY, Route.COMPOSITE, Route.UNFUSED
_EAGER_CPP, _CUSTOM_OP, _FUNCTION = Route.EAGER_CPP, Route.CUSTOM_OP, Route.FUNCTION


def _route(input: Tensor, p: float, residual: Optional[Tensor] = None, act: Activation = RELU) -> Route:
    """The route of one call (table in Route); p is the effective drop probability (0 outside dropout training).
    Written for the eager CPU call, which small layers make thousands of times a step: each mode flag is read once."""
    if input.numel() == 0:
        return _EMPTY
    if residual is not None and (residual.dtype != input.dtype or not act.has_gate_bits):
        return _COMPOSITE
    compiling = torch.compiler.is_compiling()
    if _onnx_exporting(compiling):
        return _UNFUSED
    if compiling:
        return _UNFUSED if p == 0.0 and not torch.compiler.is_exporting() else _CUSTOM_OP
    if _eager_cpp_path(input) and (residual is None or type(residual) is Tensor):
        return _EAGER_CPP
    return _FUNCTION


def _placeholder_key(input: Tensor) -> Tensor:
    # p == 0: the kernels skip the RNG and never read the key
    return torch.zeros(2, dtype=torch.int64, device=input.device)


def bn_act_dropout_unchecked(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                             weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
                             eps: float, p: float, generator: Optional[torch.Generator] = None,
                             seed: Optional[int] = None, dropout_training: Optional[bool] = None,
                             act: Activation = RELU) -> Tensor:
    """bn_act_dropout() after check_inputs(), act resolved: the modules call this once their own checks have run."""
    p = float(p) if (training if dropout_training is None else dropout_training) else 0.0  # dropout's own mode
    route = _route(input, p)
    if route is _EMPTY:
        return act(_empty_batch(input, weight, bias))
    if route is _UNFUSED:
        out = _unfused_batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps, None,
                                      act)
        if out is not None:
            return out if p == 0.0 else torch.nn.functional.dropout(out, p)  # p > 0: ONNX export only
        route = _CUSTOM_OP
    key = ops.philox_key(input.device, generator, seed) if p > 0.0 else None
    act_args = act.op_args
    if route is _EAGER_CPP:
        return _extension._C.bn_relu_dropout_eager(input, running_mean, running_var, weight, bias, bool(training),
                                                   float(momentum), float(eps), p, key, *act_args)
    mean, rstd = _statistics(input, running_mean, running_var, training, momentum, eps)
    args = (input, mean, rstd, weight, bias, _placeholder_key(input) if key is None else key, p, bool(training),
            *act_args)
    if route is _CUSTOM_OP:
        if _saves_keep_bits(input, p) and torch.is_grad_enabled():
            return ops.forward_keep_bits(*args)[0]  # its registered autograd saves the bits for backward
        return ops.forward(*args)
    return BNReLUDropoutFunction.apply(*args)


bn_relu_dropout_unchecked = bn_act_dropout_unchecked  # act defaults to ReLU


@functools.lru_cache(maxsize=64)
def _resolve_name(name: str) -> Activation:
    return resolve_activation(name)


def _resolve(act: ActivationLike, act_kwargs: Optional[dict]) -> Activation:
    """resolve_activation, with a name's Activation made once (a functional call per layer and step)."""
    if isinstance(act, Activation) and not act_kwargs:
        return act
    if isinstance(act, str) and not act_kwargs:
        return _resolve_name(act)
    return resolve_activation(act, act_kwargs)


def bn_act_dropout(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, p: float = 0.5,
                   generator: Optional[torch.Generator] = None, *, act: ActivationLike = "relu",
                   act_kwargs: Optional[dict] = None, seed: Optional[int] = None,
                   dropout_training: Optional[bool] = None) -> Tensor:
    r"""Fused ``F.dropout(act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
    eps)), p, training)``.

    ``training`` has :func:`torch.nn.functional.batch_norm`'s meaning: normalise with the batch's statistics and
    update ``running_mean`` / ``running_var`` in place when they are given (``running_var`` with the unbiased
    variance); with ``training=False`` the running statistics are used. Dropout is applied when
    ``dropout_training`` (default: ``training``) is true and ``p > 0``; kept elements are scaled by
    :math:`1/(1-p)`. The activation is PyTorch's, gradient at its kinks and NaN included (ReLU passes NaN and
    ``-0.0`` through like ``torch.relu``); float16 / bfloat16 results are the float32 computation rounded once.

    The dropout mask is Philox4x32-10 keyed by an int64 (seed, offset) pair and the element's logical index, so it
    does not depend on memory layout or device. The pair is drawn from ``generator`` (the input device's default
    generator when ``None``, so ``torch.manual_seed`` reproduces it), or is ``(seed, 0)`` when ``seed`` is given:
    the same ``seed`` gives the same mask on CPU and CUDA. The drop probability is ``p`` rounded to a multiple of
    :math:`2^{-16}`.

    Args:
        input: :math:`(N, C, *)` float32, float64, float16 or bfloat16 tensor, contiguous, channels_last or
            channels_last_3d (other strides are copied once)
        running_mean, running_var: :math:`(C,)` running statistics or ``None`` (both or neither); required when
            ``training=False``. Updated in place in training.
        weight, bias: optional :math:`(C,)` affine parameters :math:`\gamma`, :math:`\beta`. Default: ``None``
        training: use (and update) batch statistics. Default: ``False``
        momentum: factor of the running-statistics update; must be a number (not ``None``), as for
            ``F.batch_norm``. Default: 0.1
        eps: added to the variance; must be positive and finite. Default: 1e-5
        p: probability of an element to be zeroed, in [0, 1]. Default: 0.5
        generator: ``torch.Generator`` on the input's device to draw the dropout key from. Default: ``None``
        act (keyword-only): the activation, as :func:`bnfused.resolve_activation` takes it: a name
            (``"relu"``, ``"relu6"``, ``"hardtanh"``, ``"leaky_relu"``, ``"silu"``, ``"hardswish"``, ``"gelu"``,
            ``"gelu_tanh"``, ``"elu"``, ``"mish"``, ``"identity"``), a torch.nn activation class or instance
            (``nn.LeakyReLU(0.2)``), a functional (``F.silu``) or ``None`` (identity). Default: ``"relu"``
        act_kwargs (keyword-only): constructor arguments for a name or class (``dict(negative_slope=0.2)``).
            Default: ``None``
        seed (keyword-only): draw no key, use ``(seed, 0)``; an int of at most 64 bits. Default: ``None``
        dropout_training (keyword-only): whether dropout is active, independently of ``training``.
            Default: ``None`` (= ``training``)

    Returns:
        Tensor of the input's shape and dtype, in the input's memory format.

    Raises ``ValueError`` (wrong dims, one value per channel in training, ``p`` out of range, ``eps <= 0``, only
    one of the running statistics), ``TypeError`` (``p``, ``eps`` or ``momentum`` not a number, input not a
    tensor), ``RuntimeError`` (shape, dtype or device mismatch) or ``NotImplementedError`` (integer input), before
    any running statistic changes. Double backward through the result raises.

    Examples::

        >>> x = torch.randn(16, 8, 5, 5)
        >>> running_mean, running_var = torch.zeros(8), torch.ones(8)
        >>> y = bnfused.bn_act_dropout(x, running_mean, running_var, training=True, momentum=0.1, p=0.25, act="silu")
        >>> bool(running_mean.any())
        True
        >>> # without dropout it is the unfused chain
        >>> ref = F.silu(F.batch_norm(x, None, None, training=True))
        >>> y = bnfused.bn_act_dropout(x, None, None, training=True, p=0.0, act=nn.SiLU)
        >>> torch.allclose(y, ref, atol=1e-5)
        True
        >>> # a seed gives the same mask on every call (and on every device)
        >>> a = bnfused.bn_act_dropout(x, None, None, training=True, p=0.5, seed=1234, act="relu6")
        >>> b = bnfused.bn_act_dropout(x, None, None, training=True, p=0.5, seed=1234, act="relu6")
        >>> torch.equal(a, b)
        True
    """
    activation = _resolve(act, act_kwargs)
    check_inputs(input, running_mean, running_var, weight, bias, training, momentum, eps, p, "bn_act_dropout")
    return bn_act_dropout_unchecked(input, running_mean, running_var, weight, bias, training, momentum, eps, p,
                                    generator, seed, dropout_training, activation)


def bn_relu_dropout(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5, p: float = 0.5,
                    generator: Optional[torch.Generator] = None, *, seed: Optional[int] = None,
                    dropout_training: Optional[bool] = None) -> Tensor:
    r"""Fused ``F.dropout(F.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
    eps)), p, training)``: :func:`bn_act_dropout` with ``act="relu"`` (arguments, checks and dropout mask as there).

    Examples::

        >>> x = torch.randn(16, 8, 5, 5)
        >>> y = bnfused.bn_relu_dropout(x, torch.zeros(8), torch.ones(8), training=True, p=0.25)
        >>> bool((y >= 0).all())
        True
    """
    check_inputs(input, running_mean, running_var, weight, bias, training, momentum, eps, p)
    return bn_act_dropout_unchecked(input, running_mean, running_var, weight, bias, training, momentum, eps, p,
                                    generator, seed, dropout_training)


def check_residual(input: Tensor, residual: Tensor) -> None:
    """The residual of bn_add_act_dropout: input's shape (no broadcasting) and device, as RuntimeError. Its dtype
    may differ (torch's type promotion, see _composite_add_act_dropout)."""
    if not isinstance(residual, Tensor):
        raise TypeError(f"bn_add_relu_dropout(): residual must be a Tensor, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise RuntimeError(f"bn_add_relu_dropout(): residual of shape {tuple(residual.shape)} must match the input's "
                           f"shape {tuple(input.shape)}")
    if residual.device != input.device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but residual is on {residual.device} and "
                           f"input is on {input.device}")


def _composite_add_act_dropout(input: Tensor, residual: Tensor, running_mean: Optional[Tensor],
                               running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                               training: bool, momentum: float, eps: float, p: float,
                               generator: Optional[torch.Generator], seed: Optional[int], act: Activation) -> Tensor:
    """The block tail where the fused kernels do not apply: a residual of another dtype than the input (under
    autocast, a float32 skip connection around a bfloat16 branch: bn(input) rounded to the input's dtype and the sum
    in torch's promoted dtype), or an activation whose gradient is not a 0/1 gate (the tail's pass bits hold no
    more). The unfused layers' result from F.batch_norm and pointwise ops (running statistics updated by
    F.batch_norm, as the unfused layer updates them), with the fused modules' dropout mask."""
    out = _unfused_batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps, residual,
                                  act)
    if out is None:
        raise RuntimeError(f"bn_add_act_dropout(): F.batch_norm cannot take these parameter dtypes (residual "
                           f"{residual.dtype}, input {input.dtype}, activation {act}); give the residual the input's "
                           "dtype and use identity, relu or hardtanh")
    if p == 0.0:
        return out
    if p >= 1.0:
        return out * 0.0
    keep = ops.dropout_mask(ops.philox_key(input.device, generator, seed), input.shape, p)
    return out * (keep.to(out.dtype) * (1.0 / (1.0 - p)))


def bn_add_act_dropout_unchecked(input: Tensor, residual: Tensor, running_mean: Optional[Tensor],
                                 running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                                 training: bool, momentum: float, eps: float, p: float,
                                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                                 dropout_training: Optional[bool] = None, act: Activation = RELU) -> Tensor:
    """bn_add_act_dropout() after check_inputs() and check_residual(), act resolved (the modules' path)."""
    p = float(p) if (training if dropout_training is None else dropout_training) else 0.0  # dropout's own mode
    route = _route(input, p, residual, act)
    if route is _EMPTY:
        return act(_empty_batch(input, weight, bias) + residual)
    if route is _COMPOSITE:
        return _composite_add_act_dropout(input, residual, running_mean, running_var, weight, bias, training,
                                          momentum, eps, p, generator, seed, act)
    if route is _UNFUSED:
        out = _unfused_batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                      residual, act)
        if out is not None:
            return out if p == 0.0 else torch.nn.functional.dropout(out, p)  # p > 0: ONNX export only
        route = _CUSTOM_OP
    key = ops.philox_key(input.device, generator, seed) if p > 0.0 else None
    act_args = act.op_args
    if route is _EAGER_CPP:
        return _extension._C.bn_add_relu_dropout_eager(input, residual, running_mean, running_var, weight, bias,
                                                       bool(training), float(momentum), float(eps), p, key, *act_args)
    mean, rstd = _statistics(input, running_mean, running_var, training, momentum, eps)
    args = (input, residual, mean, rstd, weight, bias, _placeholder_key(input) if key is None else key, p,
            bool(training), *act_args)
    if route is _CUSTOM_OP:
        if torch.is_grad_enabled():
            return ops.add_relu_forward_bits(*args)[0]  # its registered autograd saves the pass bits
        return ops.add_relu_forward(*args)
    return BNAddReLUDropoutFunction.apply(*args)


bn_add_relu_dropout_unchecked = bn_add_act_dropout_unchecked  # act defaults to ReLU


def bn_add_act_dropout(input: Tensor, residual: Tensor, running_mean: Optional[Tensor],
                       running_var: Optional[Tensor], weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                       training: bool = False, momentum: float = 0.1, eps: float = 1e-5, p: float = 0.0,
                       generator: Optional[torch.Generator] = None, *, act: ActivationLike = "relu",
                       act_kwargs: Optional[dict] = None, seed: Optional[int] = None,
                       dropout_training: Optional[bool] = None) -> Tensor:
    r"""Fused ``F.dropout(act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
    eps) + residual), p, training)``: the tail of a ResNet block (cuDNN's and Apex's bn_add_relu) plus dropout.

    Arguments, checks, errors and the dropout mask are :func:`bn_act_dropout`'s (for the same ``seed`` the keep
    mask is the same), with ``p`` defaulting to 0. For identity, ReLU and Hardtanh/ReLU6 (a derivative of 0 or
    1) the tail is fused: the residual's gradient is ``grad * keep / (1 - p) * act'(bn(input) + residual)`` and
    autograd saves the input, per-channel statistics and 1 bit per element, not the residual. Other activations
    are computed by F.batch_norm and pointwise ops with the same dropout mask. float16 / bfloat16 results are the
    float32 computation rounded once.

    Args:
        input: :math:`(N, C, *)` float32, float64, float16 or bfloat16 tensor
        residual: tensor of the input's shape and device (``RuntimeError`` otherwise), any memory format. Of
            another dtype (autocast: a float32 skip connection around a bfloat16 branch) the result is the unfused
            layers': ``bn(input)`` in the input's dtype, the sum and output in torch's promoted dtype, computed by
            F.batch_norm and pointwise ops instead of the fused kernels (same dropout mask)
        running_mean, running_var, weight, bias, training, momentum, eps, generator, act, act_kwargs, seed,
            dropout_training: as for :func:`bn_act_dropout`
        p: probability of an element to be zeroed, in [0, 1]. Default: 0.0

    Returns:
        Tensor of the input's shape and dtype (promoted with the residual's), in the input's memory format.

    Examples::

        >>> x, identity = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
        >>> y = bnfused.bn_add_act_dropout(x, identity, None, None, training=True, act="relu6")
        >>> ref = F.relu6(F.batch_norm(x, None, None, training=True) + identity)
        >>> torch.allclose(y, ref, atol=1e-5)
        True
    """
    activation = _resolve(act, act_kwargs)
    check_inputs(input, running_mean, running_var, weight, bias, training, momentum, eps, p, "bn_add_act_dropout")
    check_residual(input, residual)
    return bn_add_act_dropout_unchecked(input, residual, running_mean, running_var, weight, bias, training,
                                        momentum, eps, p, generator, seed, dropout_training, activation)


def bn_add_relu_dropout(input: Tensor, residual: Tensor, running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        training: bool = False, momentum: float = 0.1, eps: float = 1e-5, p: float = 0.0,
                        generator: Optional[torch.Generator] = None, *, seed: Optional[int] = None,
                        dropout_training: Optional[bool] = None) -> Tensor:
    r"""Fused ``F.dropout(F.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
    eps) + residual), p, training)``: :func:`bn_add_act_dropout` with ``act="relu"``.

    Examples::

        >>> x, identity = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
        >>> y = bnfused.bn_add_relu_dropout(x, identity, None, None, training=True)
        >>> ref = F.relu(F.batch_norm(x, None, None, training=True) + identity)
        >>> torch.allclose(y, ref, atol=1e-5)
        True
    """
    check_inputs(input, running_mean, running_var, weight, bias, training, momentum, eps, p, "bn_add_relu_dropout")
    check_residual(input, residual)
    return bn_add_act_dropout_unchecked(input, residual, running_mean, running_var, weight, bias, training,
                                        momentum, eps, p, generator, seed, dropout_training)
