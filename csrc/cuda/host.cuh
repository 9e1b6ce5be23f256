// The ATen side of the CUDA host wrappers (*.cu): device guard, current stream, workspaces and the translation
// of tensors into the raw pointers the torch-free kernel headers take.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../bnfused.h"
#include "common.cuh"

namespace bnfused::cuda {

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

}  // namespace bnfused::cuda
