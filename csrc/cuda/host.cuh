// The ATen side of the CUDA host wrappers (*.cu): device guard, current stream, workspaces, the reductions'
// arrival counters and the translation of tensors into the raw pointers the torch-free kernel headers take.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <mutex>
#include <utility>

#include "../bnfused.h"
#include "common.cuh"
#include "reduce.cuh"

namespace bnfused::cuda {

// The part of a split op (bnfused.h: forward_cuda & co.) this translation unit compiles: <op>_transcendental.cu
// defines BNFUSED_CUDA_TRANSCENDENTAL_PART and includes <op>.cu.
#ifdef BNFUSED_CUDA_TRANSCENDENTAL_PART
constexpr bool kTranscendentalPart = true;
#else
constexpr bool kTranscendentalPart = false;
#endif

template <typename acc_t>
inline const acc_t* opt_ptr(const OptTensor& t) {
  return (t.has_value() && t->defined()) ? t->const_data_ptr<acc_t>() : nullptr;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A workspace of `elems` acc_t on x's device (undefined when elems == 0).
template <typename acc_t>
inline at::Tensor workspace(const at::Tensor& x, int64_t elems) {
  if (elems == 0) return at::Tensor();
  return at::empty({elems}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

template <typename acc_t>
inline acc_t* workspace_ptr(at::Tensor& ws) {
  return ws.defined() ? ws.mutable_data_ptr<acc_t>() : nullptr;
}

// `n` zeroed arrival counters for a split reduction on the current stream (nullptr when n == 0). The kernels
// leave them zero, so one buffer per (device, stream), zeroed once, serves every call on that stream in stream
// order, with no memset per call; calls on other streams, which may run at the same time, get their own. A call
// being captured into a CUDA graph gets counters of its own (zeroed by a memset node of the graph), so replays
// never share them with eager calls on the capturing stream, which the stream pool hands out again.
// `holder` keeps the buffer alive until the caller has launched: another host thread on the same stream may
// replace the shared one with a larger buffer as soon as the lock is released, and the old block must not go back
// to the caching allocator (which could hand it to another tensor) before this call's kernel is enqueued.
inline unsigned* reduction_counters(const at::Tensor& x, int64_t n, at::Tensor& holder) {
  if (n == 0) return nullptr;
  const cudaStream_t stream = current_stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  BNFUSED_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const auto zeros = [&] { return at::zeros({n}, x.options().dtype(at::kInt)); };
  if (capture != cudaStreamCaptureStatusNone) {
    holder = zeros();
    return reinterpret_cast<unsigned*>(holder.mutable_data_ptr<int32_t>());
  }
  static std::mutex mutex;
  static auto* buffers = new std::map<std::pair<int, uintptr_t>, at::Tensor>();  // never destroyed (exit order)
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& t = (*buffers)[{static_cast<int>(x.get_device()), reinterpret_cast<uintptr_t>(stream)}];
  // A larger one replaces it; the old block goes back to the caching allocator in this stream's order.
  if (!t.defined() || t.numel() < n) t = zeros();
  holder = t;  // a second reference, taken under the lock
  return reinterpret_cast<unsigned*>(holder.mutable_data_ptr<int32_t>());
}

// Plans and runs Op over x (and dy when Op::kGrad) on the current stream: one launch, with its workspace and
// arrival counters.
template <typename scalar_t, typename acc_t, class Op>
inline void reduce(const at::Tensor& x, const Op& op, const Geometry& g, const scalar_t* x_ptr,
                   const scalar_t* dy_ptr, const Dropout<acc_t>* drop) {
  const auto plan = plan_reduction<scalar_t, Op>(g, x_ptr, dy_ptr);
  at::Tensor ws = workspace<acc_t>(x, plan.workspace_elems());
  at::Tensor holder;
  unsigned* counters = reduction_counters(x, plan.counter_elems(), holder);
  run_reduction<scalar_t, acc_t>(op, plan, x_ptr, dy_ptr, g, drop, workspace_ptr<acc_t>(ws), counters,
                                 current_stream());
}

}  // namespace bnfused::cuda
