#include "cpu/huge_page_allocator.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bnfused::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinHugeBytes = size_t(8) << 20;  // see huge_page_allocator.h

struct Block {
  void* ptr;
  size_t bytes;
};

size_t cache_limit_bytes() {
  const char* env = std::getenv("BNFUSED_CPU_CACHE_MB");
  const long mb = env ? std::strtol(env, nullptr, 10) : 256;
  return mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
}

class BlockCache {
 public:
  // A cached block of at least `bytes` and at most 25 % larger, or a fresh one.
  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = blocks_.size();
      for (size_t i = 0; i < blocks_.size(); ++i)
        if (blocks_[i].bytes >= bytes && blocks_[i].bytes <= bytes + bytes / 4 &&
            (best == blocks_.size() || blocks_[i].bytes < blocks_[best].bytes))
          best = i;
      if (best != blocks_.size()) {
        const Block b = blocks_[best];
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(best));
        cached_ -= b.bytes;
        return b;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) != 0 || p == nullptr)
      TORCH_CHECK(false, "bnfused: out of memory allocating ", bytes, " bytes");
#if defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // advisory: ignored where transparent huge pages are off
#endif
    return Block{p, bytes};
  }

  void give_back(Block b) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + b.bytes <= limit_) {
        blocks_.push_back(b);
        cached_ += b.bytes;
        return;
      }
    }
    std::free(b.ptr);
  }

  int64_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t freed = static_cast<int64_t>(cached_);
    for (const Block& b : blocks_) std::free(b.ptr);
    blocks_.clear();
    cached_ = 0;
    return freed;
  }

 private:
  std::mutex mutex_;
  std::vector<Block> blocks_;
  size_t cached_ = 0;
  const size_t limit_ = cache_limit_bytes();
};

BlockCache& cache() {
  static BlockCache* c = new BlockCache();  // leaked on purpose: tensors may be freed during exit
  return *c;
}

void give_back(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  cache().give_back(*block);
  delete block;
}

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    auto* block = new Block(cache().take(bytes));
    return {block->ptr, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }  // context != data: no raw allocations
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

int64_t release_cached_outputs() { return cache().release(); }

}  // namespace bnfused::cpu
