// The BN + residual add + activation (+ dropout) kernels (csrc/cuda/add_relu.cuh; identity, ReLU, Hardtanh: the
// kinds with gate bits) in the emulation driver: the forward's output and pass bits, the residual's gradient
// g = dy * pass * scale and the input gradient bit for bit, the BN backward sums to a tolerance, against a scalar
// reference from activation.h / bn_math.h / philox.h (csrc/cpu/add_relu.cpp's semantics). Included by
// kernel_cases.h after its helpers (Case, Buffer, Rng, mismatch, ...).
#pragma once
#include "cuda/add_relu.cuh"

namespace {

// Runs the add ops on one case; x, dy and the per-channel parameters are run_case's (prm.mean/rstd: the batch's;
// prm the kernels' pointers, hprm the reference's).
template <typename scalar_t, typename acc_t, Act kAct>
void run_add_case(const Case& cs, const Buffer<scalar_t>& x, const Buffer<scalar_t>& dy,
                  const ChannelParams<acc_t>& prm, const ChannelParams<acc_t>& hprm) {
  const Shape& sh = cs.shape;
  const int64_t N = sh.N, C = sh.C, S = sh.S(), numel = N * C * S, nbytes = (numel + 7) / 8;
  const Geometry geo{N, C, S, cs.layout};
  const char* dt = type_name<scalar_t>();
  auto selected = [&](const char* op) { return g_only.empty() || g_only == op; };
  if (numel == 0 || !(selected("add_relu_forward") || selected("add_relu_backward_reduce") ||
                      selected("add_relu_backward_input")))
    return;
  const bool dropout = cs.p > 0.0;
  const Dropout<acc_t> drop = make_dropout<acc_t>(device_key(), cs.p);
  const PhiloxKey key{static_cast<uint64_t>(kKey[0]), static_cast<uint64_t>(kKey[1])};
  const acc_t scale = dropout_scale<acc_t>(cs.p);
  const uint32_t thr = threshold16(cs.p);
  const cudaStream_t stream = nullptr;
  const ActArgs<acc_t> act = ActArgs<acc_t>::of(cs.act);

  // The residual (about as large as bn(x), so both signs of bn(x) + residual occur), and the reference forward:
  // y and the pass bits in memory order. Channel and logical index of memory element m: chan[m], logical[m].
  Rng rng{static_cast<uint64_t>(numel * 2654435761u + C * 3 + cs.misaligned)};
  const Offsets at = cs.offsets();
  Buffer<scalar_t> res(numel, at.res), out(numel, at.out), out2(numel, at.gres);
  Buffer<uint8_t> bits(nbytes, at.bits);
  std::vector<scalar_t> y_ref(numel);
  std::vector<uint8_t> bits_ref(nbytes, 0);
  std::vector<int64_t> chan(numel), logical(numel);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t off = offset_of(sh, cs.layout, n, c, s);
        chan[off] = c;
        logical[off] = (n * C + c) * S + s;
      }
  for (int64_t m = 0; m < numel; ++m) {
    res[m] = static_cast<scalar_t>(static_cast<acc_t>(0.8 * rng.normal()));
    const bool keep = !dropout || keep_element(key, static_cast<uint64_t>(logical[m]), thr);
    const acc_t mult = dropout ? (keep ? scale : acc_t(0)) : acc_t(1);
    const acc_t z = bn_preact(static_cast<acc_t>(x[m]), hprm.affine(chan[m])) + static_cast<acc_t>(res[m]);
    y_ref[m] = static_cast<scalar_t>(act_forward<kAct>(z, act) * mult);
    if (keep && act_passes<kAct>(z, act)) bits_ref[m >> 3] |= static_cast<uint8_t>(1u << (m & 7));
  }
  res.upload();
  auto where = [&](int64_t m) {
    char d[120];
    int64_t n, c, s;
    if (cs.layout == Layout::ChannelsFirst) {
      s = m % S, c = m / S % C, n = m / S / C;
    } else {
      c = m % C, s = m / C % S, n = m / C / S;
    }
    std::snprintf(d, sizeof d, "element (%" PRId64 ", %" PRId64 ", %" PRId64 ") [memory %" PRId64 "]", n, c, s, m);
    return std::string(d);
  };

  // ---- add_relu_forward (pass bits null) and add_relu_forward_bits: y and the bits bit for bit ----
  if (selected("add_relu_forward")) {
    for (const bool with_bits : {true, false}) {
      ++g_cases;
      std::memset(bits.host, 0xA5, nbytes);  // every bit the kernel leaves alone shows up
      bits.upload();
      const Counts k = measure([&] {
        run_add_relu_forward<scalar_t, acc_t, kAct>(prm, x.ptr, res.ptr, out.ptr, with_bits ? bits.ptr : nullptr,
                                                    geo, dropout ? &drop : nullptr, stream, act);
      });
      out.download();
      bits.download();
      const char* what = with_bits ? "add_relu_forward (bits)" : "add_relu_forward";
      check_scalar_path(what, cs, dt, k, differ(16, sizeof(scalar_t), {at.x, at.res, at.out}));
      for (int64_t m = 0; m < numel; ++m)
        if (!same_bits(y_ref[m], out[m])) {
          char d[120];
          std::snprintf(d, sizeof d, ": %.9g, want %.9g", to_double(out[m]), to_double(y_ref[m]));
          mismatch(what, cs, dt, where(m) + d);
          break;
        }
      for (int64_t m = 0; with_bits && m < numel; ++m) {
        const int got = (bits[m >> 3] >> (m & 7)) & 1, want = (bits_ref[m >> 3] >> (m & 7)) & 1;
        if (got != want) {
          mismatch(what, cs, dt, where(m) + ": pass bit " + std::to_string(got) + ", want " + std::to_string(want));
          break;
        }
      }
      if (!with_bits && std::any_of(bits.host, bits.host + nbytes, [](uint8_t b) { return b != 0xA5; }))
        mismatch(what, cs, dt, "wrote pass bits it was not given");
    }
  }

  // The backward's inputs: the reference pass bits (so a forward bug cannot hide a backward one) and
  // g = dy * pass * scale in acc_t; the reference sums in double.
  std::memcpy(bits.host, bits_ref.data(), nbytes);
  bits.upload();
  std::vector<acc_t> g_acc(numel);
  std::vector<double> sg_ref(C, 0), sgx_ref(C, 0), mag_g(C, 0), mag_gx(C, 0);
  for (int64_t m = 0; m < numel; ++m) {
    const int64_t c = chan[m];
    g_acc[m] = ((bits_ref[m >> 3] >> (m & 7)) & 1) ? static_cast<acc_t>(dy[m]) * scale : acc_t(0);
    const double gx = static_cast<double>(g_acc[m]) * (to_double(x[m]) - static_cast<double>(hprm.mean[c]));
    sg_ref[c] += g_acc[m];
    sgx_ref[c] += gx;
    mag_g[c] += std::fabs(static_cast<double>(g_acc[m]));
    mag_gx[c] += std::fabs(gx);
  }
  for (int64_t c = 0; c < C; ++c) {
    sgx_ref[c] *= static_cast<double>(hprm.rstd[c]);
    mag_gx[c] *= static_cast<double>(hprm.rstd[c]);
  }
  const double tol = sizeof(acc_t) == 8 ? 1e-11 : 2e-5;

  // ---- add_relu_backward_reduce: the sums to a tolerance (the reductions' subset of the matrix) ----
  if (selected("add_relu_backward_reduce") && N * S > 0 && reduce_case_of<scalar_t>(cs)) {
    ++g_cases;
    Buffer<acc_t> sum_g(C, 0), sum_gx(C, 0);
    using Op = AddGradSumsOp<acc_t>;
    const Op op{{prm.mean, prm.rstd, nullptr, nullptr}, sum_g.ptr, sum_gx.ptr};
    const auto plan = plan_reduction<scalar_t, Op>(geo, x.ptr, dy.ptr);
    Buffer<acc_t> ws(plan.workspace_elems(), 0);
    const Counts k = measure([&] {
      run_add_relu_backward_reduce<scalar_t, acc_t>(op, plan, dy.ptr, x.ptr, bits.ptr, scale, geo,
                                                    ws.n ? ws.ptr : nullptr, counters_for(plan), stream);
    });
    sum_g.download();
    sum_gx.download();
    check_scalar_path("add_relu_backward_reduce", cs, dt, k,
                      differ(vector_bytes<scalar_t>(geo, false), sizeof(scalar_t), {at.x, at.dy}));
    check_counters_reset(plan);
    for (int64_t c = 0; c < C; ++c)
      if (!(std::fabs(sum_g[c] - sg_ref[c]) <= tol * (mag_g[c] + 1e-30)) ||
          !(std::fabs(sum_gx[c] - sgx_ref[c]) <= tol * (mag_gx[c] + 1e-30))) {
        char d[200];
        std::snprintf(d, sizeof d, "channel %" PRId64 ": sum_g %.9g vs %.9g, sum_g_xhat %.9g vs %.9g (splits %" PRId64
                      ")", c, double(sum_g[c]), sg_ref[c], double(sum_gx[c]), sgx_ref[c], plan.splits);
        mismatch("add_relu_backward_reduce", cs, dt, d);
        break;
      }
  }

  // ---- add_relu_backward_input: dx and grad_residual bit for bit (batch statistics, running statistics) ----
  if (selected("add_relu_backward_input")) {
    const ChannelParams<acc_t> prm_w{prm.mean, prm.rstd, prm.weight, nullptr};  // the op takes no bias
    const auto sums = acc_sums<acc_t>(sg_ref, sgx_ref, N * S);
    const auto &sg = sums.sum_g, &sgx = sums.sum_gx;
    const auto &mg = sums.mean_g, &mgx = sums.mean_gx;
    for (const bool batch_stats : {true, false}) {
      ++g_cases;
      const Counts k = measure([&] {
        run_add_relu_backward_input<scalar_t, acc_t>(prm_w, batch_stats ? sg.ptr : nullptr,
                                                     batch_stats ? sgx.ptr : nullptr, N * S, dy.ptr, x.ptr,
                                                     bits.ptr, scale, out.ptr, out2.ptr, geo, stream);
      });
      out.download();
      out2.download();
      const char* what = batch_stats ? "add_relu_backward_input (batch stats)" : "add_relu_backward_input (running)";
      check_scalar_path(what, cs, dt, k, differ(16, sizeof(scalar_t), {at.dy, at.x, at.out, at.gres}));
      for (int64_t m = 0; m < numel; ++m) {
        const int64_t c = chan[m];
        const auto coef = backward_coef<acc_t>(hprm.mean[c], hprm.rstd[c], hprm.w(c), batch_stats, mg[c], mgx[c]);
        const acc_t xv = static_cast<acc_t>(x[m]);
        const scalar_t want_dx = static_cast<scalar_t>(batch_stats ? grad_input_element(g_acc[m], xv, coef)
                                                                   : grad_input_element_eval(g_acc[m], coef));
        const scalar_t want_g = static_cast<scalar_t>(g_acc[m]);
        if (!same_bits(want_g, out2[m]) || !same_dx(want_dx, out[m], batch_stats && mg[c] == acc_t(0))) {
          char d[200];
          std::snprintf(d, sizeof d, ": grad_residual %.9g, want %.9g; dx %.9g, want %.9g", to_double(out2[m]),
                        to_double(want_g), to_double(out[m]), to_double(want_dx));
          mismatch(what, cs, dt, where(m) + d);
          break;
        }
      }
    }
  }
}

}  // namespace
