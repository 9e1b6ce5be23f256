// The kernels' test cases and their scalar reference from the shared math (csrc/bn_math.h, csrc/philox.h): masks,
// forward outputs, pass bits and input gradients bit for bit, statistics and sums to a tolerance. Shared by the CPU
// emulation driver (driver.cpp, the kernels compiled by g++ against cuda_emu.h) and the simulator driver
// (tests/ptx_sim/driver.cu, the kernels compiled by nvcc and run as PTX), which choose the matrix of cases.
// Device memory is a Buffer: one allocation in the emulation, device memory and a host copy under real CUDA.
#pragma once
#include "cuda/add_relu.cuh"
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
#include <utility>
#include <vector>

#if !defined(BNFUSED_CUDA_EMULATION)
// The 16-bit types the extension instantiates its kernels with (header-only; no torch library is linked).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#endif

using namespace bnfused;
using namespace bnfused::cuda;

namespace {

// The 16-bit storage types: the emulation's (cuda_emu.h), or c10's, as the extension's kernels are instantiated.
#if defined(BNFUSED_CUDA_EMULATION)
using half_t = __half;
using bf16_t = __nv_bfloat16;
constexpr bool kEmulation = true;  // access and Philox counters exist (Counts)
#else
using half_t = c10::Half;
using bf16_t = c10::BFloat16;
constexpr bool kEmulation = false;
#endif

bool g_quick = false;
bool g_mixed_only = false;  // --mixed: only the cases with buffers at different misalignments
std::string g_only;
int g_failures = 0;
long g_cases = 0;
long g_scalar_checked = 0;  // op runs checked to take the scalar path (check_scalar_path)
long g_split_reductions = 0;  // reductions whose channels were split over several blocks (the last-block merge)
int64_t g_max_splits = 0;     // the most partials per channel of a reduction since it was last set to 0

template <typename T>
const char* type_name();
template <>
const char* type_name<float>() { return "float32"; }
template <>
const char* type_name<double>() { return "float64"; }
template <>
const char* type_name<half_t>() { return "float16"; }
template <>
const char* type_name<bf16_t>() { return "bfloat16"; }

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
  ActSpec act = {};    // the activation (run_case's kAct; its alpha and beta here)
  Offsets offsets() const { return mixed ? at : Offsets::all(misaligned); }
  std::string name() const {
    char buf[240];
    std::string dims = std::to_string(shape.N) + "x" + std::to_string(shape.C);
    for (auto d : shape.spatial) dims += "x" + std::to_string(d);
    const std::string mis = mixed ? at.name() : misaligned == 0 ? "" : misaligned == 1 ? " misaligned" :
                            " misaligned by " + std::to_string(misaligned);
    const std::string act_name = act.kind == Act::ReLU ? "" : " act=" + std::to_string(static_cast<int>(act.kind)) +
                                 "(" + std::to_string(act.alpha) + ", " + std::to_string(act.beta) + ")";
    std::snprintf(buf, sizeof buf, "%s %s p=%g%s%s%s", dims.c_str(),
                  layout == Layout::ChannelsFirst ? "NCHW" : (shape.spatial.empty() ? "2d" : "channels_last"), p,
                  mis.c_str(), affine ? "" : " no-affine", act_name.c_str());
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

// Device memory of n elements, `misaligned` elements past a 16-byte boundary: `ptr` for the kernels, `host` (also
// buf[i]) for the driver. The emulation: one allocation of exactly n elements, 256-byte aligned as cudaMalloc's
// (ASan sees one past the end), host == ptr, upload() / download() do nothing. Real CUDA: cudaMalloc'd memory and a
// host copy; the driver uploads what it filled before a launch and downloads what it checks after one.
template <typename T>
struct Buffer {
  unsigned char* raw = nullptr;
  T* ptr = nullptr;
  T* host = nullptr;
  int64_t n = 0;
  Buffer(int64_t n_, int misaligned) : n(n_) {
    const size_t lead = static_cast<size_t>(misaligned) * sizeof(T);
    const size_t bytes = lead + n * sizeof(T) + (n == 0);
#if defined(BNFUSED_CUDA_EMULATION)
    raw = static_cast<unsigned char*>(::operator new(bytes, std::align_val_t(256)));
    ptr = host = reinterpret_cast<T*>(raw + lead);
#else
    BNFUSED_CUDA_CHECK(cudaMalloc(&raw, bytes));  // 256-byte aligned
    ptr = reinterpret_cast<T*>(raw + lead);
    host = static_cast<T*>(::operator new(n * sizeof(T) + 1));
#endif
  }
  Buffer(Buffer&& o) noexcept : raw(std::exchange(o.raw, nullptr)), ptr(o.ptr), host(std::exchange(o.host, nullptr)),
                                n(o.n) {}
  ~Buffer() {
#if defined(BNFUSED_CUDA_EMULATION)
    ::operator delete(raw, std::align_val_t(256));
#else
    if (raw) cudaFree(raw);
    ::operator delete(host);
#endif
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T& operator[](int64_t i) { return host[i]; }
  const T& operator[](int64_t i) const { return host[i]; }
  std::vector<T> values() const { return std::vector<T>(host, host + n); }
  void fill(T v) { std::fill(host, host + n, v); }
  // Host -> device of elements [0, count) (all by default), and back.
  void upload(int64_t count = -1) { copy(count, true); }
  void download(int64_t count = -1) { copy(count, false); }

 private:
  void copy(int64_t count, bool to_device) {
#if !defined(BNFUSED_CUDA_EMULATION)
    if (count < 0) count = n;
    if (count > 0)
      BNFUSED_CUDA_CHECK(to_device ? cudaMemcpy(ptr, host, count * sizeof(T), cudaMemcpyHostToDevice)
                                   : cudaMemcpy(host, ptr, count * sizeof(T), cudaMemcpyDeviceToHost));
#else
    (void)count, (void)to_device;
#endif
  }
};

// A buffer holding `values` on the device.
template <typename T>
Buffer<T> device_copy(const std::vector<T>& values) {
  Buffer<T> b(static_cast<int64_t>(values.size()), 0);
  std::copy(values.begin(), values.end(), b.host);
  b.upload();
  return b;
}

// Memory offset of logical element (n, c, s).
int64_t offset_of(const Shape& sh, Layout layout, int64_t n, int64_t c, int64_t s) {
  const int64_t S = sh.S();
  return layout == Layout::ChannelsFirst ? (n * sh.C + c) * S + s : (n * S + s) * sh.C + c;
}

template <typename T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// An input gradient (dx) bit for bit, except under the simulator where the channel's mean of g is exactly 0: there
// backward_coef's C = -A * mean_g is -0, and GPGPU-Sim's neg.f32 of +0 gives +0 (a defect of the simulator, not of
// the kernel: tests/ptx_sim/README.md), so a zero dx may come out with either sign.
template <typename T>
bool same_dx(T want, T got, bool mean_g_zero) {
  if (same_bits(want, got)) return true;
  return !kEmulation && mean_g_zero && static_cast<float>(want) == 0.0f && static_cast<float>(got) == 0.0f;
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
  if constexpr (std::is_same_v<T, half_t>) return StatDtype::Half;
  return StatDtype::BFloat16;
}

// The Philox key (seed, offset): on the host for the reference, in device memory for the kernels.
constexpr int64_t kKey[2] = {0x1234567890abcdefLL, 48};
const int64_t* device_key() {
  static Buffer<int64_t> key = device_copy(std::vector<int64_t>(kKey, kKey + 2));
  return key.ptr;
}

// The arrival counters of the reductions' last-block merge, shared by every reduction the driver runs (one
// stream, as a host wrapper's per-stream counters): zero before a run, and every run must leave them zero.
Buffer<unsigned>& counters() {
  static Buffer<unsigned> c = device_copy(std::vector<unsigned>(1 << 16, 0u));
  return c;
}

unsigned* counters_for(const ReducePlan& plan) {
  if (plan.counter_elems() > counters().n) die("too many reduction counters");
  if (plan.splits > 1) ++g_split_reductions;
  g_max_splits = std::max(g_max_splits, plan.splits);
  return plan.counter_elems() ? counters().ptr : nullptr;
}
void check_counters_reset(const ReducePlan& plan) {
  Buffer<unsigned>& c = counters();
  c.download(plan.counter_elems());
  for (int64_t i = 0; i < plan.counter_elems(); ++i)
    if (c[i] != 0) die("a reduction left arrival counter " + std::to_string(i) + " at " + std::to_string(c[i]) +
                       " (the last block must reset it)");
}

// Plans and runs Op over x (and dy) with a fresh workspace and the shared counters.
template <typename scalar_t, typename acc_t, class Op>
ReducePlan reduce(const Op& op, const Geometry& g, const scalar_t* x, const scalar_t* dy, const Dropout<acc_t>* drop) {
  const auto plan = plan_reduction<scalar_t, Op>(g, x, dy);
  Buffer<acc_t> ws(plan.workspace_elems(), 0);
  run_reduction<scalar_t, acc_t>(op, plan, x, dy, g, drop, ws.n ? ws.ptr : nullptr, counters_for(plan), nullptr);
  check_counters_reset(plan);
  return plan;
}

// A split reduction run again into poisoned outputs must give the same bits: the counters work for the next call
// and the merge order does not depend on which block arrived last (it differs from run to run).
template <typename T>
bool same_again(const Buffer<T>& out, const std::vector<T>& first) {
  for (size_t i = 0; i < first.size(); ++i)
    if (!same_bits(out[i], first[i])) return false;
  return true;
}

// The reference sums as backward_input takes them (rounded to acc_t, on the device) and their means over `count`,
// which the reference gradient uses (as the kernels do).
template <typename acc_t>
struct AccSums {
  Buffer<acc_t> sum_g, sum_gx;
  std::vector<acc_t> mean_g, mean_gx;
};

template <typename acc_t>
AccSums<acc_t> acc_sums(const std::vector<double>& sg_ref, const std::vector<double>& sgx_ref, int64_t count) {
  const int64_t C = static_cast<int64_t>(sg_ref.size());
  AccSums<acc_t> a{Buffer<acc_t>(C, 0), Buffer<acc_t>(C, 0), std::vector<acc_t>(C), std::vector<acc_t>(C)};
  for (int64_t c = 0; c < C; ++c) {
    a.sum_g[c] = static_cast<acc_t>(sg_ref[c]);
    a.sum_gx[c] = static_cast<acc_t>(sgx_ref[c]);
    a.mean_g[c] = a.sum_g[c] / static_cast<acc_t>(count);
    a.mean_gx[c] = a.sum_gx[c] / static_cast<acc_t>(count);
  }
  a.sum_g.upload();
  a.sum_gx.upload();
  return a;
}

// What a run of kernels did: launches, Philox calls, elements moved by vector and by scalar accesses, and the
// split reductions' merge: partials loaded, 32-byte sectors of those loads, the longest chain of dependent merge
// steps of one thread (the emulation's counters; all 0 under real CUDA).
struct Counts {
  uint64_t launches, philox, vec, scalar;
  uint64_t merge_elems = 0, merge_sectors = 0, merge_chain = 0;
  static Counts now() {
#if defined(BNFUSED_CUDA_EMULATION)
    return {cuda_emu::launches.load(), cuda_emu::philox_calls.load(), cuda_emu::vector_elems.load(),
            cuda_emu::scalar_elems.load(), cuda_emu::merge_elems.load(), cuda_emu::merge_sectors.load(),
            cuda_emu::merge_chain.load()};
#else
    return {0, 0, 0, 0};
#endif
  }
  // merge_chain is a maximum (measure() resets it), the others differences.
  Counts operator-(const Counts& o) const {
    return {launches - o.launches, philox - o.philox, vec - o.vec, scalar - o.scalar,
            merge_elems - o.merge_elems, merge_sectors - o.merge_sectors, merge_chain};
  }
};

template <typename F>
Counts measure(F run) {
#if defined(BNFUSED_CUDA_EMULATION)
  cuda_emu::merge_chain = 0;
#endif
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
  if (!kEmulation || !cs.mixed || !scalar) return;
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

// Outputs of the piecewise-linear activations are compared bit for bit; those of the transcendental ones (SiLU, GELU,
// ELU, Mish: the GPU's expf / erff / tanhf are not the host's) to a tolerance of the storage type: relative to
// |want| + 1, a few float32 ulps, or one ulp of the 16-bit types (a float result a few ulps off may round the other
// way).
template <Act kAct>
constexpr bool act_exact() {
  return !act_transcendental<kAct>();
}
template <typename scalar_t>
double act_tolerance() {
  if constexpr (std::is_same_v<scalar_t, double>) return 1e-12;
  if constexpr (std::is_same_v<scalar_t, float>) return 1e-5;
  if constexpr (std::is_same_v<scalar_t, half_t>) return 2e-3;
  return 1.6e-2;
}
// The activations the drivers run besides ReLU (the main matrix's): every kind, Hardtanh as ReLU6 and as (-1, 0.5),
// LeakyReLU 0.01, ELU 1.0 and 0.5.
std::vector<ActSpec> activation_specs() {
  return {{Act::Identity},  {Act::Hardtanh, 0.0, 6.0}, {Act::Hardtanh, -1.0, 0.5}, {Act::LeakyReLU, 0.01},
          {Act::SiLU},      {Act::Hardswish},          {Act::GELU},                {Act::GELUTanh},
          {Act::ELU, 1.0},  {Act::ELU, 0.5},           {Act::Mish}};
}

// The reference g of an element: act'(z) applied to dy * mult, z recomputed from x (the kernels' and the CPU's order).
template <Act kAct, typename acc_t>
acc_t grad_of(acc_t dy, acc_t x, ChannelAffine<acc_t> ab, acc_t mult, ActArgs<acc_t> act) {
  const acc_t gm = dy * mult;
  if constexpr (kAct == Act::Identity)
    return gm;
  else
    return act_backward<kAct>(gm, bn_preact(x, ab), act);
}

template <Act kAct, typename scalar_t>
bool same_output(scalar_t want, scalar_t got) {
  if constexpr (act_exact<kAct>()) {
    return same_bits(want, got);
  } else {
    if (same_bits(want, got)) return true;
    const double w = to_double(want), v = to_double(got);
    return std::fabs(w - v) <= act_tolerance<scalar_t>() * (std::fabs(w) + 1.0);
  }
}

}  // namespace

#include "add_relu_cases.h"  // the BN + residual add + ReLU ops (run_add_case), on the helpers above

namespace {

// kAct: the activation of forward, backward_reduce and backward_input (its alpha and beta in cs.act); the statistics
// and the block tail's ops (ReLU) run in the ReLU cases only.
template <typename scalar_t, typename acc_t, Act kAct = Act::ReLU>
void run_case(const Case& cs) {
  const Shape& sh = cs.shape;
  const int64_t N = sh.N, C = sh.C, S = sh.S(), numel = N * C * S;
  const Geometry g{N, C, S, cs.layout};
  const char* dt = type_name<scalar_t>();
  Rng rng{static_cast<uint64_t>(numel * 1315423911u + C * 7 + S * 131 + cs.misaligned)};
  const bool dropout = cs.p > 0.0;
  const Dropout<acc_t> drop = make_dropout<acc_t>(device_key(), cs.p);
  const PhiloxKey key{static_cast<uint64_t>(kKey[0]), static_cast<uint64_t>(kKey[1])};
  const acc_t scale = dropout_scale<acc_t>(cs.p);
  const uint32_t thr = threshold16(cs.p);
  const ActArgs<acc_t> act = ActArgs<acc_t>::of(cs.act);

  const Offsets at = cs.offsets();
  Buffer<scalar_t> x(numel, at.x), dy(numel, at.dy), out(numel, at.out);
  std::vector<double> xd(numel), dyd(numel);  // logical order
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t L = (n * C + c) * S + s, off = offset_of(sh, cs.layout, n, c, s);
        x[off] = static_cast<scalar_t>(static_cast<acc_t>(0.5 * c - 0.3 + (1.0 + 0.1 * c) * rng.normal()));
        dy[off] = static_cast<scalar_t>(static_cast<acc_t>(rng.normal()));
        xd[L] = to_double(x[off]);
        dyd[L] = to_double(dy[off]);
      }
  x.upload();
  dy.upload();
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
  Buffer<acc_t> mean(C, 0), rstd(C, 0), weight(C, 0), bias(C, 0);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = static_cast<acc_t>(N * S > 0 ? mref[c] : 0.1 * c);
    rstd[c] = static_cast<acc_t>(1.0 / std::sqrt((N * S > 0 ? vref[c] : 1.0) + 1e-5));
    weight[c] = static_cast<acc_t>(0.5 + 0.25 * c);
    bias[c] = static_cast<acc_t>(0.1 * (c % 3) - 0.1);
  }
  for (Buffer<acc_t>* b : {&mean, &rstd, &weight, &bias}) b->upload();
  // The kernels' pointers (prm) and the reference's (hprm, the same in the emulation).
  const ChannelParams<acc_t> prm{mean.ptr, rstd.ptr, cs.affine ? weight.ptr : nullptr, cs.affine ? bias.ptr : nullptr};
  const ChannelParams<acc_t> hprm{mean.host, rstd.host, cs.affine ? weight.host : nullptr,
                                  cs.affine ? bias.host : nullptr};
  const cudaStream_t stream = nullptr;
  const double tol = sizeof(acc_t) == 8 ? 1e-11 : 2e-5;

  auto selected = [&](const char* op) { return g_only.empty() || g_only == op; };

  // ---- stats (independent of p: run once per shape/layout/alignment; x alone, so never mixed) ----
  if (selected("stats") && kAct == Act::ReLU && cs.p == 0.0 && N * S > 0 && !cs.mixed &&
      (!cs.misaligned || sizeof(scalar_t) == 2)) {
    ++g_cases;
    // batch_stats and batch_stats_update in one launch: mean, var, rstd, and running statistics of the input's
    // dtype (all four storage dtypes), strided for misaligned cases.
    Buffer<acc_t> m(C, 0), v(C, 0), r(C, 0);
    const int64_t stride = cs.misaligned ? 2 : 1;
    Buffer<scalar_t> run_mean(C * stride, 0), run_var(C * stride, 0);
    for (int64_t c = 0; c < C; ++c) {
      run_mean[c * stride] = static_cast<scalar_t>(static_cast<acc_t>(0.25 * c));
      run_var[c * stride] = static_cast<scalar_t>(static_cast<acc_t>(1.0 + 0.5 * c));
    }
    const std::vector<scalar_t> old_mean = run_mean.values(), old_var = run_var.values();
    const double momentum = 0.1, eps = 1e-5;
    RunningStats running;
    running.mean = run_mean.ptr;
    running.var = run_var.ptr;
    running.mean_stride = running.var_stride = stride;
    running.mean_dtype = running.var_dtype = stat_dtype<scalar_t>();
    running.momentum = momentum;
    running.unbias = unbiased_var_factor(N * S);
    using Op = StatsOp<acc_t>;
    const Op op{m.ptr, v.ptr, r.ptr, static_cast<acc_t>(eps), running};
    auto run = [&] {
      for (Buffer<scalar_t>* b : {&run_mean, &run_var}) b->upload();
      const auto plan = reduce<scalar_t, acc_t>(op, g, x.ptr, static_cast<const scalar_t*>(nullptr),
                                                static_cast<const Dropout<acc_t>*>(nullptr));
      for (Buffer<acc_t>* b : {&m, &v, &r}) b->download();
      for (Buffer<scalar_t>* b : {&run_mean, &run_var}) b->download();
      return plan;
    };
    const auto plan = run();
    if (plan.splits > 1) {
      const auto m1 = m.values(), v1 = v.values(), r1 = r.values();
      const auto rm1 = run_mean.values(), rv1 = run_var.values();
      for (Buffer<acc_t>* b : {&m, &v, &r}) {
        b->fill(std::numeric_limits<acc_t>::quiet_NaN());
        b->upload();
      }
      std::copy(old_mean.begin(), old_mean.end(), run_mean.host);
      std::copy(old_var.begin(), old_var.end(), run_var.host);
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
    const Counts k = measure(
        [&] { run_forward<scalar_t, acc_t, kAct>(prm, x.ptr, out.ptr, g, dropout ? &drop : nullptr, stream, act); });
    out.download();
    check_scalar_path("forward", cs, dt, k, differ(vector_bytes<scalar_t>(g, true), sizeof(scalar_t), {at.x, at.out}));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const auto ab = hprm.affine(c);
        for (int64_t s = 0; s < S; ++s) {
          const int64_t L = (n * C + c) * S + s, off = offset_of(sh, cs.layout, n, c, s);
          const acc_t z = bn_preact(static_cast<acc_t>(x[off]), ab);
          const scalar_t want = static_cast<scalar_t>(act_forward<kAct>(z, act) * mult_of(L));
          if (!same_output<kAct>(want, out[off])) {
            char d[200];
            std::snprintf(d, sizeof d, "element (%" PRId64 ", %" PRId64 ", %" PRId64 "): %.9g, want %.9g", n, c, s,
                          to_double(out[off]), to_double(want));
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
    const auto ab = hprm.affine(c);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t L = (n * C + c) * S + s;
        const double gv = grad_of<kAct>(static_cast<acc_t>(dyd[L]), static_cast<acc_t>(xd[L]), ab, mult_of(L), act);
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
    Buffer<acc_t> sum_g(C, 0), sum_gx(C, 0);
    using Gate = ActGate<acc_t, kAct>;
    using Op = GradSumsOp<acc_t, Gate>;
    const Op op{prm, sum_g.ptr, sum_gx.ptr, Gate{act}};
    ReducePlan plan;
    const Counts k = measure([&] { plan = reduce<scalar_t, acc_t>(op, g, x.ptr, dy.ptr, dropout ? &drop : nullptr); });
    sum_g.download();
    sum_gx.download();
    check_scalar_path("backward_reduce", cs, dt, k,
                      differ(vector_bytes<scalar_t>(g, false), sizeof(scalar_t), {at.x, at.dy}));
    if (plan.splits > 1) {
      const auto sg1 = sum_g.values(), sgx1 = sum_gx.values();
      for (Buffer<acc_t>* b : {&sum_g, &sum_gx}) {
        b->fill(std::numeric_limits<acc_t>::quiet_NaN());
        b->upload();
      }
      reduce<scalar_t, acc_t>(op, g, x.ptr, dy.ptr, dropout ? &drop : nullptr);
      sum_g.download();
      sum_gx.download();
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
    const auto sums = acc_sums<acc_t>(sg_ref, sgx_ref, N * S);
    const auto &sg = sums.sum_g, &sgx = sums.sum_gx;
    const auto &mg = sums.mean_g, &mgx = sums.mean_gx;
    for (const bool batch_stats : {true, false}) {
      ++g_cases;
      const Counts k = measure([&] {
        run_backward_input<scalar_t, acc_t, kAct>(prm, batch_stats ? sg.ptr : nullptr,
                                                  batch_stats ? sgx.ptr : nullptr, N * S, dy.ptr, x.ptr, out.ptr, g,
                                                  dropout ? &drop : nullptr, stream, act);
      });
      out.download();
      check_scalar_path("backward_input", cs, dt, k,
                        differ(vector_bytes<scalar_t>(g, true), sizeof(scalar_t), {at.dy, at.x, at.out}));
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) {
          const auto ab = hprm.affine(c);
          const auto coef = backward_coef<acc_t>(mean[c], rstd[c], hprm.w(c), batch_stats, mg[c], mgx[c]);
          for (int64_t s = 0; s < S; ++s) {
            const int64_t L = (n * C + c) * S + s, off = offset_of(sh, cs.layout, n, c, s);
            const acc_t xv = static_cast<acc_t>(x[off]);
            const acc_t gv = grad_of<kAct>(static_cast<acc_t>(dy[off]), xv, ab, mult_of(L), act);
            const scalar_t want = static_cast<scalar_t>(batch_stats ? grad_input_element(gv, xv, coef)
                                                                    : grad_input_element_eval(gv, coef));
            if (!(act_exact<kAct>() ? same_dx(want, out[off], batch_stats && mg[c] == acc_t(0))
                                    : same_output<kAct>(want, out[off]))) {
              char d[200];
              std::snprintf(d, sizeof d, "%s element (%" PRId64 ", %" PRId64 ", %" PRId64 "): %.9g, want %.9g",
                            batch_stats ? "batch-stats" : "running-stats", n, c, s, to_double(out[off]),
                            to_double(want));
              mismatch("backward_input", cs, dt, d);
              n = N, c = C;
              break;
            }
          }
        }
    }
  }

  if constexpr (act_has_gate_bits<kAct>()) run_add_case<scalar_t, acc_t, kAct>(cs, x, dy, prm, hprm);
}

// dropout_mask: bool output, any numel, aligned or not; bit for bit with the scalar Philox contract.
void run_mask_case(int64_t numel, double p, bool misaligned) {
  ++g_cases;
  Buffer<bool> keep(numel, misaligned);
  std::memset(keep.host, 0x55, numel);
  keep.upload();
  if (numel > 0) run_dropout_mask(device_key(), p, keep.ptr, numel, nullptr);
  keep.download();
  const PhiloxKey key{static_cast<uint64_t>(kKey[0]), static_cast<uint64_t>(kKey[1])};
  const uint32_t thr = threshold16(p);
  for (int64_t i = 0; i < numel; ++i) {
    unsigned char got;
    std::memcpy(&got, keep.host + i, 1);
    const unsigned char want = thr == 0 ? 1 : (thr >= 65536 ? 0 : keep_element(key, i, thr));
    if (got != want) {
      std::fprintf(stderr, "FAIL dropout_mask numel=%" PRId64 " p=%g%s: element %" PRId64 " is %d, want %d\n", numel,
                   p, misaligned ? " misaligned" : "", i, got, want);
      if (++g_failures >= 5) std::exit(1);
      return;
    }
  }
}

}  // namespace
