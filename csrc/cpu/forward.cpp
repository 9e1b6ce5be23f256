// The forward elementwise pass on the CPU (BN -> activation -> dropout, optionally packing the keep bits) and the dropout
// keep mask, with the test hooks of its random number generation. It reads its input once; the dropout multipliers
// of a chunk are generated into an L1 buffer from Philox and consumed right away, so no mask tensor is ever written.
#include "cpu/row_tiles.h"

namespace bnfused {
namespace {

using cpu::kChunk;

// act(fma(x, a, b)).
template <Act kAct, typename acc>
inline at::vec::Vectorized<acc> act_affine(const at::vec::Vectorized<acc>& xv, const at::vec::Vectorized<acc>& a,
                                           const at::vec::Vectorized<acc>& b, const cpu::ActVec<acc>& act) {
  return cpu::act_forward_vec<kAct>(at::vec::fmadd(xv, a, b), act);
}

#ifdef BNFUSED_BF16X16
// The forward of 16 bfloat16 elements (cpu::BF16x16), a_lo / b_lo the coefficients of its low half, a_hi / b_hi
// of its high half (mult nullptr: no dropout).
template <Act kAct>
inline void forward_bf16x16(const at::BFloat16* x, const at::vec::Vectorized<float>& a_lo,
                            const at::vec::Vectorized<float>& a_hi, const at::vec::Vectorized<float>& b_lo,
                            const at::vec::Vectorized<float>& b_hi, const float* mult, at::BFloat16* y,
                            const cpu::ActVec<float>& act) {
  using Vec = at::vec::Vectorized<float>;
  const cpu::BF16x16 xv = cpu::load_bf16x16(x);
  Vec lo = act_affine<kAct>(Vec(xv.lo), a_lo, b_lo, act), hi = act_affine<kAct>(Vec(xv.hi), a_hi, b_hi, act);
  if (mult) {
    const cpu::BF16x16 m = cpu::load_f32x16_as_bf16_order(mult);
    lo = lo * Vec(m.lo);
    hi = hi * Vec(m.hi);
  }
  cpu::store_bf16x16({lo, hi}, y);
}
#endif

// y = act(fma(x, a, b)) [* mult] over n elements of one channel (x, y in scalar_t, math in acc); bfloat16 16 at
// a time (cpu::BF16x16).
template <typename scalar_t, typename acc, Act kAct>
inline void forward_run(const scalar_t* x, acc a, acc b, const acc* mult, scalar_t* y, int64_t n,
                        const cpu::ActVec<acc>& act) {
  using Vec = at::vec::Vectorized<acc>;
  const Vec va(a), vb(b);
#ifdef BNFUSED_BF16X16
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (n >= 16) {  // the last step overlapping the one before: same bits
      cpu::overlapping_steps<16>(n, [&](int64_t i) {
        forward_bf16x16<kAct>(x + i, va, va, vb, vb, mult ? mult + i : nullptr, y + i, act);
      });
      return;
    }
  }
#endif
  cpu::elementwise_loop<acc>(n, [&](int64_t i, int cnt) {
    Vec r = act_affine<kAct>(cpu::load_as<scalar_t, acc>(x + i, cnt), va, vb, act);
    if (mult) r = r * cpu::load(mult + i, cnt);
    cpu::store_as(r, y + i, cnt);
  });
}

// forward_run over kRows channels_last rows of C elements (row j at x + j * C, its multipliers at mult + j * ld):
// each per-channel coefficient vector is loaded once for all the rows. With cpu::bf16x16_rows, a and b are in
// BF16x16 lane order and the rows run 16 at a time.
template <typename scalar_t, typename acc, Act kAct, int kRows>
inline void forward_rows(const scalar_t* x, const acc* a, const acc* b, const acc* mult, int64_t ld, scalar_t* y,
                         int64_t C, const cpu::ActVec<acc>& act) {
  using Vec = at::vec::Vectorized<acc>;
#ifdef BNFUSED_BF16X16
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (cpu::bf16x16_rows<scalar_t>(C)) {
      for (int64_t i = 0; i < C; i += 16) {
        const Vec a_lo = Vec::loadu(a + i), a_hi = Vec::loadu(a + i + 8);
        const Vec b_lo = Vec::loadu(b + i), b_hi = Vec::loadu(b + i + 8);
        for (int j = 0; j < kRows; ++j)
          forward_bf16x16<kAct>(x + j * C + i, a_lo, a_hi, b_lo, b_hi, mult ? mult + j * ld + i : nullptr,
                                y + j * C + i, act);
      }
      return;
    }
  }
#endif
  cpu::elementwise_loop<acc>(C, [&](int64_t i, int cnt) {
    const Vec va = cpu::load(a + i, cnt), vb = cpu::load(b + i, cnt);
    for (int j = 0; j < kRows; ++j) {
      Vec r = act_affine<kAct>(cpu::load_as<scalar_t, acc>(x + j * C + i, cnt), va, vb, act);
      if (mult) r = r * cpu::load(mult + j * ld + i, cnt);
      cpu::store_as(r, y + j * C + i, cnt);
    }
  });
}

template <typename scalar_t, Act kAct>
void forward_kernel(const at::Tensor& x, const ChannelParams<cpu::acc_t<scalar_t>>& prm,
                    const cpu::DropoutParams<cpu::acc_t<scalar_t>>& dp, const ActArgs<cpu::acc_t<scalar_t>>& act_args,
                    at::Tensor& out) {
  using acc = cpu::acc_t<scalar_t>;
  const cpu::ActVec<acc> act(act_args);
  const Geometry g = geometry_of(x);
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  scalar_t* yd = out.data_ptr<scalar_t>();
  auto [a, b] = cpu::affine_arrays(prm, g.C);
  if (g.layout == Layout::ChannelsFirst) {
    cpu::for_each_plane_segment(g, dp, xd, nullptr, yd, sizeof(scalar_t),
                                [&](int64_t off, int64_t n, int64_t c, const acc* mult) {
      forward_run<scalar_t, acc, kAct>(xd + off, a[c], b[c], mult, yd + off, n, act);
    });
    return;
  }
  if (cpu::bf16x16_rows<scalar_t>(g.C)) {  // forward_rows' operand order
    a = cpu::bf16x16_order(a);
    b = cpu::bf16x16_order(b);
  }
  const cpu::RowTiles tiles(g, dp.active && !dp.bits_in);
  cpu::for_each_tile(tiles, dp, xd, nullptr, yd, sizeof(scalar_t),
                     [&](const cpu::RowTiles::Tile& t, acc* mult, uint8_t* scratch, cpu::NextRunPrefetch* prefetch) {
    auto rows_fn = [&](int64_t r, int64_t rows, const acc* row_mult, int64_t ld) {
      const int64_t off = (t.row0 + r) * g.C;
      cpu::dispatch_rows(rows, [&](auto n) {
        forward_rows<scalar_t, acc, kAct, decltype(n)::value>(xd + off, a.data(), b.data(), row_mult, ld, yd + off,
                                                              g.C, act);
      });
    };
    if (dp.active)  // pairs with dropout, single rows without (see for_each_row)
      tiles.for_each_row<2>(t, dp, mult, scratch, prefetch, rows_fn);
    else
      tiles.for_each_row<1>(t, dp, mult, scratch, prefetch, rows_fn);
  });
}

}  // namespace

void forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight,
                 const OptTensor& bias, PhiloxKey key, double p, const ActSpec& act, at::Tensor& out,
                 uint8_t* keep_bits_out) {
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_forward_cpu", [&] {
    using acc = cpu::acc_t<scalar_t>;
    dispatch_act(act.kind, [&](auto kind) {
      forward_kernel<scalar_t, decltype(kind)::value>(x, channel_params<acc>(mean, rstd, weight, bias),
                                                      cpu::dropout_params<acc>(key, p, nullptr, keep_bits_out),
                                                      ActArgs<acc>::of(act), out);
    });
  });
}

void dropout_mask_cpu(PhiloxKey key, double p, at::Tensor& keep) {
  const int64_t n = keep.numel();
  // Keep flags (1 or 0, one byte per element: a bool) straight from Philox into the output, no multipliers.
  uint8_t* out = reinterpret_cast<uint8_t*>(keep.data_ptr<bool>());
  const uint32_t threshold = threshold16(p);
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t off = chunk * kChunk, len = std::min(kChunk, n - off);
      cpu::fill_dropout_mult<uint8_t>(key, static_cast<uint64_t>(off), len, threshold, 1, out + off);
    }
  });
}

std::vector<bool> keep_run_cpu(PhiloxKey key, double p, uint64_t start, int64_t n) {
  std::vector<float> mult(n);
  cpu::fill_dropout_mult<float>(key, start, n, threshold16(p), 1.0f, mult.data());
  // The keep flags of the channels_last transposed tiles (sets_flags) must be the same pattern.
  std::vector<uint8_t> flags(n);
  cpu::fill_dropout_mult<uint8_t>(key, start, n, threshold16(p), 1, flags.data());
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(flags[i] == (mult[i] != 0.0f ? 1 : 0), "keep_run: keep flag ", i, " differs from the multiplier");
  return std::vector<bool>(mult.begin(), mult.end());
}

std::vector<uint8_t> keep_run_bytes_cpu(PhiloxKey key, double p, uint64_t start, int64_t n) {
  std::vector<float> mult(n);
  std::vector<uint8_t> bytes(((start + n + 7) >> 3) - (start >> 3), 0);
  cpu::fill_dropout_mult<float>(key, start, n, threshold16(p), 1.0f, mult.data(), 1, cpu::NoAfterBatch{}, bytes.data());
  if (start & 7) bytes.erase(bytes.begin());  // that block belongs to the run holding its first element
  return bytes;
}

std::vector<bool> keep_block_rows_cpu(PhiloxKey key, double p, uint64_t first, uint64_t stride, int64_t count) {
  TORCH_CHECK(count >= 1 && count <= 16, "keep_block_rows_cpu: count must be in 1..16");
  std::vector<float> mult(kMaskLanes * 16);
  cpu::fill_strided_rows_mult<float>(key, first, stride, count, threshold16(p), 1.0f, mult.data(), 16);
  std::vector<bool> keep;
  for (int r = 0; r < kMaskLanes; ++r)
    for (int64_t j = 0; j < count; ++j) keep.push_back(mult[r * 16 + j] != 0.0f);
  return keep;
}

}  // namespace bnfused
