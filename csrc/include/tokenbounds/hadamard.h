// Fast Walsh-Hadamard transform math shared by the CPU and CUDA kernels.
//
// The transform of a row of length n = K * m (m = 2^k) is y = scale * (H_K (x) H_m) x with H_m the
// Sylvester matrix (entry (-1)^popcount(i & j)). With index i = a * m + b (a < K, b < m) it is
// computed as m-point butterflies on each of the K contiguous chunks, then a K x K +-1 matrix
// applied across chunks (y[a, b] = scale * sum_a' H_K[a, a'] z[a', b]).
#pragma once
#include <cstdint>

#include "tokenbounds/common.h"

namespace tokenbounds {

// One radix-2 butterfly: (a, b) -> (a + b, a - b).
template <typename T>
TB_HD void hadamard_butterfly(T& a, T& b) {
  const T s = a + b;
  b = a - b;
  a = s;
}

// In-place unnormalized Walsh-Hadamard transform of x[0..m), m a power of two (scalar schedule).
template <typename T>
TB_HD void fwht_scalar(T* x, int64_t m) {
  for (int64_t h = 1; h < m; h <<= 1)
    for (int64_t i = 0; i < m; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) hadamard_butterfly(x[j], x[j + h]);
}

// out[a * m + b] = scale * sum_a' hk[a * k + a'] * z[a' * m + b]: mixing across the K chunks.
template <typename T>
TB_HD void hadamard_mix_scalar(const T* z, T* out, const float* hk, int64_t k, int64_t m, T scale) {
  for (int64_t a = 0; a < k; ++a) {
    T* o = out + a * m;
    for (int64_t b = 0; b < m; ++b) o[b] = T(0);
    for (int64_t ap = 0; ap < k; ++ap) {
      const T h = static_cast<T>(hk[a * k + ap]);
      const T* zr = z + ap * m;
      for (int64_t b = 0; b < m; ++b) o[b] += h * zr[b];
    }
    for (int64_t b = 0; b < m; ++b) o[b] *= scale;
  }
}

}  // namespace tokenbounds
