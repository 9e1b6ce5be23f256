// Output allocation for the CPU kernels. Outputs of 8 MiB and more (y, dx of CNN-sized activations) are sizes
// glibc serves with a fresh mmap (always from 32 MiB; below, whenever the heap top was trimmed after the last
// step freed them): a fresh 51 MB tensor costs ~12K page faults and ~30 ms before the kernel writes a byte, more
// than the kernel itself; a (32, 256, 28, 28) fwd+bwd step measured ~2000 faults per step at a 32 MiB cut-off. They come from 2 MiB-aligned MADV_HUGEPAGE memory
// (~6x cheaper to fault in) and a small bounded cache of freed blocks, so a training loop reuses the same
// blocks step after step. BNFUSED_CPU_CACHE_MB (default 256, 0 disables) bounds the memory the cache keeps.
// Smaller outputs use PyTorch's allocator (glibc's heap reuses them already).
#pragma once
#include <ATen/core/Tensor.h>

namespace bnfused::cpu {

// Uninitialised tensor with x's sizes and dtype in memory format `format`.
at::Tensor empty_output(const at::Tensor& x, at::MemoryFormat format);

// Frees every cached block; returns the bytes released.
int64_t release_cached_outputs();

}  // namespace bnfused::cpu
