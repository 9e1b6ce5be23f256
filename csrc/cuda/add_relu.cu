// BN + residual add + activation (+ dropout) on CUDA: the forward with its pass bits (identity, ReLU, Hardtanh: the
// kinds whose gradient gate the bits hold), and the two add-mode backward ops
// (the sums of g = grad_out * pass / (1 - p) through reduce.cuh with the bits as the mask; dx and g in one
// elementwise pass). The kernels and their torch-free drivers are in add_relu.cuh.
#include <ATen/ops/zeros.h>

#include "add_relu.cuh"
#include "host.cuh"

namespace bnfused {

void add_relu_forward_cuda(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& mean,
                           const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
                           const at::Tensor& key, double p, const ActSpec& act, at::Tensor& out,
                           uint8_t* pass_bits_out) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry_of(x);
  const at::Tensor key_c = key.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "bnfused_add_relu_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto drop = cuda::make_dropout<acc_t>(key_c.const_data_ptr<int64_t>(), p);
        dispatch_gate_act(act.kind, [&](auto kind) {
          cuda::run_add_relu_forward<scalar_t, acc_t, decltype(kind)::value>(
              channel_params<acc_t>(mean, rstd, weight, bias), x.const_data_ptr<scalar_t>(),
              residual.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), pass_bits_out, g,
              p > 0.0 ? &drop : nullptr, cuda::current_stream(), ActArgs<acc_t>::of(act));
        });
      });
}

std::tuple<at::Tensor, at::Tensor> add_relu_backward_reduce_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                 const at::Tensor& mean, const at::Tensor& rstd,
                                                                 const at::Tensor& pass_bits, double p) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry_of(x);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sum_g = at::zeros({g.C}, x.options().dtype(acc_type));
  at::Tensor sum_g_xhat = at::zeros({g.C}, x.options().dtype(acc_type));
  if (g.C == 0 || g.N * g.S == 0) return {sum_g, sum_g_xhat};
  TORCH_CHECK(g.C <= 0x7fffffff, "bnfused: too many channels for the CUDA kernels: ", g.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "bnfused_add_relu_backward_reduce_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        using Op = cuda::AddGradSumsOp<acc_t>;
        const Op op{{mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), nullptr, nullptr},
                    sum_g.mutable_data_ptr<acc_t>(), sum_g_xhat.mutable_data_ptr<acc_t>()};
        const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
        const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
        const auto plan = cuda::plan_reduction<scalar_t, Op>(g, x_ptr, dy_ptr);
        at::Tensor ws = cuda::workspace<acc_t>(x, plan.workspace_elems());
        at::Tensor counters_holder;
        cuda::run_add_relu_backward_reduce<scalar_t, acc_t>(
            op, plan, dy_ptr, x_ptr, pass_bits.const_data_ptr<uint8_t>(), dropout_scale<acc_t>(p), g,
            cuda::workspace_ptr<acc_t>(ws), cuda::reduction_counters(x, plan.counter_elems(), counters_holder),
            cuda::current_stream());
      });
  return {sum_g, sum_g_xhat};
}

void add_relu_backward_input_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& rstd, const OptTensor& weight, const at::Tensor& pass_bits,
                                  double p, const OptTensor& sum_g, const OptTensor& sum_g_xhat, int64_t count,
                                  at::Tensor& dx, at::Tensor& grad_residual) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "bnfused_add_relu_backward_input_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        cuda::run_add_relu_backward_input<scalar_t, acc_t>(
            channel_params<acc_t>(mean, rstd, weight, std::nullopt), cuda::opt_ptr<acc_t>(sum_g),
            cuda::opt_ptr<acc_t>(sum_g_xhat), count, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            pass_bits.const_data_ptr<uint8_t>(), dropout_scale<acc_t>(p), dx.mutable_data_ptr<scalar_t>(),
            grad_residual.mutable_data_ptr<scalar_t>(), g, cuda::current_stream());
      });
}

}  // namespace bnfused
