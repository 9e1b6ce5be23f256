"""bnfused.convert() with every activation bnfused fuses: modules in nn.Sequential chains and in forward() code,
functional and in-place spellings with their parameters, the block tail (identity/ReLU/Hardtanh only), identity
layers between the BN and its activation, timm's BatchNormAct2d and activation classes, convert_sync, unconvert.
Outputs and gradients against the unconverted model in float64 (CPU kernels), train and eval."""
import copy
import functools
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfused
import real_models
from test_convert_zoo import check_same
from bnfused import Activation

TOL = dict(rtol=1e-10, atol=1e-10)

# torch.nn activation modules -> what convert() fuses them as (str(Activation))
MODULES = {
    "ReLU": (lambda: nn.ReLU(inplace=True), "relu"),
    "ReLU6": (lambda: nn.ReLU6(), "relu6"),
    "Hardtanh": (lambda: nn.Hardtanh(-0.5, 2.0), "hardtanh(-0.5, 2)"),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.2, inplace=True), "leaky_relu(0.2)"),
    "SiLU": (lambda: nn.SiLU(inplace=True), "silu"),
    "Hardswish": (lambda: nn.Hardswish(), "hardswish"),
    "GELU": (lambda: nn.GELU(), "gelu"),
    "GELU_tanh": (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"),
    "ELU": (lambda: nn.ELU(0.5), "elu(0.5)"),
    "Mish": (lambda: nn.Mish(), "mish"),
}


def randomized(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model.double()


def convert(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither "could not trace" nor "fused nothing"
        return bnfused.convert_with_report(model, **kwargs)


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("dropout", [False, True])
def test_sequential_chain_with_every_activation(name, dropout):
    make, act = MODULES[name]
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), make()] + ([nn.Dropout(0.25)] if dropout else []) + [
        nn.Conv2d(4, 2, 1)]
    model = randomized(nn.Sequential(*layers))
    fused_model, report = convert(copy.deepcopy(model))
    assert type(fused_model[1]) is bnfused.BatchNormActDropout2d and str(fused_model[1].activation) == act
    assert fused_model[1].p == (0.25 if dropout else 0.0)
    assert [(s.name, s.relu, s.act) for s in report.fused] == [("1", "2", act)]
    assert list(fused_model.state_dict()) == list(model.state_dict())
    check_same(model, fused_model, torch.randn(2, 3, 6, 5, dtype=torch.float64), modes=(False,) if dropout else (
        True, False))
    back = bnfused.unconvert(fused_model)
    assert [type(m) for m in back] == [type(m) for m in model]
    assert back[2] is fused_model[2] and str(bnfused.resolve_activation(back[2])) == act


class Functional(nn.Module):
    """conv -> bn -> an activation written in forward() code -> conv."""

    def __init__(self, act, dims=2):
        super().__init__()
        conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d),
                    3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        self.conv, self.bn, self.out = conv(3, 4, 3), bn(4), conv(4, 2, 1)
        self.act = act

    def forward(self, x):
        return self.out(self.act(self.bn(self.conv(x))))


# how forward() code spells an activation -> what convert() fuses it as
FUNCTIONALS = {
    "F.relu": (F.relu, "relu"), "F.relu_inplace": (functools.partial(F.relu, inplace=True), "relu"),
    "F.relu_": (F.relu_, "relu"), "torch.relu": (torch.relu, "relu"), "Tensor.relu_": (lambda x: x.relu_(), "relu"),
    "F.relu6": (F.relu6, "relu6"), "F.relu6_inplace": (lambda x: F.relu6(x, inplace=True), "relu6"),
    "F.hardtanh": (lambda x: F.hardtanh(x, -2.0, 0.5), "hardtanh(-2, 0.5)"),
    "F.hardtanh_": (lambda x: F.hardtanh_(x, max_val=0.5), "hardtanh(-1, 0.5)"),
    "F.leaky_relu": (lambda x: F.leaky_relu(x, 0.3), "leaky_relu(0.3)"),
    "F.leaky_relu_default": (F.leaky_relu, "leaky_relu(0.01)"),
    "F.leaky_relu_": (lambda x: F.leaky_relu_(x, negative_slope=0.1), "leaky_relu(0.1)"),
    "F.silu": (F.silu, "silu"), "F.silu_inplace": (lambda x: F.silu(x, inplace=True), "silu"),
    "F.hardswish": (F.hardswish, "hardswish"),
    "F.gelu": (F.gelu, "gelu"), "F.gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
    "F.elu": (lambda x: F.elu(x, alpha=0.7), "elu(0.7)"), "F.elu_": (F.elu_, "elu(1)"),
    "F.mish": (F.mish, "mish"),
}


@pytest.mark.parametrize("spelling", list(FUNCTIONALS))
def test_functional_spellings_are_fused(spelling):
    fn, act = FUNCTIONALS[spelling]
    torch.manual_seed(0)
    model = randomized(Functional(fn))
    fused_model, report = convert(copy.deepcopy(model))
    assert type(fused_model.bn) is bnfused.BatchNormActDropout2d and str(fused_model.bn.activation) == act
    assert [(s.name, s.act, s.rewritten) for s in report.fused] == [("bn", act, "")]
    check_same(model, fused_model, torch.randn(2, 3, 6, 5, dtype=torch.float64))
    bnfused.unconvert(fused_model)
    assert type(fused_model) is Functional and type(fused_model.bn) is nn.BatchNorm2d


@pytest.mark.parametrize("dims", [1, 3])
def test_module_activation_in_forward_code_other_dims(dims):
    torch.manual_seed(0)
    model = randomized(Functional(nn.Hardswish(), dims))
    fused_model, report = convert(copy.deepcopy(model))
    assert type(fused_model.bn) is {1: bnfused.BatchNormActDropout1d, 3: bnfused.BatchNormActDropout3d}[dims]
    assert type(fused_model.act) is nn.Identity and report.fused[0].rewritten is None  # swapped in place
    check_same(model, fused_model, torch.randn(2, 3, *([6, 5, 4][:dims]), dtype=torch.float64))


@pytest.mark.parametrize("act", [torch.sigmoid, F.celu, F.selu, torch.tanh, nn.PReLU(), nn.Sigmoid(), nn.Softplus()],
                         ids=["sigmoid", "celu", "selu", "tanh", "prelu", "Sigmoid", "Softplus"])
def test_other_activations_stay_unfused_with_a_reason(act):
    model = randomized(Functional(act))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert report.num_fused == 0 and type(fused_model.bn) is nn.BatchNorm2d
    assert [u.name for u in report.unfused] == ["bn"] and "not (only) to an activation" in report.unfused[0].reason


class Tail(nn.Module):
    """A residual block's tail: act(bn(conv(x)) + x), with optional identity layers between bn and the add."""

    def __init__(self, act, between=()):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.between = nn.ModuleList(between)
        self.act = act

    def forward(self, x):
        out = self.bn(self.conv(x))
        for m in self.between:
            out = m(out)
        out += x
        return self.act(out)


@pytest.mark.parametrize("name", ["ReLU", "ReLU6", "Hardtanh"])
def test_block_tail_fused_for_gate_activations(name):
    make, act = MODULES[name]
    torch.manual_seed(0)
    model = randomized(Tail(make()))
    fused_model, report = convert(copy.deepcopy(model))
    assert type(fused_model.bn) is bnfused.BatchNormAddAct2d and str(fused_model.bn.activation) == act
    assert [(s.residual, s.act) for s in report.fused] == [("x", act)]
    check_same(model, fused_model, torch.randn(2, 4, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("name", ["SiLU", "LeakyReLU", "GELU", "Hardswish"])
def test_block_tail_left_for_other_activations(name):
    make, act = MODULES[name]
    model = randomized(Tail(make()))
    with pytest.warns(UserWarning, match="fused no BatchNorm"):
        fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert type(fused_model.bn) is nn.BatchNorm2d
    assert "block tail is fused for identity, ReLU and Hardtanh/ReLU6 only" in report.unfused[0].reason
    assert act in report.unfused[0].reason


def drop_path(rate):
    """timm's DropPath (the identity at rate 0), or None without timm."""
    timm = real_models.timm()
    return None if timm is None else timm.layers.DropPath(rate)


def test_identity_layers_between_bn_and_the_add_are_passed():
    torch.manual_seed(0)
    between = [nn.Identity(), nn.Dropout(0.0)] + ([drop_path(0.0)] if drop_path(0.0) is not None else [])
    model = randomized(Tail(nn.ReLU(inplace=True), between))
    fused_model, report = convert(copy.deepcopy(model))
    assert type(fused_model.bn) is bnfused.BatchNormAddAct2d and report.fused[0].residual == "x"
    check_same(model, fused_model, torch.randn(2, 4, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("between", [nn.Dropout(0.1), nn.Sigmoid()], ids=["dropout", "sigmoid"])
def test_other_layers_between_bn_and_the_add_stop_the_site(between):
    model = randomized(Tail(nn.ReLU(), [between]))
    with pytest.warns(UserWarning, match="fused no BatchNorm"):
        fused_model, _ = bnfused.convert_with_report(copy.deepcopy(model))
    assert type(fused_model.bn) is nn.BatchNorm2d


def test_drop_path_with_a_rate_stops_the_site():
    if drop_path(0.1) is None:
        pytest.skip("timm is not installed")
    model = randomized(Tail(nn.ReLU(), [drop_path(0.1)]))
    with pytest.warns(UserWarning, match="fused no BatchNorm"):
        fused_model, _ = bnfused.convert_with_report(copy.deepcopy(model))
    assert type(fused_model.bn) is nn.BatchNorm2d


class DropBlockBetween(nn.Module):
    """timm's ResNet block: bn2 -> drop_block (nn.Identity at rate 0) -> act2, each called once."""

    def __init__(self, act):
        super().__init__()
        self.conv, self.bn, self.drop_block, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Identity(), act

    def forward(self, x):
        return self.act(self.drop_block(self.bn(self.conv(x))))


@pytest.mark.parametrize("name", ["ReLU", "SiLU"])
def test_identity_between_bn_and_activation_is_passed(name):
    make, act = MODULES[name]
    model = randomized(DropBlockBetween(make()))
    fused_model, report = convert(copy.deepcopy(model))
    assert type(fused_model.bn) is bnfused.BatchNormActDropout2d and type(fused_model.act) is nn.Identity
    assert type(fused_model.drop_block) is nn.Identity and report.fused[0].act == act
    check_same(model, fused_model, torch.randn(2, 3, 6, 5, dtype=torch.float64))
    hooked = randomized(DropBlockBetween(make()))
    hooked.drop_block.register_forward_hook(lambda *args: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = bnfused.convert_with_report(hooked)
    assert report.num_fused == 0 and "the Identity after it has a forward hook" in report.unfused[0].reason


def test_convert_sync_keeps_the_activation():
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.2)))
    fused_model, report = convert(copy.deepcopy(model), sync=True)
    assert type(fused_model[1]) is bnfused.SyncBatchNormActDropout
    assert str(fused_model[1].activation) == "leaky_relu(0.2)"
    check_same(model, fused_model, torch.randn(2, 3, 6, 5, dtype=torch.float64), modes=(False,))
    tail = randomized(Tail(nn.ReLU6()))
    fused_tail, _ = convert(copy.deepcopy(tail), sync=True)
    assert type(fused_tail.bn) is bnfused.SyncBatchNormAddAct and str(fused_tail.bn.activation) == "relu6"
    bnfused.unconvert(fused_model)
    assert [type(m) for m in fused_model] == [nn.Conv2d, nn.SyncBatchNorm, nn.LeakyReLU]


def test_unconvert_of_modules_built_directly_gives_their_activation():
    block = bnfused.BatchNormActDropout2d(4, p=0.1, act="leaky_relu", act_kwargs=dict(negative_slope=0.3))
    seq = bnfused.unconvert(block)
    assert [type(m) for m in seq] == [nn.BatchNorm2d, nn.LeakyReLU, nn.Dropout] and seq[1].negative_slope == 0.3
    assert [type(m) for m in bnfused.unconvert(bnfused.BatchNormActDropout1d(4, p=0.0, act=None))] == [
        nn.BatchNorm1d]


# ---------------------------------------------------------------- timm's BatchNormAct2d and activation classes


@pytest.fixture(scope="module")
def timm():
    lib = real_models.timm()
    if lib is None:
        pytest.skip("timm is not installed")
    return lib


class ConvNormAct(nn.Module):
    def __init__(self, norm_act):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), norm_act

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("act_layer,act", [("relu", "relu"), ("swish", "silu"), ("hard_swish", "hardswish"),
                                           ("gelu", "gelu"), ("gelu_tanh", "gelu_tanh"), ("mish", "mish"),
                                           ("leaky_relu", "leaky_relu(0.01)"), ("relu6", "relu6")])
def test_timm_batchnormact2d(timm, act_layer, act):
    torch.manual_seed(0)
    model = randomized(ConvNormAct(timm.layers.BatchNormAct2d(4, act_layer=act_layer)))
    original, keys = model.bn, list(model.state_dict())
    fused_model, report = convert(model)
    assert type(fused_model.bn) is bnfused.BatchNormActDropout2d and str(fused_model.bn.activation) == act
    assert fused_model.bn.weight is original.weight and fused_model.bn.running_var is original.running_var
    assert [(s.name, s.relu, s.act) for s in report.fused] == [("bn", "bn.act", act)]
    assert list(fused_model.state_dict()) == keys
    reference = randomized(ConvNormAct(timm.layers.BatchNormAct2d(4, act_layer=act_layer)))
    reference.load_state_dict(fused_model.state_dict())
    check_same(reference, fused_model, torch.randn(2, 3, 6, 5, dtype=torch.float64))
    buffer = io.BytesIO()  # pickled with the timm module it holds for unconvert()
    torch.save(fused_model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    check_same(reference, loaded, torch.randn(2, 3, 6, 5, dtype=torch.float64), modes=(False,))
    assert type(bnfused.unconvert(loaded).bn) is type(original)
    bnfused.unconvert(fused_model)
    assert fused_model.bn is original


def test_timm_activation_classes_resolve(timm):
    acts = timm.layers.activations
    assert [str(bnfused.resolve_activation(m)) for m in (acts.Swish(), acts.Mish(), acts.HardSwish(), acts.GELU(),
                                                         acts.GELUTanh())] == [
        "silu", "mish", "hardswish", "gelu", "gelu_tanh"]
    with pytest.raises(ValueError, match="unsupported activation module"):
        bnfused.resolve_activation(acts.HardSigmoid())
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), acts.Swish()))
    fused_model, _ = convert(copy.deepcopy(model))
    assert str(fused_model[1].activation) == "silu"
    check_same(model, fused_model, torch.randn(2, 3, 6, 5, dtype=torch.float64))


@pytest.mark.parametrize("drop,fused", [(None, True), (functools.partial(nn.Dropout, 0.0), True),
                                        (functools.partial(nn.Dropout, 0.1), False)], ids=["none", "p0", "p0.1"])
def test_timm_batchnormact2d_drop_before_the_activation(timm, drop, fused):
    model = randomized(ConvNormAct(timm.layers.BatchNormAct2d(4, act_layer="silu", drop_layer=drop)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused_model, report = bnfused.convert_with_report(copy.deepcopy(model))
    assert (type(fused_model.bn) is bnfused.BatchNormActDropout2d) is fused
    if not fused:
        assert "drop layer (Dropout) runs before its activation" in report.unfused[0].reason
    else:
        check_same(model, fused_model, torch.randn(2, 3, 6, 5, dtype=torch.float64))


def test_timm_batchnormact2d_left_with_reasons(timm):
    model = nn.Sequential(timm.layers.BatchNormAct2d(4, apply_act=False),
                          timm.layers.BatchNormAct2d(4, act_layer="sigmoid"),
                          timm.layers.BatchNormAct2d(4, act_layer="silu"))
    model[2].register_forward_hook(lambda *args: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = bnfused.convert_with_report(model)
    reasons = {u.name: u.reason for u in report.unfused}
    assert report.num_fused == 0 and set(reasons) == {"0", "1", "2"}
    assert "followed by BatchNormAct2d in the nn.Sequential, not an activation" in reasons["0"]  # a plain BN
    assert "Sigmoid" in reasons["1"] and "forward hook" in reasons["2"]


def test_timm_convert_sync_keeps_the_activation(timm):
    model = randomized(ConvNormAct(timm.layers.BatchNormAct2d(4, act_layer="hard_swish")))
    fused_model, _ = convert(copy.deepcopy(model), sync=True)
    assert type(fused_model.bn) is bnfused.SyncBatchNormActDropout
    assert str(fused_model.bn.activation) == "hardswish"
    check_same(model, fused_model, torch.randn(2, 3, 6, 5, dtype=torch.float64), modes=(False,))
    # timm's own SyncBatchNormAct (what timm.layers.convert_sync_batchnorm makes) too
    synced = timm.layers.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(synced.bn).__name__ == "SyncBatchNormAct"
    fused_synced, _ = convert(synced, sync=True)
    assert type(fused_synced.bn) is bnfused.SyncBatchNormActDropout
    assert str(fused_synced.bn.activation) == "hardswish"
    # unconvert keeps synchronising: timm's SyncBatchNormAct with the activation, for both
    for m in (fused_model, fused_synced):
        weight = m.bn.weight
        bnfused.unconvert(m)
        assert type(m.bn).__name__ == "SyncBatchNormAct" and type(m.bn.act) is nn.Hardswish
        assert m.bn.weight is weight
    check_same(model, fused_model, torch.randn(2, 3, 6, 5, dtype=torch.float64), modes=(False,))


# ---------------------------------------------------------------- a BN ending a module whose forward is a chain


class ChainBlock(nn.Module):
    """conv -> bn in a forward of its own (as timm's ConvNormAct), its caller applying the add and activation."""

    def __init__(self, channels, branch_on_mode=False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.branch_on_mode = branch_on_mode

    def forward(self, x):
        x = self.bn(self.conv(x))
        return x * 2 if self.branch_on_mode and self.training else x


class ChainCaller(nn.Module):
    def __init__(self, act, residual, branch_on_mode=False):
        super().__init__()
        self.block, self.act, self.residual = ChainBlock(4, branch_on_mode), act, residual

    def forward(self, x):
        out = self.block(x)
        return self.act(out + x if self.residual else out)


@pytest.mark.parametrize("residual", [False, True], ids=["act", "add_act"])
def test_bn_ending_a_chain_module_is_fused(residual):
    torch.manual_seed(0)
    model = randomized(ChainCaller(nn.ReLU6(), residual))
    fused_model, report = convert(copy.deepcopy(model))
    assert type(fused_model.block.bn) is (bnfused.BatchNormAddAct2d if residual else bnfused.BatchNormActDropout2d)
    assert [(s.name, s.act, s.residual) for s in report.fused] == [("block.bn", "relu6", "x" if residual else None)]
    check_same(model, fused_model, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    bnfused.unconvert(fused_model)
    assert type(fused_model.block.bn) is nn.BatchNorm2d and type(fused_model.act) is nn.ReLU6
    check_same(model, fused_model, torch.randn(2, 4, 5, 5, dtype=torch.float64))


def test_a_forward_that_reads_the_mode_is_no_chain():
    model = randomized(ChainCaller(nn.ReLU(), True, branch_on_mode=True))
    with pytest.warns(UserWarning, match="fused no BatchNorm"):
        fused_model, _ = bnfused.convert_with_report(copy.deepcopy(model))
    assert type(fused_model.block.bn) is nn.BatchNorm2d


def test_timm_conv_norm_act_in_a_block_tail(timm):
    """timm's RegNet Bottleneck: conv3 (ConvNormAct, apply_act=False) + shortcut -> act3."""
    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv3 = timm.layers.ConvNormAct(4, 4, 1, apply_act=False)
            self.drop_path = nn.Identity()
            self.act3 = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act3(self.drop_path(self.conv3(x)) + x)

    torch.manual_seed(0)
    model = randomized(Tail())
    original = model.conv3.bn
    fused_model, report = convert(model)
    assert type(fused_model.conv3.bn) is bnfused.BatchNormAddAct2d and report.fused[0].name == "conv3.bn"
    reference = randomized(Tail())
    reference.load_state_dict(fused_model.state_dict())
    check_same(reference, fused_model, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    bnfused.unconvert(fused_model)
    assert fused_model.conv3.bn is original


@pytest.mark.parametrize("residual", [False, True], ids=["act", "tail"])
def test_converted_model_on_the_device(device, residual):
    """Every kernel backend fuses every activation: a converted float32 model with SiLU, LeakyReLU and a ReLU6 tail
    computes what the unconverted one does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                          nn.LeakyReLU(0.2), Tail(nn.ReLU6()) if residual else nn.Identity())
    model = randomized(model).float().to(device)
    fused_model, report = convert(copy.deepcopy(model))
    assert [s.act for s in report.fused] == ["silu", "leaky_relu(0.2)"] + (["relu6"] if residual else [])
    x = torch.randn(2, 3, 9, 8, device=device)
    for training in (True, False):
        model.train(training), fused_model.train(training)
        results = []
        for m in (model, fused_model):
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.mul(torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
            results.append((y, xi.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)
