// backward_reduce on CUDA: per-channel sum_g and sum_g_xhat, g = act'(z) * grad_out * mult, with the dropout mask
// regenerated from the key and z recomputed from x exactly as in the forward (GradSumsOp with an ActGate, reduce.cuh);
// the piecewise-linear activations here, the transcendental ones through backward_reduce_transcendental.cu.
#include "host.cuh"
#include "reduce.cuh"

namespace bnfused {

template <bool kTranscendental>
std::tuple<at::Tensor, at::Tensor> backward_reduce_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                        const OptTensor& weight, const OptTensor& bias,
                                                        const at::Tensor& key, double p, const ActSpec& act) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry_of(x);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sum_g = at::empty({g.C}, x.options().dtype(acc_type));
  at::Tensor sum_g_xhat = at::empty({g.C}, x.options().dtype(acc_type));
  if (g.C == 0) return {sum_g, sum_g_xhat};
  if (g.N * g.S == 0) {
    sum_g.zero_();
    sum_g_xhat.zero_();
    return {sum_g, sum_g_xhat};
  }
  TORCH_CHECK(g.C <= 0x7fffffff, "bnfused: too many channels for the CUDA kernels: ", g.C);
  const at::Tensor key_c = key.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "bnfused_backward_reduce_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto drop = cuda::make_dropout<acc_t>(key_c.const_data_ptr<int64_t>(), p);
        dispatch_act_part<kTranscendental>(act.kind, [&](auto kind) {
          using Gate = cuda::ActGate<acc_t, decltype(kind)::value>;
          const cuda::GradSumsOp<acc_t, Gate> op{channel_params<acc_t>(mean, rstd, weight, bias),
                                                 sum_g.mutable_data_ptr<acc_t>(), sum_g_xhat.mutable_data_ptr<acc_t>(),
                                                 Gate{ActArgs<acc_t>::of(act)}};
          cuda::reduce<scalar_t, acc_t>(x, op, g, x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                                        p > 0.0 ? &drop : nullptr);
        });
      });
  return {sum_g, sum_g_xhat};
}

template std::tuple<at::Tensor, at::Tensor> backward_reduce_cuda<cuda::kTranscendentalPart>(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const OptTensor& weight, const OptTensor& bias, const at::Tensor& key, double p, const ActSpec& act);

}  // namespace bnfused
