"""Bad input raises PyTorch's error type with a clear message before any running statistic or num_batches_tracked
moves; NaN and inf propagate as they do through nn.BatchNormXd -> ReLU -> Dropout."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfused
from bnfused import _extension
from bnfused.testing import reference_bn_relu_dropout

C = 3
FUSED = {1: bnfused.BatchNormReLUDropout1d, 2: bnfused.BatchNormReLUDropout2d, 3: bnfused.BatchNormReLUDropout3d}
NN_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def other_device(device):
    """A device the input is not on (meta stands in for a second device on a CPU-only machine)."""
    if device.type == "cuda":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "meta"


def make_block(dim, device, **kwargs):
    block = FUSED[dim](C, device=device, **kwargs)
    with torch.no_grad():
        block.running_mean.normal_(0, 0.2)
        block.running_var.uniform_(0.5, 1.5)
        block.num_batches_tracked.fill_(4)
    return block


def state_of(block):
    return {k: v.clone() for k, v in block.state_dict().items()}


def assert_state_unchanged(block, before):
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a rejected input"


# ---- module inputs: (dim, make input, error type, message regex); nn.BatchNormXd raises the same type ----

MODULE_CASES = {
    "1d_got_4d": (1, lambda d: torch.randn(2, C, 3, 3, device=d), ValueError, r"expected 2D or 3D input \(got 4D"),
    "1d_got_1d": (1, lambda d: torch.randn(C, device=d), ValueError, r"expected 2D or 3D input \(got 1D"),
    "2d_got_3d": (2, lambda d: torch.randn(2, C, 3, device=d), ValueError, r"expected 4D input \(got 3D"),
    "2d_got_5d": (2, lambda d: torch.randn(2, C, 3, 3, 3, device=d), ValueError, r"expected 4D input \(got 5D"),
    "3d_got_4d": (3, lambda d: torch.randn(2, C, 3, 3, device=d), ValueError, r"expected 5D input \(got 4D"),
    "one_value_1d": (1, lambda d: torch.randn(1, C, device=d), ValueError,
                     "Expected more than 1 value per channel when training"),
    "one_value_2d": (2, lambda d: torch.randn(1, C, 1, 1, device=d), ValueError,
                     "Expected more than 1 value per channel when training"),
    "channels": (2, lambda d: torch.randn(2, C + 1, 3, 3, device=d), RuntimeError, f"should contain {C + 1} elements"),
    "int64": (2, lambda d: torch.ones(2, C, 3, 3, dtype=torch.int64, device=d), NotImplementedError,
              "not implemented for 'int64'"),
    "int32": (1, lambda d: torch.ones(4, C, dtype=torch.int32, device=d), NotImplementedError,
              "not implemented for 'int32'"),
    "bool": (2, lambda d: torch.ones(2, C, 3, 3, dtype=torch.bool, device=d), NotImplementedError,
             "not implemented for 'bool'"),
    "float64_input_float32_params": (2, lambda d: torch.randn(2, C, 3, 3, dtype=torch.float64, device=d),
                                     RuntimeError, "mixed dtype"),
}


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_bad_module_input(device, case):
    dim, make, error, regex = MODULE_CASES[case]
    x = make(device)
    block = make_block(dim, device)
    before = state_of(block)
    with pytest.raises(error, match=regex):
        block(x)
    assert_state_unchanged(block, before)
    if device.type == "cpu":  # PyTorch's type for the same input (its CUDA kernels word some checks differently)
        with pytest.raises(error):
            NN_BN[dim](C, device=device)(x)


def test_one_value_per_channel_is_fine_in_eval(device):
    block = make_block(2, device).eval()
    bn = nn.BatchNorm2d(C, device=device).eval()
    bn.load_state_dict(block.state_dict())
    x = torch.randn(1, C, 1, 1, device=device)
    torch.testing.assert_close(block(x), F.relu(bn(x)))


def test_wrong_channels_without_per_channel_tensors_is_accepted_like_pytorch(device):
    # affine=False, track_running_stats=False: nothing has a channel count, and PyTorch normalizes any C
    block = FUSED[2](C, affine=False, track_running_stats=False, p=0.0, device=device)
    bn = nn.BatchNorm2d(C, affine=False, track_running_stats=False, device=device)
    x = torch.randn(2, C + 2, 3, 3, device=device)
    torch.testing.assert_close(block(x), F.relu(bn(x)), rtol=1e-5, atol=1e-5)


# ---- module attributes made bad after construction are caught at forward, state untouched ----

@pytest.mark.parametrize("attr,value,error,regex", [
    ("p", 1.5, ValueError, "dropout probability has to be between 0 and 1, but got 1.5"),
    ("p", -0.1, ValueError, "dropout probability has to be between 0 and 1"),
    ("p", float("nan"), ValueError, "dropout probability has to be between 0 and 1"),
    ("eps", 0.0, ValueError, "eps must be positive"),
    ("eps", -1e-5, ValueError, "eps must be positive"),
    ("eps", float("inf"), ValueError, "eps must be positive"),
])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_attribute_at_forward(device, attr, value, error, regex, training):
    block = make_block(2, device).train(training)
    setattr(block, attr, value)
    before = state_of(block)
    with pytest.raises(error, match=regex):
        block(torch.randn(2, C, 3, 3, device=device))
    assert_state_unchanged(block, before)


@pytest.mark.parametrize("name,make,error,regex", [
    ("weight", lambda d: torch.ones(C + 1, device=d), RuntimeError, f"weight should contain {C} elements"),
    ("bias", lambda d: torch.zeros(C, 1, device=d), RuntimeError, f"bias should contain {C} elements"),
    ("running_mean", lambda d: torch.zeros(C - 1, device=d), RuntimeError, f"running_mean should contain {C}"),
    ("running_var", lambda d: torch.ones(C, dtype=torch.float64, device=d), RuntimeError, "mixed dtype"),
    ("weight", lambda d: torch.ones(C, dtype=torch.float64, device=d), RuntimeError, "mixed dtype"),
    ("bias", lambda d: torch.zeros(C, dtype=torch.int64, device=d), RuntimeError, "must be a floating-point tensor"),
    ("running_mean", lambda d: torch.zeros(C, device=other_device(d)), RuntimeError, "same device"),
    ("weight", lambda d: torch.ones(C, device=other_device(d)), RuntimeError, "same device"),
], ids=["weight_shape", "bias_2d", "mean_shape", "var_dtype", "weight_dtype", "bias_int", "mean_device",
        "weight_device"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_parameter_or_buffer(device, name, make, error, regex, training):
    block = make_block(2, device).train(training)
    bad = make(device)
    if name in ("weight", "bias"):
        setattr(block, name, nn.Parameter(bad, requires_grad=bad.is_floating_point()))
    else:
        setattr(block, name, bad)
    before = {k: v.clone() for k, v in state_of(block).items() if k != name}
    with pytest.raises(error, match=regex):
        block(torch.randn(2, C, 3, 3, device=device))
    for k, v in before.items():
        assert torch.equal(getattr(block, k), v), f"{k} changed by a rejected input"


# ---- constructor ----

@pytest.mark.parametrize("kwargs,regex", [
    (dict(p=-0.5), "dropout probability has to be between 0 and 1, but got -0.5"),
    (dict(p=1.01), "dropout probability has to be between 0 and 1"),
    (dict(eps=0.0), "eps must be positive"),
    (dict(eps=-1.0), "eps must be positive"),
])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_bad_constructor_arguments(dim, kwargs, regex):
    with pytest.raises(ValueError, match=regex):
        FUSED[dim](C, **kwargs)


# A non-number p / eps / momentum is a TypeError naming the argument (as PyTorch's argument parser raises for a
# float argument), not a ValueError quoting a value that looks right ("but got 0.5" for p='0.5'); bool is not a
# number here either. momentum=None stays valid for the modules (cumulative average).
NOT_NUMBERS = [("p", "0.5"), ("p", True), ("p", None), ("p", torch.tensor(0.5)), ("eps", "1e-5"), ("eps", None),
               ("eps", False), ("momentum", "0.1"), ("momentum", True), ("momentum", [0.1])]
NOT_NUMBER_IDS = [f"{name}={value!r}" for name, value in NOT_NUMBERS]


@pytest.mark.parametrize("name,value", NOT_NUMBERS, ids=NOT_NUMBER_IDS)
@pytest.mark.parametrize("cls", [*FUSED.values(), bnfused.SyncBatchNormReLUDropout],
                         ids=lambda c: c.__name__)
def test_constructor_argument_not_a_number(cls, name, value):
    with pytest.raises(TypeError, match=f"^{name} must be a float, got {type(value).__name__}$"):
        cls(C, **{name: value})


@pytest.mark.parametrize("name,value", NOT_NUMBERS, ids=NOT_NUMBER_IDS)
def test_functional_argument_not_a_number(device, name, value):
    x, rm, rv, w, b = _functional_args(device)
    kwargs = dict(training=True, momentum=0.1, eps=1e-5, p=0.5)
    kwargs[name] = value
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(TypeError, match=f"^{name} must be a float, got {type(value).__name__}$"):
        bnfused.bn_relu_dropout(x, rm, rv, w, b, **kwargs)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("name,value", [("p", "0.5"), ("eps", "1e-5"), ("momentum", True)])
def test_attribute_not_a_number_at_forward(device, name, value):
    block = make_block(2, device).train()
    setattr(block, name, value)
    before = state_of(block)
    with pytest.raises(TypeError, match=f"^{name} must be a float"):
        block(torch.randn(2, C, 3, 3, device=device))
    assert_state_unchanged(block, before)


@pytest.mark.parametrize("p", [0, 1, 0.25, np.float32(0.25), np.float64(0.25)], ids=repr)
def test_numbers_of_other_types_are_accepted(p):
    """ints and numpy scalars are numbers: accepted, as nn.Dropout accepts them."""
    block = FUSED[2](C, p=p, eps=np.float64(1e-5), momentum=np.float32(0.1))
    assert block.p == float(p)


# ---- functional ----

def _functional_args(device):
    x = torch.randn(2, C, 4, device=device)
    return x, torch.zeros(C, device=device), torch.ones(C, device=device), torch.ones(C, device=device), \
        torch.zeros(C, device=device)


@pytest.mark.parametrize("change,error,regex", [
    (dict(p=2.0), ValueError, "dropout probability has to be between 0 and 1"),
    (dict(eps=0.0), ValueError, "eps must be positive"),
    (dict(running_var=None), ValueError, "running_mean and running_var must either both be None or neither"),
    (dict(running_mean=None, running_var=None, training=False), RuntimeError,
     "running_mean must be defined in evaluation mode"),
    (dict(input="x"), TypeError, "input must be a Tensor"),
    (dict(input=torch.randn(5)), ValueError, "at least 2 dims"),
    (dict(input=torch.ones(2, C, dtype=torch.float64)), RuntimeError, "mixed dtype"),
    (dict(input=torch.ones(2, C, 4, dtype=torch.uint8)), NotImplementedError, "not implemented for 'uint8'"),
    (dict(input=torch.ones(1, C, 1)), ValueError, "Expected more than 1 value per channel when training"),
    (dict(weight=torch.ones(C + 1)), RuntimeError, f"weight should contain {C} elements not {C + 1}"),
    (dict(momentum="0.1"), TypeError, "momentum must be a float"),
    (dict(momentum=None, training=False), TypeError, "momentum must be a float, got NoneType"),  # as F.batch_norm
], ids=["p", "eps", "var_none", "eval_no_stats", "not_tensor", "1d", "dtype", "uint8", "one_value", "weight",
        "momentum", "momentum_none"])
def test_bad_functional_arguments(device, change, error, regex):
    x, rm, rv, w, b = _functional_args(device)
    kwargs = dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True, momentum=0.1,
                  eps=1e-5, p=0.5)
    for k, v in change.items():
        kwargs[k] = v.to(device) if isinstance(v, torch.Tensor) else v
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(error, match=regex):
        bnfused.bn_relu_dropout(**kwargs)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_cuda_input_on_cpu_only_build(monkeypatch):
    """A CUDA tensor reaching a build without CUDA kernels gets a clear RuntimeError before anything runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(_extension, "WITH_CUDA", False)  # what a CPU-only build reports
    with FakeTensorMode():  # CUDA-device tensors without a GPU
        x = torch.randn(2, C, 4, device="cuda")
        rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
        assert x.is_cuda
        with pytest.raises(RuntimeError, match="built without CUDA kernels"):
            bnfused.bn_relu_dropout(x, rm, rv, training=True, p=0.5)


@pytest.mark.skipif(not torch.cuda.is_available() or bnfused.WITH_CUDA, reason="needs a GPU and a CPU-only build")
def test_real_cuda_tensor_on_cpu_only_build():
    block = bnfused.BatchNormReLUDropout2d(C).cuda()
    with pytest.raises(RuntimeError, match="without CUDA kernels"):
        block(torch.randn(2, C, 3, 3, device="cuda"))
    assert block.num_batches_tracked.item() == 0
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        bnfused.ops.batch_stats(torch.randn(2, C, device="cuda"))


# ---- NaN / inf ----

def _with_non_finite(device):
    x = torch.randn(4, C, 4, 4, device=device)
    x[1, 0, 0, 0] = float("nan")
    x[2, 1, 2, 2] = float("inf")
    x[3, 2, 1, 1] = float("-inf")
    return x


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_nan_inf_propagate_like_pytorch(device, training, layout):
    x = _with_non_finite(device).contiguous(memory_format=layout).requires_grad_()
    block = FUSED[2](C, p=0.0, device=device).train(training)
    bn = nn.BatchNorm2d(C, device=device).train(training)
    xr = x.detach().clone().requires_grad_()
    y, y_ref = block(x), F.relu(bn(xr))
    torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=1e-5, atol=1e-5)
    # every running statistic is non-finite exactly where PyTorch's is (and test_inf_running_mean_value_like_pytorch for the value)
    assert torch.equal(block.running_mean.isfinite(), bn.running_mean.isfinite())
    assert torch.equal(block.running_var.isfinite(), bn.running_var.isfinite())
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.equal(x.grad.isnan(), xr.grad.isnan())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_inf_through_dropout(device, training):
    # dropped elements stay NaN (NaN * 0), as nn.Dropout's input * mask / (1 - p) does
    x = _with_non_finite(device)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    key = torch.tensor([21, 0], device=device)
    y = bnfused.bn_relu_dropout(x, rm.clone(), rv.clone(), None, None, training, 0.1, 1e-5, 0.5, seed=21,
                                dropout_training=True)
    y_ref = reference_bn_relu_dropout(x, rm.clone(), rv.clone(), None, None, training, 0.1, 1e-5, 0.5, key=key,
                                      dropout_training=True)
    torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert torch.equal(F.dropout(torch.full((8,), float("nan")), 0.5).isnan(), torch.ones(8, dtype=torch.bool))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_inf_running_mean_value_like_pytorch(device, layout):
    # An infinite value merged first into a channel's Welford triple must give +-inf, not inf - inf = nan.
    x = torch.randn(4, C, 4, 4, device=device)
    x[0, 1, 0, 0] = float("inf")  # first plane of channel 1: merged first
    x[0, 2, 0, 0] = float("-inf")
    x = x.contiguous(memory_format=layout)
    block = FUSED[2](C, p=0.0, device=device)
    bn = nn.BatchNorm2d(C, device=device)
    block(x)
    bn(x)
    torch.testing.assert_close(block.running_mean, bn.running_mean, equal_nan=True)


def test_zero_channels_with_running_stats_does_not_kill_the_process(device):
    # The element count per channel was numel / C: an integer division by zero (SIGFPE) for C == 0. Run in a
    # subprocess so the old crash fails this test instead of ending the test run.
    code = (
        "import torch, bnfused\n"
        f"d = torch.device({str(device)!r})\n"
        "rm, rv = torch.empty(0, device=d), torch.empty(0, device=d)\n"
        "mean, rstd = torch.ops.bnfused.batch_stats_update(torch.empty(2, 0, 3, 3, device=d), rm, rv, 0.1, 1e-5)\n"
        "assert mean.shape == (0,) and rstd.shape == (0,), (mean.shape, rstd.shape)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
