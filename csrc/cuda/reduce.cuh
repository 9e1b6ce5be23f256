// Per-channel reductions over (N, S) for both layouts, shared by batch_stats (Welford) and backward_reduce
// (sums of g and g*(x - mean)). An Op supplies the accumulator and what one unit of <= 8 elements adds to it;
// the drivers here do the loading, the dropout multipliers, the block reduction and the two-stage grid
// reduction.
//
// One launch, no float atomics, deterministic: when a channel is split over gridDim.y blocks, each block writes
// its partial accumulator into a workspace and counts its arrival on its column's counter (one integer
// atomicAdd); the block that arrives last merges the column's partials in double precision in a fixed order (so
// the result does not depend on the arrival order; merge_partials) and runs the Op's finish, then resets the
// counter to 0 for the next call. When one block row covers the whole batch, the block finishes its channels
// itself.
//
// ChannelsFirst (N, C, S): grid.x = channel, grid.y = split of the channel's N*S elements. A row (n, c) is
//   cut at global multiples of 8 into units (one Philox block each, 128-bit loads when whole); a block of
//   tx x ty threads walks tiles of tx units of one row, ty tiles at a time (tx = 1 .. 256 follows S, so
//   small spatial sizes still fill the block).
// ChannelsLast (N, S, C): column reduction. Threads along x take V adjacent channels (vector loads along C),
//   threads along y take units of 8 rows (s0 .. s0+7 of one sample); per-thread accumulators are merged
//   over y in shared memory. Its splits are capped so the last block's merge stays about as long as its reduction
//   (plan_reduction).
#pragma once
#include <cmath>

#include "../activation.h"
#include "common.cuh"

namespace bnfused::cuda {

template <typename T>
struct SumPair {
  T g;   // sum of g
  T gx;  // sum of g * (x - mean)
};

// ---- accumulator algebra (Welford triples and sum pairs) ----

// Chan et al.'s merge; an empty side returns the other unchanged (no 0 * inf from the delta term).
template <typename T>
__device__ __forceinline__ Welford<T> combine(const Welford<T>& a, const Welford<T>& b) {
  if (b.count == T(0)) return a;
  if (a.count == T(0)) return b;
  return welford_merge(a, b);
}
template <typename T>
__device__ __forceinline__ SumPair<T> combine(const SumPair<T>& a, const SumPair<T>& b) {
  return SumPair<T>{a.g + b.g, a.gx + b.gx};
}

template <typename T>
__device__ __forceinline__ Welford<T> shfl_down(const Welford<T>& a, int delta) {
  return Welford<T>{__shfl_down_sync(0xffffffffu, a.count, delta), __shfl_down_sync(0xffffffffu, a.mean, delta),
                    __shfl_down_sync(0xffffffffu, a.m2, delta)};
}
template <typename T>
__device__ __forceinline__ SumPair<T> shfl_down(const SumPair<T>& a, int delta) {
  return SumPair<T>{__shfl_down_sync(0xffffffffu, a.g, delta), __shfl_down_sync(0xffffffffu, a.gx, delta)};
}

// Workspace: component k of entry i at ws[k * plane + i]; entry c * stride + s holds split s of channel c, stride =
// splits rounded up to 8 (a channel's partials contiguous and 32-byte aligned, so the merge reads them in whole
// sectors), plane = stride * C.
__host__ __device__ __forceinline__ int64_t partial_stride(int64_t splits) { return (splits + 7) / 8 * 8; }

template <typename S, typename T>
__device__ __forceinline__ void ws_store(S* ws, int64_t plane, int64_t i, const Welford<T>& a) {
  ws[i] = static_cast<S>(a.count);
  ws[plane + i] = static_cast<S>(a.mean);
  ws[2 * plane + i] = static_cast<S>(a.m2);
}
template <typename S, typename T>
__device__ __forceinline__ void ws_store(S* ws, int64_t plane, int64_t i, const SumPair<T>& a) {
  ws[i] = static_cast<S>(a.g);
  ws[plane + i] = static_cast<S>(a.gx);
}
// `at`: which load of the merge this is, the same in every lane of a warp that takes part (the emulation's count of
// the sectors a warp's load touches).
template <typename T, typename S>
__device__ __forceinline__ void ws_load(const S* ws, int64_t plane, int64_t i, Welford<T>& a, int64_t at) {
  BNFUSED_COUNT_MERGE_LOAD(ws + i, 3 * at);
  BNFUSED_COUNT_MERGE_LOAD(ws + plane + i, 3 * at + 1);
  BNFUSED_COUNT_MERGE_LOAD(ws + 2 * plane + i, 3 * at + 2);
  a = Welford<T>{static_cast<T>(ws[i]), static_cast<T>(ws[plane + i]), static_cast<T>(ws[2 * plane + i])};
}
template <typename T, typename S>
__device__ __forceinline__ void ws_load(const S* ws, int64_t plane, int64_t i, SumPair<T>& a, int64_t at) {
  BNFUSED_COUNT_MERGE_LOAD(ws + i, 2 * at);
  BNFUSED_COUNT_MERGE_LOAD(ws + plane + i, 2 * at + 1);
  a = SumPair<T>{static_cast<T>(ws[i]), static_cast<T>(ws[plane + i])};
}

template <typename Acc>
__device__ __forceinline__ Acc warp_reduce(Acc a) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) a = combine(a, shfl_down(a, d));
  return a;
}

// Reduction of one accumulator per thread over the whole block (blockDim.x * blockDim.y a multiple of 32,
// at most kThreads); the result is valid in thread (0, 0).
template <typename Acc>
__device__ __forceinline__ Acc block_reduce(Acc a, const Acc& identity) {
  BNFUSED_SHARED(Acc, partial, kThreads / 32);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nwarps = (blockDim.x * blockDim.y) >> 5;
  a = warp_reduce(a);
  if ((tid & 31) == 0) partial[tid >> 5] = a;
  __syncthreads();
  if (tid < 32) {
    a = tid < nwarps ? partial[tid] : identity;
    a = warp_reduce(a);
  }
  return a;
}

// ---- the two ops ----

// Storage dtype of a running statistic (running_mean / running_var keep their own dtype and strides).
enum class StatDtype : int { Float, Double, Half, BFloat16 };

__device__ __forceinline__ double load_stat(const void* p, int64_t i, StatDtype t) {
  switch (t) {
    case StatDtype::Float: return static_cast<const float*>(p)[i];
    case StatDtype::Double: return static_cast<const double*>(p)[i];
    case StatDtype::Half: return __half2float(static_cast<const __half*>(p)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}
// Rounded as the CPU update does (double -> float -> half / bfloat16, each to nearest).
__device__ __forceinline__ void store_stat(void* p, int64_t i, StatDtype t, double v) {
  switch (t) {
    case StatDtype::Float: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case StatDtype::Double: static_cast<double*>(p)[i] = v; break;
    case StatDtype::Half: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
    default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
  }
}

// running = momentum * batch + (1 - momentum) * running in double, running_var with the unbiased variance
// (nn.BatchNorm's update, as the CPU kernels compute it). mean == nullptr: no running statistics.
struct RunningStats {
  void* mean = nullptr;
  void* var = nullptr;
  int64_t mean_stride = 1, var_stride = 1;
  StatDtype mean_dtype = StatDtype::Float, var_dtype = StatDtype::Float;
  double momentum = 0;
  double unbias = 1;  // count / (count - 1)
};


// Mean and biased variance (Welford). A unit's 8 values are summarised with a corrected two-pass
// (mean, then deviations with the first-order correction) and merged into the thread's running triple.
template <typename acc_t>
struct StatsOp {
  static constexpr bool kGrad = false;  // needs neither grad_out nor the dropout mask
  static constexpr bool kTranscendental = false;
  static constexpr int kComponents = 3;
  template <typename T>
  using Acc = Welford<T>;
  struct Chan {};

  // What finish() writes: always the mean; the biased variance (batch_stats) and/or rstd = 1 / sqrt(var + eps)
  // with the running statistics updated (batch_stats_update), so a training forward needs no kernels between
  // the statistics and the apply pass.
  acc_t* mean_out;
  acc_t* var_out;             // or nullptr
  acc_t* rstd_out = nullptr;  // or nullptr
  acc_t eps = 0;
  RunningStats running = {};

  __device__ __forceinline__ Chan channel(int64_t) const { return Chan{}; }

  template <typename T>
  __device__ __forceinline__ static Acc<T> identity() {
    return Acc<T>{T(0), T(0), T(0)};
  }

  __device__ __forceinline__ void add(Acc<acc_t>& acc, const Chan&, const acc_t (&x)[kUnit], const acc_t (&)[kUnit],
                                      const acc_t (&)[kUnit], int lo, int hi) const {
    acc_t sum = 0;
#pragma unroll
    for (int j = 0; j < kUnit; ++j)
      if (j >= lo && j < hi) sum += x[j];
    const acc_t cnt = static_cast<acc_t>(hi - lo);
    const acc_t m = sum / cnt;
    acc_t d1 = 0, d2 = 0;
#pragma unroll
    for (int j = 0; j < kUnit; ++j)
      if (j >= lo && j < hi) {
        const acc_t d = x[j] - m;
        d1 += d;
        d2 += d * d;
      }
    const acc_t corr = d1 / cnt;
    const acc_t m2 = d2 - d1 * corr;  // >= 0 up to rounding; NaN stays NaN
    // A +-inf element makes every deviation NaN (inf - inf): the unit's mean is then the plain sum / cnt
    // (+-inf, as torch.mean gives), its m2 stays NaN.
    const acc_t corrected = m + corr;
    const acc_t unit_mean = (corrected - corrected == acc_t(0)) ? corrected : m;
    acc = combine(acc, Acc<acc_t>{cnt, unit_mean, m2 < acc_t(0) ? acc_t(0) : m2});
  }

  template <typename T>
  __device__ __forceinline__ void finish(int64_t c, const Acc<T>& a) const {
    const acc_t var = static_cast<acc_t>(a.m2 / a.count);
    mean_out[c] = static_cast<acc_t>(a.mean);
    if (var_out) var_out[c] = var;
    // sqrt in double rounded once to float is sqrtf's correctly rounded result; the CPU computes the same.
    if (rstd_out) rstd_out[c] = acc_t(1) / static_cast<acc_t>(sqrt(static_cast<double>(var + eps)));
    if (running.mean) {
      const double mom = running.momentum;
      const int64_t im = c * running.mean_stride, iv = c * running.var_stride;
      const double unbiased = static_cast<double>(a.m2) / static_cast<double>(a.count) * running.unbias;
      store_stat(running.mean, im, running.mean_dtype,
                 mom * static_cast<double>(a.mean) + (1.0 - mom) * load_stat(running.mean, im, running.mean_dtype));
      store_stat(running.var, iv, running.var_dtype,
                 mom * unbiased + (1.0 - mom) * load_stat(running.var, iv, running.var_dtype));
    }
  }
};

// The gate of the backward sums: how an element's g comes from dy, its multiplier and its pre-activation z.
// ActGate: the multiplier is the dropout's, the activation's derivative at z (recomputed from x as in the forward)
// applied to dy * mult, the CPU kernels' order (csrc/activation.h's act_backward). PassBitsGate: the multiplier holds
// the whole gate already (the block tail's pass bits); z is never computed.
template <typename acc_t, Act kAct>
struct ActGate {
  static constexpr bool kNeedsPreact = kAct != Act::Identity;
  static constexpr bool kTranscendental = act_transcendental<kAct>();
  ActArgs<acc_t> args;
  __device__ __forceinline__ acc_t grad(acc_t dy, acc_t z, acc_t mult) const {
    if constexpr (kNeedsPreact)
      return act_backward<kAct>(dy * mult, z, args);
    else
      return dy * mult;
  }
};

struct PassBitsGate {
  static constexpr bool kNeedsPreact = false;
  static constexpr bool kTranscendental = false;
  template <typename acc_t>
  __device__ __forceinline__ acc_t grad(acc_t dy, acc_t /*z*/, acc_t mult) const {
    return dy * mult;
  }
};

// Sums of g and g * xhat with g = gate.grad(grad_out, z, mult), z recomputed exactly as in the forward when the
// gate reads it. g*(x - mean) is accumulated and multiplied by rstd once at the end. prm's weight and bias are
// read only for z.
template <typename acc_t, typename Gate = ActGate<acc_t, Act::ReLU>>
struct GradSumsOp {
  static constexpr bool kGrad = true;
  static constexpr bool kTranscendental = Gate::kTranscendental;
  static constexpr int kComponents = 2;
  template <typename T>
  using Acc = SumPair<T>;
  struct Chan {
    ChannelAffine<acc_t> ab;
    acc_t mean;
  };

  ChannelParams<acc_t> prm;
  acc_t* sum_g;
  acc_t* sum_g_xhat;
  Gate gate = {};

  __device__ __forceinline__ Chan channel(int64_t c) const {
    if constexpr (Gate::kNeedsPreact) return Chan{prm.affine(c), prm.mean[c]};
    return Chan{ChannelAffine<acc_t>{acc_t(0), acc_t(0)}, prm.mean[c]};
  }

  __device__ __forceinline__ acc_t grad(const Chan& ch, acc_t x, acc_t dy, acc_t mult) const {
    return gate.grad(dy, Gate::kNeedsPreact ? bn_preact(x, ch.ab) : acc_t(0), mult);
  }

  template <typename T>
  __device__ __forceinline__ static Acc<T> identity() {
    return Acc<T>{T(0), T(0)};
  }

  __device__ __forceinline__ void add(Acc<acc_t>& acc, const Chan& ch, const acc_t (&x)[kUnit],
                                      const acc_t (&dy)[kUnit], const acc_t (&mult)[kUnit], int lo, int hi) const {
    acc_t sg = 0, sgx = 0;
#pragma unroll
    for (int j = 0; j < kUnit; ++j)
      if (j >= lo && j < hi) {
        const acc_t g = grad(ch, x[j], dy[j], mult[j]);
        sg += g;
        sgx += g * (x[j] - ch.mean);
      }
    acc.g += sg;
    acc.gx += sgx;
  }

  __device__ __forceinline__ void add_element(Acc<acc_t>& acc, const Chan& ch, acc_t x, acc_t dy, acc_t mult) const {
    const acc_t g = grad(ch, x, dy, mult);
    acc.g += g;
    acc.gx += g * (x - ch.mean);
  }

  template <typename T>
  __device__ __forceinline__ void finish(int64_t c, const Acc<T>& a) const {
    sum_g[c] = static_cast<acc_t>(a.g);
    sum_g_xhat[c] = static_cast<acc_t>(a.gx * static_cast<T>(prm.rstd[c]));
  }
};

// The block tail's backward sums: g = dy * mult, the mask being the pass bits.
template <typename acc_t>
using AddGradSumsOp = GradSumsOp<acc_t, PassBitsGate>;

// ---- the last-block merge ----

// Every thread of the block calls this after the block stored its partials. True in the block that arrived last
// of the gridDim.y blocks of its column (counter = that column's arrival counter, 0 on entry); that block
// resets the counter. PyTorch's reduction uses the same fences: each writer's __threadfence makes its partials
// visible device-wide before the barrier and thread 0's atomicAdd publish them; the last block's fence orders its
// reads of the partials after the atomic.
__device__ __forceinline__ bool arrived_last(unsigned* counter) {
  BNFUSED_SHARED(unsigned, last, 1);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const unsigned before = atomicAdd(counter, 1u);
    last[0] = before == gridDim.y - 1;
    if (last[0]) *counter = 0;  // every block of the column has counted: no one else touches it in this launch
  }
  __syncthreads();
  const bool is_last = last[0] != 0;
  if (is_last) __threadfence();
  return is_last;
}

// Merges the gridDim.y partials of channels [c_begin, c_end) in double and finishes them. A channel's partials are
// contiguous (split-fastest) and read by a team of L threads, thread r of the team taking partials r, r + L, ...,
// then the team's tree: a fixed order, whichever block arrived last. One channel (the channels-first reduction)
// with more than 128 partials: the whole block is its team (block_reduce; its chain splits / 256 + 10 steps against
// a warp's splits / 32 + 5). Else L is the largest power of two <= 32 (a warp) that gives every channel of the
// block a team, but at least 8, so that a team's loads fill whole 32-byte sectors; rounds of threads / L channels.
template <typename acc_t, class Op>
__device__ __forceinline__ void merge_partials(const Op& op, const acc_t* ws, int64_t C, int64_t c_begin,
                                               int64_t c_end) {
  using Acc = typename Op::template Acc<double>;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int threads = blockDim.x * blockDim.y;
  const int splits = static_cast<int>(gridDim.y);
  const int64_t stride = partial_stride(splits), plane = stride * C;
  const int64_t nch = c_end - c_begin;
  if (nch == 1 && splits > 128) {
    Acc a = Op::template identity<double>();
    for (int s = tid; s < splits; s += threads) {
      Acc b;
      ws_load(ws, plane, c_begin * stride + s, b, s / threads);
      a = combine(a, b);
      BNFUSED_COUNT_MERGE_STEPS(1);
    }
    a = block_reduce(a, Op::template identity<double>());
    BNFUSED_COUNT_MERGE_STEPS(10);  // two warp trees
    if (tid == 0) op.finish(c_begin, a);
    return;
  }
  int L = 32;
  while (L > 8 && nch * L > threads) L >>= 1;
  const int teams = threads / L, r = tid & (L - 1);
  for (int64_t base = c_begin; base < c_end; base += teams) {  // block-uniform: every lane takes part in the tree
    const int64_t c = base + tid / L;
    Acc a = Op::template identity<double>();
    if (c < c_end)
      for (int s = r; s < splits; s += L) {
        Acc b;
        ws_load(ws, plane, c * stride + s, b, (base - c_begin) / teams * stride + s / L);
        a = combine(a, b);
        BNFUSED_COUNT_MERGE_STEPS(1);
      }
    for (int d = L / 2; d > 0; d >>= 1) {  // lane r of a team takes r + d of the same team where it matters
      a = combine(a, shfl_down(a, d));
      BNFUSED_COUNT_MERGE_STEPS(1);
    }
    if (r == 0 && c < c_end) op.finish(c, a);
  }
}

// ---- kernels ----

// Units are cut sh elements before the Philox blocks (unit b: elements 8b - sh .. 8b - sh + 7), so with the
// pointers sh elements past a 16-byte boundary every whole unit is aligned; clipped to the row. With sh > 0 a
// unit's mask takes two Philox calls (the tiles of small rows leave no warp-wide neighbour to share them with,
// as the flat apply kernel does), traded for vector loads of x and dy.
template <typename scalar_t, typename acc_t, class Op, bool kDropout>
__global__ void __launch_bounds__(kThreads)
    reduce_cf_kernel(const Op op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, int64_t C,
                     int64_t S, int64_t tiles, int64_t chunks_per_row, int sh, bool vec, Dropout<acc_t> drop,
                     acc_t* __restrict__ ws, unsigned* __restrict__ counters) {
  using Acc = typename Op::template Acc<acc_t>;
  const int64_t c = blockIdx.x;
  const int tx = blockDim.x;
  PhiloxKey key{0, 0};
  if constexpr (kDropout)
    if (drop.bits == nullptr) key = load_key(drop.key);
  const auto ch = op.channel(c);
  Acc acc = Op::template identity<acc_t>();

  for (int64_t t = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; t < tiles;
       t += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    int64_t n, chunk;
    divmod(t, chunks_per_row, n, chunk);
    const int64_t row = (n * C + c) * S;  // logical index == memory offset of (n, c, 0)
    const int64_t blk = ((row + sh) >> 3) + chunk * tx + threadIdx.x;
    const int64_t b0 = blk * kUnit - sh;  // element of lane 0
    const int64_t lo_off = row > b0 ? row : b0;
    const int64_t hi_off = (row + S) < (b0 + kUnit) ? (row + S) : (b0 + kUnit);
    if (lo_off >= hi_off) continue;
    const int lo = static_cast<int>(lo_off - b0), hi = static_cast<int>(hi_off - b0);
    acc_t xv[kUnit], dv[kUnit], mult[kUnit];
    const bool whole = vec && lo == 0 && hi == kUnit;
    if (whole)
      load8(x + b0, xv);
    else
      load_lanes(x + lo_off, lo, hi, xv);
    if constexpr (Op::kGrad) {
      if (whole)
        load8(dy + b0, dv);
      else
        load_lanes(dy + lo_off, lo, hi, dv);
      uint32_t keep = 0xFFu;
      if constexpr (kDropout) {
        if (drop.bits != nullptr)  // the mask from bits in memory order (== logical order here)
          keep = run_bits(drop.bits, lo_off, hi - lo) << lo;
        else if (sh == 0)
          keep = run_keep_bits<true>(key, static_cast<uint64_t>(b0), kUnit, drop.threshold);
        else
          keep = run_keep_bits<false>(key, static_cast<uint64_t>(lo_off), hi - lo, drop.threshold) << lo;
      }
      bits_mults(keep, kDropout ? drop.scale : acc_t(1), mult);
    }
    op.add(acc, ch, xv, dv, mult, lo, hi);
  }

  acc = block_reduce(acc, Op::template identity<acc_t>());
  const bool lead = threadIdx.x == 0 && threadIdx.y == 0;
  if (gridDim.y == 1) {
    if (lead) op.finish(c, acc);
    return;
  }
  if (lead) {
    const int64_t stride = partial_stride(gridDim.y);
    ws_store(ws, stride * C, c * stride + blockIdx.y, acc);
  }
  if (arrived_last(counters + blockIdx.x)) merge_partials(op, ws, C, c, c + 1);
}

// Blocks of kThreads per SM a reduce_cl_kernel variant is compiled for (__launch_bounds__; ptxas caps its registers
// at 65536 / (256 * blocks)): the gradient variants with 8 channels a thread (2-d input) and those with dropout
// through Philox carries (S % 8 != 0), 3 (double 2-d: 2), which they reach without spills (make cuda-check's table);
// with a transcendental activation 2 (double: no bound).
template <typename acc_t, class Op, int V, bool kDropout, bool kAligned8>
constexpr int reduce_cl_min_blocks() {
  if constexpr (!Op::kGrad || !(V == kUnit || (kDropout && !kAligned8))) return 1;
  else if constexpr (Op::kTranscendental) return sizeof(acc_t) == 8 ? 1 : 2;  // the activation's math
  else if constexpr (V == kUnit) return sizeof(acc_t) == 8 ? 2 : 3;
  else return 3;
}

// Channel vectors as in apply.cuh's tile kernel: vector cv holds channels cv*V - shc .. +V-1 (those in [0, C)),
// whole vectors aligned, the first and last of a row partial; loaded W channels per access (W = V, or 1 when
// unaligned; 2-d input with a gradient takes V = 8 channels, one Philox block, per thread). Each thread takes a
// contiguous range of items (units along s), so a channel's consecutive units share the Philox block between
// them (KeepCarry).
template <typename scalar_t, typename acc_t, class Op, int V, int W, bool kDropout, bool kAligned8>
__global__ void __launch_bounds__(kThreads, reduce_cl_min_blocks<acc_t, Op, V, kDropout, kAligned8>())
    reduce_cl_kernel(const Op op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, int64_t C,
                     int64_t S, int64_t SG, int64_t items, int64_t CV, int shc, Dropout<acc_t> drop,
                     acc_t* __restrict__ ws, unsigned* __restrict__ counters) {
  using Acc = typename Op::template Acc<acc_t>;
  BNFUSED_SHARED(Acc, sh, kThreads * V);
  const int tx = blockDim.x, ty = blockDim.y;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * tx + threadIdx.x;
  const int64_t c0 = cv * V - shc;
  const bool active = cv < CV;
  const int vlo = c0 < 0 ? static_cast<int>(-c0) : 0;
  const int vhi = !active ? 0 : ((C - c0) < V ? static_cast<int>(C - c0) : V);
  PhiloxKey key{0, 0};
  if constexpr (kDropout)
    if (drop.bits == nullptr) key = load_key(drop.key);

  // The per-channel constants: the gradient ops' in shared memory, one copy per channel of the block (read per
  // element; 3 * V registers fewer), Stats' (empty) in registers. Lanes outside [vlo, vhi) stay unused.
  typename Op::Chan ch[Op::kGrad ? 1 : V] = {};
  BNFUSED_SHARED(typename Op::Chan, chs, Op::kGrad ? 32 * V : 1);
  const int cb = threadIdx.x * V;  // this thread's first entry of chs
  Acc acc[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    acc[v] = Op::template identity<acc_t>();
    if constexpr (Op::kGrad) {
      if (threadIdx.y == 0 && v >= vlo && v < vhi) chs[cb + v] = op.channel(c0 + v);
    } else {
      if (v >= vlo && v < vhi) ch[v] = op.channel(c0 + v);
    }
  }
  if constexpr (Op::kGrad) __syncthreads();

  if (active) {
    [[maybe_unused]] KeepCarry carry[V == kUnit ? 1 : V];  // V == kUnit (2-d): row_carry alone
    [[maybe_unused]] KeepCarry& row_carry = carry[0];
    const int64_t threads_y = static_cast<int64_t>(gridDim.y) * ty;
    const int64_t per = (items + threads_y - 1) / threads_y;
    const int64_t t_begin = (static_cast<int64_t>(blockIdx.y) * ty + threadIdx.y) * per;
    const int64_t t_end = t_begin + per < items ? t_begin + per : items;
    for (int64_t t = t_begin; t < t_end; ++t) {
      int64_t n, sg;
      divmod(t, SG, n, sg);
      const int64_t s0 = sg * kUnit;
      const int rows = static_cast<int>((S - s0) < kUnit ? (S - s0) : kUnit);
      const int64_t base = (n * S + s0) * C + c0;
      if constexpr (Op::kGrad && V == kUnit) {
        // 2-d input (S == 1): an item is one row, channels c0 + vlo .. c0 + vhi - 1 of sample n, the logical run
        // n * C + c0 + vlo ...: its keep bits from one carry along the thread's rows (one Philox call a row, two
        // where it starts in a block the carry lacks).
        uint32_t keep = 0xFFu;
        if constexpr (kDropout) {
          if (drop.bits != nullptr)
            keep = run_bits(drop.bits, base + vlo, vhi - vlo) << vlo;
          else
            keep = row_carry.run(key, static_cast<uint64_t>(base + vlo), vhi - vlo, drop.threshold) << vlo;
        }
        acc_t a[V], d[V];
        load_vec<V, W>(x, base, vlo, vhi, a);
        load_vec<V, W>(dy, base, vlo, vhi, d);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (v < vlo || v >= vhi) continue;
          const acc_t mult = kDropout ? (((keep >> v) & 1u) ? drop.scale : acc_t(0)) : acc_t(1);
          op.add_element(acc[v], chs[cb + v], a[v], d[v], mult);
        }
      } else if constexpr (Op::kGrad) {
        // Streams row by row: keep bits first, then V channels of x and dy per row.
        uint32_t keep[V] = {};
        if constexpr (kDropout) {
          if (drop.bits != nullptr) {
#pragma unroll
            for (int v = 0; v < V; ++v)
              if (v >= vlo && v < vhi) keep[v] = column_bits(drop.bits, base + v, C, rows);
          } else {
            unit_keep_bits<V, kAligned8>(key, drop.threshold, n, C, c0, S, s0, rows, vlo, vhi, carry, keep);
          }
        }
#pragma unroll
        for (int j = 0; j < kUnit; ++j) {
          if (j < rows) {
            acc_t a[V], d[V];
            load_vec<V, W>(x, base + j * C, vlo, vhi, a);
            load_vec<V, W>(dy, base + j * C, vlo, vhi, d);
#pragma unroll
            for (int v = 0; v < V; ++v) {
              if (v < vlo || v >= vhi) continue;
              const acc_t mult = kDropout ? (((keep[v] >> j) & 1u) ? drop.scale : acc_t(0)) : acc_t(1);
              op.add_element(acc[v], chs[cb + v], a[v], d[v], mult);
            }
          }
        }
      } else {
        // The unit's values per channel (for the two-pass summary of Welford).
        acc_t xv[V][kUnit];
#pragma unroll
        for (int j = 0; j < kUnit; ++j) {
          acc_t a[V] = {};
          if (j < rows) load_vec<V, W>(x, base + j * C, vlo, vhi, a);
#pragma unroll
          for (int v = 0; v < V; ++v) xv[v][j] = a[v];
        }
#pragma unroll
        for (int v = 0; v < V; ++v)
          if (v >= vlo && v < vhi) op.add(acc[v], ch[v], xv[v], xv[v], xv[v], 0, rows);
      }
    }
  }

  // Merge over y in shared memory: entry (y, x, v) at ((y * tx) + x) * V + v.
  const int me = (threadIdx.y * tx + threadIdx.x) * V;
#pragma unroll
  for (int v = 0; v < V; ++v) sh[me + v] = acc[v];
  for (int stride = ty / 2; stride > 0; stride >>= 1) {
    __syncthreads();
    if (threadIdx.y < stride) {
#pragma unroll
      for (int v = 0; v < V; ++v) sh[me + v] = combine(sh[me + v], sh[me + stride * tx * V + v]);
    }
  }
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (v < vlo || v >= vhi) continue;
      const Acc a = sh[me + v];
      if (gridDim.y == 1)
        op.finish(c0 + v, a);
      else
        ws_store(ws, partial_stride(gridDim.y) * C, (c0 + v) * partial_stride(gridDim.y) + blockIdx.y, a);
    }
  }
  if (gridDim.y == 1) return;
  if (arrived_last(counters + blockIdx.x)) {  // the channels of this column of blocks
    const int64_t c_begin = static_cast<int64_t>(blockIdx.x) * tx * V - shc;
    const int64_t c_end = c_begin + tx * V;
    merge_partials(op, ws, C, c_begin < 0 ? 0 : c_begin, c_end < C ? c_end : C);
  }
}

// ---- host driver ----

// The launch shape of a reduction: the grid and block and `splits`, the partials per channel (splits > 1: a
// workspace of workspace_elems() acc_t and counter_elems() arrival counters).
struct ReducePlan {
  dim3 grid;
  dim3 block;
  int64_t splits = 1;
  int64_t tiles = 0, chunks_per_row = 0;  // ChannelsFirst
  int64_t SG = 0, items = 0, CV = 0;      // ChannelsLast
  bool vec = false;                       // ChannelsFirst: 128-bit loads; ChannelsLast: V = kVmax
  int shift = 0;  // the pointers' shared misalignment (elements): units / channel vectors are cut to align
  int64_t C = 0;
  int components = 0;
  int64_t workspace_elems() const { return splits > 1 ? components * partial_stride(splits) * C : 0; }
  int64_t counter_elems() const { return splits > 1 ? grid.x : 0; }
};

// Channels per thread of the channels_last reduction: one vector (kVmax, or 1 when unaligned), except for 2-d
// input with a gradient: 8, so a thread's channels of a row are one Philox block (two when C % 8 != 0), where
// one vector or one channel would make a call per 4 elements or per element.
template <typename scalar_t, class Op>
inline int channels_per_thread(const Geometry& g, bool vec) {
  return (Op::kGrad && g.S == 1) ? kUnit : (vec ? (sizeof(scalar_t) >= 8 ? 2 : 4) : 1);
}

// Plans Op over x (and dy when Op::kGrad) in geometry g. N * S > 0 and C > 0; the caller checks
// C <= INT32_MAX (grid.x).
template <typename scalar_t, class Op>
ReducePlan plan_reduction(const Geometry& g, const scalar_t* x_ptr, const scalar_t* dy_ptr) {
  ReducePlan plan;
  plan.C = g.C;
  plan.components = Op::kComponents;
  const int64_t target = reduce_target_blocks();
  if (g.layout == Layout::ChannelsFirst) {
    const int k = shared_misalignment(16, x_ptr, dy_ptr);
    plan.vec = k >= 0;
    plan.shift = plan.vec ? k : 0;
    // Units per row: rows start on a unit boundary when S % 8 == 0 and the units are not shifted; else a row
    // of S elements starting anywhere spans at most this many units.
    const int64_t units =
        (g.S % kUnit == 0 && plan.shift == 0) ? g.S / kUnit : (g.S + kUnit - 2) / kUnit + 1;
    const int tx = std::min(kThreads, next_pow2(units));
    const int ty = kThreads / tx;
    plan.chunks_per_row = ceil_div(units, tx);
    plan.tiles = g.N * plan.chunks_per_row;
    plan.splits = std::min<int64_t>(ceil_div(target, g.C), ceil_div(plan.tiles, 2 * ty));
    plan.splits = std::clamp<int64_t>(plan.splits, 1, 65535);
    plan.grid = dim3(static_cast<unsigned>(g.C), static_cast<unsigned>(plan.splits));
    plan.block = dim3(tx, ty);
  } else {
    constexpr int kVmax = sizeof(scalar_t) >= 8 ? 2 : 4;
    const int k = shared_misalignment(kVmax * sizeof(scalar_t), x_ptr, dy_ptr);
    plan.vec = g.C % kVmax == 0 && k >= 0;
    plan.shift = plan.vec ? k : 0;
    plan.CV = ceil_div(g.C + plan.shift, channels_per_thread<scalar_t, Op>(g, plan.vec));
    const int64_t CV = plan.CV;
    const int tx = std::min(32, next_pow2(CV));
    const int ty = kThreads / tx;
    plan.SG = ceil_div(g.S, kUnit);
    plan.items = g.N * plan.SG;
    const int64_t gx = ceil_div(CV, tx);
    // At least 2 units per thread, or a strip of them (strip_units) when S % 8 != 0 and a mask may be needed.
    const int64_t per = (Op::kGrad && g.S > kUnit && g.S % kUnit != 0)
                            ? std::max<int64_t>(2, strip_units(g.N * plan.SG * CV, plan.SG))
                            : 2;
    plan.splits = std::min<int64_t>(ceil_div(target, gx), ceil_div(plan.items, per * ty));
    // The last block of a column merges its tx * V channels' partials, V * splits / ty per thread, after reducing
    // items * r / (splits * ty) rows per thread (r = min(S, 8) rows an item): no more partials than rows, splits <=
    // sqrt(items * r / V), unless that leaves fewer than 2 blocks per SM (sm_count() * 512 threads still cover the
    // memory latency, as strip_units counts).
    const int64_t V = channels_per_thread<scalar_t, Op>(g, plan.vec);
    const int64_t rows = std::min<int64_t>(g.S, kUnit);
    const int64_t balanced = static_cast<int64_t>(std::sqrt(static_cast<double>(plan.items * rows / V)));
    plan.splits = std::min(plan.splits, std::max(balanced, ceil_div(2 * static_cast<int64_t>(sm_count()), gx)));
    plan.splits = std::clamp<int64_t>(plan.splits, 1, 65535);
    plan.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(plan.splits));
    plan.block = dim3(tx, ty);
  }
  return plan;
}

// Runs Op as planned, one launch; drop == nullptr: no dropout (drop->bits: the mask from bits); ws:
// plan.workspace_elems() acc_t, counters: plan.counter_elems() zeros, left zero (each null when 0). Calls that
// may run at the same time (other streams) need their own counters. The Op's finish() writes the per-channel
// results.
template <typename scalar_t, typename acc_t, class Op>
void run_reduction(const Op& op, const ReducePlan& plan, const scalar_t* x_ptr, const scalar_t* dy_ptr,
                   const Geometry& g, const Dropout<acc_t>* drop, acc_t* ws_ptr, unsigned* counters,
                   cudaStream_t stream) {
  const Dropout<acc_t> d = drop ? *drop : Dropout<acc_t>{nullptr, 0u, acc_t(1)};
  const bool dropout = Op::kGrad && drop != nullptr;
  if (g.layout == Layout::ChannelsFirst) {
    auto run = [&](auto kernel) {
      launch(kernel, plan.grid, plan.block, stream, op, x_ptr, dy_ptr, g.C, g.S, plan.tiles, plan.chunks_per_row,
             plan.shift, plan.vec, d, ws_ptr, counters);
    };
    if (dropout)
      run(reduce_cf_kernel<scalar_t, acc_t, Op, true>);
    else
      run(reduce_cf_kernel<scalar_t, acc_t, Op, false>);
  } else {
    constexpr int kVmax = sizeof(scalar_t) >= 8 ? 2 : 4;
    auto run = [&](auto kernel) {
      launch(kernel, plan.grid, plan.block, stream, op, x_ptr, dy_ptr, g.C, g.S, plan.SG, plan.items, plan.CV,
             plan.shift, d, ws_ptr, counters);
    };
    const bool a8 = g.S % kUnit == 0;
    // V channels per thread, W per access.
    auto run_v = [&](auto v_const, auto w_const) {
      constexpr int V = decltype(v_const)::value, W = decltype(w_const)::value;
      if (!dropout)
        run(reduce_cl_kernel<scalar_t, acc_t, Op, V, W, false, true>);
      else if constexpr (V == kUnit)  // 2-d: S % 8 != 0
        run(reduce_cl_kernel<scalar_t, acc_t, Op, V, W, true, false>);
      else if (a8)
        run(reduce_cl_kernel<scalar_t, acc_t, Op, V, W, true, true>);
      else
        run(reduce_cl_kernel<scalar_t, acc_t, Op, V, W, true, false>);
    };
    using One = std::integral_constant<int, 1>;
    using Vmax = std::integral_constant<int, kVmax>;
    if constexpr (Op::kGrad) {
      using Eight = std::integral_constant<int, kUnit>;
      if (g.S == 1) {  // 2-d: S % 8 != 0, never a8
        if (plan.vec)
          run_v(Eight{}, Vmax{});
        else
          run_v(Eight{}, One{});
      } else if (plan.vec) {
        run_v(Vmax{}, Vmax{});
      } else {
        run_v(One{}, One{});
      }
    } else {
      if (plan.vec)
        run(reduce_cl_kernel<scalar_t, acc_t, Op, kVmax, kVmax, false, true>);
      else
        run(reduce_cl_kernel<scalar_t, acc_t, Op, 1, 1, false, true>);
    }
  }
}

}  // namespace bnfused::cuda
