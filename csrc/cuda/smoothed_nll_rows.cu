// CUDA row kernel of tokenbounds::smoothed_nll (torch-free: CUDA headers + csrc/include; the
// binding is csrc/cuda_bindings/smoothed_nll.cpp). The element math (online log-sum-exp merge,
// log p_y, smoothed loss in log space) is tokenbounds/smoothed_loss.h, shared with the CPU kernel;
// only the scheduling lives here.
//
// One block per row. Each thread walks the row with 16-byte vector loads, keeping a running
// (max, sum exp(x - max)) pair updated once per vector and the count of logits above the target
// logit; pairs are merged with lse_merge through warp shuffles and shared memory.
#include <cuda_runtime.h>

#include <cstdint>

#include "smoothed_nll_device.cuh"
#include "tokenbounds/cuda_launch.h"

namespace tokenbounds {
namespace {
using namespace nll_device;

constexpr int kRowThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    smoothed_nll_rows_kernel(const T* __restrict__ logits, int64_t row_stride,
                             const int64_t* __restrict__ targets, const double* __restrict__ log_keep,
                             const double* __restrict__ log_floor, int num_alphas, int64_t vocab,
                             int64_t ignore_index, float* __restrict__ nll_bits,
                             float* __restrict__ logp_out, int32_t* __restrict__ rank_out) {
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t y = targets[row];
  if (y == ignore_index) {  // uniform across the block: exit before any barrier
    write_ignored_row(row, num_alphas, nll_bits, logp_out, rank_out, tid, kRowThreads);
    return;
  }
  const T* x = logits + row * row_stride;
  const bool y_ok = y >= 0 && y < vocab;  // validated in Python; never read out of the row
  const float target = y_ok ? to_float(x[y]) : NAN;

  RowState st = empty_state();
  constexpr int kVec = Vec16<T>::kN;
  // Scalar head up to 16-byte alignment (row strides need not be multiples of 16 bytes), then
  // two independent vector loads per step, then a scalar tail.
  const uintptr_t addr = reinterpret_cast<uintptr_t>(x);
  int64_t head = static_cast<int64_t>(((16u - (addr & 15u)) & 15u) / sizeof(T));
  if (addr % sizeof(T) != 0) head = vocab;
  if (head > vocab) head = vocab;
  for (int64_t j = tid; j < head; j += kRowThreads) {
    const float v[1] = {to_float(x[j])};
    consume(st, v, target);
  }
  const T* body = x + head;
  const int64_t num_vec = (vocab - head) / kVec;
  int64_t i = tid;
  for (; i + kRowThreads < num_vec; i += 2 * kRowThreads) {
    float v[2 * kVec];
    Vec16<T>::load(body + i * kVec, v);
    Vec16<T>::load(body + (i + kRowThreads) * kVec, v + kVec);
    consume(st, v, target);
  }
  if (i < num_vec) {
    float v[kVec];
    Vec16<T>::load(body + i * kVec, v);
    consume(st, v, target);
  }
  for (int64_t j = head + num_vec * kVec + tid; j < vocab; j += kRowThreads) {
    const float v[1] = {to_float(x[j])};
    consume(st, v, target);
  }

  warp_merge<32>(st);
  constexpr int kWarps = kRowThreads / 32;
  __shared__ float s_max[kWarps];
  __shared__ float s_sum[kWarps];
  __shared__ int s_count[kWarps];
  __shared__ int s_bad[kWarps];
  __shared__ double s_logp;
  const int warp = tid / 32, lane = tid % 32;
  if (lane == 0) {
    s_max[warp] = st.lse.max;
    s_sum[warp] = st.lse.sum;
    s_count[warp] = st.count;
    s_bad[warp] = st.bad;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? RowState{LsePartial{s_max[lane], s_sum[lane]}, s_count[lane], s_bad[lane]}
                       : empty_state();
    warp_merge<32>(st);
    if (lane == 0) {
      double logp = target_logp(static_cast<double>(target), st.lse.max, st.lse.sum);
      if (st.bad || !y_ok) logp = NAN;
      logp_out[row] = static_cast<float>(logp);
      rank_out[row] = st.count;
      s_logp = logp;
    }
  }
  __syncthreads();
  write_row_losses(row, s_logp, log_keep, log_floor, num_alphas, nll_bits, tid, kRowThreads);
}

}  // namespace

// ------------------------------------------------------------ launcher (tokenbounds/cuda_launch.h)
template <typename T>
cudaError_t launch_smoothed_nll(const T* logits, int64_t row_stride, const int64_t* targets,
                                const double* log_keep, const double* log_floor, int num_alphas,
                                int64_t n, int64_t vocab, int64_t ignore_index, float* nll_bits,
                                float* logp, int32_t* rank, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > INT32_MAX || vocab < 1 || vocab > INT32_MAX || num_alphas < 0) return cudaErrorInvalidValue;
  smoothed_nll_rows_kernel<T><<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(
      logits, row_stride, targets, log_keep, log_floor, num_alphas, vocab, ignore_index, nll_bits,
      logp, rank);
  return cudaGetLastError();
}

template cudaError_t launch_smoothed_nll<float>(const float*, int64_t, const int64_t*, const double*,
                                                const double*, int, int64_t, int64_t, int64_t, float*,
                                                float*, int32_t*, cudaStream_t);
template cudaError_t launch_smoothed_nll<__nv_bfloat16>(const __nv_bfloat16*, int64_t, const int64_t*,
                                                        const double*, const double*, int, int64_t,
                                                        int64_t, int64_t, float*, float*, int32_t*,
                                                        cudaStream_t);
template cudaError_t launch_smoothed_nll<__half>(const __half*, int64_t, const int64_t*, const double*,
                                                 const double*, int, int64_t, int64_t, int64_t, float*,
                                                 float*, int32_t*, cudaStream_t);

}  // namespace tokenbounds
