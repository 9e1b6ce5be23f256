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

template <typename scalar_t, typename acc_t, class Op, bool kDropout, bool kUniform>
__global__ void __launch_bounds__(kThreads)
    apply_flat_kernel(const Op op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                      scalar_t* __restrict__ out, int64_t numel, int64_t C, int64_t S, bool vec_ok,
                      Dropout<acc_t> drop) {
  PhiloxKey key{0, 0};
  if constexpr (kDropout) key = load_key(drop.key);
  const int64_t groups = (numel + kUnit - 1) / kUnit;
  for (int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; grp < groups;
       grp += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = grp * kUnit;
    const int cnt = static_cast<int>((numel - i0) < kUnit ? (numel - i0) : kUnit);
    const bool whole = vec_ok && cnt == kUnit;
    acc_t xv[kUnit], dv[kUnit], mult[kUnit], yv[kUnit];
    if (whole)
      load8(x + i0, xv);
    else
      load_lanes(x + i0, 0, cnt, xv);
    if constexpr (Op::kNeedsDy) {
      if (whole)
        load8(dy + i0, dv);
      else
        load_lanes(dy + i0, 0, cnt, dv);
    }
    if constexpr (kDropout) {
      block_mults(key, static_cast<uint64_t>(grp), drop.threshold, drop.scale, mult);
    } else {
#pragma unroll
      for (int j = 0; j < kUnit; ++j) mult[j] = acc_t(1);
    }
    int64_t q, s, c, unused;
    divmod(i0, S, q, s);
    divmod(q, C, unused, c);
    auto ch = op.channel(c);
    if constexpr (kUniform) {
#pragma unroll
      for (int j = 0; j < kUnit; ++j) yv[j] = op.apply(ch, xv[j], dv[j], mult[j]);
    } else {
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        yv[j] = op.apply(ch, xv[j], dv[j], mult[j]);
        if (j + 1 < cnt && ++s == S) {  // next element starts a new channel plane
          s = 0;
          if (++c == C) c = 0;
          ch = op.channel(c);
        }
      }
    }
    if (whole)
      store8(out + i0, yv);
    else
      store_lanes(out + i0, 0, cnt, yv);
  }
}

template <typename scalar_t, typename acc_t, class Op, int V, bool kDropout, bool kAligned8>
__global__ void __launch_bounds__(kThreads)
    apply_tile_kernel(const Op op, const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                      scalar_t* __restrict__ out, int64_t C, int64_t S, int64_t SG, int64_t CV, int64_t items,
                      Dropout<acc_t> drop) {
  using Vec = VecN<scalar_t, V>;
  PhiloxKey key{0, 0};
  if constexpr (kDropout) key = load_key(drop.key);
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < items;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t q, cv, n, sg;
    divmod(w, CV, q, cv);
    divmod(q, SG, n, sg);
    const int64_t c0 = cv * V;
    const int64_t s0 = sg * kUnit;
    const int rows = static_cast<int>((S - s0) < kUnit ? (S - s0) : kUnit);
    const int64_t base = (n * S + s0) * C + c0;
    // Keep bits first (8 per channel), so the rows below stream through registers one at a time.
    uint32_t keep[V];
    typename Op::Chan ch[V];
    [[maybe_unused]] PhiloxCache cache;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if constexpr (kDropout) {
        const uint64_t L = static_cast<uint64_t>((n * C + c0 + v) * S + s0);  // logical index of (n, c, s0)
        if constexpr (kAligned8)
          keep[v] = run_keep_bits<true>(key, L, rows, drop.threshold);
        else
          keep[v] = run_keep_bits_cached(cache, key, L, rows, drop.threshold);
      } else {
        keep[v] = 0xFFu;
      }
      ch[v] = op.channel(c0 + v);
    }
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      if (j < rows) {
        const int64_t off = base + j * C;
        const Vec a = *reinterpret_cast<const Vec*>(x + off);
        Vec d;
        if constexpr (Op::kNeedsDy) d = *reinterpret_cast<const Vec*>(dy + off);
        Vec o;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc_t mult = kDropout ? (((keep[v] >> j) & 1u) ? drop.scale : acc_t(0)) : acc_t(1);
          acc_t dyv = acc_t(0);
          if constexpr (Op::kNeedsDy) dyv = static_cast<acc_t>(d.v[v]);
          o.v[v] = static_cast<scalar_t>(op.apply(ch[v], static_cast<acc_t>(a.v[v]), dyv, mult));
        }
        *reinterpret_cast<Vec*>(out + off) = o;
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
    const int64_t groups = ceil_div(numel, kUnit);
    const bool vec_ok = aligned_to(x_ptr, 16) && aligned_to(dy_ptr, 16) && aligned_to(out_ptr, 16);
    const bool uniform = g.S % kUnit == 0;
    auto run = [&](auto kernel) {
      launch(kernel, dim3(apply_blocks(groups)), dim3(kThreads), stream, op, x_ptr, dy_ptr, out_ptr, numel, g.C,
             g.S, vec_ok, d);
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
  const size_t vbytes = kVmax * sizeof(scalar_t);
  const bool vec = g.C % kVmax == 0 && aligned_to(x_ptr, vbytes) && aligned_to(dy_ptr, vbytes) &&
                   aligned_to(out_ptr, vbytes);
  const int64_t CV = g.C / (vec ? kVmax : 1);
  const int64_t SG = ceil_div(g.S, kUnit);
  const int64_t items = g.N * SG * CV;
  const bool a8 = g.S % kUnit == 0;
  auto run = [&](auto kernel) {
    launch(kernel, dim3(apply_blocks(items)), dim3(kThreads), stream, op, x_ptr, dy_ptr, out_ptr, g.C, g.S, SG, CV,
           items, d);
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
