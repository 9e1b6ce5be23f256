// Tiling of the ChannelsLast (N, S, C) layout into tiles of consecutive rows, and the dropout multipliers of a
// tile laid out like the data (mult[t * C + c]). A tile never crosses a batch boundary when S > 1, so channel c
// of a tile is one run of consecutive logical indices (n*C + c)*S + s0 ... ; for S == 1 (2-d input) row r is
// itself the logical run r*C ... r*C + C - 1.
#pragma once
#include "cpu/cpu_common.h"
#include "cpu/dropout_mult.h"

namespace bnfused::cpu {

struct RowTiles {
  int64_t N, S, C;
  int64_t rows_per_tile;
  int64_t tiles_per_batch;  // S > 1 only

  explicit RowTiles(const Geometry& g) : N(g.N), S(g.S), C(g.C) {
    // About 8K elements per tile: data, dy and multipliers of a tile stay in L1/L2.
    rows_per_tile = std::max<int64_t>(1, std::min<int64_t>(64, 8192 / std::max<int64_t>(C, 1)));
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

  template <typename acc_type>
  void fill_mult(const Tile& t, const DropoutParams<acc_type>& dp, acc_type* mult) const {
    if (S > 1) {
      for (int64_t c = 0; c < C; ++c)
        fill_dropout_mult(dp.key, static_cast<uint64_t>((t.n * C + c) * S + t.s0), t.rows, dp.threshold, dp.scale,
                          mult + c, C);
    } else {
      fill_dropout_mult(dp.key, static_cast<uint64_t>(t.row0 * C), t.rows * C, dp.threshold, dp.scale, mult);
    }
  }
};

}  // namespace bnfused::cpu
