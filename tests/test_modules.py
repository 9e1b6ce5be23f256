"""BatchNormReLUDropout1d/2d/3d against nn.BatchNormXd -> nn.ReLU -> dropout with the same mask.

The fused module draws its Philox key from the default generator; re-seeding and drawing the key again
(bnfused.ops.philox_key) gives the reference (bnfused.testing.reference_block) the very same mask.
Every dtype is compared with a float64 reference computed from the same (possibly low-precision) input.
"""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnfused
from bnfused import ops
from bnfused.testing import reference_block

import helpers
from helpers import CHANNELS_LAST, rng_state

FUSED = {1: bnfused.BatchNormReLUDropout1d, 2: bnfused.BatchNormReLUDropout2d, 3: bnfused.BatchNormReLUDropout3d}
NN_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
C = 3
# name -> (module dim, input shape)
SHAPES = {"1d_2": (1, (8, C)), "1d_3": (1, (4, C, 5)), "2d": (2, (2, C, 4, 5)), "3d": (3, (2, C, 3, 2, 4))}
LAYOUT_CASES = [(s, l) for s in SHAPES for l in ("contiguous", "channels_last", "noncontig")
                if l != "channels_last" or SHAPES[s][0] > 1]
# (forward, gradients) tolerances against the float64 reference of the same input
TOL = {dtype: (helpers.TOL[dtype], helpers.GRAD_TOL[dtype]) for dtype in helpers.TOL}


def make_input(shape, layout, dtype, device, offset=0.3):
    return helpers.make_input(shape, layout, dtype, device, offset, scale=1.5)


def expected_format(x):
    if x.dim() in CHANNELS_LAST and not x.is_contiguous() and x.is_contiguous(memory_format=CHANNELS_LAST[x.dim()]):
        return CHANNELS_LAST[x.dim()]
    return torch.contiguous_format


def randomize_state(m):
    """Non-trivial weight, bias and running statistics, so every term of the formulas matters."""
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(torch.rand_like(m.weight) + 0.5)
        if m.bias is not None:
            m.bias.copy_(torch.randn_like(m.bias) * 0.3)
        if m.running_mean is not None:
            m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.2)
            m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)


def reference_for(fused, dim, device, ref_dtype=torch.float64):
    ref = reference_block(dim, fused.num_features, p=fused.p, eps=fused.eps, momentum=fused.momentum,
                          affine=fused.affine, track_running_stats=fused.track_running_stats)
    ref = ref.to(device=device, dtype=ref_dtype)
    ref[0].load_state_dict(fused.state_dict())
    ref.train(fused.training)
    return ref


def run_both(fused, ref, x, seed):
    """Forward through fused and the float64 reference with the same dropout mask: (y_fused, y_ref, x_fused, x_ref)."""
    xf = x.detach().requires_grad_()  # keeps x's strides (a strided view stays a strided view)
    xr = x.detach().double().requires_grad_()
    torch.manual_seed(seed)
    yf = fused(xf)
    torch.manual_seed(seed)
    ref[2].key = ops.philox_key(x.device)  # the key the fused module drew
    yr = ref(xr)
    return yf, yr, xf, xr


def assert_state_close(fused, ref, tol):
    if fused.running_mean is not None:
        torch.testing.assert_close(fused.running_mean.double(), ref[0].running_mean.double(), **tol)
        torch.testing.assert_close(fused.running_var.double(), ref[0].running_var.double(), **tol)
        assert fused.num_batches_tracked.item() == ref[0].num_batches_tracked.item()


# ---- the full cross: dims x layouts x dtypes x train/eval x affine x p ----

# p's effect does not depend on the dtype: the reduced dtypes run the two p that change the code path.
DTYPE_P = [(dt, p) for dt in (torch.float32, torch.float64) for p in (0.0, 0.01, 0.5, 1.0)] + [
    (dt, p) for dt in (torch.float16, torch.bfloat16) for p in (0.0, 0.5)]


@pytest.mark.parametrize("shape_name,layout", LAYOUT_CASES)
@pytest.mark.parametrize("dtype,p", DTYPE_P, ids=[f"{str(dt)[6:]}-p{p}" for dt, p in DTYPE_P])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_matches_unfused(device, shape_name, layout, dtype, p, training, affine):
    dim, shape = SHAPES[shape_name]
    fwd_tol, grad_tol = TOL[dtype]
    acc = ops.acc_dtype(dtype)
    fused = FUSED[dim](C, affine=affine, p=p, device=device, dtype=acc)
    randomize_state(fused)
    fused.train(training)
    ref = reference_for(fused, dim, device)
    x = make_input(shape, layout, dtype, device)

    for step in range(2 if training else 1):  # the second step sees running statistics updated by the first
        yf, yr, xf, xr = run_both(fused, ref, x, seed=100 + step)
        assert yf.dtype == dtype and yf.shape == x.shape
        assert yf.is_contiguous(memory_format=expected_format(x))
        torch.testing.assert_close(yf.double(), yr, **fwd_tol)
        dy = torch.randn(shape, device=device).to(dtype)
        yf.backward(dy)
        yr.backward(dy.double())
        torch.testing.assert_close(xf.grad.double(), xr.grad, **grad_tol)
        assert xf.grad.dtype == dtype
        if affine:
            torch.testing.assert_close(fused.weight.grad.double(), ref[0].weight.grad, **grad_tol)
            torch.testing.assert_close(fused.bias.grad.double(), ref[0].bias.grad, **grad_tol)
            fused.zero_grad()
            ref.zero_grad()
        assert_state_close(fused, ref, TOL[torch.float32][0] if dtype != torch.float64 else fwd_tol)
    if p == 1.0 and training:
        assert not yf.any() and not xf.grad.any()


@pytest.mark.parametrize("shape_name,layout", LAYOUT_CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_against_real_nn_dropout(device, shape_name, layout, training):
    """In law against nn.Dropout: every output is 0 or BN->ReLU scaled by 1/(1-p), and eval is BN->ReLU."""
    dim, shape = SHAPES[shape_name]
    p = 0.5
    fused = FUSED[dim](C, p=p, device=device)
    randomize_state(fused)
    chain = nn.Sequential(NN_BN[dim](C), nn.ReLU(), nn.Dropout(p)).to(device)
    chain.load_state_dict({"0." + k: v for k, v in fused.state_dict().items()})
    fused.train(training)
    chain.train(training)
    x = make_input(shape, layout, torch.float32, device)
    y = fused(x)
    bn_relu = chain[1](chain[0](x))
    if training:
        kept = y != 0
        torch.testing.assert_close(y[kept], bn_relu[kept] / (1 - p), rtol=1e-5, atol=1e-5)
        assert 0 < kept.sum() < (bn_relu > 0).sum()
    else:
        torch.testing.assert_close(y, chain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.running_mean, chain[0].running_mean)
    torch.testing.assert_close(fused.running_var, chain[0].running_var)
    assert fused.num_batches_tracked.item() == chain[0].num_batches_tracked.item()


# ---- p = 0: no RNG, same as BN -> ReLU in the same dtype ----

@pytest.mark.parametrize("shape_name,layout", LAYOUT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_p0_is_bn_relu(device, shape_name, layout, dtype, training):
    dim, shape = SHAPES[shape_name]
    fused = FUSED[dim](C, p=0.0, device=device, dtype=dtype)
    randomize_state(fused)
    bn = NN_BN[dim](C, device=device, dtype=dtype)
    bn.load_state_dict(fused.state_dict())
    fused.train(training)
    bn.train(training)
    x = make_input(shape, layout, dtype, device)
    rng_before = rng_state(device)
    y = fused(x)
    assert torch.equal(rng_state(device), rng_before), "p = 0 must not consume random numbers"
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(y, F.relu(bn(x)), **tol)
    torch.testing.assert_close(fused.running_mean, bn.running_mean, **tol)
    torch.testing.assert_close(fused.running_var, bn.running_var, **tol)


# ---- track_running_stats=False, momentum=None ----

@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_track_running_stats_false(device, dim, training, p):
    shape = {1: (6, C, 3), 2: (2, C, 3, 4), 3: (2, C, 2, 3, 2)}[dim]
    fused = FUSED[dim](C, track_running_stats=False, p=p, device=device)
    assert fused.running_mean is None and fused.running_var is None and fused.num_batches_tracked is None
    randomize_state(fused)
    fused.train(training)
    ref = reference_for(fused, dim, device)
    x = make_input(shape, "contiguous", torch.float64, device)
    yf, yr, xf, xr = run_both(fused, ref, x.float(), seed=7)
    # eval without running buffers normalizes with batch statistics, as nn.BatchNormXd does
    torch.testing.assert_close(yf.double(), yr, rtol=1e-5, atol=1e-5)
    yf.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(xf.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    assert fused.running_mean is None and "running_mean" not in fused.state_dict()


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_average_over_steps(device, dim, momentum):
    shape = {1: (6, C), 2: (2, C, 3, 4), 3: (2, C, 2, 3, 2)}[dim]
    fused = FUSED[dim](C, momentum=momentum, p=0.1, device=device)
    bn = NN_BN[dim](C, momentum=momentum, device=device)
    for step in range(4):
        x = make_input(shape, "contiguous", torch.float32, device, offset=step)
        fused(x)
        bn(x)
        torch.testing.assert_close(fused.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
        assert fused.num_batches_tracked.item() == bn.num_batches_tracked.item() == step + 1
    fused.eval()
    bn.eval()
    x = make_input(shape, "contiguous", torch.float32, device)
    torch.testing.assert_close(fused(x), F.relu(bn(x)), rtol=1e-5, atol=1e-5)


def test_eval_does_not_touch_running_stats(device):
    fused = bnfused.BatchNormReLUDropout2d(C, p=0.5, device=device).eval()
    randomize_state(fused)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    x = make_input((2, C, 3, 3), "contiguous", torch.float32, device)
    rng_before = rng_state(device)
    y1, y2 = fused(x), fused(x)
    assert torch.equal(y1, y2)  # eval: no dropout, deterministic
    assert torch.equal(rng_state(device), rng_before)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---- zero-size batch ----

@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_size_batch(device, dim, layout, training):
    shape = {1: (0, C, 4), 2: (0, C, 3, 4), 3: (0, C, 2, 3, 2)}[dim]
    if layout == "channels_last" and dim == 1:
        pytest.skip("no channels_last for 1d input")
    fused = FUSED[dim](C, p=0.5, device=device).train(training)
    randomize_state(fused)
    bn = NN_BN[dim](C, device=device).train(training)
    bn.load_state_dict(fused.state_dict())
    x = make_input(shape, layout, torch.float32, device).requires_grad_()
    y = fused(x)
    y_bn = bn(x)
    assert y.shape == x.shape and y.numel() == 0
    assert y.is_contiguous(memory_format=expected_format(x)) == y_bn.is_contiguous(memory_format=expected_format(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(fused, name), getattr(bn, name)), name
    assert fused.num_batches_tracked.item() == (1 if training else 0)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert fused.weight.grad is not None and not fused.weight.grad.any()


# ---- numerics ----

@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_offset_float32(device, dim, layout):
    """Statistics of float32 data with a 1e4 mean offset and unit spread stay accurate."""
    if layout == "channels_last" and dim == 1:
        pytest.skip("no channels_last for 1d input")
    shape = {1: (64, C, 16), 2: (8, C, 8, 16), 3: (4, C, 4, 4, 16)}[dim]
    fused = FUSED[dim](C, p=0.0, device=device)
    x = make_input(shape, layout, torch.float32, device, offset=1e4)
    y = fused(x)
    xd = x.double()
    var, mean = torch.var_mean(xd, dim=[d for d in range(x.dim()) if d != 1], unbiased=False, keepdim=True)
    expected = torch.relu((xd - mean) / torch.sqrt(var + fused.eps))
    # float32 at 1e4 has an ulp of ~1e-3: a mean good to a few ulps (PyTorch's own channels_last CPU path is
    # ~1e-2 off) shifts x_hat by < 1e-2; a naive E[x^2] - E[x]^2 would get the variance wrong by far more.
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-2)
    torch.testing.assert_close(fused.running_mean.double(), 0.1 * mean.flatten(), rtol=2e-6, atol=0)
    n = x.numel() // C
    torch.testing.assert_close(fused.running_var.double(), 0.9 + 0.1 * var.flatten() * n / (n - 1), rtol=1e-3, atol=0)


# ---- state_dict and module behaviour identical to nn.BatchNormXd ----

@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_state_dict_both_ways(device, dim, affine, track):
    fused = FUSED[dim](C, affine=affine, track_running_stats=track, p=0.2, device=device)
    bn = NN_BN[dim](C, affine=affine, track_running_stats=track, device=device)
    assert list(fused.state_dict().keys()) == list(bn.state_dict().keys())
    randomize_state(bn)
    if track:
        bn.num_batches_tracked.fill_(7)
    fused.load_state_dict(bn.state_dict())  # nn -> fused
    for k, v in bn.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k
    randomize_state(fused)
    bn.load_state_dict(fused.state_dict())  # fused -> nn
    for k, v in fused.state_dict().items():
        assert torch.equal(bn.state_dict()[k], v), k


def test_loads_old_state_dict_without_num_batches_tracked():
    bn = nn.BatchNorm2d(C)
    sd = bn.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # what nn.BatchNorm saved before num_batches_tracked existed
    fused = bnfused.BatchNormReLUDropout2d(C)
    fused.load_state_dict(sd)
    assert fused.num_batches_tracked.item() == 0


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_module_api_like_batchnorm(dim):
    fused = FUSED[dim](5, 1e-3, 0.2, True, True, None, torch.float64, p=0.25)  # nn.BatchNormXd's positional args
    assert isinstance(fused, _BatchNorm)
    assert (fused.num_features, fused.eps, fused.momentum, fused.affine, fused.track_running_stats, fused.p) == (
        5, 1e-3, 0.2, True, True, 0.25)
    assert fused.weight.dtype == torch.float64 and fused.running_mean.dtype == torch.float64
    assert "p=0.25" in repr(fused) and "eps=0.001" in repr(fused)
    with pytest.raises(TypeError):
        FUSED[dim](5, 1e-5, 0.1, True, True, None, None, 0.5)  # p is keyword-only
    assert FUSED[dim](5).p == 0.5  # the default
    randomize_state(fused)
    fused.num_batches_tracked.fill_(3)
    fused.reset_parameters()
    assert torch.equal(fused.weight, torch.ones(5, dtype=torch.float64))
    assert torch.equal(fused.bias, torch.zeros(5, dtype=torch.float64))
    assert torch.equal(fused.running_var, torch.ones(5, dtype=torch.float64))
    assert fused.num_batches_tracked.item() == 0


@pytest.mark.skipif("bias" not in inspect.signature(nn.BatchNorm1d.__init__).parameters,
                    reason="this torch's nn.BatchNormXd has no bias= argument")
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_affine_without_bias(device, dim):
    fused = FUSED[dim](C, bias=False, p=0.0, device=device)
    bn = NN_BN[dim](C, bias=False, device=device)
    assert fused.bias is None and fused.weight is not None
    assert list(fused.state_dict().keys()) == list(bn.state_dict().keys())
    randomize_state(fused)
    bn.load_state_dict(fused.state_dict())
    shape = {1: (6, C), 2: (2, C, 3, 4), 3: (2, C, 2, 3, 2)}[dim]
    x = make_input(shape, "contiguous", torch.float32, device)
    torch.testing.assert_close(fused(x), F.relu(bn(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_cls", [bnfused.BatchNormReLUDropout2d, bnfused.BatchNormAddReLU2d])
def test_parametrized_weight_and_swapped_tensors_are_used(device, fused_cls):
    """The forward reads parameters and buffers from their dicts (no nn.Module.__getattr__ per name), but what
    self.<name> resolves to still wins: a parametrization's property (the name leaves _parameters) and tensors
    swapped in by torch.func.functional_call."""
    fused = fused_cls(C, p=0.0, device=device).train()
    bn = nn.BatchNorm2d(C, device=device).train()
    for module in (fused, bn):
        torch.nn.utils.parametrize.register_parametrization(module, "weight", _Scale3())
    x = make_input((2, C, 3, 4), "contiguous", torch.float32, device)
    args = (x, torch.zeros_like(x)) if fused_cls is bnfused.BatchNormAddReLU2d else (x,)
    torch.testing.assert_close(fused(*args), F.relu(bn(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.running_var, bn.running_var)
    # functional_call: other weight / running statistics for one call, the module's own untouched
    plain = fused_cls(C, p=0.0, device=device).eval()
    swapped = {"weight": torch.full((C,), 2.0, device=device), "running_var": torch.full((C,), 4.0, device=device)}
    ref = nn.BatchNorm2d(C, device=device).eval()
    expected = F.relu(torch.func.functional_call(ref, swapped, (x,)))
    torch.testing.assert_close(torch.func.functional_call(plain, swapped, args), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain.weight, torch.ones(C, device=device))


class _Scale3(nn.Module):
    def forward(self, w):
        return 3.0 * w


def test_reduced_precision_params_stay_float32(device):
    fused = bnfused.BatchNormReLUDropout2d(C, p=0.3, device=device)
    x = make_input((2, C, 4, 4), "channels_last", torch.bfloat16, device).requires_grad_()
    y = fused(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert fused.weight.grad.dtype == torch.float32 and fused.running_mean.dtype == torch.float32


# ---------------------------------------------------------------- from_batchnorm


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("kwargs", [{}, dict(affine=False), dict(track_running_stats=False),
                                    dict(momentum=None, eps=1e-3)], ids=["default", "noaffine", "notrack", "cma"])
def test_from_batchnorm_shares_state(device, dim, kwargs):
    bn = NN_BN[dim](C, device=device, **kwargs).eval()
    fused = FUSED[dim].from_batchnorm(bn, p=0.25)
    assert type(fused) is FUSED[dim] and fused.p == 0.25 and not fused.training
    assert (fused.eps, fused.momentum, fused.affine, fused.track_running_stats) == (
        bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    for name, t in list(bn.named_parameters()) + list(bn.named_buffers()):
        assert getattr(fused, name) is t, name  # the very same objects, not copies
    assert list(fused.state_dict()) == list(bn.state_dict())
    assert FUSED[dim].from_batchnorm(bn.train()).training


def test_from_batchnorm_keeps_the_optimizer_training():
    """An optimizer built on the BN's parameters before the swap keeps updating the fused module, exactly as it
    would have updated the unfused BN -> ReLU."""
    torch.manual_seed(1)
    bn, ref = nn.BatchNorm2d(C), nn.BatchNorm2d(C)
    ref.load_state_dict(bn.state_dict())
    opt, ref_opt = torch.optim.SGD(bn.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
    fused = bnfused.BatchNormReLUDropout2d.from_batchnorm(bn)
    x = torch.randn(4, C, 5, 5)
    for _ in range(2):
        for module, optimizer in ((fused, opt), (lambda t: torch.relu(ref(t)), ref_opt)):
            optimizer.zero_grad()
            (module(x) * torch.arange(C).view(1, C, 1, 1)).sum().backward()
            optimizer.step()
    assert not torch.equal(bn.weight, torch.ones(C))  # it moved
    for a, b in zip(list(fused.parameters()) + list(fused.buffers()), list(ref.parameters()) + list(ref.buffers())):
        torch.testing.assert_close(a, b)


def test_from_batchnorm_sync_and_errors():
    sync_bn = nn.SyncBatchNorm(C, process_group="own")
    fused = bnfused.SyncBatchNormReLUDropout.from_batchnorm(sync_bn, p=0.1)
    assert fused.process_group == "own" and fused.weight is sync_bn.weight
    assert bnfused.SyncBatchNormReLUDropout.from_batchnorm(nn.BatchNorm3d(C), process_group="g").process_group == "g"
    assert bnfused.BatchNormReLUDropout2d.from_batchnorm(sync_bn).weight is sync_bn.weight  # un-synced on purpose
    with pytest.raises(TypeError, match="expects a BatchNorm2d"):
        bnfused.BatchNormReLUDropout2d.from_batchnorm(nn.BatchNorm1d(C))
    with pytest.raises(TypeError, match="expects a BatchNorm module"):
        bnfused.BatchNormReLUDropout2d.from_batchnorm(nn.InstanceNorm2d(C))
    with pytest.raises(ValueError, match="dropout probability"):
        bnfused.BatchNormReLUDropout2d.from_batchnorm(nn.BatchNorm2d(C), p=1.5)


def test_bias_false_on_a_torch_without_it_names_the_reason(monkeypatch):
    """torch 2.11's nn.BatchNormXd has no bias=: a clear TypeError instead of its bare 'unexpected keyword'."""
    monkeypatch.setattr(bnfused.modules, "_BATCHNORM_TAKES_BIAS", False)
    with pytest.raises(TypeError, match=r"BatchNormActDropout2d\(bias=False\) needs a torch whose nn.BatchNormXd"):
        bnfused.BatchNormReLUDropout2d(4, bias=False)
    assert bnfused.BatchNormReLUDropout2d(4).bias is not None  # bias=True never passes the argument on
