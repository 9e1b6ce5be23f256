// batch_stats on CUDA: per-channel mean and biased variance (Welford, two-stage grid reduction).
#include "reduce.cuh"

#include <limits>

namespace bnfused {

std::tuple<at::Tensor, at::Tensor> batch_stats_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry_of(x);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({g.C}, x.options().dtype(acc_type));
  at::Tensor var = at::empty({g.C}, x.options().dtype(acc_type));
  if (g.C == 0) return {mean, var};
  if (g.N * g.S == 0) {
    // Like torch.var_mean over an empty dimension.
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "bnfused_batch_stats_cuda", [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    const cuda::StatsOp<acc_t> op{mean.mutable_data_ptr<acc_t>(),
                                                                  var.mutable_data_ptr<acc_t>()};
                                    cuda::launch_reduction<scalar_t, acc_t>(op, x, nullptr, g, nullptr);
                                  });
  return {mean, var};
}

}  // namespace bnfused
