// Thin torch binding of the CUDA smoothed-loss kernels (csrc/cuda/smoothed_nll.cu).
//
// Compiled only against a CUDA build of torch (setup.py). Registers the CUDA kernel of
// tokenbounds::smoothed_nll (schema defined in csrc/cpu/smoothed_nll.cpp) and defines +
// registers tokenbounds::linear_smoothed_nll. Inputs are validated in pyext/ops/losses.py; the
// checks here only guard memory safety. Nothing here synchronises the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace tokenbounds {

// Launchers defined in csrc/cuda/smoothed_nll.cu (keep the prototypes in sync).
#define TB_DECLARE_ROWS_LAUNCHER(SUFFIX, T)                                                    \
  cudaError_t launch_smoothed_nll_##SUFFIX(                                                   \
      const T* logits, int64_t row_stride, const int64_t* targets, const double* log_keep,   \
      const double* log_floor, int num_alphas, int64_t n, int64_t vocab, int64_t ignore_index, \
      float* nll_bits, float* logp, int32_t* rank, cudaStream_t stream);
#define TB_DECLARE_LINEAR_LAUNCHER(SUFFIX, T)                                                  \
  cudaError_t launch_linear_smoothed_nll_##SUFFIX(                                            \
      const T* hidden, const T* weight, const int64_t* targets, const double* log_keep,       \
      const double* log_floor, int num_alphas, int64_t n, int64_t d, int64_t vocab,           \
      int64_t ignore_index, float* nll_bits, float* logp, int32_t* rank, void* workspace,     \
      size_t workspace_bytes, cudaStream_t stream);
TB_DECLARE_ROWS_LAUNCHER(f32, float)
TB_DECLARE_ROWS_LAUNCHER(bf16, __nv_bfloat16)
TB_DECLARE_ROWS_LAUNCHER(f16, __half)
TB_DECLARE_LINEAR_LAUNCHER(f32, float)
TB_DECLARE_LINEAR_LAUNCHER(bf16, __nv_bfloat16)
TB_DECLARE_LINEAR_LAUNCHER(f16, __half)
#undef TB_DECLARE_ROWS_LAUNCHER
#undef TB_DECLARE_LINEAR_LAUNCHER
size_t linear_smoothed_nll_workspace_bytes(int64_t n, int64_t vocab);
size_t linear_smoothed_nll_min_workspace_bytes(int64_t vocab);

namespace {

// log(1 - a) and log(a / V) (-inf at a = 0), float64 on the device, without a host sync.
std::tuple<at::Tensor, at::Tensor> smoothing_constants(const at::Tensor& alphas, const at::Device& device,
                                                       int64_t vocab_size) {
  const at::Tensor a = alphas.to(device, at::kDouble).contiguous();
  const at::Tensor log_keep = at::log1p(a.neg()).contiguous();
  const at::Tensor floor = at::log(a).sub(std::log(static_cast<double>(vocab_size)));
  const at::Tensor log_floor =
      at::where(a.gt(0.0), floor, at::full_like(a, -INFINITY)).contiguous();
  return {log_keep, log_floor};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const at::Tensor& like, int64_t n,
                                                             int64_t num_alphas) {
  const auto f32 = like.options().dtype(at::kFloat);
  return {at::empty({n, num_alphas}, f32), at::empty({n}, f32),
          at::empty({n}, like.options().dtype(at::kInt))};
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> smoothed_nll_cuda(const at::Tensor& logits,
                                                                 const at::Tensor& targets,
                                                                 const at::Tensor& alphas,
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
  const int64_t num_alphas = alphas.numel();
  auto [nll_bits, logp, rank] = empty_outputs(logits, n, num_alphas);
  if (n == 0) return {nll_bits, logp, rank};
  auto [log_keep, log_floor] = smoothing_constants(alphas, logits.device(), vocab_size);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const double* lk = log_keep.data_ptr<double>();
  const double* lf = log_floor.data_ptr<double>();
  const int na = static_cast<int>(num_alphas);
  float* out_nll = nll_bits.data_ptr<float>();
  float* out_logp = logp.data_ptr<float>();
  int32_t* out_rank = rank.data_ptr<int32_t>();
  const int64_t stride = logits.stride(0);
  cudaError_t err;
  switch (logits.scalar_type()) {
    case at::kFloat:
      err = launch_smoothed_nll_f32(logits.data_ptr<float>(), stride, tgt, lk, lf, na, n, vocab_size,
                                    ignore_index, out_nll, out_logp, out_rank, stream);
      break;
    case at::kBFloat16:
      err = launch_smoothed_nll_bf16(
          reinterpret_cast<const __nv_bfloat16*>(logits.data_ptr<at::BFloat16>()), stride, tgt, lk,
          lf, na, n, vocab_size, ignore_index, out_nll, out_logp, out_rank, stream);
      break;
    case at::kHalf:
      err = launch_smoothed_nll_f16(reinterpret_cast<const __half*>(logits.data_ptr<at::Half>()),
                                    stride, tgt, lk, lf, na, n, vocab_size, ignore_index, out_nll,
                                    out_logp, out_rank, stream);
      break;
    default:
      TORCH_CHECK(false, "smoothed_nll: unsupported logits dtype ", logits.scalar_type());
  }
  check_launch(err, "smoothed_nll CUDA kernel");
  return {nll_bits, logp, rank};
}

// hidden [N, D], weight [V_padded, D] (same dtype, contiguous), targets [N] int64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_smoothed_nll_cuda(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& targets,
    const at::Tensor& alphas, int64_t vocab_size, int64_t ignore_index, int64_t max_bytes) {
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
  const int64_t n = hidden.size(0), d = hidden.size(1);
  const int64_t num_alphas = alphas.numel();
  auto [nll_bits, logp, rank] = empty_outputs(hidden, n, num_alphas);
  if (n == 0) return {nll_bits, logp, rank};
  if (d == 0) {  // every logit is 0: one zero row broadcast (row stride 0), never N x V
    const at::Tensor zero =
        at::zeros({1, vocab_size}, hidden.options().dtype(at::kFloat)).expand({n, vocab_size});
    return smoothed_nll_cuda(zero, targets, alphas, vocab_size, ignore_index);
  }
  auto [log_keep, log_floor] = smoothing_constants(alphas, hidden.device(), vocab_size);
  size_t ws_bytes = linear_smoothed_nll_workspace_bytes(n, vocab_size);
  if (ws_bytes > static_cast<size_t>(max_bytes)) ws_bytes = static_cast<size_t>(max_bytes);
  const size_t min_bytes = linear_smoothed_nll_min_workspace_bytes(vocab_size);
  if (ws_bytes < min_bytes) ws_bytes = min_bytes;
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, hidden.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const double* lk = log_keep.data_ptr<double>();
  const double* lf = log_floor.data_ptr<double>();
  const int na = static_cast<int>(num_alphas);
  float* out_nll = nll_bits.data_ptr<float>();
  float* out_logp = logp.data_ptr<float>();
  int32_t* out_rank = rank.data_ptr<int32_t>();
  void* ws = workspace.data_ptr();
  cudaError_t err;
  switch (hidden.scalar_type()) {
    case at::kFloat:
      err = launch_linear_smoothed_nll_f32(hidden.data_ptr<float>(), weight.data_ptr<float>(), tgt,
                                           lk, lf, na, n, d, vocab_size, ignore_index, out_nll,
                                           out_logp, out_rank, ws, ws_bytes, stream);
      break;
    case at::kBFloat16:
      err = launch_linear_smoothed_nll_bf16(
          reinterpret_cast<const __nv_bfloat16*>(hidden.data_ptr<at::BFloat16>()),
          reinterpret_cast<const __nv_bfloat16*>(weight.data_ptr<at::BFloat16>()), tgt, lk, lf, na,
          n, d, vocab_size, ignore_index, out_nll, out_logp, out_rank, ws, ws_bytes, stream);
      break;
    case at::kHalf:
      err = launch_linear_smoothed_nll_f16(
          reinterpret_cast<const __half*>(hidden.data_ptr<at::Half>()),
          reinterpret_cast<const __half*>(weight.data_ptr<at::Half>()), tgt, lk, lf, na, n, d,
          vocab_size, ignore_index, out_nll, out_logp, out_rank, ws, ws_bytes, stream);
      break;
    default:
      TORCH_CHECK(false, "linear_smoothed_nll: unsupported dtype ", hidden.scalar_type());
  }
  check_launch(err, "linear_smoothed_nll CUDA kernels");
  return {nll_bits, logp, rank};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenbounds, m) {
  m.def(
      "linear_smoothed_nll(Tensor hidden, Tensor weight, Tensor targets, Tensor alphas, "
      "int vocab_size, int ignore_index, int max_bytes) -> (Tensor nll_bits, Tensor logp, "
      "Tensor rank)");
}

TORCH_LIBRARY_IMPL(tokenbounds, CUDA, m) {
  m.impl("smoothed_nll", &smoothed_nll_cuda);
  m.impl("linear_smoothed_nll", &linear_smoothed_nll_cuda);
}

}  // namespace tokenbounds
