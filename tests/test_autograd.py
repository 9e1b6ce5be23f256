"""torch.autograd.gradcheck (float64) of the functional and of BNReLUDropoutFunction, and the backward's handling
of partial requires_grad and of grad_output strides. Dropout masks are fixed by seed= or a generator."""
import pytest
import torch
from torch.autograd import gradcheck

import bnfused
from bnfused import ops
from bnfused.testing import reference_bn_relu_dropout

C = 3
CASES = {  # name -> (shape, memory format)
    "1d_2": ((5, C), torch.contiguous_format),
    "1d_3": ((3, C, 2), torch.contiguous_format),
    "2d": ((2, C, 2, 3), torch.contiguous_format),
    "2d_cl": ((2, C, 2, 3), torch.channels_last),
    "3d_cl": ((2, C, 2, 1, 2), torch.channels_last_3d),
}


def make_x(name, device):
    shape, fmt = CASES[name]
    x = torch.randn(shape, device=device, dtype=torch.float64) + 0.2
    return x.contiguous(memory_format=fmt).requires_grad_()


def make_wb(device, affine):
    if not affine:
        return None, None
    w = (torch.rand(C, device=device, dtype=torch.float64) + 0.5).requires_grad_()
    b = (torch.randn(C, device=device, dtype=torch.float64) * 0.3).requires_grad_()
    return w, b


def running(device):
    return torch.randn(C, device=device, dtype=torch.float64) * 0.2, torch.rand(C, device=device,
                                                                               dtype=torch.float64) + 0.5


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_gradcheck_functional(device, case, training, p, affine):
    x = make_x(case, device)
    w, b = make_wb(device, affine)
    rm, rv = running(device)

    def fn(x, *wb):
        w, b = wb if wb else (None, None)
        # running stats are copies: in training each call would move them (the output does not depend on them)
        return bnfused.bn_relu_dropout(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, p, seed=11,
                                       dropout_training=True)

    inputs = (x, w, b) if affine else (x,)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_functional_with_generator(device):
    x = make_x("2d_cl", device)
    w, b = make_wb(device, True)

    def fn(x, w, b):
        gen = torch.Generator(device=device).manual_seed(5)  # the same key for every evaluation
        return bnfused.bn_relu_dropout(x, None, None, w, b, True, 0.1, 1e-5, 0.5, gen)

    assert gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["1d_2", "2d", "2d_cl", "3d_cl"])
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_gradcheck_function_directly(device, case, batch_stats, p, affine):
    x = make_x(case, device)
    w, b = make_wb(device, affine)
    key = torch.tensor([123, 4], device=device)
    rm, rv = running(device)
    const_mean, const_rstd = rm, torch.rsqrt(rv + 1e-5)

    def fn(x, *wb):
        w, b = wb if wb else (None, None)
        if batch_stats:
            # the function's input gradient includes the statistics' terms, so they must be x's own statistics
            mean, var = ops.batch_stats(x.detach())
            mean, rstd = mean, torch.rsqrt(var + 1e-5)
        else:
            mean, rstd = const_mean, const_rstd
        return bnfused.BNReLUDropoutFunction.apply(x, mean, rstd, w, b, key, p, batch_stats)

    inputs = (x, w, b) if affine else (x,)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)], ids=["x", "w", "b", "wb"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_partial_requires_grad(device, needs, training):
    x = make_x("2d", device).detach().requires_grad_(needs[0])
    w, b = (t.detach().requires_grad_(n) for t, n in zip(make_wb(device, True), needs[1:]))
    rm, rv = running(device)
    y = bnfused.bn_relu_dropout(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, 0.3, seed=2,
                                dropout_training=True)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t, n in zip((x, w, b), needs) if n], dy)
    xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
    yr = reference_bn_relu_dropout(xr, rm.clone(), rv.clone(), wr, br, training, 0.1, 1e-5, 0.3,
                                   key=torch.tensor([2, 0], device=device), dropout_training=True)
    ref_grads = torch.autograd.grad(yr, [t for t, n in zip((xr, wr, br), needs) if n], dy)
    for g, gr in zip(grads, ref_grads):
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("x_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dy_kind", ["contiguous", "channels_last", "strided", "expanded"])
def test_grad_output_of_any_layout(device, x_format, dy_kind):
    x = make_x("2d", device).detach().contiguous(memory_format=x_format).requires_grad_()
    w, b = make_wb(device, True)
    y = bnfused.bn_relu_dropout(x, None, None, w, b, True, 0.1, 1e-5, 0.5, seed=3)
    base = torch.randn(x.shape, device=device, dtype=torch.float64)
    dy = {"contiguous": base, "channels_last": base.contiguous(memory_format=torch.channels_last),
          "strided": torch.randn(*x.shape[:-1], 2 * x.shape[-1], device=device, dtype=torch.float64)[..., ::2],
          "expanded": torch.randn(1, C, 1, 1, device=device, dtype=torch.float64).expand(x.shape)}[dy_kind]
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    assert gx.is_contiguous(memory_format=x_format)
    xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
    yr = reference_bn_relu_dropout(xr, None, None, wr, br, True, 0.1, 1e-5, 0.5, key=torch.tensor([3, 0]))
    for g, gr in zip((gx, gw, gb), torch.autograd.grad(yr, (xr, wr, br), dy.contiguous())):
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-9)


def test_function_saves_no_full_size_tensor_but_x(device):
    x = make_x("2d", device)
    w, b = make_wb(device, True)
    mean, var = ops.batch_stats(x.detach())
    key = torch.tensor([1, 2], device=device)
    full_size = []

    def pack(t):
        if t.numel() == x.numel():
            full_size.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bnfused.BNReLUDropoutFunction.apply(x, mean, torch.rsqrt(var + 1e-5), w, b, key, 0.5, True)
    assert len(full_size) == 1 and full_size[0].data_ptr() == x.data_ptr()


def test_double_backward_raises(device):
    """The backward kernels have no derivatives: differentiating the gradient again is an error, not zeros. The
    module's eager CPU node (C++) calls the backward ops above autograd, so their not-implemented derivative
    raises; the Python Function (the CUDA path) is once_differentiable."""
    x = torch.randn(4, 3, 5, device=device, dtype=torch.float64, requires_grad=True)
    m = bnfused.BatchNormReLUDropout1d(3, p=0.2).to(device, torch.float64)
    gx, gw, gb = torch.autograd.grad(m(x).pow(2).sum(), (x, m.weight, m.bias), create_graph=True)
    message = ("derivative for bnfused::backward_(input|reduce) is not implemented" if device.type == "cpu"
               else "marked with @once_differentiable")
    for g in (gx, gw, gb):
        with pytest.raises(RuntimeError, match=message):
            torch.autograd.grad(g.sum(), x, retain_graph=True)
    mean, var = ops.batch_stats(x.detach())
    y = bnfused.BNReLUDropoutFunction.apply(x, mean, torch.rsqrt(var + 1e-5), None, None, ops.philox_key(x.device),
                                            0.2, True)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        g.sum().backward()


@pytest.mark.parametrize("op", ["forward", "forward_keep_bits"])
def test_double_backward_raw_op_raises(device, op):
    """The same through the custom op's registered autograd (the raw op, and what torch.compile traces): the
    backward ops' outputs carry an erroring grad_fn instead of PyTorch's warn-and-return-zeros fallback."""
    if op == "forward_keep_bits" and device == "cuda":
        pytest.skip("forward_keep_bits is CPU only")
    x = torch.randn(4, 3, 5, device=device, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, device=device, dtype=torch.float64) + 0.5).requires_grad_()
    mean, var = ops.batch_stats(x.detach())
    key = ops.philox_key(x.device, seed=0)
    y = getattr(torch.ops.bnfused, op)(x, mean, torch.rsqrt(var + 1e-5), w, None, key, 0.2, True)
    y = y[0] if isinstance(y, (tuple, list)) else y
    gx, gw = torch.autograd.grad(y.pow(2).sum(), (x, w), create_graph=True)
    for g in (gx, gw):
        with pytest.raises(RuntimeError, match="derivative for bnfused::backward_(input|reduce) is not implemented"):
            torch.autograd.grad(g.sum(), x, retain_graph=True)
