// The dropout keep pattern packed 1 bit per element (DESIGN: "the mask as 1 bit per element"): byte b holds
// elements 8b .. 8b+7 in the kernel's memory order, bit k = element 8b+k. For channels-first and 2-d input that is
// the logical (NC...) order, i.e. one byte per Philox block; for channels_last it is (N, spatial, C), so a tile of
// rows packs and unpacks its bits sequentially (row_tiles.h). Bits past numel are unspecified.
// On the CPU, Philox costs about as much as the memory traffic of a pass, so the training forward packs the bits
// it generates anyway and both backward passes read them instead of running Philox again.
//
// Packing is thread-safe without atomics: a byte is written by the run that holds its first element; when the
// byte continues past the run's end, its remaining bits come from Philox at those elements' indices. Channels-first
// runs and channels_last block rows take their bytes straight from the Philox pass (dropout_mult.h); other tiles
// pack them from the multipliers (RowTiles::pack_bits).
#pragma once
#include "cpu/cpu_common.h"
#include "cpu/dropout_mult.h"

namespace bnfused::cpu {

// Keep bit of logical element i straight from Philox.
inline bool philox_keep_bit(PhiloxKey key, uint64_t i, uint32_t threshold) {
  return lane_u16(mask_block(key, i >> 3), static_cast<int>(i & 7)) >= threshold;
}

// out[k] = multiplier of element start + k (in the bits' order), for k in [0, n), from the packed bits.
template <typename acc_t>
__attribute__((always_inline)) inline void unpack_keep_bits(const uint8_t* bits, uint64_t start, int64_t n, acc_t scale, acc_t* out) {
  auto bit = [&](uint64_t i) { return (bits[i >> 3] >> (i & 7)) & 1u; };
  int64_t k = 0;
#ifdef BNFUSED_PHILOX_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; k < n && ((start + k) & 7); ++k) out[k] = bit(start + k) ? scale : 0.0f;
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 vscale = _mm256_set1_ps(scale);
    for (; k + 8 <= n; k += 8) {
      const __m256i byte = _mm256_set1_epi32(bits[(start + k) >> 3]);
      const __m256i kept = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), lane_bit);
      _mm256_storeu_ps(out + k, _mm256_and_ps(_mm256_castsi256_ps(kept), vscale));
    }
  }
#endif
  for (; k < n; ++k) out[k] = bit(start + k) ? scale : acc_t(0);
}

// Multipliers of the run [start, start + n) for a kernel: from the bits when the backward has them, else from
// Philox (packing the bits on the way when the forward is asked for them). With Philox, `prefetch` (if given)
// fetches the kernel's next run meanwhile; unpacking bits leaves the memory stream no gap to fill.
template <typename acc_t>
void fill_run_mult(const DropoutParams<acc_t>& dp, uint64_t start, int64_t n, acc_t* out,
                   NextRunPrefetch* prefetch = nullptr) {
  if (dp.bits_in) {
    unpack_keep_bits(dp.bits_in, start, n, dp.scale, out);
    return;
  }
  fill_dropout_mult(dp.key, start, n, dp.threshold, dp.scale, out, 1, prefetch_progress(prefetch),
                    dp.bits_out ? dp.bits_out + (start >> 3) : nullptr);
}

// The channels-first elementwise walk of the forward and the input gradient: threads take whole planes, each run
// (for_each_run) gets its dropout multipliers when dp.active (prefetching the next run of in0, in1 and out), then
// fn(offset, n, channel, mult) for each segment of one channel (mult: the segment's multipliers, or nullptr).
template <typename acc_t, typename F>
void for_each_plane_segment(const Geometry& g, const DropoutParams<acc_t>& dp, const void* in0, const void* in1,
                            void* out, int64_t elem_size, F fn) {
  at::parallel_for(0, g.N * g.C, planes_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mult(kChunk);
    for_each_run(g, begin, end, [&](int64_t off, int64_t len) {
      if (dp.active) {
        auto prefetch = next_run_prefetch(g, end, off, len, in0, in1, out, elem_size);
        fill_run_mult(dp, off, len, mult.data(), &prefetch);
      }
      for_each_segment(g, off, len, [&](int64_t rel, int64_t n, int64_t, int64_t c) {
        fn(off + rel, n, c, dp.active ? mult.data() + rel : nullptr);
      });
    });
  });
}

}  // namespace bnfused::cpu
