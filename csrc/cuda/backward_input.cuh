// backward_input's kernel, torch-free: dx from grad_out, x, the per-channel statistics and (training) the reduced
// sums mean_g / mean_g_xhat, as an Op of apply.cuh. Host wrapper in backward_input.cu.
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
  const acc_t* mean_g;       // kBatchStats only
  const acc_t* mean_g_xhat;  // kBatchStats only

  __device__ __forceinline__ Chan channel(int64_t c) const {
    const acc_t mg = kBatchStats ? mean_g[c] : acc_t(0);
    const acc_t mgx = kBatchStats ? mean_g_xhat[c] : acc_t(0);
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

// mean_g == nullptr: running statistics (no batch-statistics terms).
template <typename scalar_t, typename acc_t>
void run_backward_input(const ChannelParams<acc_t>& prm, const acc_t* mean_g, const acc_t* mean_g_xhat,
                        const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Geometry& g,
                        const Dropout<acc_t>* drop, cudaStream_t stream) {
  if (mean_g != nullptr)
    run_apply<scalar_t, acc_t>(BackwardInputOp<acc_t, true>{prm, mean_g, mean_g_xhat}, x, dy, dx, g, drop, stream);
  else
    run_apply<scalar_t, acc_t>(BackwardInputOp<acc_t, false>{prm, nullptr, nullptr}, x, dy, dx, g, drop, stream);
}

}  // namespace bnfused::cuda
