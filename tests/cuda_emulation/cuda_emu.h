// CPU emulation of the CUDA features the bnfused kernels use, so the real kernels (csrc/cuda/*.cuh) run, and
// run under ThreadSanitizer / AddressSanitizer, on machines without a GPU. One OS thread per CUDA thread (a
// persistent pool), several blocks at once so races between blocks are visible too. Checks what hardware
// would reject or what would be undefined: launch limits, __syncthreads divergence and deadlock (timeout),
// warp shuffles whose mask is not the live lanes or that some lanes never reach, shared-memory size; shared
// arrays are exactly sized (ASan sees an out-of-bounds index) and poisoned with 0xFF bytes (NaN when read
// before written). Selected by compiling the kernels with -DBNFUSED_CUDA_EMULATION and this directory on -I.
#pragma once
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// ---- CUDA C++ spellings ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
typedef struct CUstream_st* cudaStream_t;

namespace cuda_emu {

inline std::atomic<uint64_t> launches{0};      // kernels launched (valid configurations)
inline std::atomic<uint64_t> philox_calls{0};  // mask_block calls (csrc/philox.h's hook)
inline std::atomic<uint64_t> vector_elems{0};  // elements moved by vector loads/stores (common.cuh's hook)
inline std::atomic<uint64_t> scalar_elems{0};  // elements moved by scalar loads/stores
inline void count_access(bool is_vector, int elems) {
  (is_vector ? vector_elems : scalar_elems).fetch_add(static_cast<uint64_t>(elems), std::memory_order_relaxed);
}
inline cudaError_t last_error = cudaSuccess;

// The cost of the split reductions' last-block merge (reduce.cuh's hooks): the partials it reads (elements), the
// 32-byte sectors its warps' loads touch (a load instruction of a warp: the distinct sectors of its lanes' addresses,
// what the memory system moves; 1 element per sector when the lanes read a column, 8 (float) when they read a row),
// and its longest chain: the most dependent merge steps (a partial combined into a lane's accumulator, a level of a
// warp or block tree) one thread takes in one block, the merge's latency.
inline std::atomic<uint64_t> merge_elems{0};
inline std::atomic<uint64_t> merge_sectors{0};
inline std::atomic<uint64_t> merge_chain{0};  // a maximum: reset it before the run it measures
inline std::atomic<uint64_t> launch_id{0};
struct MergeThread {
  uint64_t launch = ~uint64_t(0);
  unsigned bx = 0, by = 0, bz = 0;
  uint64_t steps = 0;  // this thread's merge steps so far in this block
};
inline thread_local MergeThread tl_merge;
inline std::mutex merge_mutex;
inline std::map<std::tuple<uint64_t, unsigned, unsigned, unsigned, unsigned, uint64_t>, std::vector<uintptr_t>>
    merge_loads;  // (launch, block, warp, which load) -> sectors, for the launch in flight
inline MergeThread& merge_thread() {
  MergeThread& m = tl_merge;
  const uint64_t id = launch_id.load(std::memory_order_relaxed);
  if (m.launch != id) m = MergeThread{id, ~0u, ~0u, ~0u, 0};
  if (m.bx != blockIdx.x || m.by != blockIdx.y || m.bz != blockIdx.z) {
    m.bx = blockIdx.x, m.by = blockIdx.y, m.bz = blockIdx.z;
    m.steps = 0;
  }
  return m;
}
// A merge load of `bytes` at p, the load `at` of its warp (the kernel numbers them: lanes of a warp that run the same
// load instruction pass the same number).
inline void merge_load(const void* p, size_t bytes, int64_t at) {
  MergeThread& m = merge_thread();
  const unsigned tid = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) >> 5, last = (reinterpret_cast<uintptr_t>(p) + bytes - 1) >> 5;
  merge_elems.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lk(merge_mutex);
  auto& sectors = merge_loads[{m.launch, m.bx, m.by, m.bz, tid >> 5, static_cast<uint64_t>(at)}];
  for (uintptr_t s = first; s <= last; ++s)
    if (std::find(sectors.begin(), sectors.end(), s) == sectors.end()) {
      sectors.push_back(s);
      merge_sectors.fetch_add(1, std::memory_order_relaxed);
    }
}
inline void merge_steps(int n) {
  MergeThread& m = merge_thread();
  m.steps += static_cast<uint64_t>(n);
  uint64_t seen = merge_chain.load(std::memory_order_relaxed);
  while (m.steps > seen && !merge_chain.compare_exchange_weak(seen, m.steps, std::memory_order_relaxed)) {
  }
}

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}
// What the launch heuristics see: device 0 has CUDA_EMU_SMS SMs (default 2), device 1 132 (an H100), so that one
// run plans a few splits and many (cudaSetDevice).
inline int current_device = 0;
inline int sm_count(int dev) { return dev == 0 ? env_int("CUDA_EMU_SMS", 2) : 132; }
inline int concurrent_blocks() { return env_int("CUDA_EMU_CONCURRENT_BLOCKS", 3); }  // blocks in flight
inline std::chrono::seconds timeout() {
  static const std::chrono::seconds t(env_int("CUDA_EMU_TIMEOUT_S", 30));
  return t;
}

inline void check(cudaError_t e, const char* expr, const char* file, int line) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error ") + std::to_string(e) + " from " + expr + " at " + file + ":" +
                             std::to_string(line));
}

// A device-side error: reported with the thread that saw it, then the process ends (other threads may be stuck).
[[noreturn]] inline void fail(const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "cuda_emu: error: block (%u,%u,%u) thread (%u,%u,%u): %s\n", blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z, msg);
  std::fflush(stderr);
  std::_Exit(66);
}

inline int yield_spins() {
  static const int n = env_int("CUDA_EMU_YIELDS", 0);
  return n;
}

// A generation counter waited on with a futex: a barrier's bookkeeping is under a mutex, but its waiters sleep
// here, so a release wakes them without a herd on the mutex. Acquire/release order the barrier's memory.
struct Generation {
  std::atomic<int> gen{0};
  int load() const { return gen.load(std::memory_order_acquire); }
  void advance() {
    gen.fetch_add(1, std::memory_order_release);
    syscall(SYS_futex, &gen, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
  }
  // False on timeout.
  bool wait_change(int my, std::chrono::seconds limit) const {
    // Yield a few times first: the other threads of the barrier are usually runnable, and a yield is cheaper
    // than a futex sleep and wake-up.
    for (int spin = 0; spin < yield_spins(); ++spin) {
      if (load() != my) return true;
      sched_yield();
    }
    const auto end = std::chrono::steady_clock::now() + limit;
    while (load() == my) {
      const auto left = end - std::chrono::steady_clock::now();
      if (left <= std::chrono::steady_clock::duration::zero()) return false;
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
      timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
      syscall(SYS_futex, &gen, FUTEX_WAIT_PRIVATE, my, &ts, nullptr, 0);
    }
    return true;
  }
};

constexpr size_t kSharedLimit = 48 * 1024;  // static shared memory per block

// One warp's exchange: lanes write their value, the last one in the mask releases them, each reads its source.
// Double-buffered by generation, so one barrier per shuffle.
struct Warp {
  std::mutex m;
  Generation done;
  uint32_t live = 0;     // lanes that exist and have not exited
  uint32_t arrived = 0;  // lanes waiting in the pending exchange
  uint32_t mask = 0;     // its mask
  int line = 0;          // its source line
  const char* what = "";
  int gen = 0;  // exchanges completed (== done.gen, read under m)
  unsigned char slot[2][32][16];
};

struct Block {
  std::mutex m;
  Generation done;
  int threads = 0;
  int live = 0;     // threads that have not returned
  int arrived = 0;  // threads waiting at the pending __syncthreads
  int line = 0;     // its source line
  int gen = 0;      // barriers completed
  std::unique_ptr<Warp[]> warps;
  std::unique_ptr<std::atomic<int>[]> at_barrier;  // per thread: line of the __syncthreads it waits at, or 0
  std::map<const void*, std::pair<void*, size_t>> shared;  // declaration site -> (array, bytes)
  size_t shared_bytes = 0;

  void reset(int nthreads) {
    threads = live = nthreads;
    arrived = 0;
    const int nwarps = (nthreads + 31) / 32;
    warps.reset(new Warp[nwarps]);
    at_barrier.reset(new std::atomic<int>[nthreads]);
    for (int t = 0; t < nthreads; ++t) at_barrier[t] = 0;
    for (int w = 0; w < nwarps; ++w) {
      const int lanes = std::min(32, nthreads - 32 * w);
      warps[w].live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
  }
  void free_shared() {
    for (auto& kv : shared) ::operator delete(kv.second.first, std::align_val_t(16));
    shared.clear();
    shared_bytes = 0;
  }
};

inline thread_local Block* tl_block = nullptr;
inline thread_local int tl_tid = 0;

inline int linear_tid() { return tl_tid; }

// Completes the pending __syncthreads once every live thread is in it (b.m held).
inline void release_barrier_if_complete(Block& b) {
  if (b.arrived > 0 && b.arrived == b.live) {
    for (int t = 0; t < b.threads; ++t) b.at_barrier[t].store(0);  // released, even before they wake
    b.arrived = 0;
    ++b.gen;
    b.done.advance();
  }
}

inline void syncthreads(int line) {
  Block& b = *tl_block;
  const int tid = tl_tid;
  b.at_barrier[tid].store(line);
  Warp& w = b.warps[tid >> 5];
  {
    std::lock_guard<std::mutex> lk(w.m);
    if (w.arrived != 0 && (w.mask >> (tid & 31) & 1u))
      fail("__syncthreads at line %d while lanes 0x%08x of its warp wait in %s at line %d (divergent warp)", line,
           w.arrived, w.what, w.line);
  }
  int my;
  {
    std::lock_guard<std::mutex> lk(b.m);
    if (b.arrived == 0)
      b.line = line;
    else if (b.line != line)
      fail("divergent __syncthreads: this thread at line %d, %d others at line %d", line, b.arrived, b.line);
    ++b.arrived;
    my = b.gen;
    release_barrier_if_complete(b);
  }
  if (!b.done.wait_change(my, timeout()))
    fail("deadlock at __syncthreads (line %d): %d of %d live threads arrived", line, b.arrived, b.live);
}

// The exchange behind every warp-level primitive. src_of(lane) is the lane whose value this lane gets (its own
// when out of range). bytes <= 16.
template <typename SrcOf>
inline void warp_exchange(uint32_t mask, const void* in, void* out, size_t bytes, SrcOf src_of, const char* what,
                          int line) {
  Block& b = *tl_block;
  const int tid = tl_tid, lane = tid & 31, warp = tid >> 5;
  Warp& w = b.warps[warp];
  std::unique_lock<std::mutex> lk(w.m);
  if (mask != w.live)
    fail("%s at line %d with mask 0x%08x, but the live lanes of warp %d are 0x%08x", what, line, mask, warp, w.live);
  if (w.arrived == 0) {
    w.mask = mask;
    w.line = line;
    w.what = what;
  } else if (w.line != line || std::strcmp(w.what, what) != 0) {
    fail("divergent warp: lane %d at %s line %d while lanes 0x%08x wait at %s line %d", lane, what, line, w.arrived,
         w.what, w.line);
  }
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && b.at_barrier[warp * 32 + l].load() != 0)
      fail("%s at line %d while lane %d waits at __syncthreads (line %d): divergent warp", what, line, l,
           b.at_barrier[warp * 32 + l].load());
  const int my = w.gen;
  std::memcpy(w.slot[my & 1][lane], in, bytes);
  w.arrived |= 1u << lane;
  if (w.arrived == w.mask) {
    w.arrived = 0;
    ++w.gen;
    w.done.advance();
    lk.unlock();
  } else {
    lk.unlock();
    if (!w.done.wait_change(my, timeout()))
      fail("deadlock in %s at line %d: lanes 0x%08x of mask 0x%08x arrived", what, line, w.arrived, mask);
  }
  const int src = src_of(lane);
  const bool valid = src >= 0 && src < 32 && (mask >> src & 1u);
  std::memcpy(out, valid ? w.slot[my & 1][src] : w.slot[my & 1][lane], bytes);
}

// A thread's return from the kernel: it leaves its warp and the block's barrier count.
inline void thread_exit() {
  Block& b = *tl_block;
  const int tid = tl_tid;
  Warp& w = b.warps[tid >> 5];
  {
    std::lock_guard<std::mutex> lk(w.m);
    if (w.arrived != 0 && (w.mask >> (tid & 31) & 1u))
      fail("thread returned while lanes 0x%08x of its warp wait in %s at line %d (divergent warp)", w.arrived,
           w.what, w.line);
    w.live &= ~(1u << (tid & 31));
  }
  std::lock_guard<std::mutex> lk(b.m);
  --b.live;
  release_barrier_if_complete(b);
}

template <typename T>
inline T* shared_array(const void* site, size_t count) {
  static_assert(std::is_trivially_default_constructible_v<T>, "__shared__ arrays hold trivial types");
  Block& b = *tl_block;
  std::lock_guard<std::mutex> lk(b.m);
  const size_t bytes = count * sizeof(T);
  auto it = b.shared.find(site);
  if (it != b.shared.end()) {
    if (it->second.second != bytes) fail("__shared__ array redeclared with another size");
    return static_cast<T*>(it->second.first);
  }
  if (b.shared_bytes + bytes > kSharedLimit)
    fail("static shared memory %zu + %zu bytes exceeds the %zu-byte limit", b.shared_bytes, bytes, kSharedLimit);
  void* p = ::operator new(bytes == 0 ? 1 : bytes, std::align_val_t(16));
  std::memset(p, 0xFF, bytes);
  b.shared[site] = {p, bytes};
  b.shared_bytes += bytes;
  return static_cast<T*>(p);
}

// ---- the thread pool: slot s of concurrent_blocks() runs blocks s, s + K, s + 2K, ... (numbered y fastest) with
// one OS thread per CUDA thread ----
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: its threads outlive static destruction
    return *pool;
  }

  void run(std::function<void()> body, dim3 grid, dim3 block) {
    const unsigned nblocks = grid.x * grid.y * grid.z;
    const int nthreads = static_cast<int>(block.x * block.y * block.z);
    const int slots = static_cast<int>(std::min<unsigned>(nblocks, static_cast<unsigned>(concurrent_blocks())));
    std::lock_guard<std::mutex> one_launch(m_);
    while (static_cast<int>(slots_.size()) < slots) slots_.emplace_back(new Slot());
    pending_.store(slots * nthreads);
    const int done_before = done_.load();
    for (int s = 0; s < slots; ++s) {
      Slot& sl = *slots_[s];
      std::lock_guard<std::mutex> lk(sl.m);
      sl.next = s;
      sl.arrived = 0;
      sl.block.reset(nthreads);
      sl.job = Job{body, grid, block, nblocks, nthreads, slots};
      while (static_cast<int>(sl.workers) < nthreads) spawn(s, sl.workers++, sl.launch.load());
      sl.launch.advance();  // wakes this slot's workers only
    }
    while (!done_.wait_change(done_before, std::chrono::seconds(3600))) {
    }
  }

 private:
  struct Job {
    std::function<void()> body;
    dim3 grid, block;
    unsigned nblocks = 0;
    int nthreads = 0, slots = 0;
  };
  struct Slot {
    std::mutex m;  // guards everything below but the Generations
    Generation launch;     // advanced when the slot has a new job
    Generation block_done;  // the slot's barrier between blocks
    int arrived = 0;
    int gen = 0;
    unsigned next = 0;  // block this slot runs next
    unsigned workers = 0;
    Job job;
    Block block;
  };
  struct Start {
    Pool* pool;
    int slot, tid, seen;
  };

  void spawn(int s, int t, int seen) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 4u << 20);
    auto* arg = new Start{this, s, t, seen};
    pthread_t th;
    if (pthread_create(&th, &attr, &Pool::entry, arg) != 0) {
      std::fprintf(stderr, "cuda_emu: cannot create thread %d of slot %d\n", t, s);
      std::_Exit(67);
    }
    pthread_detach(th);
    pthread_attr_destroy(&attr);
  }
  static void* entry(void* p) {
    const Start st = *static_cast<Start*>(p);
    delete static_cast<Start*>(p);
    st.pool->work(st.slot, st.tid, st.seen);
    return nullptr;
  }

  // All nthreads of the slot meet here; the last one runs `last` (under the slot's lock) before releasing them.
  template <typename F>
  void slot_barrier(Slot& sl, int nthreads, F last) {
    int my;
    {
      std::lock_guard<std::mutex> lk(sl.m);
      my = sl.gen;
      if (++sl.arrived == nthreads) {
        last();
        sl.arrived = 0;
        ++sl.gen;
        sl.block_done.advance();
        return;
      }
    }
    while (!sl.block_done.wait_change(my, std::chrono::seconds(3600))) {
    }
  }

  void work(int s, int t, int seen) {
    Slot& sl = *slots_[s];
    for (;;) {
      while (!sl.launch.wait_change(seen, std::chrono::seconds(3600))) {
      }
      Job job;
      {
        std::lock_guard<std::mutex> lk(sl.m);
        seen = sl.launch.load();
        if (t >= sl.job.nthreads) continue;  // not part of this launch
        job = sl.job;
      }
      const dim3 g = job.grid, bd = job.block;
      for (;;) {
        unsigned b = 0;
        {
          std::lock_guard<std::mutex> lk(sl.m);
          b = sl.next;
        }
        if (b >= job.nblocks) break;
        gridDim = g;
        blockDim = bd;
        // Blocks in y-fastest order (CUDA promises no order): the blocks of one column of a grid (the splits of a
        // reduction's channel, which meet in its last-block merge) run at the same time in different slots.
        blockIdx = uint3{(b / g.y) % g.x, b % g.y, b / (g.x * g.y)};
        threadIdx = uint3{t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
        tl_block = &sl.block;
        tl_tid = t;
        job.body();
        thread_exit();
        slot_barrier(sl, job.nthreads, [&] {  // the block is done: its arena goes, the slot takes its next block
          sl.block.free_shared();
          sl.next += job.slots;
          if (sl.next < job.nblocks) sl.block.reset(job.nthreads);
        });
      }
      job.body = nullptr;
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) done_.advance();
    }
  }

  std::mutex m_;  // one launch at a time
  std::atomic<int> pending_{0};
  Generation done_;
  std::vector<std::unique_ptr<Slot>> slots_;
};

template <typename... P>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t, std::type_identity_t<P>... args) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  const bool ok = grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535u &&
                  grid.z <= 65535u && block.x >= 1 && block.y >= 1 && block.z >= 1 && block.x <= 1024 &&
                  block.y <= 1024 && block.z <= 64 && threads <= 1024;
  if (!ok) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  ++launches;
  {
    std::lock_guard<std::mutex> lk(merge_mutex);
    merge_loads.clear();
    ++launch_id;
  }
  Pool::get().run([=] { kernel(args...); }, grid, block);
}

// ---- float16 / bfloat16 storage types with round-to-nearest-even conversions (as c10::Half / BFloat16) ----
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to infinity
  if (ax < 0x38800000u) {                                              // half subnormal: exact scaling, then RNE
    float a;
    std::memcpy(&a, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.0f)));
  }
  const uint32_t r = ax + 0xc8000fffu + ((ax >> 13) & 1u);  // rebias exponent, round to nearest even
  return static_cast<uint16_t>(sign | (r >> 13));
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(mant) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  const uint32_t bits = sign | (e == 31 ? (0x7f800000u | (mant << 13)) : (((e + 112u) << 23) | (mant << 13)));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

}  // namespace cuda_emu

struct __half {
  uint16_t bits;
  __half() = default;
  __half(float f) : bits(cuda_emu::float_to_half_bits(f)) {}
  operator float() const { return cuda_emu::half_bits_to_float(bits); }
};
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : bits(cuda_emu::float_to_bf16_bits(f)) {}
  operator float() const { return cuda_emu::bf16_bits_to_float(bits); }
};
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }

// ---- runtime API and intrinsics ----
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::last_error;
  cuda_emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = cuda_emu::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int dev) {
  if (dev < 0 || dev > 1) return cudaErrorInvalidValue;
  cuda_emu::current_device = dev;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (attr != cudaDevAttrMultiProcessorCount || dev < 0 || dev > 1) return cudaErrorInvalidValue;
  *value = cuda_emu::sm_count(dev);
  return cudaSuccess;
}

inline void __syncthreads(int line = __builtin_LINE()) { cuda_emu::syncthreads(line); }
inline void __syncwarp(uint32_t mask = 0xffffffffu, int line = __builtin_LINE()) {
  const char none = 0;
  char sink;
  cuda_emu::warp_exchange(mask, &none, &sink, 1, [](int l) { return l; }, "__syncwarp", line);
}
template <typename T>
inline T __shfl_down_sync(uint32_t mask, T v, unsigned delta, int line = __builtin_LINE()) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>);
  T out;
  cuda_emu::warp_exchange(mask, &v, &out, sizeof(T), [&](int l) { return l + static_cast<int>(delta); },
                          "__shfl_down_sync", line);
  return out;
}
template <typename T>
inline T __shfl_up_sync(uint32_t mask, T v, unsigned delta, int line = __builtin_LINE()) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>);
  T out;
  cuda_emu::warp_exchange(mask, &v, &out, sizeof(T), [&](int l) { return l - static_cast<int>(delta); },
                          "__shfl_up_sync", line);
  return out;
}
template <typename T>
inline T __shfl_xor_sync(uint32_t mask, T v, int lane_mask, int line = __builtin_LINE()) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>);
  T out;
  cuda_emu::warp_exchange(mask, &v, &out, sizeof(T), [&](int l) { return l ^ lane_mask; }, "__shfl_xor_sync", line);
  return out;
}

// Device-wide atomics and fences as seq_cst std::atomic operations: the happens-before they give is what TSan
// checks (the last-block merge of reduce.cuh: a block's partials, its fence and barrier, then its atomicAdd).
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v, std::memory_order_seq_cst);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
using std::fma;

// csrc/philox.h counts its block generations through this hook.
#define BNFUSED_PHILOX_CALL_HOOK() (::cuda_emu::philox_calls.fetch_add(1, std::memory_order_relaxed))
