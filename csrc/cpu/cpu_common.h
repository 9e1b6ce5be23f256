// Building blocks shared by the CPU kernels: accumulation types, chunked load/store with dtype conversion,
// vectorised loops that handle the tail with partial loads so every element takes the same code path
// (forward and backward then agree bit for bit on [z > 0]).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "bnfused.h"
#include "bn_math.h"
#include "cpu/activation_vec.h"

namespace bnfused::cpu {

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements per chunk: small enough that a chunk of x, dy and multipliers stays in L1.
constexpr int64_t kChunk = 2048;

// f(Vec, offset, count) over [0, n) in vector steps; the last step is partial (count < Vec::size()).
template <typename acc_type, typename F>
inline void vec_loop(int64_t n, F f) {
  using Vec = at::vec::Vectorized<acc_type>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) f(i, static_cast<int>(Vec::size()));
  if (i < n) f(i, static_cast<int>(n - i));
}

// f(i) for steps [i, i + kStep) covering [0, n), n >= kStep: the last step ends at n, overlapping the one before.
template <int64_t kStep, typename F>
inline void overlapping_steps(int64_t n, F f) {
  // One call site, so the (large) body stays inlined.
  for (int64_t i = 0;; i = std::min<int64_t>(i + kStep, n - kStep)) {
    f(i);
    if (i + kStep >= n) break;
  }
}

// vec_loop for elementwise passes (each output a function of the same-index inputs, written to a buffer no input
// aliases): a ragged end of n >= size() is one full vector ending at n, overlapping the one before it, whose
// elements are recomputed to the same bits. A 7x7 plane then needs no masked store (slow on AMD) and no masked load.
template <typename acc_type, typename F>
inline void elementwise_loop(int64_t n, F f) {
  using Vec = at::vec::Vectorized<acc_type>;
  if (n < Vec::size()) {
    if (n > 0) f(0, static_cast<int>(n));
    return;
  }
  overlapping_steps<Vec::size()>(n, [&](int64_t i) { f(i, static_cast<int>(Vec::size())); });
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// Lane mask with the first `count` 32-bit lanes set (count in 0..8), for AVX2 masked loads and stores: the partial
// vectors at plane ends then cost one instruction instead of Vectorized's copy through a stack buffer.
inline __m256i first_lanes32(int count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i first_lanes64(int count) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(count), _mm256_setr_epi64x(0, 1, 2, 3));
}
#endif

// Vector of `count` elements from p (the rest zero) and its store; count == size() is the plain path.
template <typename acc_type>
inline at::vec::Vectorized<acc_type> load(const acc_type* p, int count) {
  using Vec = at::vec::Vectorized<acc_type>;
  if (count == Vec::size()) return Vec::loadu(p);
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_type, float>) return Vec(_mm256_maskload_ps(p, first_lanes32(count)));
  if constexpr (std::is_same_v<acc_type, double>) return Vec(_mm256_maskload_pd(p, first_lanes64(count)));
#endif
  return Vec::loadu(p, count);
}

template <typename acc_type>
inline void store(const at::vec::Vectorized<acc_type>& v, acc_type* p, int count) {
  using Vec = at::vec::Vectorized<acc_type>;
  if (count == Vec::size()) {
    v.store(p);
    return;
  }
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_type, float>) {
    _mm256_maskstore_ps(p, first_lanes32(count), v);
    return;
  }
  if constexpr (std::is_same_v<acc_type, double>) {
    _mm256_maskstore_pd(p, first_lanes64(count), v);
    return;
  }
#endif
  v.store(p, count);
}

// One vector of acc_type from `count` scalar_t elements, and back: float32/float64 load and store directly;
// BFloat16/Half widen to float in registers (the elementwise passes then need no conversion buffers).
template <typename scalar_t, typename acc_type>
inline at::vec::Vectorized<acc_type> load_as(const scalar_t* p, int count) {
  using Vec = at::vec::Vectorized<acc_type>;
  if constexpr (std::is_same_v<scalar_t, acc_type>) {
    return load(p, count);
  } else {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
    static_assert(Vec::size() == 8 && sizeof(scalar_t) == 2, "8 16-bit floats per 128-bit load");
    __m128i raw;
    if (count == 8) {
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      raw = _mm_setzero_si128();
      std::memcpy(&raw, p, sizeof(scalar_t) * count);
    }
    __m256 out;
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
      at::vec::cvtbf16_fp32(raw, out);
    else
      at::vec::cvtfp16_fp32(raw, out);
    return Vec(out);
#else
    alignas(64) acc_type tmp[Vec::size()] = {};
    for (int k = 0; k < count; ++k) tmp[k] = static_cast<acc_type>(p[k]);
    return Vec::loadu(tmp);
#endif
  }
}

template <typename scalar_t, typename acc_type>
inline void store_as(const at::vec::Vectorized<acc_type>& v, scalar_t* p, int count) {
  if constexpr (std::is_same_v<scalar_t, acc_type>) {
    store(v, p, count);
  } else {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
    const __m128i packed = std::is_same_v<scalar_t, at::BFloat16> ? at::vec::cvtfp32_bf16(__m256(v))
                                                                  : at::vec::cvtfp32_fp16(__m256(v));
    if (count == 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
    else
      std::memcpy(p, &packed, sizeof(scalar_t) * count);
#else
    alignas(64) acc_type tmp[at::vec::Vectorized<acc_type>::size()];
    v.store(tmp);
    for (int k = 0; k < count; ++k) p[k] = static_cast<scalar_t>(tmp[k]);
#endif
  }
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// 16 BFloat16 at a time as two float vectors, for the elementwise passes: one 256-bit load and two in-lane unpacks
// widen them, and their rounding back ends in one in-lane pack (the 8-wide load_as / store_as cross lanes once per
// 8 elements each way). The unpacks leave elements 0-3, 8-11 in `lo` and 4-7, 12-15 in `hi`; store_bf16x16 undoes
// exactly that order, and operands that differ per element are read in it (load_f32x16_as_bf16_order,
// bf16x16_order). Rounding is at::vec::cvtfp32_bf16's, bit for bit: to nearest even, every NaN to 0xFFFF.
struct BF16x16 {
  __m256 lo, hi;
};
inline BF16x16 load_bf16x16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i zero = _mm256_setzero_si256();
  return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw))};
}
// Float multipliers (or any operand) of the same 16 elements, from element order into load_bf16x16's.
inline BF16x16 load_f32x16_as_bf16_order(const float* p) {
  const __m256 first = _mm256_loadu_ps(p), second = _mm256_loadu_ps(p + 8);
  return {_mm256_permute2f128_ps(first, second, 0x20), _mm256_permute2f128_ps(first, second, 0x31)};
}
inline __m256i round_to_bf16_bits(__m256 v) {  // bf16 bits in the low 16 bits of each 32-bit lane
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)), bits), 16);
  const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
  return _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), rounded, ordered);
}
inline void store_bf16x16(const BF16x16& v, at::BFloat16* p) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_packus_epi32(round_to_bf16_bits(v.lo), round_to_bf16_bits(v.hi)));
}
#define BNFUSED_BF16X16 1
#endif

// Channels_last rows of bfloat16 with C % 16 == 0 run 16 at a time too; their per-channel operands are then
// stored in BF16x16 lane order (bf16x16_order), so each 16-channel block loads as two plain vectors.
template <typename scalar_t>
inline bool bf16x16_rows(int64_t C) {
#ifdef BNFUSED_BF16X16
  return std::is_same_v<scalar_t, at::BFloat16> && C % 16 == 0;
#else
  return false;
#endif
}

// v (size % 16 == 0) with each 16-element block in BF16x16 lane order: elements 0-3, 8-11, then 4-7, 12-15.
template <typename T>
inline std::vector<T> bf16x16_order(const std::vector<T>& v) {
  std::vector<T> out(v.size());
  for (size_t j = 0; j + 16 <= v.size(); j += 16)
    for (size_t q = 0; q < 4; ++q) {
      out[j + q] = v[j + q];
      out[j + 4 + q] = v[j + 8 + q];
      out[j + 8 + q] = v[j + 4 + q];
      out[j + 12 + q] = v[j + 12 + q];
    }
  return out;
}

// Horizontal sums of kLaneSums vectors at once: out[j] = the lanes of v[j] added pairwise, adjacent lanes first
// ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)), the same tree for every j, so a plane's sum does not depend on the slot it
// took. With AVX2 one transpose-reduction serves 8 planes: a reduction per plane costs more than reading a 7x7 one.
constexpr int kLaneSums = 8;

template <typename acc_type>
inline acc_type lane_sum(const at::vec::Vectorized<acc_type>& v) {
  using Vec = at::vec::Vectorized<acc_type>;
  alignas(64) acc_type t[Vec::size()];
  v.store(t);
  for (int width = Vec::size() / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) t[i] = t[2 * i] + t[2 * i + 1];
  return t[0];
}

template <typename acc_type>
inline void lane_sums(const at::vec::Vectorized<acc_type> (&v)[kLaneSums], acc_type* out) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_type, float>) {
    // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]; two levels leave v[j]'s low and high
    // 4-lane sums in 128-bit halves, and one add of the regrouped halves finishes all 8.
    const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    const __m256 low = _mm256_permute2f128_ps(s0123, s4567, 0x20), high = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    _mm256_storeu_ps(out, _mm256_add_ps(low, high));
    return;
  }
#endif
  for (int j = 0; j < kLaneSums; ++j) out[j] = lane_sum(v[j]);
}

// Σ x over n scalar_t elements as a vector of partial sums (four accumulators keep the add latency off the
// critical path; partial loads add zeros).
template <typename scalar_t, typename acc_type>
inline at::vec::Vectorized<acc_type> vec_sum(const scalar_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_type>;
  constexpr int64_t V = Vec::size();
  Vec s[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V)
    for (int k = 0; k < 4; ++k) s[k] += load_as<scalar_t, acc_type>(x + i + k * V, V);
  // Full vectors, then one partial: the loop of a 7x7 plane then has no per-step count (same order of adds).
  for (; i + V <= n; i += V) s[0] += load_as<scalar_t, acc_type>(x + i, V);
  if (i < n) s[0] += load_as<scalar_t, acc_type>(x + i, static_cast<int>(n - i));
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Σ (x - mean)^2 over n elements as a vector of partial sums.
template <typename scalar_t, typename acc_type>
inline at::vec::Vectorized<acc_type> vec_sq_dev(const scalar_t* x, int64_t n, acc_type mean) {
  using Vec = at::vec::Vectorized<acc_type>;
  constexpr int64_t V = Vec::size();
  const Vec vmean(mean);
  Vec q[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V)
    for (int k = 0; k < 4; ++k) {
      const Vec d = load_as<scalar_t, acc_type>(x + i + k * V, V) - vmean;
      q[k] = at::vec::fmadd(d, d, q[k]);
    }
  for (; i + V <= n; i += V) {
    const Vec d = load_as<scalar_t, acc_type>(x + i, V) - vmean;
    q[0] = at::vec::fmadd(d, d, q[0]);
  }
  if (i < n) {
    const int count = static_cast<int>(n - i);
    // Partial loads zero the missing lanes; mask their deviation out.
    const Vec d = Vec::set(Vec(0), load_as<scalar_t, acc_type>(x + i, count) - vmean, count);
    q[0] = at::vec::fmadd(d, d, q[0]);
  }
  return (q[0] + q[1]) + (q[2] + q[3]);
}

// Welford triple of n values (two passes over a chunk that sits in L1: sum, then squared deviations).
template <typename scalar_t, typename acc_type = acc_t<scalar_t>>
Welford<double> chunk_welford(const scalar_t* x, int64_t n) {
  const acc_type mean = lane_sum(vec_sum<scalar_t, acc_type>(x, n)) / static_cast<acc_type>(n);
  const acc_type m2 = lane_sum(vec_sq_dev<scalar_t, acc_type>(x, n, mean));
  return Welford<double>{static_cast<double>(n), static_cast<double>(mean), static_cast<double>(m2)};
}

// The per-channel forward coefficients z = x * a[c] + b[c] (channel_affine) as two arrays, for the vector loops.
template <typename acc_t>
struct AffineArrays {
  std::vector<acc_t> a, b;
};

template <typename acc_t>
AffineArrays<acc_t> affine_arrays(const ChannelParams<acc_t>& prm, int64_t C) {
  AffineArrays<acc_t> ab{std::vector<acc_t>(C), std::vector<acc_t>(C)};
  for (int64_t c = 0; c < C; ++c) {
    const auto cab = prm.affine(c);
    ab.a[c] = cab.a;
    ab.b[c] = cab.b;
  }
  return ab;
}

// ChannelsFirst work: threads take ranges of whole planes [begin, end); a range is walked in runs of at most
// kChunk consecutive elements (memory offset == logical index), so planes smaller than a chunk share one dropout
// fill and one dtype conversion; each run is then cut into its per-plane segments.
inline int64_t planes_grain(const Geometry& g) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(g.S, 1)); }

// Runs end at multiples of kChunk (and at the range's end), so how a plane is cut -- and so every float partial
// sum -- does not depend on how the planes were split between threads.
template <typename F>  // f(off, len)
inline void for_each_run(const Geometry& g, int64_t plane_begin, int64_t plane_end, F f) {
  const int64_t end = plane_end * g.S;
  for (int64_t off = plane_begin * g.S; off < end;) {
    const int64_t len = std::min(kChunk - off % kChunk, end - off);
    f(off, len);
    off += len;
  }
}

// Software prefetch of the next run's streams (one or two inputs and at most one output, `bytes` each), issued a
// slice at a time between the Philox batches of the current run (upto(done, total): the first done/total of its
// lines).
// Philox keeps the core busy for ~1 us per 2048-element run with no loads in flight, and the hardware prefetcher
// does not run ahead over that gap: without this, a pass with dropout costs Philox + memory instead of about the
// larger of the two (standalone model of the forward, 64 MB float32, 2 threads: 0.49-0.59 -> 0.37-0.44 ns/elem).
// The output's lines are prefetched too (asked for writing; without -mprfchw GCC emits a read prefetch, which gets
// an unshared line exclusive anyway), so its read-for-ownership is off the store path: prefetching the inputs
// alone gained little in the model.
// to_l2: into L2 only, for runs (channels_last tiles) that with their multipliers outgrow L1.
class NextRunPrefetch {
 public:
  NextRunPrefetch(const void* in0, const void* in1, void* out, int64_t bytes, bool to_l2 = false)
      : in0_(static_cast<const char*>(in0)), in1_(static_cast<const char*>(in1)), out_(static_cast<char*>(out)),
        lines_(bytes > 0 ? (bytes + kLine - 1) / kLine : 0), to_l2_(to_l2) {}

  // Bytes [at, at + bytes) of each stream, given the tensors' data pointers (in1, out may be null).
  __attribute__((always_inline)) static NextRunPrefetch range(const void* in0, const void* in1, void* out, int64_t at, int64_t bytes,
                               bool to_l2 = false) {
    auto shift = [at](const void* base) { return base ? static_cast<const char*>(base) + at : nullptr; };
    return NextRunPrefetch(shift(in0), shift(in1), const_cast<char*>(shift(out)), bytes, to_l2);
  }

  void upto(int64_t done, int64_t total) {
    const int64_t target = total > 0 ? lines_ * done / total : lines_;
    for (; issued_ < target; ++issued_) {
      const int64_t at = issued_ * kLine;
      if (to_l2_) {
        __builtin_prefetch(in0_ + at, 0, 2);
        if (in1_) __builtin_prefetch(in1_ + at, 0, 2);
        if (out_) __builtin_prefetch(out_ + at, 0, 2);  // no line is shared: a read prefetch gets it exclusive
      } else {
        __builtin_prefetch(in0_ + at, 0, 3);
        if (in1_) __builtin_prefetch(in1_ + at, 0, 3);
        if (out_) __builtin_prefetch(out_ + at, 1, 3);
      }
    }
  }

 private:
  static constexpr int64_t kLine = 64;
  const char* in0_;
  const char* in1_;
  char* out_;
  int64_t lines_;
  bool to_l2_;
  int64_t issued_ = 0;
};

// fill_dropout_mult's after_batch callback: advances `prefetch` (if given) with the run's progress.
inline auto prefetch_progress(NextRunPrefetch* prefetch) {
  return [prefetch](int64_t done, int64_t total) {
    if (prefetch) prefetch->upto(done, total);
  };
}

// Prefetch of the streams' part in the run that follows [off, off + len) in for_each_run's walk of planes up to
// plane_end (nothing after the last run). The bases are the tensors' data pointers (in1, out may be null).
// always_inline, like the constructor it replaced at the call sites: GCC kept it out of line, and backward_reduce
// then measured slower in an A/B (within this VM's noise, but in 3 of 4 alternating pairs).
__attribute__((always_inline)) inline NextRunPrefetch next_run_prefetch(const Geometry& g, int64_t plane_end, int64_t off, int64_t len,
                                         const void* in0, const void* in1, void* out, int64_t elem_size) {
  const int64_t next = off + len;
  const int64_t next_len = std::max<int64_t>(0, std::min(kChunk - next % kChunk, plane_end * g.S - next));
  return NextRunPrefetch::range(in0, in1, out, next * elem_size, next_len * elem_size);
}

// Planes and channels are stepped, not divided out per segment: two integer divisions per 7x7 plane cost about
// as much as the plane's arithmetic.
template <typename F>  // f(rel, len, plane, c): elements [off + rel, off + rel + len) all lie in `plane`, channel c
inline void for_each_segment(const Geometry& g, int64_t off, int64_t len, F f) {
  int64_t plane = off / g.S, c = plane % g.C;
  int64_t plane_end = (plane + 1) * g.S;  // memory offset where `plane` ends
  for (int64_t rel = 0; rel < len;) {
    const int64_t seg = std::min(len - rel, plane_end - (off + rel));
    f(rel, seg, plane, c);
    rel += seg;
    ++plane;
    plane_end += g.S;
    if (++c == g.C) c = 0;
  }
}

// A small double tensor (per-channel results) rounded to float in a plain loop: cheaper than a dispatched .to().
inline at::Tensor to_float(const at::Tensor& t) {
  auto out = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  const double* src = t.const_data_ptr<double>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < t.numel(); ++i) dst[i] = static_cast<float>(src[i]);
  return out;
}

// Dropout parameters derived once per call.
template <typename acc_type>
struct DropoutParams {
  PhiloxKey key;
  uint32_t threshold;
  acc_type scale;
  bool active;                       // p > 0
  const uint8_t* bits_in = nullptr;  // packed keep bits to read instead of running Philox (keep_bits.h)
  uint8_t* bits_out = nullptr;       // where to pack the keep bits Philox generates
};

template <typename acc_type>
DropoutParams<acc_type> dropout_params(PhiloxKey key, double p, const uint8_t* bits_in = nullptr,
                                       uint8_t* bits_out = nullptr) {
  return DropoutParams<acc_type>{key, threshold16(p), dropout_scale<acc_type>(p), p > 0.0, bits_in, bits_out};
}

}  // namespace bnfused::cpu
