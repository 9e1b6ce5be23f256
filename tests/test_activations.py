"""Every fused activation against PyTorch's unfused layers: the resolver, forward and gradients across dtypes,
layouts, ranks, modes and dropout, the gradient at each kink and at NaN, gradcheck, the block tail, the module API
and the C++ eager path."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfused
from bnfused import Activation, ops, resolve_activation
from bnfused.testing import reference_bn_add_relu_dropout, reference_bn_relu_dropout
from helpers import DTYPES, GRAD_TOL, TOL, leaf, make_input, make_params

# One of each kind, with parameters away from the defaults where it has any.
ACTIVATIONS = [
    Activation("identity"), Activation("relu"), Activation("hardtanh", 0.0, 6.0), Activation("hardtanh", -0.5, 1.5),
    Activation("leaky_relu", 0.2), Activation("silu"), Activation("hardswish"), Activation("gelu"),
    Activation("gelu_tanh"), Activation("elu", 0.7), Activation("mish"),
]
ACT_IDS = [str(a) for a in ACTIVATIONS]
GATE_ACTIVATIONS = [a for a in ACTIVATIONS if a.has_gate_bits]
C = 6


# ---- the resolver ----

@pytest.mark.parametrize("given,expected", [
    (None, Activation("identity")), ("identity", Activation("identity")), ("relu", Activation("relu")),
    ("ReLU6", Activation("hardtanh", 0.0, 6.0)), ("swish", Activation("silu")), ("hard_swish", Activation("hardswish")),
    ("gelu_tanh", Activation("gelu_tanh")), (nn.SiLU, Activation("silu")), (nn.ReLU6(inplace=True), Activation("hardtanh", 0, 6)),
    (nn.LeakyReLU(0.1), Activation("leaky_relu", 0.1)), (nn.Hardtanh(-2.0, 3.0), Activation("hardtanh", -2.0, 3.0)),
    (nn.GELU(approximate="tanh"), Activation("gelu_tanh")), (nn.ELU(0.5), Activation("elu", 0.5)),
    (nn.Mish(), Activation("mish")), (nn.Hardswish(), Activation("hardswish")), (F.silu, Activation("silu")),
    (F.relu6, Activation("hardtanh", 0, 6)), (torch.relu, Activation("relu")), (F.leaky_relu, Activation("leaky_relu", 0.01)),
    (functools.partial(F.gelu, approximate="tanh"), Activation("gelu_tanh")), (nn.Identity(), Activation("identity")),
])
def test_resolve_activation(given, expected):
    assert resolve_activation(given) == expected


def test_resolve_activation_kwargs_and_errors():
    assert resolve_activation("leaky_relu", dict(negative_slope=0.3)) == Activation("leaky_relu", 0.3)
    assert resolve_activation(nn.ELU, dict(alpha=2.0)) == Activation("elu", 2.0)
    assert resolve_activation("gelu", dict(approximate="tanh")) == Activation("gelu_tanh")
    with pytest.raises(ValueError, match="unsupported activation 'tanh'"):
        resolve_activation("tanh")
    with pytest.raises(ValueError, match="unsupported activation module Sigmoid"):
        resolve_activation(nn.Sigmoid())
    with pytest.raises(TypeError):
        resolve_activation("silu", dict(negative_slope=0.1))
    with pytest.raises(TypeError, match="act_kwargs cannot be combined"):
        resolve_activation(nn.SiLU(), dict(inplace=True))
    with pytest.raises(ValueError, match="must be smaller"):
        Activation("hardtanh", 1.0, 1.0)
    with pytest.raises(ValueError, match="approximate"):
        resolve_activation(nn.GELU, dict(approximate="erf"))


@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_activation_module_round_trip(act):
    """The nn module an Activation names (what unconvert puts back) resolves to it again and computes it."""
    module = act.module()
    assert resolve_activation(module) == act
    z = torch.randn(50, dtype=torch.float64) * 4
    torch.testing.assert_close(module(z), act(z), rtol=0, atol=0)


# ---- forward and gradients against the unfused reference ----

def check_against_reference(x, act, training, p, affine=True, momentum=0.1, tail=False):
    """The fused functional's output, input/parameter gradients and running statistics against the float64
    unfused reference with the same keep mask."""
    dtype, device = x.dtype, x.device
    w, b, rm, rv = make_params(x.shape[1], device, ops.acc_dtype(dtype), affine)
    residual = make_input(x.shape, "contiguous", dtype, device) if tail else None
    xs, ws, bs = leaf(x, requires_grad=True), leaf(w), leaf(b)
    rms, rvs = rm.clone(), rv.clone()
    args = dict(training=training, momentum=momentum, eps=1e-5, p=p, seed=11, act=act)
    if tail:
        rs = leaf(residual, requires_grad=True)
        y = bnfused.bn_add_act_dropout(xs, rs, rms, rvs, ws, bs, **args)
    else:
        y = bnfused.bn_act_dropout(xs, rms, rvs, ws, bs, **args)
    assert y.dtype == dtype and y.shape == x.shape
    key = ops.philox_key(device, seed=11)
    xr, wr, br = leaf(x, torch.float64, True), leaf(w, torch.float64), leaf(b, torch.float64)
    rmr, rvr = rm.double(), rv.double()
    ref_args = dict(training=training, momentum=momentum, eps=1e-5, p=p, key=key, act=act)
    if tail:
        rr = leaf(residual, torch.float64, True)
        yr = reference_bn_add_relu_dropout(xr, rr, rmr, rvr, wr, br, **ref_args)
    else:
        yr = reference_bn_relu_dropout(xr, rmr, rvr, wr, br, **ref_args)
    torch.testing.assert_close(y.double(), yr, **TOL[dtype])
    grad = torch.randn(x.shape, dtype=torch.float64, device=device)
    inputs = [t for t in (xs, ws, bs) if t is not None] + ([rs] if tail else [])
    ref_inputs = [t for t in (xr, wr, br) if t is not None] + ([rr] if tail else [])
    for got, want in zip(torch.autograd.grad(y, inputs, grad.to(dtype)), torch.autograd.grad(yr, ref_inputs, grad)):
        torch.testing.assert_close(got.double(), want, **GRAD_TOL[dtype])
    torch.testing.assert_close(rms.double(), rmr, **TOL[torch.float32])
    torch.testing.assert_close(rvs.double(), rvr, **TOL[torch.float32])


@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", [((16, C), "contiguous"), ((3, C, 5, 5), "contiguous"),
                                          ((3, C, 4, 5), "channels_last"), ((2, C, 2, 3, 4), "channels_last")],
                         ids=["1d", "2d", "2d-channels_last", "3d-channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_reference(device, act, dtype, shape, layout, training, p):
    x = make_input(shape, layout, dtype, device, scale=2.0)
    check_against_reference(x, act, training, p)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("p", [1e-3, 0.5, 1.0])
@pytest.mark.parametrize("affine,momentum", [(False, 0.1), (True, None)], ids=["no-affine", "momentum-None"])
def test_matches_reference_dropout_and_conventions(device, act, p, affine, momentum):
    x = make_input((4, C, 3, 7), "contiguous", torch.float32, device, scale=2.0)
    check_against_reference(x, act, True, p, affine=affine, momentum=momentum or 0.0)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_block_tail_matches_reference(device, act, dtype, layout, p):
    """bn_add_act_dropout: fused for the gate activations, the composite route for the others; same results."""
    x = make_input((3, C, 4, 5), layout, dtype, device, scale=2.0)
    check_against_reference(x, act, True, p, tail=True)


# ---- the gradient at the kinks and at NaN, bit for bit ----

# Values on every kink of the activations above, infinities, NaN and -0, then random values: torch's own kernels
# take their vector loop for the first elements of a tensor this long, the loop whose NaN gradient bnfused follows.
SPECIAL = [0.0, -0.0, 6.0, -3.0, 3.0, -0.5, 1.5, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e-30, -1e-30, 20.0, -20.0]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kinks_and_nan_match_torch(device, act, dtype):
    """In eval with running mean 0, running var 0.75, eps 0.25, weight 1, bias -0 the pre-activation is exactly the
    input (-0 included), so the fused forward and its input gradient (dy * act'(z) * 1) equal torch's activation
    and its autograd value by value: the piecewise-linear activations bit for bit at every kink, infinity, NaN and
    -0. The transcendental ones (whose vector math differs between torch's runtime ISA and bnfused's build) agree
    to float rounding on finite values."""
    z = torch.tensor(SPECIAL * 4, dtype=dtype, device=device)
    z = torch.cat([z, torch.randn(64, dtype=dtype, device=device) * 4])[None, :, None].repeat(2, 1, 1)  # (2, C, 1)
    channels = z.shape[1]
    rm, rv = torch.zeros(channels, dtype=dtype, device=device), torch.full((channels,), 0.75, dtype=dtype, device=device)
    x = z.clone().requires_grad_()
    y = bnfused.bn_act_dropout(x, rm, rv, torch.ones_like(rm), torch.full_like(rm, -0.0), training=False, eps=0.25,
                               act=act)
    zr = z.clone().requires_grad_()
    yr = act(zr)
    grad = torch.rand_like(z) + 0.5
    (gx,), (gr,) = torch.autograd.grad(y, [x], grad), torch.autograd.grad(yr, [zr], grad)
    if act.kind in ("identity", "relu", "hardtanh", "leaky_relu", "hardswish"):
        torch.testing.assert_close(y, yr, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(gx, gr, equal_nan=True, rtol=0, atol=0)
        number = ~y.isnan()
        assert torch.equal(torch.signbit(y[number]), torch.signbit(yr[number]))  # -0 stays -0 where torch's does
    else:
        finite = z.isfinite()
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(y[finite], yr[finite], **tol)
        torch.testing.assert_close(gx[finite], gr[finite], **tol)
        assert torch.equal(y.isnan(), z.isnan() | (y.isnan() & yr.isnan()))  # NaN only from NaN or where torch's is


# ---- gradcheck ----

@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck(device, act, training, p):
    x = make_input((3, 4, 5), "contiguous", torch.float64, device, scale=2.0).requires_grad_()
    w, b, rm, rv = make_params(4, device, torch.float64)

    def f(x, w, b):
        return bnfused.bn_act_dropout(x, rm.clone(), rv.clone(), w, b, training=training, p=p, seed=3, act=act)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("act", GATE_ACTIVATIONS, ids=[str(a) for a in GATE_ACTIVATIONS])
def test_gradcheck_block_tail(device, act):
    x = make_input((3, 4, 5), "contiguous", torch.float64, device, scale=2.0).requires_grad_()
    r = make_input((3, 4, 5), "contiguous", torch.float64, device).requires_grad_()
    w, b, _, _ = make_params(4, device, torch.float64)

    def f(x, r, w, b):
        return bnfused.bn_add_act_dropout(x, r, None, None, w, b, training=True, p=0.3, seed=3, act=act)

    assert torch.autograd.gradcheck(f, (x, r, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


# ---- the C++ eager node, the custom op and the modules ----

@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eager_cpp_path_matches_python_path(monkeypatch, act, training):
    x = make_input((3, C, 4, 4), "channels_last", torch.float32, torch.device("cpu"), scale=2.0)
    w, b, rm, rv = make_params(C, torch.device("cpu"), torch.float32)
    runs = []
    for cpp in (True, False):
        with monkeypatch.context() as mp:
            if not cpp:
                mp.setattr(bnfused.functional, "_eager_cpp_path", lambda input: False)
            xs, ws, bs = leaf(x, requires_grad=True), leaf(w), leaf(b)
            y = bnfused.bn_act_dropout(xs, rm.clone(), rv.clone(), ws, bs, training=training, p=0.3, seed=5, act=act)
            runs.append((y, *torch.autograd.grad(y, (xs, ws, bs), torch.ones_like(y))))
            assert ("CppNode" in y.grad_fn.name()) == cpp
    for cpp_value, python_value in zip(*runs):
        torch.testing.assert_close(cpp_value, python_value, rtol=0, atol=0)


@pytest.mark.parametrize("act", [Activation("silu"), Activation("hardtanh", 0, 6), Activation("elu", 0.7)], ids=str)
def test_custom_op_route_matches_eager(act):
    """The registered op (torch.compile / export route) with an activation: same output and gradients."""
    x = make_input((3, C, 4, 4), "contiguous", torch.float32, torch.device("cpu"), scale=2.0)
    w, b, rm, rv = make_params(C, torch.device("cpu"), torch.float32)
    mean, rstd = ops.batch_stats_update(x, None, None, 0.1, 1e-5)
    key = ops.philox_key(x.device, seed=2)
    xs, ws, bs = leaf(x, requires_grad=True), leaf(w), leaf(b)
    y = ops.forward(xs, mean, rstd, ws, bs, key, 0.3, True, *act.op_args)
    ref = bnfused.BNReLUDropoutFunction.apply(xs, mean, rstd, ws, bs, key, 0.3, True, *act.op_args)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    for got, want in zip(torch.autograd.grad(y, (xs, ws, bs), torch.ones_like(y)),
                         torch.autograd.grad(ref, (xs, ws, bs), torch.ones_like(y))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_op_rejects_bad_activation_codes():
    x = torch.randn(2, 3, 4)
    mean, rstd = torch.zeros(3), torch.ones(3)
    key = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"act must be an activation code in \[0, 10\)"):
        ops.forward(x, mean, rstd, None, None, key, 0.0, False, 10)
    with pytest.raises(RuntimeError, match="pass bits hold the gradient gate of identity, relu and hardtanh only"):
        ops.add_relu_forward(x, x, mean, rstd, None, None, key, 0.0, False, *Activation("silu").op_args)


@pytest.mark.parametrize("act", ["silu", nn.Hardswish, nn.LeakyReLU(0.1), None], ids=str)
def test_module_matches_unfused_layers(act):
    """BatchNormActDropout2d(act=...) against nn.BatchNorm2d -> the activation module, state_dict both ways."""
    block = bnfused.BatchNormActDropout2d(C, p=0.0, act=act)
    bn = nn.BatchNorm2d(C)
    bn.load_state_dict(block.state_dict())
    block.load_state_dict(bn.state_dict())
    x = torch.randn(4, C, 5, 5)
    ref = nn.Sequential(bn, resolve_activation(act).module())
    for train in (True, False):
        block.train(train)
        ref.train(train)
        torch.testing.assert_close(block(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.running_mean, bn.running_mean)
    assert f"act={resolve_activation(act)}" in repr(block)


def test_module_names():
    """The ReLU names are the same classes; from_batchnorm takes act."""
    assert bnfused.BatchNormReLUDropout2d is bnfused.BatchNormActDropout2d
    assert bnfused.BatchNormAddReLU3d is bnfused.BatchNormAddAct3d
    assert bnfused.SyncBatchNormAddReLU is bnfused.SyncBatchNormAddAct
    assert bnfused.BatchNormReLUDropout2d(4).activation == Activation("relu")
    fused = bnfused.BatchNormActDropout2d.from_batchnorm(nn.BatchNorm2d(4), act="hardswish")
    assert fused.activation == Activation("hardswish") and fused.p == 0.0
    with pytest.raises(ValueError, match="synchronised block tail"):
        bnfused.SyncBatchNormAddAct(4, act="silu")
    tail = bnfused.BatchNormAddAct2d(4, act="gelu")  # computed unfused, same results
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    bn = nn.BatchNorm2d(4)
    torch.testing.assert_close(tail(x, r), F.gelu(bn(x) + r), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("act,p", [("silu", 0.1), ("hardswish", 0.0), ("relu6", 0.2), ("gelu_tanh", 0.0)])
def test_torch_compile_matches_eager(act, p):
    """torch.compile(fullgraph=True) of an activation block: the custom op with dropout, the unfused graph that
    inductor fuses without; the same output and input gradient as eager for the same seed."""
    block = bnfused.BatchNormActDropout2d(C, act=act, p=p)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(4, C, 6, 6, requires_grad=True)
    outs = []
    for fn in (block, compiled):
        torch.manual_seed(1)
        y = fn(x)
        outs.append((y, *torch.autograd.grad(y.sum(), x)))
    for eager, comp in zip(*outs):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=2e-6)
