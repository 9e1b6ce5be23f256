// backward_input on CUDA: dx from grad_out, x, the per-channel statistics and (training) the reduced
// sums sum_g / sum_g_xhat over `count` values; the dropout mask is regenerated from the key and the activation's
// derivative act'(z) recomputed from x (every activation of csrc/activation.h; the piecewise-linear kinds here, the
// transcendental ones through backward_input_transcendental.cu). The kernel is in backward_input.cuh.
#include "backward_input.cuh"
#include "host.cuh"

namespace bnfused {

template <bool kTranscendental>
void backward_input_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
                         const at::Tensor& key, double p, const OptTensor& sum_g, const OptTensor& sum_g_xhat,
                         int64_t count, const ActSpec& act, at::Tensor& dx) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry_of(x);
  const at::Tensor key_c = key.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "bnfused_backward_input_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto drop = cuda::make_dropout<acc_t>(key_c.const_data_ptr<int64_t>(), p);
        dispatch_act_part<kTranscendental>(act.kind, [&](auto kind) {
          cuda::run_backward_input<scalar_t, acc_t, decltype(kind)::value>(
              channel_params<acc_t>(mean, rstd, weight, bias), cuda::opt_ptr<acc_t>(sum_g),
              cuda::opt_ptr<acc_t>(sum_g_xhat), count, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
              dx.mutable_data_ptr<scalar_t>(), g, p > 0.0 ? &drop : nullptr, cuda::current_stream(),
              ActArgs<acc_t>::of(act));
        });
      });
}

template void backward_input_cuda<cuda::kTranscendentalPart>(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const OptTensor& weight, const OptTensor& bias, const at::Tensor& key, double p, const OptTensor& sum_g,
    const OptTensor& sum_g_xhat, int64_t count, const ActSpec& act, at::Tensor& dx);

}  // namespace bnfused
