"""bnfused.bn_relu_dropout against bnfused.testing.reference_bn_relu_dropout (F.batch_norm -> relu -> the same
Philox mask) and against F.batch_norm -> F.relu -> F.dropout: arguments, running-stat updates, keys."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnfused
from bnfused import ops
from bnfused.testing import reference_bn_relu_dropout
from helpers import GRAD_TOL, TOL, leaf, make_input, rng_state
from helpers import make_params as _make_params

C = 4


def make_params(device, acc, affine=True):
    return _make_params(C, device, acc, affine)


CASES = [((6, C), "contiguous"), ((3, C, 5), "noncontig"), ((2, C, 3, 5), "contiguous"),
         ((2, C, 3, 5), "channels_last"), ((2, C, 2, 3, 3), "channels_last"), ((2, C, 2, 3, 3), "noncontig")]


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_matches_reference(device, shape, layout, dtype, training, p):
    acc = ops.acc_dtype(dtype)
    w, b, rm, rv = make_params(device, acc)
    x = make_input(shape, layout, dtype, device).requires_grad_()
    rm_f, rv_f = rm.clone(), rv.clone()
    y = bnfused.bn_relu_dropout(x, rm_f, rv_f, w, b, training, 0.2, 1e-4, p, seed=1234)
    assert y.dtype == dtype and y.shape == x.shape
    # float64 reference from the same input and the same key (seed, 0)
    xr, wr, br = leaf(x, torch.float64), leaf(w, torch.float64), leaf(b, torch.float64)
    rm_r, rv_r = rm.double(), rv.double()
    yr = reference_bn_relu_dropout(xr, rm_r, rv_r, wr, br, training, 0.2, 1e-4, p,
                                   key=torch.tensor([1234, 0], device=device))
    torch.testing.assert_close(y.double(), yr, **TOL[dtype])
    stat_tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    torch.testing.assert_close(rm_f.double(), rm_r, **stat_tol)
    torch.testing.assert_close(rv_f.double(), rv_r, **stat_tol)
    if not training:
        assert torch.equal(rm_f, rm) and torch.equal(rv_f, rv)
    dy = torch.randn(shape, device=device).to(dtype)
    y.backward(dy)
    yr.backward(dy.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, **GRAD_TOL[dtype])
    torch.testing.assert_close(w.grad.double(), wr.grad, **GRAD_TOL[dtype])
    torch.testing.assert_close(b.grad.double(), br.grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_running", [True, False])
def test_matches_torch_functional_chain(device, training, with_running):
    """p = 0 (and eval) equal F.batch_norm -> F.relu -> F.dropout; with p > 0 in training they agree in law."""
    if not training and not with_running:
        pytest.skip("eval needs running statistics (tested in test_bad_inputs)")
    w, b, rm, rv = make_params(device, torch.float32)
    x = make_input((3, C, 4, 5), "contiguous", torch.float32, device)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    running = (rm1, rv1) if with_running else (None, None)
    y = bnfused.bn_relu_dropout(x, *running, w, b, training, 0.1, 1e-5, 0.0)
    ref_running = (rm2, rv2) if with_running else (None, None)
    bn_relu = F.relu(F.batch_norm(x, *ref_running, w, b, training, 0.1, 1e-5))
    torch.testing.assert_close(y, F.dropout(bn_relu, 0.0, training), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm1, rm2)
    torch.testing.assert_close(rv1, rv2)
    if training:
        y = bnfused.bn_relu_dropout(x, None, None, w, b, True, 0.1, 1e-5, 0.25)
        kept = y != 0
        no_stats = F.relu(F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5))
        torch.testing.assert_close(y[kept], no_stats[kept] / 0.75, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
def test_running_update_momentum(device, momentum):
    x = make_input((5, C, 7), "contiguous", torch.float64, device)
    _, _, rm, rv = make_params(device, torch.float64)
    rm0, rv0 = rm.clone(), rv.clone()
    bnfused.bn_relu_dropout(x, rm, rv, None, None, True, momentum, 1e-5, 0.5)
    var, mean = torch.var_mean(x, dim=[0, 2], unbiased=True)  # running_var takes the unbiased variance
    torch.testing.assert_close(rm, (1 - momentum) * rm0 + momentum * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, (1 - momentum) * rv0 + momentum * var, rtol=1e-12, atol=1e-12)


def test_training_without_running_stats_uses_batch_stats(device):
    x = make_input((4, C, 6), "contiguous", torch.float64, device)
    y = bnfused.bn_relu_dropout(x, None, None, training=True, p=0.0)
    torch.testing.assert_close(y, F.relu(F.batch_norm(x, None, None, training=True)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight,bias", [(True, False), (False, True)])
def test_weight_or_bias_alone(device, weight, bias):
    w, b, rm, rv = make_params(device, torch.float64)
    w, b = (w if weight else None), (b if bias else None)
    x = make_input((3, C, 5), "contiguous", torch.float64, device).requires_grad_()
    y = bnfused.bn_relu_dropout(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 0.5, seed=9)
    xr = leaf(x)
    wr, br = leaf(w), leaf(b)
    yr = reference_bn_relu_dropout(xr, rm.clone(), rv.clone(), wr, br, True, 0.1, 1e-5, 0.5,
                                   key=torch.tensor([9, 0], device=device))
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    y.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-9)
    for fused_p, ref_p in ((w, wr), (b, br)):
        if fused_p is not None:
            torch.testing.assert_close(fused_p.grad, ref_p.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_dtype_params_in_input_dtype(device, dtype):
    """Reduced-precision input accepts weight/bias in its own dtype as well as in float32 (running stats float32)."""
    w, b, rm, rv = make_params(device, torch.float32)
    x = make_input((2, C, 3, 4), "contiguous", dtype, device)
    y32 = bnfused.bn_relu_dropout(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5, 0.0)
    y_low = bnfused.bn_relu_dropout(x, rm.clone(), rv.clone(), w.to(dtype), b.to(dtype), True, 0.1, 1e-5, 0.0)
    yr = F.relu(F.batch_norm(x.double(), None, None, w.to(dtype).double(), b.to(dtype).double(), True))
    torch.testing.assert_close(y_low.double(), yr, **TOL[dtype])
    torch.testing.assert_close(y32.double(), y_low.double(), **TOL[dtype])


def test_dropout_training_decoupled_from_batch_stats(device):
    w, b, rm, rv = make_params(device, torch.float64)
    x = make_input((3, C, 6), "contiguous", torch.float64, device)
    key = torch.tensor([5, 0], device=device)
    # running statistics (eval BN) with dropout on, as a module in eval with an MC-dropout flag would want
    y = bnfused.bn_relu_dropout(x, rm, rv, w, b, False, 0.1, 1e-5, 0.5, seed=5, dropout_training=True)
    yr = reference_bn_relu_dropout(x, rm, rv, w, b, False, 0.1, 1e-5, 0.5, key=key, dropout_training=True)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    assert (y == 0).sum() > (F.relu(F.batch_norm(x, rm, rv, w, b, False)) == 0).sum()  # dropout did act
    # batch statistics without dropout
    y = bnfused.bn_relu_dropout(x, None, None, w, b, True, 0.1, 1e-5, 0.5, dropout_training=False)
    torch.testing.assert_close(y, F.relu(F.batch_norm(x, None, None, w, b, True)), rtol=1e-12, atol=1e-12)


def test_key_sources(device):
    x = make_input((2, C, 8, 8), "contiguous", torch.float32, device)
    # seed= gives key (seed, 0); the same seed gives the same output, a different one another output
    y1 = bnfused.bn_relu_dropout(x, None, None, training=True, p=0.5, seed=42)
    y2 = bnfused.bn_relu_dropout(x, None, None, training=True, p=0.5, seed=42)
    y3 = bnfused.bn_relu_dropout(x, None, None, training=True, p=0.5, seed=43)
    yr = reference_bn_relu_dropout(x, None, None, training=True, p=0.5, key=torch.tensor([42, 0]))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    torch.testing.assert_close(y1, yr)
    # seeds up to 2**64 - 1 are reinterpreted as int64
    y_big = bnfused.bn_relu_dropout(x, None, None, training=True, p=0.5, seed=2**64 - 1)
    torch.testing.assert_close(y_big, reference_bn_relu_dropout(x, None, None, training=True, p=0.5,
                                                                key=torch.tensor([-1, 0])))
    with pytest.raises(ValueError, match="seed must fit in 64 bits"):
        bnfused.bn_relu_dropout(x, None, None, training=True, p=0.5, seed=2**64)
    # generator=: the key is drawn from it, so a generator in the same state gives the same mask
    gen = torch.Generator(device=device).manual_seed(7)
    expected_key = ops.philox_key(x.device, torch.Generator(device=device).manual_seed(7))
    y_gen = bnfused.bn_relu_dropout(x, None, None, training=True, p=0.5, generator=gen)
    torch.testing.assert_close(y_gen, reference_bn_relu_dropout(x, None, None, training=True, p=0.5,
                                                                key=expected_key))
    rng = rng_state(device)
    bnfused.bn_relu_dropout(x, None, None, training=True, p=0.5, generator=gen)
    assert torch.equal(rng_state(device), rng), "an explicit generator leaves the default one alone"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_size_batch(device, training):
    w, b, rm, rv = make_params(device, torch.float32)
    x = torch.randn(0, C, 3, device=device, requires_grad=True)
    rm0, rv0 = rm.clone(), rv.clone()
    y = bnfused.bn_relu_dropout(x, rm, rv, w, b, training, 0.1, 1e-5, 0.5)
    assert y.shape == x.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    y.sum().backward()
    assert x.grad.shape == x.shape and not w.grad.any() and not b.grad.any()


def test_p1_gives_zeros_and_zero_grads(device):
    w, b, rm, rv = make_params(device, torch.float32)
    x = make_input((3, C, 4, 4), "channels_last", torch.float32, device).requires_grad_()
    rm0 = rm.clone()
    y = bnfused.bn_relu_dropout(x, rm, rv, w, b, True, 0.1, 1e-5, 1.0)
    assert y.shape == x.shape and not y.any()
    y.backward(torch.randn_like(y))
    assert not x.grad.any() and not w.grad.any() and not b.grad.any()
    assert not torch.equal(rm, rm0)  # statistics still update at p = 1


# ---- the eager C++ path (_C.bn_relu_dropout_eager) against the Python one (BNReLUDropoutFunction) ----

def run_path(cpp, monkeypatch, x, rm, rv, w, b, training, p, momentum=0.1, seed=None, x_grad=True):
    """y, (grads of x, w, b), grad_fn name and the running stats after one call through the chosen path."""
    with monkeypatch.context() as mp:
        if not cpp:
            mp.setattr(bnfused.functional, "_eager_cpp_path", lambda input: False)
        x, w, b = leaf(x).requires_grad_(x_grad), leaf(w), leaf(b)
        rm, rv = (None, None) if rm is None else (rm.clone(), rv.clone())
        y = bnfused.bn_relu_dropout(x, rm, rv, w, b, training, momentum, 1e-5, p, seed=seed)
        name = y.grad_fn.name() if y.grad_fn is not None else None
        leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, leaves, torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
    return y, grads, name, rm, rv


@pytest.mark.parametrize("shape,layout", [((6, C), "contiguous"), ((3, C, 5), "noncontig"),
                                          ((2, C, 4, 4), "channels_last"), ((2, C, 2, 3, 3), "contiguous")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.1, 1.0])
def test_eager_cpp_path_matches_python_path(monkeypatch, shape, layout, dtype, training, p):
    """Plain CPU tensors take the C++ node; it gives the Python Function's output, gradients and running stats
    bit for bit (same ops, same formula)."""
    x = make_input(shape, layout, dtype, torch.device("cpu"))
    w, b, rm, rv = make_params(torch.device("cpu"), ops.acc_dtype(dtype))
    runs = [run_path(cpp, monkeypatch, x, rm, rv, w, b, training, p, seed=5) for cpp in (True, False)]
    assert runs[0][2] == "torch::autograd::CppNode<bnfused::BNReLUDropoutFunction>"
    assert runs[1][2] == "BNReLUDropoutFunctionBackward"
    for cpp_value, python_value in zip(runs[0][:2] + runs[0][3:], runs[1][:2] + runs[1][3:]):
        torch.testing.assert_close(cpp_value, python_value, rtol=0, atol=0)
    assert runs[0][0].stride() == runs[1][0].stride()


@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_eager_cpp_path_grad_edges(monkeypatch, weight, bias, x_grad, momentum):
    """The node's needs_input_grad counts defined tensor inputs only; every weight/bias/x combination gets the
    Python path's gradients, and the key is drawn from the default generator as there."""
    if not (weight or bias or x_grad):
        pytest.skip("nothing requires grad")
    x = make_input((3, C, 5), "contiguous", torch.float64, torch.device("cpu"))
    w, b, rm, rv = make_params(torch.device("cpu"), torch.float64)
    w, b = (w if weight else None), (b if bias else None)
    runs = []
    for cpp in (True, False):
        torch.manual_seed(3)
        runs.append(run_path(cpp, monkeypatch, x, rm, rv, w, b, True, 0.5, momentum=momentum or 0.0,
                             x_grad=x_grad))
    assert len(runs[0][1]) == int(weight) + int(bias) + int(x_grad)
    for cpp_value, python_value in zip(runs[0][:2] + runs[0][3:], runs[1][:2] + runs[1][3:]):
        torch.testing.assert_close(cpp_value, python_value, rtol=0, atol=0)


class _PassThroughMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _PassThroughFunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def test_eager_cpp_path_gate():
    """Subclasses, dispatch and function modes and non-CPU tensors keep the Python path (the pybind call would
    bypass their __torch_function__); the result is the same either way."""
    x = torch.randn(4, C, 3, requires_grad=True)
    assert bnfused.functional._eager_cpp_path(x)
    assert not bnfused.functional._eager_cpp_path(x.detach().as_subclass(_Subclass))
    assert not bnfused.functional._eager_cpp_path(torch.empty(4, C, device="meta"))
    for mode in (_PassThroughMode(), _PassThroughFunctionMode()):
        with mode:
            assert not bnfused.functional._eager_cpp_path(x)
            y = bnfused.bn_relu_dropout(x, None, None, training=True, p=0.5, seed=1)
        assert y.grad_fn.name() == "BNReLUDropoutFunctionBackward"
        torch.testing.assert_close(y, bnfused.bn_relu_dropout(x, None, None, training=True, p=0.5, seed=1),
                                   rtol=0, atol=0)


def _python_check_accepts(monkeypatch, *args) -> bool:
    """Whether functional.check_inputs, on its Python checks alone (the C++ fast check off), accepts the call."""
    with monkeypatch.context() as mp:
        mp.setattr(bnfused.functional, "_HAS_FAST_CHECK", False)
        try:
            bnfused.functional.check_inputs(*args, 0.1, 1e-5, 0.5)
        except (TypeError, ValueError, RuntimeError, NotImplementedError):
            return False
    return True


def test_fast_input_check_agrees_with_the_python_checks(monkeypatch):
    """check_inputs (Python) is the one definition of a valid call; _C.eager_inputs_ok, its C++ fast path for plain
    tensors, must accept exactly the calls it accepts. Checked on a sampled product of input dtypes, ranks, sizes
    and every kind of bad per-channel tensor, in both modes (a rejected call then gets the Python checks' error)."""
    ok = bnfused._extension._C.eager_inputs_ok
    inputs = [torch.randn(4, C, 3), torch.randn(4, C), torch.randn(1, C, 1), torch.randn(1, C), torch.randn(C),
              torch.randn(2, C, 3, 3).to(memory_format=torch.channels_last), torch.randn(4, C, 3).double(),
              torch.randn(4, C, 3).to(torch.bfloat16), torch.randn(4, C, 3).half(), torch.ones(4, C, 3).long(),
              torch.randn(4, C + 1, 3), torch.empty(0, C, 3)]
    per_channel = [None, torch.ones(C), torch.ones(C).double(), torch.ones(C).half(), torch.ones(C).to(torch.bfloat16),
                   torch.ones(C + 1), torch.ones(1, C), torch.ones(C).long(), torch.ones(C, device="meta"),
                   torch.ones(C)[::1].expand(C)]
    rng = np.random.default_rng(0)
    accepted = rejected = 0
    for _ in range(1500):
        x = inputs[rng.integers(len(inputs))]
        # mostly valid per-channel tensors (None or float32 of C), so that accepted calls are sampled too
        rm, rv, w, b = (per_channel[rng.integers(2) if rng.random() < 0.75 else rng.integers(len(per_channel))]
                        for _ in range(4))
        if rng.random() < 0.5:  # paired running statistics are the common case: sample them often
            rv = None if rm is None else rm
        training = bool(rng.integers(2))
        python_ok = _python_check_accepts(monkeypatch, x, rm, rv, w, b, training)
        assert ok(x, rm, rv, w, b, training) == python_ok, (x.shape, x.dtype, [None if t is None else (
            tuple(t.shape), t.dtype, t.device.type) for t in (rm, rv, w, b)], training)
        accepted += python_ok
        rejected += not python_ok
    assert accepted > 100 and rejected > 100  # both sides of the boundary sampled
    # the fast path is taken (the Python checks not run) for a valid call
    x, w, b, rm, rv = torch.randn(4, C, 3), torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)
    calls = []
    monkeypatch.setattr(bnfused.functional, "check_number", lambda *a: calls.append(a))
    bnfused.functional.check_inputs(x, rm, rv, w, b, True, 0.1, 1e-5, 0.5)
    assert len(calls) == 3  # p, eps, momentum only


def test_eager_cpp_node_autograd_semantics():
    """Saved x is version-checked, the graph frees after one backward unless retained, no_grad builds no node and
    gives the same output, and checkpointing (saved-tensor hooks, recomputed forward) gives the same gradients."""
    m = bnfused.BatchNormReLUDropout1d(C, p=0.3).double()
    x = torch.randn(5, C, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(4)
    y = m(x)
    (g1,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(y.sum(), x)
    xi = x.detach().clone().requires_grad_()
    xv = xi * 1.0
    yv = m(xv)
    xv.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        yv.sum().backward()
    torch.manual_seed(4)
    with torch.no_grad():
        y_nograd = m(x)
    assert y_nograd.grad_fn is None
    torch.testing.assert_close(y_nograd, y.detach(), rtol=0, atol=0)
    for reentrant in (False, True):
        xc = x.detach().clone().requires_grad_()
        torch.manual_seed(4)
        yc = torch.utils.checkpoint.checkpoint(m, xc, use_reentrant=reentrant)
        yc.sum().backward()
        torch.testing.assert_close(yc, y.detach(), rtol=0, atol=0)
        torch.testing.assert_close(xc.grad, g1, rtol=0, atol=0)


def test_route_table():
    """functional._route picks each row of the Route table under its condition (the table is in Route's docstring;
    each route's results are checked against the reference by the tests of that path)."""
    route, Route = bnfused.functional._route, bnfused.functional.Route
    x = torch.randn(4, C, 3)
    assert route(x[:0], 0.5) is Route.EMPTY
    assert route(x, 0.0, x.double()) is Route.COMPOSITE
    assert route(x, 0.5) is Route.EAGER_CPP and route(x, 0.0, x) is Route.EAGER_CPP
    assert route(x.as_subclass(_Subclass), 0.5) is Route.FUNCTION
    assert route(x, 0.5, x.as_subclass(_Subclass)) is Route.FUNCTION  # the C++ call takes plain residuals only
    assert route(torch.empty(4, C, device="meta"), 0.5) is Route.FUNCTION
    with _PassThroughFunctionMode():
        assert route(x, 0.5) is Route.FUNCTION
    seen = []

    def record(p):
        seen.append(route(x, p))
        return x

    torch.compile(lambda t: record(0.0) + record(0.5), backend="eager", fullgraph=True)(x)
    assert seen == [Route.UNFUSED, Route.CUSTOM_OP]
    seen.clear()
    torch.export.export(_RouteProbe(record), (x,))
    assert seen == [Route.CUSTOM_OP, Route.CUSTOM_OP]  # export keeps the fused op even without dropout


class _RouteProbe(torch.nn.Module):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def forward(self, t):
        return self.record(0.0) + self.record(0.5) + t
