// batch_stats on CUDA: per-channel mean and biased variance (Welford, one-launch grid reduction: StatsOp,
// reduce.cuh); batch_stats_update: mean and rstd with the running statistics updated by the same reduction.
#include "host.cuh"
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
  TORCH_CHECK(g.C <= 0x7fffffff, "bnfused: too many channels for the CUDA kernels: ", g.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "bnfused_batch_stats_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        using Op = cuda::StatsOp<acc_t>;
        const Op op{mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>()};
        cuda::reduce<scalar_t, acc_t>(x, op, g, x.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr),
                                      static_cast<const cuda::Dropout<acc_t>*>(nullptr));
      });
  return {mean, var};
}

namespace {

cuda::StatDtype stat_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::StatDtype::Float;
    case at::kDouble: return cuda::StatDtype::Double;
    case at::kHalf: return cuda::StatDtype::Half;
    case at::kBFloat16: return cuda::StatDtype::BFloat16;
    default:
      TORCH_CHECK(false, "bnfused.batch_stats_update: ", name, " must be float32, float64, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_stats_update_cuda(const at::Tensor& x, const OptTensor& running_mean,
                                                           const OptTensor& running_var, double momentum, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry_of(x);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({g.C}, x.options().dtype(acc_type));
  at::Tensor rstd = at::empty({g.C}, x.options().dtype(acc_type));
  const bool update = running_mean.has_value() && running_mean->defined();
  if (g.C == 0) return {mean, rstd};
  if (g.N * g.S == 0) {  // NaN statistics, as batch_stats gives; momentum * NaN makes the running ones NaN too
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    if (update) {
      running_mean->fill_(std::numeric_limits<double>::quiet_NaN());
      running_var->fill_(std::numeric_limits<double>::quiet_NaN());
    }
    return {mean, rstd};
  }
  TORCH_CHECK(g.C <= 0x7fffffff, "bnfused: too many channels for the CUDA kernels: ", g.C);
  cuda::RunningStats running;
  if (update) {
    running.mean = running_mean->data_ptr();
    running.var = running_var->data_ptr();
    running.mean_stride = running_mean->stride(0);
    running.var_stride = running_var->stride(0);
    running.mean_dtype = stat_dtype(*running_mean, "running_mean");
    running.var_dtype = stat_dtype(*running_var, "running_var");
    running.momentum = momentum;
    running.unbias = unbiased_var_factor(g.N * g.S);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "bnfused_batch_stats_update_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        using Op = cuda::StatsOp<acc_t>;
        const Op op{mean.mutable_data_ptr<acc_t>(), nullptr, rstd.mutable_data_ptr<acc_t>(), static_cast<acc_t>(eps),
                    running};
        cuda::reduce<scalar_t, acc_t>(x, op, g, x.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr),
                                      static_cast<const cuda::Dropout<acc_t>*>(nullptr));
      });
  return {mean, rstd};
}

}  // namespace bnfused
