// forward on CUDA: y = relu(fma(x, a, b)) * mult, one pass; and dropout_mask (the keep pattern alone).
#include "apply.cuh"

namespace bnfused {
namespace cuda {
namespace {

template <typename acc_t>
struct ForwardOp {
  static constexpr bool kNeedsDy = false;
  struct Chan {
    ChannelAffine<acc_t> ab;
  };
  ChannelParams<acc_t> prm;

  __device__ __forceinline__ Chan channel(int64_t c) const { return Chan{prm.affine(c)}; }
  __device__ __forceinline__ acc_t apply(const Chan& ch, acc_t x, acc_t /*dy*/, acc_t mult) const {
    return forward_element(x, ch.ab, mult);
  }
};

// keep[i] for logical (flat) index i; one Philox call per 8 elements, 8-byte stores when whole and aligned.
__global__ void __launch_bounds__(kThreads)
    dropout_mask_kernel(const int64_t* __restrict__ key_ptr, bool* __restrict__ keep, int64_t numel,
                        uint32_t threshold, bool vec_ok) {
  const bool rng = threshold > 0u && threshold < 65536u;  // else every element has the same fate
  const bool all_keep = threshold == 0u;
  PhiloxKey key{0, 0};
  if (rng) key = load_key(key_ptr);
  const int64_t groups = (numel + kUnit - 1) / kUnit;
  for (int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; grp < groups;
       grp += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = grp * kUnit;
    const int cnt = static_cast<int>((numel - i0) < kUnit ? (numel - i0) : kUnit);
    uint64_t bytes = 0;
    if (rng) {
      const Philox4 r = mask_block(key, static_cast<uint64_t>(grp));
#pragma unroll
      for (int j = 0; j < kUnit; ++j) bytes |= static_cast<uint64_t>(lane_u16(r, j) >= threshold) << (8 * j);
    } else if (all_keep) {
      bytes = 0x0101010101010101ull;
    }
    if (vec_ok && cnt == kUnit) {
      *reinterpret_cast<uint64_t*>(keep + i0) = bytes;
    } else {
      for (int j = 0; j < cnt; ++j) keep[i0 + j] = ((bytes >> (8 * j)) & 1u) != 0;
    }
  }
}

}  // namespace
}  // namespace cuda

void forward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight,
                  const OptTensor& bias, const at::Tensor& key, double p, at::Tensor& out) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry_of(x);
  const at::Tensor key_c = key.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "bnfused_forward_cuda", [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    const cuda::ForwardOp<acc_t> op{
                                        channel_params<acc_t>(mean, rstd, weight, bias)};
                                    const auto drop = cuda::make_dropout<acc_t>(key_c, p);
                                    cuda::launch_apply<scalar_t, acc_t>(op, x, nullptr, out, g,
                                                                        p > 0.0 ? &drop : nullptr);
                                  });
}

void dropout_mask_cuda(const at::Tensor& key, double p, at::Tensor& keep) {
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.is_contiguous(),
              "bnfused.dropout_mask: expected a contiguous bool output");
  const int64_t numel = keep.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(keep.device());
  const at::Tensor key_c = key.contiguous();
  bool* out = keep.mutable_data_ptr<bool>();
  const int64_t groups = cuda::ceil_div(numel, cuda::kUnit);
  cuda::dropout_mask_kernel<<<cuda::apply_blocks(groups), cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      key_c.const_data_ptr<int64_t>(), out, numel, threshold16(p), cuda::aligned_to(out, 8));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bnfused
