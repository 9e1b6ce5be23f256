// backward_input on CUDA: dx from grad_out, x, the per-channel statistics and (training) the reduced
// sums mean_g / mean_g_xhat; the dropout mask is regenerated from the key and [z > 0] recomputed from x.
#include "apply.cuh"

namespace bnfused {
namespace cuda {
namespace {

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

}  // namespace
}  // namespace cuda

void backward_input_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
                         const at::Tensor& key, double p, const OptTensor& mean_g, const OptTensor& mean_g_xhat,
                         at::Tensor& dx) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry_of(x);
  const at::Tensor key_c = key.contiguous();
  const bool batch_stats = mean_g.has_value() && mean_g->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "bnfused_backward_input_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto prm = channel_params<acc_t>(mean, rstd, weight, bias);
        const auto drop = cuda::make_dropout<acc_t>(key_c, p);
        const auto* dropp = p > 0.0 ? &drop : nullptr;
        const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
        if (batch_stats) {
          const cuda::BackwardInputOp<acc_t, true> op{prm, cuda::opt_ptr<acc_t>(mean_g),
                                                      cuda::opt_ptr<acc_t>(mean_g_xhat)};
          cuda::launch_apply<scalar_t, acc_t>(op, x, dy_ptr, dx, g, dropp);
        } else {
          const cuda::BackwardInputOp<acc_t, false> op{prm, nullptr, nullptr};
          cuda::launch_apply<scalar_t, acc_t>(op, x, dy_ptr, dx, g, dropp);
        }
      });
}

}  // namespace bnfused
