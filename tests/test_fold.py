"""bnfused.fold_eval: the folded conv/linear + ReLU equals the unfolded eval-mode layer -> fused block."""
import copy

import pytest
import torch
from torch import nn

import bnfused

# (layer factory, block class, input shape): every layer kind fold_eval accepts, with the block that follows it.
CASES = {
    "linear": (lambda bias: nn.Linear(5, 6, bias=bias), bnfused.BatchNormReLUDropout1d, (7, 5)),
    "conv1d": (lambda bias: nn.Conv1d(3, 6, 3, bias=bias), bnfused.BatchNormReLUDropout1d, (4, 3, 9)),
    "conv2d": (lambda bias: nn.Conv2d(4, 6, 3, groups=2, bias=bias), bnfused.BatchNormReLUDropout2d, (3, 4, 7, 6)),
    "conv3d": (lambda bias: nn.Conv3d(3, 6, 2, bias=bias), bnfused.BatchNormReLUDropout3d, (2, 3, 4, 5, 3)),
    "conv_transpose2d": (lambda bias: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=bias),
                         bnfused.BatchNormReLUDropout2d, (2, 4, 4, 5)),
    "conv_transpose1d": (lambda bias: nn.ConvTranspose1d(3, 6, 2, bias=bias), bnfused.BatchNormReLUDropout1d,
                         (3, 3, 5)),
}


def _eval_pair(kind, device, affine, bias, p=0.3):
    make_layer, block_cls, shape = CASES[kind]
    layer = make_layer(bias).to(device)
    block = block_cls(6, eps=1e-3, affine=affine, p=p, device=device)
    with torch.no_grad():  # running stats and affine parameters far from their defaults
        block.running_mean.uniform_(-1.0, 1.0)
        block.running_var.uniform_(0.2, 3.0)
        if affine:
            block.weight.uniform_(-2.0, 2.0)
            block.bias.uniform_(-1.0, 1.0)
    return layer.eval(), block.eval(), torch.randn(shape, device=device)


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("affine,bias", [(True, True), (False, False)])
def test_fold_matches_unfolded_eval(device, kind, affine, bias):
    layer, block, x = _eval_pair(kind, device, affine, bias)
    layer_state = copy.deepcopy(layer.state_dict())
    folded = bnfused.fold_eval(layer, block)
    assert isinstance(folded, nn.Sequential) and len(folded) == 2
    assert type(folded[0]) is type(layer) and isinstance(folded[1], nn.ReLU)
    assert folded[0].bias is not None and folded[0].bias.dtype == layer.weight.dtype
    with torch.no_grad():
        expected = block(layer(x))
        got = folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got == 0).any() and (got > 0).any(), "ReLU should clip part of the output"
    for name, value in layer.state_dict().items():  # the input layer is untouched
        assert torch.equal(value, layer_state[name]), name


def test_fold_keeps_requires_grad_and_trains(device):
    layer, block, x = _eval_pair("conv2d", device, affine=True, bias=False)
    folded = bnfused.fold_eval(layer, block)
    assert folded[0].weight.requires_grad and folded[0].bias.requires_grad
    folded(x).sum().backward()
    assert folded[0].weight.grad is not None and folded[0].bias.grad is not None


def test_fold_float64(device):
    layer, block, x = _eval_pair("conv1d", device, affine=True, bias=True)
    layer, block, x = layer.double(), block.double(), x.double()
    folded = bnfused.fold_eval(layer, block)
    assert folded[0].weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(folded(x), block(layer(x)), rtol=1e-12, atol=1e-12)


def test_fold_rejects_training_mode():
    layer, block, _ = _eval_pair("conv2d", "cpu", affine=True, bias=True)
    with pytest.raises(AssertionError, match="Fusion only for eval"):
        bnfused.fold_eval(layer, block.train())
    with pytest.raises(AssertionError, match="Fusion only for eval"):
        bnfused.fold_eval(layer.train(), block.eval())


def test_fold_rejects_block_without_running_stats():
    block = bnfused.BatchNormReLUDropout2d(6, track_running_stats=False).eval()
    with pytest.raises(AssertionError, match="track_running_stats=False"):
        bnfused.fold_eval(nn.Conv2d(3, 6, 1).eval(), block)


def test_fold_rejects_channel_mismatch_and_wrong_types():
    block = bnfused.BatchNormReLUDropout2d(6).eval()
    with pytest.raises(AssertionError, match="num_features"):
        bnfused.fold_eval(nn.Conv2d(3, 5, 1).eval(), block)
    with pytest.raises(TypeError, match="BatchNormReLUDropoutXd"):
        bnfused.fold_eval(nn.Conv2d(3, 6, 1).eval(), nn.BatchNorm2d(6).eval())
    with pytest.raises(TypeError, match="Linear"):
        bnfused.fold_eval(nn.Identity(), block)


@pytest.mark.parametrize("tail", [bnfused.BatchNormAddReLU2d, bnfused.SyncBatchNormAddReLU])
def test_fold_rejects_block_tail_and_points_to_fuse_conv_bn_eval(tail):
    """A BN + residual -> ReLU module would fold into relu(conv(x)), losing the residual: it is refused, and the
    way the error names (fuse_conv_bn_eval of its BN, then relu(out + residual)) computes the module."""
    torch.manual_seed(0)
    conv, block = nn.Conv2d(3, 4, 3).eval(), tail(4).eval()
    with torch.no_grad():
        block.running_mean.normal_()
        block.running_var.uniform_(0.5, 2.0)
        block.weight.uniform_(0.5, 1.5)
    with pytest.raises(TypeError, match="adds a residual before its ReLU.*fuse_conv_bn_eval"):
        bnfused.fold_eval(conv, block)
    folded = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, block)
    x, residual = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(torch.relu(folded(x) + residual), block(conv(x), residual), rtol=1e-5, atol=1e-5)


# every activation bnfused fuses, as its torch.nn module after the folded layer (float64, CPU kernels)
ACTIVATIONS = [("identity", None), ("relu", None), ("relu6", None), ("hardtanh", dict(min_val=-0.5, max_val=2.0)),
               ("leaky_relu", dict(negative_slope=0.2)), ("silu", None), ("hardswish", None), ("gelu", None),
               ("gelu_tanh", None), ("elu", dict(alpha=0.5)), ("mish", None)]


@pytest.mark.parametrize("act,act_kwargs", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_fold_every_activation(act, act_kwargs):
    layer = nn.Conv2d(4, 6, 3, dtype=torch.float64).eval()
    block = bnfused.BatchNormActDropout2d(6, p=0.3, act=act, act_kwargs=act_kwargs, dtype=torch.float64).eval()
    with torch.no_grad():
        block.running_mean.uniform_(-1.0, 1.0)
        block.running_var.uniform_(0.2, 3.0)
        block.weight.uniform_(-2.0, 2.0)
        block.bias.uniform_(-1.0, 1.0)
    folded = bnfused.fold_eval(layer, block)
    assert type(folded[1]) is type(block.activation.module())
    if act != "identity":
        assert bnfused.resolve_activation(folded[1]) == block.activation
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), block(layer(x)), rtol=1e-12, atol=1e-12)
