"""Dropout statistics and reproducibility of the fused block's Philox mask: keep rate, fresh masks per call,
seeding (torch.manual_seed, seed=, generator=), independence from memory layout, same mask in backward."""
import math

import pytest
import torch

import bnfused
from bnfused import ops
from helpers import rng_state

C = 4


def all_positive_block(p, device, dim=2):
    """A fused block whose pre-dropout output is exactly 1 everywhere (weight 0, bias 1): y != 0 iff kept."""
    block = {1: bnfused.BatchNormReLUDropout1d, 2: bnfused.BatchNormReLUDropout2d,
             3: bnfused.BatchNormReLUDropout3d}[dim](C, p=p, device=device)
    with torch.no_grad():
        block.weight.zero_()
        block.bias.fill_(1.0)
    return block


def within_4_sigma(observed_rate, expected_rate, n):
    sigma = math.sqrt(expected_rate * (1 - expected_rate) / n)
    return abs(observed_rate - expected_rate) <= 4 * sigma


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(device, p):
    block = all_positive_block(p, device)
    x = torch.randn(8, C, 32, 32, device=device)
    y = block(x)
    kept = y != 0
    n = kept.numel()
    assert within_4_sigma(kept.float().mean().item(), 1 - p, n), kept.float().mean().item()
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))  # scale is exactly 1/(1-p)
    # every 16-bit lane of a Philox block and every channel keeps at the same rate
    lanes = kept.flatten().reshape(-1, 8).float().mean(0)
    for rate in lanes.tolist():
        assert within_4_sigma(rate, 1 - p, n // 8), lanes
    for rate in kept.float().mean(dim=(0, 2, 3)).tolist():
        assert within_4_sigma(rate, 1 - p, n // C)


def test_neighbours_independent(device):
    keep = ops.dropout_mask(torch.tensor([31, 7], device=device), [1 << 16], 0.5).float()
    both = (keep[1:] * keep[:-1]).mean().item()  # P(keep_i and keep_i+1) = 1/4 when independent
    assert within_4_sigma(both, 0.25, keep.numel() - 1), both
    block_next = (keep[8:] * keep[:-8]).mean().item()  # same lane of consecutive Philox blocks
    assert within_4_sigma(block_next, 0.25, keep.numel() - 8), block_next


def test_fresh_mask_per_call(device):
    block = all_positive_block(0.5, device)
    x = torch.randn(4, C, 16, 16, device=device)
    masks = [block(x) != 0 for _ in range(3)]
    n = masks[0].numel()
    for a, b in ((0, 1), (1, 2), (0, 2)):
        differ = (masks[a] != masks[b]).float().mean().item()
        assert within_4_sigma(differ, 0.5, n), differ  # independent masks differ at 2p(1-p) = 1/2


def test_manual_seed_reproduces(device):
    block = all_positive_block(0.3, device)
    x = torch.randn(2, C, 8, 8, device=device)
    torch.manual_seed(1234)
    y1, y2 = block(x), block(x)
    torch.manual_seed(1234)
    y1_again, y2_again = block(x), block(x)
    assert torch.equal(y1, y1_again) and torch.equal(y2, y2_again)
    assert not torch.equal(y1, y2)


def test_explicit_seed_and_generator_reproduce(device):
    x = torch.randn(2, C, 8, 8, device=device)
    w, b = torch.zeros(C, device=device), torch.ones(C, device=device)

    def run(**kw):
        return bnfused.bn_relu_dropout(x, None, None, w, b, True, 0.1, 1e-5, 0.5, **kw)

    assert torch.equal(run(seed=77), run(seed=77))
    assert not torch.equal(run(seed=77), run(seed=78))
    # seed= does not touch the default generator
    rng = rng_state(device)
    run(seed=77)
    assert torch.equal(rng_state(device), rng)
    g1, g2 = torch.Generator(device=device).manual_seed(3), torch.Generator(device=device).manual_seed(3)
    assert torch.equal(run(generator=g1), run(generator=g2))
    assert not torch.equal(run(generator=g1), run(generator=torch.Generator(device=device).manual_seed(4)))


def _layouts(x):
    """The same logical tensor as contiguous, channels_last(_3d) (4-d/5-d) and strided views."""
    out = {"contiguous": x.contiguous()}
    if x.dim() == 4:
        out["channels_last"] = x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        out["channels_last_3d"] = x.contiguous(memory_format=torch.channels_last_3d)
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], device=x.device, dtype=x.dtype)
    wide[..., ::2] = x
    out["strided"] = wide[..., ::2]
    perm = list(range(x.dim()))[::-1]  # storage in reversed dim order, viewed back in logical order
    out["transposed"] = x.permute(perm).contiguous().permute(perm)
    return out


@pytest.mark.parametrize("shape", [(16, C), (4, C, 9), (2, C, 5, 7), (2, C, 3, 5, 3)])
@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
def test_mask_independent_of_memory_layout(device, shape, training):
    x = torch.randn(shape, device=device)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    ys = {}
    for name, xl in _layouts(x).items():
        assert torch.equal(xl, x)
        ys[name] = bnfused.bn_relu_dropout(xl, rm.clone(), rv.clone(), None, None, training, 0.1, 1e-5, 0.5,
                                           seed=99, dropout_training=True)
    for name, y in ys.items():
        torch.testing.assert_close(y, ys["contiguous"], rtol=1e-6, atol=1e-6, msg=name)
        assert torch.equal(y != 0, ys["contiguous"] != 0), name


@pytest.mark.parametrize("dim,shape", [(2, (2, C, 5, 7)), (3, (2, C, 3, 5, 3))])
def test_module_mask_independent_of_memory_layout(device, dim, shape):
    block = all_positive_block(0.5, device, dim)
    x = torch.randn(shape, device=device)
    masks = {}
    for name, xl in _layouts(x).items():
        torch.manual_seed(5)
        y = block(xl)
        masks[name] = y != 0
    for name, m in masks.items():
        assert torch.equal(m, masks["contiguous"]), name


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_backward_uses_forward_mask(device, memory_format):
    x = (torch.rand(2, C, 6, 5, device=device) + 0.5).contiguous(memory_format=memory_format).requires_grad_()
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    # running statistics: z = x > 0 everywhere, so the only zeros of y and of dx are dropped elements
    y = bnfused.bn_relu_dropout(x, rm, rv, None, None, False, 0.1, 1e-5, 0.5, seed=8, dropout_training=True)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, y != 0)
    torch.testing.assert_close(x.grad[y != 0], torch.full_like(x.grad[y != 0], 2.0 / math.sqrt(1 + 1e-5)))


# channels_last inputs whose spatial size is a multiple of 8 take the kernels' block-row mask path (one Philox block
# = 8 rows of one channel): channel counts below, at and above the 16 channels of a batch and not multiples of 8,
# several row tiles per image (rows > 128), and 3-d input.
BLOCK_ROW_SHAPES = [(2, 3, 4, 6), (2, 19, 10, 16), (3, 40, 8, 8), (2, 5, 2, 4, 4)]


@pytest.mark.parametrize("shape", BLOCK_ROW_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_block_row_mask(device, shape, dtype):
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    c = shape[1]
    x = (torch.rand(shape, device=device, dtype=dtype) + 0.5).contiguous(memory_format=fmt).requires_grad_()
    rm, rv = torch.zeros(c, device=device, dtype=dtype), torch.ones(c, device=device, dtype=dtype)
    # running statistics: z = x > 0 everywhere, so the zeros of y and dx are exactly the dropped elements
    y = bnfused.bn_relu_dropout(x, rm, rv, None, None, False, 0.1, 1e-5, 0.3, seed=2**33 + 5, dropout_training=True)
    keep = ops.dropout_mask(torch.tensor([2**33 + 5, 0], device=device), list(shape), 0.3)
    assert torch.equal(y != 0, keep)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, keep)
    # batch statistics: forward and backward match the contiguous layout (checked against the reference elsewhere)
    outs = []
    for xl in (x.detach().contiguous(), x.detach().clone()):
        xl.requires_grad_()
        y2 = bnfused.bn_relu_dropout(xl, None, None, None, None, True, 0.1, 1e-5, 0.3, seed=2**33 + 5)
        y2.backward(torch.arange(y2.numel(), device=device, dtype=dtype).reshape(shape) % 7)
        outs.append((y2, xl.grad))
    # the two layouts sum the statistics in different orders: float32 results agree to rounding, masks exactly
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(outs[1], outs[0], **tol)
    assert torch.equal(outs[1][0] != 0, outs[0][0] != 0)


@pytest.mark.skipif(not (torch.cuda.is_available() and bnfused.WITH_CUDA), reason="needs a CUDA build and GPU")
def test_same_mask_on_cpu_and_cuda():
    x = torch.randn(3, C, 7, 9)
    kw = dict(training=True, p=0.5, seed=2**40 + 3)
    y_cpu = bnfused.bn_relu_dropout(x, None, None, **kw)
    y_cuda = bnfused.bn_relu_dropout(x.cuda(), None, None, **kw)
    assert torch.equal(y_cpu != 0, (y_cuda != 0).cpu())
    key = torch.tensor([11, 12])
    assert torch.equal(ops.dropout_mask(key, [1001], 0.3), ops.dropout_mask(key.cuda(), [1001], 0.3).cpu())
