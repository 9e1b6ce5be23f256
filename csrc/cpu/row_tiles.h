// Tiling of the ChannelsLast (N, S, C) layout into tiles of consecutive rows, and the dropout multipliers of a
// tile laid out like the data (mult[t * ld + c]). A tile never crosses a batch boundary when S > 1, so channel c
// of a tile is one run of consecutive logical indices (n*C + c)*S + s0 ... ; for S == 1 (2-d input) row r is
// itself the logical run r*C ... r*C + C - 1.
// When S % 8 == 0 every channel run starts on a Philox block and tiles hold whole groups of 8 rows, so one block
// is exactly 8 rows of one channel: the multipliers are generated straight into row order, 8 or 16 channels per
// Philox batch. Otherwise each channel's run is generated contiguously as keep flags and transposed.
// The keep bits (keep_bits.h) follow memory order, so a tile's bits are the contiguous bit range of its rows.
#pragma once
#include "cpu/cpu_common.h"
#include "cpu/dropout_mult.h"
#include "cpu/keep_bits.h"

namespace bnfused::cpu {

constexpr int64_t kTileElems = 16384;        // elements of a row tile (but see RowTiles' constructor)
constexpr int64_t kWholeImageElems = 65536;  // transposed path: images up to this size are one tile
constexpr int64_t kMinRunRows = 56;          // transposed path: rows of a tile, at least (one Philox set each)
constexpr int64_t kMaxTileElems = 1 << 20;   // transposed path: ... as long as its buffers stay within 4 MiB
// body(std::integral_constant<int, K>{}) for a group of n rows (n = 1 or 2, see RowTiles::for_each_row): the row
// passes are compiled for both counts.
template <typename Body>
inline void dispatch_rows(int64_t n, Body&& body) {
  if (n == 2)
    body(std::integral_constant<int, 2>{});
  else
    body(std::integral_constant<int, 1>{});
}

struct RowTiles {
  int64_t N, S, C;
  int64_t rows_per_tile;
  int64_t tiles_per_batch;  // S > 1 only

  // philox_mult: the kernel generates the tiles' multipliers from Philox (not from keep bits, not p == 0).
  RowTiles(const Geometry& g, bool philox_mult) : N(g.N), S(g.S), C(g.C) {
    const int64_t c = std::max<int64_t>(C, 1);
    // Up to 16K elements per tile (multipliers stay in L2), and up to kBatchElems rows so one Philox batch
    // serves a whole channel run of the tile.
    rows_per_tile = std::max<int64_t>(1, std::min<int64_t>(kBatchElems, kTileElems / c));
    if (block_rows()) {
      // Multipliers generated from Philox stay in L1 beside the streamed rows (kChunk elements, as channels-first
      // runs): 64x64x56x56 forward 6.4 -> 5.6 ms. Read back from bits, bigger tiles amortise the per-tile work.
      if (philox_mult) rows_per_tile = std::max<int64_t>(1, std::min<int64_t>(kBatchElems, kChunk / c));
      rows_per_tile = std::max<int64_t>(kMaskLanes, rows_per_tile / kMaskLanes * kMaskLanes);
    } else if (S > 1) {
      // Channel runs are generated one by one and transposed; a short run wastes most of its Philox set (64
      // elements). A whole image is one logical run, so it wastes nothing: 128x512x7x7 forward 4.5 -> 1.7 ms.
      // Bounds are on the buffers' padded size (mult_stride()); kMinRunRows yields to kMaxTileElems for huge C.
      const int64_t min_rows = std::max<int64_t>(1, std::min(kMinRunRows, kMaxTileElems / (C + 8)));
      rows_per_tile = S * (C + 8) <= kWholeImageElems ? S : std::min(S, std::max(min_rows, rows_per_tile));
    }
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
  int64_t scratch_bytes() const { return S > 1 && !block_rows() ? mult_elems() : 0; }  // fill_mult's keep flags

  // Multipliers of tile t from Philox as mult[r * mult_stride() + c] (packing the keep bits when the forward is
  // asked for them; for_each_row unpacks bits itself, two rows at a time). Without block rows, for S > 1 each
  // channel's run is generated contiguously as keep flags (one byte per element) into `scratch` (C * rows_per_tile
  // bytes), two channels at a time, and transposed into multipliers. With Philox, `prefetch` (if given) fetches the
  // kernel's next tile meanwhile.
  template <typename acc_type>
  void fill_mult(const Tile& t, const DropoutParams<acc_type>& dp, acc_type* mult, uint8_t* scratch,
                 NextRunPrefetch* prefetch = nullptr) const {
    if (S == 1) {  // memory order is logical order
      fill_run_mult(dp, static_cast<uint64_t>(t.row0 * C), t.rows * C, mult, prefetch);
      return;
    }
    const int64_t ld = mult_stride();
    if (block_rows()) {
      for (int64_t r0 = 0; r0 < t.rows; r0 += kMaskLanes) fill_row_block(t, dp, r0, mult + r0 * ld, prefetch);
      if (dp.bits_out && C % kMaskLanes == 0) return;  // fill_row_block wrote them
    } else {
      fill_flags(t, dp, scratch, prefetch);
      expand_transpose(scratch, C, t.rows, dp.scale, mult, ld);
    }
    if (dp.bits_out) pack_bits(t, mult, dp);
  }

  // Block rows: multipliers of rows r0 .. r0 + 7 of tile t into out[(r - r0) * mult_stride() + c], from Philox. With
  // C % 8 == 0 each row is whole bytes of the keep bits, which the Philox pass writes itself.
  template <typename acc_type>
  void fill_row_block(const Tile& t, const DropoutParams<acc_type>& dp, int64_t r0, acc_type* out,
                      NextRunPrefetch* prefetch) const {
    const bool row_bits = dp.bits_out && C % kMaskLanes == 0;
    const uint64_t blocks_per_channel = static_cast<uint64_t>(S / kMaskLanes);
    const uint64_t channel0 = static_cast<uint64_t>((t.n * C * S + t.s0 + r0) / kMaskLanes);  // block of c = 0
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const int64_t count = std::min<int64_t>(16, C - c0);
      fill_strided_rows_mult(dp.key, channel0 + c0 * blocks_per_channel, blocks_per_channel, count, dp.threshold,
                             dp.scale, out + c0, mult_stride(),
                             row_bits ? dp.bits_out + ((t.row0 + r0) * C + c0) / 8 : nullptr, C / 8);
      if (prefetch) prefetch->upto(r0 * C + (c0 + count) * kMaskLanes, t.rows * C);
    }
  }

  // f(r, n, mult, ld) for the rows of tile t in order, in groups of n <= kGroup rows (kGroup = 1 or 2): rows
  // r .. r + n - 1, row r + j's multipliers at mult + j * ld (nullptr without dropout). An elementwise pass loads
  // each per-channel coefficient once per pair of rows: one row at a time, channels_last rows spent more L1 loads on
  // coefficients than on data. But a group's pass walks its rows' columns side by side, which the memory system
  // likes less than one row after another: backward_reduce and backward_input at 64x64x56x56 ran 25 % slower with
  // groups of 4 rows, backward_reduce 2-4 % slower even with pairs, and backward_input with pairs 1.4-1.6x slower
  // at C = 256 and 512, so both take kGroup = 1. The forward from Philox (compute-bound) gains 5-10 % with pairs at
  // C = 64 and 256; without dropout (memory-bound) it ran 2-3 % faster one row at a time, and takes that.
  // The multipliers are made as late as they can be, so the ones a row reads sit in L1: from keep bits a group at
  // a time (a 16K-element tile's were 64 KB); block rows 8 rows at a time; the transposed path from Philox with
  // C % 8 == 0 expands its keep flags 8 rows at a time, the keep bits coming from the same transpose (a whole
  // 14x14x256 image's multipliers were 207 KB). Elsewhere (2-d rows, keep bits packed across rows when
  // C % 8 != 0) fill_mult fills the tile's multipliers first.
  template <int kGroup, typename acc_type, typename RowsFn>
  void for_each_row(const Tile& t, const DropoutParams<acc_type>& dp, acc_type* mult, uint8_t* scratch,
                    NextRunPrefetch* prefetch, RowsFn&& f) const {
    static_assert(kGroup == 1 || kGroup == 2, "rows one or two at a time");
    const int64_t ld = mult_stride();
    // Rows [from, to) in groups; row r's multipliers at base + (r - from) * row_ld.
    auto groups = [&](int64_t from, int64_t to, const acc_type* base, int64_t row_ld) {
      for (int64_t r = from; r < to; r += kGroup)
        f(r, std::min<int64_t>(kGroup, to - r), base ? base + (r - from) * row_ld : base, row_ld);
    };
    if (!dp.active) {
      groups(0, t.rows, static_cast<const acc_type*>(nullptr), 0);
      return;
    }
    if (dp.bits_in) {  // each group's multipliers unpacked right before it, into L1 (a tile's were 64 KB)
      for (int64_t r = 0; r < t.rows; r += kGroup) {
        const int64_t n = std::min<int64_t>(kGroup, t.rows - r);
        unpack_keep_bits(dp.bits_in, static_cast<uint64_t>((t.row0 + r) * C), n * C, dp.scale, mult);
        f(r, n, static_cast<const acc_type*>(mult), C);
      }
      return;
    }
    if (block_rows() && (C % kMaskLanes == 0 || !dp.bits_out)) {  // 8 rows generated, then those 8 applied
      for (int64_t r0 = 0; r0 < t.rows; r0 += kMaskLanes) {
        fill_row_block(t, dp, r0, mult, prefetch);
        groups(r0, r0 + kMaskLanes, static_cast<const acc_type*>(mult), ld);
      }
      return;
    }
#ifdef BNFUSED_PHILOX_AVX2
    if constexpr (std::is_same_v<acc_type, float>) {
      if (S > 1 && !block_rows() && C % kMaskLanes == 0 && t.rows >= kMaskLanes) {
        fill_flags(t, dp, scratch, prefetch);
        int64_t done = 0;  // rows applied; the last block of 8 may overlap the one before
        overlapping_steps<kMaskLanes>(t.rows, [&](int64_t r0) {
          uint8_t* bits = dp.bits_out ? dp.bits_out + (t.row0 + r0) * (C / 8) : nullptr;
          for (int64_t c0 = 0; c0 < C; c0 += 8)
            expand_transpose8x8(scratch + c0 * t.rows + r0, t.rows, dp.scale, mult + c0, ld,
                                bits ? bits + c0 / 8 : nullptr, C / 8);
          groups(done, r0 + kMaskLanes, static_cast<const acc_type*>(mult + (done - r0) * ld), ld);
          done = r0 + kMaskLanes;
        });
        return;
      }
    }
#endif
    fill_mult(t, dp, mult, scratch, prefetch);
    groups(0, t.rows, static_cast<const acc_type*>(mult), ld);
  }

  // Keep flags (1 kept, 0 dropped) of tile t's channel runs (transposed path, S > 1): scratch[c * t.rows + r].
  // Flags, not multipliers: a quarter of the bytes through the transpose.
  template <typename acc_type>
  void fill_flags(const Tile& t, const DropoutParams<acc_type>& dp, uint8_t* scratch, NextRunPrefetch* prefetch) const {
    auto start = [&](int64_t c) { return static_cast<uint64_t>((t.n * C + c) * S + t.s0); };
    constexpr uint8_t kept = 1;
    if (t.rows == S) {  // a whole image: its channel runs are one logical run
      fill_dropout_mult(dp.key, start(0), C * S, dp.threshold, kept, scratch, 1, prefetch_progress(prefetch));
      return;
    }
    int64_t c = 0;
    for (; c + 2 <= C; c += 2) {
      const uint64_t starts[2] = {start(c), start(c + 1)};
      uint8_t* const outs[2] = {scratch + c * t.rows, scratch + (c + 1) * t.rows};
      fill_dropout_mult_pair(dp.key, starts, t.rows, dp.threshold, kept, outs);
      if (prefetch) prefetch->upto(c + 2, C);
    }
    for (; c < C; ++c) fill_dropout_mult(dp.key, start(c), t.rows, dp.threshold, kept, scratch + c * t.rows);
    if (prefetch) prefetch->upto(C, C);
  }

  // Logical index ((n * C + c) * S + s) of the element at memory index m = (n * S + s) * C + c (S > 1).
  uint64_t logical_index(uint64_t m) const {
    const uint64_t row = m / C, c = m % C, n = row / S, s = row % S;
    return (n * C + c) * S + s;
  }

  // Packs tile t's keep bits from its multipliers: the bytes whose first element lies in the tile, in memory order.
  template <typename acc_type>
  void pack_bits(const Tile& t, const acc_type* mult, const DropoutParams<acc_type>& dp) const {
    const int64_t ld = mult_stride(), c8 = C / 8;
    if (C % 8 == 0) {  // every row is whole bytes: one movemask per 8 channels, written sequentially
      uint8_t* out = dp.bits_out + t.row0 * c8;
      for (int64_t r = 0; r < t.rows; ++r)
        for (int64_t j = 0; j < c8; ++j) out[r * c8 + j] = keep_byte(mult + r * ld + 8 * j);
      return;
    }
    // Bytes span rows: gather bit by bit. The last byte's bits past the tile come from Philox (past numel: 0).
    const uint64_t m0 = static_cast<uint64_t>(t.row0 * C), end = static_cast<uint64_t>((t.row0 + t.rows) * C);
    const uint64_t numel = static_cast<uint64_t>(N * S * C), width = static_cast<uint64_t>(C);
    for (uint64_t byte_index = (m0 + 7) / 8; 8 * byte_index < end; ++byte_index) {
      uint32_t byte = 0;
      for (int k = 0; k < kMaskLanes; ++k) {
        const uint64_t m = 8 * byte_index + k;
        bool kept;
        if (m < end)
          kept = mult[(m - m0) / width * ld + (m - m0) % width] != acc_type(0);
        else
          kept = m < numel && philox_keep_bit(dp.key, logical_index(m), dp.threshold);
        byte |= static_cast<uint32_t>(kept) << k;
      }
      dp.bits_out[byte_index] = static_cast<uint8_t>(byte);
    }
  }

  // out[r * ld + c] = in[c * rows + r] ? scale : 0, from keep flags (0 or 1).
  template <typename acc_type>
  static void expand_transpose(const uint8_t* in, int64_t cols, int64_t rows, acc_type scale, acc_type* out,
                               int64_t ld) {
    int64_t c0 = 0;
#ifdef BNFUSED_PHILOX_AVX2
    if constexpr (std::is_same_v<acc_type, float>) {
      if (rows >= 8) {
        for (; c0 + 8 <= cols; c0 += 8) {
          // The last block of rows ends at `rows`, overlapping the one before: its rows are written twice, alike.
          overlapping_steps<8>(rows, [&](int64_t r0) {
            expand_transpose8x8(in + c0 * rows + r0, rows, scale, out + r0 * ld + c0, ld, nullptr, 0);
          });
        }
      }
    }
#endif
    for (; c0 < cols; ++c0)
      for (int64_t r = 0; r < rows; ++r) out[r * ld + c0] = in[c0 * rows + r] ? scale : acc_type(0);
  }

#ifdef BNFUSED_PHILOX_AVX2
  // 8x8 block of expand_transpose: flag rows k of `in` (8 bytes each, stride in_stride) become float columns. With
  // `bits`, also each output row's keep byte (bit j = column j) at bits[row * bits_stride].
  __attribute__((always_inline)) static void expand_transpose8x8(const uint8_t* in, int64_t in_stride, float scale, float* out, int64_t out_stride,
                                  uint8_t* bits, int64_t bits_stride) {
    __m128i a[8];
    for (int k = 0; k < 8; ++k) a[k] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + k * in_stride));
    // Interleave bytes, then pairs, then quads: d[k] holds output rows 2k (low 8 bytes) and 2k + 1 (high 8 bytes),
    // byte j of each = input row j.
    const __m128i b0 = _mm_unpacklo_epi8(a[0], a[1]), b1 = _mm_unpacklo_epi8(a[2], a[3]);
    const __m128i b2 = _mm_unpacklo_epi8(a[4], a[5]), b3 = _mm_unpacklo_epi8(a[6], a[7]);
    const __m128i c0 = _mm_unpacklo_epi16(b0, b1), c1 = _mm_unpackhi_epi16(b0, b1);
    const __m128i c2 = _mm_unpacklo_epi16(b2, b3), c3 = _mm_unpackhi_epi16(b2, b3);
    const __m128i d[4] = {_mm_unpacklo_epi32(c0, c2), _mm_unpackhi_epi32(c0, c2), _mm_unpacklo_epi32(c1, c3),
                          _mm_unpackhi_epi32(c1, c3)};
    const __m256 vscale = _mm256_set1_ps(scale);
    const __m256i zero = _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k) {
      if (bits) {
        const int rows2 = _mm_movemask_epi8(_mm_cmpgt_epi8(d[k], _mm_setzero_si128()));  // flags are 0 or 1
        bits[(2 * k) * bits_stride] = static_cast<uint8_t>(rows2);
        bits[(2 * k + 1) * bits_stride] = static_cast<uint8_t>(rows2 >> 8);
      }
      for (int half = 0; half < 2; ++half) {
        const __m256i flags = _mm256_cvtepu8_epi32(half ? _mm_srli_si128(d[k], 8) : d[k]);
        const __m256 dropped = _mm256_castsi256_ps(_mm256_cmpeq_epi32(flags, zero));
        _mm256_storeu_ps(out + (2 * k + half) * out_stride, _mm256_andnot_ps(dropped, vscale));
      }
    }
  }
#endif
};

// The channels_last elementwise walk: threads take whole tiles; fn(tile, mult, scratch, prefetch) runs each with this
// thread's multiplier and scratch buffers (sized for dp) and the prefetch of the next tile's in0, in1 and out.
template <typename acc_t, typename F>
void for_each_tile(const RowTiles& tiles, const DropoutParams<acc_t>& dp, const void* in0, const void* in1,
                   void* out, int64_t elem_size, F fn) {
  at::parallel_for(0, tiles.count(), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mult(dp.active ? tiles.mult_elems() : 0);
    std::vector<uint8_t> scratch(dp.active ? tiles.scratch_bytes() : 0);
    for (int64_t ti = begin; ti < end; ++ti) {
      auto prefetch = tiles.next_tile_prefetch(ti, end, in0, in1, out, elem_size);
      fn(tiles.tile(ti), mult.data(), scratch.data(), &prefetch);
    }
  });
}

}  // namespace bnfused::cpu
