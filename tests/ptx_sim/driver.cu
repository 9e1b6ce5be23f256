// The CUDA kernels as nvcc compiles them for the extension, run as PTX on a GPU simulator (GPGPU-Sim, functional
// mode) against the scalar reference of tests/cuda_emulation/kernel_cases.h, the one the CPU emulation checks:
// masks, forward outputs, pass bits and input gradients bit for bit, statistics and sums to a tolerance. A trimmed
// matrix (the simulator runs ~1e4 warp instructions a second): every op, NCHW, channels_last and 2-d, aligned and
// one element misaligned, reductions with one split and several (the last-block merge, run twice), each case at
// most 64K elements; and the piecewise-linear activations on one channels_last shape (the block tail's gate kinds
// included). One storage dtype per build (PTX_SIM_DTYPE: 0 float32, 1 float16, 2 bfloat16), so the simulator loads
// only that dtype's kernels. Built and run by ptx_check.sh; prints "ptx_sim: ..." lines, failures as "FAIL ..." on
// stderr, and exits non-zero on a mismatch.
#include "kernel_cases.h"

#include <chrono>

// The storage type, spelled out: nvcc's host stubs of kernels instantiated through an alias declared in an
// anonymous namespace name the alias, which the host compiler then cannot find.
#if PTX_SIM_DTYPE == 0
#define PTX_SIM_SCALAR float
#elif PTX_SIM_DTYPE == 1
#define PTX_SIM_SCALAR c10::Half
#else
#define PTX_SIM_SCALAR c10::BFloat16
#endif

namespace {

// Shapes: 2-d (C % 4 == 0 and not, several splits), S % 8 != 0 (7, 11, 49), S < 8, C and S multiples of 8 (the add
// forward's channels_last tile kernel), and splits in both layouts (NCHW (24, 3, 257): 3 blocks per channel;
// channels_last V = 4 with S % 8 != 0 and == 0: 2). The largest, channels_last only and aligned only, cost ~6 s of
// simulation each.
struct Entry {
  Shape shape;
  bool nchw, misaligned;  // also NCHW (spatial shapes), also one element misaligned
};
const std::vector<Entry> kMatrix = {
    {{33, 12, {}}, false, true},      {{256, 10, {}}, false, true},     {{256, 64, {}}, false, true},
    {{3, 5, {11}}, true, true},       {{3, 8, {7, 7}}, true, true},     {{2, 64, {2, 2}}, true, true},
    {{2, 8, {4, 4}}, true, true},     {{24, 3, {257}}, true, true},     {{32, 16, {7, 7}}, false, false},
    {{32, 16, {8, 8}}, false, false},
};

template <typename scalar_t, typename acc_t>
void run_matrix() {
  for (const int64_t numel : {1000, 4099})
    for (const bool misaligned : {false, true}) run_mask_case(numel, 0.3, misaligned);
  for (const Entry& e : kMatrix)
    for (const Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
      if (layout == Layout::ChannelsFirst && !e.nchw) continue;
      for (const bool misaligned : {false, true}) {
        if (misaligned && !e.misaligned) continue;
        const auto t0 = std::chrono::steady_clock::now();
        // The statistics (p = 0: run_case takes them once per shape, layout and alignment), then every other op
        // with dropout; misaligned cases without affine parameters, as in the emulation's matrix.
        g_only = "stats";
        run_case<scalar_t, acc_t>(Case{e.shape, layout, 0.0, misaligned, true});
        g_only.clear();
        const Case c{e.shape, layout, 0.3, misaligned, !misaligned};
        run_case<scalar_t, acc_t>(c);
        std::printf("\nptx_sim: %.1f s %s\n",
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), c.name().c_str());
      }
    }
  // The other piecewise-linear activations (forward, backward_reduce, backward_input) on channels_last (3, 8, 7, 7),
  // p = 0.3, bit for bit. The transcendental ones are not even instantiated: their PTX (CUDA's expf / erff / tanhf
  // code) holds copysign.f32, which the simulator's parser rejects (README.md); the emulation checks them.
  for (const ActSpec& spec : activation_specs()) {
    bool ran = false;
    const auto t0 = std::chrono::steady_clock::now();
    Case c{{3, 8, {7, 7}}, Layout::ChannelsLast, 0.3, 0, true};
    c.act = spec;
    dispatch_act(spec.kind, [&](auto kind) {
      if constexpr (act_exact<decltype(kind)::value>()) {
        run_case<scalar_t, acc_t, decltype(kind)::value>(c);
        ran = true;
      }
    });
    if (!ran) continue;
    std::printf("\nptx_sim: %.1f s %s\n",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), c.name().c_str());
  }
}

}  // namespace

int main() {
  try {
    run_matrix<PTX_SIM_SCALAR, float>();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL exception: %s\n", e.what());
    return 1;
  }
  if (g_failures) {
    std::fprintf(stderr, "ptx_sim: %s: %d failure(s) in %ld cases\n", type_name<PTX_SIM_SCALAR>(), g_failures,
                 g_cases);
    return 1;
  }
  std::printf("\nptx_sim: %s: %ld cases passed (%ld runs of a split reduction)\n", type_name<PTX_SIM_SCALAR>(),
              g_cases, g_split_reductions);
  return 0;
}
