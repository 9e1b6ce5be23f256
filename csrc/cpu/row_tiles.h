// Tiling of the ChannelsLast (N, S, C) layout into tiles of consecutive rows, and the dropout multipliers of a
// tile laid out like the data (mult[t * ld + c]). A tile never crosses a batch boundary when S > 1, so channel c
// of a tile is one run of consecutive logical indices (n*C + c)*S + s0 ... ; for S == 1 (2-d input) row r is
// itself the logical run r*C ... r*C + C - 1.
// When S % 8 == 0 every channel run starts on a Philox block and tiles hold whole groups of 8 rows, so one block
// is exactly 8 rows of one channel: the multipliers are generated straight into row order, 8 or 16 channels per
// Philox batch. Otherwise each channel's run is generated contiguously and transposed.
#pragma once
#include "cpu/cpu_common.h"
#include "cpu/dropout_mult.h"
#include "cpu/keep_bits.h"

namespace bnfused::cpu {

struct RowTiles {
  int64_t N, S, C;
  int64_t rows_per_tile;
  int64_t tiles_per_batch;  // S > 1 only

  explicit RowTiles(const Geometry& g) : N(g.N), S(g.S), C(g.C) {
    // Up to 16K elements per tile (multipliers stay in L2), and up to kBatchElems rows so one Philox batch
    // serves a whole channel run of the tile.
    rows_per_tile = std::max<int64_t>(1, std::min<int64_t>(kBatchElems, 16384 / std::max<int64_t>(C, 1)));
    if (block_rows()) rows_per_tile = std::max<int64_t>(kMaskLanes, rows_per_tile / kMaskLanes * kMaskLanes);
    tiles_per_batch = S > 1 ? (S + rows_per_tile - 1) / rows_per_tile : 0;
  }
  int64_t count() const { return S > 1 ? N * tiles_per_batch : (N + rows_per_tile - 1) / rows_per_tile; }

  struct Tile {
    int64_t row0;  // first row (n*S + s0)
    int64_t rows;
    int64_t n, s0;
  };
  Tile tile(int64_t index) const {
    if (S > 1) {
      const int64_t n = index / tiles_per_batch, s0 = (index % tiles_per_batch) * rows_per_tile;
      return Tile{n * S + s0, std::min(rows_per_tile, S - s0), n, s0};
    }
    const int64_t r0 = index * rows_per_tile;
    return Tile{r0, std::min(rows_per_tile, N - r0), r0, 0};
  }

  // Prefetch (into L2) of the streams' part in tile ti + 1 if it is below `end`, else of nothing. The bases are the
  // tensors' data pointers; a tile's rows are contiguous in memory.
  NextRunPrefetch next_tile_prefetch(int64_t ti, int64_t end, const void* in0, const void* in1, void* out,
                                     int64_t elem_size) const {
    if (ti + 1 >= end) return NextRunPrefetch(nullptr, nullptr, nullptr, 0);
    const Tile next = tile(ti + 1);
    return NextRunPrefetch::range(in0, in1, out, next.row0 * C * elem_size, next.rows * C * elem_size, true);
  }

  // Channel runs start on Philox blocks (see the top of the file).
  bool block_rows() const { return S > 1 && S % kMaskLanes == 0; }

  // Row stride of a tile's multipliers: block rows write whole groups of 8 channels; the transposed path pads so
  // the stores of 8x8 blocks do not alias the loads 4 KiB apart.
  int64_t mult_stride() const {
    if (block_rows()) return (C + 7) / 8 * 8;
    return S > 1 ? C + 8 : C;
  }
  int64_t mult_elems() const { return rows_per_tile * mult_stride(); }
  int64_t scratch_elems() const { return S > 1 && !block_rows() ? mult_elems() : 0; }  // fill_mult's scratch

  // Multipliers of tile t as mult[r * mult_stride() + c]. Without block rows, for S > 1 each channel's run is
  // generated contiguously into `scratch` (C * rows_per_tile values), two channels at a time, and transposed.
  // With Philox, `prefetch` (if given) fetches the kernel's next tile meanwhile.
  template <typename acc_type>
  void fill_mult(const Tile& t, const DropoutParams<acc_type>& dp, acc_type* mult, acc_type* scratch,
                 NextRunPrefetch* prefetch = nullptr) const {
    if (S == 1) {
      fill_run_mult(dp, static_cast<uint64_t>(t.row0 * C), t.rows * C, mult, prefetch);
      return;
    }
    if (block_rows()) {
      const int64_t ld = mult_stride();
      const uint64_t blocks_per_channel = static_cast<uint64_t>(S / kMaskLanes);
      for (int64_t r0 = 0; r0 < t.rows; r0 += kMaskLanes) {
        const uint64_t channel0 = static_cast<uint64_t>((t.n * C * S + t.s0 + r0) / kMaskLanes);  // block of c = 0
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
          const uint64_t first = channel0 + c0 * blocks_per_channel;
          const int64_t count = std::min<int64_t>(16, C - c0);
          acc_type* out = mult + r0 * ld + c0;
          if (dp.bits_in) {
            unpack_block_rows(dp.bits_in, first, blocks_per_channel, count, dp.scale, out, ld);
            continue;
          }
          fill_strided_rows_mult(dp.key, first, blocks_per_channel, count, dp.threshold, dp.scale, out, ld);
          if (dp.bits_out) pack_block_rows(out, ld, count, first, blocks_per_channel, dp.bits_out);
          if (prefetch) prefetch->upto(r0 * C + (c0 + count) * kMaskLanes, t.rows * C);
        }
      }
      return;
    }
    auto start = [&](int64_t c) { return static_cast<uint64_t>((t.n * C + c) * S + t.s0); };
    if (dp.bits_in) {
      for (int64_t c = 0; c < C; ++c) unpack_keep_bits(dp.bits_in, start(c), t.rows, dp.scale, scratch + c * t.rows);
    } else {
      int64_t c = 0;
      for (; c + 2 <= C; c += 2) {
        const uint64_t starts[2] = {start(c), start(c + 1)};
        acc_type* const outs[2] = {scratch + c * t.rows, scratch + (c + 1) * t.rows};
        fill_dropout_mult_pair(dp.key, starts, t.rows, dp.threshold, dp.scale, outs);
        if (prefetch) prefetch->upto(c + 2, C);
      }
      for (; c < C; ++c) fill_dropout_mult(dp.key, start(c), t.rows, dp.threshold, dp.scale, scratch + c * t.rows);
      if (prefetch) prefetch->upto(C, C);
      if (dp.bits_out)
        for (c = 0; c < C; ++c) pack_keep_bits(scratch + c * t.rows, start(c), t.rows, dp.key, dp.threshold, dp.bits_out);
    }
    transpose(scratch, C, t.rows, mult, mult_stride());
  }

  // out[r * ld + c] = in[c * rows + r]
  template <typename acc_type>
  static void transpose(const acc_type* in, int64_t cols, int64_t rows, acc_type* out, int64_t ld) {
    int64_t c0 = 0;
#ifdef BNFUSED_PHILOX_AVX2
    if constexpr (std::is_same_v<acc_type, float>) {
      for (; c0 + 8 <= cols; c0 += 8) {
        int64_t r0 = 0;
        for (; r0 + 8 <= rows; r0 += 8) transpose8x8(in + c0 * rows + r0, rows, out + r0 * ld + c0, ld);
        for (; r0 < rows; ++r0)
          for (int64_t c = c0; c < c0 + 8; ++c) out[r0 * ld + c] = in[c * rows + r0];
      }
    }
#endif
    for (; c0 < cols; ++c0)
      for (int64_t r = 0; r < rows; ++r) out[r * ld + c0] = in[c0 * rows + r];
  }

#ifdef BNFUSED_PHILOX_AVX2
  // 8x8 float transpose: rows of `in` (stride in_stride) become columns of `out` (stride out_stride).
  static void transpose8x8(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
    __m256 r[8], t[8];
    for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(in + k * in_stride);
    for (int k = 0; k < 8; k += 2) {
      t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
      t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
      r[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int k = 0; k < 4; ++k) {
      _mm256_storeu_ps(out + k * out_stride, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
      _mm256_storeu_ps(out + (k + 4) * out_stride, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
    }
  }
#endif
};

}  // namespace bnfused::cpu
