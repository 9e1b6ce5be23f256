// The eager path of the modules and functionals on plain CPU tensors as one C++ call: batch statistics (or the
// running ones), the fused forward and a C++ autograd node whose backward calls the backward ops; for
// BN -> ReLU -> Dropout (bn_relu_dropout) and for BN + residual add + ReLU (+ dropout) (bn_add_relu_dropout). Python's
// autograd.Function and three boxed op calls cost ~50 us per layer and step, which is most of a small layer's
// time ((4, 8): module fwd+bwd 266 us against 204 for nn's chain). The ops are the registered ones, called
// through the dispatcher, so profilers and dispatch modes see the same calls as on the Python path.
//
// functional.py keeps the Python path (BNReLUDropoutFunction / BNAddReLUDropoutFunction, autograd.py) for
// torch.compile, CUDA, tensor subclasses and active torch function / dispatch modes; the backward formulas here
// and in autograd.input_grads / autograd.add_relu_grads must stay the same.
#include <torch/extension.h>

#include "bnfused.h"

namespace bnfused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Typed handles of the registered ops (schemas in ops.cpp).
auto& batch_stats_update_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnfused::batch_stats_update", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, const OptTensor&,
                                                                 double, double)>();
  return op;
}

// The trailing (act, act_alpha, act_beta) of the ops that take an activation.
#define BNFUSED_ACT_ARGS int64_t, double, double

using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                              const OptTensor&, const at::Tensor&, double, bool, BNFUSED_ACT_ARGS);
using ForwardKeepBitsSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const OptTensor&, const OptTensor&, const at::Tensor&,
                                                              double, bool, BNFUSED_ACT_ARGS);

auto& forward_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnfused::forward", "").typed<ForwardSig>();
  return op;
}

auto& forward_keep_bits_op() {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bnfused::forward_keep_bits", "").typed<ForwardKeepBitsSig>();
  return op;
}

auto& backward_reduce_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnfused::backward_reduce", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const OptTensor&, const OptTensor&, const at::Tensor&, double, const OptTensor&,
                           BNFUSED_ACT_ARGS)>();
  return op;
}

auto& backward_input_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnfused::backward_input", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptTensor&, const OptTensor&, const at::Tensor&, double,
                                         const OptTensor&, const OptTensor&, c10::SymInt, const OptTensor&,
                                         BNFUSED_ACT_ARGS)>();
  return op;
}

using AddForwardBitsSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, const OptTensor&, const OptTensor&,
                                                              const at::Tensor&, double, bool, BNFUSED_ACT_ARGS);

auto& add_relu_forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnfused::add_relu_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptTensor&, const OptTensor&, const at::Tensor&, double, bool,
                                         BNFUSED_ACT_ARGS)>();
  return op;
}

auto& add_relu_forward_bits_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnfused::add_relu_forward_bits", "")
                       .typed<AddForwardBitsSig>();
  return op;
}

auto& add_relu_backward_reduce_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnfused::add_relu_backward_reduce", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, double)>();
  return op;
}

auto& add_relu_backward_input_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnfused::add_relu_backward_input", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const OptTensor&, const at::Tensor&, double, const OptTensor&, const OptTensor&,
                           c10::SymInt)>();
  return op;
}

OptTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

bool requires_grad(const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); }

// (mean, rstd) the kernels normalise with, as functional._statistics: the batch's in training (running statistics
// updated in place when given), else the running ones.
std::tuple<at::Tensor, at::Tensor> statistics(const at::Tensor& input, const OptTensor& running_mean,
                                              const OptTensor& running_var, bool training, double momentum,
                                              double eps) {
  if (training) {
    // Below autograd: the statistics are constants of the node (its backward differentiates through them).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return batch_stats_update_op().call(input, running_mean, running_var, momentum, eps);
  }
  TORCH_CHECK(running_mean.has_value() && running_mean->defined() && running_var.has_value() && running_var->defined(),
              "running_mean must be defined in evaluation mode");
  at::NoGradGuard no_grad;
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Eval layers are small and many: no dispatch that the common case (buffers in acc dtype, no grad) can skip.
  const auto constant = [](const at::Tensor& t) { return t.requires_grad() ? t.detach() : t; };
  at::Tensor mean = constant(*running_mean).to(acc);
  const at::Tensor var = constant(*running_var).to(acc).contiguous();
  // rstd = rsqrt(var + eps) as torch computes it (what functional._statistics gives): the sum rounded to acc,
  // then 1 / sqrt rounded once (ATen's CPU rsqrt, vectorised and scalar alike).
  at::Tensor rstd = at::empty_like(var);
  AT_DISPATCH_FLOATING_TYPES(acc, "bnfused_eval_rstd", [&] {
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    scalar_t* r = rstd.mutable_data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    for (int64_t c = 0; c < var.numel(); ++c) r[c] = scalar_t(1) / std::sqrt(v[c] + e);
  });
  return {mean, rstd};
}

// The key argument of a call without dropout (p == 0): the kernels skip the RNG and never read it, so one
// zero tensor serves every call (CPU only: the eager path's device; never written, so saving it is safe).
const at::Tensor& placeholder_key(const at::Tensor& input) {
  TORCH_INTERNAL_ASSERT(input.is_cpu());
  static const auto* key = new at::Tensor(at::zeros({2}, at::TensorOptions().dtype(at::kLong)));  // never freed
  return *key;
}

}  // namespace

// y = dropout(act((x - mean) * rstd * weight + bias)), as BNReLUDropoutFunction in autograd.py. Outside the
// anonymous namespace so its node's name() reads "bnfused::BNReLUDropoutFunction".
struct BNReLUDropoutFunction : public torch::autograd::Function<BNReLUDropoutFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                            const OptTensor& weight, const OptTensor& bias, const at::Tensor& key, double p,
                            bool batch_stats, bool save_keep_bits, int64_t act, double act_alpha, double act_beta) {
    // Straight to the kernels, as the Python Function's forward (the op's registered Python autograd is not run).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out, keep_bits;
    if (save_keep_bits)
      std::tie(out, keep_bits) =
          forward_keep_bits_op().call(x, mean, rstd, weight, bias, key, p, batch_stats, act, act_alpha, act_beta);
    else
      out = forward_op().call(x, mean, rstd, weight, bias, key, p, batch_stats, act, act_alpha, act_beta);
    ctx->save_for_backward({x, mean, rstd, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), key, keep_bits});
    ctx->saved_data["p"] = p;
    ctx->saved_data["batch_stats"] = batch_stats;
    ctx->saved_data["act"] = act;
    ctx->saved_data["act_alpha"] = act_alpha;
    ctx->saved_data["act_beta"] = act_beta;
    return out;
  }

  // The same formula as autograd.input_grads. The ops are called above autograd: with create_graph=True their
  // outputs carry the not-implemented derivative (ops.cpp), so a double backward raises instead of giving zeros.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &rstd = saved[2], &key = saved[5];
    const OptTensor weight = defined_or_none(saved[3]), bias = defined_or_none(saved[4]),
                    keep_bits = defined_or_none(saved[6]);
    const double p = ctx->saved_data["p"].toDouble();
    const bool batch_stats = ctx->saved_data["batch_stats"].toBool();
    const int64_t act = ctx->saved_data["act"].toInt();
    const double act_alpha = ctx->saved_data["act_alpha"].toDouble(), act_beta = ctx->saved_data["act_beta"].toDouble();
    // needs_input_grad counts the defined tensor inputs only: x, mean, rstd, then weight and bias when given.
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = weight.has_value() && ctx->needs_input_grad(3);
    const bool need_b = bias.has_value() && ctx->needs_input_grad(weight.has_value() ? 4 : 3);
    const at::Tensor& grad_out = grads[0];
    at::Tensor sum_g, sum_g_xhat, grad_x, grad_w, grad_b;
    if ((need_x && batch_stats) || need_w || need_b)
      std::tie(sum_g, sum_g_xhat) = backward_reduce_op().call(grad_out, x, mean, rstd, weight, bias, key, p, keep_bits,
                                                              act, act_alpha, act_beta);
    if (need_x) {
      const OptTensor sg = batch_stats ? OptTensor(sum_g) : std::nullopt;
      const OptTensor sgx = batch_stats ? OptTensor(sum_g_xhat) : std::nullopt;
      grad_x = backward_input_op().call(grad_out, x, mean, rstd, weight, bias, key, p, sg, sgx,
                                        c10::SymInt(x.numel() / x.size(1)), keep_bits, act, act_alpha, act_beta);
    }
    if (need_w) grad_w = sum_g_xhat.to(weight->scalar_type());
    if (need_b) grad_b = sum_g.to(bias->scalar_type());
    // One gradient per forward argument (none for the non-tensor ones).
    return {grad_x,       at::Tensor(), at::Tensor(), grad_w,       grad_b,      at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor bn_relu_dropout_eager(const at::Tensor& input, const OptTensor& running_mean, const OptTensor& running_var,
                                 const OptTensor& weight, const OptTensor& bias, bool training, double momentum,
                                 double eps, double p, const OptTensor& key, int64_t act, double act_alpha,
                                 double act_beta) {
  const auto [mean, rstd] = statistics(input, running_mean, running_var, training, momentum, eps);
  const at::Tensor& k = key.has_value() ? *key : placeholder_key(input);
  // As autograd._saves_keep_bits: the CPU forward packs the mask for the backward when one will run.
  const bool save_keep_bits = input.is_cpu() && p > 0.0 && p < 1.0 && at::GradMode::is_enabled() &&
                              (input.requires_grad() || requires_grad(weight) || requires_grad(bias));
  return BNReLUDropoutFunction::apply(input, mean, rstd, weight, bias, k, p, training, save_keep_bits, act, act_alpha,
                                      act_beta);
}

// y = dropout(relu((x - mean) * rstd * weight + bias + residual)), as BNAddReLUDropoutFunction in autograd.py:
// saves x, the per-channel tensors and the pass bits (1 bit per element), never the residual.
struct BNAddReLUDropoutFunction : public torch::autograd::Function<BNAddReLUDropoutFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual,
                            const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight,
                            const OptTensor& bias, const at::Tensor& key, double p, bool batch_stats, bool need_grad,
                            int64_t act, double act_alpha, double act_beta) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (!need_grad)
      return add_relu_forward_op().call(x, residual, mean, rstd, weight, bias, key, p, batch_stats, act, act_alpha,
                                        act_beta);
    auto [out, pass_bits] = add_relu_forward_bits_op().call(x, residual, mean, rstd, weight, bias, key, p, batch_stats,
                                                            act, act_alpha, act_beta);
    ctx->save_for_backward({x, mean, rstd, weight.value_or(at::Tensor()), pass_bits});
    ctx->saved_data["p"] = p;
    ctx->saved_data["batch_stats"] = batch_stats;
    ctx->saved_data["has_bias"] = bias.has_value();
    if (bias.has_value()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    return out;
  }

  // The same formula as autograd.add_relu_grads.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &rstd = saved[2], &pass_bits = saved[4];
    const OptTensor weight = defined_or_none(saved[3]);
    const double p = ctx->saved_data["p"].toDouble();
    const bool batch_stats = ctx->saved_data["batch_stats"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the defined tensor inputs only: x, residual, mean, rstd, then weight and bias.
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_r = ctx->needs_input_grad(1);
    const bool need_w = weight.has_value() && ctx->needs_input_grad(4);
    const bool need_b = has_bias && ctx->needs_input_grad(weight.has_value() ? 5 : 4);
    const at::Tensor& grad_out = grads[0];
    at::Tensor sum_g, sum_g_xhat, grad_x, grad_r, grad_w, grad_b;
    if ((need_x && batch_stats) || need_w || need_b)
      std::tie(sum_g, sum_g_xhat) = add_relu_backward_reduce_op().call(grad_out, x, mean, rstd, pass_bits, p);
    if (need_x || need_r) {
      // Only grad_input reads the sums (the residual's gradient alone needs none: grad_input is then dropped).
      const OptTensor sg = need_x && batch_stats ? OptTensor(sum_g) : std::nullopt;
      const OptTensor sgx = need_x && batch_stats ? OptTensor(sum_g_xhat) : std::nullopt;
      std::tie(grad_x, grad_r) = add_relu_backward_input_op().call(grad_out, x, mean, rstd, weight, pass_bits, p, sg,
                                                                   sgx, c10::SymInt(x.numel() / x.size(1)));
    }
    if (need_w) grad_w = sum_g_xhat.to(weight->scalar_type());
    if (need_b) grad_b = sum_g.to(ctx->saved_data["bias_dtype"].toScalarType());
    return {need_x ? grad_x : at::Tensor(), need_r ? grad_r : at::Tensor(), at::Tensor(), at::Tensor(), grad_w,
            grad_b, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor bn_add_relu_dropout_eager(const at::Tensor& input, const at::Tensor& residual,
                                     const OptTensor& running_mean, const OptTensor& running_var,
                                     const OptTensor& weight, const OptTensor& bias, bool training, double momentum,
                                     double eps, double p, const OptTensor& key, int64_t act, double act_alpha,
                                     double act_beta) {
  const auto [mean, rstd] = statistics(input, running_mean, running_var, training, momentum, eps);
  const at::Tensor& k = key.has_value() ? *key : placeholder_key(input);
  // As BNAddReLUDropoutFunction.forward: the pass bits only when a backward will read them.
  const bool need_grad = at::GradMode::is_enabled() && (input.requires_grad() || residual.requires_grad() ||
                                                        requires_grad(weight) || requires_grad(bias));
  return BNAddReLUDropoutFunction::apply(input, residual, mean, rstd, weight, bias, k, p, training, need_grad, act,
                                         act_alpha, act_beta);
}

// functional.check_inputs' conditions on the tensors, without raising: true when every one holds (the eager call
// then skips the Python checks, ~4 us a layer); false sends the caller to the Python checks, which raise the
// error (so the message and exception type are defined in one place). p, eps and momentum stay in Python.
bool eager_inputs_ok(const at::Tensor& input, const OptTensor& running_mean, const OptTensor& running_var,
                     const OptTensor& weight, const OptTensor& bias, bool training) {
  const auto dtype = input.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (input.dim() < 2) return false;
  const auto device = input.device();
#ifndef BNFUSED_WITH_CUDA
  if (device.is_cuda()) return false;
#endif
  if (!device.is_cpu() && !device.is_cuda() && !device.is_meta()) return false;
  const int64_t channels = input.size(1);
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  for (const OptTensor* t : {&running_mean, &running_var, &weight, &bias}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    if (!v.defined() || v.dim() != 1 || v.size(0) != channels || v.device() != device) return false;
    if (v.scalar_type() != dtype && v.scalar_type() != acc) return false;  // both floating point
  }
  if (running_mean.has_value() != running_var.has_value()) return false;
  if (!training && !running_mean.has_value()) return false;
  if (training) {  // more than one value per channel
    int64_t values = input.size(0);
    for (int64_t d = 2; d < input.dim(); ++d) values *= input.size(d);
    if (values == 1) return false;
  }
  return true;
}

}  // namespace bnfused
