// Op layer: schemas (TORCH_LIBRARY), argument checks and layout normalisation written once for every backend, the
// CPU and CUDA implementations registered per dispatch key, and the pybind11 module (build information, the eager
// path, test hooks). Kernels live in cpu/ and cuda/.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "bnfused.h"
#include "cpu/huge_page_allocator.h"

namespace bnfused {

at::MemoryFormat kernel_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  // Neither layout: copy once into the format PyTorch suggests (keeps channels_last-like inputs NHWC).
  const auto suggested = x.suggest_memory_format();
  if ((suggested == at::MemoryFormat::ChannelsLast && x.dim() == 4) ||
      (suggested == at::MemoryFormat::ChannelsLast3d && x.dim() == 5))
    return suggested;
  return at::MemoryFormat::Contiguous;
}

Geometry geometry_of(const at::Tensor& x) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.S *= x.size(d);
  g.layout = (x.dim() == 2 || !x.is_contiguous()) ? Layout::ChannelsLast : Layout::ChannelsFirst;
  return g;
}

namespace {

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": expected input with at least 2 dims (N, C, ...), got ", x.dim(), "-d input of shape ",
              x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": expected a floating-point input (float32, float64, float16 or bfloat16), got ", t);
}

// A per-channel tensor: 1-d with C elements, floating point, on x's device.
void check_channel_param(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  const int64_t C = x.size(1);
  TORCH_CHECK(t.dim() == 1 && t.numel() == C, op, ": ", name, " should contain ", C, " elements (one per channel), got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but input is on ", x.device(),
              "; expected all tensors to be on the same device");
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be floating point, got ", t.scalar_type());
}

// A checked per-channel tensor, contiguous in the accumulation dtype (what the kernels read).
at::Tensor channel_param(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_channel_param(t, x, op, name);
  if (t.scalar_type() == acc_dtype(x) && t.is_contiguous()) return t;  // the common case, without a dispatch
  return t.to(acc_dtype(x)).contiguous();
}

OptTensor opt_channel_param(const OptTensor& t, const at::Tensor& x, const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return channel_param(*t, x, op, name);
}

void check_p(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": dropout probability has to be between 0 and 1, but got ", p);
}

at::Tensor in_kernel_layout(const at::Tensor& x) {
  return x.contiguous(kernel_memory_format(x));
}

// Gradient tensors follow the input's layout so one kernel walks both.
at::Tensor like_input_layout(const at::Tensor& dy, const at::Tensor& x, const char* op) {
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": grad_output shape ", dy.sizes(), " does not match input shape ", x.sizes());
  TORCH_CHECK(dy.device() == x.device(), op, ": grad_output is on ", dy.device(), " but input is on ", x.device());
  return dy.to(x.scalar_type()).contiguous(kernel_memory_format(x));
}

void check_key(const at::Tensor& key, const at::Tensor& x, const char* op) {
  TORCH_CHECK(key.scalar_type() == at::kLong && key.numel() == 2, op,
              ": philox key must be an int64 tensor of 2 elements (seed, offset), got ", key.scalar_type(), " with ",
              key.numel(), " elements");
  TORCH_CHECK(key.device() == x.device(), op, ": philox key is on ", key.device(), " but input is on ", x.device());
}

PhiloxKey host_key(const at::Tensor& key) {
  const auto k = key.contiguous();
  const int64_t* d = k.data_ptr<int64_t>();
  return PhiloxKey{static_cast<uint64_t>(d[0]), static_cast<uint64_t>(d[1])};
}

// The `act`, `act_alpha`, `act_beta` arguments (activation.h's Act values); gate_bits: the op stores the
// activation's gate in one bit per element (the block tail), which only some kinds allow.
ActSpec act_spec(int64_t act, double alpha, double beta, const char* op, bool gate_bits = false) {
  TORCH_CHECK(act >= 0 && act < kActCount, op, ": act must be an activation code in [0, ", kActCount, "), got ", act);
  ActSpec s{static_cast<Act>(act), alpha, beta};
  if (gate_bits) {
    bool ok = false;
    dispatch_act(s.kind, [&](auto kind) { ok = act_has_gate_bits<decltype(kind)::value>(); });
    TORCH_CHECK(ok, op, ": the block tail's pass bits hold the gradient gate of identity, relu and hardtanh only, got "
                "activation code ", act);
  }
  return s;
}

// Arguments of the elementwise/backward ops, checked and normalised once for every backend.
struct KernelArgs {
  at::Tensor x;     // in a kernel layout
  at::Tensor mean;  // per-channel, accumulation dtype
  at::Tensor rstd;
  OptTensor weight;
  OptTensor bias;
};

// key: the Philox key, or nullptr for the block tail's backward ops (their mask is the pass bits).
KernelArgs prepare(const char* op, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
                   const OptTensor& weight, const OptTensor& bias, const at::Tensor* key, double p) {
  check_input(input, op);
  check_p(p, op);
  if (key != nullptr) check_key(*key, input, op);
  KernelArgs a;
  a.x = in_kernel_layout(input);
  a.mean = channel_param(mean, a.x, op, "mean");
  a.rstd = channel_param(rstd, a.x, op, "rstd");
  a.weight = opt_channel_param(weight, a.x, op, "weight");
  a.bias = opt_channel_param(bias, a.x, op, "bias");
  return a;
}

// The per-channel sums of an input-gradient op: both (batch statistics, summed over `count` elements: the global
// count under SyncBN) as checked per-channel tensors, or neither (running statistics).
struct GradSums {
  OptTensor sum_g, sum_g_xhat;
  int64_t count;
};

GradSums check_sums(const char* op, const OptTensor& sum_g, const OptTensor& sum_g_xhat, c10::SymInt count,
                    const at::Tensor& x) {
  const bool has_g = sum_g.has_value() && sum_g->defined();
  const bool has_gx = sum_g_xhat.has_value() && sum_g_xhat->defined();
  TORCH_CHECK(has_g == has_gx, op, ": sum_g and sum_g_xhat must be given together (batch statistics) or not at all");
  GradSums s{std::nullopt, std::nullopt, count.expect_int()};
  TORCH_CHECK(!has_g || s.count > 0, op, ": count must be positive with batch statistics, got ", s.count);
  if (has_g) {
    s.sum_g = channel_param(*sum_g, x, op, "sum_g");
    s.sum_g_xhat = channel_param(*sum_g_xhat, x, op, "sum_g_xhat");
  }
  return s;
}

// Bytes of the packed keep bits of an input with `numel` elements (cpu/keep_bits.h).
int64_t keep_bits_bytes(int64_t numel) { return (numel + 7) / 8; }

// The optional packed keep bits of a backward op: a CPU-kernel input (the CUDA kernels regenerate the mask from
// the key); nullptr when absent.
// Packed bits of x (forward_keep_bits' keep bits, add_relu_forward_bits' pass bits): on x's device, a contiguous
// uint8 tensor of ceil(numel / 8) bytes.
void check_packed_bits(const at::Tensor& bits, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(bits.device() == x.device(), op, ": ", name, " is on ", bits.device(), " but input is on ", x.device());
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.dim() == 1 && bits.numel() == keep_bits_bytes(x.numel()) &&
                  bits.is_contiguous(),
              op, ": ", name, " must be a contiguous uint8 tensor of ceil(numel / 8) = ", keep_bits_bytes(x.numel()),
              " bytes, got ", bits.scalar_type(), " of shape ", bits.sizes());
}

const uint8_t* keep_bits_of(const OptTensor& keep_bits, const at::Tensor& x, const char* op) {
  if (!keep_bits.has_value() || !keep_bits->defined()) return nullptr;
  TORCH_CHECK(x.is_cpu(), op, ": keep_bits are read by the CPU kernels only; on ", x.device(),
              " pass the Philox key alone");
  check_packed_bits(*keep_bits, x, op, "keep_bits");
  return keep_bits->const_data_ptr<uint8_t>();
}

// ---- the backends, behind one interface: each op body below is written once and registered per device ----

struct CpuBackend {
  static std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x) { return batch_stats_cpu(x); }
  static std::tuple<at::Tensor, at::Tensor> batch_stats_update(const at::Tensor& x, const OptTensor& running_mean,
                                                               const OptTensor& running_var, double momentum,
                                                               double eps) {
    return batch_stats_update_cpu(x, running_mean, running_var, momentum, eps);
  }
  static void forward(const KernelArgs& a, const at::Tensor& key, double p, const ActSpec& act, at::Tensor& out) {
    forward_cpu(a.x, a.mean, a.rstd, a.weight, a.bias, host_key(key), p, act, out);
  }
  // keep_bits: forward_keep_bits' packed mask (nullptr: regenerate it from the key).
  static std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& dy, const KernelArgs& a,
                                                            const at::Tensor& key, double p, const ActSpec& act,
                                                            const uint8_t* keep_bits) {
    return backward_reduce_cpu(dy, a.x, a.mean, a.rstd, a.weight, a.bias, host_key(key), p, act, keep_bits);
  }
  static void backward_input(const at::Tensor& dy, const KernelArgs& a, const at::Tensor& key, double p,
                             const ActSpec& act, const GradSums& s, at::Tensor& dx, const uint8_t* keep_bits) {
    backward_input_cpu(dy, a.x, a.mean, a.rstd, a.weight, a.bias, host_key(key), p, s.sum_g, s.sum_g_xhat, s.count,
                       act, dx, keep_bits);
  }
  static void dropout_mask(const at::Tensor& key, double p, at::Tensor& keep) { dropout_mask_cpu(host_key(key), p, keep); }
  static void add_relu_forward(const KernelArgs& a, const at::Tensor& r, const at::Tensor& key, double p,
                               const ActSpec& act, at::Tensor& out, uint8_t* pass_bits) {
    add_relu_forward_cpu(a.x, r, a.mean, a.rstd, a.weight, a.bias, host_key(key), p, act, out, pass_bits);
  }
  // The block tail's backward is the two backward kernels in add mode: the pass bits as the mask and the gate.
  static std::tuple<at::Tensor, at::Tensor> add_relu_backward_reduce(const at::Tensor& dy, const KernelArgs& a,
                                                                     const at::Tensor& pass_bits, double p) {
    return backward_reduce_cpu(dy, a.x, a.mean, a.rstd, std::nullopt, std::nullopt, PhiloxKey{0, 0}, p,
                               ActSpec{Act::Identity}, pass_bits.const_data_ptr<uint8_t>(), /*pass_bits=*/true);
  }
  static void add_relu_backward_input(const at::Tensor& dy, const KernelArgs& a, const at::Tensor& pass_bits,
                                      double p, const GradSums& s, at::Tensor& dx, at::Tensor& grad_residual) {
    backward_input_cpu(dy, a.x, a.mean, a.rstd, a.weight, std::nullopt, PhiloxKey{0, 0}, p, s.sum_g, s.sum_g_xhat,
                       s.count, ActSpec{Act::Identity}, dx, pass_bits.const_data_ptr<uint8_t>(), &grad_residual);
  }
};

#ifdef BNFUSED_WITH_CUDA
// The CUDA kernels read the key from device memory (CUDA graph replays draw a fresh one) and regenerate the keep
// mask instead of reading packed bits (keep_bits_of refuses them off the CPU, so keep_bits is always null here).
struct CudaBackend {
  static std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x) { return batch_stats_cuda(x); }
  static std::tuple<at::Tensor, at::Tensor> batch_stats_update(const at::Tensor& x, const OptTensor& running_mean,
                                                               const OptTensor& running_var, double momentum,
                                                               double eps) {
    return batch_stats_update_cuda(x, running_mean, running_var, momentum, eps);
  }
  // f(std::bool_constant<transcendental>): the compiled part of an op that holds act's kernels (bnfused.h).
  template <typename F>
  static decltype(auto) with_part(const ActSpec& act, F&& f) {
    return act_is_transcendental(act.kind) ? f(std::true_type{}) : f(std::false_type{});
  }
  static void forward(const KernelArgs& a, const at::Tensor& key, double p, const ActSpec& act, at::Tensor& out) {
    with_part(act, [&](auto part) {
      forward_cuda<part.value>(a.x, a.mean, a.rstd, a.weight, a.bias, key, p, act, out);
    });
  }
  static std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& dy, const KernelArgs& a,
                                                            const at::Tensor& key, double p, const ActSpec& act,
                                                            const uint8_t*) {
    return with_part(act, [&](auto part) {
      return backward_reduce_cuda<part.value>(dy, a.x, a.mean, a.rstd, a.weight, a.bias, key, p, act);
    });
  }
  static void backward_input(const at::Tensor& dy, const KernelArgs& a, const at::Tensor& key, double p,
                             const ActSpec& act, const GradSums& s, at::Tensor& dx, const uint8_t*) {
    with_part(act, [&](auto part) {
      backward_input_cuda<part.value>(dy, a.x, a.mean, a.rstd, a.weight, a.bias, key, p, s.sum_g, s.sum_g_xhat,
                                      s.count, act, dx);
    });
  }
  static void dropout_mask(const at::Tensor& key, double p, at::Tensor& keep) { dropout_mask_cuda(key, p, keep); }
  static void add_relu_forward(const KernelArgs& a, const at::Tensor& r, const at::Tensor& key, double p,
                               const ActSpec& act, at::Tensor& out, uint8_t* pass_bits) {
    add_relu_forward_cuda(a.x, r, a.mean, a.rstd, a.weight, a.bias, key, p, act, out, pass_bits);
  }
  static std::tuple<at::Tensor, at::Tensor> add_relu_backward_reduce(const at::Tensor& dy, const KernelArgs& a,
                                                                     const at::Tensor& pass_bits, double p) {
    return add_relu_backward_reduce_cuda(dy, a.x, a.mean, a.rstd, pass_bits, p);
  }
  static void add_relu_backward_input(const at::Tensor& dy, const KernelArgs& a, const at::Tensor& pass_bits,
                                      double p, const GradSums& s, at::Tensor& dx, at::Tensor& grad_residual) {
    add_relu_backward_input_cuda(dy, a.x, a.mean, a.rstd, a.weight, pass_bits, p, s.sum_g, s.sum_g_xhat, s.count,
                                 dx, grad_residual);
  }
};
#endif

// ---- op implementations: argument checks and layout once, then the backend B of the dispatch key ----

at::Tensor empty_like_kernel(const at::Tensor& x) { return cpu::empty_output(x, kernel_memory_format(x)); }

template <class B>
std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& input) {
  check_input(input, "bnfused.batch_stats");
  return B::batch_stats(in_kernel_layout(input));
}

// Batch statistics for the training forward in one call: (mean, rstd) and, when given, the running
// statistics updated in place (running_var with the unbiased variance), all on the input's device without a
// host sync. Saves the half-dozen small Python-level ops per call that dominate small inputs; on the CPU the
// per-channel finish is one loop (cpu/stats.cpp).
template <class B>
std::tuple<at::Tensor, at::Tensor> batch_stats_update(const at::Tensor& input, const OptTensor& running_mean,
                                                      const OptTensor& running_var, double momentum, double eps) {
  constexpr const char* op = "bnfused.batch_stats_update";
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_rm == has_rv, op, ": running_mean and running_var must be given together");
  check_input(input, op);
  if (has_rm) {
    check_channel_param(*running_mean, input, op, "running_mean");  // updated in place, in their own dtype
    check_channel_param(*running_var, input, op, "running_var");
  }
  return B::batch_stats_update(in_kernel_layout(input), running_mean, running_var, momentum, eps);
}

// batch_stats only tells autograd whether mean/rstd are this batch's statistics; the forward ignores it.
template <class B>
at::Tensor forward(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight,
                   const OptTensor& bias, const at::Tensor& key, double p, bool /*batch_stats*/, int64_t act,
                   double act_alpha, double act_beta) {
  constexpr const char* op = "bnfused.forward";
  const KernelArgs a = prepare(op, input, mean, rstd, weight, bias, &key, p);
  auto out = empty_like_kernel(a.x);
  B::forward(a, key, p, act_spec(act, act_alpha, act_beta, op), out);
  return out;
}

// The training forward of the CPU autograd path (CPU only: the CUDA kernels regenerate the mask from the key):
// out as forward() gives it, plus the keep pattern packed 1 bit per element for the backward ops (all ones when
// p == 0).
std::tuple<at::Tensor, at::Tensor> forward_keep_bits(const at::Tensor& input, const at::Tensor& mean,
                                                     const at::Tensor& rstd, const OptTensor& weight,
                                                     const OptTensor& bias, const at::Tensor& key, double p,
                                                     bool /*batch_stats*/, int64_t act, double act_alpha,
                                                     double act_beta) {
  constexpr const char* op = "bnfused.forward_keep_bits";
  const KernelArgs a = prepare(op, input, mean, rstd, weight, bias, &key, p);
  const ActSpec spec = act_spec(act, act_alpha, act_beta, op);
  auto out = empty_like_kernel(a.x);
  auto bits = at::empty({keep_bits_bytes(a.x.numel())}, a.x.options().dtype(at::kByte));
  if (p == 0.0) bits.fill_(0xFF);
  forward_cpu(a.x, a.mean, a.rstd, a.weight, a.bias, host_key(key), p, spec, out, bits.data_ptr<uint8_t>());
  return {out, bits};
}

template <class B>
std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_out, const at::Tensor& input,
                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                   const OptTensor& weight, const OptTensor& bias,
                                                   const at::Tensor& key, double p, const OptTensor& keep_bits,
                                                   int64_t act, double act_alpha, double act_beta) {
  constexpr const char* op = "bnfused.backward_reduce";
  const KernelArgs a = prepare(op, input, mean, rstd, weight, bias, &key, p);
  const ActSpec spec = act_spec(act, act_alpha, act_beta, op);
  const uint8_t* bits = keep_bits_of(keep_bits, a.x, op);
  return B::backward_reduce(like_input_layout(grad_out, a.x, op), a, key, p, spec, bits);
}

// sum_g/sum_g_xhat (with the element count they were summed over: the global count under SyncBN) turn on the
// batch-statistics terms. They are divided here, not by the caller, so a compiled backward runs no separate tiny
// kernel between the two backward ops.
template <class B>
at::Tensor backward_input(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
                          const at::Tensor& key, double p, const OptTensor& sum_g, const OptTensor& sum_g_xhat,
                          c10::SymInt count, const OptTensor& keep_bits, int64_t act, double act_alpha,
                          double act_beta) {
  constexpr const char* op = "bnfused.backward_input";
  const KernelArgs a = prepare(op, input, mean, rstd, weight, bias, &key, p);
  const ActSpec spec = act_spec(act, act_alpha, act_beta, op);
  const GradSums sums = check_sums(op, sum_g, sum_g_xhat, count, a.x);
  const uint8_t* bits = keep_bits_of(keep_bits, a.x, op);
  auto dx = empty_like_kernel(a.x);
  B::backward_input(like_input_layout(grad_out, a.x, op), a, key, p, spec, sums, dx, bits);
  return dx;
}

template <class B>
at::Tensor dropout_mask(const at::Tensor& key, c10::SymIntArrayRef shape, double p) {
  constexpr const char* op = "bnfused.dropout_mask";
  check_p(p, op);
  TORCH_CHECK(key.scalar_type() == at::kLong && key.numel() == 2, op,
              ": philox key must be an int64 tensor of 2 elements (seed, offset)");
  auto keep = at::empty_symint(shape, key.options().dtype(at::kBool));
  B::dropout_mask(key, p, keep);
  return keep;
}

// ---- BN + residual add + ReLU (+ dropout) ----

// The residual in x's kernel layout, after torch.add-like checks (RuntimeError): input's shape, dtype and device.
at::Tensor residual_like_input(const at::Tensor& residual, const at::Tensor& x, const char* op) {
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual shape ", residual.sizes(), " does not match input shape ",
              x.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), op, ": residual dtype ", residual.scalar_type(),
              " does not match input dtype ", x.scalar_type());
  TORCH_CHECK(residual.device() == x.device(), op, ": residual is on ", residual.device(), " but input is on ",
              x.device(), "; expected all tensors to be on the same device");
  return residual.contiguous(kernel_memory_format(x));
}

template <class B>
at::Tensor add_relu_forward(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& mean,
                            const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
                            const at::Tensor& key, double p, bool /*batch_stats*/, int64_t act, double act_alpha,
                            double act_beta) {
  constexpr const char* op = "bnfused.add_relu_forward";
  const KernelArgs a = prepare(op, input, mean, rstd, weight, bias, &key, p);
  const ActSpec spec = act_spec(act, act_alpha, act_beta, op, /*gate_bits=*/true);
  auto out = empty_like_kernel(a.x);
  B::add_relu_forward(a, residual_like_input(residual, a.x, op), key, p, spec, out, nullptr);
  return out;
}

// The training forward: out, plus the pass bits (keep AND bn(x) + residual > 0, 1 bit per element in memory
// order) that stand in for the residual, the key and the ReLU's input in the backward.
template <class B>
std::tuple<at::Tensor, at::Tensor> add_relu_forward_bits(const at::Tensor& input, const at::Tensor& residual,
                                                         const at::Tensor& mean, const at::Tensor& rstd,
                                                         const OptTensor& weight, const OptTensor& bias,
                                                         const at::Tensor& key, double p, bool /*batch_stats*/,
                                                         int64_t act, double act_alpha, double act_beta) {
  constexpr const char* op = "bnfused.add_relu_forward_bits";
  const KernelArgs a = prepare(op, input, mean, rstd, weight, bias, &key, p);
  const ActSpec spec = act_spec(act, act_alpha, act_beta, op, /*gate_bits=*/true);
  auto out = empty_like_kernel(a.x);
  auto bits = at::empty({keep_bits_bytes(a.x.numel())}, a.x.options().dtype(at::kByte));
  B::add_relu_forward(a, residual_like_input(residual, a.x, op), key, p, spec, out, bits.data_ptr<uint8_t>());
  return {out, bits};
}

template <class B>
std::tuple<at::Tensor, at::Tensor> add_relu_backward_reduce(const at::Tensor& grad_out, const at::Tensor& input,
                                                            const at::Tensor& mean, const at::Tensor& rstd,
                                                            const at::Tensor& pass_bits, double p) {
  constexpr const char* op = "bnfused.add_relu_backward_reduce";
  const KernelArgs a = prepare(op, input, mean, rstd, std::nullopt, std::nullopt, nullptr, p);
  check_packed_bits(pass_bits, a.x, op, "pass_bits");
  return B::add_relu_backward_reduce(like_input_layout(grad_out, a.x, op), a, pass_bits, p);
}

template <class B>
std::tuple<at::Tensor, at::Tensor> add_relu_backward_input(const at::Tensor& grad_out, const at::Tensor& input,
                                                           const at::Tensor& mean, const at::Tensor& rstd,
                                                           const OptTensor& weight, const at::Tensor& pass_bits,
                                                           double p, const OptTensor& sum_g,
                                                           const OptTensor& sum_g_xhat, c10::SymInt count) {
  constexpr const char* op = "bnfused.add_relu_backward_input";
  const KernelArgs a = prepare(op, input, mean, rstd, weight, std::nullopt, nullptr, p);
  const GradSums sums = check_sums(op, sum_g, sum_g_xhat, count, a.x);
  check_packed_bits(pass_bits, a.x, op, "pass_bits");
  auto dx = empty_like_kernel(a.x);
  auto grad_residual = empty_like_kernel(a.x);
  B::add_relu_backward_input(like_input_layout(grad_out, a.x, op), a, pass_bits, p, sums, dx, grad_residual);
  return {dx, grad_residual};
}

// Every op with a kernel per device, registered for backend B.
template <class B>
void register_backend(torch::Library& m) {
  m.impl("batch_stats", &batch_stats<B>);
  m.impl("batch_stats_update", &batch_stats_update<B>);
  m.impl("forward", &forward<B>);
  m.impl("backward_reduce", &backward_reduce<B>);
  m.impl("backward_input", &backward_input<B>);
  m.impl("dropout_mask", &dropout_mask<B>);
  m.impl("add_relu_forward", &add_relu_forward<B>);
  m.impl("add_relu_forward_bits", &add_relu_forward_bits<B>);
  m.impl("add_relu_backward_reduce", &add_relu_backward_reduce<B>);
  m.impl("add_relu_backward_input", &add_relu_backward_input<B>);
}

#ifndef BNFUSED_WITH_CUDA
// A build without CUDA kernels: a CUDA tensor gets this error instead of the dispatcher's "could not run".
void no_cuda_kernels(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(),
              ": got a CUDA tensor, but this bnfused build has no CUDA kernels (built with a CPU-only torch or "
              "without nvcc); rebuild with `pip install --no-build-isolation -e .` on a CUDA machine");
}
#endif

}  // namespace

}  // namespace bnfused

TORCH_LIBRARY(bnfused, m) {
  // Per-channel mean and biased variance over (N, *spatial); float32 (float64 for float64 input).
  m.def("batch_stats(Tensor input) -> (Tensor mean, Tensor var)");
  // (mean, rstd = 1/sqrt(var + eps)) of the batch; running stats (if given) updated in place with momentum.
  m.def(
      "batch_stats_update(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "
      "float eps) -> (Tensor mean, Tensor rstd)");
  // y = dropout(act((x - mean) * rstd * weight + bias)); key = int64[2] (seed, offset); p = 0 skips the RNG.
  // batch_stats: mean/rstd are this batch's statistics, so the backward differentiates through them. act: the
  // activation (csrc/activation.h's Act: 0 identity, 1 relu, 2 hardtanh(alpha, beta), 3 leaky_relu(alpha), 4 silu,
  // 5 hardswish, 6 gelu, 7 gelu tanh, 8 elu(alpha), 9 mish), the same in every op below that takes it.
  m.def(
      "forward(Tensor input, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, Tensor key, float p, "
      "bool batch_stats, int act=1, float act_alpha=0., float act_beta=0.) -> Tensor");
  // CPU only: forward plus the keep pattern packed 1 bit per element (uint8[ceil(numel / 8)], bit k of byte b =
  // element 8b + k in the kernel's memory order: logical for contiguous and 2-d input, (N, spatial..., C) for
  // channels_last), which the backward ops then read instead of regenerating it.
  m.def(
      "forward_keep_bits(Tensor input, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, Tensor key, "
      "float p, bool batch_stats, int act=1, float act_alpha=0., float act_beta=0.) -> (Tensor out, Tensor keep_bits)");
  // Per-channel sums of g and g * xhat, g = grad_out * keep / (1 - p) * act'(z).
  m.def(
      "backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
      "Tensor key, float p, Tensor? keep_bits=None, int act=1, float act_alpha=0., float act_beta=0.) -> (Tensor sum_g, Tensor sum_g_xhat)");
  // grad_input; with sum_g/sum_g_xhat (over `count` elements, global under SyncBN) the statistics were batch
  // statistics and their terms are included. In both backward ops keep_bits (CPU, from forward_keep_bits of the
  // same input in the same memory format: the bits follow memory order), when given, is the mask instead of the key.
  m.def(
      "backward_input(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
      "Tensor key, float p, Tensor? sum_g, Tensor? sum_g_xhat, SymInt count, Tensor? keep_bits=None, "
      "int act=1, float act_alpha=0., float act_beta=0.) -> Tensor");
  // Keep pattern (bool) of the fused kernels for a tensor of `shape` in logical (NCHW) order, on key's device.
  m.def("dropout_mask(Tensor key, SymInt[] shape, float p) -> Tensor");

  // BN + residual add + activation (+ dropout): y = dropout(act((x - mean) * rstd * weight + bias + residual));
  // residual of input's shape, dtype and device, in any memory format; output in input's kernel memory format.
  // act: identity, relu or hardtanh (the activations whose gradient gate fits the pass bits).
  m.def(
      "add_relu_forward(Tensor input, Tensor residual, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
      "Tensor key, float p, bool batch_stats, int act=1, float act_alpha=0., float act_beta=0.) -> Tensor");
  // The same, plus the pass bits (keep AND act' = 1 at bn(x) + residual) packed 1 bit per element in the kernel's memory
  // order (as forward_keep_bits' keep bits): all the backward needs besides input and per-channel tensors.
  m.def(
      "add_relu_forward_bits(Tensor input, Tensor residual, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
      "Tensor key, float p, bool batch_stats, int act=1, float act_alpha=0., float act_beta=0.) -> (Tensor out, Tensor pass_bits)");
  // Per-channel sums of g and g * xhat, g = grad_out * pass / (1 - p) (the residual's gradient).
  m.def(
      "add_relu_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor pass_bits, "
      "float p) -> (Tensor sum_g, Tensor sum_g_xhat)");
  // (grad_input, grad_residual = g), grad_input as backward_input's from g (sums over `count`: batch statistics).
  m.def(
      "add_relu_backward_input(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
      "Tensor pass_bits, float p, Tensor? sum_g, Tensor? sum_g_xhat, SymInt count) -> "
      "(Tensor grad_input, Tensor grad_residual)");
}

TORCH_LIBRARY_IMPL(bnfused, CPU, m) {
  bnfused::register_backend<bnfused::CpuBackend>(m);
  m.impl("forward_keep_bits", &bnfused::forward_keep_bits);
}

#ifdef BNFUSED_WITH_CUDA
TORCH_LIBRARY_IMPL(bnfused, CUDA, m) { bnfused::register_backend<bnfused::CudaBackend>(m); }
#else
TORCH_LIBRARY_IMPL(bnfused, CUDA, m) {
  for (const char* name : {"batch_stats", "batch_stats_update", "forward", "forward_keep_bits", "backward_reduce",
                           "backward_input", "dropout_mask", "add_relu_forward", "add_relu_forward_bits",
                           "add_relu_backward_reduce", "add_relu_backward_input"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bnfused::no_cuda_kernels>());
}
#endif

// The backward ops have no derivatives. Without an Autograd kernel, PyTorch's default fallback lets a double
// backward through them (create_graph=True on the raw op) run with a warning and silently give zeros; this one
// makes differentiating their outputs an error ("derivative for bnfused::backward_input is not implemented").
TORCH_LIBRARY_IMPL(bnfused, Autograd, m) {
  m.impl("backward_reduce", torch::autograd::autogradNotImplementedFallback());
  m.impl("backward_input", torch::autograd::autogradNotImplementedFallback());
  m.impl("add_relu_backward_reduce", torch::autograd::autogradNotImplementedFallback());
  m.impl("add_relu_backward_input", torch::autograd::autogradNotImplementedFallback());
}

namespace {

std::vector<uint32_t> philox_block(uint64_t seed, uint64_t offset, uint64_t block) {
  const auto r = bnfused::mask_block(bnfused::PhiloxKey{seed, offset}, block);
  return {r.x[0], r.x[1], r.x[2], r.x[3]};
}

std::vector<uint32_t> philox_raw(std::vector<uint32_t> ctr, std::vector<uint32_t> key) {
  TORCH_CHECK(ctr.size() == 4 && key.size() == 2, "philox_raw: expected 4 counter words and 2 key words");
  const auto r = bnfused::philox4x32_10(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1]);
  return {r.x[0], r.x[1], r.x[2], r.x[3]};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bnfused C++/CUDA extension: fused BatchNorm -> ReLU -> Dropout kernels";
#ifdef BNFUSED_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("torch_version") = TORCH_VERSION;
#if defined(CPU_CAPABILITY_AVX512)
  m.attr("cpu_capability") = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  m.attr("cpu_capability") = "avx2";
#else
  m.attr("cpu_capability") = "default";
#endif
  m.def("bn_relu_dropout_eager", &bnfused::bn_relu_dropout_eager,
        "Eager CPU path of functional.bn_relu_dropout_unchecked: statistics, fused forward and its C++ autograd node",
        pybind11::arg("input"), pybind11::arg("running_mean"), pybind11::arg("running_var"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("training"), pybind11::arg("momentum"), pybind11::arg("eps"),
        pybind11::arg("p"), pybind11::arg("key"), pybind11::arg("act") = 1,
        pybind11::arg("act_alpha") = 0.0, pybind11::arg("act_beta") = 0.0, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("bn_add_relu_dropout_eager", &bnfused::bn_add_relu_dropout_eager,
        "Eager CPU path of functional.bn_add_relu_dropout_unchecked: statistics, fused forward and its C++ autograd "
        "node",
        pybind11::arg("input"), pybind11::arg("residual"), pybind11::arg("running_mean"),
        pybind11::arg("running_var"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("training"),
        pybind11::arg("momentum"), pybind11::arg("eps"), pybind11::arg("p"), pybind11::arg("key"), pybind11::arg("act") = 1,
        pybind11::arg("act_alpha") = 0.0, pybind11::arg("act_beta") = 0.0,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("eager_inputs_ok", &bnfused::eager_inputs_ok,
        "functional.check_inputs' tensor conditions without raising (false: run the Python checks for the error)",
        pybind11::arg("input"), pybind11::arg("running_mean"), pybind11::arg("running_var"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("training"));
  m.def("empty_cache", &bnfused::cpu::release_cached_outputs,
        "Free the CPU output blocks (>= 8 MiB) bnfused keeps for reuse; returns the bytes released");
  // Test hooks, in their own submodule (bnfused._C.testing): raw Philox, the CPU generators' keep runs at counter
  // values no test tensor reaches, and the drop threshold.
  auto testing = m.def_submodule("testing", "Test hooks of the CPU kernels' random number generation");
  testing.def("philox4x32_10", &philox_raw, "Raw Philox4x32-10 of one counter (4 words) and key (2 words)",
            pybind11::arg("counter"), pybind11::arg("key"));
  testing.def("philox_block", &philox_block, "Philox output used for mask block `block` (elements 8*block ... 8*block+7)",
            pybind11::arg("seed"), pybind11::arg("offset"), pybind11::arg("block"));
  testing.def("keep_run", [](uint64_t seed, uint64_t offset, double p, uint64_t start, int64_t n) {
              return bnfused::keep_run_cpu(bnfused::PhiloxKey{seed, offset}, p, start, n);
            }, "Test hook: CPU keep pattern of logical elements start .. start + n - 1 (raises if the keep-flag "
               "generator of the channels_last transposed tiles disagrees with it)");
  testing.def("keep_run_bytes", [](uint64_t seed, uint64_t offset, double p, uint64_t start, int64_t n) {
              return bnfused::keep_run_bytes_cpu(bnfused::PhiloxKey{seed, offset}, p, start, n);
            }, "Test hook: CPU keep bytes the same run writes, of the blocks whose first element lies in it");
  testing.def("keep_block_rows", [](uint64_t seed, uint64_t offset, double p, uint64_t first, uint64_t stride,
                                  int64_t count) {
              return bnfused::keep_block_rows_cpu(bnfused::PhiloxKey{seed, offset}, p, first, stride, count);
            }, "Test hook: CPU keep pattern of 8 rows x `count` channels whose blocks are first + j * stride (row-major)");
  testing.def("threshold16", &bnfused::threshold16, "Drop threshold (out of 65536) the kernels use for probability p",
            pybind11::arg("p"));
}
