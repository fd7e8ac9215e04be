// Thin torch binding of the CUDA smoothed-loss kernels (csrc/cuda/smoothed_nll_rows.cu and
// csrc/cuda/linear_smoothed_nll.cu; prototypes in tokenbounds/cuda_launch.h).
//
// Compiled only against a CUDA build of torch (setup.py). Registers the CUDA kernels of
// tokenbounds::smoothed_nll and tokenbounds::linear_smoothed_nll (schemas in csrc/ops.cpp). The
// smoothing constants arrive computed (log_keep, log_floor on the device). Inputs are validated in
// pyext/ops/losses.py; the checks here only guard memory safety. Nothing here synchronises.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "tokenbounds/cuda_launch.h"

namespace tokenbounds {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const at::Tensor& like, int64_t n,
                                                             int64_t num_alphas) {
  const auto f32 = like.options().dtype(at::kFloat);
  return {at::empty({n, num_alphas}, f32), at::empty({n}, f32),
          at::empty({n}, like.options().dtype(at::kInt))};
}

// log_keep / log_floor as contiguous float64 on `device` (they already are when they come from
// pyext/ops/losses.py; this only guards the pointer reads).
std::tuple<at::Tensor, at::Tensor> constants_on(const at::Tensor& log_keep, const at::Tensor& log_floor,
                                                const at::Device& device) {
  TORCH_CHECK(log_keep.dim() == 1 && log_floor.dim() == 1 && log_keep.numel() == log_floor.numel(),
              "log_keep and log_floor must be 1-D of one length");
  return {log_keep.to(device, at::kDouble).contiguous(), log_floor.to(device, at::kDouble).contiguous()};
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// Tensor -> the launchers' element pointer types.
template <typename T>
const T* ptr(const at::Tensor& t);
template <>
const float* ptr<float>(const at::Tensor& t) { return t.data_ptr<float>(); }
template <>
const __nv_bfloat16* ptr<__nv_bfloat16>(const at::Tensor& t) {
  return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr<at::BFloat16>());
}
template <>
const __half* ptr<__half>(const at::Tensor& t) { return reinterpret_cast<const __half*>(t.data_ptr<at::Half>()); }

// Calls fn(T{}) with T the CUDA element type of `dtype`.
template <typename Fn>
cudaError_t with_cuda_type(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(__nv_bfloat16{});
    case at::kHalf: return fn(__half{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> smoothed_nll_cuda(const at::Tensor& logits,
                                                                 const at::Tensor& targets,
                                                                 const at::Tensor& log_keep_in,
                                                                 const at::Tensor& log_floor_in,
                                                                 int64_t vocab_size,
                                                                 int64_t ignore_index) {
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be 2-D with unit column stride");
  TORCH_CHECK(targets.is_cuda() && targets.get_device() == logits.get_device(),
              "targets must be on the logits' device");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) &&
                  targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "targets must be contiguous int64 [N]");
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= logits.size(1), "vocab_size out of range");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0);
  auto [log_keep, log_floor] = constants_on(log_keep_in, log_floor_in, logits.device());
  const int num_alphas = static_cast<int>(log_keep.numel());
  auto [nll_bits, logp, rank] = empty_outputs(logits, n, num_alphas);
  if (n == 0) return {nll_bits, logp, rank};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t err = with_cuda_type(logits.scalar_type(), "smoothed_nll", [&](auto zero) {
    using T = decltype(zero);
    return launch_smoothed_nll<T>(ptr<T>(logits), logits.stride(0), targets.data_ptr<int64_t>(),
                                  log_keep.data_ptr<double>(), log_floor.data_ptr<double>(), num_alphas,
                                  n, vocab_size, ignore_index, nll_bits.data_ptr<float>(),
                                  logp.data_ptr<float>(), rank.data_ptr<int32_t>(), stream);
  });
  check_launch(err, "smoothed_nll CUDA kernel");
  return {nll_bits, logp, rank};
}

// hidden [N, D], weight [V_padded, D], bias [V_padded] or none (same dtype), targets [N] int64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_smoothed_nll_cuda(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& targets, const at::Tensor& log_keep_in, const at::Tensor& log_floor_in,
    int64_t vocab_size, int64_t ignore_index, int64_t max_bytes) {
  TORCH_CHECK(hidden_in.is_cuda() && weight_in.is_cuda() && targets.is_cuda(),
              "hidden, weight and targets must be CUDA tensors");
  TORCH_CHECK(hidden_in.dim() == 2 && weight_in.dim() == 2 && weight_in.size(1) == hidden_in.size(1),
              "hidden must be [N, D] and weight [V, D]");
  TORCH_CHECK(hidden_in.scalar_type() == weight_in.scalar_type(), "hidden and weight dtypes differ");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden_in.size(0) &&
                  targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "targets must be contiguous int64 [N]");
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= weight_in.size(0), "vocab_size out of range");
  TORCH_CHECK(max_bytes > 0, "max_bytes must be positive");
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->is_cuda() && bias_in->dim() == 1 && bias_in->size(0) >= vocab_size,
                "bias must be a CUDA tensor [V]");
    bias = bias_in->to(hidden.scalar_type()).contiguous();
  }
  const int64_t n = hidden.size(0), d = hidden.size(1);
  auto [log_keep, log_floor] = constants_on(log_keep_in, log_floor_in, hidden.device());
  const int num_alphas = static_cast<int>(log_keep.numel());
  auto [nll_bits, logp, rank] = empty_outputs(hidden, n, num_alphas);
  if (n == 0) return {nll_bits, logp, rank};
  if (d == 0) {  // every logit is its bias (or 0): one row broadcast (row stride 0), never N x V
    const at::Tensor row = bias.defined() ? bias.narrow(0, 0, vocab_size).to(at::kFloat).reshape({1, vocab_size})
                                          : at::zeros({1, vocab_size}, hidden.options().dtype(at::kFloat));
    return smoothed_nll_cuda(row.expand({n, vocab_size}), targets, log_keep, log_floor, vocab_size,
                             ignore_index);
  }
  size_t ws_bytes = linear_smoothed_nll_workspace_bytes(n, vocab_size);
  if (ws_bytes > static_cast<size_t>(max_bytes)) ws_bytes = static_cast<size_t>(max_bytes);
  const size_t min_bytes = linear_smoothed_nll_min_workspace_bytes(vocab_size);
  if (ws_bytes < min_bytes) ws_bytes = min_bytes;
  const at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, hidden.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t err = with_cuda_type(hidden.scalar_type(), "linear_smoothed_nll", [&](auto zero) {
    using T = decltype(zero);
    return launch_linear_smoothed_nll<T>(
        ptr<T>(hidden), ptr<T>(weight), bias.defined() ? ptr<T>(bias) : nullptr, targets.data_ptr<int64_t>(),
        log_keep.data_ptr<double>(), log_floor.data_ptr<double>(), num_alphas, n, d, vocab_size, ignore_index,
        nll_bits.data_ptr<float>(), logp.data_ptr<float>(), rank.data_ptr<int32_t>(), workspace.data_ptr(),
        ws_bytes, stream);
  });
  check_launch(err, "linear_smoothed_nll CUDA kernels");
  return {nll_bits, logp, rank};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenbounds, CUDA, m) {
  m.impl("smoothed_nll", &smoothed_nll_cuda);
  m.impl("linear_smoothed_nll", &linear_smoothed_nll_cuda);
}

}  // namespace tokenbounds
