// BN + residual add + activation (+ dropout) kernels, torch-free: the forward y = act(fma(x, a, b) + residual) * mult
// with its pass bits = keep AND act'(z) = 1 (1 bit per element in memory order, as the CPU kernels pack them; act one
// of the kinds whose derivative is 0 or 1, act_has_gate_bits: identity, ReLU, Hardtanh), and the backward with
// g = dy * pass * scale (the residual's gradient and the BN's upstream gradient) computed in registers from dy and
// the bits in both passes: the sums as an Op of reduce.cuh with the bits as its mask, and one elementwise pass
// writing g and dx. Host wrappers in add_relu.cu.
//
// The two elementwise kernels walk memory in units of 8 consecutive elements, one byte of pass bits each, so no
// byte is shared between threads (misaligned pointers: units cut k elements early, each byte still written by one
// thread, see add_relu_forward_kernel). ChannelsFirst (and 2-d input): a unit is one Philox block. ChannelsLast with
// S > 1: the unit's elements are 8 channels of one row, 8 logical indices (n*C + c)*S + s apart by S; with
// dropout and C % 8 == 0 the forward takes 8 such units (8 rows of the same 8 channels) per thread step, sharing
// one Philox call per channel between its 8 rows (the tile kernel below); with C % 8 != 0 a unit can span two
// rows and its mask takes one Philox call per element.
#pragma once
#include "reduce.cuh"

namespace bnfused::cuda {

// Channel of memory element m and its logical index, stepped element by element (no division per element).
struct UnitWalk {
  int64_t C, S;
  bool channels_last;
  int64_t n, s, c;  // current element

  __device__ __forceinline__ UnitWalk(int64_t m, int64_t C_, int64_t S_, bool cl) : C(C_), S(S_), channels_last(cl) {
    int64_t q;
    if (cl) {  // m = (n*S + s)*C + c
      divmod(m, C, q, c);
      divmod(q, S, n, s);
    } else {  // m = (n*C + c)*S + s
      divmod(m, S, q, s);
      divmod(q, C, n, c);
    }
  }
  __device__ __forceinline__ uint64_t logical() const { return static_cast<uint64_t>((n * C + c) * S + s); }
  __device__ __forceinline__ void next() {
    if (channels_last) {
      if (++c == C) {
        c = 0;
        if (++s == S) {
          s = 0;
          ++n;
        }
      }
    } else if (++s == S) {
      s = 0;
      if (++c == C) {
        c = 0;
        ++n;
      }
    }
  }
};

// One element of the forward: y = act(z) * m, z = bn(x) + residual; returns the pass bit (kept and act' = 1).
template <Act kAct, typename acc_t>
__device__ __forceinline__ bool add_act_element(acc_t xv, acc_t rv, ChannelAffine<acc_t> ab, acc_t m,
                                                ActArgs<acc_t> act, acc_t& y) {
  const acc_t z = bn_preact(xv, ab) + rv;
  y = act_forward<kAct>(z, act) * m;
  return m != acc_t(0) && act_passes<kAct>(z, act);
}

// y and (pass_bits non-null) the pass bits of 8-element memory units; drop: mask (kDropout), per element by
// logical index (kPerElementMask: channels_last with S > 1) or one Philox block per unit.
//
// Misaligned pointers (x, residual and out sh elements past a 16-byte boundary; a residual misaligned unlike x
// takes the scalar path, one peel aligns one offset): the units are cut sh elements early (PeeledUnit) as in the
// apply flat kernel, so a unit straddles two bytes of pass bits. Rather than two writers per byte (a byte has no
// atomic OR, and a 32-bit one would need zeroed bits), each byte is written whole by the unit holding its last
// element: unit b writes byte b - 1 from its own first sh pass bits and the last 8 - sh of unit b - 1, handed one
// lane up the warp; lane 0 of each warp loads and computes the unit below lane 1's only for that (it stores
// nothing: WarpSteps with lead = 1, 31 units per warp step, its loads the neighbour warp's, mostly cache hits),
// and the last unit also writes the last byte when that lies wholly in it. Its Philox block is the one lane 1's
// keep bits take from below, as in the apply flat kernel, so a lane still makes one call per step.
// Blocks of kThreads per SM: 4 for float math (<= 64 registers; unbounded, ptxas takes up to 75 for the gate kinds'
// loop, 3 blocks).
template <typename scalar_t, typename acc_t, Act kAct, bool kDropout, bool kPerElementMask>
__global__ void __launch_bounds__(kThreads, sizeof(acc_t) == 4 ? 4 : 0)
    add_relu_forward_kernel(const ChannelParams<acc_t> prm, const scalar_t* __restrict__ x,
                            const scalar_t* __restrict__ residual, scalar_t* __restrict__ out,
                            uint8_t* __restrict__ pass_bits, int64_t numel, int64_t C, int64_t S, bool channels_last,
                            int sh, bool vec, Dropout<acc_t> drop, ActArgs<acc_t> act) {
  constexpr bool kBlockMask = kDropout && !kPerElementMask;
  PhiloxKey key{0, 0};
  if constexpr (kDropout) key = load_key(drop.key);
  const int64_t units = (numel + sh + kUnit - 1) / kUnit;
  const bool with_bits = pass_bits != nullptr;
  for (WarpSteps ws((sh != 0 && (kBlockMask || with_bits)) ? 1 : 0); ws.more(units); ws.next()) {
    const int64_t b = ws.unit();  // -1 for the first warp's lead lane
    const bool live = b >= 0 && b < units;
    uint32_t keep = 0xFFu;
    if constexpr (kBlockMask) {
      keep = live ? block_bits(key, static_cast<uint64_t>(b), drop.threshold) : 0u;
      if (sh != 0) keep = peeled_keep(keep, sh);
    }
    uint32_t pass = 0;  // bit j: lane j of the unit
    if (live && (with_bits || !ws.supplier())) {  // a lead lane without bits to supply only generates its block
      const PeeledUnit u(b, sh, numel, vec);
      acc_t xv[kUnit], rv[kUnit], yv[kUnit];
      u.load(x, xv);
      u.load(residual, rv);
      UnitWalk walk(u.first, C, S, channels_last);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        const bool in = j >= u.lo && j < u.hi;
        acc_t m = acc_t(1);
        if constexpr (kPerElementMask) {
          if (in) {
            const uint64_t L = walk.logical();
            m = lane_u16_sel(mask_block(key, L >> 3), static_cast<int>(L & 7)) >= drop.threshold ? drop.scale
                                                                                                 : acc_t(0);
          }
        } else if constexpr (kDropout) {
          m = ((keep >> j) & 1u) ? drop.scale : acc_t(0);
        }
        const bool passes = add_act_element<kAct>(xv[j], rv[j], prm.affine(walk.c), m, act, yv[j]);
        pass |= static_cast<uint32_t>(passes) << j;
        if (in && j + 1 < u.hi) walk.next();
      }
      // Only lanes [lo, hi) are the unit's. Masked here, not per lane in the loop: with `in && passes` there, ptxas
      // 13.0 aborts on the identity kernel without dropout ("Register allocation failed with register count of 7").
      pass &= (0xFFu >> (kUnit - u.hi)) & (0xFFu << u.lo);
      if (!ws.supplier()) u.store(out, yv);
    }
    if (!with_bits) continue;
    if (sh == 0) {  // unit b is byte b (no lead lane)
      if (live) pass_bits[b] = static_cast<uint8_t>(pass);
      continue;
    }
    const uint32_t below = __shfl_up_sync(0xffffffffu, pass, 1);
    if (!live || ws.supplier()) continue;
    if (b >= 1) pass_bits[b - 1] = static_cast<uint8_t>(window8(below, pass, sh));
    if (b == units - 1 && b * kUnit < numel) pass_bits[b] = static_cast<uint8_t>(pass >> sh);
  }
}

// The forward for ChannelsLast with S > 1, C % 8 == 0 and dropout: one thread step = 8 consecutive s of one sample
// x 8 adjacent channels c0 .. c0+7 (c0 % 8 == 0). Each row's 8 elements are one memory unit (one byte of pass bits,
// the thread's own) and each channel's 8 rows the logical run (n*C + c)*S + s0 .. +7, so the mask costs one Philox
// call per channel and step (two when S % 8 != 0, shared between adjacent channels when S < 8), as in apply.cuh's
// tile kernel; adjacent threads take adjacent channel groups of the same rows (coalesced).
// Misaligned (x, residual, out sh elements past 16 bytes; C % 8 == 0, so every row is too): the groups are cut sh
// channels early along each row (group cg: channels 8cg - sh .. 8cg - sh + 7, C/8 + 1 groups, partial at both ends
// of a row, whose partial 16-byte chunks take scalar accesses), and as in the flat kernel a row's byte k is written
// whole by group k + 1 from its first sh bits and group k's last 8 - sh, handed one lane up the warp (items are
// numbered group fastest, so group k is the item below; lane 0 only supplies it, WarpSteps with lead = 1).
template <typename scalar_t, typename acc_t, Act kAct, bool kAligned8>
__global__ void __launch_bounds__(kThreads)
    add_relu_forward_tile_kernel(const ChannelParams<acc_t> prm, const scalar_t* __restrict__ x,
                                 const scalar_t* __restrict__ residual, scalar_t* __restrict__ out,
                                 uint8_t* __restrict__ pass_bits, int64_t C, int64_t S, int64_t SG, int64_t CG,
                                 int64_t items, int sh, bool vec, Dropout<acc_t> drop, ActArgs<acc_t> act) {
  constexpr int kW = 16 / sizeof(scalar_t);  // elements per 16-byte access
  const PhiloxKey key = load_key(drop.key);
  const bool with_bits = pass_bits != nullptr;
  for (WarpSteps ws((sh != 0 && with_bits) ? 1 : 0); ws.more(items); ws.next()) {
    const int64_t w = ws.unit();  // -1 for the first warp's lead lane
    const bool live = w >= 0 && w < items;
    int64_t cg = 0, base = 0;  // base: memory offset of (n, s0, c0)
    int rows = 0;
    uint64_t pass = 0;  // byte j: row j's pass bits (bit v: channel c0 + v)
    if (live) {
      int64_t q, n, sg;
      divmod(w, CG, q, cg);
      divmod(q, SG, n, sg);
      const int64_t c0 = cg * kUnit - sh, s0 = sg * kUnit;
      const int vlo = c0 < 0 ? static_cast<int>(-c0) : 0;
      const int vhi = (C - c0) < kUnit ? static_cast<int>(C - c0) : kUnit;
      rows = static_cast<int>((S - s0) < kUnit ? (S - s0) : kUnit);
      base = (n * S + s0) * C + c0;
      uint32_t keep[kUnit];
      ChannelAffine<acc_t> ab[kUnit] = {};
      [[maybe_unused]] KeepCarry carry;  // adjacent channels' runs follow each other when S < 8
#pragma unroll
      for (int v = 0; v < kUnit; ++v) {
        keep[v] = 0xFFu;
        if (v < vlo || v >= vhi) continue;
        const uint64_t L = static_cast<uint64_t>((n * C + c0 + v) * S + s0);  // logical index of (n, c0 + v, s0)
        if constexpr (kAligned8)
          keep[v] = run_keep_bits<true>(key, L, rows, drop.threshold);
        else
          keep[v] = carry.run(key, L, rows, drop.threshold);
        ab[v] = prm.affine(c0 + v);
      }
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        if (j < rows) {
          const int64_t off = base + j * C;
          acc_t xv[kUnit], rv[kUnit], yv[kUnit] = {};
          if (vec) {
            load_vec<kUnit, kW>(x, off, vlo, vhi, xv);
            load_vec<kUnit, kW>(residual, off, vlo, vhi, rv);
          } else {
            load_vec<kUnit, 1>(x, off, vlo, vhi, xv);
            load_vec<kUnit, 1>(residual, off, vlo, vhi, rv);
          }
          uint32_t byte = 0;
#pragma unroll
          for (int v = 0; v < kUnit; ++v) {
            if (v < vlo || v >= vhi) continue;
            const acc_t m = ((keep[v] >> j) & 1u) ? drop.scale : acc_t(0);
            byte |= static_cast<uint32_t>(add_act_element<kAct>(xv[v], rv[v], ab[v], m, act, yv[v])) << v;
          }
          if (!ws.supplier()) {
            if (vec)
              store_vec<kUnit, kW>(out, off, vlo, vhi, yv);
            else
              store_vec<kUnit, 1>(out, off, vlo, vhi, yv);
          }
          pass |= static_cast<uint64_t>(byte) << (8 * j);
        }
      }
    }
    if (!with_bits) continue;
    if (sh == 0) {  // the group is one byte of each row
      for (int j = 0; live && j < rows; ++j) pass_bits[(base + j * C) >> 3] = static_cast<uint8_t>(pass >> (8 * j));
      continue;
    }
    const uint64_t below = __shfl_up_sync(0xffffffffu, pass, 1);
    if (!live || ws.supplier() || cg == 0) continue;
    for (int j = 0; j < rows; ++j)  // row j's byte of channels 8(cg - 1) .. 8cg - 1
      pass_bits[((base + j * C + sh) >> 3) - 1] = static_cast<uint8_t>(
          window8(static_cast<uint32_t>(below >> (8 * j)) & 0xFFu, static_cast<uint32_t>(pass >> (8 * j)) & 0xFFu, sh));
  }
}

// dx from g: the BN backward of BackwardInputOp without its activation gate; the sums are divided here, per channel, as
// the CPU kernels do.
template <typename acc_t, bool kBatchStats>
struct AddBackwardInputOp {
  ChannelParams<acc_t> prm;  // mean, rstd, weight (bias unused)
  const acc_t* sum_g;        // kBatchStats only
  const acc_t* sum_g_xhat;   // kBatchStats only
  acc_t count;               // kBatchStats only: the values the sums ran over (global under SyncBN)

  __device__ __forceinline__ BackwardCoef<acc_t> channel(int64_t c) const {
    const acc_t mg = kBatchStats ? sum_g[c] / count : acc_t(0);
    const acc_t mgx = kBatchStats ? sum_g_xhat[c] / count : acc_t(0);
    return backward_coef<acc_t>(prm.mean[c], prm.rstd[c], prm.w(c), kBatchStats, mg, mgx);
  }
  __device__ __forceinline__ acc_t apply(const BackwardCoef<acc_t>& coef, acc_t x, acc_t g) const {
    if constexpr (kBatchStats)
      return grad_input_element(g, x, coef);
    else
      return grad_input_element_eval(g, coef);
  }
};

// grad_residual = g = dy * scale where the pass bit is set (else 0) and dx = Op(x, g), g kept in acc_t between the
// two (as the CPU computes it: dx is not computed from g rounded to scalar_t). 8-element memory units, peeled as
// the forward's (PeeledUnit: dy, x, dx and grad_residual sh elements past a 16-byte boundary, else scalar); a unit
// reads its pass bits across two bytes, and no byte is written here, so no lane needs its neighbour.
template <typename scalar_t, typename acc_t, bool kBatchStats>
__global__ void __launch_bounds__(kThreads)
    add_relu_backward_input_kernel(const AddBackwardInputOp<acc_t, kBatchStats> op, const scalar_t* __restrict__ dy,
                                   const scalar_t* __restrict__ x, const uint8_t* __restrict__ pass_bits,
                                   scalar_t* __restrict__ dx, scalar_t* __restrict__ grad_residual, int64_t numel,
                                   int64_t C, int64_t S, bool channels_last, int sh, bool vec, acc_t scale) {
  const int64_t units = (numel + sh + kUnit - 1) / kUnit;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < units;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const PeeledUnit u(b, sh, numel, vec);
    acc_t dv[kUnit], xv[kUnit], gv[kUnit], dxv[kUnit];
    u.load(dy, dv);
    u.load(x, xv);
    const uint32_t pass = run_bits(pass_bits, u.first, u.hi - u.lo) << u.lo;  // bit j: lane j
    UnitWalk walk(u.first, C, S, channels_last);
    int64_t c = walk.c;
    BackwardCoef<acc_t> coef = op.channel(c);
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      if (walk.c != c) {  // a new channel (every element in channels_last)
        c = walk.c;
        coef = op.channel(c);
      }
      gv[j] = ((pass >> j) & 1u) ? dv[j] * scale : acc_t(0);
      dxv[j] = op.apply(coef, xv[j], gv[j]);
      if (j >= u.lo && j + 1 < u.hi) walk.next();
    }
    u.store(grad_residual, gv);
    u.store(dx, dxv);
  }
}

// ---- host drivers (numel > 0) ----

template <typename scalar_t, typename acc_t, Act kAct = Act::ReLU>
void run_add_relu_forward(const ChannelParams<acc_t>& prm, const scalar_t* x, const scalar_t* residual,
                          scalar_t* out, uint8_t* pass_bits, const Geometry& g, const Dropout<acc_t>* drop,
                          cudaStream_t stream, const ActArgs<acc_t>& act = {}) {
  static_assert(act_has_gate_bits<kAct>(), "the block tail's pass bits hold a 0/1 gradient gate only");
  const int64_t numel = g.N * g.C * g.S;
  const bool channels_last = g.layout == Layout::ChannelsLast;
  const int k = shared_misalignment(16, x, residual, out);
  const int sh = k < 0 ? 0 : k;
  const Dropout<acc_t> d = drop ? *drop : Dropout<acc_t>{nullptr, 0u, acc_t(1)};
  auto run = [&](auto kernel) {
    launch(kernel, dim3(apply_blocks(ceil_div(numel + sh, kUnit))), dim3(kThreads), stream, prm, x, residual, out,
           pass_bits, numel, g.C, g.S, channels_last, sh, k >= 0, d, act);
  };
  if (drop != nullptr && channels_last && g.S > 1 && g.C % kUnit == 0) {
    const int64_t SG = ceil_div(g.S, kUnit), CG = g.C / kUnit + (sh != 0 ? 1 : 0), items = g.N * SG * CG;
    auto run_tile = [&](auto kernel) {
      launch(kernel, dim3(apply_blocks(items)), dim3(kThreads), stream, prm, x, residual, out, pass_bits, g.C, g.S,
             SG, CG, items, sh, k >= 0, d, act);
    };
    if (g.S % kUnit == 0)
      run_tile(add_relu_forward_tile_kernel<scalar_t, acc_t, kAct, true>);
    else
      run_tile(add_relu_forward_tile_kernel<scalar_t, acc_t, kAct, false>);
  } else if (drop == nullptr) {
    run(add_relu_forward_kernel<scalar_t, acc_t, kAct, false, false>);
  } else if (channels_last && g.S > 1) {
    run(add_relu_forward_kernel<scalar_t, acc_t, kAct, true, true>);
  } else {
    run(add_relu_forward_kernel<scalar_t, acc_t, kAct, true, false>);
  }
}

// add_relu_backward_reduce: Op's sums of g = dy * pass * scale over (x, dy), as planned by
// plan_reduction<scalar_t, AddGradSumsOp<acc_t>>(geo, x, dy); ws and counters as run_reduction takes them.
template <typename scalar_t, typename acc_t>
void run_add_relu_backward_reduce(const AddGradSumsOp<acc_t>& op, const ReducePlan& plan, const scalar_t* dy,
                                  const scalar_t* x, const uint8_t* pass_bits, acc_t scale, const Geometry& geo,
                                  acc_t* ws, unsigned* counters, cudaStream_t stream) {
  Dropout<acc_t> pass{nullptr, 0u, scale};
  pass.bits = pass_bits;
  run_reduction<scalar_t, acc_t>(op, plan, x, dy, geo, &pass, ws, counters, stream);
}

// add_relu_backward_input: grad_residual = g and dx from (x, g); sum_g == nullptr: running statistics.
template <typename scalar_t, typename acc_t>
void run_add_relu_backward_input(const ChannelParams<acc_t>& prm, const acc_t* sum_g, const acc_t* sum_g_xhat,
                                 int64_t count, const scalar_t* dy, const scalar_t* x, const uint8_t* pass_bits,
                                 acc_t scale, scalar_t* dx, scalar_t* grad_residual, const Geometry& geo,
                                 cudaStream_t stream) {
  const int64_t numel = geo.N * geo.C * geo.S;
  const int k = shared_misalignment(16, dy, x, dx, grad_residual);
  const int sh = k < 0 ? 0 : k;
  auto run = [&](auto kernel, auto op) {
    launch(kernel, dim3(apply_blocks(ceil_div(numel + sh, kUnit))), dim3(kThreads), stream, op, dy, x, pass_bits, dx,
           grad_residual, numel, geo.C, geo.S, geo.layout == Layout::ChannelsLast, sh, k >= 0, scale);
  };
  if (sum_g != nullptr)
    run(add_relu_backward_input_kernel<scalar_t, acc_t, true>,
        AddBackwardInputOp<acc_t, true>{prm, sum_g, sum_g_xhat, static_cast<acc_t>(count)});
  else
    run(add_relu_backward_input_kernel<scalar_t, acc_t, false>,
        AddBackwardInputOp<acc_t, false>{prm, nullptr, nullptr, acc_t(1)});
}

}  // namespace bnfused::cuda
