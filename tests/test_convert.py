"""bnfused.convert(): which chains are swapped, what is copied, and that the converted model computes the same."""
import inspect

import pytest
import torch
from torch import nn

import bnfused
from bnfused import ops

FUSED = {1: bnfused.BatchNormReLUDropout1d, 2: bnfused.BatchNormReLUDropout2d, 3: bnfused.BatchNormReLUDropout3d}
NN_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def randomize(bn):
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
        if bn.bias is not None:
            bn.bias.normal_(0, 0.3)
        if bn.running_mean is not None:
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.num_batches_tracked.fill_(5)
    return bn


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("with_dropout", [True, False])
@pytest.mark.parametrize("kwargs", [{}, dict(affine=False), dict(track_running_stats=False), dict(momentum=None),
                                    dict(eps=1e-3, momentum=0.3)], ids=["default", "noaffine", "notrack",
                                                                         "momentum_none", "eps_momentum"])
def test_converts_chain(device, dim, with_dropout, kwargs):
    bn = randomize(NN_BN[dim](3, device=device, **kwargs))
    layers = [nn.Identity(), bn, nn.ReLU()] + ([nn.Dropout(0.25)] if with_dropout else []) + [nn.Flatten()]
    model = nn.Sequential(*layers)
    keys_before = list(model.state_dict().keys())
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    assert bnfused.convert(model) is model
    fused = model[1]
    assert type(fused) is FUSED[dim]
    assert fused.p == (0.25 if with_dropout else 0.0)
    assert (fused.eps, fused.momentum, fused.affine, fused.track_running_stats) == (
        bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    assert all(type(m) is nn.Identity for m in model[2:2 + (2 if with_dropout else 1)])
    assert type(model[-1]) is nn.Flatten
    assert list(model.state_dict().keys()) == keys_before  # indices, and so keys, stay stable
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert all(t.device.type == device.type for t in model.state_dict().values())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_converted_model_computes_the_same(device, training, p):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), randomize(nn.BatchNorm2d(3)), nn.ReLU(),
                             *([nn.Dropout(p)] if p else []), nn.Conv2d(3, 2, 1)).to(device).train(training)

    model, fused_model = build(), bnfused.convert(build())
    assert type(fused_model[1]) is bnfused.BatchNormReLUDropout2d and fused_model.training == training
    x = torch.randn(2, 2, 5, 6, device=device)
    torch.manual_seed(3)
    y_fused = fused_model(x)
    if p and training:
        torch.manual_seed(3)
        key = ops.philox_key(x.device)  # the key the fused block drew
        h = model[2](model[1](model[0](x)))
        keep = ops.dropout_mask(key, h.shape, p)
        y_ref = model[4](h * keep / (1 - p))
    else:
        y_ref = model(x)
    torch.testing.assert_close(y_fused, y_ref, rtol=1e-5, atol=1e-5)
    y_fused.sum().backward()
    y_ref.sum().backward()
    for (name, a), (_, b) in zip(fused_model.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(fused_model[1].running_mean, model[1].running_mean)
    torch.testing.assert_close(fused_model[1].running_var, model[1].running_var)


def test_nested_and_repeated_chains():
    inner = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.1))
    model = nn.Sequential(
        nn.Linear(4, 4), inner,
        nn.Sequential(nn.BatchNorm3d(2), nn.ReLU(), nn.BatchNorm3d(2), nn.ReLU(), nn.Dropout(0.2)),
        nn.ModuleDict({"block": nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())}),
    )
    bnfused.convert(model)
    assert type(model[1][0]) is bnfused.BatchNormReLUDropout1d and model[1][0].p == pytest.approx(0.1)
    assert type(model[2][0]) is bnfused.BatchNormReLUDropout3d and model[2][0].p == 0.0
    assert type(model[2][2]) is bnfused.BatchNormReLUDropout3d and model[2][2].p == pytest.approx(0.2)
    assert type(model[3]["block"][0]) is bnfused.BatchNormReLUDropout2d


@pytest.mark.parametrize("layers", [
    [nn.BatchNorm2d(3), nn.Dropout(0.5)],                             # no ReLU
    [nn.BatchNorm2d(3), nn.Sigmoid()],                                # an activation bnfused does not fuse
    [nn.ReLU(), nn.BatchNorm2d(3)],                                   # wrong order
    [nn.BatchNorm2d(3), nn.Identity(), nn.ReLU()],                    # not adjacent
    [nn.SyncBatchNorm(3), nn.ReLU()],                                 # only exact BatchNorm1d/2d/3d
    [nn.InstanceNorm2d(3), nn.ReLU()],
], ids=["no_relu", "sigmoid", "order", "gap", "syncbn", "instancenorm"])
def test_leaves_other_patterns_alone(layers):
    model = nn.Sequential(*layers)
    types = [type(m) for m in model]
    bnfused.convert(model)
    assert [type(m) for m in model] == types


def test_channel_dropout_is_not_fused():
    """Dropout2d drops whole channels, which the element-wise mask cannot express: only BN -> ReLU is fused."""
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout2d(0.5))
    bnfused.convert(model)
    assert type(model[0]) is bnfused.BatchNormReLUDropout2d and model[0].p == 0.0
    assert type(model[2]) is nn.Dropout2d


def test_bn_outside_sequential_is_fused_in_place():
    """Attributes called in forward() code: found by tracing; the ReLU module called only there becomes
    nn.Identity and the module keeps its class and forward."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.relu = randomize(nn.BatchNorm2d(3)), nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(x))

    net = Net()
    bn = net.bn
    x = torch.randn(2, 3, 4, 4)
    expected = net(x)
    model, report = bnfused.convert_with_report(net)
    assert model is net and type(net) is Net
    assert type(net.bn) is bnfused.BatchNormReLUDropout2d and net.bn.weight is bn.weight
    assert type(net.relu) is nn.Identity
    assert report.fused == [bnfused.FusedSite("bn", "relu")] and report.unfused == []
    torch.testing.assert_close(net(x), expected)


def test_copies_mode_dtype_and_requires_grad():
    bn = randomize(nn.BatchNorm2d(3).double().eval())
    bn.weight.requires_grad_(False)
    model = bnfused.convert(nn.Sequential(bn, nn.ReLU()))
    fused = model[0]
    assert not fused.training
    assert fused.weight.dtype == torch.float64 and fused.running_mean.dtype == torch.float64
    assert not fused.weight.requires_grad and fused.bias.requires_grad
    assert same_state(fused, bn)


@pytest.mark.skipif("bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters,
                    reason="this torch's nn.BatchNormXd has no bias= argument")
def test_converts_bn_without_bias():
    bn = randomize(nn.BatchNorm2d(3, bias=False))
    model = bnfused.convert(nn.Sequential(bn, nn.ReLU()))
    assert type(model[0]) is bnfused.BatchNormReLUDropout2d
    assert model[0].bias is None and same_state(model[0], bn)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(model(x), torch.relu(bn(x)), rtol=1e-5, atol=1e-5)


def test_optimizer_built_before_convert_keeps_training():
    """convert() swaps in modules that share the BN's Parameter and buffer objects: an optimizer (and parameter
    hooks) made before the swap act on the fused model, step for step as on the unfused one."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 3), randomize(nn.BatchNorm2d(3)), nn.ReLU(), nn.Conv2d(3, 2, 1))

    model, ref = build(), build()
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    bn = model[1]
    seen = []
    bn.weight.register_hook(lambda g: seen.append(g))
    bnfused.convert(model)
    assert model[1].weight is bn.weight and model[1].running_mean is bn.running_mean
    x = torch.randn(4, 2, 6, 6)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert len(seen) == 3
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert not torch.equal(bn.weight, build()[1].weight)  # it trained


def test_convert_returns_the_model_and_the_report_comes_from_convert_with_report():
    """convert() returns one type whatever its arguments; convert_with_report() returns (model, report); the old
    report=True spelling still works, with a FutureWarning."""
    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    assert isinstance(bnfused.convert(net()), nn.Sequential)
    model, report = bnfused.convert_with_report(net())
    assert isinstance(report, bnfused.ConvertReport) and report.num_fused == 1
    assert type(model[1]) is bnfused.BatchNormReLUDropout2d
    with pytest.warns(FutureWarning, match="convert_with_report"):
        model, report = bnfused.convert(net(), report=True)
    assert report.num_fused == 1
    with pytest.warns(FutureWarning, match="convert_with_report"):
        model, report = bnfused.convert_sync(net(), report=True)
    assert type(model[1]) is bnfused.SyncBatchNormReLUDropout
