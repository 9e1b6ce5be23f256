// Output allocation for the CPU kernels. Large outputs (y, dx) come from 2 MiB-aligned memory advised with
// MADV_HUGEPAGE: a fresh 50 MB tensor otherwise costs ~12K page faults and ~30 ms before the kernel writes a
// byte, more than the kernel itself. Memory goes back to the OS on free (no caching). PyTorch's own allocator
// does the same for every tensor when THP_MEM_ALLOC_ENABLE=1 is set.
#pragma once
#include <ATen/core/Tensor.h>

namespace bnfused::cpu {

// Uninitialised tensor with x's sizes and dtype in memory format `format`.
at::Tensor empty_output(const at::Tensor& x, at::MemoryFormat format);

}  // namespace bnfused::cpu
