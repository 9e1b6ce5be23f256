// Runs the real CUDA kernels (csrc/cuda/*.cuh) on the CPU emulation (cuda_emu.h) over a matrix of shapes, layouts,
// dtypes, dropout probabilities and base-pointer alignments, against the scalar reference of kernel_cases.h (the
// shared math of csrc/bn_math.h, csrc/philox.h): masks and forward bit for bit, statistics and sums to a tolerance.
// The BN + residual add + ReLU ops run on the same matrix (add_relu_cases.h).
// Usage: driver [--quick] [--mixed] [--only OP] [--counts] [--merge-cost]; exits non-zero after 5 mismatches
// (reported on stderr); --mixed runs only the cases whose buffers lie at different misalignments.
#include "kernel_cases.h"

#include <chrono>

namespace {

std::vector<Shape> shapes() {
  // N*S in {0, 1, 7, 8, 33, 257, ...}; S not a multiple of 8/32/256; shapes large enough to split a channel over
  // several blocks (the last-block merge of the split reduction) in both layouts.
  std::vector<Shape> all = {
      {0, 3, {4}},     {1, 5, {}},      {7, 6, {}},       {8, 16, {}},       {33, 12, {}},    {257, 3, {}},
      {1, 3, {7}},     {3, 5, {11}},    {1, 2, {257}},    {4, 3, {4, 4}},    {3, 8, {7, 7}},  {2, 64, {2, 2}},
      {4, 130, {3}},   {24, 3, {257}},  {64, 4, {9, 9}},  {2, 4, {3, 5, 6}}, {2, 3, {2, 2, 2}}, {2, 8, {4, 4}},
  };
  // {2, 8, {4, 4}}: C and S multiples of 8 (the add forward's channels_last tile kernel with aligned runs).
  if (g_quick) return {{0, 3, {4}}, {7, 6, {}}, {33, 12, {}}, {3, 5, {11}}, {2, 3, {5, 5}}, {24, 3, {257}},
                       {2, 64, {2, 2}}, {2, 8, {4, 4}}};
  return all;
}

const char* layout_name(const Shape& sh, Layout layout) {
  return layout == Layout::ChannelsFirst ? "NCHW" : (sh.spatial.empty() ? "2-d" : "channels_last");
}

std::string shape_name(const Shape& sh) {
  std::string dims = "(" + std::to_string(sh.N) + ", " + std::to_string(sh.C);
  for (auto d : sh.spatial) dims += ", " + std::to_string(d);
  return dims + ")";
}

// The reductions planned for 132 SMs (emulated device 1), on shapes that split a channel over many blocks: the
// whole block merging one channel's partials (NCHW (12800, 1, 64): 200 partials), and teams of 8 threads merging
// the many channels of a column in rounds (2-d (6400, 64): 100 and 200 partials, channels_last (200, 128, 8, 8):
// 100). Each must split at least 64 ways (a plan change must not turn the case into a few-split
// one); every op that reduces, p = 0 for the statistics, 0.3 for the sums.
template <typename scalar_t, typename acc_t>
void run_many_splits() {
  const std::vector<std::pair<Shape, Layout>> cases = {{{12800, 1, {64}}, Layout::ChannelsFirst},
                                                       {{6400, 64, {}}, Layout::ChannelsLast},
                                                       {{200, 128, {8, 8}}, Layout::ChannelsLast}};
  const std::string only = g_only;
  BNFUSED_CUDA_CHECK(cudaSetDevice(1));
  for (const auto& [sh, layout] : cases)
    for (const char* op : {"stats", "backward_reduce", "add_relu_backward_reduce"}) {
      if (!only.empty() && only != op) continue;
      g_only = op;
      g_max_splits = 0;
      run_case<scalar_t, acc_t>(Case{sh, layout, std::string(op) == "stats" ? 0.0 : 0.3, 0, true});
      if (g_max_splits < 64)
        die("the many-split case " + shape_name(sh) + " " + op + " split only " + std::to_string(g_max_splits) +
            " ways");
    }
  g_only = only;
  BNFUSED_CUDA_CHECK(cudaSetDevice(0));
}

// The activations (csrc/activation.h) other than ReLU, whose cases the main matrix runs: every one through forward,
// backward_reduce and backward_input at p = 0.3 (0 for one shape), NCHW with S % 8 != 0, channels_last (the tile
// and column kernels with their carries) and 2-d input; --quick: channels_last alone (activation_specs).

template <typename scalar_t, typename acc_t>
void run_activations() {
  struct Row {
    Shape sh;
    Layout layout;
    double p;
  };
  const std::vector<Row> rows =
      g_quick ? std::vector<Row>{{{3, 8, {7, 7}}, Layout::ChannelsLast, 0.3}}
              : std::vector<Row>{{{3, 5, {11}}, Layout::ChannelsFirst, 0.3},
                                 {{3, 8, {7, 7}}, Layout::ChannelsLast, 0.3},
                                 {{2, 8, {4, 4}}, Layout::ChannelsLast, 0.0},
                                 {{33, 12, {}}, Layout::ChannelsLast, 0.3}};
#ifndef EMU_RELU_ONLY
  for (const ActSpec& spec : activation_specs())
    for (const Row& r : rows) {
      Case c{r.sh, r.layout, r.p, 0, true};
      c.act = spec;
#ifdef EMU_FEW_ACTIVATIONS
      // The sanitizer builds: one piecewise-linear and one transcendental kind. An activation changes the values,
      // not the indexing, which the ReLU matrix covers; the plain build checks every kind's values. Compiling
      // every kind under the sanitizers doubled emu-check's time.
      if (spec.kind == Act::Hardtanh) run_case<scalar_t, acc_t, Act::Hardtanh>(c);
      if (spec.kind == Act::SiLU) run_case<scalar_t, acc_t, Act::SiLU>(c);
#else
      dispatch_act(spec.kind, [&](auto kind) { run_case<scalar_t, acc_t, decltype(kind)::value>(c); });
#endif
    }
#endif
}

template <typename scalar_t, typename acc_t>
void run_dtype() {
  const std::vector<double> ps = g_quick ? std::vector<double>{0.0, 0.3} : std::vector<double>{0.0, 0.3, 1.0};
  for (const Shape& sh : g_mixed_only ? std::vector<Shape>{} : shapes())
    for (const Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
      if (sh.spatial.empty() && layout == Layout::ChannelsFirst) continue;  // 2-d input is (N, C) rows
      for (const double p : ps)
        for (const bool misaligned : {false, true})
          run_case<scalar_t, acc_t>(Case{sh, layout, p, misaligned, !(misaligned && p == 0.3)});
    }
  // The peels for other distances past 16 bytes (2 .. 16 / sizeof - 1 elements; --quick: the largest), every op,
  // on shapes that reach the flat and tile kernels (S % 8 != 0, C % 8 == 0 channels_last, 2-d).
  const int kMaxShift = 16 / static_cast<int>(sizeof(scalar_t)) - 1;
  const std::vector<Shape> shift_shapes = {{33, 12, {}}, {3, 5, {11}}, {2, 64, {2, 2}}, {3, 8, {7, 7}}};
  for (int k = g_quick ? std::max(kMaxShift, 2) : 2; k <= kMaxShift && !g_mixed_only; ++k)
    for (const Shape& sh : shift_shapes)
      for (const Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
        if (sh.spatial.empty() && layout == Layout::ChannelsFirst) continue;
        run_case<scalar_t, acc_t>(Case{sh, layout, 0.3, k, true});
      }
  // Buffers at different misalignments (float32, float16), which no peel can align: the kernels' scalar paths,
  // checked to take no vector access (check_scalar_path). "all differ": every op's pointers differ (x aligned, the
  // others not); "residual": x, dy and out share one misalignment (the BN ops peel) while the residual, grad_residual
  // are aligned views, as a split batch's chunks often are (the add ops alone scalar); float16 "8 apart": x, dy and out
  // 8 bytes apart, so differing at 16 bytes (the flat and channels-first kernels scalar) but shared at the 8 bytes
  // of channels_last's 4-channel vectors (its tile and column kernels peel). The pass bits at odd byte offsets.
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, __half>) {
    std::vector<Offsets> sets = {{0, 2, 3, 1, sizeof(scalar_t) == 2 ? 5 : 1, 1}, {3, 3, 3, 0, 0, 5}};
    if (sizeof(scalar_t) == 2) sets.push_back({1, 5, 5, 3, 7, 2});
    const std::vector<Shape> mixed_shapes =
        g_quick ? std::vector<Shape>{{3, 5, {11}}, {3, 8, {7, 7}}, {2, 8, {4, 4}}}
                : std::vector<Shape>{{33, 12, {}}, {3, 5, {11}}, {2, 8, {4, 4}}, {3, 8, {7, 7}}, {24, 3, {257}}};
    for (const Offsets& at : sets)
      for (const Shape& sh : mixed_shapes)
        for (const Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
          if (sh.spatial.empty() && layout == Layout::ChannelsFirst) continue;
          for (const double p : g_quick ? std::vector<double>{0.3} : std::vector<double>{0.0, 0.3}) {
            Case c{sh, layout, p, 0, true};
            c.mixed = true;
            c.at = at;
            run_case<scalar_t, acc_t>(c);
          }
        }
  }
  if (!g_mixed_only) run_many_splits<scalar_t, acc_t>();
  if (!g_mixed_only) run_activations<scalar_t, acc_t>();
}

// Launches the hardware rejects must fail at the launch check, not run.
void check_launch_limits() {
  auto expect_reject = [](dim3 grid, dim3 block, const char* what) {
    ++g_cases;
    const uint64_t before = cuda_emu::launches.load();
    bool threw = false;
    try {
      launch(dropout_mask_kernel, grid, block, nullptr, kKey, static_cast<bool*>(nullptr), int64_t(0), 0u, false);
    } catch (const std::runtime_error&) {
      threw = true;
    }
    if (!threw || cuda_emu::launches.load() != before) die(std::string("launch check accepted ") + what);
  };
  expect_reject(dim3(0), dim3(256), "a grid of 0 blocks");
  expect_reject(dim3(1, 65536), dim3(256), "gridDim.y = 65536");
  expect_reject(dim3(1, 1, 65536), dim3(32), "gridDim.z = 65536");
  expect_reject(dim3(1), dim3(1025), "1025 threads per block");
  expect_reject(dim3(1), dim3(32, 32, 2), "2048 threads per block");
}

// A +-inf element makes its channel mean +-inf (and the variance NaN), as torch.var_mean and the CPU kernels do.
void check_stats_inf() {
  for (const Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    ++g_cases;
    const int64_t N = 4, C = 3, S = 16;
    Rng rng{7};
    std::vector<float> x(N * C * S);
    const Shape sh{N, C, {4, 4}};
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t s = 0; s < S; ++s) x[offset_of(sh, layout, n, c, s)] = static_cast<float>(rng.normal());
    x[offset_of(sh, layout, 0, 1, 0)] = std::numeric_limits<float>::infinity();
    x[offset_of(sh, layout, 0, 2, 0)] = -std::numeric_limits<float>::infinity();
    std::vector<float> m(C), v(C);
    const StatsOp<float> op{m.data(), v.data()};
    const Geometry g{N, C, S, layout};
    reduce<float, float>(op, g, x.data(), static_cast<const float*>(nullptr), static_cast<const Dropout<float>*>(nullptr));
    const char* where = layout == Layout::ChannelsFirst ? "NCHW" : "channels_last";
    if (!std::isfinite(m[0]) || !std::isfinite(v[0]) || !(m[1] == INFINITY) || !(m[2] == -INFINITY) ||
        !std::isnan(v[1]) || !std::isnan(v[2])) {
      std::fprintf(stderr, "FAIL stats with +-inf (%s): mean %g %g %g, var %g %g %g; want finite, inf, -inf and var "
                   "finite, nan, nan\n", where, m[0], m[1], m[2], v[0], v[1], v[2]);
      if (++g_failures >= 5) std::exit(1);
    }
  }
}

// The ops of a training step on one float32 tensor (p = 0.3), the buffers at offsets `at`. Returns the counts of
// each op run.
struct StepCounts {
  Counts stats, forward, backward_reduce, backward_input;
  Counts add_forward, add_backward_reduce, add_backward_input;  // the add ops (add_relu_cases.h)
};
StepCounts step_counts(const Shape& sh, Layout layout, const Offsets& at) {
  const int64_t N = sh.N, C = sh.C, S = sh.S(), numel = N * C * S;
  const Geometry g{N, C, S, layout};
  Buffer<float> x(numel, at.x), dy(numel, at.dy), out(numel, at.out);
  for (int64_t i = 0; i < numel; ++i) {
    x.ptr[i] = 0.5f;
    dy.ptr[i] = 1.0f;
  }
  std::vector<float> mean(C, 0.f), rstd(C, 1.f), sg(C), sgx(C), mg(C), mgx(C), run_mean(C, 0.f), run_var(C, 1.f);
  const ChannelParams<float> prm{mean.data(), rstd.data(), nullptr, nullptr};
  const auto drop = make_dropout<float>(kKey, 0.3);
  StepCounts r;
  r.stats = measure([&] {
    RunningStats running;
    running.mean = run_mean.data();
    running.var = run_var.data();
    running.momentum = 0.1;
    std::vector<float> m(C), rs(C);
    const StatsOp<float> op{m.data(), nullptr, rs.data(), 1e-5f, running};
    reduce<float, float>(op, g, x.ptr, static_cast<const float*>(nullptr), static_cast<const Dropout<float>*>(nullptr));
  });
  r.forward = measure([&] { run_forward<float, float>(prm, x.ptr, out.ptr, g, &drop, nullptr); });
  r.backward_reduce = measure([&] {
    const GradSumsOp<float> op{prm, sg.data(), sgx.data()};
    reduce<float, float>(op, g, x.ptr, dy.ptr, &drop);
  });
  r.backward_input = measure([&] {
    run_backward_input<float, float>(prm, mg.data(), mgx.data(), N * S, dy.ptr, x.ptr, out.ptr, g, &drop, nullptr);
  });
  // The add ops: the training forward with its pass bits, then the two backward ops.
  Buffer<float> res(numel, at.res), gr(numel, at.gres);
  for (int64_t i = 0; i < numel; ++i) res.ptr[i] = -0.25f;
  std::vector<uint8_t> bits((numel + 7) / 8);
  r.add_forward = measure([&] {
    run_add_relu_forward<float, float>(prm, x.ptr, res.ptr, out.ptr, bits.data(), g, &drop, nullptr);
  });
  r.add_backward_reduce = measure([&] {
    const AddGradSumsOp<float> op{{mean.data(), rstd.data(), nullptr, nullptr}, sg.data(), sgx.data()};
    const auto plan = plan_reduction<float, AddGradSumsOp<float>>(g, x.ptr, dy.ptr);
    std::vector<float> ws(plan.workspace_elems());
    run_add_relu_backward_reduce<float, float>(op, plan, dy.ptr, x.ptr, bits.data(), drop.scale, g,
                                               ws.empty() ? nullptr : ws.data(), counters_for(plan), nullptr);
    check_counters_reset(plan);
  });
  r.add_backward_input = measure([&] {
    run_add_relu_backward_input<float, float>(prm, sg.data(), sgx.data(), N * S, dy.ptr, x.ptr, bits.data(),
                                              drop.scale, out.ptr, gr.ptr, g, nullptr);
  });
  return r;
}

// Misaligned base pointers are peeled, not sent down the scalar path: with x, dy and out one element past a
// 16-byte boundary, the elements moved by scalar accesses stay within the partial units at the edges -- per
// pointer at most 2 x 7 per row of the kernel (the flat kernel: one row, the tensor; channels-first reductions:
// a row per (n, c)), and 2 x 3 per row (n, s) for channels_last (the partial 4-wide chunks at both ends). The add
// ops likewise: the forward (x, residual, out) in the flat kernel or channels_last's tile kernel, the backward
// input pass (dy, x, dx, grad_residual) always flat (memory units in both layouts).
void check_peel() {
  struct Row {
    Shape sh;
    Layout layout;
  };
  const Row rows[] = {{{4, 16, {8, 8}}, Layout::ChannelsFirst},
                      {{3, 5, {7, 7}}, Layout::ChannelsFirst},
                      {{4, 64, {7, 7}}, Layout::ChannelsLast},
                      {{256, 64, {}}, Layout::ChannelsLast}};
  for (const Row& r : rows) {
    const int64_t N = r.sh.N, C = r.sh.C, S = r.sh.S();
    const StepCounts c = step_counts(r.sh, r.layout, Offsets::all(1));
    const bool cf = r.layout == Layout::ChannelsFirst;
    const bool flat = cf || S == 1;                                  // apply: one row
    const int64_t reduce_bound = cf ? 2 * 7 * N * C : 2 * 3 * N * S;  // per pointer
    const int64_t apply_bound = flat ? 2 * 7 : 2 * 3 * N * S;
    const struct {
      const char* op;
      const Counts& counts;
      int64_t bound;
    } checks[] = {{"stats", c.stats, reduce_bound},
                  {"forward", c.forward, 2 * apply_bound},
                  {"backward_reduce", c.backward_reduce, 2 * reduce_bound},
                  {"backward_input", c.backward_input, 3 * apply_bound},
                  {"add_relu_forward_bits", c.add_forward, 3 * apply_bound},
                  {"add_relu_backward_reduce", c.add_backward_reduce, 2 * reduce_bound},
                  {"add_relu_backward_input", c.add_backward_input, 4 * 2 * 7}};
    for (const auto& k : checks) {
      ++g_cases;
      if (static_cast<int64_t>(k.counts.scalar) > k.bound || k.counts.vec == 0) {
        std::fprintf(stderr, "FAIL peel: %s %s %s misaligned by one element: %" PRIu64 " elements by scalar "
                     "accesses (at most %" PRId64 "), %" PRIu64 " by vector accesses\n", k.op,
                     shape_name(r.sh).c_str(), layout_name(r.sh, r.layout), k.counts.scalar, k.bound, k.counts.vec);
        if (++g_failures >= 5) std::exit(1);
      }
    }
  }
}

// x aligned, the others at three other distances past 16 bytes: every op but stats (x alone) on its scalar path.
constexpr Offsets kMixedCounts = {0, 2, 3, 1, 1, 0};

void print_counts() {
  std::printf("kernel launches, Philox calls per element and the share of elements moved by scalar accesses "
              "(float32, p = 0.3; aligned / x, dy, out one element past a 16-byte boundary; scalar share also with\n"
              "the buffers at different misalignments:%s):\n", kMixedCounts.name().c_str());
  struct Row {
    Shape sh;
    Layout layout;
  };
  const Row rows[] = {
      {{256, 64, {}}, Layout::ChannelsLast},      {{256, 10, {}}, Layout::ChannelsLast},
      {{8, 64, {7, 7}}, Layout::ChannelsFirst},   {{8, 64, {7, 7}}, Layout::ChannelsLast},
      {{8, 64, {2, 2}}, Layout::ChannelsLast},    {{4, 64, {8, 8}}, Layout::ChannelsLast},
      {{32, 64, {7, 7}}, Layout::ChannelsLast},   {{32, 64, {14, 14}}, Layout::ChannelsLast},
  };
  for (const Row& r : rows) {
    const double numel = double(r.sh.N * r.sh.C * r.sh.S());
    const StepCounts a = step_counts(r.sh, r.layout, Offsets::all(0)), m = step_counts(r.sh, r.layout, Offsets::all(1));
    const StepCounts x = step_counts(r.sh, r.layout, kMixedCounts);
    const std::string base = shape_name(r.sh) + " " + layout_name(r.sh, r.layout);
    auto line = [&](const char* op, const Counts& ca, const Counts& cm, const Counts& cx) {
      auto share = [](const Counts& c) { return c.vec + c.scalar ? double(c.scalar) / double(c.vec + c.scalar) : 0.0; };
      std::printf("  %-44s launches %" PRIu64 "  philox calls/element %.3f / %.3f  scalar share %.3f / %.3f / %.3f\n",
                  (base + " " + op).c_str(), ca.launches, double(ca.philox) / numel, double(cm.philox) / numel,
                  share(ca), share(cm), share(cx));
    };
    line("stats+update", a.stats, m.stats, x.stats);
    line("forward", a.forward, m.forward, x.forward);
    line("backward_reduce", a.backward_reduce, m.backward_reduce, x.backward_reduce);
    line("backward_input", a.backward_input, m.backward_input, x.backward_input);
    line("add_relu_forward_bits", a.add_forward, m.add_forward, x.add_forward);
    line("add_relu_backward_reduce", a.add_backward_reduce, m.add_backward_reduce, x.add_backward_reduce);
    line("add_relu_backward_input", a.add_backward_input, m.add_backward_input, x.add_backward_input);
  }
}

// The split reductions' last-block merge on shapes that split a lot (statistics and the backward sums, float32,
// p = 0.3), planned for 132 SMs (an H100, emulated device 1): the grid, the partials per channel, and the merge's cost
// from the emulation's counters (partials loaded, 32-byte sectors of those loads, the longest chain of dependent
// steps of one thread).
void print_merge_cost() {
  BNFUSED_CUDA_CHECK(cudaSetDevice(1));
  std::printf("split reductions' merge, planned for %d SMs (float32; loads: partials read by the merges, sectors: "
              "32-byte sectors of those loads, chain: most dependent merge steps of one thread):\n", sm_count());
  struct Row {
    Shape sh;
    Layout layout;
  };
  const Row rows[] = {{{256, 64, {56, 56}}, Layout::ChannelsLast}, {{256, 64, {56, 56}}, Layout::ChannelsFirst},
                      {{6400, 1, {64}}, Layout::ChannelsFirst},    {{6400, 1, {64}}, Layout::ChannelsLast},
                      {{65536, 256, {}}, Layout::ChannelsLast}};
  for (const Row& r : rows) {
    const int64_t N = r.sh.N, C = r.sh.C, S = r.sh.S(), numel = N * C * S;
    const Geometry g{N, C, S, r.layout};
    Buffer<float> x(numel, 0), dy(numel, 0);
    for (int64_t i = 0; i < numel; ++i) {
      x.ptr[i] = static_cast<float>((i * 2654435761u) % 1000) * 1e-3f;
      dy.ptr[i] = static_cast<float>((i * 40503u) % 777) * 1e-3f - 0.3f;
    }
    std::vector<float> mean(C, 0.5f), rstd(C, 1.f), m(C), v(C), sg(C), sgx(C);
    const ChannelParams<float> prm{mean.data(), rstd.data(), nullptr, nullptr};
    const auto drop = make_dropout<float>(kKey, 0.3);
    auto line = [&](const char* op, const ReducePlan& plan, const Counts& k, double seconds) {
      std::printf("  %-36s %-16s grid (%u, %u) block (%u, %u)  partials/channel %" PRId64 "  loads %" PRIu64
                  "  sectors %" PRIu64 "  chain %" PRIu64 "  (%.1f s)\n",
                  (shape_name(r.sh) + " " + layout_name(r.sh, r.layout)).c_str(), op, plan.grid.x, plan.grid.y,
                  plan.block.x, plan.block.y, plan.splits, k.merge_elems, k.merge_sectors, k.merge_chain, seconds);
      std::fflush(stdout);
    };
    ReducePlan plan;
    auto t0 = std::chrono::steady_clock::now();
    Counts k = measure([&] {
      const StatsOp<float> op{m.data(), v.data()};
      plan = reduce<float, float>(op, g, x.ptr, static_cast<const float*>(nullptr),
                                  static_cast<const Dropout<float>*>(nullptr));
    });
    line("stats", plan, k, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    t0 = std::chrono::steady_clock::now();
    k = measure([&] {
      const GradSumsOp<float> op{prm, sg.data(), sgx.data()};
      plan = reduce<float, float>(op, g, x.ptr, dy.ptr, &drop);
    });
    line("backward_reduce", plan, k, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  BNFUSED_CUDA_CHECK(cudaSetDevice(0));
}

}  // namespace

int run_all(int argc, char** argv) {
  bool counts = false, merge_cost = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick")
      g_quick = true;
    else if (a == "--counts")
      counts = true;
    else if (a == "--merge-cost")
      merge_cost = true;
    else if (a == "--mixed")
      g_mixed_only = true;
    else if (a == "--only" && i + 1 < argc)
      g_only = argv[++i];
    else
      die("unknown argument " + a + " (usage: driver [--quick] [--mixed] [--only OP] [--counts] [--merge-cost])");
  }
  if (merge_cost) {
    print_merge_cost();
    return 0;
  }
  if (counts) {
    print_counts();
    return 0;
  }
  const bool extras = !g_mixed_only;  // the checks below have no mixed cases
  if (extras && (g_only.empty() || g_only == "launch")) check_launch_limits();
  if (extras && (g_only.empty() || g_only == "stats")) check_stats_inf();
  if (extras && (g_only.empty() || g_only == "peel")) check_peel();
  if (extras && (g_only.empty() || g_only == "dropout_mask"))
    for (const int64_t numel : {0, 1, 7, 8, 9, 33, 257, 1000, 4099})
      for (const double p : {0.0, 0.3, 1.0})
        for (const bool misaligned : {false, true}) run_mask_case(numel, p, misaligned);
  // Fewer dtypes, fewer kernels to compile: the sanitizer builds take float32 and float16 (EMU_TWO_DTYPES),
  // inject_bugs.sh float32 alone (EMU_FLOAT32_ONLY).
  run_dtype<float, float>();
#ifndef EMU_FLOAT32_ONLY
  run_dtype<__half, float>();
#ifndef EMU_TWO_DTYPES
  run_dtype<double, double>();
  run_dtype<__nv_bfloat16, float>();
#endif
#endif
  if (g_failures) {
    std::fprintf(stderr, "cuda emulation: %d failure(s) in %ld cases\n", g_failures, g_cases);
    return 1;
  }
  std::printf("cuda emulation: %ld cases passed (%ld of them on the scalar path of mixed misalignments; %" PRIu64
              " kernel launches)\n", g_cases, g_scalar_checked, cuda_emu::launches.load());
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run_all(argc, argv);
  } catch (const std::exception& e) {  // a rejected launch, from the launch check
    std::fprintf(stderr, "FAIL exception: %s\n", e.what());
    return 1;
  }
}

