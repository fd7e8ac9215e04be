// Thin torch binding of the CUDA Hadamard kernel (csrc/cuda/hadamard.cu; prototype in
// tokenbounds/cuda_launch.h). Compiled only against a CUDA build of torch (setup.py); the schema
// is in csrc/ops.cpp. Inputs are validated in pyext/ops/hadamard.py (which routes float64 and rows
// longer than hadamard_cuda_max_n() to the Triton kernel); the checks here only guard memory
// safety.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "tokenbounds/cuda_launch.h"

namespace tokenbounds {
namespace {

at::Tensor hadamard_transform_cuda(const at::Tensor& x, const at::Tensor& hk, double scale) {
  TORCH_CHECK(x.is_cuda() && hk.is_cuda() && x.device() == hk.device(), "x and hk must be on one CUDA device");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D tensor");
  TORCH_CHECK(hk.dim() == 2 && hk.size(0) == hk.size(1) && hk.scalar_type() == at::kFloat &&
                  hk.is_contiguous(),
              "hk must be a contiguous float32 K x K matrix");
  const int64_t rows = x.size(0), n = x.size(1), k = hk.size(0);
  TORCH_CHECK(n <= hadamard_cuda_max_n(), "row length ", n, " exceeds the CUDA kernel's shared memory");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const float* h = hk.data_ptr<float>();
  const float s = static_cast<float>(scale);
  cudaError_t err;
  switch (x.scalar_type()) {
    case at::kFloat:
      err = launch_hadamard_transform<float>(x.data_ptr<float>(), out.data_ptr<float>(), h, rows, n, k, s, stream);
      break;
    case at::kHalf:
      err = launch_hadamard_transform<__half>(reinterpret_cast<const __half*>(x.data_ptr<at::Half>()),
                                              reinterpret_cast<__half*>(out.data_ptr<at::Half>()), h,
                                              rows, n, k, s, stream);
      break;
    case at::kBFloat16:
      err = launch_hadamard_transform<__nv_bfloat16>(
          reinterpret_cast<const __nv_bfloat16*>(x.data_ptr<at::BFloat16>()),
          reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()), h, rows, n, k, s, stream);
      break;
    default:
      TORCH_CHECK(false, "hadamard_transform (CUDA): unsupported dtype ", x.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, "hadamard_transform CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenbounds, CUDA, m) { m.impl("hadamard_transform", &hadamard_transform_cuda); }

}  // namespace tokenbounds
