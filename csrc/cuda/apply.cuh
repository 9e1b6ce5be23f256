// Elementwise passes (forward, input gradient) for both layouts. An Op maps (channel coefficients, x, dy,
// dropout multiplier) to one output element; the drivers here do the indexing, loads/stores and the mask.
//
// Flat kernel (ChannelsFirst, and ChannelsLast with S == 1 where memory offset == logical index too): one
//   thread step = one Philox block of 8 logical elements (one Philox call), 128-bit loads/stores when whole
//   and aligned; the channel is constant over the 8 elements when S % 8 == 0, else tracked per element.
// Tile kernel (ChannelsLast, S > 1): one thread step = 8 consecutive s of one sample x V adjacent channels;
//   for each channel the 8 elements are a logical run (n*C + c)*S + s0 .. +7, so the mask costs one Philox
//   call (two when S % 8 != 0) per 8 elements instead of one per element; loads are V-wide along C and
//   adjacent threads take adjacent channel vectors (coalesced rows).
#pragma once
#include "common.cuh"

namespace bnfused::cuda {

// Unit b (PeeledUnit) holds the logical (== memory) elements 8b - sh .. 8b - sh + 7: with the pointers sh
// elements past a 16-byte boundary (the host's shared_misalignment) every whole unit is 16-byte aligned, and only
// the head unit (b = 0) and the tail are partial. sh = 0: the units are the Philox blocks. sh > 0: unit b takes its
// first sh keep bits from Philox block b - 1 and the others from block b; each lane generates block b and passes
// its bits one lane up the warp (peeled_keep), and lane 0 only generates the block below lane 1's unit (WarpSteps
// with lead = 1: a warp step is 31 units), so a lane still makes one Philox call per step: an extra call in lane 0
// alone would cost the whole warp a second one (SIMT), exactly as two calls per unit would.
// Float64 with a transcendental activation asks for 1 block per SM: left to itself ptxas holds the double erf / exp
// of 8 unrolled elements to 128 registers and spills 168-216 bytes (GELU, sm_90); with the bound, 182-216 registers
// and no spill. Every other Op: no minimum (0), ptxas's own choice as before.
template <typename scalar_t, typename acc_t, class Op, bool kDropout, bool kUniform>
__global__ void __launch_bounds__(kThreads, (sizeof(acc_t) == 8 && Op::kTranscendental) ? 1 : 0)
    apply_flat_kernel(const Op op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                      scalar_t* __restrict__ out, int64_t numel, int64_t C, int64_t S, int sh, bool vec,
                      Dropout<acc_t> drop) {
  PhiloxKey key{0, 0};
  if constexpr (kDropout) key = load_key(drop.key);
  const int64_t units = (numel + sh + kUnit - 1) / kUnit;
  for (WarpSteps ws((kDropout && sh != 0) ? 1 : 0); ws.more(units); ws.next()) {
    const int64_t b = ws.unit();  // -1 for the first warp's lead lane
    uint32_t keep = 0xFFu;
    if constexpr (kDropout) {
      keep = (b >= 0 && b < units) ? block_bits(key, static_cast<uint64_t>(b), drop.threshold) : 0u;
      if (sh != 0) keep = peeled_keep(keep, sh);
    }
    if (ws.supplier() || b >= units) continue;
    const PeeledUnit u(b, sh, numel, vec);
    acc_t xv[kUnit], dv[kUnit], mult[kUnit], yv[kUnit];
    u.load(x, xv);
    if constexpr (Op::kNeedsDy) u.load(dy, dv);
    bits_mults(keep, kDropout ? drop.scale : acc_t(1), mult);
    int64_t q, s, c, unused;
    divmod(u.first, S, q, s);
    divmod(q, C, unused, c);
    auto ch = op.channel(c);
    if constexpr (kUniform) {  // S % 8 == 0 and sh == 0: one channel per unit
#pragma unroll
      for (int j = 0; j < kUnit; ++j) yv[j] = op.apply(ch, xv[j], dv[j], mult[j]);
    } else {
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        yv[j] = op.apply(ch, xv[j], dv[j], mult[j]);
        if (j >= u.lo && j + 1 < u.hi && ++s == S) {  // next element starts a new channel plane
          s = 0;
          if (++c == C) c = 0;
          ch = op.channel(c);
        }
      }
    }
    u.store(out, yv);
  }
}

// Channel vector cv holds channels cv*V - shc .. cv*V - shc + V - 1 (those in [0, C)): with the pointers shc
// elements past a V-element boundary (C % V == 0, so every row (n, s) is too) the whole vectors are aligned and
// only the first and the last vector of a row are partial (scalar accesses).
// At least 3 blocks per SM (<= 80 registers), 2 where that would spill: the input gradient with a mask whose
// runs straddle Philox blocks (its carries and dy) spills 32-148 bytes at 80 (ptxas, sm_90), and the transcendental
// activations (exp / erf / tanh per element).
template <typename scalar_t, typename acc_t, class Op, int V, bool kDropout, bool kAligned8>
__global__ void __launch_bounds__(kThreads, (Op::kTranscendental || (Op::kNeedsDy && kDropout && !kAligned8)) ? 2 : 3)
    apply_tile_kernel(const Op op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                      scalar_t* __restrict__ out, int64_t C, int64_t S, int64_t SG, int64_t CV, int shc,
                      int64_t strip, int64_t items, Dropout<acc_t> drop) {
  PhiloxKey key{0, 0};
  if constexpr (kDropout) key = load_key(drop.key);
  const int64_t strips = (SG + strip - 1) / strip;  // per row of units
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < items;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t q, cv, n, st;
    divmod(w, CV, q, cv);
    divmod(q, strips, n, st);
    const int64_t c0 = cv * V - shc;
    const int vlo = c0 < 0 ? static_cast<int>(-c0) : 0;
    const int vhi = (C - c0) < V ? static_cast<int>(C - c0) : V;
    typename Op::Chan ch[V] = {};  // lanes outside [vlo, vhi) stay unused
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (v >= vlo && v < vhi) ch[v] = op.channel(c0 + v);
    [[maybe_unused]] KeepCarry carry[V];
    const int64_t sg_end = (st + 1) * strip < SG ? (st + 1) * strip : SG;
    for (int64_t sg = st * strip; sg < sg_end; ++sg) {  // the strip's units, consecutive along s
      const int64_t s0 = sg * kUnit;
      const int rows = static_cast<int>((S - s0) < kUnit ? (S - s0) : kUnit);
      const int64_t base = (n * S + s0) * C + c0;
      // Keep bits first (8 per channel), so the rows below stream through registers one at a time.
      uint32_t keep[V] = {};
      if constexpr (kDropout) unit_keep_bits<V, kAligned8>(key, drop.threshold, n, C, c0, S, s0, rows, vlo, vhi,
                                                           carry, keep);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        if (j < rows) {
          const int64_t off = base + j * C;
          acc_t a[V], d[V] = {}, o[V] = {};
          load_vec<V>(x, off, vlo, vhi, a);
          if constexpr (Op::kNeedsDy) load_vec<V>(dy, off, vlo, vhi, d);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            if (v < vlo || v >= vhi) continue;
            const acc_t mult = kDropout ? (((keep[v] >> j) & 1u) ? drop.scale : acc_t(0)) : acc_t(1);
            o[v] = op.apply(ch[v], a[v], Op::kNeedsDy ? d[v] : acc_t(0), mult);
          }
          store_vec<V>(out, off, vlo, vhi, o);
        }
      }
    }
  }
}

// out = Op(x, dy) elementwise over the kernel layout of geometry g; dy_ptr may be null when !Op::kNeedsDy;
// drop == nullptr: no dropout (p == 0). N * C * S > 0.
template <typename scalar_t, typename acc_t, class Op>
void run_apply(const Op& op, const scalar_t* x_ptr, const scalar_t* dy_ptr, scalar_t* out_ptr, const Geometry& g,
               const Dropout<acc_t>* drop, cudaStream_t stream) {
  const Dropout<acc_t> d = drop ? *drop : Dropout<acc_t>{nullptr, 0u, acc_t(1)};
  const bool dropout = drop != nullptr;

  if (g.layout == Layout::ChannelsFirst || g.S == 1) {
    const int64_t numel = g.N * g.C * g.S;
    const int k = shared_misalignment(16, x_ptr, dy_ptr, out_ptr);
    const int sh = k < 0 ? 0 : k;
    const int64_t units = ceil_div(numel + sh, kUnit);
    const bool uniform = g.S % kUnit == 0 && sh == 0;
    auto run = [&](auto kernel) {
      launch(kernel, dim3(apply_blocks(units)), dim3(kThreads), stream, op, x_ptr, dy_ptr, out_ptr, numel, g.C, g.S,
             sh, k >= 0, d);
    };
    if (dropout) {
      if (uniform)
        run(apply_flat_kernel<scalar_t, acc_t, Op, true, true>);
      else
        run(apply_flat_kernel<scalar_t, acc_t, Op, true, false>);
    } else {
      if (uniform)
        run(apply_flat_kernel<scalar_t, acc_t, Op, false, true>);
      else
        run(apply_flat_kernel<scalar_t, acc_t, Op, false, false>);
    }
    return;
  }

  constexpr int kVmax = sizeof(scalar_t) >= 8 ? 2 : 4;
  const int shc = shared_misalignment(kVmax * sizeof(scalar_t), x_ptr, dy_ptr, out_ptr);
  const bool vec = g.C % kVmax == 0 && shc >= 0;
  const int64_t CV = vec ? ceil_div(g.C + shc, kVmax) : g.C;
  const int64_t SG = ceil_div(g.S, kUnit);
  const bool a8 = g.S % kUnit == 0;
  const int64_t strip = (dropout && !a8 && g.S > kUnit) ? strip_units(g.N * SG * CV, SG) : 1;
  const int64_t items = g.N * ceil_div(SG, strip) * CV;
  auto run = [&](auto kernel) {
    launch(kernel, dim3(apply_blocks(items)), dim3(kThreads), stream, op, x_ptr, dy_ptr, out_ptr, g.C, g.S, SG, CV,
           vec ? shc : 0, strip, items, d);
  };
  if (vec) {
    if (!dropout)
      run(apply_tile_kernel<scalar_t, acc_t, Op, kVmax, false, true>);
    else if (a8)
      run(apply_tile_kernel<scalar_t, acc_t, Op, kVmax, true, true>);
    else
      run(apply_tile_kernel<scalar_t, acc_t, Op, kVmax, true, false>);
  } else {
    if (!dropout)
      run(apply_tile_kernel<scalar_t, acc_t, Op, 1, false, true>);
    else if (a8)
      run(apply_tile_kernel<scalar_t, acc_t, Op, 1, true, true>);
    else
      run(apply_tile_kernel<scalar_t, acc_t, Op, 1, true, false>);
  }
}

}  // namespace bnfused::cuda
