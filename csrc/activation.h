// The activations of BatchNorm -> activation -> dropout: one table of PyTorch's formulas and derivatives, shared by
// the CUDA kernels (and their CPU emulation) as scalar __host__ __device__ code. The CPU kernels evaluate the same
// formulas on at::vec vectors (cpu/activation_vec.h), operation for operation (SiLU's exp there is ATen's faster
// exp_u20), so the piecewise-linear kinds round alike on both backends.
//
// Every forward and derivative is the one ATen's CPU kernels compute (aten/src/ATen/native/cpu/Activation.cpp),
// including the gradient at the kinks and at NaN (where ATen's scalar and vector loops disagree, its vector loop,
// which computes all but a tensor's last few elements): ReLU passes unless z <= 0 (NaN passes, as
// threshold_backward); Hardtanh (ReLU6 = Hardtanh(0, 6)) passes where min < z < max (0 at both kinks and for NaN);
// LeakyReLU takes the slope at z <= 0 and NaN; Hardswish is 0 at z <= -3, z/3 + 1/2 on (-3, 3), 1 at z >= 3;
// ELU passes at z > 0 and is alpha * exp(z) elsewhere (NaN for NaN).
#pragma once
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#include <cuda_runtime.h>
#else
#include <cmath>
#endif

#include "philox.h"  // BNFUSED_HD

namespace bnfused {

// Values are part of the op schemas (the `act` argument of torch.ops.bnfused.*): never renumber.
enum class Act : int64_t {
  Identity = 0,
  ReLU = 1,
  Hardtanh = 2,   // alpha = min_val, beta = max_val (ReLU6: 0, 6)
  LeakyReLU = 3,  // alpha = negative_slope
  SiLU = 4,
  Hardswish = 5,
  GELU = 6,       // approximate='none'
  GELUTanh = 7,   // approximate='tanh'
  ELU = 8,        // alpha
  Mish = 9,
};
constexpr int64_t kActCount = 10;

// An activation as the ops receive it (the `act`, `act_alpha`, `act_beta` arguments).
struct ActSpec {
  Act kind = Act::ReLU;
  double alpha = 0.0;
  double beta = 0.0;
};

// The activation's parameters in the accumulation type (unused ones are 0).
template <typename T>
struct ActArgs {
  T alpha;
  T beta;
  static ActArgs of(const ActSpec& s) { return ActArgs{static_cast<T>(s.alpha), static_cast<T>(s.beta)}; }
};

// Activations whose derivative is 0 or 1 everywhere: one bit per element (act_passes) holds their whole gradient
// gate, which is what the block tail's pass bits store.
template <Act kAct>
constexpr bool act_has_gate_bits() {
  return kAct == Act::Identity || kAct == Act::ReLU || kAct == Act::Hardtanh;
}

// Activations whose value or derivative takes exp / erf / tanh (SiLU, GELU, ELU, Mish); the others are piecewise
// linear, with finite slopes. The CUDA kernels with a register budget give the transcendental ones more registers;
// their results agree with torch's to rounding, the piecewise-linear ones bit for bit.
template <Act kAct>
constexpr bool act_transcendental() {
  return kAct == Act::SiLU || kAct == Act::GELU || kAct == Act::GELUTanh || kAct == Act::ELU || kAct == Act::Mish;
}

// Calls f(std::integral_constant<Act, kind>{}) for a run-time kind (the caller checked 0 <= kind < kActCount).
template <typename F>
inline void dispatch_act(Act kind, F&& f) {
  switch (kind) {
    case Act::Identity: f(std::integral_constant<Act, Act::Identity>{}); break;
    case Act::ReLU: f(std::integral_constant<Act, Act::ReLU>{}); break;
    case Act::Hardtanh: f(std::integral_constant<Act, Act::Hardtanh>{}); break;
    case Act::LeakyReLU: f(std::integral_constant<Act, Act::LeakyReLU>{}); break;
    case Act::SiLU: f(std::integral_constant<Act, Act::SiLU>{}); break;
    case Act::Hardswish: f(std::integral_constant<Act, Act::Hardswish>{}); break;
    case Act::GELU: f(std::integral_constant<Act, Act::GELU>{}); break;
    case Act::GELUTanh: f(std::integral_constant<Act, Act::GELUTanh>{}); break;
    case Act::ELU: f(std::integral_constant<Act, Act::ELU>{}); break;
    case Act::Mish: f(std::integral_constant<Act, Act::Mish>{}); break;
  }
}

// The CUDA ops whose kernels are instantiated per kind are compiled in two parts, one file each (the transcendental
// kinds in cuda/<op>_transcendental.cu), which halves the longest nvcc compile: dispatch_act_part<kTranscendental>
// calls f for the kinds of its part only (others instantiate nothing; the caller picked the part with
// act_is_transcendental).
template <bool kTranscendental, typename F>
inline void dispatch_act_part(Act kind, F&& f) {
  dispatch_act(kind, [&](auto k) {
    if constexpr (act_transcendental<decltype(k)::value>() == kTranscendental) f(k);
  });
}

inline bool act_is_transcendental(Act kind) {
  bool transcendental = false;
  dispatch_act(kind, [&](auto k) { transcendental = act_transcendental<decltype(k)::value>(); });
  return transcendental;
}

// As dispatch_act over the kinds with gate bits (the block tail); the caller checked the kind is one.
template <typename F>
inline void dispatch_gate_act(Act kind, F&& f) {
  switch (kind) {
    case Act::Identity: f(std::integral_constant<Act, Act::Identity>{}); break;
    case Act::Hardtanh: f(std::integral_constant<Act, Act::Hardtanh>{}); break;
    default: f(std::integral_constant<Act, Act::ReLU>{}); break;
  }
}

namespace act_math {
// The C math functions for float and double, on the host and the device.
BNFUSED_HD float exp_(float v) { return expf(v); }
BNFUSED_HD double exp_(double v) { return exp(v); }
BNFUSED_HD float expm1_(float v) { return expm1f(v); }
BNFUSED_HD double expm1_(double v) { return expm1(v); }
BNFUSED_HD float log1p_(float v) { return log1pf(v); }
BNFUSED_HD double log1p_(double v) { return log1p(v); }
BNFUSED_HD float tanh_(float v) { return tanhf(v); }
BNFUSED_HD double tanh_(double v) { return tanh(v); }
BNFUSED_HD float erf_(float v) { return erff(v); }
BNFUSED_HD double erf_(double v) { return erf(v); }
// NaN-propagating max/min (at::vec::maximum / minimum).
template <typename T>
BNFUSED_HD T max_nan(T a, T b) { return (a != a) ? a : ((a > b) ? a : b); }
template <typename T>
BNFUSED_HD T min_nan(T a, T b) { return (a != a) ? a : ((a < b) ? a : b); }
}  // namespace act_math

// Constants of GELU as ATen writes them.
constexpr double kSqrt1_2 = 0.70710678118654752440;          // M_SQRT1_2
constexpr double kGeluPdf = 1.12837916709551257390 * 0.70710678118654752440 * 0.5;  // M_2_SQRTPI * M_SQRT1_2 / 2
constexpr double kGeluTanhBeta = 1.41421356237309504880 * 1.12837916709551257390 * 0.5;  // M_SQRT2 * M_2_SQRTPI / 2
constexpr double kGeluTanhKappa = 0.044715;

template <Act kAct, typename T>
BNFUSED_HD T act_forward(T z, ActArgs<T> p) {
  using namespace act_math;
  if constexpr (kAct == Act::Identity) {
    return z;
  } else if constexpr (kAct == Act::ReLU) {
    return (z < T(0)) ? T(0) : z;  // NaN and -0 pass, as torch.relu
  } else if constexpr (kAct == Act::Hardtanh) {
    return (z < p.alpha) ? p.alpha : ((z > p.beta) ? p.beta : z);  // NaN passes (torch.clamp)
  } else if constexpr (kAct == Act::LeakyReLU) {
    return (z > T(0)) ? z : z * p.alpha;
  } else if constexpr (kAct == Act::SiLU) {
    return z / (T(1) + exp_(-z));
  } else if constexpr (kAct == Act::Hardswish) {
    return z * min_nan(max_nan(z + T(3), T(0)), T(6)) / T(6);
  } else if constexpr (kAct == Act::GELU) {
    return z * T(0.5) * (T(1) + erf_(z * T(kSqrt1_2)));
  } else if constexpr (kAct == Act::GELUTanh) {
    const T inner = T(kGeluTanhBeta) * (z + T(kGeluTanhKappa) * (z * z * z));
    return T(0.5) * z * (T(1) + tanh_(inner));
  } else if constexpr (kAct == Act::ELU) {
    return (z > T(0)) ? z : p.alpha * expm1_(z);
  } else {  // Mish
    return z * tanh_(log1p_(exp_(z)));
  }
}

// g * act'(z), with the value ATen's backward gives at the kinks and for NaN z.
template <Act kAct, typename T>
BNFUSED_HD T act_backward(T g, T z, ActArgs<T> p) {
  using namespace act_math;
  if constexpr (kAct == Act::Identity) {
    return g;
  } else if constexpr (kAct == Act::ReLU) {
    return (z <= T(0)) ? T(0) : g;
  } else if constexpr (kAct == Act::Hardtanh) {
    return (z > p.alpha && z < p.beta) ? g : T(0);
  } else if constexpr (kAct == Act::LeakyReLU) {
    return (z > T(0)) ? g : g * p.alpha;
  } else if constexpr (kAct == Act::SiLU) {
    const T sig = T(1) / (T(1) + exp_(-z));
    return g * sig * (T(1) + z * (T(1) - sig));
  } else if constexpr (kAct == Act::Hardswish) {
    return (z <= T(-3)) ? T(0) : ((z >= T(3)) ? g : g * (z / T(3) + T(0.5)));
  } else if constexpr (kAct == Act::GELU) {
    const T cdf = T(0.5) * (T(1) + erf_(z * T(kSqrt1_2)));
    const T pdf = exp_(T(-0.5) * z * z) * T(kGeluPdf);
    return g * (cdf + z * pdf);
  } else if constexpr (kAct == Act::GELUTanh) {
    const T z_sq = z * z;
    const T inner = T(kGeluTanhBeta) * (z + T(kGeluTanhKappa) * (z_sq * z));
    const T t = tanh_(inner);
    const T left_derivative = T(0.5) * (T(1) + t);
    const T right_derivative = T(0.5) * z * (T(1) - t * t) * T(kGeluTanhBeta) * (T(1) + T(3 * kGeluTanhKappa) * z_sq);
    return g * (left_derivative + right_derivative);
  } else if constexpr (kAct == Act::ELU) {
    return (z > T(0)) ? g : g * p.alpha * exp_(z);
  } else {  // Mish
    const T sig = T(1) / (T(1) + exp_(-z));
    const T t = tanh_(log1p_(exp_(z)));
    return g * (t + z * sig * (T(1) - t * t));
  }
}

// Whether the gradient passes at z, for the kinds with gate bits (act_has_gate_bits).
template <Act kAct, typename T>
BNFUSED_HD bool act_passes(T z, ActArgs<T> p) {
  static_assert(act_has_gate_bits<kAct>(), "act_passes: the derivative is not 0 or 1");
  if constexpr (kAct == Act::Identity) return true;
  else if constexpr (kAct == Act::ReLU) return !(z <= T(0));
  else return z > p.alpha && z < p.beta;
}

}  // namespace bnfused
