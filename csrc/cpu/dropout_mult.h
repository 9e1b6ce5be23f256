// Dropout multipliers (keep ? 1/(1-p) : 0) for runs of logical indices, from the shared Philox definition.
// Philox blocks are computed 8 at a time in plain loops over lanes that the compiler vectorises (vpmuludq);
// the bits are identical to philox.h's scalar mask_block.
#pragma once
#include <algorithm>
#include <cstdint>

#include "philox.h"

namespace bnfused::cpu {

constexpr int kPhiloxBatch = 8;  // Philox blocks per batch = 64 elements

// Philox outputs of blocks block0 .. block0+7: words[w][j] = word w of block block0 + j.
inline void philox_batch(PhiloxKey key, uint64_t block0, uint32_t words[4][kPhiloxBatch]) {
  uint32_t c0[kPhiloxBatch], c1[kPhiloxBatch], c2[kPhiloxBatch], c3[kPhiloxBatch];
  for (int j = 0; j < kPhiloxBatch; ++j) {
    const uint64_t block = block0 + j;
    c0[j] = static_cast<uint32_t>(block);
    c1[j] = static_cast<uint32_t>(block >> 32);
    c2[j] = static_cast<uint32_t>(key.offset);
    c3[j] = static_cast<uint32_t>(key.offset >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(key.seed), k1 = static_cast<uint32_t>(key.seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int j = 0; j < kPhiloxBatch; ++j) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0[j];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2[j];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[j] ^ k1;
      c1[j] = static_cast<uint32_t>(p1);
      c3[j] = static_cast<uint32_t>(p0);
      c0[j] = n0;
      c2[j] = n2;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int j = 0; j < kPhiloxBatch; ++j) {
    words[0][j] = c0[j];
    words[1][j] = c1[j];
    words[2][j] = c2[j];
    words[3][j] = c3[j];
  }
}

// out[k * stride] = multiplier of logical element start + k, for k in [0, n).
template <typename acc_t>
void fill_dropout_mult(PhiloxKey key, uint64_t start, int64_t n, uint32_t threshold, acc_t scale, acc_t* out,
                       int64_t stride = 1) {
  uint64_t i = start;
  const uint64_t end = start + static_cast<uint64_t>(n);
  // Partial leading block, one scalar Philox call.
  if ((i & 7) != 0 && i < end) {
    const Philox4 r = mask_block(key, i >> 3);
    for (int lane = static_cast<int>(i & 7); lane < 8 && i < end; ++lane, ++i, out += stride)
      *out = lane_u16(r, lane) >= threshold ? scale : acc_t(0);
  }
  // Whole blocks, 8 Philox calls at a time.
  uint32_t words[4][kPhiloxBatch];
  while (end - i >= 8) {
    const uint64_t blocks = std::min<uint64_t>((end - i) >> 3, kPhiloxBatch);
    philox_batch(key, i >> 3, words);
    for (uint64_t j = 0; j < blocks; ++j) {
      for (int lane = 0; lane < 8; ++lane, out += stride) {
        const uint32_t u16 = (words[lane >> 1][j] >> ((lane & 1) * 16)) & 0xFFFFu;
        *out = u16 >= threshold ? scale : acc_t(0);
      }
    }
    i += blocks * 8;
  }
  // Partial trailing block.
  if (i < end) {
    const Philox4 r = mask_block(key, i >> 3);
    for (int lane = 0; i < end; ++lane, ++i, out += stride)
      *out = lane_u16(r, lane) >= threshold ? scale : acc_t(0);
  }
}

}  // namespace bnfused::cpu
