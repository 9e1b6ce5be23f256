"""bnfused benchmark (`make bench`): fused BatchNorm -> ReLU -> Dropout against eager and torch.compile peers.

Prints one progress line per case and mode as it runs, then every part's markdown table (the per-case comparison,
the speed goals met or below goal, end to end, small layers, compiled models, the block tail, SyncBatchNorm);
writes the same tables into <device>.md (and a PNG plot when matplotlib imports) in benchmarks/results/local/,
which git ignores, or with --publish into benchmarks/results/, replacing the published results. Suites: default
(< 5 min on a 2-core CPU), --quick (~1 min smoke run, results file <device>-quick.md), --full (every shape, dtype and
memory format, <device>-full.md).

    python -m benchmarks [--quick | --full] [--publish | --out DIR] [--device cpu|cuda] [--threads N] [--p P]
                         [--only PART ...]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# A fresh inductor cache per run: torch's on-disk graph caches are not keyed by a custom op's schema, so graphs
# compiled against an older bnfused build could be replayed against this one.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bnfused-bench-inductor-"))

import torch

import bnfused

from . import activations, bench_sync, compiled_models, end_to_end, real_models
from .add_relu import add_relu_table, run_add_relu
from .cases import MODES, Case, Suite, make_suite
from .copy_floor import measure_floor
from .environment import device_name, load_average, run_meta, slug
from .kernels import time_kernels
from .measure import NOISY_SPREAD, copy_bandwidth, first_call_seconds, peak_step_bytes, saved_bytes, time_fn
from .parity import measure_parity, parity_pairs
from .peers import COMPILE, EAGER, FUSED, Peer, make_peers, peer_names, step
from .plot import plot_speedups
from .report import (fmt_ms, fmt_x, goals_table, header_markdown, parity_table, results_markdown, small_layers_table,
                     summary_table)
from .results import CaseResult, RunResults
from .small_layers import run_small_layers
from .targets import check_goals

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PUBLISHED_RESULTS = HERE / "results"        # committed: replaced only with --publish (make bench-publish)
LOCAL_RESULTS = PUBLISHED_RESULTS / "local"  # every other run (.gitignore)
# The parts after the per-case kernels ("cases"); --only picks some. Each returns its section's markdown.
PARTS = ("cases", "end-to-end", "compiled-models", "block-tail", "activations", "real-models", "sync")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke run: two cases, few repeats (~1 minute)")
    size.add_argument("--full", action="store_true", help="every shape, dtype and memory format")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=LOCAL_RESULTS,
                       help="results directory (default: benchmarks/results/local, not tracked by git)")
    where.add_argument("--publish", action="store_true",
                       help="write into benchmarks/results/, replacing the published results of this device")
    default_device = "cuda" if torch.cuda.is_available() and bnfused.WITH_CUDA else "cpu"
    parser.add_argument("--device", default=default_device, help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for every peer (default: %(default)s)")
    parser.add_argument("--p", type=float, default=0.1, help="dropout probability (default: %(default)s)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    parser.add_argument("--no-sync", action="store_true",
                        help="skip the SyncBatchNorm part (2 gloo processes; always skipped with --quick)")
    parser.add_argument("--only", nargs="+", choices=PARTS, metavar="PART",
                        help=f"run only these parts ({', '.join(PARTS)}; default: all)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    if args.device.type == "cuda" and not (torch.cuda.is_available() and bnfused.WITH_CUDA):
        parser.error("--device cuda needs a GPU and bnfused built with CUDA kernels")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if not 0.0 <= args.p < 1.0:
        parser.error("--p must be in [0, 1)")
    args.suite = "quick" if args.quick else "full" if args.full else "default"
    if args.publish:
        args.out = PUBLISHED_RESULTS
    return args


def say(line: str) -> None:
    print(line, flush=True)


def measure_mode(cr: CaseResult, peers: list[Peer], mode: str, x: torch.Tensor, grad_out: torch.Tensor,
                 suite: Suite, threads: int) -> list[Peer]:
    """Times every peer in one mode; returns the peers still usable (a peer whose compilation fails is dropped)."""
    alive = []
    for peer in peers:
        fn = step(peer, mode, x, grad_out)
        with peer.context():
            try:
                first = first_call_seconds(fn, x.device)  # warm-up; compiles the graph for compiled peers
            except Exception as exc:  # noqa: BLE001 -- report a broken torch.compile toolchain and go on
                if not peer.compiled:
                    raise
                say(f"    {peer.name} failed on {cr.case.label} {mode}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            if peer.compiled:
                cr.warmup_s[peer.name] = cr.warmup_s.get(peer.name, 0.0) + first
            cr.timings[(mode, peer.name)] = time_fn(fn, x.device, threads, min_time=suite.min_time,
                                                    max_time=suite.max_time, min_samples=suite.min_samples)
        alive.append(peer)
    return alive


def progress_line(run: RunResults, cr: CaseResult, mode: str, index: int, total: int, start: float) -> str:
    parts = [f"{p} {fmt_ms(cr.timings[(mode, p)].median)} ms" for p in run.peers if (mode, p) in cr.timings]
    fused = cr.timings.get((mode, FUSED))
    if fused is not None:
        gbs = run.gbs(cr.case, mode, fused)
        parts.append(f"bnfused {fmt_x(run.speedup(cr, mode, FUSED, EAGER))} eager, "
                     f"{fmt_x(run.speedup(cr, mode, FUSED, COMPILE))} compile, {gbs:.1f} GB/s "
                     f"({run.pct_copy(gbs):.0f}% copy)")
    return (f"[{index:>2}/{total}] {cr.case.label:<26} {mode:<13} | " + " | ".join(parts)
            + f" | {time.perf_counter() - start:.0f} s")


def run_case(run: RunResults, case: Case, args: argparse.Namespace, suite: Suite, index: int, total: int,
             start: float) -> CaseResult:
    cr = CaseResult(case)
    run.cases.append(cr)
    x = case.make_input(args.device).requires_grad_()
    grad_out = torch.randn_like(x)  # keeps x's memory format
    peers = make_peers(case, args.p, args.device, with_compile=not args.no_compile)
    for m, mode in enumerate(MODES):
        peers = measure_mode(cr, peers, mode, x, grad_out, suite, args.threads)
        say(progress_line(run, cr, mode, index * len(MODES) + m + 1, total * len(MODES), start))
    fused = next((peer for peer in peers if peer.name == FUSED), None)
    if fused is not None and args.device.type == "cpu":  # the CPU goals' copy floor
        cr.floor = measure_floor(fused, x, grad_out, suite, args.threads)
    for peer in peers:
        peer.module.train()
        with peer.context():
            cr.saved_bytes[peer.name] = saved_bytes(lambda: peer.forward(x))
            peak = peak_step_bytes(step(peer, "train fwd+bwd", x, grad_out), args.device)
        if peak is not None:
            cr.peak_bytes[peer.name] = peak
    cr.kernels = time_kernels(case, x, grad_out, args.p, args.threads, min_time=suite.min_time,
                              max_time=suite.max_time, min_samples=suite.min_samples)
    del peers, x, grad_out
    torch._dynamo.reset()  # drop this case's graphs: no recompile limit, no stale memory
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return cr


def run_parts(args: argparse.Namespace, suite: Suite, parts: set[str]) -> list[tuple[str, str]]:
    """The (title, markdown) section of every part after the per-case kernels, in PARTS order."""
    sections = []
    quick = suite.name == "quick"
    if "end-to-end" in parts:
        say("end to end: training steps, unconverted vs bnfused.convert(model), rounds alternating ...")
        sections.append(("End to end: training step, unconverted vs bnfused.convert(model)",
                         end_to_end.markdown(end_to_end.run(args.device, args.threads, quick=quick))))
    if "compiled-models" in parts:
        say("compiled models: unconverted vs bnfused.convert(), eager and torch.compile, rounds interleaved ...")
        sections.append(("Compiled models", compiled_models.markdown(
            compiled_models.run(suite.name, args.device, args.threads, say=say))))
    if "block-tail" in parts:
        say("block tail: relu(bn(x) + residual), bnfused vs eager and compiled unfused, rounds interleaved ...")
        results = run_add_relu(args.device, args.threads, min_time=suite.min_time, max_time=suite.max_time,
                               min_samples=suite.min_samples,
                               with_compile=not args.no_compile and not quick)  # compiling: ~1 min
        sections.append(("Block tail: BN + residual add + ReLU (median ms, slowest/fastest round in parentheses)",
                         add_relu_table(results)))
    if "activations" in parts:
        say("activations: BatchNormActDropout2d per activation vs eager / compiled unfused chains and the ReLU "
            "block, rounds interleaved ...")
        shape, results = activations.run(args.device, args.threads, quick=quick, min_time=suite.min_time,
                                         max_time=suite.max_time, min_samples=suite.min_samples,
                                         with_compile=not args.no_compile and not quick)
        sections.append(("Activations: BN -> activation -> Dropout, every activation (median ms)",
                         activations.markdown(shape, results)))
    if "real-models" in parts:
        say("real models: torchvision / timm models, saved bytes and step time, unconverted vs converted ...")
        results, absent = real_models.run(args.device, args.threads, quick=quick)
        sections.append(("Real models: saved for backward and step time, unconverted vs bnfused.convert()",
                         real_models.markdown(results, absent)))
    if "sync" in parts:
        say("sync: SyncBatchNormReLUDropout vs nn.SyncBatchNorm chain, 2 gloo processes ...")
        sections.append(("Multi-process: SyncBatchNorm", bench_sync.markdown(bench_sync.run(quick=suite.name == "default"))))
    return sections


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    suite = make_suite(args.suite, args.device)
    parts = set(args.only or PARTS)
    if suite.name == "quick" or args.no_sync:
        parts.discard("sync")
    if args.no_compile:
        parts.discard("compiled-models")
    meta = run_meta(args.device, args.threads, suite.name, args.p, REPO)
    load_first = load_average()
    names = peer_names(args.device, with_compile=not args.no_compile)
    say(f"bnfused benchmark: {meta['device']} | torch {meta['torch']} | {args.threads} threads | suite {suite.name}: "
        f"{len(suite.cases)} cases x {len(MODES)} modes | peers: {', '.join(names)} | parts: "
        + ", ".join(p for p in PARTS if p in parts))
    copy_first = copy_bandwidth(args.device, args.threads)
    say(f"copy bandwidth: {copy_first:.1f} GB/s (256 MiB float32 copy_, read + write; measured again at the end)")
    run = RunResults(meta=meta, peers=names, modes=MODES, copy_gbs=copy_first)
    if "cases" in parts:
        for i, case in enumerate(suite.cases):
            run_case(run, case, args, suite, i, len(suite.cases), start)
        if parity_pairs(suite.cases):
            say("per-byte parity: channels_last / bfloat16 vs contiguous float32, rounds interleaved ...")
            run.parity = measure_parity(suite, args.p, args.device, args.threads)
        say("small layers: fixed cost per call, bnfused vs the eager chain, rounds interleaved ...")
        run.small = run_small_layers(suite, args.p, args.device, args.threads)
    sections = run_parts(args, suite, parts)
    # The device's bandwidth is the better of two copies: one measured while a neighbour loads the machine
    # would otherwise inflate every "% copy".
    copy_last = copy_bandwidth(args.device, args.threads)
    run.copy_gbs = max(copy_first, copy_last)
    meta["copy bandwidth runs"] = (f"{copy_first:.1f} GB/s at the start, {copy_last:.1f} GB/s at the end "
                                   "(the max is used)")
    meta["load average"] = f"{load_first} at the start, {load_average()} at the end (1/5/15 min)"

    args.out.mkdir(parents=True, exist_ok=True)
    stem = slug(device_name(args.device)) + ("" if suite.name == "default" else f"-{suite.name}")
    elapsed = time.perf_counter() - start
    results_path = args.out / f"{stem}.md"
    if "cases" in parts:
        run.plot_note = plot_speedups(run, args.out / f"{stem}.png")
        goals_title, checks = check_goals(run, args.device)
        head = results_markdown(run, goals_title, checks, elapsed)
    else:
        head = header_markdown(run) + f"- **run time**: {elapsed:.0f} s\n"
    # The hand-kept before/after record of this device (what moved the numbers, commit by commit), if any.
    history_path = PUBLISHED_RESULTS / f"{slug(device_name(args.device))}-history.md"
    history = f"\n## Before / after\n\n{history_path.read_text()}" if history_path.exists() else ""
    results_path.write_text(head + "".join(f"\n## {title}\n\n{md}\n" for title, md in sections) + history)

    if "cases" in parts:
        say("\n## Comparison (median ms, IQR in parentheses)\n")
        say(summary_table(run))
        if run.parity:
            say("\n## Per-byte parity (rounds interleaved)\n")
            say(parity_table(run))
        say(f"\n## Goals: {goals_title}\n")
        say(goals_table(checks))
        say("\n## Small layers (fixed cost per call)\n")
        say(small_layers_table(run))
    for title, md in sections:
        say(f"\n## {title}\n")
        say(md)
    say(f"\n% copy is relative to {run.copy_gbs:.1f} GB/s ({meta['copy bandwidth runs']})")
    say(f"load average: {meta['load average']}")
    noisy = [f"{cr.case.label} {mode} {peer}" for cr in run.cases for (mode, peer), t in cr.timings.items()
             if t.noisy]
    if noisy:
        say(f"noisy (rounds disagree by more than {NOISY_SPREAD:g}x, marked 'noisy'; rerun on a quieter machine): "
            + "; ".join(noisy))
    say(f"results: {results_path}")
    if run.plot_note:
        say(run.plot_note)
    say(f"total: {elapsed:.0f} s")
    return 0
