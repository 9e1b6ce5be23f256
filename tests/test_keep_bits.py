"""The CPU keep bits (csrc/cpu/keep_bits.h): ops.forward_keep_bits packs the dropout keep pattern 1 bit per
element in the kernel's memory order, and the backward ops given those bits compute exactly what they compute from
the Philox key."""
import pytest
import torch

import bnfused
from bnfused import ops
from bnfused.testing import reference_bn_relu_dropout

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}

# (shape, channels_last): 2-d rows, 3-d, small planes whose thread ranges end mid-byte (15*100 planes of 49),
# channels_last with H*W % 8 == 0 (block rows) and without, each with C a multiple of 8 (whole bytes per row) and
# not (bytes span rows), 5-d. Without block rows, images of up to 64K elements are one tile ((2, 129, 15, 17):
# the second starts mid-byte); (2, 301, 15, 17) has tiles of 56 rows, one Philox run per channel. With C % 8 == 0
# those tiles expand their keep flags 8 rows at a time: whole 7x7 images, tiles of 64 rows and a last one of 63
# ((2, 256, 15, 17): the last 8-row block overlaps), and images of fewer than 8 rows (S = 5), which do not.
CASES = [((37, 13), False), ((4, 3, 9), False), ((15, 100, 7, 7), False), ((2, 19, 10, 16), True),
         ((3, 16, 8, 8), True), ((2, 5, 5, 7), True), ((2, 8, 5, 7), True), ((2, 129, 15, 17), True),
         ((2, 301, 15, 17), True), ((2, 5, 2, 4, 4), True), ((2, 24, 3, 2, 4), True), ((2, 3, 3, 5, 3), False),
         ((3, 32, 7, 7), True), ((2, 256, 15, 17), True), ((3, 16, 1, 5), True)]


def make_x(shape, channels_last, dtype=torch.float32):
    x = torch.randn(shape, dtype=dtype)
    return x.contiguous(memory_format=CHANNELS_LAST[len(shape)]) if channels_last else x


def stats_args(x):
    c = x.shape[1]
    mean, var = ops.batch_stats(x)
    return mean, (var + 1e-5).rsqrt(), torch.rand(c, dtype=mean.dtype) + 0.5, torch.randn(c, dtype=mean.dtype)


def unpacked(bits, numel):
    """The first numel bits of uint8 bits as bools: bit k of byte b = element 8b + k."""
    return ((bits.long()[:, None] >> torch.arange(8)) & 1).bool().reshape(-1)[:numel]


def in_memory_order(t, like):
    """t (shaped like `like`) flattened in like's memory order: dims by decreasing stride."""
    dims = sorted(range(like.dim()), key=lambda d: -like.stride(d))
    return t.permute(dims).reshape(-1)


def case_id(case):
    shape, cl = case
    return f"{shape}{'_cl' if cl else ''}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("p", [0.3, 1.0])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)  # SIMD and scalar packing
def test_forward_keep_bits_are_the_mask(case, p, threads, dtype):
    x = make_x(*case, dtype=dtype)
    mean, rstd, w, b = stats_args(x)
    key = torch.tensor([2**40 + 9, 77])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, bits = ops.forward_keep_bits(x, mean, rstd, w, b, key, p, True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out, ops.forward(x, mean, rstd, w, b, key, p, True))
    assert bits.dtype == torch.uint8 and bits.shape == ((x.numel() + 7) // 8,)
    assert torch.equal(unpacked(bits, x.numel()), in_memory_order(ops.dropout_mask(key, x.shape, p), x))


def test_forward_keep_bits_without_dropout_keeps_everything():
    x = make_x((3, 4, 5), False)
    mean, rstd, w, b = stats_args(x)
    out, bits = ops.forward_keep_bits(x, mean, rstd, w, b, torch.tensor([1, 2]), 0.0, True)
    assert torch.equal(bits, torch.full((8,), 255, dtype=torch.uint8))
    assert torch.equal(out, ops.forward(x, mean, rstd, w, b, torch.tensor([1, 2]), 0.0, True))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch_stats", [True, False])
def test_backward_from_bits_equals_backward_from_key(case, dtype, batch_stats):
    x = make_x(*case, dtype=dtype)
    mean, rstd, w, b = stats_args(x)
    key = torch.tensor([5, 2**35])
    dy = make_x(*case, dtype=dtype)
    _, bits = ops.forward_keep_bits(x, mean, rstd, w, b, key, 0.5, batch_stats)
    sums = ops.backward_reduce(dy, x, mean, rstd, w, b, key, 0.5)
    sums_bits = ops.backward_reduce(dy, x, mean, rstd, w, b, key, 0.5, bits)
    for s, s_bits in zip(sums, sums_bits):
        assert torch.equal(s, s_bits)
    count = x.numel() // x.shape[1]
    sg, sgx = sums if batch_stats else (None, None)
    dx = ops.backward_input(dy, x, mean, rstd, w, b, key, 0.5, sg, sgx, count)
    dx_bits = ops.backward_input(dy, x, mean, rstd, w, b, key, 0.5, sg, sgx, count, bits)
    assert torch.equal(dx, dx_bits)
    # the bits, not the key, decide: a different key with the same bits gives the same gradient
    other = ops.backward_input(dy, x, mean, rstd, w, b, torch.tensor([6, 1]), 0.5, sg, sgx, count, bits)
    assert torch.equal(other, dx)


@pytest.mark.parametrize("channels_last", [False, True])
def test_autograd_function_saves_bits(channels_last):
    x = make_x((4, 6, 8, 8), channels_last).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bnfused.bn_relu_dropout(x, None, None, None, None, True, 0.1, 1e-5, 0.5, seed=4)
    assert torch.uint8 in saved
    y.backward(torch.ones_like(y))
    x2 = x.detach().clone().requires_grad_()
    ref = reference_bn_relu_dropout(x2, None, None, None, None, True, 0.1, 1e-5, 0.5, key=torch.tensor([4, 0]))
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_bad_keep_bits_are_rejected():
    x = make_x((2, 3, 5), False)
    mean, rstd, w, b = stats_args(x)
    key = torch.tensor([1, 2])
    for bad in (torch.zeros(3, dtype=torch.uint8), torch.zeros(4, dtype=torch.int32),
                torch.zeros(8, dtype=torch.uint8)[::2]):
        with pytest.raises(RuntimeError, match="keep_bits must be a contiguous uint8 tensor of ceil"):
            ops.backward_reduce(x, x, mean, rstd, w, b, key, 0.5, bad)
        with pytest.raises(RuntimeError, match="keep_bits must be a contiguous uint8 tensor of ceil"):
            ops.backward_input(x, x, mean, rstd, w, b, key, 0.5, None, None, 1, bad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    x = make_x((2, 5, 4, 6), channels_last)
    mean, rstd, w, b = stats_args(x)
    key = torch.tensor([3, 4])
    _, bits = ops.forward_keep_bits(x, mean, rstd, w, b, key, 0.3, True)
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.bnfused.forward_keep_bits.default, (x, mean, rstd, w, b, key, 0.3, True))
    torch.library.opcheck(torch.ops.bnfused.backward_reduce.default, (dy, x, mean, rstd, w, b, key, 0.3, bits))
    torch.library.opcheck(torch.ops.bnfused.backward_input.default,
                          (dy, x, mean, rstd, w, b, key, 0.3, None, None, 1, bits))


def test_compiled_training_step_uses_bits_and_matches_eager():
    block = bnfused.BatchNormReLUDropout2d(8, p=0.3)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    grads = []
    for fn in (block, compiled):
        x.grad = None
        torch.manual_seed(0)
        with torch.profiler.profile() as prof:
            y = fn(x)
            y.sum().backward()
        grads.append((y.detach(), x.grad.clone()))
        if fn is compiled:
            assert "bnfused::forward_keep_bits" in {e.name for e in prof.events()}
    torch.testing.assert_close(grads[1], grads[0])
