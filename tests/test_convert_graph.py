"""bnfused.convert() on forward() code (torch.fx): torchvision-structured models (sites fused out of sites existing,
outputs and gradients against the unconverted model), every ReLU/Dropout spelling, hooks, optimizers, modes,
untraceable modules, pickling of rewritten forwards and TorchScript."""
import copy
import io
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfused
import torchvision_like as tv

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out (marker: pyproject.toml)

MODELS = list(tv.SMALL)


def build(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = tv.SMALL[name]().to(dtype)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def converted(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MobileNetV2 has nothing to fuse: tested below
        return bnfused.convert_with_report(copy.deepcopy(model))


@pytest.mark.parametrize("name", MODELS)
def test_fuses_every_bn_relu_site(name):
    model = build(name)
    fused_model, report = converted(model)
    sites = tv.count_sites(model)
    assert report.num_fused == sites["bn_relu"] + sites["bn_relu6"] + sites["bn_add_relu"]
    assert sum(isinstance(m, bnfused.BatchNormReLUDropout2d) for m in fused_model.modules()) == (
        sites["bn_relu"] + sites["bn_relu6"])
    assert sum(s.act == "relu6" for s in report.fused) == sites["bn_relu6"]
    # every BatchNorm left is accounted for, with a reason
    left = [n for n, m in fused_model.named_modules() if type(m) is nn.BatchNorm2d]
    assert sorted(u.name for u in report.unfused) == sorted(left)
    assert all(u.reason for u in report.unfused)
    assert report.untraced == []
    assert isinstance(fused_model, type(model)) and type(fused_model).__name__ == type(model).__name__
    assert list(fused_model.state_dict()) == list(model.state_dict())


def test_full_size_site_counts():
    """The site table of the full-size models (structure only: no forward is run)."""
    expected = {"resnet18": 9 + 8, "resnet50": 33 + 16, "densenet121": 121, "vgg11_bn": 8,
                "mobilenet_v2": 35}  # BN -> ReLU6 in its Conv2dNormActivation layers
    for name, fused in expected.items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, report = bnfused.convert_with_report(tv.FULL[name]())
        assert report.num_fused == fused, name


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-10, atol=1e-10)),
                                       (torch.float32, dict(rtol=2e-4, atol=2e-4))], ids=["float64", "float32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", [m for m in MODELS if m != "mobilenet_v2"])  # MobileNetV2: nothing fused
def test_outputs_and_gradients_match(name, training, dtype, tol):
    model = build(name, dtype).train(training)
    fused_model, _ = converted(model)
    # 64x64: ResNet's last stage still sees 2x2 pixels (training-mode BN of 2 values per channel is
    # ill-conditioned: its gradient amplifies float32 rounding far beyond the fused op's)
    x = torch.randn(4, 3, 64, 64, dtype=dtype)
    outs = []
    for m in (model, fused_model):
        torch.manual_seed(5)  # the same mask for the models' own nn.Dropout layers (VGG, MobileNetV2 classifiers)
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    tv.assert_same_grads_and_state(fused_model, model, **tol)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_checkpoints_load_both_ways(name):
    model = build(name)
    fused_model, _ = converted(build(name, seed=1))
    fused_model.load_state_dict(model.state_dict())  # an old checkpoint
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fused_model.eval()(x), model.eval()(x))
    build(name, seed=2).load_state_dict(fused_model.state_dict())


def test_optimizer_and_parameter_hooks_survive_on_resnet():
    model, ref = build("resnet18"), build("resnet18")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    grads_seen = []
    model.layer1[0].bn1.weight.register_hook(grads_seen.append)
    bnfused.convert(model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for _ in range(2):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert len(grads_seen) == 2
    ref_state = ref.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-9, atol=1e-9, msg=key)


def test_rewritten_forward_keeps_class_attributes_pickle_and_deepcopy():
    model = build("resnet18").eval()
    fused_model, report = converted(model)
    block = fused_model.layer1[0]
    assert {s.rewritten for s in report.fused} == {None, "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                                  "layer3.1", "layer4.0", "layer4.1"}
    assert isinstance(block, tv.BasicBlock) and type(block).__name__ == "BasicBlock" and block.stride == 1
    assert type(fused_model.layer1[1]) is type(block)  # one generated class per distinct forward
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = model(x)
    buf = io.BytesIO()
    torch.save(fused_model, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(fused_model), torch.load(buf, weights_only=False)):
        assert isinstance(clone.layer1[0], tv.BasicBlock)
        torch.testing.assert_close(clone(x), expected)


def test_rewritten_forward_loads_in_a_fresh_process(tmp_path):
    """A saved rewritten model loads where bnfused has rewritten nothing yet: its forward is compiled again from the
    stored source and import statements (written by bnfused, no private torch.fx code), and tracebacks through it
    show its lines."""
    model = build("resnet18").eval()
    fused_model, _ = converted(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.save({"model": fused_model, "x": x, "y": model(x)}, tmp_path / "m.pt")
    code = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torchvision_like; "
            f"d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False); "
            "torch.testing.assert_close(d['model'](d['x']), d['y']); print(type(d['model'].layer1[0]).__mro__[1])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "torchvision_like.BasicBlock" in proc.stdout
    block = fused_model.layer1[0]
    with pytest.raises(RuntimeError) as info:
        block(torch.randn(2, 5, 8, 8, dtype=torch.float64))
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(f.filename.startswith("<bnfused rewritten forward") and f.line for f in frames)


def test_private_torch_fx_helpers_are_found():
    """convert() uses one private torch.fx name, guarded: the check fx inserts for a None argument, which it erases
    from the trace. If a torch release renamed it, forwards with None-default arguments would be reported untraced
    instead of rewritten: this test says so first."""
    from bnfused import _graph_sites
    assert _graph_sites._FX_ASSERT_IS_NONE is not None


def test_checkpoints_naming_the_old_module_path_load():
    """Checkpoints saved before convert()'s internals moved name bnfused.graph_sites in their pickle and in the
    stored forward's imports; both still resolve."""
    from bnfused import _rewritten_forward, graph_sites
    model = build("resnet18").eval()
    fused_model, _ = converted(model)
    base, src, imports = type(fused_model.layer1[0])._bnfused_rewritten
    old_imports = imports.replace("bnfused._rewritten_forward", "bnfused.graph_sites")
    clone = graph_sites._restore_rewritten(base, src + "\n# saved by an older bnfused\n", old_imports)
    clone.__dict__.update(fused_model.layer1[0].__dict__)
    channels = fused_model.layer1[0].conv1.in_channels
    x = torch.randn(2, channels, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(clone(x), fused_model.layer1[0](x))
    assert graph_sites.bn_add_relu_site is _rewritten_forward.bn_add_relu_site


def test_a_global_that_cannot_be_imported_leaves_the_module_unrewritten(monkeypatch):
    """The stored forward imports its globals by name; an object that cannot be imported so (a function defined
    inside another) is refused with a ValueError naming it, and convert() then keeps that module's forward and
    reports why, before anything in the model changes."""
    from bnfused import _rewritten_forward

    def local_fn(x):
        return x

    with pytest.raises(ValueError, match="'local_fn'.*cannot be imported by name"):
        _rewritten_forward.import_block({"local_fn": local_fn, "relu": F.relu})
    assert "from torch.nn.functional import relu as relu" in _rewritten_forward.import_block({"relu": F.relu})

    def refuse(globals_):
        raise ValueError("the traced forward uses 'local_fn' (function), which cannot be imported by name")

    monkeypatch.setattr(_rewritten_forward, "import_block", refuse)
    model = build("resnet18").eval()
    fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert all(s.rewritten is None for s in report.fused)  # the in-place swaps still happen
    assert type(fused_model.layer1[0]) is tv.BasicBlock and type(fused_model.layer1[0].bn2) is nn.BatchNorm2d
    reasons = {u.name: u.reason for u in report.unfused}
    assert "cannot be imported by name" in reasons["layer1.0.bn2"]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fused_model(x), model(x))


def test_relu6_sites_fused_and_nothing_to_fuse_warns():
    model = build("mobilenet_v2")
    _, report = bnfused.convert_with_report(model)
    assert report.num_fused == 35 and {s.act for s in report.fused} == {"relu6"} and len(report.unfused) == 17
    assert all("not (only) to an activation" in u.reason for u in report.unfused)  # block outputs, residual adds
    with pytest.warns(UserWarning, match="fused no BatchNorm -> activation site.*Sigmoid"):
        bnfused.convert(nn.Sequential(nn.BatchNorm2d(3), nn.Sigmoid()))
    with pytest.warns(UserWarning, match="no matching BatchNorm"):
        bnfused.convert(nn.Linear(2, 2))


# ---------------------------------------------------------------- spellings of ReLU and Dropout


class Spelled(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.3)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.how == "F.relu":
            y = F.relu(y)
        elif self.how == "F.relu_inplace":
            y = F.relu(y, inplace=True)
        elif self.how == "F.relu_":
            y = F.relu_(y)
        elif self.how == "torch.relu":
            y = torch.relu(y)
        elif self.how == "torch.relu_":
            y = torch.relu_(y)
        elif self.how == "method":
            y = y.relu()
        elif self.how == "method_":
            y = y.relu_()
        elif self.how == "module_dropout":
            y = self.drop(self.relu(y))
        elif self.how == "F.dropout":
            y = F.dropout(F.relu(y), 0.3, self.training)
        elif self.how == "F.dropout_always":  # training=True whatever the mode: not the fused module's dropout
            y = F.dropout(F.relu(y), 0.3)
        return self.conv(y)


@pytest.mark.parametrize("how,p,rewritten", [
    ("F.relu", 0.0, True), ("F.relu_inplace", 0.0, True), ("F.relu_", 0.0, True), ("torch.relu", 0.0, True),
    ("torch.relu_", 0.0, True), ("method", 0.0, True), ("method_", 0.0, True), ("module_dropout", 0.3, False),
    ("F.dropout", 0.3, True), ("F.dropout_always", 0.0, True)])
def test_relu_and_dropout_spellings(how, p, rewritten):
    torch.manual_seed(0)
    model = Spelled(how).double()
    fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert report.num_fused == 1, report.summary()
    site = report.fused[0]
    assert site.name == "bn" and site.p == pytest.approx(p) and (site.rewritten == "") == rewritten
    assert isinstance(fused_model.bn, bnfused.BatchNormReLUDropout2d) and fused_model.bn.p == pytest.approx(p)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for training in (True, False):
        model.train(training), fused_model.train(training)
        if p and training:  # the fused mask is Philox's, not torch's: values compared at p = 0 (test_modules)
            continue
        if how == "F.dropout_always":  # its dropout stays, drawing torch's mask: same seed, same mask
            torch.manual_seed(1)
            expected = model(x)
            torch.manual_seed(1)
            torch.testing.assert_close(fused_model(x), expected)
            continue
        torch.testing.assert_close(fused_model(x), model(x), rtol=1e-10, atol=1e-10)


def test_bn_output_with_another_user_is_not_fused():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(x)
            return torch.relu(y) + y

    with pytest.warns(UserWarning, match="fused no"):
        model, report = bnfused.convert_with_report(TwoUsers())
    assert type(model.bn) is nn.BatchNorm2d
    assert report.unfused[0].name == "bn" and "+" in report.unfused[0].reason


def test_mode_dependent_forward_is_not_rewritten():
    class ModeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = F.relu(self.bn(x))
            return y * 2 if self.training else y

    with pytest.warns(UserWarning, match="fused no"):
        model, report = bnfused.convert_with_report(ModeDependent())
    assert type(model.bn) is nn.BatchNorm2d and type(model) is ModeDependent
    assert "depends on self.training" in report.unfused[0].reason


def test_untraceable_module_falls_back_to_the_sequential_walk():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.block(x)
            if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                y = y + 1
            return F.relu(self.bn(y))

    with pytest.warns(UserWarning, match=r"could not trace the model \(DataDependent.forward\): TraceError"):
        model, report = bnfused.convert_with_report(DataDependent())
    assert type(model.block[0]) is bnfused.BatchNormReLUDropout2d and type(model.bn) is nn.BatchNorm2d
    assert [name for name, _ in report.untraced] == [""]


def test_cross_module_site_and_shared_relu():
    """A BN ending a child Sequential with the ReLU in the caller (DenseNet's norm5 -> F.relu), and a ReLU
    module called twice (ResNet's self.relu): both need the caller's forward rewritten."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
            self.bn = nn.BatchNorm2d(3)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.relu(self.features(x))))

    torch.manual_seed(0)
    model = Net().double()
    fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert [(s.name, s.relu, s.rewritten) for s in report.fused] == [("features.1", "relu", ""), ("bn", "relu", "")]
    assert type(fused_model.relu) is nn.ReLU  # still a module: forward no longer calls it
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(fused_model(x), model(x))


# ---------------------------------------------------------------- hooks


def test_forward_pre_hook_on_bn_is_carried_over():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    seen = []
    handle = model[1].register_forward_pre_hook(lambda mod, args: seen.append(type(mod).__name__))
    bnfused.convert(model)
    model(torch.randn(2, 3, 4, 4))
    assert seen == ["BatchNormActDropout2d"]  # BatchNormReLUDropout2d is the same class
    handle.remove()  # the user's handle still removes it
    model(torch.randn(2, 3, 4, 4))
    assert len(seen) == 1


@pytest.mark.parametrize("where", ["bn_forward_hook", "relu_pre_hook", "relu_forward_hook", "bn_backward_hook",
                                   "container_forward_hook"])
def test_hooks_that_would_change_meaning_leave_the_site_unfused(where):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.seq(x))

    net = Net()
    hook = lambda *args: None  # noqa: E731
    {"bn_forward_hook": lambda: net.seq[1].register_forward_hook(hook),
     "relu_pre_hook": lambda: net.relu.register_forward_pre_hook(hook),
     "relu_forward_hook": lambda: net.relu.register_forward_hook(hook),
     "bn_backward_hook": lambda: net.seq[1].register_full_backward_hook(hook),
     "container_forward_hook": lambda: net.seq.register_forward_hook(hook)}[where]()
    with pytest.warns(UserWarning, match="fused no"):
        _, report = bnfused.convert_with_report(net)
    assert type(net.seq[1]) is nn.BatchNorm2d and type(net.relu) is nn.ReLU
    assert report.unfused[0].name == "seq.1" and "hook" in report.unfused[0].reason


def test_sequential_with_forward_hook_on_bn_stays_unfused():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    model[0].register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="forward hook"):
        bnfused.convert(model)
    assert type(model[0]) is nn.BatchNorm2d


# ---------------------------------------------------------------- modes, devices, sync, TorchScript


def test_mode_requires_grad_and_sync():
    model = build("densenet121").eval()
    model.features.norm0.weight.requires_grad_(False)
    bnfused.convert_sync(model)
    assert all(not m.training for m in model.modules())
    assert isinstance(model.features.denseblock1.denselayer1.norm1, bnfused.SyncBatchNormReLUDropout)
    assert not model.features.norm0.weight.requires_grad


def test_torchscript_raises_a_clear_error():
    """TorchScript cannot compile the fused modules (autograd.Function, Python custom ops): scripting a converted
    model fails at once, naming the module, instead of on '_expected_dims'."""
    model, _ = converted(build("resnet18"))
    with pytest.raises(RuntimeError, match=r"torch.jit.script does not support bnfused.BatchNormActDropout2d.*"
                                           r"torch.compile or torch.export.*bnfused.unconvert"):
        torch.jit.script(model)
    torch.jit.script(bnfused.unconvert(model))  # the way back that the message names
    with pytest.raises(RuntimeError, match="does not support bnfused.SyncBatchNormReLUDropout"):
        torch.jit.script(bnfused.SyncBatchNormReLUDropout(3))


# ---------------------------------------------------------------- BN + residual add -> ReLU



@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_add_sites_are_fused(name):
    model = build(name)
    fused_model, report = converted(model)
    sites = tv.count_sites(model)
    assert report.num_fused == sites["bn_relu"] + sites["bn_add_relu"]
    adds = [s for s in report.fused if s.residual is not None]
    assert len(adds) == sites["bn_add_relu"] and {s.residual for s in adds} == {"x", "downsample"}
    assert sum(isinstance(m, bnfused.BatchNormAddReLU2d) for m in fused_model.modules()) == sites["bn_add_relu"]
    # what is left: the downsample BNs, the residual a fused block adds
    assert all("residual" in u.reason and "downsample" in u.name for u in report.unfused)


class AddSpelled(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.bn(self.conv(x))
        if self.how == "iadd":
            out += identity
            out = self.relu(out)
        elif self.how == "radd":
            out = F.relu(identity + out)
        elif self.how == "torch.add":
            out = torch.relu(torch.add(out, identity))
        elif self.how == "method_add_":
            out = out.add_(identity).relu_()
        elif self.how == "dropout":
            out = F.dropout(self.relu(out + identity), 0.2, self.training)
        return self.conv(out)


@pytest.mark.parametrize("how", ["iadd", "radd", "torch.add", "method_add_", "dropout"])
def test_add_spellings(how):
    torch.manual_seed(0)
    model = AddSpelled(how).double()
    fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert [(s.name, s.residual) for s in report.fused] == [("bn", "x")], report.summary()
    assert isinstance(fused_model.bn, bnfused.BatchNormAddReLU2d)
    assert fused_model.bn.p == pytest.approx(0.2 if how == "dropout" else 0.0)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    for training in ((False,) if how == "dropout" else (True, False)):
        model.train(training), fused_model.train(training)
        y_ref, y = model(x), fused_model(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        g_ref, = torch.autograd.grad(y_ref.sum(), x)
        g, = torch.autograd.grad(y.sum(), x)  # through the residual and the BN input both
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


class ResidualFromSite(nn.Module):
    """The residual is another site's output: h = relu(bn1(conv1(x))), then relu(bn2(conv2(h)) + h); with
    order="after", the add's BN is called before the site that makes its residual."""

    def __init__(self, order):
        super().__init__()
        self.order = order
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        if self.order == "after":
            out = self.bn2(self.conv2(x))
            return torch.relu(out + torch.relu(self.bn1(self.conv1(x))))
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + h)


@pytest.mark.parametrize("order", ["before", "after"])
def test_residual_that_is_another_fused_site(order):
    torch.manual_seed(0)
    model = ResidualFromSite(order).double()
    fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert sorted((s.name, s.residual) for s in report.fused) == [("bn1", None), ("bn2", "torch.relu")]
    assert type(fused_model.bn2) is bnfused.BatchNormAddReLU2d
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        model.train(training), fused_model.train(training)
        y_ref, y = model(x), fused_model(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        g_ref, = torch.autograd.grad(y_ref.sum(), x)
        g, = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_add_with_another_user_or_a_residual_written_in_place_is_not_fused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x):
            a = self.bn1(x)
            s = a + x
            b = x.clone().add_(self.bn2(x))  # writes the residual: not fused
            return torch.relu(s) + s + torch.relu(b)

    with pytest.warns(UserWarning, match="fused no"):
        model, report = bnfused.convert_with_report(Net())
    assert type(model.bn1) is nn.BatchNorm2d and type(model.bn2) is nn.BatchNorm2d


def test_converting_twice_changes_nothing_more():
    model, first = converted(build("resnet18"))
    classes = [type(m) for m in model.modules()]
    with pytest.warns(UserWarning, match="fused no"):
        _, second = bnfused.convert_with_report(model)
    assert second.num_fused == 0 and [type(m) for m in model.modules()] == classes
    assert {u.name for u in second.unfused} == {u.name for u in first.unfused}


def test_converted_on_the_device(device):
    model = build("resnet18", torch.float32).to(device)
    fused_model, report = converted(model)
    assert report.num_fused >= 9
    assert all(t.device.type == device.type for t in fused_model.state_dict().values())
    x = torch.randn(4, 3, 64, 64, device=device)
    for training in (True, False):
        model.train(training), fused_model.train(training)
        torch.testing.assert_close(fused_model(x), model(x), rtol=2e-4, atol=2e-4)
