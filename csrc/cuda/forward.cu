// forward on CUDA: y = act(fma(x, a, b)) * mult, one pass (every activation of csrc/activation.h: the
// piecewise-linear kinds here, the transcendental ones through forward_transcendental.cu); and dropout_mask (the keep
// pattern alone). The kernels are in forward.cuh.
#include "forward.cuh"
#include "host.cuh"

namespace bnfused {

template <bool kTranscendental>
void forward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight,
                  const OptTensor& bias, const at::Tensor& key, double p, const ActSpec& act, at::Tensor& out) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry_of(x);
  const at::Tensor key_c = key.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "bnfused_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto drop = cuda::make_dropout<acc_t>(key_c.const_data_ptr<int64_t>(), p);
        dispatch_act_part<kTranscendental>(act.kind, [&](auto kind) {
          cuda::run_forward<scalar_t, acc_t, decltype(kind)::value>(
              channel_params<acc_t>(mean, rstd, weight, bias), x.const_data_ptr<scalar_t>(),
              out.mutable_data_ptr<scalar_t>(), g, p > 0.0 ? &drop : nullptr, cuda::current_stream(),
              ActArgs<acc_t>::of(act));
        });
      });
}

template void forward_cuda<cuda::kTranscendentalPart>(const at::Tensor& x, const at::Tensor& mean,
                                                      const at::Tensor& rstd, const OptTensor& weight,
                                                      const OptTensor& bias, const at::Tensor& key, double p,
                                                      const ActSpec& act, at::Tensor& out);

#ifndef BNFUSED_CUDA_TRANSCENDENTAL_PART
void dropout_mask_cuda(const at::Tensor& key, double p, at::Tensor& keep) {
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.is_contiguous(),
              "bnfused.dropout_mask: expected a contiguous bool output");
  const int64_t numel = keep.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(keep.device());
  const at::Tensor key_c = key.contiguous();
  cuda::run_dropout_mask(key_c.const_data_ptr<int64_t>(), p, keep.mutable_data_ptr<bool>(), numel,
                         cuda::current_stream());
}
#endif

}  // namespace bnfused
