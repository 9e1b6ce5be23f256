"""BN + residual add + ReLU (+ dropout): bnfused.bn_add_relu_dropout, BatchNormAddReLU1d/2d/3d and the add_relu_*
ops against the unfused reference (F.batch_norm -> + residual -> relu -> the same Philox mask) and against
formulas: every dtype, layout and residual layout, train/eval, affine or not, p in {0, 0.1, 0.5, 1}; the pass bits,
thread independence, reduced precision as float32 rounded once, gradcheck, opcheck, compile, export, bad inputs and
what autograd saves."""
import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfused
from bnfused import ops
from bnfused.testing import KeyedDropout, reference_bn_add_relu_dropout

import helpers
from helpers import GRAD_TOL, TOL, kernel_format, make_input

C = 3
FUSED = {1: bnfused.BatchNormAddReLU1d, 2: bnfused.BatchNormAddReLU2d, 3: bnfused.BatchNormAddReLU3d}
NN_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def make_tensor(shape, layout, dtype, device, offset=0.0):
    return make_input(shape, layout, dtype, device, offset)


def leaf(t, dtype=None):
    return helpers.leaf(t, dtype, requires_grad=True)


def key_of(seed, device):
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


# (shape, input layout, residual layout): the residual may be in another memory format than the input.
CASES = [((6, C), "contiguous", "contiguous"), ((3, C, 5), "noncontig", "contiguous"),
         ((2, C, 3, 5), "contiguous", "channels_last"), ((2, C, 3, 5), "channels_last", "channels_last"),
         ((2, C, 3, 5), "channels_last", "contiguous"), ((2, C, 2, 3, 3), "channels_last", "noncontig"),
         ((2, C, 2, 3, 3), "contiguous", "contiguous")]
DTYPE_P = [(dt, p) for dt in (torch.float32, torch.float64) for p in (0.0, 0.1, 0.5, 1.0)] + [
    (dt, p) for dt in (torch.float16, torch.bfloat16) for p in (0.0, 0.5)]


@pytest.mark.parametrize("shape,layout,res_layout", CASES)
@pytest.mark.parametrize("dtype,p", DTYPE_P, ids=[f"{str(dt)[6:]}-p{p}" for dt, p in DTYPE_P])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_matches_reference(device, shape, layout, res_layout, dtype, p, training):
    # affine or not alternates over the cases, so every dtype, p and layout meets both
    affine = (CASES.index((shape, layout, res_layout)) + DTYPE_P.index((dtype, p)) + training) % 2 == 0
    acc = ops.acc_dtype(dtype)
    w = (torch.rand(C, device=device, dtype=acc) + 0.5).requires_grad_() if affine else None
    b = (torch.randn(C, device=device, dtype=acc) * 0.3).requires_grad_() if affine else None
    rm, rv = torch.randn(C, device=device, dtype=acc) * 0.2, torch.rand(C, device=device, dtype=acc) + 0.5
    x = make_tensor(shape, layout, dtype, device, 0.2).requires_grad_()
    r = make_tensor(shape, res_layout, dtype, device).requires_grad_()
    rm_f, rv_f = rm.clone(), rv.clone()
    y = bnfused.bn_add_relu_dropout(x, r, rm_f, rv_f, w, b, training, 0.2, 1e-4, p, seed=1234)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=kernel_format(x))
    xr, rr, wr, br = leaf(x, torch.float64), leaf(r, torch.float64), leaf(w, torch.float64), leaf(b, torch.float64)
    rm_r, rv_r = rm.double(), rv.double()
    yr = reference_bn_add_relu_dropout(xr, rr, rm_r, rv_r, wr, br, training, 0.2, 1e-4, p, key=key_of(1234, device))
    torch.testing.assert_close(y.double(), yr, **TOL[dtype])
    stat_tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    torch.testing.assert_close(rm_f.double(), rm_r, **stat_tol)
    torch.testing.assert_close(rv_f.double(), rv_r, **stat_tol)
    dy = torch.randn(shape, device=device).to(dtype)
    y.backward(dy)
    yr.backward(dy.double())
    for fused, ref in ((x, xr), (r, rr), (w, wr), (b, br)):
        if fused is not None:
            assert fused.grad.dtype == fused.dtype
            torch.testing.assert_close(fused.grad.double(), ref.grad, **GRAD_TOL[dtype])
    if p == 1.0 and training:
        assert not y.any() and not x.grad.any() and not r.grad.any()


@pytest.mark.parametrize("shape,layout", [((2, C, 9, 7), "contiguous"), ((2, C, 9, 7), "channels_last"),
                                          ((40, 5), "contiguous"), ((2, 4, 2, 3, 5), "channels_last")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_zero_residual_equals_bn_relu_dropout(device, shape, layout, dtype, p):
    """Same seed, same keep mask: with a zero residual the output is bn_relu_dropout's, bit for bit."""
    x = make_tensor(shape, layout, dtype, device)
    c = shape[1]
    acc = ops.acc_dtype(dtype)
    w, b = torch.rand(c, device=device, dtype=acc) + 0.5, torch.randn(c, device=device, dtype=acc)
    zero = torch.zeros_like(x)
    for training in (True, False):
        rm, rv = torch.zeros(c, device=device, dtype=acc), torch.ones(c, device=device, dtype=acc)
        y_add = bnfused.bn_add_relu_dropout(x, zero, rm.clone(), rv.clone(), w, b, training, p=p, seed=77,
                                            dropout_training=True)
        y_brd = bnfused.bn_relu_dropout(x, rm.clone(), rv.clone(), w, b, training, p=p, seed=77,
                                        dropout_training=True)
        assert torch.equal(y_add, y_brd)


def _bcast(t, x):
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def _unpack_bits(bits, x):
    """Bool tensor of x's shape from pass bits in the memory order of x's kernel layout."""
    flat = ((bits.cpu().view(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten().bool()[: x.numel()]
    if kernel_format(x) == torch.contiguous_format:
        return flat.view(x.shape)
    perm = (0, *range(2, x.dim()), 1)  # memory order (N, spatial..., C)
    return flat.view([x.shape[i] for i in perm]).permute(0, x.dim() - 1, *range(1, x.dim() - 1))


# Ragged planes and rows (the elementwise loops' overlapping last vector), planes across the 2048-element chunks,
# channels_last tiles whose edges fall inside a byte of the pass bits (C % 8 != 0), block rows (S % 8 == 0).
_OP_CASES = [((2, 3, 4, 5), torch.contiguous_format), ((2, 3, 4, 5), torch.channels_last),
             ((5, 3), torch.contiguous_format), ((2, 3, 2, 3, 2), torch.channels_last_3d),
             ((3, 2, 7), torch.contiguous_format), ((3, 2, 7, 7), torch.contiguous_format),
             ((2, 9, 2, 2), torch.channels_last), ((4, 17), torch.contiguous_format),
             ((3, 2, 2100), torch.contiguous_format), ((3, 5, 7, 11), torch.channels_last),
             ((2, 3, 8, 8), torch.channels_last), ((300, 7), torch.contiguous_format)]


@pytest.mark.parametrize("shape,memory_format", _OP_CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_ops_match_formulas(device, shape, memory_format, affine, p):
    x = torch.randn(shape, dtype=torch.float64, device=device).contiguous(memory_format=memory_format)
    r = torch.randn(shape, dtype=torch.float64, device=device)
    c = shape[1]
    mean, rstd = torch.randn(c, dtype=torch.float64, device=device) * 0.1, torch.rand(c, dtype=torch.float64,
                                                                                      device=device) + 0.5
    w = torch.rand(c, dtype=torch.float64, device=device) + 0.5 if affine else None
    b = torch.randn(c, dtype=torch.float64, device=device) * 0.3 if affine else None
    key = key_of(99, device)
    keep = ops.dropout_mask(key, x.shape, p).double()
    z = (x - _bcast(mean, x)) * _bcast(rstd, x) * (_bcast(w, x) if affine else 1) + (_bcast(b, x) if affine else 0)
    s = z + r
    scale = 1 / (1 - p) if p < 1 else 0.0
    expected = torch.relu(s) * keep * scale
    y = ops.add_relu_forward(x, r, mean, rstd, w, b, key, p, True)
    y_bits, bits = ops.add_relu_forward_bits(x, r, mean, rstd, w, b, key, p, True)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, y_bits) and y.is_contiguous(memory_format=memory_format)
    assert bits.dtype == torch.uint8 and bits.numel() == (x.numel() + 7) // 8
    passed = _unpack_bits(bits, x)
    assert torch.equal(passed.to(device), y > 0)
    assert torch.equal(passed.to(device), (keep > 0) & (s > 0))

    dy = torch.randn_like(x)
    g = dy * passed.to(device) * scale
    xhat = (x - _bcast(mean, x)) * _bcast(rstd, x)
    dims = [0, *range(2, x.dim())]
    sum_g, sum_g_xhat = ops.add_relu_backward_reduce(dy, x, mean, rstd, bits, p)
    torch.testing.assert_close(sum_g, g.sum(dims), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum_g_xhat, (g * xhat).sum(dims), rtol=1e-10, atol=1e-10)
    a = _bcast(rstd * (w if affine else 1.0), x)
    dx_eval, gr = ops.add_relu_backward_input(dy, x, mean, rstd, w, bits, p, None, None)
    torch.testing.assert_close(dx_eval, a * g, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gr, g, rtol=0, atol=0)
    count = x.numel() // c
    dx, gr = ops.add_relu_backward_input(dy, x, mean, rstd, w, bits, p, sum_g, sum_g_xhat, count)
    mg, mgx = _bcast(sum_g / count, x), _bcast(sum_g_xhat / count, x)
    torch.testing.assert_close(dx, a * (g - mg - xhat * mgx), rtol=1e-10, atol=1e-10)
    assert dx.is_contiguous(memory_format=memory_format) and gr.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("shape,memory_format", [((7, 3, 13, 11), torch.channels_last), ((2, 5, 40, 41),
                                                 torch.contiguous_format), ((999, 5), torch.contiguous_format),
                                                 ((3, 9, 5, 70), torch.channels_last)])
def test_pass_bits_and_sums_do_not_depend_on_threads(shape, memory_format):
    """The bytes tiles and chunks share are OR-ed atomically: the same bits, outputs and float32 sums bit for bit
    with 1 and 2 threads."""
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    r = torch.randn(shape)
    c = shape[1]
    mean, rstd, w, b = torch.randn(c) * 0.1, torch.rand(c) + 0.5, torch.rand(c) + 0.5, torch.randn(c)
    dy = torch.randn(shape).contiguous(memory_format=memory_format)
    key = key_of(5, "cpu")
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            y, bits = ops.add_relu_forward_bits(x, r, mean, rstd, w, b, key, 0.3, True)
            sums = ops.add_relu_backward_reduce(dy, x, mean, rstd, bits, 0.3)
            results.append((y, bits, *sums))
    finally:
        torch.set_num_threads(old)
    nbits = x.numel()
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0])
        assert torch.equal(_unpack_bits(other[1], x), _unpack_bits(results[0][1], x)), nbits
        assert torch.equal(other[2], results[0][2]) and torch.equal(other[3], results[0][3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("plane,channels,channels_last", [(1, 5, False), (7, 5, False), (17, 5, False),
                                                          (49, 5, False), (2053, 5, False), (16, 32, True),
                                                          (49, 16, True), (12, 24, True), (5, 3, True)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reduced_precision_is_float32_rounded_once(dtype, plane, channels, channels_last, p):
    """bfloat16 / float16: the output and both gradients are the float32 op's on the widened inputs, rounded once,
    bit for bit (NaN to NaN), and the pass bits are the float32 op's."""
    c = channels
    x = (torch.randn(3, c, plane, 1, dtype=torch.float64) * 2 + 0.5).to(dtype)
    x.view(-1)[::97] = float("nan")
    r = torch.randn(3, c, plane, 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, rstd, w, b = torch.randn(c), torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)
    key = key_of(7, "cpu")
    y, bits = ops.add_relu_forward_bits(x, r, mean, rstd, w, b, key, p, True)
    y32, bits32 = ops.add_relu_forward_bits(x.float(), r.float(), mean, rstd, w, b, key, p, True)
    torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(_unpack_bits(bits, x), _unpack_bits(bits32, x))
    torch.testing.assert_close(ops.add_relu_forward(x, r, mean, rstd, w, b, key, p, True), y, rtol=0, atol=0,
                               equal_nan=True)
    dy = torch.randn_like(x, dtype=torch.float64).to(dtype)
    for sums in ((torch.randn(c), torch.randn(c)), (None, None)):
        dx, gr = ops.add_relu_backward_input(dy, x, mean, rstd, w, bits, p, *sums, x.numel() // c)
        dx32, gr32 = ops.add_relu_backward_input(dy.float(), x.float(), mean, rstd, w, bits, p, *sums,
                                                 x.numel() // c)
        torch.testing.assert_close(dx, dx32.to(dtype), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(gr, gr32.to(dtype), rtol=0, atol=0, equal_nan=True)


def test_relu_keeps_negative_zero_and_nan_like_torch_relu(device):
    values = torch.tensor([-0.0, float("nan"), -1.5, 0.0, 2.0, float("-inf"), float("inf"), -3.0, 0.25])
    x = values.repeat(12)[:2 * 4 * 13].reshape(2, 4, 13).to(device)
    r = torch.full_like(x, -0.0)  # -0 + -0 = -0: s = x exactly
    mean, rstd = torch.zeros(4, device=device), torch.ones(4, device=device)
    bias = torch.full((4,), -0.0, device=device)
    y, bits = ops.add_relu_forward_bits(x, r, mean, rstd, None, bias, key_of(1, device), 0.0, False)
    torch.testing.assert_close(y, torch.relu(x), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(y)[x == 0], torch.signbit(torch.relu(x))[x == 0])
    # -0 passes no gradient, NaN does (torch.relu's threshold_backward: grad where not z <= 0)
    assert torch.equal(_unpack_bits(bits, x).to(device), ~(x <= 0))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(device, training, p, layout):
    x = make_tensor((3, C, 2, 3), layout, torch.float64, device).requires_grad_()
    r = make_tensor((3, C, 2, 3), "contiguous", torch.float64, device).requires_grad_()
    w = (torch.rand(C, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = torch.randn(C, dtype=torch.float64, device=device).requires_grad_()
    rm, rv = torch.zeros(C, dtype=torch.float64, device=device), torch.ones(C, dtype=torch.float64, device=device)

    def fn(x, r, w, b):
        return bnfused.bn_add_relu_dropout(x, r, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, p, seed=3,
                                           dropout_training=True)

    assert torch.autograd.gradcheck(fn, (x, r, w, b), eps=1e-6, atol=1e-5)


# Every layout and dtype once, p cycling; opcheck's AOT-dispatch check (~10 s a case on 2 cores) on the first four.
OPCHECK_CASES = [("nchw", torch.float32, 0.3), ("channels_last", torch.bfloat16, 0.0), ("nc", torch.float64, 1.0),
                 ("strided", torch.float16, 0.3), ("channels_last", torch.float32, 1.0), ("nchw", torch.float64, 0.0),
                 ("nc", torch.bfloat16, 0.3), ("channels_last", torch.float16, 0.3)]
FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("case", range(len(OPCHECK_CASES)))
def test_opcheck(device, case):
    layout, dtype, p = OPCHECK_CASES[case]
    utils = None if case < 4 else FAST_UTILS
    shape = {"nchw": (2, 3, 4, 5), "channels_last": (2, 3, 4, 5), "nc": (6, 3), "strided": (2, 3, 4, 10)}[layout]
    x = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        x = x[..., ::2]
    r = torch.randn(x.shape, device=device).to(dtype)
    c = x.shape[1]
    acc = ops.acc_dtype(dtype)
    w = (torch.rand(c, device=device) + 0.5).to(acc)
    b = (torch.randn(c, device=device) * 0.5).to(dtype if layout == "nc" else acc)
    mean, var = ops.batch_stats(x)
    rstd = torch.rsqrt(var + 1e-5)
    key = ops.philox_key(x.device, seed=1234)
    grad = [t.detach().requires_grad_() for t in (x, r, w, b)]
    batch_stats = case % 2 == 0
    args = (grad[0], grad[1], mean, rstd, grad[2], grad[3], key, p, batch_stats)
    check = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(torch.ops.bnfused.add_relu_forward.default, args, **check)
    torch.library.opcheck(torch.ops.bnfused.add_relu_forward_bits.default, args, **check)
    _, bits = ops.add_relu_forward_bits(x, r, mean, rstd, w, b, key, p, True)
    dy = torch.randn(x.shape, device=device).to(dtype)
    torch.library.opcheck(torch.ops.bnfused.add_relu_backward_reduce.default, (dy, x, mean, rstd, bits, p), **check)
    sums = ops.add_relu_backward_reduce(dy, x, mean, rstd, bits, p) if batch_stats else (None, None)
    torch.library.opcheck(torch.ops.bnfused.add_relu_backward_input.default,
                          (dy, x, mean, rstd, w, bits, p, *sums, x.numel() // c), **check)


def test_raw_forward_op_differentiates_by_recomputing_the_bits(device):
    x = torch.randn(4, C, 5, dtype=torch.float64, device=device, requires_grad=True)
    r = torch.randn(4, C, 5, dtype=torch.float64, device=device, requires_grad=True)
    mean, var = ops.batch_stats(x.detach())
    rstd = torch.rsqrt(var + 1e-5)
    key = key_of(4, device)
    grads = []
    for op in (ops.add_relu_forward, lambda *a: ops.add_relu_forward_bits(*a)[0]):
        y = op(x, r, mean, rstd, None, None, key, 0.4, True)
        grads.append(torch.autograd.grad(y.square().sum(), (x, r)))
    for g_plain, g_bits in zip(*grads):
        torch.testing.assert_close(g_plain, g_bits, rtol=0, atol=0)


# ---- modules ----

class ReferenceBlock(nn.Module):
    """nn.BatchNormXd -> + residual -> relu -> KeyedDropout: what a fused module must match."""

    def __init__(self, fused, dim, device):
        super().__init__()
        self.bn = NN_BN[dim](fused.num_features, fused.eps, fused.momentum, fused.affine, fused.track_running_stats,
                             device=device, dtype=torch.float64)
        self.bn.load_state_dict(fused.state_dict())
        self.drop = KeyedDropout(fused.p)

    def forward(self, x, r):
        return self.drop(F.relu(self.bn(x) + r))


SHAPES = {"1d_2": (1, (8, C)), "1d_3": (1, (4, C, 5)), "2d": (2, (2, C, 4, 5)), "3d": (3, (2, C, 3, 2, 4))}


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("p,momentum", [(0.0, 0.1), (0.5, None), (1.0, 0.3)])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_module_matches_unfused(device, shape_name, layout, p, momentum, affine, track):
    dim, shape = SHAPES[shape_name]
    if layout == "channels_last" and dim == 1:
        pytest.skip("no channels_last for 1d")
    fused = FUSED[dim](C, momentum=momentum, affine=affine, track_running_stats=track, p=p, device=device,
                       dtype=torch.float64)
    with torch.no_grad():
        if affine:
            fused.weight.uniform_(0.5, 1.5)
            fused.bias.normal_(0, 0.3)
        if track:
            fused.running_mean.normal_(0, 0.2)
            fused.running_var.uniform_(0.5, 1.5)
    ref = ReferenceBlock(fused, dim, device)
    for step, training in enumerate((True, True, False)):
        fused.train(training)
        ref.train(training)
        x = make_tensor(shape, layout, torch.float64, device, 0.2)
        r = make_tensor(shape, "contiguous", torch.float64, device)
        xf, rf, xr, rr = leaf(x), leaf(r), leaf(x), leaf(r)
        torch.manual_seed(step)
        yf = fused(xf, rf)
        torch.manual_seed(step)
        ref.drop.key = ops.philox_key(x.device)
        yr = ref(xr, rr)
        torch.testing.assert_close(yf, yr, **TOL[torch.float64])
        dy = torch.randn_like(yr)
        yf.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(xf.grad, xr.grad, **GRAD_TOL[torch.float64])
        torch.testing.assert_close(rf.grad, rr.grad, **GRAD_TOL[torch.float64])
        if affine:
            torch.testing.assert_close(fused.weight.grad, ref.bn.weight.grad, **GRAD_TOL[torch.float64])
            torch.testing.assert_close(fused.bias.grad, ref.bn.bias.grad, **GRAD_TOL[torch.float64])
        for k, v in ref.bn.state_dict().items():
            torch.testing.assert_close(fused.state_dict()[k], v, **TOL[torch.float64], msg=k)


def test_module_api_like_batchnorm():
    fused = bnfused.BatchNormAddReLU2d(5, p=0.2)
    assert isinstance(fused, torch.nn.modules.batchnorm._BatchNorm)
    assert list(fused.state_dict()) == list(nn.BatchNorm2d(5).state_dict())
    assert fused.p == 0.2 and bnfused.BatchNormAddReLU2d(5).p == 0.0
    assert "p=0.2" in repr(fused)
    with pytest.raises(ValueError, match="dropout probability"):
        bnfused.BatchNormAddReLU3d(4, p=1.5)


@pytest.mark.skipif("bias" not in inspect.signature(nn.BatchNorm1d.__init__).parameters,
                    reason="this torch's nn.BatchNormXd has no bias= argument")
def test_module_affine_without_bias():
    no_bias = bnfused.BatchNormAddReLU1d(4, bias=False)
    assert no_bias.bias is None and no_bias.weight is not None


def test_eval_is_deterministic_and_leaves_state_alone(device):
    block = bnfused.BatchNormAddReLU2d(C, p=0.5, device=device).eval()
    x, r = torch.randn(2, C, 4, 4, device=device), torch.randn(2, C, 4, 4, device=device)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    y1, y2 = block(x, r), block(x, r)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, F.relu(F.batch_norm(x, block.running_mean, block.running_var, block.weight,
                                                         block.bias) + r))
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_zero_size_batch(device):
    block = bnfused.BatchNormAddReLU2d(C, device=device)
    x = torch.randn(0, C, 3, 3, device=device, requires_grad=True)
    r = torch.randn(0, C, 3, 3, device=device, requires_grad=True)
    y = block(x, r)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and r.grad.shape == r.shape


def other_device(device):
    return "cpu" if device.type == "cuda" else ("cuda" if torch.cuda.is_available() else "meta")


@pytest.mark.parametrize("make_residual,match", [
    (lambda x, d: torch.randn(2, C, 4, 5, device=d), "shape"),
    (lambda x, d: torch.randn(2, C, 1, 1, device=d), "shape"),  # no broadcasting
    (lambda x, d: torch.randn(x.shape, device=other_device(d)), "same device"),
])
def test_bad_residual_raises_before_state_changes(device, make_residual, match):
    block = bnfused.BatchNormAddReLU2d(C, device=device)
    x = torch.randn(2, C, 4, 4, device=device)
    residual = make_residual(x, device)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    with pytest.raises(RuntimeError, match=match):
        block(x, residual)
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]), k
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    with pytest.raises(RuntimeError, match=match):
        bnfused.bn_add_relu_dropout(x, residual, rm, rv, training=True)
    assert not rm.any() and torch.equal(rv, torch.ones_like(rv))
    with pytest.raises(TypeError, match="residual must be a Tensor"):
        bnfused.bn_add_relu_dropout(x, 1.0, rm, rv, training=True)


@pytest.mark.parametrize("dtype,res_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64),
                                               (torch.float64, torch.float16), (torch.float32, torch.int64)],
                         ids=["bf16+f32", "f32+f64", "f64+f16", "f32+i64"])
@pytest.mark.parametrize("training,p", [(True, 0.0), (True, 0.3), (False, 0.0)], ids=["train", "train_p0.3", "eval"])
def test_residual_of_another_dtype_is_the_unfused_promoted_result(device, dtype, res_dtype, training, p):
    """relu(bn(x) + residual) with torch's type promotion, as the unfused layers (autocast's float32 skip connection
    around a bfloat16 branch): bit for bit, outputs, gradients and running statistics; the fused module's mask."""
    torch.manual_seed(0)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    block = bnfused.BatchNormAddReLU2d(C, p=p, device=device, dtype=param_dtype).train(training)
    with torch.no_grad():
        block.weight.uniform_(0.5, 1.5)
        block.bias.uniform_(-0.5, 0.5)
        block.running_mean.normal_()
    bn = nn.BatchNorm2d(C, device=device, dtype=param_dtype).train(training)
    bn.load_state_dict(block.state_dict())
    x = leaf(torch.randn(2, C, 4, 5, device=device).to(dtype))
    residual = torch.randn(2, C, 4, 5, device=device).mul(3).to(res_dtype)
    residual = leaf(residual) if residual.is_floating_point() else residual
    xr, rr = leaf(x), (leaf(residual) if residual.is_floating_point() else residual)
    torch.manual_seed(11)
    y = block(x, residual)
    torch.manual_seed(11)
    y_ref = KeyedDropout(p, ops.philox_key(device)).train(training)(torch.relu(bn(xr) + rr))
    assert y.dtype == torch.promote_types(dtype, res_dtype) == y_ref.dtype
    assert torch.equal(y, y_ref)
    y.backward(torch.ones_like(y))
    y_ref.backward(torch.ones_like(y_ref))
    assert torch.equal(x.grad, xr.grad)
    if residual.is_floating_point():
        assert torch.equal(residual.grad, rr.grad)
    for name in ("weight", "bias"):
        assert torch.equal(getattr(block, name).grad, getattr(bn, name).grad), name
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(block, name), getattr(bn, name)), name


@pytest.mark.parametrize("bad,error,match", [
    (dict(p=-0.1), ValueError, "dropout probability"), (dict(eps=0.0), ValueError, "eps must be positive"),
    (dict(momentum=None), TypeError, "momentum must be a float"),
])
def test_bad_arguments_like_bn_relu_dropout(device, bad, error, match):
    x, r = torch.randn(2, C, 3, device=device), torch.randn(2, C, 3, device=device)
    rm = torch.zeros(C, device=device)
    args = dict(training=True, momentum=0.1, eps=1e-5, p=0.0) | bad
    with pytest.raises(error, match=match):
        bnfused.bn_add_relu_dropout(x, r, rm, torch.ones(C, device=device), **args)
    assert not rm.any()
    with pytest.raises(NotImplementedError, match="\"bn_add_relu_dropout\" not implemented for 'int64'"):
        bnfused.bn_add_relu_dropout(x.long(), r.long(), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bnfused.bn_add_relu_dropout(x[:1, :, :1], r[:1, :, :1], None, None, training=True)
    # the errors name the function (or module) the user called
    with pytest.raises(ValueError, match=r"^bn_add_relu_dropout\(\): expected input with at least 2 dims"):
        bnfused.bn_add_relu_dropout(x[0, 0], r[0, 0], None, None, training=True)
    with pytest.raises(ValueError, match="^bn_add_relu_dropout eps must be positive"):
        bnfused.bn_add_relu_dropout(x, r, None, None, training=True, eps=-1.0)
    with pytest.raises(NotImplementedError, match="^\"bn_add_relu_dropout\" not implemented"):
        bnfused.BatchNormAddReLU1d(C).to(device)(x.long(), r.long())


def test_ops_reject_bad_residual_and_bits():
    x, r = torch.randn(2, C, 4), torch.randn(2, C, 4)
    mean, rstd, key = torch.zeros(C), torch.ones(C), key_of(1, "cpu")
    with pytest.raises(RuntimeError, match="residual shape"):
        ops.add_relu_forward(x, r[:, :, :3], mean, rstd, None, None, key, 0.0, False)
    with pytest.raises(RuntimeError, match="residual dtype"):
        ops.add_relu_forward(x, r.double(), mean, rstd, None, None, key, 0.0, False)
    _, bits = ops.add_relu_forward_bits(x, r, mean, rstd, None, None, key, 0.0, False)
    with pytest.raises(RuntimeError, match="pass_bits must be"):
        ops.add_relu_backward_reduce(r, x, mean, rstd, bits[1:], 0.0)
    with pytest.raises(RuntimeError, match="pass_bits must be"):
        ops.add_relu_backward_input(r, x, mean, rstd, None, bits.int(), 0.0, None, None, 1)


# ---- saved for backward ----

def saved_tensors_of(fn):
    """(distinct saved tensors as (data_ptr, bytes), output) of what autograd saves while running fn()."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.dtype, tuple(t.shape), t.stride())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training,p", [(True, 0.5), (True, 0.0), (False, 0.0)], ids=["train_p0.5", "train_p0",
                                                                                       "eval"])
def test_saves_input_bits_and_per_channel_only(dtype, layout, training, p):
    c = 8
    x = make_tensor((4, c, 16, 16), layout, dtype, "cpu").requires_grad_()
    r = make_tensor((4, c, 16, 16), layout, dtype, "cpu").requires_grad_()
    block = bnfused.BatchNormAddReLU2d(c, p=p, dtype=ops.acc_dtype(dtype)).train(training)
    seen, y = saved_tensors_of(lambda: block(x, r))
    numel = x.numel()
    o_c = 64 * c + 256
    assert sum(seen.values()) <= x.element_size() * numel + numel // 8 + o_c, sum(seen.values()) / numel
    assert r.data_ptr() not in {ptr for ptr, *_ in seen}, "the residual must not be saved"
    y.sum().backward()
    assert x.grad is not None and r.grad is not None


# ---- the eager C++ path (_C.bn_add_relu_dropout_eager) against the Python one (BNAddReLUDropoutFunction) ----

def run_path(cpp, monkeypatch, x, r, rm, rv, w, b, training, p, needs=(True, True, True, True), momentum=0.1):
    """y, gradients (of x, residual, w, b where required), grad_fn name and running stats after one call."""
    with monkeypatch.context() as mp:
        if not cpp:
            mp.setattr(bnfused.functional, "_eager_cpp_path", lambda input: False)
        x, r = x.detach().requires_grad_(needs[0]), r.detach().requires_grad_(needs[1])
        w = None if w is None else w.detach().requires_grad_(needs[2])
        b = None if b is None else b.detach().requires_grad_(needs[3])
        rm, rv = (None, None) if rm is None else (rm.clone(), rv.clone())
        y = bnfused.bn_add_relu_dropout(x, r, rm, rv, w, b, training, momentum, 1e-5, p, seed=7)
        name = y.grad_fn.name() if y.grad_fn is not None else None
        leaves = [t for t in (x, r, w, b) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, leaves, torch.randn_like(y, generator=torch.Generator().manual_seed(1))) \
            if leaves else ()
    return y, grads, name, rm, rv


def _assert_same_runs(runs):
    for cpp_value, python_value in zip(runs[0][:2] + runs[0][3:], runs[1][:2] + runs[1][3:]):
        torch.testing.assert_close(cpp_value, python_value, rtol=0, atol=0)
    assert runs[0][0].stride() == runs[1][0].stride()


@pytest.mark.parametrize("shape,layout,res_layout", CASES[::2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_eager_cpp_path_matches_python_path(monkeypatch, shape, layout, res_layout, dtype, training, p):
    """Plain CPU tensors take the C++ node: the Python Function's output, gradients and running stats bit for bit."""
    acc = ops.acc_dtype(dtype)
    x, r = make_tensor(shape, layout, dtype, "cpu", 0.2), make_tensor(shape, res_layout, dtype, "cpu")
    w, b = torch.rand(C, dtype=acc) + 0.5, torch.randn(C, dtype=acc) * 0.3
    rm, rv = torch.randn(C, dtype=acc) * 0.2, torch.rand(C, dtype=acc) + 0.5
    runs = [run_path(cpp, monkeypatch, x, r, rm, rv, w, b, training, p) for cpp in (True, False)]
    assert runs[0][2] == "torch::autograd::CppNode<bnfused::BNAddReLUDropoutFunction>"
    assert runs[1][2] == "BNAddReLUDropoutFunctionBackward"
    _assert_same_runs(runs)


@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["x+res", "x", "res", "params-only"])
def test_eager_cpp_path_grad_edges(monkeypatch, weight, bias, needs):
    """needs_input_grad counts the defined tensor inputs only: every weight / bias / x / residual combination gets
    the Python path's gradients (and none requiring grad builds no node)."""
    x, r = make_tensor((3, C, 5), "contiguous", torch.float64, "cpu"), make_tensor((3, C, 5), "contiguous",
                                                                                    torch.float64, "cpu")
    w = torch.rand(C, dtype=torch.float64) + 0.5 if weight else None
    b = torch.randn(C, dtype=torch.float64) if bias else None
    runs = [run_path(cpp, monkeypatch, x, r, None, None, w, b, True, 0.5, needs + (True, True)) for cpp in (True, False)]
    assert len(runs[0][1]) == sum(needs) + int(weight) + int(bias)
    assert (runs[0][2] is None) == (runs[1][2] is None) == (len(runs[0][1]) == 0)
    _assert_same_runs(runs)


def test_eager_cpp_path_gate_and_no_grad(monkeypatch):
    """A residual that is a tensor subclass keeps the Python path (its __torch_function__ must run); under no_grad
    the C++ call builds no node and saves nothing, with the same output."""
    class Sub(torch.Tensor):
        pass

    x, r = torch.randn(4, C, 3, requires_grad=True), torch.randn(4, C, 3)
    y = bnfused.bn_add_relu_dropout(x, r.as_subclass(Sub), None, None, training=True, p=0.5, seed=1)
    assert y.grad_fn.name() == "BNAddReLUDropoutFunctionBackward"
    torch.testing.assert_close(y, bnfused.bn_add_relu_dropout(x, r, None, None, training=True, p=0.5, seed=1),
                               rtol=0, atol=0)
    with torch.no_grad():
        seen, y_nograd = saved_tensors_of(lambda: bnfused.bn_add_relu_dropout(x, r, None, None, training=True, p=0.5,
                                                                              seed=1))
    assert y_nograd.grad_fn is None and not seen
    torch.testing.assert_close(y_nograd, y.detach(), rtol=0, atol=0)


# ---- torch.compile and torch.export ----

class Block(nn.Module):
    """conv -> fused BN + add + ReLU with an identity shortcut, then a head: a tiny ResNet body."""

    def __init__(self, p):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = bnfused.BatchNormAddReLU2d(4, p=p)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.bn(self.conv(x), x).mean((2, 3)))


def test_compile_fullgraph_matches_eager(device):
    """Training through the compiled graph (one forward, one backward graph): same gradients, buffers and mask."""
    torch.manual_seed(0)
    eager = Block(p=0.25).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(3, 4, 6, 6, device=device)
    outs = []
    for model in (eager, compiled):
        torch.manual_seed(11)
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for (name, pe), (_, pc) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, be), (_, bc) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(bc, be, msg=name)


def test_export_eval(device):
    torch.manual_seed(0)
    model = Block(p=0.3).to(device).eval()
    x = torch.randn(2, 4, 5, 5, device=device)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    # The parameters require grad, so the traced blocks keep the pass bits for a possible backward.
    fused = (torch.ops.bnfused.add_relu_forward.default, torch.ops.bnfused.add_relu_forward_bits.default)
    assert sum(t in fused for t in targets) == 1
    with torch.no_grad():
        for batch in (2, 5):
            xb = torch.randn(batch, 4, 5, 5, device=device)
            torch.testing.assert_close(exported.module()(xb), model(xb))


def test_pass_bits_bytes_formula():
    assert math.ceil(13 / 8) == ops.add_relu_forward_bits(torch.randn(13, 1), torch.randn(13, 1), torch.zeros(1),
                                                          torch.ones(1), None, None, key_of(0, "cpu"), 0.0,
                                                          False)[1].numel()
