"""The benchmark suite (python -m benchmarks): a --quick run (subprocess, default results location) prints progress lines and the
markdown tables, writes the results file (and the plot when matplotlib imports) into the untracked
benchmarks/results/local/ and leaves the published results untouched; its wording speaks of goals; the goal
checks, the noisy flag and the plot on synthetic numbers. Timings are never asserted."""
import hashlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # `make test-fast` leaves these out (marker: pyproject.toml)

REPO = Path(__file__).resolve().parent.parent
PEERS = ("eager", "compile", "bnfused", "bnfused+compile")
MODES = ("train fwd", "train fwd+bwd", "eval fwd")


def _table_rows(text: str, header_start: str) -> list[list[str]]:
    """Cells of the markdown table whose header line starts with header_start."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [[c.strip() for c in lines[start].strip("|").split("|")]] + rows


PUBLISHED = REPO / "benchmarks" / "results"
LOCAL = PUBLISHED / "local"
TIMING_CELL = r"[\d.]+ \([\d.]+\)( noisy)?"  # median (IQR), marked when the rounds disagree


def _published_files() -> dict[str, str]:
    """sha256 of every file directly in benchmarks/results/ (the published results and history)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in PUBLISHED.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def quick_run():
    """One --quick run with the default results location, as `make bench BENCH_ARGS=--quick` runs it."""
    device = "cuda" if torch.cuda.is_available() and __import__("bnfused").WITH_CUDA else "cpu"
    for stale in LOCAL.glob("*-quick.*") if LOCAL.exists() else ():
        stale.unlink()
    published = _published_files()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--device", device],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, LOCAL, device, published


def test_quick_prints_progress_and_table(quick_run):
    stdout, _, device, _ = quick_run
    progress = [line for line in stdout.splitlines() if re.match(r"\[\s*\d+/\d+\]", line)]
    assert len(progress) == 2 * len(MODES)  # one line per case and mode, as they run
    assert "copy bandwidth:" in stdout
    rows = _table_rows(stdout, "| case | mode |")
    header, body = rows[0], rows[1:]
    peers = PEERS if device == "cpu" else ("eager", "eager no-cuDNN") + PEERS[1:]
    assert header[2:2 + len(peers)] == [f"{p} ms" for p in peers]
    assert len(body) == 2 * len(MODES)
    for row in body:
        assert row[1] in MODES
        for cell in row[2:2 + len(peers)]:  # "median (IQR)" for every peer
            assert re.fullmatch(TIMING_CELL, cell), row
        assert re.fullmatch(r"[\d.]+x", row[2 + len(peers)]), row  # bnfused vs eager
    assert "## Goals: " in stdout and "## End to end" in stdout
    models = _table_rows(stdout, "| network |")  # end to end, quick: the small CNN and resnet18
    assert [row[0] for row in models[1:]] == ["small CNN", "resnet18"]
    for row in models[1:]:
        assert re.match(r"\d+ / \d+ \(", row[2]) and re.fullmatch(r"[\d.]+x \([\d.]+-[\d.]+\)", row[5]), row
    assert models[1][2].startswith("4 / 4") and models[2][2].startswith("17 / 17")
    tail = _table_rows(stdout, "| shape | mode | eager ms | compile ms | bnfused ms |")
    assert len(tail) > 1 and all(re.fullmatch(r"[\d.]+x", row[5]) for row in tail[1:]), tail
    small = _table_rows(stdout, "| case | mode | eager ms | bnfused ms |")
    assert len(small) == 1 + 2 * 4  # 4 small shapes x (train fwd, train fwd+bwd)
    for row in small[1:]:
        assert row[1] in ("train fwd", "train fwd+bwd")
        assert re.fullmatch(TIMING_CELL, row[2]) and re.fullmatch(TIMING_CELL, row[3]), row
        assert re.fullmatch(r"[\d.]+x", row[4]), row
    acts = _table_rows(stdout, "| activation | eager ms |")  # every activation's block, against the ReLU block's
    assert [row[0] for row in acts[1:]] == ["relu", "relu6", "leaky_relu(0.01)", "silu", "hardswish", "gelu",
                                             "gelu_tanh", "elu(1)", "mish", "identity"]
    for row in acts[1:]:
        assert re.fullmatch(r"[\d.]+x( \(below goal\))?", row[4]) and re.fullmatch(r"[\d.]+x.*", row[6]), row
        assert re.fullmatch(r"[\d.]+ -> [\d.]+", row[7]), row  # saved MB, eager -> bnfused
    real = _table_rows(stdout, "| model | BNs fused / all |")  # torchvision's own mobilenet_v2, when installed
    if len(real) > 1:
        assert real[1][0] == "tv_mobilenet_v2" and re.match(r"\d+ / 52", real[1][1]), real
    compiled = _table_rows(stdout, "| model | mode | eager ms |")
    assert [row[1] for row in compiled[1:]] == ["train p>0", "train p=0", "eval"]  # the quick suite's small CNN
    for row in compiled[1:]:
        assert all(re.fullmatch(TIMING_CELL, cell) for cell in row[2:6]), row
        assert all(re.fullmatch(r"[\d.]+x( below goal)?", cell) for cell in row[6:8]), row


def test_quick_writes_results_file_and_plot(quick_run):
    stdout, out, _, _ = quick_run
    results = list(out.glob("*-quick.md"))
    assert len(results) == 1, list(out.iterdir())
    text = results[0].read_text()
    for needle in ("**device**", "**torch**", "**date**", "**git commit**", "**threads**", "**copy bandwidth**",
                   "Byte model:", "## Comparison", "## Goals: ", "## End to end", "saved B/elem bnfused",
                   "backward_input", "## Every peer", "## Small layers", "| network |",
                   "## Compiled models", "## Block tail"):
        assert needle in text, needle
    memory = _table_rows(text, "| case | saved B/elem")
    fused_col = memory[0].index("saved B/elem bnfused")
    for row in memory[1:]:
        assert 0 < float(row[fused_col]) < 4.5  # fp32 input saved once, plus O(C)
    if importlib.util.find_spec("matplotlib") is not None:
        png = results[0].with_suffix(".png")
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot: {png.name}" in stdout
    else:
        assert "plot skipped: matplotlib not available" in stdout


def test_default_run_leaves_published_results_untouched(quick_run):
    """Without --publish the run writes into benchmarks/results/local/ (ignored by git), never over the published
    results; `make bench-publish` (bench.py --publish) is the only way to replace them."""
    stdout, _, _, published_before = quick_run
    assert _published_files() == published_before
    assert f"results: {LOCAL}" in stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", str(LOCAL / "x-quick.md")], cwd=REPO)
    if ignored.returncode != 128:  # 128: not a git checkout (an unpacked sdist)
        assert ignored.returncode == 0, "benchmarks/results/local/ must be ignored by git"


def test_quick_output_speaks_of_goals(quick_run):
    stdout, out, _, _ = quick_run
    results = next(out.glob("*-quick.md")).read_text()
    for text in (stdout, results):
        assert "MISSED" not in text and not re.search(r"\bissues?\b", text, re.IGNORECASE)
    goals = _table_rows(stdout, "| check | measured | goal | met |")
    assert all(row[3] in ("yes", "below goal") for row in goals[1:]), goals


def test_out_and_publish_arguments():
    from benchmarks import bench
    assert bench.parse_args([]).out == LOCAL
    assert bench.parse_args(["--publish"]).out == PUBLISHED
    assert bench.parse_args(["--out", "/tmp/x"]).out == Path("/tmp/x")
    with pytest.raises(SystemExit):
        bench.parse_args(["--publish", "--out", "/tmp/x"])


@pytest.fixture
def bench_modules():
    from benchmarks import cases, measure, parity, plot, results, targets
    return cases, measure, plot, results, targets, parity


def _synthetic_run(bench_modules, fused_ms: float):
    cases, measure, _, results, _ = bench_modules[:5]
    case = cases.Case(cases.CNN_SHAPES[0], torch.float32)
    cr = results.CaseResult(case)
    for mode in MODES:
        cr.timings[(mode, "eager")] = measure.Timing(0.180, 0.01, 5)
        cr.timings[(mode, "compile")] = measure.Timing(0.170, 0.01, 5)
        cr.timings[(mode, "bnfused")] = measure.Timing(fused_ms / 1e3, 0.001, 20)
    run = results.RunResults(meta={"device": "test", "threads": "2", "torch": torch.__version__}, peers=list(PEERS[:3]),
                             modes=MODES, copy_gbs=38.0)
    run.cases.append(cr)
    return run


def test_cpu_targets_met_and_missed(bench_modules):
    targets = bench_modules[4]
    fast = targets.cpu_checks(_synthetic_run(bench_modules, fused_ms=10.0))   # 18x eager, 17x compile
    slow = targets.cpu_checks(_synthetic_run(bench_modules, fused_ms=60.0))   # 3x eager
    speed = [c for c in fast if "vs" in c.what and "GB/s" not in c.what]
    assert {c.goal for c in speed} == {">= 8.0x", ">= 7.0x"} and all(c.met for c in speed)
    assert not any(c.met for c in slow if "vs eager" in c.what)
    # 3 passes x 51.4 MB in 10 ms = 15.4 GB/s = 41 % of 38 GB/s: more than 2x the copy floor -> missed
    floor = [c for c in fast if "copy floor" in c.what]
    assert len(floor) == 1 and not floor[0].met and floor[0].measured == "41 % of copy"


def test_goals_table_says_below_goal(bench_modules):
    targets = bench_modules[4]
    from benchmarks.report import goals_table
    text = goals_table(targets.cpu_checks(_synthetic_run(bench_modules, fused_ms=60.0)))
    assert "below goal" in text and "MISSED" not in text
    assert text.splitlines()[0] == "| check | measured | goal | met |"


def test_noisy_measurement_is_flagged(bench_modules):
    """A measurement whose rounds' medians disagree by more than NOISY_SPREAD is marked noisy in the tables."""
    measure = bench_modules[1]
    from benchmarks.report import fmt_timing
    steady = measure.Timing(0.010, 0.001, 5, (0.010, 0.011, 0.012))
    noisy = measure.Timing(0.010, 0.001, 5, (0.010, 0.035, 0.5))
    assert not steady.noisy and noisy.noisy and noisy.spread == pytest.approx(50.0)
    assert not measure.Timing(0.010, 0.001, 5).noisy  # no rounds recorded: nothing to disagree
    assert fmt_timing(steady) == "10.0 (1.00)" and fmt_timing(noisy) == "10.0 (1.00) noisy"


def test_time_fn_records_every_round(bench_modules):
    measure = bench_modules[1]
    t = measure.time_fn(lambda: sum(range(100)), torch.device("cpu"), 1, min_time=0.01, max_time=0.02,
                        min_samples=2, rounds=3)
    assert len(t.round_medians) == 3 and t.median == min(t.round_medians)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot_times_and_noisy_speedups(bench_modules, tmp_path, monkeypatch):
    """The plot has a time panel (median with IQR whiskers) beside the speedup panel for every mode, and labels a
    noisy peer's bars "noisy" instead of with its number (a 381x that came from a disturbed round is no record)."""
    measure, plot = bench_modules[1], bench_modules[2]
    run = _synthetic_run(bench_modules, fused_ms=10.0)
    cr = run.cases[0]
    cr.timings[("train fwd", "bnfused")] = measure.Timing(0.180 / 381, 0.0001, 20, (0.180 / 381, 0.01, 0.01))
    drawn = []  # (panel title, peer, bar labels as drawn)
    draw = plot._draw_bars

    def record(ax, xs, ys, noisy, width, label, color, texts, yerr=None):
        drawn.append((ax.get_title(), label, ["noisy" if bad else t for bad, t in zip(noisy, texts)]))
        return draw(ax, xs, ys, noisy, width, label, color, texts, yerr)

    monkeypatch.setattr(plot, "_draw_bars", record)
    note = plot.plot_speedups(run, tmp_path / "x.png")
    assert note == "plot: x.png" and (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"
    assert {title for title, _, _ in drawn} == {f"{m}: {kind}" for m in MODES for kind in ("time", "speedup")}
    bars = {(title, peer): texts for title, peer, texts in drawn}
    assert bars[("train fwd: speedup", "bnfused")] == ["noisy"]  # not 381.0
    assert bars[("train fwd: time", "bnfused")] == ["noisy"]
    assert bars[("eval fwd: speedup", "bnfused")] == ["18.0"]  # steady measurements keep their number
    assert bars[("eval fwd: time", "eager")] == ["180"]  # absolute median, ms


def test_plot_skipped_without_matplotlib(bench_modules, monkeypatch, tmp_path):
    plot = bench_modules[2]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    note = plot.plot_speedups(_synthetic_run(bench_modules, 10.0), tmp_path / "x.png")
    assert note == "plot skipped: matplotlib not available"
    assert not (tmp_path / "x.png").exists()


def test_parity_pairs_interleaved_timings(bench_modules):
    """Every channels_last / reduced-precision case is paired with contiguous float32 of its shape (when the suite
    has it), and each mode of a pair gets a timing per side."""
    cases, parity = bench_modules[0], bench_modules[5]
    f32, shape = torch.float32, (2, 4, 8, 8)
    suite_cases = (cases.Case(shape, f32), cases.Case(shape, f32, True), cases.Case(shape, torch.bfloat16),
                   cases.Case((16, 8), torch.bfloat16))  # no float32 (16, 8): unpaired
    pairs = parity.parity_pairs(suite_cases)
    assert pairs == [(suite_cases[1], suite_cases[0]), (suite_cases[2], suite_cases[0])]
    suite = cases.Suite("test", suite_cases, min_time=0.01, max_time=0.02, min_samples=2)
    res = parity.measure_parity(suite, 0.1, torch.device("cpu"), 1)
    assert [(r.case, r.ref, r.mode) for r in res] == [(c, ref, m) for c, ref in pairs for m in MODES]
    assert all(r.timing.median > 0 and r.ref_timing.median > 0 for r in res)
    # The mask alone is timed for the reduced-precision training modes only.
    with_mask = [(r.case.dtype, r.mode) for r in res if r.mask_timing is not None]
    assert with_mask == [(torch.bfloat16, m) for m in MODES if m != "eval fwd"]
    assert all(r.mask_timing.median > 0 for r in res if r.mask_timing is not None)


def test_parity_budget_scales_the_reference_by_bytes(bench_modules):
    """ms at ratio 1.0: the reference's time scaled by the two cases' bytes (half for bfloat16, same for
    channels_last); the parity table prints it, and the mask column only where it was timed."""
    cases, measure, _, results, _, parity = bench_modules
    from benchmarks.report import parity_table
    run = _synthetic_run(bench_modules, fused_ms=10.0)
    ref = run.cases[0].case
    cl, bf16 = cases.Case(ref.shape, torch.float32, True), cases.Case(ref.shape, torch.bfloat16)
    t = measure.Timing(0.010, 0.0, 5)
    run.parity = [parity.ParityResult(cl, ref, "train fwd", measure.Timing(0.009, 0.0, 5), t),
                  parity.ParityResult(bf16, ref, "train fwd", measure.Timing(0.006, 0.0, 5), t,
                                      measure.Timing(0.0042, 0.0, 5))]
    assert run.parity[0].budget_s == pytest.approx(0.010)
    assert run.parity[1].budget_s == pytest.approx(0.010 * bf16.bytes_moved("train fwd") / ref.bytes_moved("train fwd"))
    rows = [line for line in parity_table(run).splitlines() if "train fwd" in line]
    assert rows[0].rstrip(" |").endswith("10.0 | -")
    assert rows[1].rstrip(" |").endswith("| 4.20 (0.000)")


def test_per_byte_checks_use_interleaved_pairs(bench_modules):
    cases, measure, _, _, targets, parity = bench_modules
    run = _synthetic_run(bench_modules, fused_ms=10.0)
    ref = run.cases[0].case
    cl, bf16 = cases.Case(ref.shape, torch.float32, True), cases.Case(ref.shape, torch.bfloat16)
    t = measure.Timing(0.010, 0.0, 5)
    run.parity = [parity.ParityResult(cl, ref, "train fwd", measure.Timing(0.009, 0.0, 5), t),   # faster: met
                  parity.ParityResult(bf16, ref, "train fwd", measure.Timing(0.006, 0.0, 5), t)]  # half the bytes
    per_byte = [c for c in targets.cpu_checks(run) if "per byte" in c.goal]
    assert [c.met for c in per_byte] == [True, False]
    assert per_byte[1].measured == f"{run.gbs(bf16, 'train fwd', run.parity[1].timing):.1f} vs " \
                                   f"{run.gbs(ref, 'train fwd', t):.1f}"


def test_copy_floor_check_uses_the_interleaved_copy(bench_modules):
    """With an interleaved floor measurement the check compares against its copy, not the run's."""
    measure, targets = bench_modules[1], bench_modules[4]
    from benchmarks.copy_floor import FloorResult
    run = _synthetic_run(bench_modules, fused_ms=10.0)  # 41 % of the run's 38 GB/s
    run.cases[0].floor = FloorResult(measure.Timing(0.010, 0.0, 5), copy_gbs=20.0)  # 15.4 of 20 GB/s
    floor = [c for c in targets.cpu_checks(run) if "copy floor" in c.what]
    assert len(floor) == 1 and floor[0].met and floor[0].measured.startswith("77 % of copy (15.4 of 20.0 GB/s")


def test_measure_floor_times_module_and_copy(bench_modules):
    cases = bench_modules[0]
    from benchmarks.copy_floor import measure_floor
    from benchmarks.peers import FUSED, Peer, fused_block
    case = cases.Case((2, 4, 8, 8), torch.float32)
    module = fused_block(case, 0.1, torch.device("cpu"))
    x = case.make_input(torch.device("cpu")).requires_grad_()
    suite = cases.Suite("test", (case,), min_time=0.01, max_time=0.02, min_samples=2)
    res = measure_floor(Peer(FUSED, module, module), x, torch.randn_like(x), suite, 1, nbytes=2**20)
    assert res.timing.median > 0 and res.copy_gbs > 0
