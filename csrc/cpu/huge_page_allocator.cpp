#include "cpu/huge_page_allocator.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bnfused::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinHugeBytes = size_t(4) << 20;  // below this the page faults do not matter

void free_huge(void* p) { std::free(p); }

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) != 0 || p == nullptr)
      TORCH_CHECK(false, "bnfused: out of memory allocating ", nbytes, " bytes");
#if defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // advisory: ignored where THP is off
#endif
    return {p, p, &free_huge, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_huge; }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

HugePageAllocator* huge_page_allocator() {
  static HugePageAllocator allocator;
  return &allocator;
}

}  // namespace

at::Tensor empty_output(const at::Tensor& x, at::MemoryFormat format) {
  if (!x.is_cpu() || x.nbytes() < kMinHugeBytes) return at::empty_like(x, x.options(), format);
  return at::detail::empty_generic(x.sizes(), huge_page_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   x.scalar_type(), format);
}

}  // namespace bnfused::cpu
