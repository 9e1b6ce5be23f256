// CPU forward of BN + residual add + ReLU (+ dropout): y = relu(fma(x, a, b) + residual) * mult, and for the
// backward the "pass" bits [y > 0] = keep AND bn(x) + residual > 0, packed 1 bit per element in memory order
// (keep_bits.h's format), so the backward kernels (backward_input.cpp, backward_reduce.cpp in add mode) need neither the
// residual nor the key. One read of x and residual, one write of y.
#include "cpu/row_tiles.h"

namespace bnfused {
namespace {

using cpu::kChunk;

// Bit j of the result = lane j of v is > 0 (false for NaN), for the first `cnt` lanes.
template <typename acc>
inline uint32_t positive_lanes(const at::vec::Vectorized<acc>& v, int cnt) {
  using Vec = at::vec::Vectorized<acc>;
  uint32_t bits = 0;
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc, float>)
    bits = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ)));
  else
    bits = static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_GT_OQ)));
#else
  alignas(64) acc lanes[Vec::size()];
  v.store(lanes);
  for (int k = 0; k < Vec::size(); ++k) bits |= static_cast<uint32_t>(lanes[k] > acc(0)) << k;
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

// One vector: y = relu(fma(x, a, b) + r) [* mult], the ReLU as clamp_min (passes NaN and -0, like torch.relu).
template <typename scalar_t, typename acc>
inline at::vec::Vectorized<acc> add_relu_vec(const scalar_t* x, const scalar_t* r, const at::vec::Vectorized<acc>& a,
                                             const at::vec::Vectorized<acc>& b, const acc* mult, int cnt) {
  using Vec = at::vec::Vectorized<acc>;
  const Vec s = at::vec::fmadd(cpu::load_as<scalar_t, acc>(x, cnt), a, b) + cpu::load_as<scalar_t, acc>(r, cnt);
  Vec y = at::vec::clamp_min(s, Vec(0));
  if (mult) y = y * cpu::load(mult, cnt);
  return y;
}

// n elements of one channel (a plane segment) at memory offset rel of the range `bits` gathers (bits may be null).
template <typename scalar_t, typename acc>
inline void add_relu_run(const scalar_t* x, const scalar_t* r, acc a, acc b, const acc* mult, scalar_t* y, int64_t n,
                         PassBits* bits, int64_t rel) {
  using Vec = at::vec::Vectorized<acc>;
  const Vec va(a), vb(b);
  cpu::elementwise_loop<acc>(n, [&](int64_t i, int cnt) {
    const Vec out = add_relu_vec<scalar_t, acc>(x + i, r + i, va, vb, mult ? mult + i : nullptr, cnt);
    cpu::store_as(out, y + i, cnt);
    if (bits) bits->set(rel + i, positive_lanes(out, cnt));
  });
}

// One channels_last row of C elements, per-lane coefficients a[c], b[c].
template <typename scalar_t, typename acc>
inline void add_relu_row(const scalar_t* x, const scalar_t* r, const acc* a, const acc* b, const acc* mult,
                         scalar_t* y, int64_t C, PassBits* bits, int64_t rel) {
  cpu::elementwise_loop<acc>(C, [&](int64_t i, int cnt) {
    const auto out = add_relu_vec<scalar_t, acc>(x + i, r + i, cpu::load(a + i, cnt), cpu::load(b + i, cnt),
                                                 mult ? mult + i : nullptr, cnt);
    cpu::store_as(out, y + i, cnt);
    if (bits) bits->set(rel + i, positive_lanes(out, cnt));
  });
}

template <typename scalar_t>
void add_relu_forward_kernel(const at::Tensor& x, const at::Tensor& residual,
                             const ChannelParams<cpu::acc_t<scalar_t>>& prm,
                             const cpu::DropoutParams<cpu::acc_t<scalar_t>>& dp, at::Tensor& out, uint8_t* bits_out) {
  using acc = cpu::acc_t<scalar_t>;
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
          add_relu_run<scalar_t, acc>(xd + off + rel, rd + off + rel, a[c], b[c],
                                      dp.active ? mult.data() + rel : nullptr, yd + off + rel, n,
                                      bits_out ? &bits : nullptr, rel);
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
        add_relu_row<scalar_t, acc>(xd + off, rd + off, a.data(), b.data(), row_mult, yd + off, g.C,
                                    bits_out ? &bits : nullptr, r * g.C);
      });
      if (bits_out) bits.flush();
    }
  });
}

}  // namespace

void add_relu_forward_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& mean,
                          const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias, PhiloxKey key,
                          double p, at::Tensor& out, uint8_t* pass_bits_out) {
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_add_relu_forward_cpu", [&] {
    using acc = cpu::acc_t<scalar_t>;
    add_relu_forward_kernel<scalar_t>(x, residual, channel_params<acc>(mean, rstd, weight, bias),
                                      cpu::dropout_params<acc>(key, p), out, pass_bits_out);
  });
}

}  // namespace bnfused
