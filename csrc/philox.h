// Philox4x32-10 counter-based RNG and the dropout keep-mask derived from it.
// Shared verbatim by the CPU and CUDA backends: no torch includes, every function __host__ __device__,
// so one (seed, offset) key gives the same mask on every device.
//
// Mask layout (the contract; changing it changes every mask):
//   element i = logical NC(D)HW index (independent of memory layout)
//   block     = i >> 3, lane = i & 7           (one Philox call serves 8 elements)
//   counter   = {lo32(block), hi32(block), lo32(offset), hi32(offset)},  key = {lo32(seed), hi32(seed)}
//   u16       = 16-bit lane `lane` of the 128-bit output (word lane/2, low half for even lanes)
//   keep      = u16 >= threshold16(p)          (drop probability = threshold/65536, p quantised to 2^-16)
#pragma once
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BNFUSED_HD __host__ __device__ __forceinline__
#else
#define BNFUSED_HD inline
#endif

namespace bnfused {

struct PhiloxKey {
  uint64_t seed;
  uint64_t offset;
};

struct Philox4 {
  uint32_t x[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kMaskLanes = 8;  // elements served by one Philox call

BNFUSED_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  Philox4 out;
  out.x[0] = c0;
  out.x[1] = c1;
  out.x[2] = c2;
  out.x[3] = c3;
  return out;
}

// Philox output for the block of 8 elements starting at logical index 8*block.
BNFUSED_HD Philox4 mask_block(PhiloxKey key, uint64_t block) {
#ifdef BNFUSED_PHILOX_CALL_HOOK
  BNFUSED_PHILOX_CALL_HOOK();  // the CUDA emulation counts Philox calls per element
#endif
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(key.offset), static_cast<uint32_t>(key.offset >> 32),
                       static_cast<uint32_t>(key.seed), static_cast<uint32_t>(key.seed >> 32));
}

BNFUSED_HD uint32_t lane_u16(const Philox4& r, int lane) {
  return (r.x[lane >> 1] >> ((lane & 1) * 16)) & 0xFFFFu;
}

// Drop threshold for probability p: element kept iff its u16 >= threshold. p >= 1 gives 65536 (drop all).
BNFUSED_HD uint32_t threshold16(double p) {
  if (!(p > 0.0)) return 0u;
  if (p >= 1.0) return 65536u;
  const double t = p * 65536.0 + 0.5;
  return static_cast<uint32_t>(t);  // round to nearest; t < 65536.5
}

// Keep decision for one logical element (the scalar definition every vectorised path must reproduce).
BNFUSED_HD bool keep_element(PhiloxKey key, uint64_t index, uint32_t threshold) {
  const Philox4 r = mask_block(key, index >> 3);
  return lane_u16(r, static_cast<int>(index & 7)) >= threshold;
}

}  // namespace bnfused
