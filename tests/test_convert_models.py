"""bnfused.convert() on real model code: torchvision's mobilenet_v2, mobilenet_v3_small/large, efficientnet_b0,
regnet_y_400mf and timm's efficientnet_b0, mobilenetv3_large_100, regnety_002, cspdarknet53, rexnet_100, resnet50d
(tests/real_models.py imports them; each test skips when its library is absent). The sites fused per model, every
BatchNorm left named with its reason, outputs and gradients equal to the unconverted model's in float64 (train and
eval), state_dict both ways, an optimizer built before convert() training every parameter, and unconvert()."""
import copy
import warnings

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import bnfused
import real_models
from bnfused.modules import _BatchNormReLUDropout

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out (marker: pyproject.toml)

MODELS = list(real_models.MODELS)
# Sites fused per model: (by a convert() that fuses BN -> ReLU only, as before activations, now). regnet_y_400mf
# has ReLU only; its 4 BNs left are the projections a fused block tail adds. What the others leave: BNs whose output
# is a block's output or a residual (no activation after them), and in rexnet BNs followed by squeeze-excitation
# before their activation. timm's RegNet tails and ReXNet's conv_dw -> act_dw have the BN inside a ConvNormAct (a
# chain conv -> bn in a forward of its own: _graph_sites.layer_chain).
SITES = {
    "tv_mobilenet_v2": (0, 35), "tv_mobilenet_v3_small": (5, 23), "tv_mobilenet_v3_large": (11, 31),
    "tv_efficientnet_b0": (0, 33), "tv_regnet_y_400mf": (49, 49),
    "timm_efficientnet_b0": (0, 33), "timm_mobilenetv3_large_100": (0, 31), "timm_regnety_002": (0, 40),
    "timm_cspdarknet53": (0, 67), "timm_rexnet_100": (13, 33), "timm_resnet50d": (35, 51),
}
SHAPE = (2, 3, 64, 64)
TOL = dict(rtol=1e-9, atol=1e-9)


def build(key, seed=0):
    model = real_models.build(key, seed)
    if model is None:
        pytest.skip(f"{real_models.MODELS[key][0]} is not installed")
    with torch.no_grad():  # non-trivial statistics and affine parameters, so that eval really uses them
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.double()


def converted(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no module torch.fx could not trace
        return bnfused.convert_with_report(model)


def run(model, x):
    """Output and loss gradients (input; parameters by name) of one forward/backward, dropout masks seeded."""
    xi = x.clone().requires_grad_()
    torch.manual_seed(5)
    y = model(xi)
    y.mul(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return y, xi.grad, grads


@pytest.mark.parametrize("key", MODELS)
def test_sites_fused_and_every_batchnorm_left_has_a_reason(key):
    model = build(key)
    keys = list(model.state_dict())
    bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    model, report = converted(model)
    before, after = SITES[key]
    assert report.num_fused == after >= before, report.summary()
    assert after > before or key == "tv_regnet_y_400mf"
    assert report.untraced == []
    left = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and not isinstance(
        m, _BatchNormReLUDropout)]
    assert sorted(u.name for u in report.unfused) == sorted(left)
    assert sorted([s.name for s in report.fused] + left) == sorted(bns)
    assert all(u.reason for u in report.unfused)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("key", MODELS)
def test_outputs_and_gradients_match(key):
    """Training then eval (one conversion: convert() traces every model module, the costly part here)."""
    model = build(key)
    fused_model, _ = converted(copy.deepcopy(model))
    for training in (True, False):
        model.train(training), fused_model.train(training)
        x = torch.randn(*SHAPE, dtype=torch.float64)
        y_ref, gx_ref, g_ref = run(model, x)
        y, gx, g = run(fused_model, x)
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(gx, gx_ref, **TOL)
        assert g.keys() == g_ref.keys()
        for name in g:
            torch.testing.assert_close(g[name], g_ref[name], **TOL, msg=lambda m: f"{name} ({training=}): {m}")
        ref_state = model.state_dict()  # running statistics moved the same way
        for name, value in fused_model.state_dict().items():
            torch.testing.assert_close(value, ref_state[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("key", MODELS)
def test_state_dict_optimizer_and_unconvert(key):
    model = build(key)
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # built before convert()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    model, _ = converted(model)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    # state_dict both ways, strict
    other = build(key, seed=1)
    model.load_state_dict(other.state_dict())
    other.load_state_dict(model.state_dict())
    model.load_state_dict(reference.state_dict())
    # a training step through the converted model moves every parameter as the unconverted model's step does
    x = torch.randn(*SHAPE, dtype=torch.float64)
    for m, opt in ((reference, reference_optimizer), (model, optimizer)):
        m.train()
        torch.manual_seed(5)
        loss = m(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in params)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, p_ref, **TOL, msg=lambda m: f"{name}: {m}")
    # unconvert: the torch.nn / timm modules back, computing what the converted model computes
    model.eval()
    with torch.no_grad():
        y = model(x)
    bnfused.unconvert(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert not any(isinstance(m, _BatchNormReLUDropout) for m in model.modules())
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, **TOL)


# drop_path_rate: the first block's rate is 0 (timm decays it linearly from 0), and where a block has a downsample
# its BN takes the add instead: act2(drop_path(bn2(x)) + downsample(shortcut)) fuses as the downsample's tail
@pytest.mark.parametrize("rates,fused", [({}, 8 + 8 + 1), ({"drop_path_rate": 0.1}, 8 + 1 + 1 + 3),
                                         ({"drop_block_rate": 0.1}, 4 + 8 + 1)], ids=["none", "drop_path", "drop_block"])
def test_timm_resnet_drop_layers(rates, fused):
    """timm's ResNet blocks: bn1 -> drop_block -> act1 and bn2 -> drop_path -> += shortcut -> act2 are fused where
    the drop layers are the identity (rate 0); DropPath / DropBlock with a rate (stochastic in training) leave their
    sites, named. drop_block_rate applies to the last two stages only."""
    timm = real_models.timm()
    if timm is None:
        pytest.skip("timm is not installed")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, **rates).double()
    fused_model, report = converted(copy.deepcopy(model))
    assert report.num_fused == fused, report.summary()
    reasons = {u.name: u.reason for u in report.unfused}
    if "drop_path_rate" in rates:
        assert reasons["layer1.1.bn2"] == "its output goes to drop_path, not (only) to an activation bnfused fuses"
    if "drop_block_rate" in rates:
        assert reasons["layer4.0.bn1"] == "its output goes to drop_block, not (only) to an activation bnfused fuses"
    x = torch.randn(*SHAPE, dtype=torch.float64)
    for training in (True, False):
        model.train(training), fused_model.train(training)
        (y_ref, gx_ref, g_ref), (y, gx, g) = run(model, x), run(fused_model, x)
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(gx, gx_ref, **TOL)
