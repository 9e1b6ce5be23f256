// The eager path of the module and functional on plain CPU tensors as one C++ call: batch statistics (or the
// running ones), the fused forward and a C++ autograd node whose backward calls the backward ops. Python's
// autograd.Function and three boxed op calls cost ~50 us per layer and step, which is most of a small layer's
// time ((4, 8): module fwd+bwd 266 us against 204 for nn's chain). The ops are the registered ones, called
// through the dispatcher, so profilers and dispatch modes see the same calls as on the Python path.
//
// functional.py keeps the Python path (BNReLUDropoutFunction, autograd.py) for torch.compile, CUDA, tensor
// subclasses and active torch function / dispatch modes; the two backward formulas (here and autograd.input_grads)
// must stay the same.
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

using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                              const OptTensor&, const at::Tensor&, double, bool);
using ForwardKeepBitsSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const OptTensor&, const OptTensor&, const at::Tensor&,
                                                              double, bool);

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
                           const OptTensor&, const OptTensor&, const at::Tensor&, double, const OptTensor&)>();
  return op;
}

auto& backward_input_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnfused::backward_input", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptTensor&, const OptTensor&, const at::Tensor&, double,
                                         const OptTensor&, const OptTensor&, c10::SymInt, const OptTensor&)>();
  return op;
}

OptTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

bool requires_grad(const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); }

}  // namespace

// y = dropout(relu((x - mean) * rstd * weight + bias)), as BNReLUDropoutFunction in autograd.py. Outside the
// anonymous namespace so its node's name() reads "bnfused::BNReLUDropoutFunction".
struct BNReLUDropoutFunction : public torch::autograd::Function<BNReLUDropoutFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                            const OptTensor& weight, const OptTensor& bias, const at::Tensor& key, double p,
                            bool batch_stats, bool save_keep_bits) {
    // Straight to the kernels, as the Python Function's forward (the op's registered Python autograd is not run).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out, keep_bits;
    if (save_keep_bits)
      std::tie(out, keep_bits) = forward_keep_bits_op().call(x, mean, rstd, weight, bias, key, p, batch_stats);
    else
      out = forward_op().call(x, mean, rstd, weight, bias, key, p, batch_stats);
    ctx->save_for_backward({x, mean, rstd, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), key, keep_bits});
    ctx->saved_data["p"] = p;
    ctx->saved_data["batch_stats"] = batch_stats;
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
    // needs_input_grad counts the defined tensor inputs only: x, mean, rstd, then weight and bias when given.
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = weight.has_value() && ctx->needs_input_grad(3);
    const bool need_b = bias.has_value() && ctx->needs_input_grad(weight.has_value() ? 4 : 3);
    const at::Tensor& grad_out = grads[0];
    at::Tensor sum_g, sum_g_xhat, grad_x, grad_w, grad_b;
    if ((need_x && batch_stats) || need_w || need_b)
      std::tie(sum_g, sum_g_xhat) = backward_reduce_op().call(grad_out, x, mean, rstd, weight, bias, key, p, keep_bits);
    if (need_x) {
      const OptTensor sg = batch_stats ? OptTensor(sum_g) : std::nullopt;
      const OptTensor sgx = batch_stats ? OptTensor(sum_g_xhat) : std::nullopt;
      grad_x = backward_input_op().call(grad_out, x, mean, rstd, weight, bias, key, p, sg, sgx,
                                        c10::SymInt(x.numel() / x.size(1)), keep_bits);
    }
    if (need_w) grad_w = sum_g_xhat.to(weight->scalar_type());
    if (need_b) grad_b = sum_g.to(bias->scalar_type());
    // One gradient per forward argument (none for the non-tensor ones).
    return {grad_x, at::Tensor(), at::Tensor(), grad_w, grad_b, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor bn_relu_dropout_eager(const at::Tensor& input, const OptTensor& running_mean, const OptTensor& running_var,
                                 const OptTensor& weight, const OptTensor& bias, bool training, double momentum,
                                 double eps, double p, const OptTensor& key) {
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean, rstd;
  if (training) {
    // Below autograd: the statistics are constants of the node (its backward differentiates through them).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(mean, rstd) = batch_stats_update_op().call(input, running_mean, running_var, momentum, eps);
  } else {
    TORCH_CHECK(running_mean.has_value() && running_mean->defined() && running_var.has_value() &&
                    running_var->defined(),
                "running_mean must be defined in evaluation mode");
    at::NoGradGuard no_grad;
    mean = running_mean->detach().to(acc);
    rstd = running_var->detach().to(acc).add(eps).rsqrt_();
  }
  const at::Tensor k = key.has_value() ? *key : at::zeros({2}, input.options().dtype(at::kLong));
  // As autograd._saves_keep_bits: the CPU forward packs the mask for the backward when one will run.
  const bool save_keep_bits = input.is_cpu() && p > 0.0 && p < 1.0 && at::GradMode::is_enabled() &&
                              (input.requires_grad() || requires_grad(weight) || requires_grad(bias));
  return BNReLUDropoutFunction::apply(input, mean, rstd, weight, bias, k, p, training, save_keep_bits);
}

}  // namespace bnfused
