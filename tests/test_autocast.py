"""Autocast: Conv2d -> fused block under torch.autocast behaves like Conv2d -> nn.BatchNorm2d -> ReLU -> Dropout:
the block runs in the conv's reduced output dtype (bf16/fp16), with float32 batch statistics, float32 running
stats, weight and bias, and a reduced-dtype output. CPU: bfloat16 (the issue's case) and float16; CUDA: both
(run only where the device fixture has cuda)."""
import copy

import pytest
import torch
from torch import nn

import bnfused
from bnfused import ops
from bnfused.testing import KeyedDropout


def _models(device, p):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).to(device)
    fused = nn.Sequential(conv, bnfused.BatchNormReLUDropout2d(4, p=p, device=device))
    with torch.no_grad():
        fused[1].weight.uniform_(0.5, 1.5)
        fused[1].bias.uniform_(-0.5, 0.5)
    reference = nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(4, device=device), nn.ReLU(), KeyedDropout(p))
    reference[1].load_state_dict(fused[1].state_dict())
    return fused, reference


def _run(model, x, seed, device, dtype):
    torch.manual_seed(seed)
    with torch.autocast(device.type, dtype=dtype):
        y = model(x)
    y.float().square().sum().backward()
    return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_autocast_training_like_native_batchnorm(device, dtype, p):
    fused, reference = _models(device, p)
    x = torch.randn(4, 3, 7, 6, device=device)
    seed = 123
    torch.manual_seed(seed)
    reference[3].key = ops.philox_key(device)  # the key the fused block draws after the same manual_seed
    y_ref = _run(reference, x, seed, device, dtype)
    y = _run(fused, x, seed, device, dtype)
    block, bn = fused[1], reference[1]

    assert y.dtype == dtype == y_ref.dtype
    for t in (block.weight, block.bias, block.running_mean, block.running_var, block.weight.grad, block.bias.grad):
        assert t.dtype == torch.float32
    # Batch statistics accumulate in float32 as native BatchNorm's do: reduced-precision statistics would be off
    # by ~1e-3 relative, far outside this tolerance.
    torch.testing.assert_close(block.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(block.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    # Same float32 math rounded once to the reduced dtype: at most one rounding step apart.
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)
    if p > 0:  # same key -> same mask; ignore ReLU ties where z rounds to ~0 differently in the two paths
        clear = (y.float().abs() > 1e-3) | (y_ref.float().abs() > 1e-3)
        assert torch.equal((y == 0)[clear], (y_ref == 0)[clear]), "dropout zeros differ from the reference's mask"
    # Gradients: the two backward passes round at different places (measured: both within ~2 ulp-of-dtype of
    # the float32 gradient in norm, the fused one slightly closer), so compare in relative norm.
    tol = 8 * torch.finfo(dtype).eps
    for name, got, want in (("block weight", block.weight.grad, bn.weight.grad),
                            ("block bias", block.bias.grad, bn.bias.grad),
                            ("conv weight", fused[0].weight.grad, reference[0].weight.grad)):
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < tol, f"{name} grad differs from native BatchNorm's by {rel:.2e} (relative norm)"
    assert fused[0].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_eval_uses_float32_running_stats(device, dtype):
    fused, reference = _models(device, p=0.5)
    with torch.no_grad():
        fused[1].running_mean.uniform_(-0.2, 0.2)
        fused[1].running_var.uniform_(0.5, 2.0)
    reference[1].load_state_dict(fused[1].state_dict())
    fused.eval()
    reference.eval()
    x = torch.randn(2, 3, 6, 6, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        y = fused(x)
        y_ref = reference(x)
    assert y.dtype == dtype
    assert fused[1].running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)


class _SkipAroundBranch(nn.Module):
    """relu(bn(conv(x)) + x): under autocast the branch is reduced precision and the skip connection float32."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_float32_skip_connection_after_convert(device, dtype, training):
    """A converted model whose residual keeps float32 while the branch autocasts: the unconverted model's result
    (float32, bit for bit), where the fused tail would need one dtype."""
    torch.manual_seed(0)
    reference = _SkipAroundBranch().to(device).train(training)
    fused = bnfused.convert(copy.deepcopy(reference))
    assert type(fused.bn) is bnfused.BatchNormAddReLU2d
    x = torch.randn(2, 3, 5, 5, device=device)
    y_ref = _run(reference, x, 0, device, dtype)
    y = _run(fused, x, 0, device, dtype)
    assert y.dtype == torch.float32 == y_ref.dtype and torch.equal(y, y_ref)
    assert torch.equal(fused.conv.weight.grad, reference.conv.weight.grad)
    assert torch.equal(fused.bn.running_var, reference.bn.running_var)
