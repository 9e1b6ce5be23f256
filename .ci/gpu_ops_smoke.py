#!/usr/bin/env python
"""Every bnfused op once on CUDA against the same op on the CPU, over the shapes that reach each kernel path (NCHW
and channels_last, 2-d, S not a multiple of 8, a channel split over several blocks, a base pointer misaligned by
one element), for float32 and bfloat16, p in {0, 0.3}, with ReLU; then every other activation on three of those
shapes (the block tail with its gate kinds: identity, hardtanh): the workload .ci/gpu_check.sh runs plain and under
compute-sanitizer (memcheck, racecheck, initcheck, synccheck), so it is short (seconds on a GPU).

Checked: dropout masks identical to the CPU's for the same key (the design's promise), forward outputs and pass
bits of CUDA against the CPU op fed the same (CUDA) statistics, bit for bit in float32 (one fma, one rounding on
both) for the piecewise-linear activations, to a few ulps for the transcendental ones (CUDA's expf/erff/tanhf are
not the CPU's Sleef), statistics, sums and gradients to float32 tolerance. Prints one line per case and a last line
"gpu_ops_smoke: N cases, F failures"; exits 1 on any failure. --quick: fewer cases (for the slow sanitizers).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bnfused from this checkout

import torch  # noqa: E402

import bnfused  # noqa: E402
from bnfused import Activation, ops  # noqa: E402

SHAPES = [  # (shape, channels_last): which kernel path each reaches
    ((64, 16), False),               # 2-d: C % 8 == 0
    ((37, 10), False),               # 2-d: C % 4 != 0
    ((4, 8, 7, 7), False),           # NCHW, S % 8 != 0
    ((4, 8, 7, 7), True),            # channels_last, S % 8 != 0
    ((2, 64, 16, 16), True),         # channels_last, S % 8 == 0
    ((64, 4, 32, 32), False),        # NCHW, few channels, a channel split over several blocks (last-block merge)
    ((32, 4, 2, 9, 9), True),        # channels_last_3d
]
QUICK = [0, 3, 5]
RELU = Activation("relu")
# The other activations (ReLU is the matrix above), with parameters where they take any; the gate kinds (identity,
# hardtanh) also through the block tail.
ACTIVATIONS = [
    Activation("identity"), Activation("hardtanh", 0.0, 6.0), Activation("hardtanh", -1.0, 0.5),
    Activation("leaky_relu", 0.2), Activation("silu"), Activation("hardswish"), Activation("gelu"),
    Activation("gelu_tanh"), Activation("elu", 0.7), Activation("mish"),
]
ACT_SHAPES = [0, 2, 3]  # 2-d, NCHW with S % 8 != 0, channels_last: the activation is per element in every path
ACT_QUICK = ([2, 3], [Activation("hardtanh", -1.0, 0.5), Activation("silu")])  # (shapes, activations) of --quick
PIECEWISE_LINEAR = {"identity", "relu", "hardtanh", "leaky_relu", "hardswish"}  # the rest take exp / erf / tanh
TOL = dict(rtol=1e-4, atol=1e-4)
DEVICE = "cuda"  # --device cpu: the same comparisons CPU against CPU, to check this script without a GPU


def make(shape, channels_last, dtype, misaligned):
    x = torch.randn(shape, dtype=torch.float32, device=DEVICE).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if misaligned:  # the same values one element past the allocation's start (ops keep the storage offset)
        flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=DEVICE)
        view = flat[1:].as_strided(x.shape, x.stride())
        view.copy_(x)
        x = view
    return x


def check(name, got, want, failures, exact=False, tol=TOL):
    got, want = got.detach().cpu(), want.detach().cpu()
    ok = torch.equal(got, want) if exact else torch.allclose(got.double(), want.double(), **tol, equal_nan=True)
    if not ok:
        diff = (got.double() - want.double()).abs().nan_to_num(float("inf"))
        failures.append(f"{name}: max |diff| {diff.max().item():.3g}" + (" (must be exact)" if exact else ""))


def tolerances(dtype, act):
    """(exact, tolerance) of forward outputs and the tolerance of gradients. The transcendental activations: CUDA's
    expf/erff/tanhf and the CPU's Sleef differ by a few float32 ulps (absolute near 0, where gelu's 1 + erf
    cancels), and a bfloat16 result may then round the other way (one ulp: up to 2^-7 relative)."""
    if act.kind in PIECEWISE_LINEAR:
        return dtype == torch.float32, TOL, TOL
    if dtype == torch.float32:
        return False, dict(rtol=1e-5, atol=2e-6), TOL
    one_ulp = dict(rtol=2**-7, atol=1e-4)
    return False, one_ulp, one_ulp


def run_case(shape, channels_last, dtype, misaligned, p, act=RELU):
    failures = []
    exact, y_tol, grad_tol = tolerances(dtype, act)
    x = make(shape, channels_last, dtype, misaligned)
    C = shape[1]
    w = torch.rand(C, device=DEVICE) + 0.5
    b = torch.randn(C, device=DEVICE) * 0.3
    rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    key = ops.philox_key(torch.device(DEVICE), seed=1234)
    key_cpu = key.cpu()
    xc = x.cpu()

    # dropout_mask: the same pattern on both devices for the same key
    check("dropout_mask", ops.dropout_mask(key, shape, 0.3), ops.dropout_mask(key_cpu, shape, 0.3), failures,
          exact=True)
    # statistics (running stats updated in place on both sides)
    mean, rstd = ops.batch_stats_update(x, rm, rv, 0.1, 1e-5)
    rm_c, rv_c = torch.zeros(C), torch.ones(C)
    mean_c, rstd_c = ops.batch_stats_update(xc, rm_c, rv_c, 0.1, 1e-5)
    for n, g_, w_ in (("mean", mean, mean_c), ("rstd", rstd, rstd_c), ("running_mean", rm, rm_c),
                      ("running_var", rv, rv_c)):
        check(n, g_, w_, failures)
    # forward with the CUDA statistics on both sides: bit for bit (float32, piecewise-linear activations)
    m_cpu, r_cpu = mean.cpu(), rstd.cpu()
    y = ops.forward(x, mean, rstd, w, b, key, p, True, *act.op_args)
    check("forward", y, ops.forward(xc, m_cpu, r_cpu, w.cpu(), b.cpu(), key_cpu, p, True, *act.op_args), failures,
          exact=exact, tol=y_tol)
    dy = torch.randn_like(y)
    sums = ops.backward_reduce(dy, x, mean, rstd, w, b, key, p, None, *act.op_args)
    sums_c = ops.backward_reduce(dy.cpu(), xc, m_cpu, r_cpu, w.cpu(), b.cpu(), key_cpu, p, None, *act.op_args)
    for n, g_, w_ in zip(("sum_g", "sum_g_xhat"), sums, sums_c):
        check(n, g_, w_, failures)
    count = x.numel() // C
    dx = ops.backward_input(dy, x, mean, rstd, w, b, key, p, sums[0], sums[1], count, None, *act.op_args)
    dx_c = ops.backward_input(dy.cpu(), xc, m_cpu, r_cpu, w.cpu(), b.cpu(), key_cpu, p, sums[0].cpu(),
                              sums[1].cpu(), count, None, *act.op_args)
    check("backward_input", dx, dx_c, failures, tol=grad_tol)

    if act.has_gate_bits:  # the block tail (its pass bits hold the gate of these kinds only)
        # forward (with and without the pass bits) and the bits bit for bit, the backward to tolerance
        res = torch.randn_like(x)
        ya, bits = ops.add_relu_forward_bits(x, res, mean, rstd, w, b, key, p, True, *act.op_args)
        ya_c, bits_c = ops.add_relu_forward_bits(xc, res.cpu(), m_cpu, r_cpu, w.cpu(), b.cpu(), key_cpu, p, True,
                                                 *act.op_args)
        check("add_relu_forward_bits", ya, ya_c, failures, exact=exact)
        check("add_relu_forward", ops.add_relu_forward(x, res, mean, rstd, w, b, key, p, True, *act.op_args), ya_c,
              failures, exact=exact)
        if dtype == torch.float32:  # in reduced precision a rounding tie may flip the gate at a kink (y == +-0)
            tail = x.numel() % 8  # bits past numel are unspecified
            n_full = x.numel() // 8
            check("pass_bits", bits[:n_full], bits_c[:n_full], failures, exact=True)
            if tail:
                mask = (1 << tail) - 1
                check("pass_bits tail", bits[n_full:] & mask, bits_c[n_full:] & mask, failures, exact=True)
        sa = ops.add_relu_backward_reduce(dy, x, mean, rstd, bits_c.to(DEVICE), p)
        sa_c = ops.add_relu_backward_reduce(dy.cpu(), xc, m_cpu, r_cpu, bits_c, p)
        for n, g_, w_ in zip(("add sum_g", "add sum_g_xhat"), sa, sa_c):
            check(n, g_, w_, failures)
        gx, gr = ops.add_relu_backward_input(dy, x, mean, rstd, w, bits_c.to(DEVICE), p, sa[0], sa[1], count)
        gx_c, gr_c = ops.add_relu_backward_input(dy.cpu(), xc, m_cpu, r_cpu, w.cpu(), bits_c, p, sa[0].cpu(),
                                                 sa[1].cpu(), count)
        check("add grad_input", gx, gx_c, failures)
        check("add grad_residual", gr, gr_c, failures, exact=exact)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="three shapes with ReLU, four activation cases, float32, p = 0.3 (for the sanitizers)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: run the comparisons CPU against CPU (a check of this script, not of the kernels)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not (torch.cuda.is_available() and bnfused.WITH_CUDA):
        print("gpu_ops_smoke: needs a GPU and bnfused built with CUDA kernels", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    ps = [0.3] if args.quick else [0.0, 0.3]
    act_shapes, acts = ACT_QUICK if args.quick else (ACT_SHAPES, ACTIVATIONS)
    relu_shapes = QUICK if args.quick else range(len(SHAPES))
    plan = [(i, RELU, misaligned) for i in relu_shapes for misaligned in (False, True)]  # (shape, act, misaligned)
    plan += [(i, act, False) for act in acts for i in act_shapes]
    cases = failed = 0
    for (i, act, misaligned), dtype, p in itertools.product(plan, dtypes, ps):
        shape, cl = SHAPES[i]
        cases += 1
        label = (f"{'x'.join(map(str, shape))} {'channels_last' if cl else 'contiguous'} {str(dtype)[6:]} p={p} "
                 f"{act}{' misaligned' if misaligned else ''}")
        try:
            failures = run_case(shape, cl, dtype, misaligned, p, act)
        except Exception as e:  # an op that raises fails this case; the others still run
            failures = [f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"]
        failed += bool(failures)
        print(f"{'ok  ' if not failures else 'FAIL'} {label}" + "".join(f"\n     {f}" for f in failures),
              flush=True)
    print(f"gpu_ops_smoke: {cases} cases, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
