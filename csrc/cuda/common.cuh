// Building blocks shared by the CUDA kernels: the launch helper, the shared-array macro, vector loads/stores,
// the Philox multipliers of a run of up to 8 elements. Torch-free, so the same kernels also build against the
// CPU emulation (tests/cuda_emulation/cuda_emu.h, selected by BNFUSED_CUDA_EMULATION); the ATen side of the
// host wrappers is in host.cuh.
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
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define BNFUSED_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#define BNFUSED_SHARED(T, name, count) __shared__ T name[count]
#endif

#include <algorithm>
#include <cstdint>
#include <utility>

// Relative includes: found next to this file whatever the include path (csrc/bn_math.h is named so
// that <math.h> never resolves to it).
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

// Blocks for a grid-stride elementwise kernel over `items` work items (one per thread per step).
inline unsigned apply_blocks(int64_t items) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * (2048 / kThreads) * 4;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(items, kThreads), cap)));
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

// Lanes [lo, hi) of out from p[lo..hi) (scalar accesses), the others 0.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_lanes(const scalar_t* __restrict__ p, int lo, int hi, acc_t (&out)[kUnit]) {
#pragma unroll
  for (int j = 0; j < kUnit; ++j) out[j] = (j >= lo && j < hi) ? static_cast<acc_t>(p[j]) : acc_t(0);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_lanes(scalar_t* __restrict__ p, int lo, int hi, const acc_t (&in)[kUnit]) {
#pragma unroll
  for (int j = 0; j < kUnit; ++j)
    if (j >= lo && j < hi) p[j] = static_cast<scalar_t>(in[j]);
}

// Multipliers (keep ? scale : 0) of the 8 lanes of Philox block `blk`.
template <typename acc_t>
__device__ __forceinline__ void block_mults(PhiloxKey key, uint64_t blk, uint32_t threshold, acc_t scale,
                                            acc_t (&mult)[kUnit]) {
  const Philox4 r = mask_block(key, blk);
#pragma unroll
  for (int j = 0; j < kUnit; ++j) mult[j] = lane_u16(r, j) >= threshold ? scale : acc_t(0);
}

// Multipliers (bit ? scale : 0) of the 8 lanes of one byte of mask bits.
template <typename acc_t>
__device__ __forceinline__ void byte_mults(uint32_t byte, acc_t scale, acc_t (&mult)[kUnit]) {
#pragma unroll
  for (int j = 0; j < kUnit; ++j) mult[j] = ((byte >> j) & 1u) ? scale : acc_t(0);
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

// The last two Philox blocks a thread generated. Channels_last units of adjacent channels share blocks when
// S < 8 (2-d input: S == 1), so a thread's V channels generate each block once instead of once per channel.
struct PhiloxCache {
  uint64_t b0 = ~uint64_t(0), b1 = ~uint64_t(0);
  Philox4 r0, r1;
  bool newest_is_1 = false;
  __device__ __forceinline__ Philox4 get(PhiloxKey key, uint64_t b) {
    if (b == b0) return r0;
    if (b == b1) return r1;
    const Philox4 r = mask_block(key, b);
    if (newest_is_1) {
      b0 = b;
      r0 = r;
    } else {
      b1 = b;
      r1 = r;
    }
    newest_is_1 = !newest_is_1;
    return r;
  }
};

// Keep bits of the logical run L .. L+rows-1 (rows <= 8, any L) through the thread's cache of Philox blocks.
__device__ __forceinline__ uint32_t run_keep_bits_cached(PhiloxCache& cache, PhiloxKey key, uint64_t L, int rows,
                                                         uint32_t threshold) {
  const int l0 = static_cast<int>(L & 7);
  const Philox4 r0 = cache.get(key, L >> 3);
  const Philox4 r1 = (l0 + rows > kUnit) ? cache.get(key, (L >> 3) + 1) : r0;
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < kUnit; ++j) {
    const int pos = l0 + j;  // 0..14
    const uint32_t u16 = (pick_word(r0, r1, pos >> 1) >> ((pos & 1) * 16)) & 0xFFFFu;
    bits |= static_cast<uint32_t>(u16 >= threshold) << j;
  }
  return bits;
}

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

}  // namespace bnfused::cuda
