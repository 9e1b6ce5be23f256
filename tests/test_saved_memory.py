"""What autograd keeps for backward, measured with torch.autograd.graph.saved_tensors_hooks.

The fused block may save the input, per-channel vectors and the 16-byte Philox key: for float32 input at most
4*numel + numel/8 (the 1-bit keep mask the CPU path saves in training, see ops.forward_keep_bits) + O(C) bytes;
the unfused chain saves ~9 B/element.
"""
import pytest
import torch
from torch import nn

import bnfused
from bnfused import ops

C = 8
SHAPE = (4, C, 16, 16)
O_C = 64 * C + 256  # per-channel vectors (mean, rstd, weight, bias in fp64 at worst) and the key


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves while running fn() (views of one tensor counted once)."""
    seen = {}

    def pack(t):
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        seen[ident] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def make_input(layout, dtype=torch.float32):
    if layout == "noncontig":
        return torch.randn(*SHAPE[:-1], 2 * SHAPE[-1]).to(dtype)[..., ::2].requires_grad_()
    x = torch.randn(SHAPE).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
@pytest.mark.parametrize("training,p", [(True, 0.5), (True, 0.0), (True, 1.0), (False, 0.5)],
                         ids=["train_p0.5", "train_p0", "train_p1", "eval"])
def test_fused_module_saved_bytes_bound(layout, training, p):
    x = make_input(layout)
    block = bnfused.BatchNormReLUDropout2d(C, p=p).train(training)
    nbytes, y = saved_bytes(lambda: block(x))
    numel = x.numel()
    assert nbytes <= 4 * numel + numel // 8 + O_C, (nbytes / numel, "bytes per element")
    y.sum().backward()  # what was saved suffices for backward
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_saved_bytes_scale_with_input_dtype(dtype):
    x = make_input("contiguous", dtype)
    w, b = torch.ones(C, dtype=ops.acc_dtype(dtype), requires_grad=True), torch.zeros(C, dtype=ops.acc_dtype(dtype),
                                                                                      requires_grad=True)
    nbytes, _ = saved_bytes(lambda: bnfused.bn_relu_dropout(x, None, None, w, b, True, 0.1, 1e-5, 0.5, seed=1))
    numel = x.numel()
    assert nbytes <= x.element_size() * numel + numel // 8 + O_C, nbytes / numel


def test_function_directly_saves_input_mask_bits_and_per_channel_only():
    x = make_input("channels_last")
    mean, var = ops.batch_stats(x.detach())
    w = torch.ones(C, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    key = torch.tensor([3, 4])
    nbytes, _ = saved_bytes(lambda: bnfused.BNReLUDropoutFunction.apply(x, mean, torch.rsqrt(var + 1e-5), w, b, key,
                                                                         0.5, True))
    assert nbytes <= 4 * x.numel() + x.numel() // 8 + O_C


def test_fused_saves_less_than_unfused_chain():
    x = make_input("contiguous")
    fused = bnfused.BatchNormReLUDropout2d(C, p=0.5)
    unfused = nn.Sequential(nn.BatchNorm2d(C), nn.ReLU(), nn.Dropout(0.5))
    fused_bytes, _ = saved_bytes(lambda: fused(x))
    unfused_bytes, _ = saved_bytes(lambda: unfused(x))
    numel = x.numel()
    # unfused: x for BN, the ReLU output and the dropout mask (~9 B/element); fused: x and at most a 1-bit mask
    assert unfused_bytes >= 8 * numel
    assert fused_bytes <= 4 * numel + numel // 8 + O_C
    assert fused_bytes < 0.5 * unfused_bytes
