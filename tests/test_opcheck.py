"""torch.library.opcheck on every bnfused op: schema, fake (meta) impl incl. strides, autograd registration, and
AOT dispatch with dynamic shapes — over every layout and dtype, optional weight/bias, p = 0, 0 < p < 1 and p = 1."""
import itertools

import pytest
import torch

import bnfused  # noqa: F401  (registers the ops, their fakes and the autograd of forward)
from bnfused import ops

LAYOUTS = {  # name -> (shape, memory format the kernels and fakes must give the output)
    "nchw": ((2, 3, 4, 5), torch.contiguous_format),
    "channels_last": ((2, 3, 4, 5), torch.channels_last),
    "nc": ((6, 3), torch.contiguous_format),
    "channels_last_3d": ((2, 3, 2, 3, 2), torch.channels_last_3d),
    "strided": ((2, 3, 4, 10), torch.contiguous_format),  # sliced below: made contiguous once
}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# weight/bias: none, both in the input dtype, both in the accumulation dtype (fp32 for reduced input), one of them.
PARAMS = ["none", "affine", "affine_acc", "weight_only", "bias_only"]
PS = [0.0, 0.3, 1.0]

# Every layout x dtype pair; params and p cycle with the case index i = 4 * layout + dtype, so (by the Chinese
# remainder theorem) every dtype meets every PARAMS entry and every p, and params x p are all covered.
CASES = []
for i, ((layout_idx, layout), (dtype_idx, dtype)) in enumerate(itertools.product(enumerate(LAYOUTS),
                                                                                 enumerate(DTYPES))):
    batch_stats = (layout_idx + dtype_idx) % 2 == 0  # each layout and each dtype sees both
    CASES.append(pytest.param(layout, dtype, PARAMS[i % len(PARAMS)], PS[i % len(PS)], batch_stats,
                              id=f"{layout}-{str(dtype)[6:]}-{PARAMS[i % len(PARAMS)]}-p{PS[i % len(PS)]}-"
                                 f"{'batch' if batch_stats else 'running'}"))


def _sample(layout, dtype, params, device):
    shape, _ = LAYOUTS[layout]
    x = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    if layout == "strided":
        x = x[..., ::2]
        assert not x.is_contiguous()
    else:
        x = x.contiguous(memory_format=LAYOUTS[layout][1])
    c = x.shape[1]
    acc = ops.acc_dtype(dtype)
    param_dtype = dtype if params in ("affine", "weight_only", "bias_only") else acc
    weight = (torch.rand(c, device=device) + 0.5).to(param_dtype) if params in ("affine", "affine_acc",
                                                                                "weight_only") else None
    bias = (torch.randn(c, device=device) * 0.5).to(param_dtype) if params in ("affine", "affine_acc",
                                                                              "bias_only") else None
    mean, var = torch.ops.bnfused.batch_stats(x)
    rstd = torch.rsqrt(var + 1e-5)
    key = ops.philox_key(x.device, seed=1234)
    return x, mean, rstd, weight, bias, key


@pytest.mark.parametrize("layout,dtype,params,p,batch_stats", CASES)
def test_opcheck_ops(device, layout, dtype, params, p, batch_stats):
    x, mean, rstd, weight, bias, key = _sample(layout, dtype, params, device)
    torch.library.opcheck(torch.ops.bnfused.batch_stats.default, (x,))
    # batch_stats_update mutates the running stats (in the parameter dtype) when given, and works without them.
    acc = ops.acc_dtype(dtype)
    running = (torch.zeros(x.shape[1], device=device, dtype=acc), torch.ones(x.shape[1], device=device, dtype=acc))
    torch.library.opcheck(torch.ops.bnfused.batch_stats_update.default,
                          (x, *(running if batch_stats else (None, None)), 0.1, 1e-5))

    # forward with every differentiable input requiring grad: exercises the registered autograd (setup_context +
    # backward) in test_autograd_registration and test_aot_dispatch_dynamic.
    grad_args = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    args = (grad_args[0], mean, rstd, grad_args[1], grad_args[2], key, p, batch_stats)
    torch.library.opcheck(torch.ops.bnfused.forward.default, args)
    out = torch.ops.bnfused.forward(*args)
    assert out.dtype == x.dtype and out.device == x.device
    assert out.is_contiguous(memory_format=LAYOUTS[layout][1])

    # The backward ops are not differentiable (no double backward): checked with plain inputs.
    grad_out = torch.randn(x.shape, device=device).to(dtype)
    torch.library.opcheck(torch.ops.bnfused.backward_reduce.default,
                          (grad_out, x, mean, rstd, weight, bias, key, p))
    count = x.numel() // x.shape[1]
    sum_g, sum_g_xhat = torch.ops.bnfused.backward_reduce(grad_out, x, mean, rstd, weight, bias, key, p)
    sums = (sum_g, sum_g_xhat) if batch_stats else (None, None)
    torch.library.opcheck(torch.ops.bnfused.backward_input.default,
                          (grad_out, x, mean, rstd, weight, bias, key, p, *sums, count))


@pytest.mark.parametrize("shape,p", [([3, 5], 0.0), ([2, 3, 4, 5], 0.3), ([1, 1, 7], 1.0), ([4, 9], 0.5)])
def test_opcheck_dropout_mask(device, shape, p):
    key = ops.philox_key(torch.device(device), seed=7)
    torch.library.opcheck(torch.ops.bnfused.dropout_mask.default, (key, shape, p))


def test_opcheck_detects_wrong_fake_strides(monkeypatch):
    # Guard that opcheck compares the fake's strides with the kernel's: a fake that drops channels_last must fail.
    monkeypatch.setattr(ops, "kernel_memory_format", lambda x: torch.contiguous_format)
    x, mean, rstd, weight, bias, key = _sample("channels_last", torch.float32, "affine", "cpu")
    result = torch.library.opcheck(torch.ops.bnfused.forward.default,
                                   (x, mean, rstd, weight, bias, key, 0.3, True), raise_exception=False)
    assert result["test_faketensor"] != "SUCCESS"


@pytest.mark.parametrize("act", [(0, 0.0, 0.0), (2, -1.0, 2.0), (3, 0.1, 0.0), (4, 0.0, 0.0), (7, 0.0, 0.0),
                                 (8, 0.7, 0.0)], ids=["identity", "hardtanh", "leaky_relu", "silu", "gelu_tanh", "elu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_ops_with_activations(device, act, layout):
    """The ops' trailing act arguments through schema, fake, autograd registration and AOT dispatch."""
    x, mean, rstd, weight, bias, key = _sample(layout, torch.float32, "affine", device)
    grad_args = [t.detach().requires_grad_() for t in (x, weight, bias)]
    args = (grad_args[0], mean, rstd, grad_args[1], grad_args[2], key, 0.3, True, *act)
    torch.library.opcheck(torch.ops.bnfused.forward.default, args)
    grad_out = torch.randn(x.shape, device=device)
    torch.library.opcheck(torch.ops.bnfused.backward_reduce.default,
                          (grad_out, x, mean, rstd, weight, bias, key, 0.3, None, *act))
    sums = torch.ops.bnfused.backward_reduce(grad_out, x, mean, rstd, weight, bias, key, 0.3, None, *act)
    torch.library.opcheck(torch.ops.bnfused.backward_input.default,
                          (grad_out, x, mean, rstd, weight, bias, key, 0.3, *sums, x.numel() // x.shape[1], None,
                           *act))
    if act[0] in (0, 2):  # the block tail's activations
        residual = torch.randn(x.shape, device=device).requires_grad_()
        torch.library.opcheck(torch.ops.bnfused.add_relu_forward_bits.default,
                              (grad_args[0], residual, mean, rstd, grad_args[1], grad_args[2], key, 0.3, True, *act))
