// Per-channel batch statistics (mean, biased variance) on the CPU.
// One read of x: chunks of L1 size get a two-pass (sum, squared deviations) Welford triple, and triples are
// merged in double with Chan's formula in a fixed order, so results do not depend on the thread count and
// a large common offset (1e4) does not cancel the variance away.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/cpu_common.h"

namespace bnfused {
namespace {

using cpu::kChunk;

template <typename scalar_t>
void stats_channels_first(const at::Tensor& x, const Geometry& g, double* mean_out, double* var_out) {
  using acc = cpu::acc_t<scalar_t>;
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  // Per-plane mean and m2 (every plane holds S elements), written once each: no zero fill.
  const std::unique_ptr<double[]> plane_mean(new double[g.N * g.C]), plane_m2(new double[g.N * g.C]);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(g.S, 1));
  if (g.S * cpu::kLaneSums <= kChunk) {
    // Small planes, kLaneSums at a time: the horizontal sums of the group share one transpose-reduction (one per
    // plane cost as much as reading a 7x7 plane), and the group is small enough that its second pass reads L1.
    using Vec = at::vec::Vectorized<acc>;
    at::parallel_for(0, g.N * g.C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p0 = begin; p0 < end; p0 += cpu::kLaneSums) {
        const int np = static_cast<int>(std::min<int64_t>(cpu::kLaneSums, end - p0));
        const scalar_t* px = data + p0 * g.S;
        Vec part[cpu::kLaneSums];
        acc mean[cpu::kLaneSums], m2[cpu::kLaneSums];
        for (int j = 0; j < cpu::kLaneSums; ++j)
          part[j] = j < np ? cpu::vec_sum<scalar_t, acc>(px + j * g.S, g.S) : Vec(0);
        cpu::lane_sums(part, mean);
        for (int j = 0; j < np; ++j) {
          mean[j] /= static_cast<acc>(g.S);
          part[j] = cpu::vec_sq_dev<scalar_t, acc>(px + j * g.S, g.S, mean[j]);
        }
        cpu::lane_sums(part, m2);
        for (int j = 0; j < np; ++j) {
          plane_mean[p0 + j] = static_cast<double>(mean[j]);
          plane_m2[p0 + j] = static_cast<double>(m2[j]);
        }
      }
    });
  } else {
    at::parallel_for(0, g.N * g.C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const scalar_t* px = data + plane * g.S;
        Welford<double> w = cpu::chunk_welford(px, std::min(kChunk, g.S));
        for (int64_t s0 = kChunk; s0 < g.S; s0 += kChunk)
          w = welford_merge(w, cpu::chunk_welford(px + s0, std::min(kChunk, g.S - s0)));
        plane_mean[plane] = w.mean;
        plane_m2[plane] = w.m2;
      }
    });
  }
  // The merge of N equal-count triples is the mean of the means plus S * (squared deviations of the plane means),
  // without a division per plane. Channels innermost (unit stride), images in ascending order for every channel.
  at::parallel_for(0, g.C, 256, [&](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::vector<double> m2(width, 0.0), spread(width, 0.0);
    double* mean = mean_out + begin;
    std::fill(mean, mean + width, 0.0);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = 0; c < width; ++c) mean[c] += plane_mean[n * g.C + begin + c];
    for (int64_t c = 0; c < width; ++c) mean[c] /= static_cast<double>(g.N);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t c = 0; c < width; ++c) {
        const double d = plane_mean[n * g.C + begin + c] - mean[c];
        m2[c] += plane_m2[n * g.C + begin + c];
        spread[c] += d * d;
      }
    for (int64_t c = 0; c < width; ++c)
      var_out[begin + c] =
          (m2[c] + spread[c] * static_cast<double>(g.S)) / (static_cast<double>(g.N) * static_cast<double>(g.S));
  });
}

// Chunk mean and m2 of columns [cb, cb + NV vectors) of `rows` rows (clipped at `width`), accumulated in
// registers: sums of x - shift, shift = the first row where finite (a float sum of large, similar values -- a 1e4
// offset -- would lose the mean), then squared deviations from the chunk mean. Reduced-precision rows are widened
// in registers on each of the two reads (their sub-chunk sits in L1).
template <typename scalar_t, typename acc, int NV, typename Tick>
inline void column_block_stats(const scalar_t* const* rowp, int64_t rows, int64_t cb, int64_t width, acc inv_rows,
                               acc* mean_out, acc* m2_out, Tick tick) {
  using Vec = at::vec::Vectorized<acc>;
  int cnt[NV];
  for (int k = 0; k < NV; ++k)
    cnt[k] = static_cast<int>(std::clamp<int64_t>(width - cb - k * Vec::size(), 0, Vec::size()));
  Vec shift[NV], s[NV], q[NV];
  for (int k = 0; k < NV; ++k) {
    const Vec first = cpu::load_as<scalar_t, acc>(rowp[0] + cb + k * Vec::size(), cnt[k]);
    shift[k] = Vec::blendv(Vec(0), first, (first - first) == Vec(0));
    s[k] = Vec(0);
    q[k] = Vec(0);
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int k = 0; k < NV; ++k) s[k] += cpu::load_as<scalar_t, acc>(rowp[r] + cb + k * Vec::size(), cnt[k]) - shift[k];
    tick();
  }
  for (int k = 0; k < NV; ++k) s[k] = shift[k] + s[k] * Vec(inv_rows);  // chunk mean
  for (int64_t r = 0; r < rows; ++r) {
    for (int k = 0; k < NV; ++k) {
      const Vec d = cpu::load_as<scalar_t, acc>(rowp[r] + cb + k * Vec::size(), cnt[k]) - s[k];
      q[k] = at::vec::fmadd(d, d, q[k]);
    }
    tick();
  }
  for (int k = 0; k < NV; ++k) {
    cpu::store(s[k], mean_out + cb + k * Vec::size(), cnt[k]);
    cpu::store(q[k], m2_out + cb + k * Vec::size(), cnt[k]);
  }
}

// Width in vectors (8, 4, 2 or 1) of the next column block when `vecs` vectors of the tile are left, and how many
// blocks a tile of `vecs` vectors is split into.
inline int column_block_width(int64_t vecs) { return vecs >= 8 ? 8 : vecs >= 4 ? 4 : vecs >= 2 ? 2 : 1; }
inline int64_t column_blocks(int64_t vecs) {
  int64_t n = 0;
  for (; vecs > 0; ++n) vecs -= column_block_width(vecs);
  return n;
}

// Prefetch into L2 of a block of rows (row_bytes each, row_stride apart), issued in proportion to the progress
// through the current sub-chunk: its rows sit in separate pages (a 2-d row of 1024 floats is one page), where the
// hardware prefetcher, which stops at page boundaries, leaves the first pass waiting on memory.
class RowBlockPrefetch {
 public:
  RowBlockPrefetch() = default;
  // `ticks`: how many times tick() will be called while the current sub-chunk is read.
  RowBlockPrefetch(const void* first_row, int64_t rows, int64_t row_bytes, int64_t row_stride, int64_t ticks)
      : row_(static_cast<const char*>(first_row)), rows_left_(rows), row_bytes_(row_bytes), row_stride_(row_stride) {
    const int64_t lines = rows * ((row_bytes + kLine - 1) / kLine);
    per_tick_ = ticks > 0 ? (lines + ticks - 1) / ticks : 0;
  }

  // Stepped, not divided: a division per call cost as much as the column block's loads on cache-resident rows.
  __attribute__((always_inline)) void tick() {
    for (int64_t k = 0; k < per_tick_ && rows_left_ > 0; ++k) {
      __builtin_prefetch(row_ + col_, 0, 2);
      if ((col_ += kLine) >= row_bytes_) {
        col_ = 0;
        row_ += row_stride_;
        --rows_left_;
      }
    }
  }

 private:
  static constexpr int64_t kLine = 64;
  const char* row_ = nullptr;
  int64_t rows_left_ = 0, row_bytes_ = 0, row_stride_ = 0, col_ = 0, per_tick_ = 0;
};

constexpr int64_t kPrefetchMinBytes = int64_t(4) << 20;

// (N, S, C) memory: rows of C. Work is split into a fixed grid of row blocks x column tiles; each task keeps
// per-column (mean, m2) for its rows, updated from sub-chunks of rows that fit in L2.
template <typename scalar_t>
void stats_channels_last(const at::Tensor& x, const Geometry& g, double* mean_out, double* var_out) {
  using acc = cpu::acc_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc>;
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  const int64_t R = g.N * g.S, C = g.C;
  constexpr int64_t elem = sizeof(scalar_t);
  // Inputs of a few MiB (256x2048) are still in L3 from the layer that wrote them: there the prefetch
  // instructions only add work (+15 % measured), while from memory they halved the time of 4096x1024.
  const bool prefetch_next = x.nbytes() > kPrefetchMinBytes;
  const int64_t tile = std::min<int64_t>(C, 512);
  const int64_t n_tiles = (C + tile - 1) / tile;
  // Sub-chunks of ~16K elements (L2): the per-column double merge after each one then costs little per element.
  constexpr int64_t kMaxSubRows = 4096;
  const int64_t sub_rows = std::clamp<int64_t>(16384 / tile, 1, kMaxSubRows);
  // At most 64 row blocks, each of at least 64 rows: the final per-column merge stays small next to the data
  // even for short, wide inputs such as (256, 2048).
  int64_t block_rows = std::max({sub_rows, (R + 63) / 64, int64_t(64)});
  block_rows = (block_rows + sub_rows - 1) / sub_rows * sub_rows;
  const int64_t n_blocks = (R + block_rows - 1) / block_rows;

  // Prefetch of the sub-chunk read after the one that ends at row `next_r0` of `task` (rows end at r_end):
  // the task's next sub-chunk, else the first of the next task in [.., end), else nothing.
  auto after_sub_chunk = [&](int64_t task, int64_t end, int64_t next_r0, int64_t r_end, int64_t ticks) {
    if (next_r0 < r_end) {
      const int64_t c0 = (task % n_tiles) * tile;
      return RowBlockPrefetch(data + next_r0 * C + c0, std::min(sub_rows, r_end - next_r0),
                              std::min(tile, C - c0) * elem, C * elem, ticks);
    }
    if (task + 1 == end) return RowBlockPrefetch();
    const int64_t r0 = (task + 1) / n_tiles * block_rows, c0 = (task + 1) % n_tiles * tile;
    return RowBlockPrefetch(data + r0 * C + c0, std::min(sub_rows, R - r0), std::min(tile, C - c0) * elem, C * elem,
                            ticks);
  };

  std::vector<double> part_mean(n_blocks * C), part_m2(n_blocks * C);
  at::parallel_for(0, n_blocks * n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> sum(tile), m2c(tile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task / n_tiles, c0 = (task % n_tiles) * tile;
      const int64_t width = std::min(tile, C - c0);
      const int64_t r_begin = rb * block_rows, r_end = std::min(R, r_begin + block_rows);
      double* bmean = part_mean.data() + rb * C + c0;
      double* bm2 = part_m2.data() + rb * C + c0;
      const int64_t n_column_blocks = column_blocks((width + Vec::size() - 1) / Vec::size());
      double count = 0;
      for (int64_t r0 = r_begin; r0 < r_end; r0 += sub_rows) {
        const int64_t rows = std::min(sub_rows, r_end - r0);
        // Ticks: one per row of each column block in each of its two passes.
        const int64_t ticks = 2 * rows * n_column_blocks;
        RowBlockPrefetch prefetch;
        if (prefetch_next) prefetch = after_sub_chunk(task, end, r0 + rows, r_end, ticks);
        auto tick = [&]() __attribute__((always_inline)) { prefetch.tick(); };
        const scalar_t* rowp[kMaxSubRows];
        for (int64_t r = 0; r < rows; ++r) rowp[r] = data + (r0 + r) * C + c0;
        const acc inv_rows = acc(1) / static_cast<acc>(rows);
        // Column blocks of 8, 4, 2 or 1 vectors: a row's 64 floats are read in order, with one accumulator each.
        for (int64_t cb = 0; cb < width;) {
          const int64_t vecs = (width - cb + Vec::size() - 1) / Vec::size();
          auto run = [&](auto nv) {
            column_block_stats<scalar_t, acc, decltype(nv)::value>(rowp, rows, cb, width, inv_rows, sum.data(),
                                                                   m2c.data(), tick);
            cb += decltype(nv)::value * Vec::size();
          };
          switch (column_block_width(vecs)) {  // the split column_blocks() counts
            case 8: run(std::integral_constant<int, 8>()); break;
            case 4: run(std::integral_constant<int, 4>()); break;
            case 2: run(std::integral_constant<int, 2>()); break;
            default: run(std::integral_constant<int, 1>());
          }
        }
        // Merge (rows, chunk mean, chunk m2) into the task's running triples; counts are equal per column.
        const double total = count + rows, frac = rows / total, cross = count * frac;
        for (int64_t c = 0; c < width; ++c) {
          const double delta = static_cast<double>(sum[c]) - bmean[c];
          bmean[c] = count == 0 ? static_cast<double>(sum[c]) : bmean[c] + delta * frac;
          bm2[c] = (count == 0 ? 0.0 : bm2[c] + delta * delta * cross) + static_cast<double>(m2c[c]);
        }
        count = total;
      }
    }
  });
  // Blocks hold block_rows rows (the last one fewer): their merge is the count-weighted mean of the block means
  // plus the count-weighted squared deviations from it, with no division per block (a Welford merge per block
  // and column cost 0.5 ms at 4096x1024). Channels innermost: unit stride.
  at::parallel_for(0, C, 256, [&](int64_t begin, int64_t end) {
    auto rows_of = [&](int64_t rb) { return static_cast<double>(std::min(block_rows, R - rb * block_rows)); };
    std::fill(mean_out + begin, mean_out + end, 0.0);
    std::fill(var_out + begin, var_out + end, 0.0);
    for (int64_t rb = 0; rb < n_blocks; ++rb)
      for (int64_t c = begin; c < end; ++c) mean_out[c] += rows_of(rb) * part_mean[rb * C + c];
    for (int64_t c = begin; c < end; ++c) mean_out[c] /= static_cast<double>(R);
    for (int64_t rb = 0; rb < n_blocks; ++rb)
      for (int64_t c = begin; c < end; ++c) {
        const double d = part_mean[rb * C + c] - mean_out[c];
        var_out[c] += part_m2[rb * C + c] + rows_of(rb) * d * d;
      }
    for (int64_t c = begin; c < end; ++c) var_out[c] /= static_cast<double>(R);
  });
}

}  // namespace

namespace {

// Per-channel mean and biased variance in double (NaN for an empty input).
std::tuple<at::Tensor, at::Tensor> stats_double(const at::Tensor& x) {
  const Geometry g = geometry_of(x);
  auto mean64 = at::empty({g.C}, x.options().dtype(at::kDouble));
  auto var64 = at::empty({g.C}, x.options().dtype(at::kDouble));
  if (x.numel() == 0) {
    mean64.fill_(std::numeric_limits<double>::quiet_NaN());
    var64.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean64, var64};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnfused_batch_stats_cpu", [&] {
    if (g.layout == Layout::ChannelsFirst)
      stats_channels_first<scalar_t>(x, g, mean64.data_ptr<double>(), var64.data_ptr<double>());
    else
      stats_channels_last<scalar_t>(x, g, mean64.data_ptr<double>(), var64.data_ptr<double>());
  });
  return {mean64, var64};
}

// running = momentum * batch + (1 - momentum) * running, in double (nn.BatchNorm's CPU update), stored in the
// running tensor's own dtype and strides.
void update_running(at::Tensor& running, const double* batch, double momentum) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "bnfused_update_running", [&] {
    scalar_t* r = running.data_ptr<scalar_t>();
    const int64_t stride = running.stride(0);
    for (int64_t c = 0; c < running.numel(); ++c) {
      const double old = static_cast<double>(r[c * stride]);
      r[c * stride] = static_cast<scalar_t>(momentum * batch[c] + (1.0 - momentum) * old);
    }
  });
}

}  // namespace

// The statistics are few (one per channel): they are finished in plain loops, not a handful of tiny tensor ops
// whose dispatch cost more than the statistics of a small batch.
std::tuple<at::Tensor, at::Tensor> batch_stats_cpu(const at::Tensor& x) {
  auto [mean64, var64] = stats_double(x);
  if (x.scalar_type() == at::kDouble) return {mean64, var64};
  return {cpu::to_float(mean64), cpu::to_float(var64)};
}

std::tuple<at::Tensor, at::Tensor> batch_stats_update_cpu(const at::Tensor& x, const OptTensor& running_mean,
                                                          const OptTensor& running_var, double momentum, double eps) {
  auto [mean64, var64] = stats_double(x);
  const int64_t C = mean64.numel();
  const double* m64 = mean64.const_data_ptr<double>();
  const double* v64 = var64.const_data_ptr<double>();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto mean = at::empty({C}, x.options().dtype(acc_dtype));
  auto rstd = at::empty({C}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "bnfused_batch_stats_update_cpu", [&] {
    scalar_t* mo = mean.data_ptr<scalar_t>();
    scalar_t* ro = rstd.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      mo[c] = static_cast<scalar_t>(m64[c]);
      // The variance is rounded to acc first, as batch_stats returns it: rsqrt(var + eps) in acc.
      ro[c] = scalar_t(1) / std::sqrt(static_cast<scalar_t>(v64[c]) + static_cast<scalar_t>(eps));
    }
  });
  if (running_mean.has_value() && running_mean->defined()) {
    const Geometry g = geometry_of(x);
    const int64_t count = g.N * g.S;  // not numel / C: C may be 0
    const double unbias = unbiased_var_factor(count);
    std::vector<double> unbiased(C);
    for (int64_t c = 0; c < C; ++c) unbiased[c] = v64[c] * unbias;
    at::Tensor rm = *running_mean, rv = *running_var;
    update_running(rm, m64, momentum);
    update_running(rv, unbiased.data(), momentum);
  }
  return {mean, rstd};
}

}  // namespace bnfused
