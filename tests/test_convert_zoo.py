"""bnfused.convert() over a wider zoo (tests/torchvision_like.py ZOO: Inception v3, GoogLeNet, ShuffleNetV2, MNASNet,
RegNet, ResNeXt, Wide ResNet, pre-activation ResNets, and patterns from user code): every structural site fused,
and the converted model computes what the original does, outputs and input / parameter gradients in float64, in
train and in eval mode."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfused
import torchvision_like as tv

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out (marker: pyproject.toml)

TOL = dict(rtol=1e-9, atol=1e-9)


def build(name, seed=0):
    torch.manual_seed(seed)
    builder, shape = tv.ZOO[name]
    return tv.randomize_batchnorm(builder().double()), shape


def converted(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = bnfused.convert_with_report(copy.deepcopy(model))
    assert not [w for w in caught if "could not trace" in str(w.message)]
    return result


def outputs(y):
    return list(y) if isinstance(y, tuple) else [y]  # Inception3 / GoogLeNet train: namedtuples with aux heads


@pytest.mark.parametrize("name", list(tv.ZOO))
def test_zoo_fuses_every_site(name):
    model, _ = build(name)
    fused_model, report = converted(model)
    sites = tv.count_sites(model)
    assert report.untraced == []
    assert report.num_fused == (sites["bn_relu"] + sites["bn_relu6"] + sites["bn_add_relu"]
                                - tv.UNFUSABLE.get(name, 0)), report.summary()
    assert sum(s.residual is not None for s in report.fused) == sites["bn_add_relu"], report.summary()
    left = [n for n, m in fused_model.named_modules() if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d)]
    assert sorted(u.name for u in report.unfused) == sorted(left)
    assert all(u.reason for u in report.unfused)
    assert list(fused_model.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(tv.ZOO))
def test_zoo_outputs_and_gradients_match(name, training):
    model, shape = build(name)
    fused_model, report = converted(model)
    model.train(training), fused_model.train(training)
    # a fused dropout draws its mask from Philox, not from torch's generator: compared at p > 0 in eval only
    compare = not (training and any(s.p > 0 for s in report.fused))
    x = torch.randn(*shape, dtype=torch.float64)
    results = []
    for m in (model, fused_model):
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)  # the same masks for the dropouts left unfused
        ys = outputs(m(xi))
        loss = sum((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() for y in ys)
        loss.backward()
        results.append((ys, xi.grad))
    (ys_ref, gx_ref), (ys, gx) = results
    assert [y.shape for y in ys] == [y.shape for y in ys_ref]
    if not compare:
        return
    for y, y_ref in zip(ys, ys_ref):
        torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(gx, gx_ref, **TOL)
    tv.assert_same_grads_and_state(fused_model, model, **TOL)
    assert [mod.training for mod in fused_model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)] == [
        mod.training for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]


# ---------------------------------------------------------------- patterns the zoo's failures came from


def check_same(model, fused_model, x, modes=(True, False)):
    """Outputs and gradients (input, parameters) of the converted model are the original's, in each mode."""
    for training in modes:
        model.train(training), fused_model.train(training)
        results = []
        for m in (model, fused_model):
            xi = x.clone().requires_grad_()
            torch.manual_seed(3)
            y = m(xi)
            grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                        [xi] + list(m.parameters()), allow_unused=True)
            results.append((y, grads))
        (y_ref, g_ref), (y, g) = results
        torch.testing.assert_close(y, y_ref, **TOL)
        for a, b in zip(g, g_ref):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, **TOL)


class BroadcastResidual(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.bias = nn.Parameter(torch.randn(3, 1, 1))
        self.embed = nn.Linear(3, 3)

    def forward(self, x):
        residual = {"parameter": lambda: self.bias,
                    "embedding": lambda: self.embed(x.mean((2, 3)))[:, :, None, None],
                    "scalar": lambda: x.mean(),
                    "float32": lambda: x.float(),
                    "float64": lambda: x.double(),
                    "same": lambda: x}[self.how]()
        return torch.relu(self.bn(self.conv(x)) + residual)


@pytest.mark.parametrize("sync", [False, True], ids=["convert", "convert_sync"])
@pytest.mark.parametrize("how", ["parameter", "embedding", "scalar", "float32", "same"])
def test_residual_that_broadcasts_or_promotes(how, sync):
    """The add takes any residual torch's + takes: one of another shape or dtype is computed unfused (the fused
    module raised on it before; convert_sync: the synchronised module with the residual broadcast), one of the
    input's shape, dtype and device by the fused module."""
    torch.manual_seed(0)
    model = BroadcastResidual(how).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convert_sync: the BN is not a SyncBatchNorm
        fused_model, report = bnfused.convert_with_report(copy.deepcopy(model), sync=sync)
    assert [s.name for s in report.fused if s.residual] == ["bn"]
    assert type(fused_model.bn) is (bnfused.SyncBatchNormAddReLU if sync else bnfused.BatchNormAddReLU2d)
    check_same(model, fused_model, torch.randn(2, 3, 4, 4, dtype=torch.float64))


def test_residual_the_synced_module_cannot_take_raises_clearly(monkeypatch):
    """In synchronised training only the fused module computes the group's statistics: a residual that broadcasts
    is broadcast to the input for it, one that also promotes the sum's dtype cannot be. Outside synchronised
    training the unfused computation serves, as for convert()."""
    torch.manual_seed(0)
    model = BroadcastResidual("parameter")
    model.bias = nn.Parameter(model.bias.detach().double())  # float32 BN output + a float64 (3, 1, 1) bias
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused_model = bnfused.convert_sync(copy.deepcopy(model))
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fused_model(x), model(x))  # no process group
    monkeypatch.setattr(type(fused_model.bn), "_sync", lambda self: ("group", 2))  # as in synchronised training
    with pytest.raises(RuntimeError, match="does not broadcast to the BatchNorm's output"):
        fused_model(x)


class DropoutAfterEvalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return F.dropout(F.relu(self.bn(self.conv(x))), 0.5, self.training)


def test_dropout_following_the_module_not_the_bn_stays():
    """model.train(), then the BN alone in eval: F.dropout(training=self.training) drops, the BN does not train;
    a fused dropout would follow the BN (it dropped nothing before)."""
    torch.manual_seed(0)
    model = DropoutAfterEvalBN().double().train()
    model.bn.eval()
    fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert [(s.name, s.dropout) for s in report.fused] == [("bn", None)]
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(fused_model(x), expected, **TOL)


class WrittenBeforeAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        out = self.bn(y)
        y.mul_(2)  # the BN's input written after the BN ran, before the add
        return torch.relu(out + x)


def test_bn_input_written_before_the_add_is_not_fused():
    torch.manual_seed(0)
    model = WrittenBeforeAdd().double()
    with pytest.warns(UserWarning, match="fused no"):
        fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for training in (True, False):  # no backward: the original's in-place write breaks it
        model.train(training), fused_model.train(training)
        with torch.no_grad():
            torch.testing.assert_close(fused_model(x), model(x), **TOL)


class InnerBNCalledToo(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        return torch.relu(self.seq(x)) + self.seq[1](x)  # the Sequential's BN also called on its own


def test_bn_ending_a_sequential_and_called_directly_is_not_fused():
    torch.manual_seed(0)
    model = InnerBNCalledToo().double()
    with pytest.warns(UserWarning, match="fused no"):
        fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert "more than one place" in report.unfused[0].reason
    check_same(model, fused_model, torch.randn(2, 3, 4, 4, dtype=torch.float64))


class OptionalArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.conv_skip = nn.Conv2d(3, 3, 1), nn.Conv2d(6, 3, 1)
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x, skip=None, gate=None):
        x = self.conv(x) if skip is None else self.conv_skip(torch.cat([x, skip], 1))
        x = F.relu(self.bn1(x))
        if gate is not None:
            x = x * gate
        return F.relu(self.bn2(x), inplace=True)


def test_forward_with_none_default_arguments_is_rewritten_for_each():
    """`if skip is not None:` traces one branch: the rewritten forward picks the trace by which arguments are
    None (it took the given branch whatever the call before: torch.cat([x, None]) raised)."""
    torch.manual_seed(0)
    model = OptionalArgs().double()
    fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert sorted(s.name for s in report.fused) == ["bn1", "bn2"]
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for args in [(), (x,), (None, x[:, :1]), (x, x[:, :1])]:
        for training in (True, False):
            model.train(training), fused_model.train(training)
            torch.testing.assert_close(fused_model(x, *args), model(x, *args), **TOL)
    torch.testing.assert_close(fused_model(x, gate=x), model(x, gate=x), **TOL)
    clone = copy.deepcopy(fused_model)  # the dispatching forward pickles like any rewritten one
    torch.testing.assert_close(clone(x, x), model(x, x), **TOL)


class CifarBlock(nn.Module):
    """The CIFAR ResNet block written with two nn.Sequentials: relu(residual_function(x) + shortcut(x))."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.residual_function = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return nn.ReLU(inplace=True)(self.residual_function(x) + self.shortcut(x))


@pytest.mark.parametrize("projected", [False, True])
def test_bn_ending_a_sequential_takes_the_add(projected):
    torch.manual_seed(0)
    model = nn.Sequential(CifarBlock(3, 4 if projected else 3, 2 if projected else 1)).double()
    fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert len(report.fused) == 2 and [s.name for s in report.fused if s.residual] == ["0.residual_function.4"]
    check_same(model, fused_model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    # the Sequential is no longer called, its layers are: a hook on it leaves the add unfused
    hooked = copy.deepcopy(model)
    hooked[0].residual_function.register_forward_pre_hook(lambda *args: None)
    _, report = bnfused.convert_with_report(hooked)
    assert [s.name for s in report.fused] == ["0.residual_function.1"]


class DropoutElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return F.dropout(x, 0.3, self.training)


def test_forward_reading_self_training_for_dropout_is_rewritten():
    """F.dropout(x, p, self.training) away from the site traces to a constant per mode: the rewritten forward
    reads self.training there (the module was left unrewritten before)."""
    torch.manual_seed(0)
    model = DropoutElsewhere().double()
    fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert [(s.name, s.dropout) for s in report.fused] == [("bn", None)]
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for training in (True, False):
        model.train(training), fused_model.train(training)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(fused_model(x), expected, **TOL)


def test_frozen_bn_layers_keep_their_dropouts_apart():
    """FrozenBNBackbone freezing _BatchNorm layers (its fused modules too): BN -> ReLU fused, but the dropouts
    follow the model's mode, not the frozen BN's, so they stay as they are (and draw torch's masks)."""
    model, shape = build("frozen_bn_base")
    fused_model, report = converted(model)
    assert [(s.name, s.dropout) for s in report.fused] == [("body.1", None), ("body.4", None), ("bn", None)]
    fused_model.train(), model.train()
    assert not any(m.training for m in fused_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    x = torch.randn(*shape, dtype=torch.float64)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(fused_model(x), expected, **TOL)
