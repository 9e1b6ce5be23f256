// backward_input's kernel, torch-free: dx from grad_out, x, the per-channel statistics and (training) the reduced
// sums sum_g / sum_g_xhat over `count` values, as an Op of apply.cuh. Host wrapper in backward_input.cu.
#pragma once
#include "apply.cuh"

namespace bnfused::cuda {

template <typename acc_t, bool kBatchStats>
struct BackwardInputOp {
  static constexpr bool kNeedsDy = true;
  struct Chan {
    ChannelAffine<acc_t> ab;
    BackwardCoef<acc_t> coef;
  };
  ChannelParams<acc_t> prm;
  const acc_t* sum_g;       // kBatchStats only
  const acc_t* sum_g_xhat;  // kBatchStats only
  acc_t count;              // kBatchStats only: the values the sums ran over (global under SyncBN)

  // The sums are divided here, per channel, as the CPU kernels do: no division kernels before this one.
  __device__ __forceinline__ Chan channel(int64_t c) const {
    const acc_t mg = kBatchStats ? sum_g[c] / count : acc_t(0);
    const acc_t mgx = kBatchStats ? sum_g_xhat[c] / count : acc_t(0);
    return Chan{prm.affine(c), backward_coef<acc_t>(prm.mean[c], prm.rstd[c], prm.w(c), kBatchStats, mg, mgx)};
  }
  __device__ __forceinline__ acc_t apply(const Chan& ch, acc_t x, acc_t dy, acc_t mult) const {
    const acc_t g = grad_through_relu_dropout(dy, bn_preact(x, ch.ab), mult);
    if constexpr (kBatchStats)
      return grad_input_element(g, x, ch.coef);
    else
      return grad_input_element_eval(g, ch.coef);
  }
};

// sum_g == nullptr: running statistics (no batch-statistics terms).
template <typename scalar_t, typename acc_t>
void run_backward_input(const ChannelParams<acc_t>& prm, const acc_t* sum_g, const acc_t* sum_g_xhat, int64_t count,
                        const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g,
                        const Dropout<acc_t>* drop, cudaStream_t stream) {
  if (sum_g != nullptr)
    run_apply<scalar_t, acc_t>(BackwardInputOp<acc_t, true>{prm, sum_g, sum_g_xhat, static_cast<acc_t>(count)}, x,
                               dy, dx, g, drop, stream);
  else
    run_apply<scalar_t, acc_t>(BackwardInputOp<acc_t, false>{prm, nullptr, nullptr, acc_t(1)}, x, dy, dx, g, drop,
                               stream);
}

}  // namespace bnfused::cuda
