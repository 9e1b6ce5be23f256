// CPU forward of BN + residual add + activation (+ dropout): y = act(fma(x, a, b) + residual) * mult, and for the
// backward the "pass" bits = keep AND act'(bn(x) + residual) = 1, packed 1 bit per element in memory order
// (keep_bits.h's format), so the backward kernels (backward_input.cpp, backward_reduce.cpp in add mode) need neither the
// residual nor the key. One read of x and residual, one write of y.
#include "cpu/row_tiles.h"

namespace bnfused {
namespace {

using cpu::kChunk;

// Bit j of the result = lane j of the comparison mask `mask` is set, for the first `cnt` lanes.
template <typename acc>
inline uint32_t mask_lanes(const at::vec::Vectorized<acc>& mask, int cnt) {
  using Vec = at::vec::Vectorized<acc>;
  uint32_t bits = 0;
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc, float>)
    bits = static_cast<uint32_t>(_mm256_movemask_ps(mask));
  else
    bits = static_cast<uint32_t>(_mm256_movemask_pd(mask));
#else
  alignas(64) acc lanes[Vec::size()];
  mask.store(lanes);
  for (int k = 0; k < Vec::size(); ++k) bits |= static_cast<uint32_t>(lanes[k] != acc(0)) << k;
#endif
  return cnt == Vec::size() ? bits : bits & ((1u << cnt) - 1u);
}

// Pass bits of one memory range [m0, m0 + n) of a tensor of numel elements, gathered in an L1 buffer and then
// written out. Whole bytes are stored; a first or last byte the range shares with its neighbour (m0 or m0 + n not a
// multiple of 8) is OR-ed in atomically, into a byte the caller zeroed before the parallel loop.
class PassBits {
 public:
  PassBits(uint8_t* out, int64_t numel) : out_(out), numel_(numel) {}

  void begin(int64_t m0, int64_t n) {
    m0_ = m0;
    n_ = n;
    lead_ = m0 & 7;
    buf_.assign((lead_ + n + 7) / 8 + 2, 0);
  }
  // The bits of elements m0 + rel .. m0 + rel + 7 (bit j = element rel + j); setting one twice is harmless.
  void set(int64_t rel, uint32_t bits) {
    const int64_t at = lead_ + rel;
    const uint32_t shifted = bits << (at & 7);
    buf_[at >> 3] |= static_cast<uint8_t>(shifted);
    buf_[(at >> 3) + 1] |= static_cast<uint8_t>(shifted >> 8);
  }
  void flush() {
    const int64_t first = m0_ >> 3, last = (m0_ + n_ - 1) >> 3;
    // The tensor's last byte belongs to its range alone (its bits past numel are unspecified).
    const bool shared_first = lead_ != 0, shared_last = ((m0_ + n_) & 7) != 0 && m0_ + n_ < numel_;
    for (int64_t b = first; b <= last; ++b) {
      const uint8_t v = buf_[b - first];
      if ((b == first && shared_first) || (b == last && shared_last))
        __atomic_fetch_or(out_ + b, v, __ATOMIC_RELAXED);
      else
        out_[b] = v;
    }
  }

 private:
  uint8_t* out_;
  int64_t numel_;
  int64_t m0_ = 0, n_ = 0, lead_ = 0;
  std::vector<uint8_t> buf_;
};

// One vector: y = act(fma(x, a, b) + r) [* mult] to y (cnt elements), and its pass bits (keep AND the gate).
template <typename scalar_t, typename acc, Act kAct>
inline uint32_t add_act_vec(const scalar_t* x, const scalar_t* r, const at::vec::Vectorized<acc>& a,
                            const at::vec::Vectorized<acc>& b, const acc* mult, int cnt, const cpu::ActVec<acc>& act,
                            scalar_t* y) {
  using Vec = at::vec::Vectorized<acc>;
  const Vec s = at::vec::fmadd(cpu::load_as<scalar_t, acc>(x, cnt), a, b) + cpu::load_as<scalar_t, acc>(r, cnt);
  Vec out = cpu::act_forward_vec<kAct>(s, act);
  Vec pass = cpu::act_pass_mask<kAct>(s, act);
  if (mult) {
    const Vec m = cpu::load(mult, cnt);
    out = out * m;
    pass = pass & (m != Vec(0));
  }
  cpu::store_as(out, y, cnt);
  return mask_lanes(pass, cnt);
}

// n elements of one channel (a plane segment) at memory offset rel of the range `bits` gathers (bits may be null).
template <typename scalar_t, typename acc, Act kAct>
inline void add_act_run(const scalar_t* x, const scalar_t* r, acc a, acc b, const acc* mult, scalar_t* y, int64_t n,
                        PassBits* bits, int64_t rel, const cpu::ActVec<acc>& act) {
  using Vec = at::vec::Vectorized<acc>;
  const Vec va(a), vb(b);
  cpu::elementwise_loop<acc>(n, [&](int64_t i, int cnt) {
    const uint32_t pass = add_act_vec<scalar_t, acc, kAct>(x + i, r + i, va, vb, mult ? mult + i : nullptr, cnt, act,
                                                           y + i);
    if (bits) bits->set(rel + i, pass);
  });
}

// One channels_last row of C elements, per-lane coefficients a[c], b[c].
template <typename scalar_t, typename acc, Act kAct>
inline void add_act_row(const scalar_t* x, const scalar_t* r, const acc* a, const acc* b, const acc* mult,
                        scalar_t* y, int64_t C, PassBits* bits, int64_t rel, const cpu::ActVec<acc>& act) {
  cpu::elementwise_loop<acc>(C, [&](int64_t i, int cnt) {
    const uint32_t pass = add_act_vec<scalar_t, acc, kAct>(x + i, r + i, cpu::load(a + i, cnt), cpu::load(b + i, cnt),
                                                           mult ? mult + i : nullptr, cnt, act, y + i);
    if (bits) bits->set(rel + i, pass);
  });
}

template <typename scalar_t, Act kAct>
void add_act_forward_kernel(const at::Tensor& x, const at::Tensor& residual,
                            const ChannelParams<cpu::acc_t<scalar_t>>& prm,
                            const cpu::DropoutParams<cpu::acc_t<scalar_t>>& dp,
                            const ActArgs<cpu::acc_t<scalar_t>>& act_args, at::Tensor& out, uint8_t* bits_out) {
  using acc = cpu::acc_t<scalar_t>;
  const cpu::ActVec<acc> act(act_args);
  const Geometry g = geometry_of(x);
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* rd = residual.const_data_ptr<scalar_t>();
  scalar_t* yd = out.data_ptr<scalar_t>();
  const auto [a, b] = cpu::affine_arrays(prm, g.C);
  const int64_t numel = g.N * g.C * g.S;
  if (g.layout == Layout::ChannelsFirst) {
    // Threads take chunks of kChunk elements of memory (not whole planes as forward_cpu does): every chunk then
    // starts on a byte of the pass bits, and no byte is shared between threads.
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    at::parallel_for(0, chunks, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc> mult(dp.active ? kChunk : 0);
      PassBits bits(bits_out, numel);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t off = chunk * kChunk, len = std::min(kChunk, numel - off);
        const int64_t next = chunk + 1 < end ? std::min(kChunk, numel - off - len) : 0;
        auto prefetch = cpu::NextRunPrefetch::range(xd, rd, yd, (off + len) * sizeof(scalar_t), next * sizeof(scalar_t));
        if (dp.active) cpu::fill_run_mult(dp, off, len, mult.data(), &prefetch);
        if (bits_out) bits.begin(off, len);
        cpu::for_each_segment(g, off, len, [&](int64_t rel, int64_t n, int64_t, int64_t c) {
          add_act_run<scalar_t, acc, kAct>(xd + off + rel, rd + off + rel, a[c], b[c],
                                           dp.active ? mult.data() + rel : nullptr, yd + off + rel, n,
                                           bits_out ? &bits : nullptr, rel, act);
        });
        if (bits_out) bits.flush();
      }
    });
    return;
  }
  // ChannelsLast: the row tiles of the forward (their dropout multipliers in memory order); a tile's pass bits are
  // its contiguous range, whose edge bytes may be shared with the neighbouring tiles.
  const cpu::RowTiles tiles(g, dp.active);
  if (bits_out) {
    for (int64_t ti = 0; ti < tiles.count(); ++ti) {
      const auto t = tiles.tile(ti);
      bits_out[(t.row0 * g.C) >> 3] = 0;
      bits_out[((t.row0 + t.rows) * g.C - 1) >> 3] = 0;
    }
  }
  at::parallel_for(0, tiles.count(), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> mult(dp.active ? tiles.mult_elems() : 0);
    std::vector<uint8_t> scratch(dp.active ? tiles.scratch_bytes() : 0);
    PassBits bits(bits_out, numel);
    for (int64_t ti = begin; ti < end; ++ti) {
      const auto t = tiles.tile(ti);
      auto prefetch = tiles.next_tile_prefetch(ti, end, xd, rd, yd, sizeof(scalar_t));
      if (bits_out) bits.begin(t.row0 * g.C, t.rows * g.C);
      tiles.for_each_row<1>(t, dp, mult.data(), scratch.data(), &prefetch,
                            [&](int64_t r, int64_t, const acc* row_mult, int64_t) {
        const int64_t off = (t.row0 + r) * g.C;
        add_act_row<scalar_t, acc, kAct>(xd + off, rd + off, a.data(), b.data(), row_mult, yd + off, g.C,
                                         bits_out ? &bits : nullptr, r * g.C, act);
      });
      if (bits_out) bits.flush();
    }
  });
}

}  // namespace

void add_relu_forward_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& mean,
                          const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias, PhiloxKey key,
                          double p, const ActSpec& act, at::Tensor& out, uint8_t* pass_bits_out) {
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_add_relu_forward_cpu", [&] {
    using acc = cpu::acc_t<scalar_t>;
    dispatch_gate_act(act.kind, [&](auto kind) {
      add_act_forward_kernel<scalar_t, decltype(kind)::value>(x, residual, channel_params<acc>(mean, rstd, weight, bias),
                                                              cpu::dropout_params<acc>(key, p), ActArgs<acc>::of(act),
                                                              out, pass_bits_out);
    });
  });
}

}  // namespace bnfused
