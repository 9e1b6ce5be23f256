// backward_input's kernel, torch-free: dx from grad_out, x, the per-channel statistics and (training) the reduced
// sums sum_g / sum_g_xhat over `count` values, as an Op of apply.cuh templated on the activation (csrc/activation.h).
// Host wrapper in backward_input.cu.
#pragma once
#include "../activation.h"
#include "apply.cuh"

namespace bnfused::cuda {

template <typename acc_t, bool kBatchStats, Act kAct = Act::ReLU>
struct BackwardInputOp {
  static constexpr bool kNeedsDy = true;
  static constexpr bool kTranscendental = act_transcendental<kAct>();
  struct Chan {
    ChannelAffine<acc_t> ab;
    BackwardCoef<acc_t> coef;
  };
  ChannelParams<acc_t> prm;
  const acc_t* sum_g;       // kBatchStats only
  const acc_t* sum_g_xhat;  // kBatchStats only
  acc_t count;              // kBatchStats only: the values the sums ran over (global under SyncBN)
  ActArgs<acc_t> act;

  // The sums are divided here, per channel, as the CPU kernels do: no division kernels before this one.
  __device__ __forceinline__ Chan channel(int64_t c) const {
    const acc_t mg = kBatchStats ? sum_g[c] / count : acc_t(0);
    const acc_t mgx = kBatchStats ? sum_g_xhat[c] / count : acc_t(0);
    return Chan{prm.affine(c), backward_coef<acc_t>(prm.mean[c], prm.rstd[c], prm.w(c), kBatchStats, mg, mgx)};
  }
  // g = act'(z) * (dy * mult), z recomputed as in the forward (the CPU kernels' order).
  __device__ __forceinline__ acc_t apply(const Chan& ch, acc_t x, acc_t dy, acc_t mult) const {
    acc_t g = dy * mult;
    if constexpr (kAct != Act::Identity) g = act_backward<kAct>(g, bn_preact(x, ch.ab), act);
    if constexpr (kBatchStats)
      return grad_input_element(g, x, ch.coef);
    else
      return grad_input_element_eval(g, ch.coef);
  }
};

// sum_g == nullptr: running statistics (no batch-statistics terms).
template <typename scalar_t, typename acc_t, Act kAct = Act::ReLU>
void run_backward_input(const ChannelParams<acc_t>& prm, const acc_t* sum_g, const acc_t* sum_g_xhat, int64_t count,
                        const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g,
                        const Dropout<acc_t>* drop, cudaStream_t stream, const ActArgs<acc_t>& act = {}) {
  if (sum_g != nullptr)
    run_apply<scalar_t, acc_t>(
        BackwardInputOp<acc_t, true, kAct>{prm, sum_g, sum_g_xhat, static_cast<acc_t>(count), act}, x, dy, dx, g,
        drop, stream);
  else
    run_apply<scalar_t, acc_t>(BackwardInputOp<acc_t, false, kAct>{prm, nullptr, nullptr, acc_t(1), act}, x, dy, dx,
                               g, drop, stream);
}

}  // namespace bnfused::cuda
