// Runs the real CUDA kernels (csrc/cuda/*.cuh) on the CPU emulation (cuda_emu.h) over a matrix of shapes, layouts,
// dtypes, dropout probabilities and base-pointer alignments, against a scalar reference built from the shared math
// (csrc/bn_math.h, csrc/philox.h): masks and forward bit for bit, statistics and sums to a tolerance.
// The BN + residual add + ReLU ops run on the same matrix (add_relu_cases.h).
// Usage: driver [--quick] [--mixed] [--only OP] [--counts]; exits non-zero after 5 mismatches (reported on stderr);
// --mixed runs only the cases whose buffers lie at different misalignments.
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
bool g_mixed_only = false;  // --mixed: only the cases with buffers at different misalignments
std::string g_only;
int g_failures = 0;
long g_cases = 0;
long g_scalar_checked = 0;  // op runs checked to take the scalar path (check_scalar_path)

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

// Where each buffer of a case starts: elements past a 16-byte boundary (the pass bits: bytes). x, dy and out are
// run_case's (out: the forward's output, then backward_input's dx); res, gres (grad_residual) and bits the add ops'
// (run_add_case; its own out holds their y, then dx).
struct Offsets {
  int x, dy, out, res, gres, bits;
  static Offsets all(int k) { return {k, k, k, k, k, k}; }
  std::string name() const {
    char buf[96];
    std::snprintf(buf, sizeof buf, " at x+%d dy+%d out+%d res+%d gres+%d bits+%d", x, dy, out, res, gres, bits);
    return buf;
  }
};

// Whether the buffers at these offsets (elements of `elem` bytes) lie at different distances past a `bytes`
// boundary: a kernel that vectorises at that width must then take its scalar path (shared_misalignment < 0).
bool differ(int bytes, size_t elem, std::initializer_list<int> offsets) {
  const long first = static_cast<long>(*offsets.begin() * elem) % bytes;
  for (const int o : offsets)
    if (static_cast<long>(o * elem) % bytes != first) return true;
  return false;
}

struct Case {
  Shape shape;
  Layout layout;
  double p;
  int misaligned;  // base pointers this many elements past a 16-byte boundary (1 in the main matrix)
  bool affine;
  bool mixed = false;  // the buffers at `at` (different misalignments), not all at `misaligned`
  Offsets at = {};
  Offsets offsets() const { return mixed ? at : Offsets::all(misaligned); }
  std::string name() const {
    char buf[240];
    std::string dims = std::to_string(shape.N) + "x" + std::to_string(shape.C);
    for (auto d : shape.spatial) dims += "x" + std::to_string(d);
    const std::string mis = mixed ? at.name() : misaligned == 0 ? "" : misaligned == 1 ? " misaligned" :
                            " misaligned by " + std::to_string(misaligned);
    std::snprintf(buf, sizeof buf, "%s %s p=%g%s%s", dims.c_str(),
                  layout == Layout::ChannelsFirst ? "NCHW" : (shape.spatial.empty() ? "2d" : "channels_last"), p,
                  mis.c_str(), affine ? "" : " no-affine");
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

// "Device" memory: exactly n elements (ASan sees one past the end), `misaligned` elements past a 16-byte boundary.
template <typename T>
struct Buffer {
  unsigned char* raw;
  T* ptr;
  Buffer(int64_t n, int misaligned) {
    const size_t lead = static_cast<size_t>(misaligned) * sizeof(T);
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

// The arrival counters of the reductions' last-block merge, shared by every reduction the driver runs (one
// stream, as a host wrapper's per-stream counters): zero before a run, and every run must leave them zero.
std::vector<unsigned> g_counters(1 << 16, 0u);

unsigned* counters_for(const ReducePlan& plan) {
  if (plan.counter_elems() > static_cast<int64_t>(g_counters.size())) die("too many reduction counters");
  return plan.counter_elems() ? g_counters.data() : nullptr;
}
void check_counters_reset(const ReducePlan& plan) {
  for (int64_t i = 0; i < plan.counter_elems(); ++i)
    if (g_counters[i] != 0) die("a reduction left arrival counter " + std::to_string(i) + " at " +
                                std::to_string(g_counters[i]) + " (the last block must reset it)");
}

// Plans and runs Op over x (and dy) with a fresh workspace and the shared counters.
template <typename scalar_t, typename acc_t, class Op>
ReducePlan reduce(const Op& op, const Geometry& g, const scalar_t* x, const scalar_t* dy, const Dropout<acc_t>* drop) {
  const auto plan = plan_reduction<scalar_t, Op>(g, x, dy);
  std::vector<acc_t> ws(plan.workspace_elems());
  run_reduction<scalar_t, acc_t>(op, plan, x, dy, g, drop, ws.empty() ? nullptr : ws.data(), counters_for(plan),
                                 nullptr);
  check_counters_reset(plan);
  return plan;
}

// A split reduction run again into poisoned outputs must give the same bits: the counters work for the next call
// and the merge order does not depend on which block arrived last (it differs from run to run).
template <typename T>
bool same_again(std::vector<T>& out, const std::vector<T>& first) {
  for (size_t i = 0; i < out.size(); ++i)
    if (!same_bits(out[i], first[i])) return false;
  return true;
}

// The reference sums as backward_input takes them (rounded to acc_t) and their means over `count`, which the
// reference gradient uses (as the kernels do).
template <typename acc_t>
struct AccSums {
  std::vector<acc_t> sum_g, sum_gx, mean_g, mean_gx;
};

template <typename acc_t>
AccSums<acc_t> acc_sums(const std::vector<double>& sg_ref, const std::vector<double>& sgx_ref, int64_t count) {
  const size_t C = sg_ref.size();
  AccSums<acc_t> a{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C)};
  for (size_t c = 0; c < C; ++c) {
    a.sum_g[c] = static_cast<acc_t>(sg_ref[c]);
    a.sum_gx[c] = static_cast<acc_t>(sgx_ref[c]);
    a.mean_g[c] = a.sum_g[c] / static_cast<acc_t>(count);
    a.mean_gx[c] = a.sum_gx[c] / static_cast<acc_t>(count);
  }
  return a;
}

// What a run of kernels did: launches, Philox calls, elements moved by vector and by scalar accesses.
struct Counts {
  uint64_t launches, philox, vec, scalar;
  static Counts now() {
    return {cuda_emu::launches.load(), cuda_emu::philox_calls.load(), cuda_emu::vector_elems.load(),
            cuda_emu::scalar_elems.load()};
  }
  Counts operator-(const Counts& o) const {
    return {launches - o.launches, philox - o.philox, vec - o.vec, scalar - o.scalar};
  }
};

template <typename F>
Counts measure(F run) {
  const Counts before = Counts::now();
  run();
  return Counts::now() - before;
}

// The cases that run the reductions (both op families): all but p = 1; misaligned ones at p = 0.3 only; mixed ones
// where x and dy lie at different distances past 16 bytes.
template <typename scalar_t>
bool reduce_case_of(const Case& cs) {
  if (cs.p == 1.0) return false;
  if (cs.mixed) return differ(16, sizeof(scalar_t), {cs.at.x, cs.at.dy});
  return !cs.misaligned || cs.p == 0.3;
}

// A mixed case's op whose buffers lie at different distances past its vector width (`scalar`) must have moved every
// element by scalar accesses: the check that the case runs the kernel's scalar path, not its peeled vector path.
void check_scalar_path(const char* op, const Case& cs, const char* dtype, const Counts& k, bool scalar) {
  if (!cs.mixed || !scalar) return;
  ++g_scalar_checked;
  if (k.vec != 0 || k.scalar == 0)
    mismatch(op, cs, dtype, "not the scalar path: " + std::to_string(k.vec) + " elements by vector accesses, " +
             std::to_string(k.scalar) + " by scalar ones (its pointers lie at different misalignments)");
}

// The vector width (bytes) the kernels align a geometry's pointers to: 16 for the flat kernels and the
// channels-first reductions, one channel vector (kVmax elements) for channels_last's tile and column kernels.
template <typename scalar_t>
int vector_bytes(const Geometry& g, bool elementwise) {
  const bool flat = g.layout == Layout::ChannelsFirst || (elementwise && g.S == 1);
  return flat ? 16 : (sizeof(scalar_t) >= 8 ? 2 : 4) * static_cast<int>(sizeof(scalar_t));
}

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

  const Offsets at = cs.offsets();
  Buffer<scalar_t> x(numel, at.x), dy(numel, at.dy), out(numel, at.out);
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

  // ---- stats (independent of p: run once per shape/layout/alignment; x alone, so never mixed) ----
  if (selected("stats") && cs.p == 0.0 && N * S > 0 && !cs.mixed && (!cs.misaligned || sizeof(scalar_t) == 2)) {
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
    auto run = [&] {
      return reduce<scalar_t, acc_t>(op, g, x.ptr, static_cast<const scalar_t*>(nullptr),
                                     static_cast<const Dropout<acc_t>*>(nullptr));
    };
    const auto plan = run();
    if (plan.splits > 1) {
      const auto m1 = m, v1 = v, r1 = r;
      const auto rm1 = run_mean, rv1 = run_var;
      std::fill(m.begin(), m.end(), std::numeric_limits<acc_t>::quiet_NaN());
      std::fill(v.begin(), v.end(), std::numeric_limits<acc_t>::quiet_NaN());
      std::fill(r.begin(), r.end(), std::numeric_limits<acc_t>::quiet_NaN());
      run_mean = old_mean;
      run_var = old_var;
      run();
      if (!same_again(m, m1) || !same_again(v, v1) || !same_again(r, r1) || !same_again(run_mean, rm1) ||
          !same_again(run_var, rv1))
        mismatch("stats (second call)", cs, dt, "differs from the first call (splits " +
                 std::to_string(plan.splits) + ")");
    }
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
    const Counts k =
        measure([&] { run_forward<scalar_t, acc_t>(prm, x.ptr, out.ptr, g, dropout ? &drop : nullptr, stream); });
    check_scalar_path("forward", cs, dt, k, differ(vector_bytes<scalar_t>(g, true), sizeof(scalar_t), {at.x, at.out}));
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
  // at p = 0 and 0.3, misaligned at p = 0.3 only (p = 1 takes the same path as 0.3, checked by the other ops), mixed
  // where x and dy differ (else it is the peeled path of the shared cases).
  const bool reduce_case = reduce_case_of<scalar_t>(cs);
  if (selected("backward_reduce") && N * S > 0 && reduce_case) {
    ++g_cases;
    std::vector<acc_t> sum_g(C), sum_gx(C);
    using Op = GradSumsOp<acc_t>;
    const Op op{prm, sum_g.data(), sum_gx.data()};
    ReducePlan plan;
    const Counts k = measure([&] { plan = reduce<scalar_t, acc_t>(op, g, x.ptr, dy.ptr, dropout ? &drop : nullptr); });
    check_scalar_path("backward_reduce", cs, dt, k,
                      differ(vector_bytes<scalar_t>(g, false), sizeof(scalar_t), {at.x, at.dy}));
    if (plan.splits > 1) {
      const auto sg1 = sum_g, sgx1 = sum_gx;
      std::fill(sum_g.begin(), sum_g.end(), std::numeric_limits<acc_t>::quiet_NaN());
      std::fill(sum_gx.begin(), sum_gx.end(), std::numeric_limits<acc_t>::quiet_NaN());
      reduce<scalar_t, acc_t>(op, g, x.ptr, dy.ptr, dropout ? &drop : nullptr);
      if (!same_again(sum_g, sg1) || !same_again(sum_gx, sgx1))
        mismatch("backward_reduce (second call)", cs, dt, "differs from the first call (splits " +
                 std::to_string(plan.splits) + ")");
    }
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
      const auto sums = acc_sums<acc_t>(sg_ref, sgx_ref, N * S);
      const auto &sg = sums.sum_g, &sgx = sums.sum_gx, &mg = sums.mean_g, &mgx = sums.mean_gx;
      const Counts k = measure([&] {
        run_backward_input<scalar_t, acc_t>(prm, batch_stats ? sg.data() : nullptr,
                                            batch_stats ? sgx.data() : nullptr, N * S, dy.ptr, x.ptr, out.ptr, g,
                                            dropout ? &drop : nullptr, stream);
      });
      check_scalar_path("backward_input", cs, dt, k,
                        differ(vector_bytes<scalar_t>(g, true), sizeof(scalar_t), {at.dy, at.x, at.out}));
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
    const AddGradSumsOp<float> op{mean.data(), rstd.data(), sg.data(), sgx.data()};
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

const char* layout_name(const Shape& sh, Layout layout) {
  return layout == Layout::ChannelsFirst ? "NCHW" : (sh.spatial.empty() ? "2-d" : "channels_last");
}

std::string shape_name(const Shape& sh) {
  std::string dims = "(" + std::to_string(sh.N) + ", " + std::to_string(sh.C);
  for (auto d : sh.spatial) dims += ", " + std::to_string(d);
  return dims + ")";
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

}  // namespace

int run_all(int argc, char** argv) {
  bool counts = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick")
      g_quick = true;
    else if (a == "--counts")
      counts = true;
    else if (a == "--mixed")
      g_mixed_only = true;
    else if (a == "--only" && i + 1 < argc)
      g_only = argv[++i];
    else
      die("unknown argument " + a + " (usage: driver [--quick] [--mixed] [--only OP] [--counts])");
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
