// Declarations shared by the op layer (ops.cpp) and the CPU/CUDA backends.
//
// Kernel view of an input of shape (N, C, *spatial): S = prod(spatial), and the memory is either
//   ChannelsFirst: contiguous N, C, S   (torch.contiguous_format)
//   ChannelsLast : contiguous N, S, C   (channels_last, channels_last_3d, and every 2-d (N, C) input)
// The op layer makes any other input contiguous once, in the format PyTorch suggests for it.
// Per-channel tensors (mean, rstd, weight, bias, sums) reach the backends contiguous and in the
// accumulation dtype: float64 for float64 input, float32 otherwise.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

#include "activation.h"
#include "bn_math.h"
#include "geometry.h"
#include "philox.h"

namespace bnfused {

// Geometry of a tensor already in one of the two kernel layouts.
Geometry geometry_of(const at::Tensor& x);
// The memory format the kernels use for x (and give the output).
at::MemoryFormat kernel_memory_format(const at::Tensor& x);

using OptTensor = std::optional<at::Tensor>;

template <typename acc_t>
ChannelParams<acc_t> channel_params(const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight,
                                    const OptTensor& bias) {
  auto ptr = [](const OptTensor& t) -> const acc_t* {
    return (t.has_value() && t->defined()) ? t->template const_data_ptr<acc_t>() : nullptr;
  };
  return ChannelParams<acc_t>{mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), ptr(weight), ptr(bias)};
}

// ---- CPU backend (csrc/cpu) ----
std::tuple<at::Tensor, at::Tensor> batch_stats_cpu(const at::Tensor& x);
// (mean, rstd) of the batch, with running_mean/running_var (when given) updated in place.
std::tuple<at::Tensor, at::Tensor> batch_stats_update_cpu(const at::Tensor& x, const OptTensor& running_mean,
                                                          const OptTensor& running_var, double momentum, double eps);
// keep_bits_out (forward) receives the packed keep bits (cpu/keep_bits.h); keep_bits_in (backward), when not null,
// replaces the Philox key as the source of the mask.
void forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight,
                 const OptTensor& bias, PhiloxKey key, double p, const ActSpec& act, at::Tensor& out,
                 uint8_t* keep_bits_out = nullptr);
// pass_bits: keep_bits_in are the block tail's pass bits, which hold the mask and the activation's gate (act is then
// Identity).
std::tuple<at::Tensor, at::Tensor> backward_reduce_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                       const at::Tensor& mean, const at::Tensor& rstd,
                                                       const OptTensor& weight, const OptTensor& bias,
                                                       PhiloxKey key, double p, const ActSpec& act,
                                                       const uint8_t* keep_bits_in = nullptr, bool pass_bits = false);
// sum_g/sum_g_xhat (batch statistics; divided by count in the coefficient loop) or none (running statistics).
void backward_input_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                        const OptTensor& weight, const OptTensor& bias, PhiloxKey key, double p,
                        const OptTensor& sum_g, const OptTensor& sum_g_xhat, int64_t count, const ActSpec& act,
                        at::Tensor& dx, const uint8_t* keep_bits_in = nullptr, at::Tensor* grad_residual = nullptr);
// BN + residual add + activation (+ dropout), cpu/add_relu.cpp: out = act(bn(x) + residual) * mult (residual in x's
// layout; act one with gate bits: identity, relu, hardtanh), and with pass_bits_out the pass bits (keep AND
// act' = 1) packed in memory order (keep_bits.h's format). Their backward is the two backward ops in add mode, with
// the pass bits as keep_bits_in and act Identity: backward_reduce_cpu with pass_bits = true, and backward_input_cpu
// with grad_residual (which receives g = dy * pass / (1 - p)).
void add_relu_forward_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& mean,
                          const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias, PhiloxKey key,
                          double p, const ActSpec& act, at::Tensor& out, uint8_t* pass_bits_out = nullptr);
void dropout_mask_cpu(PhiloxKey key, double p, at::Tensor& keep);
// Test hooks: the CPU kernels' keep pattern (vectorised generators) of logical elements [start, start + n), the
// keep bytes that run writes (blocks whose first element lies in it), and the channels_last block rows (8 rows x
// `count` blocks first, first + stride, ...; row-major). They reach counter values (blocks of 2^32 and more) that
// no tensor in a test can.
std::vector<bool> keep_run_cpu(PhiloxKey key, double p, uint64_t start, int64_t n);
std::vector<uint8_t> keep_run_bytes_cpu(PhiloxKey key, double p, uint64_t start, int64_t n);
std::vector<bool> keep_block_rows_cpu(PhiloxKey key, double p, uint64_t first, uint64_t stride, int64_t count);

// ---- eager autograd path (eager_function.cpp) ----
// functional.bn_act_dropout on plain CPU tensors: statistics (training: the batch's, running stats updated; else
// the running ones), the fused forward and its C++ autograd node. key: None when p == 0; act: activation.h's Act.
at::Tensor bn_relu_dropout_eager(const at::Tensor& input, const OptTensor& running_mean, const OptTensor& running_var,
                                 const OptTensor& weight, const OptTensor& bias, bool training, double momentum,
                                 double eps, double p, const OptTensor& key, int64_t act, double act_alpha,
                                 double act_beta);
// functional.bn_add_act_dropout on plain CPU tensors, the same way (BN + residual add + activation + dropout).
at::Tensor bn_add_relu_dropout_eager(const at::Tensor& input, const at::Tensor& residual,
                                     const OptTensor& running_mean, const OptTensor& running_var,
                                     const OptTensor& weight, const OptTensor& bias, bool training, double momentum,
                                     double eps, double p, const OptTensor& key, int64_t act, double act_alpha,
                                     double act_beta);

// functional.check_inputs' tensor conditions, true when all hold (the caller raises through the Python checks).
bool eager_inputs_ok(const at::Tensor& input, const OptTensor& running_mean, const OptTensor& running_var,
                     const OptTensor& weight, const OptTensor& bias, bool training);

#ifdef BNFUSED_WITH_CUDA
// ---- CUDA backend (csrc/cuda) ----
// The key lives in device memory (int64[2]: seed, offset) so CUDA graph replays read a fresh one.
std::tuple<at::Tensor, at::Tensor> batch_stats_cuda(const at::Tensor& x);
// (mean, rstd) with running_mean/running_var (when given) updated in place, all in the reduction's one launch: where
// a channel's sum ends (its block, or the last block's merge of the partials when it is split over several).
std::tuple<at::Tensor, at::Tensor> batch_stats_update_cuda(const at::Tensor& x, const OptTensor& running_mean,
                                                           const OptTensor& running_var, double momentum, double eps);
// The three BN -> activation -> dropout ops take every activation (act, as the CPU ones; the kernels are templated
// on its kind), each compiled in two parts: kTranscendental must be act_is_transcendental(act.kind)
// (cuda/<op>.cu, cuda/<op>_transcendental.cu; activation.h's dispatch_act_part).
template <bool kTranscendental>
void forward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, const OptTensor& weight,
                  const OptTensor& bias, const at::Tensor& key, double p, const ActSpec& act, at::Tensor& out);
template <bool kTranscendental>
std::tuple<at::Tensor, at::Tensor> backward_reduce_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                        const OptTensor& weight, const OptTensor& bias,
                                                        const at::Tensor& key, double p, const ActSpec& act);
template <bool kTranscendental>
void backward_input_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
                         const at::Tensor& key, double p, const OptTensor& sum_g, const OptTensor& sum_g_xhat,
                         int64_t count, const ActSpec& act, at::Tensor& dx);
void dropout_mask_cuda(const at::Tensor& key, double p, at::Tensor& keep);
// BN + residual add + activation (cuda/add_relu.cu): as add_relu_forward_cpu (pass_bits_out may be null; act one
// with gate bits), and the two add-mode backward ops; backward_input writes dx and grad_residual = g.
void add_relu_forward_cuda(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& mean,
                           const at::Tensor& rstd, const OptTensor& weight, const OptTensor& bias,
                           const at::Tensor& key, double p, const ActSpec& act, at::Tensor& out,
                           uint8_t* pass_bits_out);
std::tuple<at::Tensor, at::Tensor> add_relu_backward_reduce_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                 const at::Tensor& mean, const at::Tensor& rstd,
                                                                 const at::Tensor& pass_bits, double p);
void add_relu_backward_input_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& rstd, const OptTensor& weight, const at::Tensor& pass_bits,
                                  double p, const OptTensor& sum_g, const OptTensor& sum_g_xhat, int64_t count,
                                  at::Tensor& dx, at::Tensor& grad_residual);
#endif

}  // namespace bnfused
