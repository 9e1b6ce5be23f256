// The input-gradient elementwise pass on the CPU: g = act'(z) * dy * mult, then dx. It has an add mode for the block
// tail BN + residual add + activation (kAdd): the mask is the pass bits, which hold the activation's gate already
// (kAct is Identity), and g = dy * mult, the residual's gradient, is written beside dx. Each pass reads its inputs once; the dropout multipliers (or the packed keep bits) of a chunk are expanded into
// an L1 buffer and consumed right away.
#include "cpu/row_tiles.h"

namespace bnfused {
namespace {

using cpu::kChunk;

// Per-channel coefficient arrays of the input gradient (structure of arrays for vector loads).
template <typename acc>
struct GradCoefs {
  std::vector<acc> a, b, A, C, K, mean;
};

// One vector of dx from x, gm = dy * mult and the coefficients of its lanes (z recomputed as in the forward).
template <typename acc, Act kAct, bool kBatchStats>
inline at::vec::Vectorized<acc> grad_input_math(const at::vec::Vectorized<acc>& xv, const at::vec::Vectorized<acc>& gm,
                                                const at::vec::Vectorized<acc> (&coef)[6], const cpu::ActVec<acc>& act) {
  using Vec = at::vec::Vectorized<acc>;
  Vec grad = gm;
  if constexpr (kAct != Act::Identity) grad = cpu::act_backward_vec<kAct>(gm, at::vec::fmadd(xv, coef[0], coef[1]), act);
  if constexpr (kBatchStats)
    return at::vec::fmadd(grad, coef[2], coef[3] - (xv - coef[5]) * coef[4]);
  else
    return grad * coef[2];
}

// grad_input_math of `cnt` elements, loaded and stored as scalar_t (mult nullptr: no dropout); kAdd also stores g
// to gr.
template <typename scalar_t, typename acc, Act kAct, bool kBatchStats, bool kAdd>
inline void grad_input_vec(const scalar_t* dy, const scalar_t* x, const acc* mult, const at::vec::Vectorized<acc> (&coef)[6],
                           scalar_t* dx, scalar_t* gr, int cnt, const cpu::ActVec<acc>& act) {
  using Vec = at::vec::Vectorized<acc>;
  Vec gm = cpu::load_as<scalar_t, acc>(dy, cnt);
  if (mult) gm = gm * cpu::load(mult, cnt);
  if constexpr (kAdd) cpu::store_as(gm, gr, cnt);
  cpu::store_as(grad_input_math<acc, kAct, kBatchStats>(cpu::load_as<scalar_t, acc>(x, cnt), gm, coef, act), dx, cnt);
}

#ifdef BNFUSED_BF16X16
// grad_input_math of 16 bfloat16 elements (cpu::BF16x16), `lo` / `hi` the coefficients of its two halves.
template <Act kAct, bool kBatchStats, bool kAdd>
inline void grad_input_bf16x16(const at::BFloat16* dy, const at::BFloat16* x, const float* mult,
                               const at::vec::Vectorized<float> (&lo)[6], const at::vec::Vectorized<float> (&hi)[6],
                               at::BFloat16* dx, at::BFloat16* gr, const cpu::ActVec<float>& act) {
  using Vec = at::vec::Vectorized<float>;
  const cpu::BF16x16 xv = cpu::load_bf16x16(x), dyv = cpu::load_bf16x16(dy);
  Vec glo(dyv.lo), ghi(dyv.hi);
  if (mult) {
    const cpu::BF16x16 m = cpu::load_f32x16_as_bf16_order(mult);
    glo = glo * Vec(m.lo);
    ghi = ghi * Vec(m.hi);
  }
  if constexpr (kAdd) cpu::store_bf16x16({glo, ghi}, gr);
  cpu::store_bf16x16({grad_input_math<float, kAct, kBatchStats>(Vec(xv.lo), glo, lo, act),
                      grad_input_math<float, kAct, kBatchStats>(Vec(xv.hi), ghi, hi, act)}, dx);
}
#endif

// dx over n elements of channel c (a plane segment): its coefficients are broadcast once (dx stores could alias
// the coefficient arrays, so the compiler would otherwise reload them every step); bfloat16 16 at a time
// (cpu::BF16x16), as in forward_run.
template <typename scalar_t, typename acc, Act kAct, bool kBatchStats, bool kAdd>
inline void grad_input_run(const scalar_t* dy, const scalar_t* x, const acc* mult, const GradCoefs<acc>& k, int64_t c,
                           scalar_t* dx, scalar_t* gr, int64_t n, const cpu::ActVec<acc>& act) {
  using Vec = at::vec::Vectorized<acc>;
  const Vec coef[6] = {Vec(k.a[c]), Vec(k.b[c]), Vec(k.A[c]), Vec(k.C[c]), Vec(k.K[c]), Vec(k.mean[c])};
#ifdef BNFUSED_BF16X16
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (n >= 16) {
      cpu::overlapping_steps<16>(n, [&](int64_t i) {
        grad_input_bf16x16<kAct, kBatchStats, kAdd>(dy + i, x + i, mult ? mult + i : nullptr, coef, coef, dx + i,
                                                    gr + i, act);
      });
      return;
    }
  }
#endif
  cpu::elementwise_loop<acc>(n, [&](int64_t i, int cnt) {
    grad_input_vec<scalar_t, acc, kAct, kBatchStats, kAdd>(dy + i, x + i, mult ? mult + i : nullptr, coef, dx + i,
                                                           gr + i, cnt, act);
  });
}

// dx over one channels_last row of C elements, with per-lane coefficients (with cpu::bf16x16_rows in BF16x16
// lane order, the row then running 16 at a time).
template <typename scalar_t, typename acc, Act kAct, bool kBatchStats, bool kAdd>
inline void grad_input_row(const scalar_t* dy, const scalar_t* x, const acc* mult, const GradCoefs<acc>& k,
                           scalar_t* dx, scalar_t* gr, int64_t C, const cpu::ActVec<acc>& act) {
  using Vec = at::vec::Vectorized<acc>;
  const acc* const arrays[6] = {k.a.data(), k.b.data(), k.A.data(), k.C.data(), k.K.data(), k.mean.data()};
  constexpr int kCoefs = kBatchStats ? 6 : 3;
#ifdef BNFUSED_BF16X16
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (cpu::bf16x16_rows<scalar_t>(C)) {
      for (int64_t i = 0; i < C; i += 16) {
        Vec lo[6], hi[6];
        for (int q = 0; q < kCoefs; ++q) {
          lo[q] = Vec::loadu(arrays[q] + i);
          hi[q] = Vec::loadu(arrays[q] + i + 8);
        }
        grad_input_bf16x16<kAct, kBatchStats, kAdd>(dy + i, x + i, mult ? mult + i : nullptr, lo, hi, dx + i, gr + i,
                                                    act);
      }
      return;
    }
  }
#endif
  cpu::elementwise_loop<acc>(C, [&](int64_t i, int cnt) {
    Vec coef[6];
    for (int q = 0; q < kCoefs; ++q) coef[q] = cpu::load(arrays[q] + i, cnt);
    grad_input_vec<scalar_t, acc, kAct, kBatchStats, kAdd>(dy + i, x + i, mult ? mult + i : nullptr, coef, dx + i,
                                                           gr + i, cnt, act);
  });
}

// gr_t: the residual's gradient g in add mode (kAdd), else unused.
template <typename scalar_t, Act kAct, bool kBatchStats, bool kAdd>
void backward_input_kernel(const at::Tensor& dy_t, const at::Tensor& x, const GradCoefs<cpu::acc_t<scalar_t>>& k,
                           const cpu::DropoutParams<cpu::acc_t<scalar_t>>& dp, const ActArgs<cpu::acc_t<scalar_t>>& act_args,
                           at::Tensor& dx_t, at::Tensor* gr_t) {
  using acc = cpu::acc_t<scalar_t>;
  const cpu::ActVec<acc> act(act_args);
  const Geometry g = geometry_of(x);
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* dyd = dy_t.const_data_ptr<scalar_t>();
  scalar_t* dxd = dx_t.data_ptr<scalar_t>();
  scalar_t* grd = kAdd ? gr_t->data_ptr<scalar_t>() : nullptr;
  if (g.layout == Layout::ChannelsFirst) {
    cpu::for_each_plane_segment(g, dp, dyd, xd, dxd, sizeof(scalar_t),
                                [&](int64_t off, int64_t n, int64_t c, const acc* mult) {
      grad_input_run<scalar_t, acc, kAct, kBatchStats, kAdd>(dyd + off, xd + off, mult, k, c, dxd + off, grd + off, n,
                                                             act);
    });
    return;
  }
  // grad_input_row's operand order.
  const bool rows16 = cpu::bf16x16_rows<scalar_t>(g.C);
  const GradCoefs<acc> k16 = rows16 ? GradCoefs<acc>{cpu::bf16x16_order(k.a), cpu::bf16x16_order(k.b),
                                                     cpu::bf16x16_order(k.A), cpu::bf16x16_order(k.C),
                                                     cpu::bf16x16_order(k.K), cpu::bf16x16_order(k.mean)}
                                    : GradCoefs<acc>{};
  const GradCoefs<acc>& row_k = rows16 ? k16 : k;
  const cpu::RowTiles tiles(g, dp.active && !dp.bits_in);
  cpu::for_each_tile(tiles, dp, dyd, xd, dxd, sizeof(scalar_t),
                     [&](const cpu::RowTiles::Tile& t, acc* mult, uint8_t* scratch, cpu::NextRunPrefetch* prefetch) {
    // One row at a time: pairs of rows measured 1.4-1.6x slower at C = 256 and 512 (see for_each_row).
    tiles.for_each_row<1>(t, dp, mult, scratch, prefetch, [&](int64_t r, int64_t, const acc* row_mult, int64_t) {
      const int64_t off = (t.row0 + r) * g.C;
      grad_input_row<scalar_t, acc, kAct, kBatchStats, kAdd>(dyd + off, xd + off, row_mult, row_k, dxd + off,
                                                             grd + off, g.C, act);
    });
  });
}

}  // namespace

void backward_input_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                        const OptTensor& weight, const OptTensor& bias, PhiloxKey key, double p,
                        const OptTensor& sum_g, const OptTensor& sum_g_xhat, int64_t count, const ActSpec& act,
                        at::Tensor& dx, const uint8_t* keep_bits_in, at::Tensor* grad_residual) {
  if (x.numel() == 0) return;
  const bool batch_stats = sum_g.has_value();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_backward_input_cpu", [&] {
    using acc = cpu::acc_t<scalar_t>;
    const auto prm = channel_params<acc>(mean, rstd, weight, bias);
    const int64_t C = x.size(1);
    GradCoefs<acc> k{std::vector<acc>(C), std::vector<acc>(C), std::vector<acc>(C),
                     std::vector<acc>(C), std::vector<acc>(C), std::vector<acc>(C)};
    const acc* sg = batch_stats ? sum_g->const_data_ptr<acc>() : nullptr;
    const acc* sgx = batch_stats ? sum_g_xhat->const_data_ptr<acc>() : nullptr;
    const acc n = static_cast<acc>(count);
    for (int64_t c = 0; c < C; ++c) {
      const auto ab = prm.affine(c);
      const auto bc = backward_coef<acc>(prm.mean[c], prm.rstd[c], prm.w(c), batch_stats, sg ? sg[c] / n : acc(0),
                                         sgx ? sgx[c] / n : acc(0));
      k.a[c] = ab.a;
      k.b[c] = ab.b;
      k.A[c] = bc.A;
      k.C[c] = bc.C;
      k.K[c] = bc.K;
      k.mean[c] = bc.mean;
    }
    auto dp = cpu::dropout_params<acc>(key, p, keep_bits_in);
    const auto act_args = ActArgs<acc>::of(act);
    if (grad_residual) {
      dp.active = true;  // the pass bits are the mask (and the activation's gate), p = 0 included
      if (batch_stats)
        backward_input_kernel<scalar_t, Act::Identity, true, true>(dy, x, k, dp, act_args, dx, grad_residual);
      else
        backward_input_kernel<scalar_t, Act::Identity, false, true>(dy, x, k, dp, act_args, dx, grad_residual);
      return;
    }
    dispatch_act(act.kind, [&](auto kind) {
      constexpr Act kAct = decltype(kind)::value;
      if (batch_stats)
        backward_input_kernel<scalar_t, kAct, true, false>(dy, x, k, dp, act_args, dx, nullptr);
      else
        backward_input_kernel<scalar_t, kAct, false, false>(dy, x, k, dp, act_args, dx, nullptr);
    });
  });
}

}  // namespace bnfused
