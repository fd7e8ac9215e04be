// Launch prototypes of every CUDA kernel: the one declaration that both the torch-free kernels
// (csrc/cuda/*.cu, which define them) and the thin torch bindings (csrc/cuda_bindings/*.cpp, which
// call them) include. Launchers take raw device pointers and a stream, never synchronise, and
// return the launch error (cudaErrorInvalidValue for sizes they cannot handle).
//
// The templates are defined in the .cu files and explicitly instantiated there for float,
// __nv_bfloat16 and __half (the `extern template` lines below), so a prototype that drifts from
// its definition fails to compile instead of failing to link.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace tokenbounds {

// ------------------------------------------------- smoothed loss (csrc/cuda/smoothed_nll_rows.cu)
// logits [n, >= vocab] with row stride `row_stride` (elements), targets [n]; log_keep / log_floor
// [num_alphas] float64 (tokenbounds/smoothed_loss.h). Writes nll_bits [n, num_alphas], logp [n],
// rank [n]. One block per row.
template <typename T>
cudaError_t launch_smoothed_nll(const T* logits, int64_t row_stride, const int64_t* targets,
                                const double* log_keep, const double* log_floor, int num_alphas,
                                int64_t n, int64_t vocab, int64_t ignore_index, float* nll_bits,
                                float* logp, int32_t* rank, cudaStream_t stream);
extern template cudaError_t launch_smoothed_nll<float>(const float*, int64_t, const int64_t*, const double*,
                                                       const double*, int, int64_t, int64_t, int64_t,
                                                       float*, float*, int32_t*, cudaStream_t);
extern template cudaError_t launch_smoothed_nll<__nv_bfloat16>(const __nv_bfloat16*, int64_t, const int64_t*,
                                                               const double*, const double*, int, int64_t,
                                                               int64_t, int64_t, float*, float*, int32_t*,
                                                               cudaStream_t);
extern template cudaError_t launch_smoothed_nll<__half>(const __half*, int64_t, const int64_t*, const double*,
                                                        const double*, int, int64_t, int64_t, int64_t,
                                                        float*, float*, int32_t*, cudaStream_t);

// ------------------------------------------ fused linear head (csrc/cuda/linear_smoothed_nll.cu)
// logits = hidden [n, d] @ weight[:vocab]^T (+ bias[:vocab]; bias may be null), never stored.
// `workspace` holds per-row partials; rows are processed in chunks that fit workspace_bytes
// (at least linear_smoothed_nll_min_workspace_bytes(vocab)).
template <typename T>
cudaError_t launch_linear_smoothed_nll(const T* hidden, const T* weight, const T* bias,
                                       const int64_t* targets, const double* log_keep,
                                       const double* log_floor, int num_alphas, int64_t n, int64_t d,
                                       int64_t vocab, int64_t ignore_index, float* nll_bits,
                                       float* logp, int32_t* rank, void* workspace,
                                       size_t workspace_bytes, cudaStream_t stream);
extern template cudaError_t launch_linear_smoothed_nll<float>(const float*, const float*, const float*,
                                                              const int64_t*, const double*, const double*,
                                                              int, int64_t, int64_t, int64_t, int64_t, float*,
                                                              float*, int32_t*, void*, size_t, cudaStream_t);
extern template cudaError_t launch_linear_smoothed_nll<__nv_bfloat16>(
    const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, const int64_t*, const double*,
    const double*, int, int64_t, int64_t, int64_t, int64_t, float*, float*, int32_t*, void*, size_t,
    cudaStream_t);
extern template cudaError_t launch_linear_smoothed_nll<__half>(const __half*, const __half*, const __half*,
                                                               const int64_t*, const double*, const double*,
                                                               int, int64_t, int64_t, int64_t, int64_t,
                                                               float*, float*, int32_t*, void*, size_t,
                                                               cudaStream_t);
// Workspace that processes all n rows in one chunk (less is fine: rows are chunked).
size_t linear_smoothed_nll_workspace_bytes(int64_t n, int64_t vocab);
// Smallest workspace that works (one row).
size_t linear_smoothed_nll_min_workspace_bytes(int64_t vocab);

// --------------------------------------------------- Hadamard transform (csrc/cuda/hadamard.cu)
// out[r] = scale * (H_K (x) H_{n/K}) x[r] for rows x [rows, n] (contiguous), hk [K, K] float32.
template <typename T>
cudaError_t launch_hadamard_transform(const T* x, T* out, const float* hk, int64_t rows, int64_t n,
                                      int64_t k, float scale, cudaStream_t stream);
extern template cudaError_t launch_hadamard_transform<float>(const float*, float*, const float*, int64_t,
                                                             int64_t, int64_t, float, cudaStream_t);
extern template cudaError_t launch_hadamard_transform<__nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*,
                                                                     const float*, int64_t, int64_t,
                                                                     int64_t, float, cudaStream_t);
extern template cudaError_t launch_hadamard_transform<__half>(const __half*, __half*, const float*, int64_t,
                                                              int64_t, int64_t, float, cudaStream_t);
// Longest row the shared-memory kernel handles (longer rows go to Triton).
int64_t hadamard_cuda_max_n();

// ------------------------------------------------ gram family (csrc/cuda/gram.cu)
// acc[:d, :d] (row stride ld_acc) += upper triangle of x^T x, x [n, d] with row stride ldx.
template <typename T, typename Acc>
cudaError_t launch_gram_accumulate(const T* x, int64_t n, int64_t d, int64_t ldx, Acc* acc, int64_t ld_acc,
                                   cudaStream_t stream);
extern template cudaError_t launch_gram_accumulate<float, float>(const float*, int64_t, int64_t, int64_t, float*,
                                               int64_t, cudaStream_t);
extern template cudaError_t launch_gram_accumulate<float, double>(const float*, int64_t, int64_t, int64_t, double*,
                                               int64_t, cudaStream_t);
extern template cudaError_t launch_gram_accumulate<double, float>(const double*, int64_t, int64_t, int64_t, float*,
                                               int64_t, cudaStream_t);
extern template cudaError_t launch_gram_accumulate<double, double>(const double*, int64_t, int64_t, int64_t, double*,
                                               int64_t, cudaStream_t);
extern template cudaError_t launch_gram_accumulate<__nv_bfloat16, float>(const __nv_bfloat16*, int64_t, int64_t, int64_t, float*,
                                               int64_t, cudaStream_t);
extern template cudaError_t launch_gram_accumulate<__nv_bfloat16, double>(const __nv_bfloat16*, int64_t, int64_t, int64_t, double*,
                                               int64_t, cudaStream_t);
extern template cudaError_t launch_gram_accumulate<__half, float>(const __half*, int64_t, int64_t, int64_t, float*,
                                               int64_t, cudaStream_t);
extern template cudaError_t launch_gram_accumulate<__half, double>(const __half*, int64_t, int64_t, int64_t, double*,
                                               int64_t, cudaStream_t);

// y [n, k] = x [n, d] (row stride ldx) @ Z, Z[i, c] = rademacher(seed, i, offset + c)
// (tokenbounds/gram.h); Out is double for double inputs and float otherwise.
template <typename T, typename Out>
cudaError_t launch_rademacher_matmul(const T* x, int64_t n, int64_t d, int64_t ldx, uint64_t seed,
                                     uint32_t offset, int64_t k, Out* y, cudaStream_t stream);
extern template cudaError_t launch_rademacher_matmul<float, float>(const float*, int64_t, int64_t, int64_t,
                                                                   uint64_t, uint32_t, int64_t, float*,
                                                                   cudaStream_t);
extern template cudaError_t launch_rademacher_matmul<double, double>(const double*, int64_t, int64_t,
                                                                     int64_t, uint64_t, uint32_t, int64_t,
                                                                     double*, cudaStream_t);
extern template cudaError_t launch_rademacher_matmul<__nv_bfloat16, float>(const __nv_bfloat16*, int64_t,
                                                                           int64_t, int64_t, uint64_t,
                                                                           uint32_t, int64_t, float*,
                                                                           cudaStream_t);
extern template cudaError_t launch_rademacher_matmul<__half, float>(const __half*, int64_t, int64_t, int64_t,
                                                                    uint64_t, uint32_t, int64_t, float*,
                                                                    cudaStream_t);

}  // namespace tokenbounds
