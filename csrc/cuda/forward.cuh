// The forward's kernels, torch-free: y = act(fma(x, a, b)) * mult (an Op of apply.cuh, templated on the activation,
// csrc/activation.h) and dropout_mask (the keep pattern alone). Host wrappers in forward.cu.
#pragma once
#include "../activation.h"
#include "apply.cuh"

namespace bnfused::cuda {

template <typename acc_t, Act kAct = Act::ReLU>
struct ForwardOp {
  static constexpr bool kNeedsDy = false;
  static constexpr bool kTranscendental = act_transcendental<kAct>();
  struct Chan {
    ChannelAffine<acc_t> ab;
  };
  ChannelParams<acc_t> prm;
  ActArgs<acc_t> act;

  __device__ __forceinline__ Chan channel(int64_t c) const { return Chan{prm.affine(c)}; }
  // The CPU kernels' order: the activation of z, then the dropout multiplier.
  __device__ __forceinline__ acc_t apply(const Chan& ch, acc_t x, acc_t /*dy*/, acc_t mult) const {
    return act_forward<kAct>(bn_preact(x, ch.ab), act) * mult;
  }
};

template <typename scalar_t, typename acc_t, Act kAct = Act::ReLU>
void run_forward(const ChannelParams<acc_t>& prm, const scalar_t* x, scalar_t* out, const Geometry& g,
                 const Dropout<acc_t>* drop, cudaStream_t stream, const ActArgs<acc_t>& act = {}) {
  run_apply<scalar_t, acc_t>(ForwardOp<acc_t, kAct>{prm, act}, x, nullptr, out, g, drop, stream);
}

namespace {  // a non-template kernel defined in a header: one copy per translation unit

// keep[i] for logical (flat) index i; one Philox call per 8 elements, 8-byte stores when whole and aligned.
__global__ void __launch_bounds__(kThreads)
    dropout_mask_kernel(const int64_t* __restrict__ key_ptr, bool* __restrict__ keep, int64_t numel,
                        uint32_t threshold, bool vec_ok) {
  const bool rng = threshold > 0u && threshold < 65536u;  // else every element has the same fate
  const bool all_keep = threshold == 0u;
  PhiloxKey key{0, 0};
  if (rng) key = load_key(key_ptr);
  const int64_t groups = (numel + kUnit - 1) / kUnit;
  for (int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; grp < groups;
       grp += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = grp * kUnit;
    const int cnt = static_cast<int>((numel - i0) < kUnit ? (numel - i0) : kUnit);
    uint64_t bytes = 0;
    if (rng) {
      const Philox4 r = mask_block(key, static_cast<uint64_t>(grp));
#pragma unroll
      for (int j = 0; j < kUnit; ++j) bytes |= static_cast<uint64_t>(lane_u16(r, j) >= threshold) << (8 * j);
    } else if (all_keep) {
      bytes = 0x0101010101010101ull;
    }
    if (vec_ok && cnt == kUnit) {
      *reinterpret_cast<uint64_t*>(keep + i0) = bytes;
    } else {
      for (int j = 0; j < cnt; ++j) keep[i0 + j] = ((bytes >> (8 * j)) & 1u) != 0;
    }
  }
}

}  // namespace

// numel > 0.
inline void run_dropout_mask(const int64_t* key, double p, bool* keep, int64_t numel, cudaStream_t stream) {
  launch(dropout_mask_kernel, dim3(apply_blocks(ceil_div(numel, kUnit))), dim3(kThreads), stream, key, keep, numel,
         threshold16(p), aligned_to(keep, 8));
}

}  // namespace bnfused::cuda
