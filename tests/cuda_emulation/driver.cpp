// Runs the real CUDA kernels (csrc/cuda/*.cuh) on the CPU emulation (cuda_emu.h) over a matrix of shapes, layouts,
// dtypes, dropout probabilities and base-pointer alignments, against a scalar reference built from the shared math
// (csrc/bn_math.h, csrc/philox.h): masks and forward bit for bit, statistics and sums to a tolerance.
// The BN + residual add + ReLU ops run on the same matrix (add_relu_cases.h).
// Usage: driver [--quick] [--only OP] [--counts]; exits non-zero after 5 mismatches (reported on stderr).
#include "cuda/backward_input.cuh"
#include "cuda/forward.cuh"
#include "cuda/reduce.cuh"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

using namespace bnfused;
using namespace bnfused::cuda;

namespace {

bool g_quick = false;
std::string g_only;
int g_failures = 0;
long g_cases = 0;

template <typename T>
const char* type_name();
template <>
const char* type_name<float>() { return "float32"; }
template <>
const char* type_name<double>() { return "float64"; }
template <>
const char* type_name<__half>() { return "float16"; }
template <>
const char* type_name<__nv_bfloat16>() { return "bfloat16"; }

struct Shape {
  int64_t N, C;
  std::vector<int64_t> spatial;
  int64_t S() const {
    int64_t s = 1;
    for (auto d : spatial) s *= d;
    return s;
  }
};

struct Case {
  Shape shape;
  Layout layout;
  double p;
  bool misaligned;  // base pointers one element past a 16-byte boundary
  bool affine;
  std::string name() const {
    char buf[160];
    std::string dims = std::to_string(shape.N) + "x" + std::to_string(shape.C);
    for (auto d : shape.spatial) dims += "x" + std::to_string(d);
    std::snprintf(buf, sizeof buf, "%s %s p=%g%s%s", dims.c_str(),
                  layout == Layout::ChannelsFirst ? "NCHW" : (shape.spatial.empty() ? "2d" : "channels_last"), p,
                  misaligned ? " misaligned" : "", affine ? "" : " no-affine");
    return buf;
  }
};

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "FAIL %s\n", what.c_str());
  std::exit(1);
}

void mismatch(const std::string& op, const Case& c, const char* dtype, const std::string& detail) {
  std::fprintf(stderr, "FAIL %s [%s %s]: %s\n", op.c_str(), c.name().c_str(), dtype, detail.c_str());
  if (++g_failures >= 5) std::exit(1);
}

// Deterministic normal-ish values.
struct Rng {
  uint64_t s;
  uint64_t next() {
    s += 0x9E3779B97F4A7C15ull;
    uint64_t z = s;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
  double normal() {
    const double u = uniform() + 1e-12, v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }
};

// "Device" memory: exactly n elements (ASan sees one past the end), at a 16-byte boundary or one element past it.
template <typename T>
struct Buffer {
  unsigned char* raw;
  T* ptr;
  Buffer(int64_t n, bool misaligned) {
    const size_t lead = misaligned ? sizeof(T) : 0;
    raw = static_cast<unsigned char*>(::operator new(lead + n * sizeof(T) + (n == 0), std::align_val_t(16)));
    ptr = reinterpret_cast<T*>(raw + lead);
  }
  ~Buffer() { ::operator delete(raw, std::align_val_t(16)); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// Memory offset of logical element (n, c, s).
int64_t offset_of(const Shape& sh, Layout layout, int64_t n, int64_t c, int64_t s) {
  const int64_t S = sh.S();
  return layout == Layout::ChannelsFirst ? (n * sh.C + c) * S + s : (n * S + s) * sh.C + c;
}

template <typename T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <typename scalar_t>
double to_double(scalar_t v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
double to_double<double>(double v) {
  return v;
}

template <typename T>
StatDtype stat_dtype() {
  if constexpr (std::is_same_v<T, float>) return StatDtype::Float;
  if constexpr (std::is_same_v<T, double>) return StatDtype::Double;
  if constexpr (std::is_same_v<T, __half>) return StatDtype::Half;
  return StatDtype::BFloat16;
}

constexpr int64_t kKey[2] = {0x1234567890abcdefLL, 48};

}  // namespace

#include "add_relu_cases.h"  // the BN + residual add + ReLU ops (run_add_case), on the helpers above

namespace {

template <typename scalar_t, typename acc_t>
void run_case(const Case& cs) {
  const Shape& sh = cs.shape;
  const int64_t N = sh.N, C = sh.C, S = sh.S(), numel = N * C * S;
  const Geometry g{N, C, S, cs.layout};
  const char* dt = type_name<scalar_t>();
  Rng rng{static_cast<uint64_t>(numel * 1315423911u + C * 7 + S * 131 + cs.misaligned)};
  const bool dropout = cs.p > 0.0;
  const Dropout<acc_t> drop = make_dropout<acc_t>(kKey, cs.p);
  const PhiloxKey key{static_cast<uint64_t>(kKey[0]), static_cast<uint64_t>(kKey[1])};
  const acc_t scale = dropout_scale<acc_t>(cs.p);
  const uint32_t thr = threshold16(cs.p);

  Buffer<scalar_t> x(numel, cs.misaligned), dy(numel, cs.misaligned), out(numel, cs.misaligned);
  std::vector<double> xd(numel), dyd(numel);  // logical order
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t L = (n * C + c) * S + s, off = offset_of(sh, cs.layout, n, c, s);
        x.ptr[off] = static_cast<scalar_t>(static_cast<acc_t>(0.5 * c - 0.3 + (1.0 + 0.1 * c) * rng.normal()));
        dy.ptr[off] = static_cast<scalar_t>(static_cast<acc_t>(rng.normal()));
        xd[L] = to_double(x.ptr[off]);
        dyd[L] = to_double(dy.ptr[off]);
      }
  auto mult_of = [&](int64_t L) -> acc_t {
    if (!dropout) return acc_t(1);
    return keep_element(key, static_cast<uint64_t>(L), thr) ? scale : acc_t(0);
  };

  // Per-channel parameters (acc dtype): the reference statistics, and weight/bias.
  std::vector<double> mref(C, 0), vref(C, 0);
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) sum += xd[(n * C + c) * S + s];
    mref[c] = sum / static_cast<double>(N * S);
    double m2 = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) m2 += (xd[(n * C + c) * S + s] - mref[c]) * (xd[(n * C + c) * S + s] - mref[c]);
    vref[c] = m2 / static_cast<double>(N * S);
  }
  std::vector<acc_t> mean(C), rstd(C), weight(C), bias(C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = static_cast<acc_t>(N * S > 0 ? mref[c] : 0.1 * c);
    rstd[c] = static_cast<acc_t>(1.0 / std::sqrt((N * S > 0 ? vref[c] : 1.0) + 1e-5));
    weight[c] = static_cast<acc_t>(0.5 + 0.25 * c);
    bias[c] = static_cast<acc_t>(0.1 * (c % 3) - 0.1);
  }
  const ChannelParams<acc_t> prm{mean.data(), rstd.data(), cs.affine ? weight.data() : nullptr,
                                 cs.affine ? bias.data() : nullptr};
  const cudaStream_t stream = nullptr;
  const double tol = sizeof(acc_t) == 8 ? 1e-11 : 2e-5;

  auto selected = [&](const char* op) { return g_only.empty() || g_only == op; };

  // ---- stats (independent of p: run once per shape/layout/alignment) ----
  if (selected("stats") && cs.p == 0.0 && N * S > 0 && (!cs.misaligned || sizeof(scalar_t) == 2)) {
    ++g_cases;
    // batch_stats and batch_stats_update in one launch: mean, var, rstd, and running statistics of the input's
    // dtype (all four storage dtypes), strided for misaligned cases.
    std::vector<acc_t> m(C), v(C), r(C);
    const int64_t stride = cs.misaligned ? 2 : 1;
    std::vector<scalar_t> run_mean(C * stride), run_var(C * stride);
    for (int64_t c = 0; c < C; ++c) {
      run_mean[c * stride] = static_cast<scalar_t>(static_cast<acc_t>(0.25 * c));
      run_var[c * stride] = static_cast<scalar_t>(static_cast<acc_t>(1.0 + 0.5 * c));
    }
    const std::vector<scalar_t> old_mean = run_mean, old_var = run_var;
    const double momentum = 0.1, eps = 1e-5;
    RunningStats running;
    running.mean = run_mean.data();
    running.var = run_var.data();
    running.mean_stride = running.var_stride = stride;
    running.mean_dtype = running.var_dtype = stat_dtype<scalar_t>();
    running.momentum = momentum;
    running.unbias = unbiased_var_factor(N * S);
    using Op = StatsOp<acc_t>;
    const Op op{m.data(), v.data(), r.data(), static_cast<acc_t>(eps), running};
    const auto plan = plan_reduction<scalar_t, Op>(g, x.ptr, nullptr);
    std::vector<acc_t> ws(plan.workspace_elems());
    run_reduction<scalar_t, acc_t>(op, plan, x.ptr, static_cast<const scalar_t*>(nullptr), g,
                                   static_cast<const Dropout<acc_t>*>(nullptr), ws.empty() ? nullptr : ws.data(),
                                   stream);
    for (int64_t c = 0; c < C; ++c) {
      const double spread = std::sqrt(vref[c]) + std::fabs(mref[c]);
      if (!(std::fabs(m[c] - mref[c]) <= tol * (spread + 1e-30)) ||
          !(std::fabs(v[c] - vref[c]) <= 4 * tol * (vref[c] + mref[c] * mref[c] + 1e-30))) {
        char d[200];
        std::snprintf(d, sizeof d, "channel %" PRId64 ": mean %.9g vs %.9g, var %.9g vs %.9g (splits %" PRId64 ")", c,
                      double(m[c]), mref[c], double(v[c]), vref[c], plan.splits);
        mismatch("stats", cs, dt, d);
        break;
      }
      const double rstd_ref = 1.0 / std::sqrt(vref[c] + eps);
      const double rm_ref = momentum * mref[c] + (1 - momentum) * to_double(old_mean[c * stride]);
      const double rv_ref = momentum * vref[c] * running.unbias + (1 - momentum) * to_double(old_var[c * stride]);
      const double stol = sizeof(scalar_t) == 2 ? 1e-2 : 4 * tol;  // the storage rounding of a 16-bit running stat
      if (!(std::fabs(r[c] - rstd_ref) <= 4 * tol * rstd_ref) ||
          !(std::fabs(to_double(run_mean[c * stride]) - rm_ref) <= stol * (std::fabs(rm_ref) + 1)) ||
          !(std::fabs(to_double(run_var[c * stride]) - rv_ref) <= stol * rv_ref)) {
        char d[200];
        std::snprintf(d, sizeof d, "channel %" PRId64 ": rstd %.9g vs %.9g, running_mean %.9g vs %.9g, running_var "
                      "%.9g vs %.9g", c, double(r[c]), rstd_ref, to_double(run_mean[c * stride]), rm_ref,
                      to_double(run_var[c * stride]), rv_ref);
        mismatch("stats (update)", cs, dt, d);
        break;
      }
    }
  }

  // ---- forward: bit for bit ----
  if (selected("forward") && numel > 0) {
    ++g_cases;
    run_forward<scalar_t, acc_t>(prm, x.ptr, out.ptr, g, dropout ? &drop : nullptr, stream);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const auto ab = prm.affine(c);
        for (int64_t s = 0; s < S; ++s) {
          const int64_t L = (n * C + c) * S + s, off = offset_of(sh, cs.layout, n, c, s);
          const scalar_t want = static_cast<scalar_t>(forward_element(static_cast<acc_t>(x.ptr[off]), ab, mult_of(L)));
          if (!same_bits(want, out.ptr[off])) {
            char d[200];
            std::snprintf(d, sizeof d, "element (%" PRId64 ", %" PRId64 ", %" PRId64 "): %.9g, want %.9g", n, c, s,
                          to_double(out.ptr[off]), to_double(want));
            mismatch("forward", cs, dt, d);
            n = N, c = C;
            break;
          }
        }
      }
  }

  // ---- backward_reduce: sums to a tolerance ----
  // The reference sums (double) of g and g * (x - mean) * rstd; backward_input takes them too.
  std::vector<double> sg_ref(C, 0), sgx_ref(C, 0), mag_g(C, 0), mag_gx(C, 0);
  for (int64_t c = 0; c < C; ++c) {
    const auto ab = prm.affine(c);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t L = (n * C + c) * S + s;
        const double gv =
            grad_through_relu_dropout(static_cast<acc_t>(dyd[L]), bn_preact(static_cast<acc_t>(xd[L]), ab), mult_of(L));
        const double gx = gv * (xd[L] - static_cast<double>(mean[c]));
        sg_ref[c] += gv;
        sgx_ref[c] += gx;
        mag_g[c] += std::fabs(gv);
        mag_gx[c] += std::fabs(gx);
      }
    sgx_ref[c] *= static_cast<double>(rstd[c]);
    mag_gx[c] *= static_cast<double>(rstd[c]);
  }

  // The reductions cost most in the emulation (a shuffle is a barrier of 32 OS threads): all dtypes and layouts
  // at p = 0 and 0.3, misaligned at p = 0.3 only (p = 1 takes the same path as 0.3, checked by the other ops).
  const bool reduce_case = cs.p != 1.0 && (!cs.misaligned || cs.p == 0.3);
  if (selected("backward_reduce") && N * S > 0 && reduce_case) {
    ++g_cases;
    std::vector<acc_t> sum_g(C), sum_gx(C);
    using Op = GradSumsOp<acc_t>;
    const Op op{prm, sum_g.data(), sum_gx.data()};
    const auto plan = plan_reduction<scalar_t, Op>(g, x.ptr, dy.ptr);
    std::vector<acc_t> ws(plan.workspace_elems());
    run_reduction<scalar_t, acc_t>(op, plan, x.ptr, dy.ptr, g, dropout ? &drop : nullptr,
                                   ws.empty() ? nullptr : ws.data(), stream);
    for (int64_t c = 0; c < C; ++c) {
      const double sg = sg_ref[c], sgx = sgx_ref[c];
      if (!(std::fabs(sum_g[c] - sg) <= tol * (mag_g[c] + 1e-30)) ||
          !(std::fabs(sum_gx[c] - sgx) <= tol * (mag_gx[c] + 1e-30))) {
        char d[200];
        std::snprintf(d, sizeof d, "channel %" PRId64 ": sum_g %.9g vs %.9g, sum_g_xhat %.9g vs %.9g", c,
                      double(sum_g[c]), sg, double(sum_gx[c]), sgx);
        mismatch("backward_reduce", cs, dt, d);
        break;
      }
    }
  }

  // ---- backward_input: bit for bit (batch statistics, and running statistics) ----
  if (selected("backward_input") && numel > 0) {
    for (const bool batch_stats : {true, false}) {
      ++g_cases;
      std::vector<acc_t> sg(C), sgx(C), mg(C), mgx(C);
      const acc_t count = static_cast<acc_t>(N * S);
      for (int64_t c = 0; c < C; ++c) {
        sg[c] = static_cast<acc_t>(sg_ref[c]);
        sgx[c] = static_cast<acc_t>(sgx_ref[c]);
        mg[c] = sg[c] / count;
        mgx[c] = sgx[c] / count;
      }
      run_backward_input<scalar_t, acc_t>(prm, batch_stats ? sg.data() : nullptr, batch_stats ? sgx.data() : nullptr,
                                          N * S, dy.ptr, x.ptr, out.ptr, g, dropout ? &drop : nullptr, stream);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) {
          const auto ab = prm.affine(c);
          const auto coef = backward_coef<acc_t>(mean[c], rstd[c], prm.w(c), batch_stats, mg[c], mgx[c]);
          for (int64_t s = 0; s < S; ++s) {
            const int64_t L = (n * C + c) * S + s, off = offset_of(sh, cs.layout, n, c, s);
            const acc_t xv = static_cast<acc_t>(x.ptr[off]);
            const acc_t gv = grad_through_relu_dropout(static_cast<acc_t>(dy.ptr[off]), bn_preact(xv, ab), mult_of(L));
            const scalar_t want = static_cast<scalar_t>(batch_stats ? grad_input_element(gv, xv, coef)
                                                                    : grad_input_element_eval(gv, coef));
            if (!same_bits(want, out.ptr[off])) {
              char d[200];
              std::snprintf(d, sizeof d, "%s element (%" PRId64 ", %" PRId64 ", %" PRId64 "): %.9g, want %.9g",
                            batch_stats ? "batch-stats" : "running-stats", n, c, s, to_double(out.ptr[off]),
                            to_double(want));
              mismatch("backward_input", cs, dt, d);
              n = N, c = C;
              break;
            }
          }
        }
    }
  }

  run_add_case<scalar_t, acc_t>(cs, x, dy, prm);
}

// dropout_mask: bool output, any numel, aligned or not; bit for bit with the scalar Philox contract.
void run_mask_case(int64_t numel, double p, bool misaligned) {
  ++g_cases;
  Buffer<bool> keep(numel, misaligned);
  std::memset(keep.ptr, 0x55, numel);
  if (numel > 0) run_dropout_mask(kKey, p, keep.ptr, numel, nullptr);
  const PhiloxKey key{static_cast<uint64_t>(kKey[0]), static_cast<uint64_t>(kKey[1])};
  const uint32_t thr = threshold16(p);
  for (int64_t i = 0; i < numel; ++i) {
    unsigned char got;
    std::memcpy(&got, keep.ptr + i, 1);
    const unsigned char want = thr == 0 ? 1 : (thr >= 65536 ? 0 : keep_element(key, i, thr));
    if (got != want) {
      std::fprintf(stderr, "FAIL dropout_mask numel=%" PRId64 " p=%g%s: element %" PRId64 " is %d, want %d\n", numel,
                   p, misaligned ? " misaligned" : "", i, got, want);
      if (++g_failures >= 5) std::exit(1);
      return;
    }
  }
}

std::vector<Shape> shapes() {
  // N*S in {0, 1, 7, 8, 33, 257, ...}; S not a multiple of 8/32/256; shapes large enough to split a channel over
  // several blocks (the two-stage reduction and its finalize) in both layouts.
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

template <typename scalar_t, typename acc_t>
void run_dtype() {
  const std::vector<double> ps = g_quick ? std::vector<double>{0.0, 0.3} : std::vector<double>{0.0, 0.3, 1.0};
  for (const Shape& sh : shapes())
    for (const Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
      if (sh.spatial.empty() && layout == Layout::ChannelsFirst) continue;  // 2-d input is (N, C) rows
      for (const double p : ps)
        for (const bool misaligned : {false, true})
          run_case<scalar_t, acc_t>(Case{sh, layout, p, misaligned, !(misaligned && p == 0.3)});
    }
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
    const auto plan = plan_reduction<float, StatsOp<float>>(g, x.data(), nullptr);
    std::vector<float> ws(plan.workspace_elems());
    run_reduction<float, float>(op, plan, x.data(), static_cast<const float*>(nullptr), g,
                                static_cast<const Dropout<float>*>(nullptr), ws.empty() ? nullptr : ws.data(), nullptr);
    const char* where = layout == Layout::ChannelsFirst ? "NCHW" : "channels_last";
    if (!std::isfinite(m[0]) || !std::isfinite(v[0]) || !(m[1] == INFINITY) || !(m[2] == -INFINITY) ||
        !std::isnan(v[1]) || !std::isnan(v[2])) {
      std::fprintf(stderr, "FAIL stats with +-inf (%s): mean %g %g %g, var %g %g %g; want finite, inf, -inf and var "
                   "finite, nan, nan\n", where, m[0], m[1], m[2], v[0], v[1], v[2]);
      if (++g_failures >= 5) std::exit(1);
    }
  }
}

// Kernel launches and Philox calls per element of one op on one shape (the --counts table).
template <typename F>
void count_row(const char* what, int64_t numel, F run) {
  const uint64_t l0 = cuda_emu::launches.load(), p0 = cuda_emu::philox_calls.load();
  run();
  std::printf("  %-46s launches %" PRIu64 "  philox calls/element %.3f\n", what, cuda_emu::launches.load() - l0,
              double(cuda_emu::philox_calls.load() - p0) / double(numel));
}

void print_counts() {
  std::printf("kernel launches and Philox calls per element (float32, p = 0.3):\n");
  struct Row {
    const char* name;
    Shape sh;
    Layout layout;
  };
  const Row rows[] = {
      {"(256, 64) 2-d", {256, 64, {}}, Layout::ChannelsLast},
      {"(8, 64, 7, 7) NCHW", {8, 64, {7, 7}}, Layout::ChannelsFirst},
      {"(8, 64, 7, 7) channels_last", {8, 64, {7, 7}}, Layout::ChannelsLast},
      {"(8, 64, 2, 2) channels_last", {8, 64, {2, 2}}, Layout::ChannelsLast},
      {"(4, 64, 8, 8) channels_last", {4, 64, {8, 8}}, Layout::ChannelsLast},
  };
  for (const Row& r : rows) {
    const int64_t N = r.sh.N, C = r.sh.C, S = r.sh.S(), numel = N * C * S;
    const Geometry g{N, C, S, r.layout};
    std::vector<float> x(numel, 0.5f), dy(numel, 1.0f), out(numel), mean(C, 0.f), rstd(C, 1.f), sg(C), sgx(C), mg(C),
        mgx(C);
    const ChannelParams<float> prm{mean.data(), rstd.data(), nullptr, nullptr};
    const auto drop = make_dropout<float>(kKey, 0.3);
    std::string base = r.name;
    std::vector<float> run_mean(C, 0.f), run_var(C, 1.f);
    count_row((base + " stats with running-stat update").c_str(), numel, [&] {
      RunningStats running;
      running.mean = run_mean.data();
      running.var = run_var.data();
      running.momentum = 0.1;
      const StatsOp<float> op{mean.data(), nullptr, rstd.data(), 1e-5f, running};
      const auto plan = plan_reduction<float, StatsOp<float>>(g, x.data(), nullptr);
      std::vector<float> ws(plan.workspace_elems());
      run_reduction<float, float>(op, plan, x.data(), static_cast<const float*>(nullptr), g,
                                  static_cast<const Dropout<float>*>(nullptr), ws.empty() ? nullptr : ws.data(),
                                  nullptr);
    });
    std::fill(mean.begin(), mean.end(), 0.f);
    std::fill(rstd.begin(), rstd.end(), 1.f);
    count_row((base + " forward").c_str(), numel,
              [&] { run_forward<float, float>(prm, x.data(), out.data(), g, &drop, nullptr); });
    count_row((base + " backward_reduce").c_str(), numel, [&] {
      const GradSumsOp<float> op{prm, sg.data(), sgx.data()};
      const auto plan = plan_reduction<float, GradSumsOp<float>>(g, x.data(), dy.data());
      std::vector<float> ws(plan.workspace_elems());
      run_reduction<float, float>(op, plan, x.data(), dy.data(), g, &drop, ws.empty() ? nullptr : ws.data(), nullptr);
    });
    count_row((base + " backward_input").c_str(), numel, [&] {
      run_backward_input<float, float>(prm, mg.data(), mgx.data(), N * S, dy.data(), x.data(), out.data(), g, &drop,
                                       nullptr);
    });
    // The add ops (add_relu_cases.h): the training forward with its pass bits, then the two backward ops.
    std::vector<float> res(numel, -0.25f), gr(numel);
    std::vector<uint8_t> bits((numel + 7) / 8);
    count_row((base + " add_relu_forward_bits").c_str(), numel, [&] {
      run_add_relu_forward<float, float>(prm, x.data(), res.data(), out.data(), bits.data(), g, &drop, nullptr);
    });
    count_row((base + " add_relu_backward_reduce").c_str(), numel, [&] {
      const AddGradSumsOp<float> op{mean.data(), rstd.data(), sg.data(), sgx.data()};
      const auto plan = plan_reduction<float, AddGradSumsOp<float>>(g, x.data(), dy.data());
      std::vector<float> ws(plan.workspace_elems());
      run_add_relu_backward_reduce<float, float>(op, plan, dy.data(), x.data(), bits.data(), drop.scale, g,
                                                 ws.empty() ? nullptr : ws.data(), nullptr);
    });
    count_row((base + " add_relu_backward_input").c_str(), numel, [&] {
      run_add_relu_backward_input<float, float>(prm, sg.data(), sgx.data(), N * S, dy.data(), x.data(), bits.data(),
                                                drop.scale, out.data(), gr.data(), g, nullptr);
    });
  }
}

}  // namespace

int run_all(int argc, char** argv) {
  bool counts = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick")
      g_quick = true;
    else if (a == "--counts")
      counts = true;
    else if (a == "--only" && i + 1 < argc)
      g_only = argv[++i];
    else
      die("unknown argument " + a + " (usage: driver [--quick] [--only OP] [--counts])");
  }
  if (counts) {
    print_counts();
    return 0;
  }
  if (g_only.empty() || g_only == "launch") check_launch_limits();
  if (g_only.empty() || g_only == "stats") check_stats_inf();
  if (g_only.empty() || g_only == "dropout_mask")
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
  std::printf("cuda emulation: %ld cases passed (%" PRIu64 " kernel launches)\n", g_cases, cuda_emu::launches.load());
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
