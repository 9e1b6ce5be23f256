"""The raw ops (torch.ops.bnfused.*) and the Philox helpers of the extension.

Philox4x32-10 is checked against Random123's known-answer vectors, and the dropout mask against the scalar
definition of csrc/philox.h re-implemented here in pure Python, so a change of the mask contract is caught.
"""
import math

import pytest
import torch

import bnfused
from bnfused import _C, ops

# ---- pure-Python Philox4x32-10 and mask (the scalar definition of csrc/philox.h) ----

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def py_philox4x32_10(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _U32, p1 & _U32, ((p0 >> 32) ^ c3 ^ k1) & _U32, p0 & _U32
        k0, k1 = (k0 + _W0) & _U32, (k1 + _W1) & _U32
    return [c0, c1, c2, c3]


def py_threshold16(p):
    if not p > 0.0:
        return 0
    if p >= 1.0:
        return 65536
    return int(p * 65536.0 + 0.5)


def py_keep(seed, offset, index, p):
    """Keep decision of logical element `index` for key (seed, offset) (both as unsigned 64-bit)."""
    block = index >> 3
    r = py_philox4x32_10([block & _U32, block >> 32, offset & _U32, offset >> 32], [seed & _U32, seed >> 32])
    lane = index & 7
    u16 = (r[lane >> 1] >> ((lane & 1) * 16)) & 0xFFFF
    return u16 >= py_threshold16(p)


def py_keep_range(seed, offset, start, count, p):
    return torch.tensor([py_keep(seed, offset, i, p) for i in range(start, start + count)])


def key_tensor(seed, offset, device="cpu"):
    """int64[2] key from unsigned 64-bit seed/offset (as the kernels reinterpret them)."""
    signed = [v - 2**64 if v >= 2**63 else v for v in (seed, offset)]
    return torch.tensor(signed, dtype=torch.int64, device=device)


# ---- Philox known answers ----

@pytest.mark.parametrize("ctr,key,expected", [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([_U32] * 4, [_U32] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_philox_known_answers(ctr, key, expected):
    assert list(_C.testing.philox4x32_10(ctr, key)) == expected
    assert py_philox4x32_10(ctr, key) == expected


@pytest.mark.parametrize("seed,offset,block", [(0, 0, 0), (1, 2, 3), (2**64 - 1, 2**40 + 5, 2**33 + 7),
                                               (0x0123456789ABCDEF, 7, 123456)])
def test_philox_block_counter_layout(seed, offset, block):
    # counter = (lo(block), hi(block), lo(offset), hi(offset)), key = (lo(seed), hi(seed))
    expected = py_philox4x32_10([block & _U32, block >> 32, offset & _U32, offset >> 32], [seed & _U32, seed >> 32])
    assert list(_C.testing.philox_block(seed, offset, block)) == expected


@pytest.mark.parametrize("p", [0.0, -0.0, 2**-17, 2**-16, 1e-6, 0.01, 0.1, 1 / 3, 0.5, 0.9, 1 - 2**-16, 1.0])
def test_threshold16(p):
    assert _C.testing.threshold16(p) == py_threshold16(p)


def test_threshold16_rounds_to_nearest():
    assert _C.testing.threshold16(0.5) == 32768
    assert _C.testing.threshold16(0.1) == round(0.1 * 65536)
    assert _C.testing.threshold16(1.0) == 65536
    assert _C.testing.threshold16(0.0) == 0


# ---- dropout_mask op == the scalar definition ----

@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 678), (2**64 - 3, 2**35 + 1)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_matches_scalar_definition(device, seed, offset, p):
    n = 301  # not a multiple of 8: the last Philox block is partial
    keep = ops.dropout_mask(key_tensor(seed, offset, device), [n], p)
    assert keep.dtype == torch.bool and keep.shape == (n,) and keep.device.type == device.type
    assert torch.equal(keep.cpu(), py_keep_range(seed, offset, 0, n, p))


# Blocks around 2^32 (elements around 2^35): the vectorised generators take the low counter word in SIMD lanes and
# the high word as one value per set, so runs and block rows that reach or cross that boundary must keep the exact
# 64-bit counter.
@pytest.mark.parametrize("start", [0, 8 * (2**32 - 20) + 3, 8 * (2**32 - 8), 8 * 2**32 + 5, 8 * (3 * 2**32 - 9) + 1])
@pytest.mark.parametrize("n", [1, 61, 128, 300])
def test_cpu_keep_run_at_high_counters(start, n):
    seed, offset, p = 2**64 - 3, 2**35 + 1, 0.5
    assert _C.testing.keep_run(seed, offset, p, start, n) == [bool(k) for k in py_keep_range(seed, offset, start, n, p)]


@pytest.mark.parametrize("start", [0, 8 * (2**32 - 20) + 3, 8 * (2**32 - 8), 8 * 2**32 + 5, 8 * (3 * 2**32 - 9) + 1])
@pytest.mark.parametrize("n", [1, 61, 128, 300])
def test_cpu_keep_run_bytes_at_high_counters(start, n):
    """The keep bytes a run writes on the way (forward_keep_bits): those of the blocks whose first element lies in
    the run, each with all 8 lanes, also where the block continues past the run's end."""
    seed, offset, p = 2**64 - 3, 2**35 + 1, 0.5
    first, end = (start + 7) // 8, (start + n + 7) // 8
    expected = [sum(int(py_keep(seed, offset, 8 * b + k, p)) << k for k in range(8)) for b in range(first, end)]
    assert _C.testing.keep_run_bytes(seed, offset, p, start, n) == expected


@pytest.mark.parametrize("first", [0, 2**32 - 5, 2**32 - 100, 2**32 + 7, 2**34 - 1])
@pytest.mark.parametrize("stride", [1, 7, 2**20])
@pytest.mark.parametrize("count", [1, 8, 13, 16])
def test_cpu_keep_block_rows_at_high_counters(first, stride, count):
    seed, offset, p = 12345, 678, 0.3
    expected = [py_keep(seed, offset, 8 * (first + j * stride) + r, p) for r in range(8) for j in range(count)]
    assert _C.testing.keep_block_rows(seed, offset, p, first, stride, count) == expected


@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (3, 5, 7), (2, 3, 2, 3, 3)])
def test_dropout_mask_shape_is_logical_flat_index(device, shape):
    seed, offset, p = 99, 5, 0.5
    keep = ops.dropout_mask(key_tensor(seed, offset, device), list(shape), p)
    assert keep.shape == shape
    assert torch.equal(keep.cpu().flatten(), py_keep_range(seed, offset, 0, math.prod(shape), p))


@pytest.mark.parametrize("p,expected", [(0.0, True), (1.0, False)])
def test_dropout_mask_extremes(device, p, expected):
    keep = ops.dropout_mask(key_tensor(3, 4, device), [5, 13], p)
    assert bool((keep == expected).all())


# ---- forward kernel uses the same mask at unaligned row starts, in both layouts ----

@pytest.mark.parametrize("shape,memory_format", [
    ((3, 5, 7), torch.contiguous_format),   # rows of 7: every (n, c) row but the first starts unaligned
    ((2, 3, 5, 3), torch.contiguous_format),
    ((2, 3, 5, 3), torch.channels_last),    # memory order (n, h, w, c): logical index jumps by S per step
    ((2, 3, 3, 1, 3), torch.channels_last_3d),
    ((37, 3), torch.contiguous_format),     # 2-d input runs the channels-last kernel
])
def test_forward_keep_pattern_is_scalar_definition(device, shape, memory_format):
    seed, offset, p = 2024, 11, 0.5
    x = torch.rand(shape, device=device).contiguous(memory_format=memory_format) + 1.0
    c = shape[1]
    mean, rstd = torch.zeros(c, device=device), torch.ones(c, device=device)
    y = ops.forward(x, mean, rstd, None, None, key_tensor(seed, offset, device), p, False)  # z = x > 0
    expected_keep = py_keep_range(seed, offset, 0, x.numel(), p).reshape(shape)
    assert torch.equal((y != 0).cpu(), expected_keep)
    torch.testing.assert_close(y.cpu(), (x * expected_keep.to(device) * 2.0).cpu(), rtol=0, atol=0)


# ---- batch_stats ----

def _channel_dims(x):
    return [d for d in range(x.dim()) if d != 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,memory_format", [((6, 4), torch.contiguous_format),
                                                 ((3, 4, 5), torch.contiguous_format),
                                                 ((2, 4, 3, 5), torch.contiguous_format),
                                                 ((2, 4, 3, 5), torch.channels_last),
                                                 ((2, 4, 3, 2, 3), torch.channels_last_3d)])
def test_batch_stats(device, dtype, shape, memory_format):
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype).contiguous(memory_format=memory_format)
    mean, var = ops.batch_stats(x)
    acc = ops.acc_dtype(dtype)
    assert mean.dtype == acc and var.dtype == acc and mean.shape == (shape[1],)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=_channel_dims(x), unbiased=False)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean.double(), ref_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(var.double(), ref_var, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 3, 13, 37, 70, 600])
def test_batch_stats_row_widths(device, dtype, channels):
    """Rows of C (2-d and channels_last): every column-block width of the row kernel, partial vectors, several
    column tiles (C > 512), and a partial last block of rows."""
    x = (torch.randn(203, channels, device=device) * 3 - 1).to(dtype)
    x_cl = (torch.randn(3, channels, 5, 8, device=device) + 2).to(dtype).contiguous(memory_format=torch.channels_last)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for t in (x, x_cl):
        mean, var = ops.batch_stats(t)
        ref_var, ref_mean = torch.var_mean(t.double(), dim=_channel_dims(t), unbiased=False)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(var.double(), ref_var, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("plane", [1, 7, 49, 256, 257, 2048, 4100])
def test_batch_stats_plane_sizes(device, dtype, plane):
    """Channels-first planes around the CPU kernel's paths: groups of small planes (S * 8 <= 2048) with partial
    groups at the end of a thread's range, one plane per L1 chunk, and planes of several chunks. The statistics do
    not depend on the thread count, bit for bit."""
    n, c = (37, 5) if plane <= 256 else (3, 2)
    x = (torch.randn(n, c, plane, device=device, dtype=torch.float64) * 2 + 3).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    ref_var, ref_mean = torch.var_mean(x.double(), dim=[0, 2], unbiased=False)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(ops.batch_stats(x))
    finally:
        torch.set_num_threads(old)
    for mean, var in results:
        torch.testing.assert_close(mean.double(), ref_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(var.double(), ref_var, rtol=tol, atol=tol)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype,running_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                 (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float16)])
@pytest.mark.parametrize("strided", [False, True])
def test_batch_stats_update(device, dtype, running_dtype, strided):
    """(mean, rstd) and the in-place running update: momentum * batch + (1 - momentum) * running, the variance
    unbiased, in the running tensors' own dtype and strides (a strided view is updated through its strides)."""
    c, momentum, eps = 5, 0.3, 1e-3
    x = (torch.randn(6, c, 7, device=device, dtype=torch.float64) * 2 + 1).to(dtype)
    base_m = torch.randn(2 * c, device=device, dtype=torch.float64).to(running_dtype)
    base_v = (torch.rand(2 * c, device=device, dtype=torch.float64) + 0.5).to(running_dtype)
    rm, rv = (base_m[::2], base_v[::2]) if strided else (base_m[:c].clone(), base_v[:c].clone())
    rm0, rv0, others0 = rm.double().clone(), rv.double().clone(), base_m[1::2].clone()
    mean, rstd = ops.batch_stats_update(x, rm, rv, momentum, eps)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=[0, 2], unbiased=False)
    acc = ops.acc_dtype(dtype)
    assert mean.dtype == acc and rstd.dtype == acc and rm.dtype == running_dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean.double(), ref_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(rstd.double(), (ref_var + eps).rsqrt(), rtol=tol, atol=tol)
    n = x.numel() // c
    exp_m = momentum * ref_mean + (1 - momentum) * rm0
    exp_v = momentum * ref_var * n / (n - 1) + (1 - momentum) * rv0
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(running_dtype, 1e-2)
    torch.testing.assert_close(rm.double(), exp_m, rtol=rtol, atol=rtol)
    torch.testing.assert_close(rv.double(), exp_v, rtol=rtol, atol=rtol)
    if strided:  # the other elements of the base are untouched
        assert torch.equal(base_m[1::2], others0)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(8, 3, 16, 16), (64, 3, 7, 7)])
def test_batch_stats_survive_large_offset(device, memory_format, shape):
    # Naive E[x^2] - E[x]^2 in float32 loses every digit of a unit variance at a 1e4 offset.
    x = (torch.randn(shape, device=device, dtype=torch.float64) + 1e4).float()
    x = x.contiguous(memory_format=memory_format)
    mean, var = ops.batch_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=[0, 2, 3], unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)


# ---- forward / backward ops against their formulas (float64) ----

def _op_args(device, shape, memory_format, affine):
    c = shape[1]
    x = torch.randn(shape, device=device, dtype=torch.float64).contiguous(memory_format=memory_format)
    mean = torch.randn(c, device=device, dtype=torch.float64) * 0.1
    rstd = torch.rand(c, device=device, dtype=torch.float64) + 0.5
    w = torch.randn(c, device=device, dtype=torch.float64) if affine else None
    b = torch.randn(c, device=device, dtype=torch.float64) * 0.3 if affine else None
    key = key_tensor(77, 3, device)
    return x, mean, rstd, w, b, key


def _bcast(t, x):
    return t.reshape([1, -1] + [1] * (x.dim() - 2))


def _z(x, mean, rstd, w, b):
    z = (x - _bcast(mean, x)) * _bcast(rstd, x)
    if w is not None:
        z = z * _bcast(w, x) + _bcast(b, x)
    return z


def _g(dy, z, keep, p):
    return dy * (z > 0) * keep / (1 - p) if p < 1 else torch.zeros_like(dy)


# Planes and rows of 7, 9, 17 and 49 elements as well: the elementwise CPU passes finish a ragged plane or row with
# a full vector overlapping the previous one (and a partial one below 8 elements).
_OP_CASES = [((2, 3, 4, 5), torch.contiguous_format), ((2, 3, 4, 5), torch.channels_last),
             ((5, 3), torch.contiguous_format), ((2, 3, 2, 3, 2), torch.channels_last_3d),
             ((3, 2, 7), torch.contiguous_format), ((2, 3, 3, 3), torch.contiguous_format),
             ((3, 2, 7, 7), torch.contiguous_format), ((2, 9, 2, 2), torch.channels_last), ((4, 17), torch.contiguous_format)]


@pytest.mark.parametrize("shape,memory_format", _OP_CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_forward_and_backward_ops_match_formulas(device, shape, memory_format, affine, p):
    x, mean, rstd, w, b, key = _op_args(device, shape, memory_format, affine)
    keep = ops.dropout_mask(key, x.shape, p).double()
    z = _z(x, mean, rstd, w, b)
    y = ops.forward(x, mean, rstd, w, b, key, p, True)
    expected_y = torch.relu(z) * keep / (1 - p) if p < 1 else torch.zeros_like(x)
    torch.testing.assert_close(y, expected_y, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=memory_format)

    dy = torch.randn_like(x)
    g = _g(dy, z, keep, p)
    xhat = (x - _bcast(mean, x)) * _bcast(rstd, x)
    dims = _channel_dims(x)
    sum_g, sum_g_xhat = ops.backward_reduce(dy, x, mean, rstd, w, b, key, p)
    torch.testing.assert_close(sum_g, g.sum(dims), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum_g_xhat, (g * xhat).sum(dims), rtol=1e-10, atol=1e-10)

    scale = _bcast(rstd * (w if w is not None else 1.0), x)
    dx_eval = ops.backward_input(dy, x, mean, rstd, w, b, key, p, None, None)
    torch.testing.assert_close(dx_eval, scale * g, rtol=1e-10, atol=1e-10)
    count = x.numel() // x.shape[1]
    mg, mgx = sum_g / count, sum_g_xhat / count
    dx_train = ops.backward_input(dy, x, mean, rstd, w, b, key, p, sum_g, sum_g_xhat, count)
    torch.testing.assert_close(dx_train, scale * (g - _bcast(mg, x) - xhat * _bcast(mgx, x)), rtol=1e-10, atol=1e-10)
    assert dx_train.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("plane", [1, 7, 49, 2047, 4100])
def test_backward_reduce_plane_sizes(device, plane):
    """Channels-first planes that share a chunk (their partial sums are reduced several planes at a time), planes
    cut at a chunk end, and planes of several chunks: the sums match the formula in float64 and do not depend on
    the thread count in float32, bit for bit."""
    n = 41 if plane < 100 else 3
    x, mean, rstd, w, b, key = _op_args(device, (n, 3, plane), torch.contiguous_format, True)
    dy = torch.randn_like(x)
    p = 0.3
    g = _g(dy, _z(x, mean, rstd, w, b), ops.dropout_mask(key, x.shape, p).double(), p)
    xhat = (x - _bcast(mean, x)) * _bcast(rstd, x)
    sum_g, sum_g_xhat = ops.backward_reduce(dy, x, mean, rstd, w, b, key, p)
    torch.testing.assert_close(sum_g, g.sum([0, 2]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sum_g_xhat, (g * xhat).sum([0, 2]), rtol=1e-10, atol=1e-10)
    args32 = [t.float() if t is not None and t.is_floating_point() else t for t in (dy, x, mean, rstd, w, b, key)]
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(ops.backward_reduce(*args32, p))
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("plane,channels,channels_last", [(1, 5, False), (7, 5, False), (15, 5, False),
                                                          (16, 5, False), (17, 5, False), (49, 5, False),
                                                          (100, 5, False), (3136, 5, False), (2053, 5, False),
                                                          (16, 32, True), (49, 16, True), (12, 24, True),
                                                          (5, 48, True)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reduced_precision_ops_are_float32_ops_rounded(dtype, plane, channels, channels_last, p):
    """CPU: the forward and the input gradient of bfloat16 / float16 input compute in float32, so their output is
    the float32 op's on the widened inputs rounded once, bit for bit (NaN to NaN). Planes below, at and around 16
    elements, odd and several L1 chunks long, cover the 16-at-a-time bfloat16 path, its overlapping last step and
    the 8-wide path; channels_last rows of 16, 32 and 48 channels the 16-at-a-time rows, 24 the 8-wide rows."""
    c = channels
    x = (torch.randn(3, c, plane, 1, dtype=torch.float64) * 2 + 0.5).to(dtype)
    x.view(-1)[::97] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean = torch.randn(c)
    rstd = torch.rand(c) + 0.5
    w, b = torch.randn(c), torch.randn(c)
    # Channel 0 scales by 1 + 2^-8 alone: half its outputs fall exactly halfway between two bfloat16 values, so
    # rounding ties to even (not up, not down) is checked too.
    mean[0], rstd[0], w[0], b[0] = 0.0, 1.0, 1.0 + 2.0 ** -8, 0.0
    key = key_tensor(7, 11, "cpu")
    for batch_stats in (False, True):
        y = ops.forward(x, mean, rstd, w, b, key, p, batch_stats)
        y32 = ops.forward(x.float(), mean, rstd, w, b, key, p, batch_stats)
        assert y.dtype == dtype
        torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0, equal_nan=True)
        if p > 0:
            y_bits, _ = ops.forward_keep_bits(x, mean, rstd, w, b, key, p, batch_stats)
            torch.testing.assert_close(y_bits, y, rtol=0, atol=0, equal_nan=True)
        dy = torch.randn_like(x, dtype=torch.float64).to(dtype)  # x's memory format
        sums = (torch.randn(c), torch.randn(c)) if batch_stats else (None, None)
        dx = ops.backward_input(dy, x, mean, rstd, w, b, key, p, *sums, x.numel() // c)
        dx32 = ops.backward_input(dy.float(), x.float(), mean, rstd, w, b, key, p, *sums, x.numel() // c)
        torch.testing.assert_close(dx, dx32.to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("plane", [3, 40])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_relu_keeps_negative_zero_and_nan_like_torch_relu(device, dtype, plane, channels_last):
    """z = x exactly (a = 1, b = -0: x + -0 = x, -0 + -0 = -0), so y must be torch.relu(x) bit for bit: -0 stays
    -0 (torch.relu(-0.) is -0.), NaN stays NaN, in every vector path and the scalar one."""
    values = torch.tensor([-0.0, float("nan"), -1.5, 0.0, 2.0, float("-inf"), float("inf"), -3.0, 0.25])
    x = values.repeat(2 * 4 * plane // len(values) + 1)[: 2 * 4 * plane].reshape(2, 4, plane, 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(device)
    acc = ops.acc_dtype(dtype)
    mean, rstd = torch.zeros(4, device=device, dtype=acc), torch.ones(4, device=device, dtype=acc)
    bias = torch.full((4,), -0.0, device=device, dtype=acc)
    for p in (0.0, 0.5):
        key = key_tensor(3, 4, device)
        y = ops.forward(x, mean, rstd, None, bias, key, p, False)
        mult = ops.dropout_mask(key, list(x.shape), p).to(dtype) / (1 - p)  # y = relu(z) * mult, also for inf * 0
        expected = torch.relu(x) * mult
        torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(torch.signbit(y)[x == 0], torch.signbit(expected)[x == 0])


def test_forward_op_bfloat16_params_are_accepted_as_float32(device):
    x = torch.randn(2, 3, 4, device=device, dtype=torch.bfloat16)
    mean, rstd = torch.zeros(3, device=device), torch.ones(3, device=device)
    w = torch.ones(3, device=device, dtype=torch.bfloat16)
    y = ops.forward(x, mean, rstd, w, None, torch.zeros(2, dtype=torch.int64, device=device), 0.0, False)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.relu(x), rtol=0, atol=0)


# ---- op-level argument checks ----

def test_ops_reject_bad_key_and_p(device):
    x = torch.randn(2, 3, 4, device=device)
    m, r = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="philox key must be an int64 tensor of 2 elements"):
        ops.forward(x, m, r, None, None, torch.zeros(3, dtype=torch.int64, device=device), 0.5, True)
    with pytest.raises(RuntimeError, match="philox key must be an int64"):
        ops.forward(x, m, r, None, None, torch.zeros(2, dtype=torch.int32, device=device), 0.5, True)
    with pytest.raises(RuntimeError, match="dropout probability has to be between 0 and 1"):
        ops.forward(x, m, r, None, None, torch.zeros(2, dtype=torch.int64, device=device), 1.5, True)
    with pytest.raises(RuntimeError, match="dropout probability has to be between 0 and 1"):
        ops.dropout_mask(torch.zeros(2, dtype=torch.int64, device=device), [4], -0.1)
    with pytest.raises(RuntimeError, match="should contain 3 elements"):
        ops.forward(x, torch.zeros(4, device=device), r, None, None, torch.zeros(2, dtype=torch.int64, device=device),
                    0.5, True)
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        ops.batch_stats(torch.randn(5, device=device))
    with pytest.raises(RuntimeError, match="floating-point input"):
        ops.batch_stats(torch.ones(2, 3, dtype=torch.int64, device=device))
    with pytest.raises(RuntimeError, match="grad_output shape"):
        ops.backward_reduce(torch.randn(2, 3, 5, device=device), x, m, r, None, None,
                            torch.zeros(2, dtype=torch.int64, device=device), 0.5)
    with pytest.raises(RuntimeError, match="sum_g and sum_g_xhat must be given together"):
        ops.backward_input(torch.randn_like(x), x, m, r, None, None, torch.zeros(2, dtype=torch.int64, device=device),
                           0.5, m, None)


# opcheck of every op (schemas, fake impls, autograd registration) lives in tests/test_opcheck.py


def test_kernel_memory_format():
    assert ops.kernel_memory_format(torch.randn(2, 3, 4, 5)) == torch.contiguous_format
    channels_last = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert ops.kernel_memory_format(channels_last) == torch.channels_last
    assert (ops.kernel_memory_format(torch.randn(2, 3, 2, 4, 5).to(memory_format=torch.channels_last_3d))
            == torch.channels_last_3d)
    assert ops.kernel_memory_format(torch.randn(2, 3, 4, 10)[..., ::2]) == torch.contiguous_format
    assert ops.kernel_memory_format(torch.randn(4, 3).t()) == torch.contiguous_format


def test_build_info():
    assert isinstance(bnfused.WITH_CUDA, bool)
    assert bnfused.WITH_CUDA == bool(_C.with_cuda)
    assert _C.torch_version.split("+")[0] == torch.__version__.split("+")[0]
    assert bnfused.CPU_CAPABILITY in ("default", "avx2", "avx512")
