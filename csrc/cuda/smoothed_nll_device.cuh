// Device code shared by the two CUDA smoothed-loss kernels: the row kernel
// (csrc/cuda/smoothed_nll_rows.cu) and the fused linear head (csrc/cuda/linear_smoothed_nll.cu).
// Per-thread row state (online log-sum-exp, count above the target, bad-value flag), its warp
// merge, vector loads and the per-row finish. The element math is tokenbounds/smoothed_loss.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "tokenbounds/smoothed_loss.h"

namespace tokenbounds {
namespace nll_device {

constexpr unsigned kFullMask = 0xffffffffu;

struct FastExp {
  TB_HD float operator()(float x) const {
#if defined(__CUDA_ARCH__)
    return __expf(x);  // ex2.approx: exp(-inf) = 0, exp(NaN) = NaN
#else
    return expf(x);
#endif
  }
};

// NaN or +inf: such a row has no valid softmax; log p is reported as NaN (validation raises).
__device__ __forceinline__ bool is_bad(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x7fffffffu) > 0x7f800000u || b == 0x7f800000u;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// 16-byte vector loads (streaming: the logits are read once).
template <typename T>
struct Vec16;

template <>
struct Vec16<float> {
  static constexpr int kN = 4;
  __device__ __forceinline__ static void load(const float* p, float* out) {
    const float4 v = __ldcs(reinterpret_cast<const float4*>(p));
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
};

template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int kN = 8;
  __device__ __forceinline__ static void load(const __nv_bfloat16* p, float* out) {
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // bfloat16 -> float32 is a 16-bit shift of the bit pattern.
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

template <>
struct Vec16<__half> {
  static constexpr int kN = 8;
  __device__ __forceinline__ static void load(const __half* p, float* out) {
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], sizeof(h));
      const float2 f = __half22float2(h);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

// Per-thread running state of one row.
struct RowState {
  LsePartial lse;  // (max, sum exp(x - max)) of the logits seen by this thread
  int count;       // logits strictly greater than the target logit
  int bad;         // saw NaN or +inf
};

__device__ __forceinline__ RowState empty_state() { return RowState{LsePartial{-INFINITY, 0.f}, 0, 0}; }

// Fold K logits into the state: one rescale per call, K exponentials.
template <int K>
__device__ __forceinline__ void consume(RowState& st, const float (&x)[K], float target) {
  float cmax = -INFINITY;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    st.count += x[i] > target ? 1 : 0;
    st.bad |= is_bad(x[i]) ? 1 : 0;
    cmax = fmaxf(cmax, x[i]);  // fmaxf ignores NaN (flagged above)
  }
  if (cmax == -INFINITY) return;
  if (cmax > st.lse.max) {
    st.lse.sum = st.lse.max == -INFINITY ? 0.f : st.lse.sum * __expf(st.lse.max - cmax);
    st.lse.max = cmax;
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) s += __expf(x[i] - st.lse.max);
  st.lse.sum += s;
}

// Merge the states of lanes that differ in the bits of `width - 1` (width a power of two <= 32).
template <int kWidth>
__device__ __forceinline__ void warp_merge(RowState& st) {
#pragma unroll
  for (int off = kWidth / 2; off > 0; off >>= 1) {
    const LsePartial other{__shfl_xor_sync(kFullMask, st.lse.max, off),
                           __shfl_xor_sync(kFullMask, st.lse.sum, off)};
    st.lse = lse_merge(st.lse, other, FastExp{});
    st.count += __shfl_xor_sync(kFullMask, st.count, off);
    st.bad |= __shfl_xor_sync(kFullMask, st.bad, off);
  }
}

// Per-alpha smoothed losses of one row from its log p (NaN rows stay NaN).
__device__ __forceinline__ void write_row_losses(int64_t row, double logp, const double* log_keep,
                                                 const double* log_floor, int num_alphas,
                                                 float* nll_bits, int first, int stride) {
  for (int a = first; a < num_alphas; a += stride)
    nll_bits[row * num_alphas + a] =
        static_cast<float>(smoothed_nll_bits(logp, log_keep[a], log_floor[a]));
}

__device__ __forceinline__ void write_ignored_row(int64_t row, int num_alphas, float* nll_bits,
                                                  float* logp_out, int32_t* rank_out, int first,
                                                  int stride) {
  for (int a = first; a < num_alphas; a += stride) nll_bits[row * num_alphas + a] = 0.f;
  if (first == 0) {
    logp_out[row] = 0.f;
    rank_out[row] = 0;
  }
}

}  // namespace nll_device
}  // namespace tokenbounds
