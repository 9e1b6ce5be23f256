// Per-element and per-channel math of BatchNorm -> ReLU -> Dropout, shared by the CPU and CUDA backends so
// the two cannot drift. No torch includes; everything is __host__ __device__.
//
// Forward per element (a, b are per-channel, see channel_affine):
//   z = fma(x, a, b)   r = max(z, 0)   y = r * mult      mult = keep ? 1/(1-p) : 0   (1 when no dropout)
// Backward per element:
//   g = (z > 0) ? dy * mult : 0
//   training (batch stats): dx = A*g - A*mean_g - (x - mean) * K,  A = w*rstd, K = A*rstd*mean_g_xhat
//   eval (running stats):   dx = A*g
// Vectorised loops must evaluate z with a single fused multiply-add too, so [z > 0] is bit-identical
// between forward and backward.
#pragma once
#include "philox.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#include <cuda_runtime.h>
#define BNFUSED_FMA(a, b, c) fma(a, b, c)
#else
#include <cmath>
#define BNFUSED_FMA(a, b, c) std::fma(a, b, c)
#endif

namespace bnfused {

// Bessel's correction of the running variance: count / (count - 1), and 1 for a single value (as nn.BatchNorm).
BNFUSED_HD double unbiased_var_factor(int64_t count) {
  return count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0;
}

// Running (count, mean, M2) of a set of values; merged with Chan et al.'s parallel formula.
template <typename acc_t>
struct Welford {
  acc_t count;
  acc_t mean;
  acc_t m2;
};

template <typename acc_t>
BNFUSED_HD Welford<acc_t> welford_merge(Welford<acc_t> a, Welford<acc_t> b) {
  const acc_t count = a.count + b.count;
  if (count == acc_t(0)) return a;
  const acc_t delta = b.mean - a.mean;
  const acc_t frac_b = b.count / count;
  Welford<acc_t> out;
  out.count = count;
  out.mean = a.mean + delta * frac_b;
  // An infinite mean makes delta inf - inf; the weighted average keeps +-inf as torch.mean does.
  if (!(out.mean - out.mean == acc_t(0))) out.mean = a.mean * (a.count / count) + b.mean * frac_b;
  out.m2 = a.m2 + b.m2 + delta * delta * a.count * frac_b;
  return out;
}

// Per-channel scale/shift of the pre-activation (see channel_affine).
template <typename acc_t>
struct ChannelAffine {
  acc_t a;
  acc_t b;
};

// Round-to-nearest multiply and subtract that no compiler may contract into an FMA: the CPU build uses
// -ffp-contract=off, and on the GPU the _rn intrinsics forbid contraction, so a and b below -- hence
// z = fma(x, a, b) and [z > 0] -- are bit-identical on every backend and between forward and backward.
BNFUSED_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
BNFUSED_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
BNFUSED_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
BNFUSED_HD double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// z = fma(x, a, b) == (x - mean) * rstd * w + bias, with a and b rounded the same way on every backend.
template <typename acc_t>
BNFUSED_HD ChannelAffine<acc_t> channel_affine(acc_t mean, acc_t rstd, acc_t weight, acc_t bias) {
  ChannelAffine<acc_t> out;
  out.a = mul_rn(rstd, weight);
  out.b = sub_rn(bias, mul_rn(mean, out.a));
  return out;
}

// Pointers to the per-channel tensors (accumulation dtype, contiguous, on the kernel's device).
template <typename acc_t>
struct ChannelParams {
  const acc_t* mean;
  const acc_t* rstd;
  const acc_t* weight;  // nullptr => 1
  const acc_t* bias;    // nullptr => 0
  BNFUSED_HD acc_t w(int64_t c) const { return weight ? weight[c] : acc_t(1); }
  BNFUSED_HD acc_t b(int64_t c) const { return bias ? bias[c] : acc_t(0); }
  BNFUSED_HD ChannelAffine<acc_t> affine(int64_t c) const { return channel_affine<acc_t>(mean[c], rstd[c], w(c), b(c)); }
};

template <typename acc_t>
BNFUSED_HD acc_t bn_preact(acc_t x, ChannelAffine<acc_t> ab) {
  return BNFUSED_FMA(x, ab.a, ab.b);
}

// Per-channel coefficients of the input gradient.
template <typename acc_t>
struct BackwardCoef {
  acc_t A;       // w * rstd
  acc_t C;       // -A * mean_g            (0 in eval)
  acc_t K;       // A * rstd * mean_g_xhat (0 in eval)
  acc_t mean;    // channel mean used to centre x
};

template <typename acc_t>
BNFUSED_HD BackwardCoef<acc_t> backward_coef(acc_t mean, acc_t rstd, acc_t weight, bool batch_stats,
                                             acc_t mean_g, acc_t mean_g_xhat) {
  BackwardCoef<acc_t> c;
  c.A = weight * rstd;
  c.mean = mean;
  c.C = batch_stats ? -c.A * mean_g : acc_t(0);
  c.K = batch_stats ? c.A * rstd * mean_g_xhat : acc_t(0);
  return c;
}

// Training (batch statistics): the mean and variance depend on x, hence the two correction terms. The inner
// C - (x - mean) * K is rounded op by op (mul_rn / sub_rn) as the CPU's vector code computes it: nvcc would
// otherwise let the GPU contract it into an FMA and dx would differ from the CPU's in the last bit.
template <typename acc_t>
BNFUSED_HD acc_t grad_input_element(acc_t g, acc_t x, BackwardCoef<acc_t> c) {
  return BNFUSED_FMA(g, c.A, sub_rn(c.C, mul_rn(sub_rn(x, c.mean), c.K)));
}

// Eval (running statistics): the statistics are constants.
template <typename acc_t>
BNFUSED_HD acc_t grad_input_element_eval(acc_t g, BackwardCoef<acc_t> c) {
  return g * c.A;
}

// Dropout multiplier of a kept element; the forward and backward use the same value.
template <typename acc_t>
BNFUSED_HD acc_t dropout_scale(double p) {
  return (p >= 1.0) ? acc_t(0) : static_cast<acc_t>(1.0 / (1.0 - p));
}

}  // namespace bnfused
