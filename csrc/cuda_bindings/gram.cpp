// Thin torch binding of csrc/cuda/gram.cu (prototypes in tokenbounds/cuda_launch.h; compiled only
// with a CUDA build of torch; schemas in csrc/ops.cpp).
// Inputs are validated in pyext/ops/gram.py; the checks here only guard memory safety.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "tokenbounds/cuda_launch.h"

namespace tokenbounds {

namespace {

template <typename Acc>
void gram_dispatch(const at::Tensor& x, Acc* acc, int64_t ld_acc, cudaStream_t stream) {
  const int64_t n = x.size(0), d = x.size(1), ldx = x.stride(0);
  cudaError_t err = cudaSuccess;
  switch (x.scalar_type()) {
    case at::kFloat: err = launch_gram_accumulate(x.data_ptr<float>(), n, d, ldx, acc, ld_acc, stream); break;
    case at::kDouble: err = launch_gram_accumulate(x.data_ptr<double>(), n, d, ldx, acc, ld_acc, stream); break;
    case at::kBFloat16:
      err = launch_gram_accumulate(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr<at::BFloat16>()), n, d, ldx,
                                   acc, ld_acc, stream);
      break;
    case at::kHalf:
      err = launch_gram_accumulate(reinterpret_cast<const __half*>(x.data_ptr<at::Half>()), n, d, ldx, acc,
                                   ld_acc, stream);
      break;
    default: TORCH_CHECK(false, "gram_accumulate_: unsupported x dtype ", x.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, "gram_accumulate_ launch failed: ", cudaGetErrorString(err));
}

void gram_accumulate_cuda(at::Tensor acc, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && (x.size(0) == 0 || x.stride(1) == 1), "x must be 2-D with unit column stride");
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == x.size(1) && acc.size(1) == x.size(1) && acc.stride(1) == 1,
              "acc must be [d, d] with unit column stride");
  TORCH_CHECK(acc.device() == x.device(), "acc and x must be on one device");
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (acc.scalar_type() == at::kDouble) gram_dispatch<double>(x, acc.data_ptr<double>(), acc.stride(0), stream);
  else gram_dispatch<float>(x, acc.data_ptr<float>(), acc.stride(0), stream);
}

at::Tensor rademacher_matmul_cuda(const at::Tensor& x, int64_t seed, int64_t offset, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && (x.size(0) == 0 || x.stride(1) == 1), "x must be 2-D with unit column stride");
  TORCH_CHECK(k >= 0 && offset >= 0 && offset + k <= (int64_t(1) << 32), "bad k / offset");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool f64 = x.scalar_type() == at::kDouble;
  at::Tensor y = at::zeros({x.size(0), k}, x.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (x.size(0) == 0 || k == 0 || x.size(1) == 0) return y;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = x.size(0), d = x.size(1), ldx = x.stride(0);
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t off = static_cast<uint32_t>(offset);
  cudaError_t err = cudaSuccess;
  switch (x.scalar_type()) {
    case at::kFloat: err = launch_rademacher_matmul(x.data_ptr<float>(), n, d, ldx, s, off, k, y.data_ptr<float>(), stream); break;
    case at::kDouble: err = launch_rademacher_matmul(x.data_ptr<double>(), n, d, ldx, s, off, k, y.data_ptr<double>(), stream); break;
    case at::kBFloat16:
      err = launch_rademacher_matmul(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr<at::BFloat16>()), n, d, ldx, s,
                                     off, k, y.data_ptr<float>(), stream);
      break;
    case at::kHalf:
      err = launch_rademacher_matmul(reinterpret_cast<const __half*>(x.data_ptr<at::Half>()), n, d, ldx, s, off, k,
                                     y.data_ptr<float>(), stream);
      break;
    default: TORCH_CHECK(false, "rademacher_matmul: unsupported x dtype ", x.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, "rademacher_matmul launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenbounds, CUDA, m) {
  m.impl("gram_accumulate_", &gram_accumulate_cuda);
  m.impl("rademacher_matmul", &rademacher_matmul_cuda);
}

}  // namespace tokenbounds
