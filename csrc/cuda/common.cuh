// Building blocks shared by the CUDA kernels: the launch helper, the shared-array macro, vector loads/stores,
// the Philox multipliers of a run of up to 8 elements. Torch-free, so the same kernels also build against the
// CPU emulation (tests/cuda_emulation/cuda_emu.h, selected by BNFUSED_CUDA_EMULATION) and into a CUDA program
// without torch (BNFUSED_CUDA_STANDALONE, tests/ptx_sim); the ATen side of the host wrappers is in host.cuh.
//
// Work units (both layouts):
//   ChannelsFirst: memory offset == logical index, so a unit is one aligned Philox block of 8 logical
//     elements (i = 8*blk .. 8*blk+7): one Philox call, lanes known at compile time, 128-bit loads.
//   ChannelsLast : memory (n, s, c); a unit is 8 consecutive s of one sample n for one channel c, i.e. the
//     logical run (n*C + c)*S + s0 .. +7; it spans one Philox block when S % 8 == 0, at most two otherwise.
#pragma once
#if defined(BNFUSED_CUDA_EMULATION)
#include "cuda_emu.h"
#define BNFUSED_CUDA_CHECK(expr) ::cuda_emu::check((expr), #expr, __FILE__, __LINE__)
// Shared arrays live in the emulated block's arena: exactly `count` elements, poisoned with 0xFF bytes.
#define BNFUSED_SHARED(T, name, count) \
  static char name##_site;             \
  T* const name = ::cuda_emu::shared_array<T>(&name##_site, (count))
// The emulation counts the elements moved by vector and by scalar accesses (driver --counts), and the split
// reductions' merge: each partial it loads (`at`: which load of its warp, for the sectors a warp's load touches) and
// each dependent step (driver --merge-cost).
#define BNFUSED_COUNT_ACCESS(is_vector, elems) ::cuda_emu::count_access((is_vector), (elems))
#define BNFUSED_COUNT_MERGE_LOAD(ptr, at) ::cuda_emu::merge_load((ptr), sizeof(*(ptr)), (at))
#define BNFUSED_COUNT_MERGE_STEPS(n) ::cuda_emu::merge_steps(n)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#if defined(BNFUSED_CUDA_STANDALONE)
// A CUDA program without torch (tests/ptx_sim): a failed call throws.
#include <stdexcept>
#include <string>
namespace bnfused::cuda {
inline void check_standalone(cudaError_t e, const char* expr) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(expr) + ": " + cudaGetErrorString(e));
}
}  // namespace bnfused::cuda
#define BNFUSED_CUDA_CHECK(expr) ::bnfused::cuda::check_standalone((expr), #expr)
#else
#include <c10/cuda/CUDAException.h>
#define BNFUSED_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#endif
#define BNFUSED_SHARED(T, name, count) __shared__ T name[count]
#define BNFUSED_COUNT_ACCESS(is_vector, elems) ((void)0)
#define BNFUSED_COUNT_MERGE_LOAD(ptr, at) ((void)0)
#define BNFUSED_COUNT_MERGE_STEPS(n) ((void)0)
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

// Relative includes: found next to this file whatever the include path (csrc/bn_math.h is named so
// that <math.h> never resolves to it).
#include "../activation.h"
#include "../bn_math.h"
#include "../geometry.h"
#include "../philox.h"

namespace bnfused::cuda {

constexpr int kThreads = 256;  // threads per block of every kernel here
constexpr int kUnit = 8;       // elements per work unit (= elements per Philox call)

// ---- host helpers ----

// Every kernel launch: on `stream`, followed by its launch check (a bad configuration throws here).
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
#if defined(BNFUSED_CUDA_EMULATION)
  ::cuda_emu::launch(kernel, grid, block, stream, static_cast<Params>(std::forward<Args>(args))...);
#else
  kernel<<<grid, block, 0, stream>>>(static_cast<Params>(std::forward<Args>(args))...);
#endif
  BNFUSED_CUDA_CHECK(cudaGetLastError());
}

inline int sm_count() {
  // Cached per device; the race on first use writes the same value.
  static int counts[64] = {0};
  int dev = 0;
  BNFUSED_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) {
    int n = 0;
    BNFUSED_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
  }
  if (counts[dev] == 0) {
    int n = 0;
    BNFUSED_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    counts[dev] = std::max(n, 1);
  }
  return counts[dev];
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

inline bool aligned_to(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// How many elements the pointers lie past a `bytes` boundary (0 .. bytes/sizeof(T) - 1), when they all lie the same
// distance past it (null pointers ignored); -1 when they differ. The kernels peel that many elements so the rest
// is vector-aligned; one peel can align only one offset, so pointers that differ take scalar accesses (not rare:
// the chunks of torch.split / chunk of a batch lie sample-size bytes apart, e.g. 300 for (N, 3, 5, 5) float32,
// beside freshly allocated outputs; the emulation driver's mixed cases run that path).
template <typename T>
inline int shared_misalignment(size_t bytes, const T* a, const T* b = nullptr, const T* c = nullptr,
                               const T* d = nullptr) {
  int k = -2;  // none seen yet
  for (const T* p : {a, b, c, d}) {
    if (p == nullptr) continue;
    const uintptr_t r = reinterpret_cast<uintptr_t>(p) % bytes;
    if (r % sizeof(T) != 0) return -1;
    const int e = static_cast<int>(r / sizeof(T));
    if (k != -2 && k != e) return -1;
    k = e;
  }
  return k == -2 ? 0 : k;
}

// Blocks for a grid-stride elementwise kernel over `items` work items (one per thread per step).
inline unsigned apply_blocks(int64_t items) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * (2048 / kThreads) * 4;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(items, kThreads), cap)));
}

// Units per thread along s for channels_last with S % 8 != 0 (S > 8), out of SG per row, when one unit per thread
// would take `threads` threads: a thread walking a strip of consecutive units of its channels carries the Philox
// block a unit ends in into the next (KeepCarry: one call per unit instead of two), at the cost of fewer threads;
// strips as long as the grid keeps sm_count() * 512 threads (a quarter of the resident ones), each with 8
// independent row loads in flight, enough to cover the memory latency at full bandwidth.
inline int64_t strip_units(int64_t threads, int64_t SG) {
  return std::clamp<int64_t>(threads / (static_cast<int64_t>(sm_count()) * 512), 1, SG);
}

// Blocks a reduction grid should aim for (about one full wave of 256-thread blocks).
inline int64_t reduce_target_blocks() { return static_cast<int64_t>(sm_count()) * (2048 / kThreads); }

// Dropout parameters of one call. The key stays in device memory (read by the kernels: no host sync,
// CUDA-graph safe); threshold/scale are host-side functions of p.
template <typename acc_t>
struct Dropout {
  const int64_t* key;  // int64[2] (seed, offset) on the device
  uint32_t threshold;
  acc_t scale;
  // Or the mask as bits, 1 per element in memory order (the add ops' pass bits; reductions only): key and
  // threshold unused, multiplier = bit ? scale : 0.
  const uint8_t* bits = nullptr;
};

template <typename acc_t>
inline Dropout<acc_t> make_dropout(const int64_t* key, double p) {
  return Dropout<acc_t>{key, threshold16(p), dropout_scale<acc_t>(p)};
}

// ---- device helpers ----

__device__ __forceinline__ PhiloxKey load_key(const int64_t* key) {
  return PhiloxKey{static_cast<uint64_t>(key[0]), static_cast<uint64_t>(key[1])};
}

// q = a / b, r = a % b for non-negative a, b; 32-bit division when both fit (much cheaper than 64-bit).
__device__ __forceinline__ void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (((static_cast<uint64_t>(a) | static_cast<uint64_t>(b)) >> 32) == 0) {
    const uint32_t q32 = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    q = q32;
  } else {
    q = a / b;
  }
  r = a - q * b;
}

// N elements in one aligned vector access (16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) VecN {
  T v[N];
};

// 8 consecutive elements at p (p 16-byte aligned) into acc_t registers, with 16-byte accesses.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load8(const scalar_t* __restrict__ p, acc_t (&out)[kUnit]) {
  BNFUSED_COUNT_ACCESS(true, kUnit);
  constexpr int kPer = 16 / sizeof(scalar_t);
  using V = VecN<scalar_t, kPer>;
#pragma unroll
  for (int q = 0; q < kUnit / kPer; ++q) {
    const V w = reinterpret_cast<const V*>(p)[q];
#pragma unroll
    for (int i = 0; i < kPer; ++i) out[q * kPer + i] = static_cast<acc_t>(w.v[i]);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store8(scalar_t* __restrict__ p, const acc_t (&in)[kUnit]) {
  BNFUSED_COUNT_ACCESS(true, kUnit);
  constexpr int kPer = 16 / sizeof(scalar_t);
  using V = VecN<scalar_t, kPer>;
#pragma unroll
  for (int q = 0; q < kUnit / kPer; ++q) {
    V w;
#pragma unroll
    for (int i = 0; i < kPer; ++i) w.v[i] = static_cast<scalar_t>(in[q * kPer + i]);
    reinterpret_cast<V*>(p)[q] = w;
  }
}

// Lanes [lo, hi) of out from p[0 .. hi - lo) (scalar accesses; p is the element of lane lo), the others 0.
template <typename scalar_t, typename acc_t, int N = kUnit>
__device__ __forceinline__ void load_lanes(const scalar_t* __restrict__ p, int lo, int hi, acc_t (&out)[N]) {
  BNFUSED_COUNT_ACCESS(false, hi - lo);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = (j >= lo && j < hi) ? static_cast<acc_t>(p[j - lo]) : acc_t(0);
}

template <typename scalar_t, typename acc_t, int N = kUnit>
__device__ __forceinline__ void store_lanes(scalar_t* __restrict__ p, int lo, int hi, const acc_t (&in)[N]) {
  BNFUSED_COUNT_ACCESS(false, hi - lo);
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (j >= lo && j < hi) p[j - lo] = static_cast<scalar_t>(in[j]);
}

// V consecutive elements (channels) at p + off, lanes [lo, hi): one W-wide access per W-chunk inside [lo, hi)
// (p + off aligned to W elements, W divides V; W = 1: scalar), scalar accesses to the lanes of partial chunks, 0
// outside [lo, hi). off + lo >= 0: the pointer never leaves the tensor.
template <int V, int W = V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* __restrict__ p, int64_t off, int lo, int hi,
                                         acc_t (&out)[V]) {
#pragma unroll
  for (int q = 0; q < V; q += W) {
    if (W > 1 && lo <= q && q + W <= hi) {
      BNFUSED_COUNT_ACCESS(true, W);
      const VecN<scalar_t, W> w = *reinterpret_cast<const VecN<scalar_t, W>*>(p + off + q);
#pragma unroll
      for (int v = 0; v < W; ++v) out[q + v] = static_cast<acc_t>(w.v[v]);
    } else {
#pragma unroll
      for (int v = q; v < q + W; ++v) {
        const bool in = v >= lo && v < hi;
        if (in) BNFUSED_COUNT_ACCESS(false, 1);
        out[v] = in ? static_cast<acc_t>(p[off + v]) : acc_t(0);
      }
    }
  }
}

template <int V, int W = V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* __restrict__ p, int64_t off, int lo, int hi,
                                          const acc_t (&in)[V]) {
#pragma unroll
  for (int q = 0; q < V; q += W) {
    if (W > 1 && lo <= q && q + W <= hi) {
      BNFUSED_COUNT_ACCESS(true, W);
      VecN<scalar_t, W> w;
#pragma unroll
      for (int v = 0; v < W; ++v) w.v[v] = static_cast<scalar_t>(in[q + v]);
      *reinterpret_cast<VecN<scalar_t, W>*>(p + off + q) = w;
    } else {
#pragma unroll
      for (int v = q; v < q + W; ++v)
        if (v >= lo && v < hi) {
          BNFUSED_COUNT_ACCESS(false, 1);
          p[off + v] = static_cast<scalar_t>(in[v]);
        }
    }
  }
}

// Unit b of a flat kernel (memory offset == index into the tensor): elements 8b - sh .. 8b - sh + 7, lanes
// [lo, hi) of them inside the tensor. With the pointers sh elements past a 16-byte boundary (shared_misalignment)
// every whole unit is 16-byte aligned (`whole`: 16-byte accesses) and only the head unit (b = 0) and the tail are
// partial (scalar accesses); vec == false (pointers misaligned differently): every unit scalar.
struct PeeledUnit {
  int64_t i0;     // element of lane 0 (negative for the head unit)
  int64_t first;  // element of lane lo
  int lo, hi;
  bool whole;
  __device__ __forceinline__ PeeledUnit(int64_t b, int sh, int64_t numel, bool vec) {
    i0 = b * kUnit - sh;
    lo = i0 < 0 ? static_cast<int>(-i0) : 0;
    hi = (numel - i0) < kUnit ? static_cast<int>(numel - i0) : kUnit;
    first = i0 + lo;
    whole = vec && lo == 0 && hi == kUnit;
  }
  template <typename scalar_t, typename acc_t>
  __device__ __forceinline__ void load(const scalar_t* __restrict__ p, acc_t (&out)[kUnit]) const {
    if (whole)
      load8(p + i0, out);
    else
      load_lanes(p + first, lo, hi, out);
  }
  template <typename scalar_t, typename acc_t>
  __device__ __forceinline__ void store(scalar_t* __restrict__ p, const acc_t (&in)[kUnit]) const {
    if (whole)
      store8(p + i0, in);
    else
      store_lanes(p + first, lo, hi, in);
  }
};

// Warp-uniform grid-stride walk over units (the shuffles below need every lane) for kernels whose unit takes a
// value from the unit below it, handed one lane up the warp. lead = 1: lane 0 of each warp only supplies the value
// of the unit below lane 1's (that unit belongs to the warp below), so a warp step covers 31 units; lead = 0: 32.
struct WarpSteps {
  int lead, lane;
  int64_t w, warps;
  __device__ __forceinline__ explicit WarpSteps(int lead_)
      : lead(lead_),
        lane(static_cast<int>(threadIdx.x & 31)),
        w((static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5),
        warps((static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5) {}
  __device__ __forceinline__ bool more(int64_t units) const { return w * (32 - lead) < units; }
  __device__ __forceinline__ void next() { w += warps; }
  __device__ __forceinline__ int64_t unit() const { return w * (32 - lead) + lane - lead; }  // -1: first lead lane
  __device__ __forceinline__ bool supplier() const { return lane < lead; }
};

// Bits k .. k + 7 (0 <= k <= 8) of the 16-bit concatenation hi:lo of two bytes.
__device__ __forceinline__ uint32_t window8(uint32_t lo, uint32_t hi, int k) {
  return ((lo >> k) | (hi << (kUnit - k))) & 0xFFu;
}

// Keep bits of peeled unit b (sh > 0) from `own`, Philox block b's bits: its first sh lanes lie in block b - 1,
// whose bits the lane below holds (WarpSteps with lead = 1; every lane calls this).
__device__ __forceinline__ uint32_t peeled_keep(uint32_t own, int sh) {
  const uint32_t below = __shfl_up_sync(0xffffffffu, own, 1);
  return window8(below, own, kUnit - sh);
}

// Keep bits of Philox block `blk` (bit j <-> element 8*blk + j).
__device__ __forceinline__ uint32_t block_bits(PhiloxKey key, uint64_t blk, uint32_t threshold) {
  const Philox4 r = mask_block(key, blk);
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < kUnit; ++j) bits |= static_cast<uint32_t>(lane_u16(r, j) >= threshold) << j;
  return bits;
}

// Multipliers (bit j of keep ? scale : 0) of 8 lanes.
template <typename acc_t>
__device__ __forceinline__ void bits_mults(uint32_t keep, acc_t scale, acc_t (&mult)[kUnit]) {
#pragma unroll
  for (int j = 0; j < kUnit; ++j) mult[j] = ((keep >> j) & 1u) ? scale : acc_t(0);
}

// Multipliers (keep ? scale : 0) of the 8 lanes of Philox block `blk`.
template <typename acc_t>
__device__ __forceinline__ void block_mults(PhiloxKey key, uint64_t blk, uint32_t threshold, acc_t scale,
                                            acc_t (&mult)[kUnit]) {
  bits_mults(block_bits(key, blk, threshold), scale, mult);
}

// Bit j (j < rows <= 8) = mask bit of memory element off + j * stride (a channels_last column of 8 rows).
__device__ __forceinline__ uint32_t column_bits(const uint8_t* __restrict__ bits, int64_t off, int64_t stride,
                                                int rows) {
  uint32_t out = 0;
#pragma unroll
  for (int j = 0; j < kUnit; ++j)
    if (j < rows) {
      const int64_t m = off + j * stride;
      out |= ((static_cast<uint32_t>(bits[m >> 3]) >> (m & 7)) & 1u) << j;
    }
  return out;
}

// Bits j < count (count <= 8) = mask bits of memory elements off .. off + count - 1 (8 per byte, memory order).
__device__ __forceinline__ uint32_t run_bits(const uint8_t* __restrict__ bits, int64_t off, int count) {
  const int l0 = static_cast<int>(off & 7);
  const uint32_t b0 = bits[off >> 3];
  const uint32_t b1 = (l0 + count > kUnit) ? bits[(off >> 3) + 1] : 0u;
  return ((b0 >> l0) | (b1 << (kUnit - l0))) & ((1u << count) - 1u);
}

// 32-bit word w (0..7) of the 256-bit concatenation r0:r1, by selects (no local-memory indexing).
__device__ __forceinline__ uint32_t pick_word(const Philox4& r0, const Philox4& r1, int w) {
  uint32_t v = r0.x[0];
  v = (w == 1) ? r0.x[1] : v;
  v = (w == 2) ? r0.x[2] : v;
  v = (w == 3) ? r0.x[3] : v;
  v = (w == 4) ? r1.x[0] : v;
  v = (w == 5) ? r1.x[1] : v;
  v = (w == 6) ? r1.x[2] : v;
  v = (w == 7) ? r1.x[3] : v;
  return v;
}

// lane_u16 for a lane known only at run time: the word by selects, so r stays in registers (r.x[lane >> 1]
// with a run-time index would put r in local memory).
__device__ __forceinline__ uint32_t lane_u16_sel(const Philox4& r, int lane) {
  return (pick_word(r, r, lane >> 1) >> ((lane & 1) * 16)) & 0xFFFFu;
}

// Keep bits of logical runs of <= 8 elements that follow each other (a channel's consecutive units along s, or
// the units of adjacent channels when S < 8), carrying the keep bits of the Philox block the last run ended in:
// the next run starts in it, so with S % 8 != 0 a run costs one call instead of two. Each call goes to the first
// block the carry lacks, a path every lane takes, and a second one only where the run starts in a block it did
// not carry (a strip's first unit): in a warp whose lanes differ in alignment, a per-lane choice between two
// calls would cost the whole warp both.
struct KeepCarry {
  uint64_t blk = ~uint64_t(0);  // the block `bits` belong to
  uint32_t bits = 0;
  __device__ __forceinline__ uint32_t run(PhiloxKey key, uint64_t L, int rows, uint32_t threshold) {
    const uint64_t b0 = L >> 3, b1 = (L + rows - 1) >> 3;
    const int l0 = static_cast<int>(L & 7);
    if (b0 == blk && b1 == b0) return (bits >> l0) & 0xFFu;  // within the carried block
    const bool have_lo = b0 == blk;
    // One call site, taken once or twice (two inlined copies per channel would be more live Philox state).
    uint32_t lo = bits, hi = 0;
    uint64_t next = have_lo ? b1 : b0;
    const int calls = (have_lo || b1 == b0) ? 1 : 2;
#pragma unroll 1
    for (int k = 0; k < calls; ++k, ++next) {
      hi = block_bits(key, next, threshold);
      if (next == b0) lo = hi;
    }
    blk = b1;
    bits = hi;
    return ((lo >> l0) | (hi << (kUnit - l0))) & 0xFFu;
  }
};

// Keep bits of the logical run L, L+1, ..., L+rows-1 (rows <= 8): bit j <-> element L+j.
// kAligned8: the caller guarantees L % 8 == 0 (one Philox call, compile-time lanes).
template <bool kAligned8>
__device__ __forceinline__ uint32_t run_keep_bits(PhiloxKey key, uint64_t L, int rows, uint32_t threshold) {
  uint32_t bits = 0;
  if constexpr (kAligned8) {
    const Philox4 r = mask_block(key, L >> 3);
#pragma unroll
    for (int j = 0; j < kUnit; ++j) bits |= static_cast<uint32_t>(lane_u16(r, j) >= threshold) << j;
  } else {
    const int l0 = static_cast<int>(L & 7);
    const Philox4 r0 = mask_block(key, L >> 3);
    const Philox4 r1 = (l0 + rows > kUnit) ? mask_block(key, (L >> 3) + 1) : r0;
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      const int pos = l0 + j;  // 0..14
      const uint32_t u16 = (pick_word(r0, r1, pos >> 1) >> ((pos & 1) * 16)) & 0xFFFFu;
      bits |= static_cast<uint32_t>(u16 >= threshold) << j;
    }
  }
  return bits;
}

// Keep bits of one channels_last unit (rows s0 .. s0 + rows - 1 of sample n) for channels c0 + v, v in [vlo, vhi):
// bit j of keep[v] <-> row j; the others all ones. S % 8 == 0 (kAligned8): one call per channel. Else through the
// carries: each channel's carry follows it along a strip of consecutive units (S > 8); with S < 8 the runs of
// adjacent channels follow each other, so the carry is handed from channel to channel.
template <int V, bool kAligned8>
__device__ __forceinline__ void unit_keep_bits(PhiloxKey key, uint32_t threshold, int64_t n, int64_t C, int64_t c0,
                                               int64_t S, int64_t s0, int rows, int vlo, int vhi,
                                               KeepCarry (&carry)[V], uint32_t (&keep)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
    keep[v] = 0xFFu;
    if (v < vlo || v >= vhi) continue;
    const uint64_t L = static_cast<uint64_t>((n * C + c0 + v) * S + s0);  // logical index of (n, c, s0)
    if constexpr (kAligned8) {
      keep[v] = run_keep_bits<true>(key, L, rows, threshold);
    } else {
      if (v > 0 && S < kUnit) carry[v] = carry[v - 1];
      keep[v] = carry[v].run(key, L, rows, threshold);
    }
  }
}

}  // namespace bnfused::cuda
