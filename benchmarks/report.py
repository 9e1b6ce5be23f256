"""Markdown for a run: the comparison table printed on stdout and the full results file."""
from __future__ import annotations

from typing import Optional, Sequence

from .cases import BYTE_MODEL
from .measure import NOISY_SPREAD, Timing
from .peers import COMPILE, EAGER, FUSED
from .results import RunResults
from .targets import Check


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_timing(t: Optional[Timing]) -> str:
    """median (IQR) in ms; "noisy" after a measurement whose rounds disagree (measure.NOISY_SPREAD)."""
    if t is None:
        return "-"
    return f"{fmt_ms(t.median)} ({fmt_ms(t.iqr)})" + (" noisy" if t.noisy else "")


def fmt_x(s: Optional[float]) -> str:
    return "-" if s is None else f"{s:.2f}x"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(run: RunResults) -> str:
    """One row per case and mode: every peer's median (IQR) in ms, bnfused's speedups and bandwidth."""
    header = ["case", "mode"] + [f"{p} ms" for p in run.peers] + [
        f"{FUSED} vs {EAGER}", f"{FUSED} vs {COMPILE}", f"{FUSED} GB/s", "% copy"]
    rows = []
    for cr in run.cases:
        for mode in run.modes:
            t = cr.timings.get((mode, FUSED))
            gbs = run.gbs(cr.case, mode, t) if t else None
            rows.append([cr.case.label, mode] + [fmt_timing(cr.timings.get((mode, p))) for p in run.peers] + [
                fmt_x(run.speedup(cr, mode, FUSED, EAGER)), fmt_x(run.speedup(cr, mode, FUSED, COMPILE)),
                "-" if gbs is None else f"{gbs:.1f}", "-" if gbs is None else f"{run.pct_copy(gbs):.0f}"])
    return table(header, rows)


def detail_table(run: RunResults) -> str:
    header = ["case", "mode", "peer", "median ms", "IQR ms", "runs", "GB/s", "% copy", "vs eager", "vs compile"]
    rows = []
    for cr in run.cases:
        for mode in run.modes:
            for peer in run.peers:
                t = cr.timings.get((mode, peer))
                if t is None:
                    continue
                gbs = run.gbs(cr.case, mode, t)
                rows.append([cr.case.label, mode, peer, fmt_ms(t.median), fmt_ms(t.iqr), str(t.samples),
                             f"{gbs:.1f}", f"{run.pct_copy(gbs):.0f}", fmt_x(run.speedup(cr, mode, peer, EAGER)),
                             fmt_x(run.speedup(cr, mode, peer, COMPILE))])
    return table(header, rows)


def memory_table(run: RunResults) -> str:
    """Saved-for-backward bytes per input element, and (CUDA) the peak memory of a training step."""
    with_peak = any(cr.peak_bytes for cr in run.cases)
    header = ["case"] + [f"saved B/elem {p}" for p in run.peers]
    if with_peak:
        header += [f"peak MB {p}" for p in run.peers]
    rows = []
    for cr in run.cases:
        row = [cr.case.label] + [f"{cr.saved_bytes[p] / cr.case.numel:.2f}" if p in cr.saved_bytes else "-"
                                 for p in run.peers]
        if with_peak:
            row += [f"{cr.peak_bytes[p] / 2**20:.0f}" if p in cr.peak_bytes else "-" for p in run.peers]
        rows.append(row)
    return table(header, rows)


def kernel_table(run: RunResults) -> str:
    rows = []
    for cr in run.cases:
        for k in cr.kernels:
            gbs = cr.case.numel * cr.case.element_size * k.passes / k.timing.median / 1e9
            rows.append([cr.case.label, k.op, str(k.passes), fmt_timing(k.timing), f"{gbs:.1f}",
                         f"{run.pct_copy(gbs):.0f}"])
    return table(["case", "bnfused op", "passes", "median ms (IQR)", "GB/s", "% copy"], rows)


def warmup_table(run: RunResults) -> str:
    compiled = [p for p in run.peers if any(p in cr.warmup_s for cr in run.cases)]
    rows = [[cr.case.label] + [f"{cr.warmup_s[p]:.1f}" if p in cr.warmup_s else "-" for p in compiled]
            for cr in run.cases]
    return table(["case"] + [f"{p} first calls s" for p in compiled], rows)


def small_layers_table(run: RunResults) -> str:
    if not run.small:
        return "(not run)"
    rows = [[r.case.label, r.mode, fmt_timing(r.unfused), fmt_timing(r.fused), fmt_x(r.speedup)] for r in run.small]
    return table(["case", "mode", "eager ms", "bnfused ms", "bnfused vs eager"], rows)


def parity_table(run: RunResults) -> str:
    rows = []
    for r in run.parity:
        gbs, gbs_ref = run.parity_gbs(r)
        mask = fmt_timing(r.mask_timing) if r.mask_timing is not None else "-"
        rows.append([r.case.label, r.mode, fmt_timing(r.timing), r.ref.label, fmt_timing(r.ref_timing),
                     f"{gbs:.1f}", f"{gbs_ref:.1f}", f"{gbs / gbs_ref:.2f}", fmt_ms(r.budget_s), mask])
    return table(["case", "mode", "bnfused ms", "reference", "reference ms", "GB/s", "reference GB/s",
                  "per-byte ratio", "ms at ratio 1.0", "mask alone ms"], rows)


def goals_table(checks: list[Check]) -> str:
    if not checks:
        return "(no case with a goal in this run)"
    return table(["check", "measured", "goal", "met"],
                 [[c.what, c.measured, c.goal, "yes" if c.met else "below goal"] for c in checks])


def parity_section(run: RunResults) -> str:
    if not run.parity:
        return ""
    return f"""## Per-byte parity (rounds interleaved)

The per-byte goals compare each channels_last / bfloat16 case with contiguous float32 of the same shape. Both
bnfused modules are timed here with their rounds taken in turn, so a slow phase of the machine hits both alike
(the main table measures them minutes apart). GB/s uses the byte model above. "ms at ratio 1.0" is the time the
case would have to take to match the reference per byte; "mask alone ms" (reduced-precision training modes) is
its dropout mask generated alone in the same rounds (`ops.dropout_mask`): halving the bytes halves the memory
time of every pass but not the Philox work, which a training forward has to fit too.

{parity_table(run)}

"""


def header_markdown(run: RunResults) -> str:
    """The results file's title and the run's facts (device, torch, date, commit, ...)."""
    meta = "\n".join(f"- **{k}**: {v}" for k, v in run.meta.items())
    return f"# bnfused benchmark: {run.meta['device']}\n\n{meta}\n"


def results_markdown(run: RunResults, goals_title: str, checks: list[Check], elapsed_s: float) -> str:
    return f"""{header_markdown(run)}- **copy bandwidth**: {run.copy_gbs:.1f} GB/s (256 MiB float32 `dst.copy_(src)`, read + write, same run)
- **run time**: {elapsed_s:.0f} s

Peers: {', '.join(run.peers)}. Times are medians over torch.utils.benchmark runs, IQR in parentheses; each
measurement is split into 3 rounds and keeps the round with the lowest median (peers and copy alike); "noisy"
marks a measurement whose rounds' medians differ by more than {NOISY_SPREAD:g}x (the machine was busy: do not
trust it, run again). The "within 2x of copy floor" goals time each case's bnfused training forward in rounds
interleaved with the same 256 MiB copy (the "% copy" columns use the run's copy bandwidth above).
Dropout p = {run.meta['dropout p']}; train modes take an input with requires_grad; fwd+bwd returns the grads of
the input, weight and bias (torch.autograd.grad); eval runs under no_grad.

Byte model: {BYTE_MODEL}

## Comparison

{summary_table(run)}

## Goals: {goals_title}

{goals_table(checks)}

{parity_section(run)}## Small layers (fixed cost per call)

Small float32 inputs, where Python, op dispatch and the autograd node outweigh the memory passes: bnfused's module
against the eager nn chain, rounds interleaved (benchmarks/small_layers.py).

{small_layers_table(run)}

## Memory

Saved-for-backward bytes per input element (saved_tensors_hooks, training forward); peak MB of a training
step above the live tensors (torch.cuda.max_memory_allocated, CUDA only).

{memory_table(run)}

## bnfused passes (each op of the training step timed alone)

The ops the module's training step runs: on the CPU forward_keep_bits, and the backward ops reading its keep bits
(1 bit per element, not counted in the passes); on CUDA forward, and the backward ops regenerating the mask.

{kernel_table(run)}

## First-call (warm-up / compilation) seconds, summed over the modes

{warmup_table(run)}

## Every peer

{detail_table(run)}

{run.plot_note}
"""
