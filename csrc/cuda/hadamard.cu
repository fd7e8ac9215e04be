// CUDA kernel for tokenbounds::hadamard_transform (torch-free; binding in
// csrc/cuda_bindings/hadamard.cpp). y = scale * (H_K (x) H_m) x for each row, n = K * m, m = 2^k.
//
// One thread block per row. The row is staged in shared memory as float; the log2(m) butterfly
// stages run with one __syncthreads each (each thread owns n/2 / blockDim butterflies per stage);
// then the K x K +-1 mix across chunks reads shared memory and writes the output directly.
// Rows up to kMaxSharedFloats elements fit; larger rows go to the Triton kernel (pyext/ops).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "tokenbounds/cuda_launch.h"
#include "tokenbounds/hadamard.h"

namespace tokenbounds {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxSharedFloats = 49152;  // 192 KiB: opt-in dynamic shared memory (sm_80+)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__global__ void hadamard_kernel(const T* __restrict__ x, T* __restrict__ out,
                                const float* __restrict__ hk, int64_t n, int64_t k, int log_m,
                                float scale) {
  extern __shared__ float buf[];
  const int64_t row = blockIdx.x;
  const T* src = x + row * n;
  T* dst = out + row * n;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) buf[j] = to_float(src[j]);
  __syncthreads();
  const int64_t half_n = n / 2;
  for (int s = 0; s < log_m; ++s) {
    const int64_t h = int64_t{1} << s;
    for (int64_t t = threadIdx.x; t < half_n; t += blockDim.x) {
      // butterfly t of stage h pairs j and j + h inside a block of 2h (chunks of m never mix)
      const int64_t j = (t / h) * 2 * h + (t % h);
      float lo = buf[j], hi = buf[j + h];
      hadamard_butterfly(lo, hi);
      buf[j] = lo;
      buf[j + h] = hi;
    }
    __syncthreads();
  }
  if (k == 1) {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dst[j] = from_float<T>(scale * buf[j]);
    return;
  }
  const int64_t m = n / k;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    const int64_t a = e / m, b = e % m;
    float acc = 0.f;
    for (int64_t ap = 0; ap < k; ++ap) acc = fmaf(__ldg(hk + a * k + ap), buf[ap * m + b], acc);
    dst[e] = from_float<T>(scale * acc);
  }
}

}  // namespace

int64_t hadamard_cuda_max_n() { return kMaxSharedFloats; }

// ------------------------------------------------------------ launcher (tokenbounds/cuda_launch.h)
template <typename T>
cudaError_t launch_hadamard_transform(const T* x, T* out, const float* hk, int64_t rows, int64_t n,
                                      int64_t k, float scale, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  if (n > kMaxSharedFloats || k < 1 || n % k != 0) return cudaErrorInvalidValue;
  const int64_t m = n / k;
  if ((m & (m - 1)) != 0) return cudaErrorInvalidValue;
  int log_m = 0;
  while ((int64_t{1} << log_m) < m) ++log_m;
  const size_t smem = static_cast<size_t>(n) * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        hadamard_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int threads = static_cast<int>(n / 2 < kThreads ? (n / 2 > 32 ? n / 2 : 32) : kThreads);
  hadamard_kernel<T><<<static_cast<unsigned>(rows), threads, smem, stream>>>(x, out, hk, n, k,
                                                                              log_m, scale);
  return cudaGetLastError();
}

template cudaError_t launch_hadamard_transform<float>(const float*, float*, const float*, int64_t, int64_t,
                                                      int64_t, float, cudaStream_t);
template cudaError_t launch_hadamard_transform<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*,
                                                              const float*, int64_t, int64_t, int64_t, float,
                                                              cudaStream_t);
template cudaError_t launch_hadamard_transform<__half>(const __half*, __half*, const float*, int64_t, int64_t,
                                                       int64_t, float, cudaStream_t);

}  // namespace tokenbounds
