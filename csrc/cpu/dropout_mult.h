// Dropout multipliers (keep ? 1/(1-p) : 0) for runs of logical indices, from the shared Philox definition in
// philox.h. Philox blocks are computed 8 at a time (one per SIMD lane with AVX2, else a plain loop); the bits
// are identical to philox.h's scalar mask_block, which tests check.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define BNFUSED_PHILOX_AVX2 1
#endif

#include "philox.h"

namespace bnfused::cpu {

constexpr int kBlocksPerBatch = 16;                          // Philox calls per batch
constexpr int kBatchElems = kBlocksPerBatch * kMaskLanes;    // 128 elements

// Keep byte of 8 consecutive multipliers (nonzero = kept).
template <typename acc_t>
inline uint8_t keep_byte(const acc_t* mult) {
#ifdef BNFUSED_PHILOX_AVX2
  if constexpr (std::is_same_v<acc_t, float>)
    return static_cast<uint8_t>(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(mult), _mm256_setzero_ps(), _CMP_NEQ_UQ)));
#endif
  uint32_t byte = 0;
  for (int k = 0; k < kMaskLanes; ++k) byte |= static_cast<uint32_t>(mult[k] != acc_t(0)) << k;
  return static_cast<uint8_t>(byte);
}

#ifdef BNFUSED_PHILOX_AVX2
// One Philox round's two 32x32 -> 64-bit products per lane: hi/lo words of c * m. High words come from the
// products of the even lanes and of the odd lanes (copied down); the odd products' high words already sit in odd
// lanes. Low words: one mullo, which measured ~10% faster overall than regrouping them from the same products.
inline void mul_hi_lo(__m256i c, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(c, m), po = _mm256_mul_epu32(_mm256_shuffle_epi32(c, 0xF5), m);
  hi = _mm256_blend_epi32(_mm256_shuffle_epi32(pe, 0xF5), po, 0xAA);
  lo = _mm256_mullo_epi32(c, m);
}

inline __m256i splat32(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }

// Philox of 8*kSets blocks, one per 32-bit lane: set h's lane j runs counter {lo[h]_j, hi[h], offset} (the high
// block word is the same in every lane of a set) and w[h][k] lane j receives output word k. Two sets are
// interleaved so the multiply latency chain of one hides behind the other. (Running the even and odd lanes as
// separate 4-lane streams saves the regrouping blends but needs twice the registers: measured 1.5x slower with
// AVX2's 16; a third set spills too.)
//
// Rounds 0 and 1 multiply a word that is the same in every lane -- the offset's low word, then hi(M1 * offset) ^
// hi[h] ^ key -- so those two of the 20 products are scalar: 12% less time per block, same bits.
template <int kSets>
inline void philox_lanes(PhiloxKey key, const __m256i lo[], const uint32_t hi[], __m256i w[][4]) {
  static_assert(kSets == 1 || kSets == 2, "one or two sets of 8 blocks");
  const __m256i m0 = splat32(kPhiloxM0), m1 = splat32(kPhiloxM1);
  uint32_t k0 = static_cast<uint32_t>(key.seed), k1 = static_cast<uint32_t>(key.seed >> 32);
  const uint32_t off_lo = static_cast<uint32_t>(key.offset), off_hi = static_cast<uint32_t>(key.offset >> 32);
  __m256i c0[2], c1[2], c2[2], c3[2];
  // Round 0, counter {lo, hi, off_lo, off_hi}: c0' and c1' come from the scalar product M1 * off_lo.
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * off_lo;
  uint32_t c0_uniform[2];
  for (int h = 0; h < kSets; ++h) {
    c0_uniform[h] = static_cast<uint32_t>(p1 >> 32) ^ hi[h] ^ k0;
    __m256i hi0;
    mul_hi_lo(lo[h], m0, hi0, c3[h]);
    c2[h] = _mm256_xor_si256(hi0, splat32(off_hi ^ k1));
  }
  k0 += kPhiloxW0;
  k1 += kPhiloxW1;
  // Round 1: c0 = c0_uniform[h] and c1 = lo(p1) are still uniform, so M0 * c0 is scalar too.
  for (int h = 0; h < kSets; ++h) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0_uniform[h];
    __m256i hi1;
    mul_hi_lo(c2[h], m1, hi1, c1[h]);
    c0[h] = _mm256_xor_si256(hi1, splat32(static_cast<uint32_t>(p1) ^ k0));
    c2[h] = _mm256_xor_si256(c3[h], splat32(static_cast<uint32_t>(p0 >> 32) ^ k1));
    c3[h] = splat32(static_cast<uint32_t>(p0));
  }
  k0 += kPhiloxW0;
  k1 += kPhiloxW1;
  for (int round = 2; round < 10; ++round) {
    const __m256i vk0 = splat32(k0), vk1 = splat32(k1);
    for (int h = 0; h < kSets; ++h) {
      __m256i hi0, lo0, hi1, lo1;
      mul_hi_lo(c0[h], m0, hi0, lo0);
      mul_hi_lo(c2[h], m1, hi1, lo1);
      c0[h] = _mm256_xor_si256(hi1, _mm256_xor_si256(c1[h], vk0));  // c1 ^ k0 is off the multiply chain
      c1[h] = lo1;
      c2[h] = _mm256_xor_si256(hi0, _mm256_xor_si256(c3[h], vk1));
      c3[h] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int h = 0; h < kSets; ++h) {
    w[h][0] = c0[h];
    w[h][1] = c1[h];
    w[h][2] = c2[h];
    w[h][3] = c3[h];
  }
}

// philox_lanes of blocks first[h] .. first[h]+7 (callers guarantee the low counter word does not wrap inside a set).
template <int kSets>
inline void philox_sets(PhiloxKey key, const uint64_t first[2], __m256i w[2][4]) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i lo[2];
  uint32_t hi[2];
  for (int h = 0; h < kSets; ++h) {
    lo[h] = _mm256_add_epi32(splat32(static_cast<uint32_t>(first[h])), lane);
    hi[h] = static_cast<uint32_t>(first[h] >> 32);
  }
  philox_lanes<kSets>(key, lo, hi, w);
}

// 4x8 transpose of one set's output words: afterwards each 128-bit half of t[k] holds one block's 8 u16 lanes in
// element order (the low half block k, the high half block 4 + k).
inline void block_lanes(const __m256i w[4], __m256i t[4]) {
  const __m256i a01lo = _mm256_unpacklo_epi32(w[0], w[1]), a01hi = _mm256_unpackhi_epi32(w[0], w[1]);
  const __m256i a23lo = _mm256_unpacklo_epi32(w[2], w[3]), a23hi = _mm256_unpackhi_epi32(w[2], w[3]);
  t[0] = _mm256_unpacklo_epi64(a01lo, a23lo);
  t[1] = _mm256_unpackhi_epi64(a01lo, a23lo);
  t[2] = _mm256_unpacklo_epi64(a01hi, a23hi);
  t[3] = _mm256_unpackhi_epi64(a01hi, a23hi);
}

// Keep masks of one set's 8 blocks after block_lanes (t[k]: blocks k and 4 + k): 16-bit lanes all ones where the
// element is kept, i.e. u16 >= threshold, as a signed compare of both sides shifted by 2^15 (threshold 0 keeps
// everything, 65536, p = 1, nothing).
inline void keep_lanes16(const __m256i t[4], uint32_t threshold, __m256i keep[4]) {
  const __m256i bias = _mm256_set1_epi16(static_cast<int16_t>(-32768));
  const __m256i below = _mm256_set1_epi16(static_cast<int16_t>(static_cast<int32_t>(threshold) - 1 - 32768));
  for (int k = 0; k < 4; ++k)
    keep[k] = threshold == 0       ? _mm256_set1_epi16(-1)
              : threshold > 65535 ? _mm256_setzero_si256()
                                  : _mm256_cmpgt_epi16(_mm256_xor_si256(t[k], bias), below);
}

// keep_lanes16's masks as bytes in block order: lo = blocks 0-3, hi = blocks 4-7 (packs works per 128-bit lane:
// (k0, k1) -> blocks [0 1 | 4 5] and (k2, k3) -> [2 3 | 6 7]; the permutes restore the order).
inline void keep_bytes(const __m256i keep[4], __m256i& lo, __m256i& hi) {
  const __m256i p01 = _mm256_packs_epi16(keep[0], keep[1]), p23 = _mm256_packs_epi16(keep[2], keep[3]);
  lo = _mm256_permute2x128_si256(p01, p23, 0x20);
  hi = _mm256_permute2x128_si256(p01, p23, 0x31);
}

// Float multipliers, in element order, of the 8 blocks first[h] .. first[h]+7 of each set h into out[h]; with
// `bits`, also each block's keep byte (bit k = lane k), set h's at bits[8h .. 8h+7] (keep_bits.h's format).
// The compares run on 16-bit lanes (16 elements per instruction) and the bits come from two byte movemasks.
template <int kSets>
inline void sets_mult(PhiloxKey key, const uint64_t first[2], uint32_t threshold, float scale, float* const out[2],
                      uint8_t* bits = nullptr) {
  __m256i w[2][4];
  philox_sets<kSets>(key, first, w);
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int h = 0; h < kSets; ++h) {
    __m256i t[4], keep[4];
    block_lanes(w[h], t);
    keep_lanes16(t, threshold, keep);
    for (int k = 0; k < 4; ++k) {
      const __m256 first_block = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(keep[k])));
      const __m256 second_block = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(keep[k], 1)));
      _mm256_storeu_ps(out[h] + k * kMaskLanes, _mm256_and_ps(first_block, vscale));
      _mm256_storeu_ps(out[h] + (4 + k) * kMaskLanes, _mm256_and_ps(second_block, vscale));
    }
    if (bits) {
      __m256i lo, hi;
      keep_bytes(keep, lo, hi);
      const uint64_t bytes = static_cast<uint32_t>(_mm256_movemask_epi8(lo)) |
                             static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_epi8(hi))) << 32;
      std::memcpy(bits + 8 * h, &bytes, 8);  // x86 is little-endian: byte j = block j
    }
  }
}
#else
template <int kSets>
inline void sets_mult(PhiloxKey key, const uint64_t first[2], uint32_t threshold, float scale, float* const out[2],
                      uint8_t* bits = nullptr) {
  for (int h = 0; h < kSets; ++h) {
    float* o = out[h];
    for (int j = 0; j < 8; ++j) {
      const Philox4 r = mask_block(key, first[h] + j);
      uint32_t byte = 0;
      for (int lane = 0; lane < kMaskLanes; ++lane) {
        const bool kept = lane_u16(r, lane) >= threshold;
        *o++ = kept ? scale : 0.0f;
        byte |= static_cast<uint32_t>(kept) << lane;
      }
      if (bits) bits[8 * h + j] = static_cast<uint8_t>(byte);
    }
  }
}
#endif

#ifdef BNFUSED_PHILOX_AVX2
// Keep flags (byte per element: `kept` or 0), in element order, of the 8 blocks first[h] .. first[h]+7 of each
// set h into out[h]: the channels_last transposed tiles move a quarter of the bytes of float multipliers.
template <int kSets>
inline void sets_flags(PhiloxKey key, const uint64_t first[2], uint32_t threshold, uint8_t kept,
                       uint8_t* const out[2]) {
  __m256i w[2][4];
  philox_sets<kSets>(key, first, w);
  const __m256i vkept = _mm256_set1_epi8(static_cast<char>(kept));
  for (int h = 0; h < kSets; ++h) {
    __m256i t[4], keep[4], lo, hi;
    block_lanes(w[h], t);
    keep_lanes16(t, threshold, keep);
    keep_bytes(keep, lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[h]), _mm256_and_si256(lo, vkept));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[h] + 32), _mm256_and_si256(hi, vkept));
  }
}
#endif

// Float multipliers of the 64*kSets elements of blocks block0 .. block0+8*kSets-1, in element order (and with
// `bits`, their keep bytes bits[0 .. 8*kSets)).
template <int kSets = 2>
inline void batch_mult(PhiloxKey key, uint64_t block0, uint32_t threshold, float scale, float* out,
                       uint8_t* bits = nullptr) {
  const uint64_t first[2] = {block0, block0 + 8};
  float* const outs[2] = {out, out + 64};
  sets_mult<kSets>(key, first, threshold, scale, outs, bits);
}

// Multipliers of the 64*kSets elements of blocks block0 .. block0+8*kSets-1 as acc_t (double gets an exact
// 1/(1-p); uint8_t: keep flags, `scale` or 0), and with `bits` their keep bytes.
template <int kSets, typename acc_t>
inline void batch_mult_acc(PhiloxKey key, uint64_t block0, uint32_t threshold, acc_t scale, acc_t* out,
                           uint8_t* bits = nullptr) {
  if constexpr (std::is_same_v<acc_t, float>) {
    batch_mult<kSets>(key, block0, threshold, scale, out, bits);
  } else {
#ifdef BNFUSED_PHILOX_AVX2
    if constexpr (std::is_same_v<acc_t, uint8_t>) {  // keep flags
      if (!bits) {
        const uint64_t first[2] = {block0, block0 + 8};
        uint8_t* const outs[2] = {out, out + 64};
        sets_flags<kSets>(key, first, threshold, scale, outs);
        return;
      }
    }
#endif
    float keep[kBatchElems];
    batch_mult<kSets>(key, block0, threshold, 1.0f, keep, bits);
    for (int i = 0; i < 64 * kSets; ++i) out[i] = keep[i] != 0.0f ? scale : acc_t(0);
  }
}

// True when blocks first .. first+count-1 keep the same high counter word (the SIMD sets add to the low word).
inline bool no_counter_wrap(uint64_t first, int count) {
  return static_cast<uint32_t>(first) <= 0xFFFFFFFFu - static_cast<uint32_t>(count);
}

// Callback of fill_dropout_mult after each batch, given the elements filled so far and the run's length.
struct NoAfterBatch {
  void operator()(int64_t, int64_t) const {}
};

// out[k * stride] = multiplier of logical element start + k, for k in [0, n). Every Philox call goes through the
// SIMD sets: a run that starts inside a block takes its lanes from the batch that begins at that block.
// after_batch(done, n) runs between batches (the kernels prefetch their next run there).
// With `bits` (keep_bits.h's format; bits[0] is the byte of block start / 8), the keep byte of every block whose
// first element lies in the run is written too, from the same Philox output: a block that continues past the
// run's end has all its lanes computed anyway. A block that starts before the run belongs to the run that holds
// its first element, and its byte is left alone.
template <typename acc_t, typename AfterBatch = NoAfterBatch>
void fill_dropout_mult(PhiloxKey key, uint64_t start, int64_t n, uint32_t threshold, acc_t scale, acc_t* out,
                       int64_t stride = 1, AfterBatch&& after_batch = {}, uint8_t* bits = nullptr) {
  alignas(32) acc_t tmp[kBatchElems];
  uint64_t i = start;
  const uint64_t end = start + static_cast<uint64_t>(n);
  while (i < end) {
    const uint64_t block0 = i >> 3;
    uint8_t* batch_bits = bits ? bits + (block0 - (start >> 3)) : nullptr;  // byte of block0
    const int64_t lead = static_cast<int64_t>(i & 7);
    const int64_t take = static_cast<int64_t>(std::min<uint64_t>(kBatchElems - lead, end - i));
    const int64_t blocks = (lead + take + 7) / 8;  // blocks the batch's elements touch
    if (!no_counter_wrap(block0, kBlocksPerBatch)) {
      // Scalar blocks keep the 64-bit counter exact where the low word wraps inside a batch.
      for (int64_t b = 0; b < blocks; ++b) {
        const Philox4 r = mask_block(key, block0 + b);
        for (int lane = 0; lane < 8; ++lane) tmp[b * 8 + lane] = lane_u16(r, lane) >= threshold ? scale : acc_t(0);
      }
      if (batch_bits)
        for (int64_t b = lead ? 1 : 0; b < blocks; ++b) batch_bits[b] = keep_byte(tmp + b * 8);
    } else if (stride == 1 && lead == 0 && take == kBatchElems) {
      batch_mult_acc<2>(key, block0, threshold, scale, out, batch_bits);
      out += kBatchElems;
      i += kBatchElems;
      after_batch(static_cast<int64_t>(i - start), n);
      continue;
    } else {
      // Half a batch is enough for up to 8 blocks. The keep bytes go to a local first: the first block's byte is
      // the previous run's when the run starts inside it.
      alignas(8) uint8_t bytes[kBlocksPerBatch];
      if (blocks <= 8)
        batch_mult_acc<1>(key, block0, threshold, scale, tmp, batch_bits ? bytes : nullptr);
      else
        batch_mult_acc<2>(key, block0, threshold, scale, tmp, batch_bits ? bytes : nullptr);
      if (batch_bits)
        for (int64_t b = lead ? 1 : 0; b < blocks; ++b) batch_bits[b] = bytes[b];
    }
    for (int64_t k = 0; k < take; ++k, out += stride) *out = tmp[lead + k];
    i += take;
    after_batch(static_cast<int64_t>(i - start), n);
  }
}

// Multipliers of 8 consecutive elements of `count` <= 16 runs whose blocks are first, first + stride, ...
// (channel j of 8 rows of a channels_last tile), straight into row order: out[lane * ld + j] for lane 0..7.
// Writes columns 0 .. round_up(count, 8) - 1 of each row. The `count` blocks must share their high counter word.
// With row_bits (count a multiple of 8), also the keep byte of each row's channels 8g .. 8g+7 (bit j = channel
// 8g + j: keep_bits.h's memory order) at row_bits[lane * row_bytes + g].
#ifdef BNFUSED_PHILOX_AVX2
template <int kSets>
inline void strided_rows_mult(PhiloxKey key, uint64_t first, uint64_t stride, uint32_t threshold, float scale,
                              float* out, int64_t ld, uint8_t* row_bits, int64_t row_bytes) {
  // Lane j's low counter word: the low 32 bits of first + j*stride depend only on the operands' low 32 bits.
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i lo[2];
  const uint32_t hi[2] = {static_cast<uint32_t>(first >> 32), static_cast<uint32_t>(first >> 32)};
  for (int h = 0; h < kSets; ++h)
    lo[h] = _mm256_add_epi32(splat32(static_cast<uint32_t>(first + 8 * h * stride)),
                             _mm256_mullo_epi32(lane, splat32(static_cast<uint32_t>(stride))));
  __m256i w[2][4];
  philox_lanes<kSets>(key, lo, hi, w);
  const __m256i below = _mm256_set1_epi32(static_cast<int>(threshold) - 1);  // keep iff u16 > threshold - 1
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int h = 0; h < kSets; ++h) {
    for (int k = 0; k < 4; ++k) {  // word k holds lanes 2k (low half) and 2k+1 (high half)
      const __m256i even = _mm256_cmpgt_epi32(_mm256_and_si256(w[h][k], low16), below);
      const __m256i odd = _mm256_cmpgt_epi32(_mm256_srli_epi32(w[h][k], 16), below);
      _mm256_storeu_ps(out + (2 * k) * ld + 8 * h, _mm256_and_ps(_mm256_castsi256_ps(even), vscale));
      _mm256_storeu_ps(out + (2 * k + 1) * ld + 8 * h, _mm256_and_ps(_mm256_castsi256_ps(odd), vscale));
      if (row_bits) {
        row_bits[(2 * k) * row_bytes + h] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_castsi256_ps(even)));
        row_bits[(2 * k + 1) * row_bytes + h] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_castsi256_ps(odd)));
      }
    }
  }
}
#endif

template <typename acc_t>
inline void fill_strided_rows_mult(PhiloxKey key, uint64_t first, uint64_t stride, int64_t count, uint32_t threshold,
                                   acc_t scale, acc_t* out, int64_t ld, uint8_t* row_bits = nullptr,
                                   int64_t row_bytes = 0) {
#ifdef BNFUSED_PHILOX_AVX2
  // SIMD unless the blocks cross a multiple of 2^32 (tensors of 2^35+ elements), where the scalar loop keeps the
  // 64-bit counter exact.
  const bool same_high_word = ((first + static_cast<uint64_t>(count - 1) * stride) >> 32) == (first >> 32);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (same_high_word) {
      if (count > 8)
        strided_rows_mult<2>(key, first, stride, threshold, scale, out, ld, row_bits, row_bytes);
      else
        strided_rows_mult<1>(key, first, stride, threshold, scale, out, ld, row_bits, row_bytes);
      return;
    }
  }
#endif
  for (int64_t j = 0; j < count; ++j) {
    const Philox4 r = mask_block(key, first + static_cast<uint64_t>(j) * stride);
    for (int lane = 0; lane < kMaskLanes; ++lane) out[lane * ld + j] = lane_u16(r, lane) >= threshold ? scale : acc_t(0);
  }
  if (row_bits)
    for (int lane = 0; lane < kMaskLanes; ++lane)
      for (int64_t g = 0; g < count / 8; ++g) row_bits[lane * row_bytes + g] = keep_byte(out + lane * ld + 8 * g);
}

// Two runs of up to 64 - (start & 7) elements each at once: their Philox sets interleave, which runs this short
// cannot do alone. Falls back to fill_dropout_mult otherwise.
template <typename acc_t>
void fill_dropout_mult_pair(PhiloxKey key, const uint64_t starts[2], int64_t n, uint32_t threshold, acc_t scale,
                            acc_t* const out[2]) {
  if constexpr (std::is_same_v<acc_t, float> || std::is_same_v<acc_t, uint8_t>) {  // multipliers or keep flags
    const int64_t lead[2] = {static_cast<int64_t>(starts[0] & 7), static_cast<int64_t>(starts[1] & 7)};
    const uint64_t first[2] = {starts[0] >> 3, starts[1] >> 3};
    if (n > 0 && lead[0] + n <= 64 && lead[1] + n <= 64 && no_counter_wrap(first[0], 8) &&
        no_counter_wrap(first[1], 8)) {
      alignas(32) float tmp[2][64];
      float* const outs[2] = {tmp[0], tmp[1]};
      sets_mult<2>(key, first, threshold, 1.0f, outs);
      for (int h = 0; h < 2; ++h)
        for (int64_t k = 0; k < n; ++k) out[h][k] = tmp[h][lead[h] + k] != 0.0f ? scale : acc_t(0);
      return;
    }
  }
  for (int h = 0; h < 2; ++h) fill_dropout_mult(key, starts[h], n, threshold, scale, out[h]);
}

}  // namespace bnfused::cpu
