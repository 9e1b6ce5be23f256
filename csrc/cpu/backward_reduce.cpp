// Per-channel reductions of the backward pass on the CPU: sum_g = Σ g and sum_g_xhat = Σ g·x̂, where
// g = act'(z) · dy · mult with the dropout multipliers regenerated from Philox (or unpacked from the keep bits).
// One read of dy and x. Add mode (BN + residual add + activation): g = dy · mult, the multipliers unpacked from the
// pass bits, which already hold the activation's gate (kAct is Identity).
// Σ g·(x − mean) is accumulated (then × rstd) so a large common offset in x does not cancel; partial sums are
// float per L1 chunk and double across chunks, merged in a fixed order (thread-count independent).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "cpu/row_tiles.h"

namespace bnfused {
namespace {

using cpu::kChunk;

// g = act'(z) * dy * mult for one vector of elements. Partial loads give x = dy = 0 past cnt; those lanes of g are
// set to 0 explicitly, since act'(z) of the padding's z = b may be infinite (0 * inf).
template <typename scalar_t, typename acc, Act kAct>
inline at::vec::Vectorized<acc> grad_vec(const at::vec::Vectorized<acc>& xv, const scalar_t* dy, const acc* mult,
                                         const at::vec::Vectorized<acc>& a, const at::vec::Vectorized<acc>& b,
                                         int64_t i, int cnt, const cpu::ActVec<acc>& act) {
  using Vec = at::vec::Vectorized<acc>;
  Vec gm = cpu::load_as<scalar_t, acc>(dy + i, cnt);
  if (mult) gm = gm * cpu::load(mult + i, cnt);
  if constexpr (kAct == Act::Identity) return gm;
  const Vec g = cpu::act_backward_vec<kAct>(gm, at::vec::fmadd(xv, a, b), act);
  if constexpr (!act_transcendental<kAct>()) return g;  // finite slopes: 0 * slope = 0
  return cnt == Vec::size() ? g : Vec::set(Vec(0), g, cnt);
}

// One channel (a plane chunk): Σ g and Σ g·(x − mean) as vectors of partial sums (two pairs for ILP).
template <typename scalar_t, typename acc, Act kAct>
inline void reduce_plane(const scalar_t* dy, const scalar_t* x, const acc* mult, acc a, acc b, acc mean, int64_t n,
                         at::vec::Vectorized<acc>& sg, at::vec::Vectorized<acc>& sgx, const cpu::ActVec<acc>& act) {
  using Vec = at::vec::Vectorized<acc>;
  const Vec va(a), vb(b), vm(mean);
  Vec g0(0), g1(0), gx0(0), gx1(0);
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    const Vec x0 = cpu::load_as<scalar_t, acc>(x + i, Vec::size());
    const Vec x1 = cpu::load_as<scalar_t, acc>(x + i + Vec::size(), Vec::size());
    const Vec d0 = grad_vec<scalar_t, acc, kAct>(x0, dy, mult, va, vb, i, Vec::size(), act);
    const Vec d1 = grad_vec<scalar_t, acc, kAct>(x1, dy, mult, va, vb, i + Vec::size(), Vec::size(), act);
    g0 += d0;
    g1 += d1;
    gx0 = at::vec::fmadd(d0, x0 - vm, gx0);
    gx1 = at::vec::fmadd(d1, x1 - vm, gx1);
  }
  for (; i < n; i += Vec::size()) {
    const int cnt = static_cast<int>(std::min<int64_t>(Vec::size(), n - i));
    const Vec x0 = cpu::load_as<scalar_t, acc>(x + i, cnt);
    const Vec d0 = grad_vec<scalar_t, acc, kAct>(x0, dy, mult, va, vb, i, cnt, act);
    g0 += d0;
    gx0 = at::vec::fmadd(d0, x0 - vm, gx0);
  }
  sg = g0 + g1;
  sgx = gx0 + gx1;
}

// Plane segments' partial-sum vectors waiting for one shared transpose-reduction (cpu::lane_sums), then added to
// their planes' double totals in segment order (so the totals do not depend on where a flush fell).
template <typename acc>
struct PendingPlaneSums {
  using Vec = at::vec::Vectorized<acc>;
  static constexpr int kSlots = cpu::kLaneSums / 2;  // a (Σ g, Σ g·(x − mean)) pair per segment
  double* plane_g;
  double* plane_gx;
  Vec v[cpu::kLaneSums];
  int64_t plane[kSlots];
  int used = 0;

  void add(int64_t p, const Vec& g, const Vec& gx) {
    v[2 * used] = g;
    v[2 * used + 1] = gx;
    plane[used++] = p;
    if (used == kSlots) flush();
  }
  void flush() {
    if (used == 0) return;
    for (int k = 2 * used; k < cpu::kLaneSums; ++k) v[k] = Vec(0);
    acc sums[cpu::kLaneSums];
    cpu::lane_sums(v, sums);
    for (int k = 0; k < used; ++k) {
      plane_g[plane[k]] += sums[2 * k];
      plane_gx[plane[k]] += sums[2 * k + 1];
    }
    used = 0;
  }
};

// One row of the ChannelsLast layout: per-channel Σ g and Σ g·(x − mean) added into sg[c], sgx[c].
template <typename scalar_t, typename acc, Act kAct>
inline void reduce_row(const scalar_t* dy, const scalar_t* x, const acc* mult, const acc* a, const acc* b, const acc* mean,
                       int64_t n, acc* sg, acc* sgx, const cpu::ActVec<acc>& act) {
  using Vec = at::vec::Vectorized<acc>;
  cpu::vec_loop<acc>(n, [&](int64_t i, int cnt) {
    const Vec xv = cpu::load_as<scalar_t, acc>(x + i, cnt);
    const Vec grad =
        grad_vec<scalar_t, acc, kAct>(xv, dy, mult, cpu::load(a + i, cnt), cpu::load(b + i, cnt), i, cnt, act);
    cpu::store(cpu::load(sg + i, cnt) + grad, sg + i, cnt);
    cpu::store(at::vec::fmadd(grad, xv - cpu::load(mean + i, cnt), cpu::load(sgx + i, cnt)), sgx + i, cnt);
  });
}

template <typename scalar_t, Act kAct>
void reduce_kernel(const at::Tensor& dy_t, const at::Tensor& x, const ChannelParams<cpu::acc_t<scalar_t>>& prm,
                   const cpu::DropoutParams<cpu::acc_t<scalar_t>>& dp, const ActArgs<cpu::acc_t<scalar_t>>& act_args,
                   double* sum_g, double* sum_gx) {
  using acc = cpu::acc_t<scalar_t>;
  const cpu::ActVec<acc> act(act_args);
  using Vec = at::vec::Vectorized<acc>;
  const Geometry g = geometry_of(x);
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* dyd = dy_t.const_data_ptr<scalar_t>();
  const auto [a, b] = cpu::affine_arrays(prm, g.C);
  const std::vector<acc> mean(prm.mean, prm.mean + g.C);
  if (g.layout == Layout::ChannelsFirst) {
    std::vector<double> plane_g(g.N * g.C, 0.0), plane_gx(g.N * g.C, 0.0);
    at::parallel_for(0, g.N * g.C, cpu::planes_grain(g), [&](int64_t begin, int64_t end) {
      std::vector<acc> mult(kChunk);
      // Planes of [begin, end) belong to this thread alone: their totals are accumulated in place.
      PendingPlaneSums<acc> pending{plane_g.data(), plane_gx.data()};
      cpu::for_each_run(g, begin, end, [&](int64_t off, int64_t len) {
        if (dp.active) {
          auto prefetch = cpu::next_run_prefetch(g, end, off, len, dyd, xd, nullptr, sizeof(scalar_t));
          cpu::fill_run_mult(dp, off, len, mult.data(), &prefetch);
        }
        cpu::for_each_segment(g, off, len, [&](int64_t rel, int64_t n, int64_t plane, int64_t c) {
          Vec sg, sgx;
          reduce_plane<scalar_t, acc, kAct>(dyd + off + rel, xd + off + rel, dp.active ? mult.data() + rel : nullptr,
                                            a[c], b[c], mean[c], n, sg, sgx, act);
          pending.add(plane, sg, sgx);
        });
      });
      pending.flush();
    });
    // Images in ascending order for every channel, channels innermost (unit stride).
    std::fill(sum_g, sum_g + g.C, 0.0);
    std::fill(sum_gx, sum_gx + g.C, 0.0);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = 0; c < g.C; ++c) {
        sum_g[c] += plane_g[n * g.C + c];
        sum_gx[c] += plane_gx[n * g.C + c];
      }
    return;
  }
  // ChannelsLast: a fixed number of groups of row tiles, each with per-column double accumulators.
  // The tiles group the float partial sums, so they must not depend on where the mask comes from: the same
  // sums from keep bits as from the key.
  const cpu::RowTiles tiles(g, /*philox_mult=*/false);
  const int64_t n_tiles = tiles.count();
  const int64_t n_groups = std::min<int64_t>(n_tiles, 64);
  std::vector<double> part_g(n_groups * g.C, 0.0), part_gx(n_groups * g.C, 0.0);
  at::parallel_for(0, n_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> sg(g.C), sgx(g.C), mult(dp.active ? tiles.mult_elems() : 0);
    std::vector<uint8_t> scratch(dp.active ? tiles.scratch_bytes() : 0);
    for (int64_t grp = begin; grp < end; ++grp) {
      double* pg = part_g.data() + grp * g.C;
      double* pgx = part_gx.data() + grp * g.C;
      for (int64_t ti = grp * n_tiles / n_groups; ti < (grp + 1) * n_tiles / n_groups; ++ti) {
        const auto t = tiles.tile(ti);
        auto prefetch = tiles.next_tile_prefetch(ti, end * n_tiles / n_groups, dyd, xd, nullptr, sizeof(scalar_t));
        std::fill(sg.begin(), sg.end(), acc(0));
        std::fill(sgx.begin(), sgx.end(), acc(0));
        // Rows in order, whatever the mask's source: the float sums come out the same from bits as from the key.
        // One row at a time (see for_each_row).
        tiles.for_each_row<1>(t, dp, mult.data(), scratch.data(), &prefetch,
                              [&](int64_t r, int64_t, const acc* row_mult, int64_t) {
          const int64_t off = (t.row0 + r) * g.C;
          reduce_row<scalar_t, acc, kAct>(dyd + off, xd + off, row_mult, a.data(), b.data(), mean.data(), g.C,
                                          sg.data(), sgx.data(), act);
        });
        for (int64_t c = 0; c < g.C; ++c) {
          pg[c] += sg[c];
          pgx[c] += sgx[c];
        }
      }
    }
  });
  // Groups in ascending order for every channel (deterministic), channels innermost (unit stride).
  std::fill(sum_g, sum_g + g.C, 0.0);
  std::fill(sum_gx, sum_gx + g.C, 0.0);
  for (int64_t grp = 0; grp < n_groups; ++grp) {
    for (int64_t c = 0; c < g.C; ++c) {
      sum_g[c] += part_g[grp * g.C + c];
      sum_gx[c] += part_gx[grp * g.C + c];
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> backward_reduce_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                       const at::Tensor& mean, const at::Tensor& rstd,
                                                       const OptTensor& weight, const OptTensor& bias,
                                                       PhiloxKey key, double p, const ActSpec& act,
                                                       const uint8_t* keep_bits_in, bool pass_bits) {
  const int64_t C = x.size(1);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto sum_g = at::zeros({C}, x.options().dtype(at::kDouble));
  auto sum_gx = at::zeros({C}, x.options().dtype(at::kDouble));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_backward_reduce_cpu", [&] {
      using acc = cpu::acc_t<scalar_t>;
      const auto prm = channel_params<acc>(mean, rstd, weight, bias);
      auto dp = cpu::dropout_params<acc>(key, p, keep_bits_in);
      const auto act_args = ActArgs<acc>::of(act);
      if (pass_bits) {
        dp.active = true;  // the pass bits are the mask (and the activation's gate), p = 0 included
        reduce_kernel<scalar_t, Act::Identity>(dy, x, prm, dp, act_args, sum_g.data_ptr<double>(),
                                               sum_gx.data_ptr<double>());
        return;
      }
      dispatch_act(act.kind, [&](auto kind) {
        reduce_kernel<scalar_t, decltype(kind)::value>(dy, x, prm, dp, act_args, sum_g.data_ptr<double>(),
                                                       sum_gx.data_ptr<double>());
      });
    });
  }
  // Σ g·x̂ = rstd · Σ g·(x − mean), in double, then rounded to acc (a loop: tensor ops cost more for few channels).
  AT_DISPATCH_FLOATING_TYPES(rstd.scalar_type(), "bnfused_backward_reduce_scale", [&] {
    const scalar_t* r = rstd.const_data_ptr<scalar_t>();
    double* gx = sum_gx.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) gx[c] *= static_cast<double>(r[c]);
  });
  if (acc_dtype == at::kDouble) return {sum_g, sum_gx};
  return {cpu::to_float(sum_g), cpu::to_float(sum_gx)};
}

}  // namespace bnfused
