// CPU kernel for tokenbounds::hadamard_transform: y = scale * x @ (H_K (x) H_m)^T row by row.
//
// Rows are independent and processed in parallel; each row is converted to a float (or double)
// buffer that stays in L1/L2, transformed in place and written back. The AVX2 schedule does the
// first three butterfly stages inside one 8-lane register (lane permutes + a signed FMA), then
// the remaining stages as radix-8 / radix-4 / radix-2 passes over whole registers, so a 4096-point
// row takes four sweeps of its 16 KiB buffer instead of twelve. The K x K mix across chunks (for
// n = K * 2^k) is a +-1 matrix applied with FMAs over 8-wide column blocks. Scalar fallback and
// float64 use the shared schedule in tokenbounds/hadamard.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <vector>

#include "tokenbounds/cpu_features.h"
#include "tokenbounds/hadamard.h"

namespace tokenbounds {
namespace {

#if defined(__x86_64__)
#define TB_AVX2 __attribute__((target("avx2,fma")))

// Stages h = 1, 2, 4 inside one register of 8 floats.
TB_AVX2 inline __m256 fwht8(__m256 v) {
  const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  // lane j of the result: partner + sign_j * self, partner = lane j ^ h.
  v = _mm256_fmadd_ps(v, s1, _mm256_permute_ps(v, 0xB1));
  v = _mm256_fmadd_ps(v, s2, _mm256_permute_ps(v, 0x4E));
  v = _mm256_fmadd_ps(v, s4, _mm256_permute2f128_ps(v, v, 0x01));
  return v;
}

TB_AVX2 inline void bfly(__m256& a, __m256& b) {
  const __m256 s = _mm256_add_ps(a, b);
  b = _mm256_sub_ps(a, b);
  a = s;
}

// In-place FWHT of x[0..m), m >= 8 a power of two.
TB_AVX2 void fwht_avx2(float* x, int64_t m) {
  for (int64_t j = 0; j < m; j += 8) _mm256_storeu_ps(x + j, fwht8(_mm256_loadu_ps(x + j)));
  int64_t h = 8;
  while (h < m) {
    const int64_t remaining = [&] {
      int64_t r = 0;
      for (int64_t t = h; t < m; t <<= 1) ++r;
      return r;
    }();
    if (remaining >= 3) {  // radix-8: stages h, 2h, 4h on 8 registers
      for (int64_t i = 0; i < m; i += 8 * h) {
        for (int64_t j = i; j < i + h; j += 8) {
          __m256 r0 = _mm256_loadu_ps(x + j), r1 = _mm256_loadu_ps(x + j + h);
          __m256 r2 = _mm256_loadu_ps(x + j + 2 * h), r3 = _mm256_loadu_ps(x + j + 3 * h);
          __m256 r4 = _mm256_loadu_ps(x + j + 4 * h), r5 = _mm256_loadu_ps(x + j + 5 * h);
          __m256 r6 = _mm256_loadu_ps(x + j + 6 * h), r7 = _mm256_loadu_ps(x + j + 7 * h);
          bfly(r0, r1); bfly(r2, r3); bfly(r4, r5); bfly(r6, r7);
          bfly(r0, r2); bfly(r1, r3); bfly(r4, r6); bfly(r5, r7);
          bfly(r0, r4); bfly(r1, r5); bfly(r2, r6); bfly(r3, r7);
          _mm256_storeu_ps(x + j, r0); _mm256_storeu_ps(x + j + h, r1);
          _mm256_storeu_ps(x + j + 2 * h, r2); _mm256_storeu_ps(x + j + 3 * h, r3);
          _mm256_storeu_ps(x + j + 4 * h, r4); _mm256_storeu_ps(x + j + 5 * h, r5);
          _mm256_storeu_ps(x + j + 6 * h, r6); _mm256_storeu_ps(x + j + 7 * h, r7);
        }
      }
      h *= 8;
    } else if (remaining == 2) {  // radix-4
      for (int64_t i = 0; i < m; i += 4 * h) {
        for (int64_t j = i; j < i + h; j += 8) {
          __m256 r0 = _mm256_loadu_ps(x + j), r1 = _mm256_loadu_ps(x + j + h);
          __m256 r2 = _mm256_loadu_ps(x + j + 2 * h), r3 = _mm256_loadu_ps(x + j + 3 * h);
          bfly(r0, r1); bfly(r2, r3);
          bfly(r0, r2); bfly(r1, r3);
          _mm256_storeu_ps(x + j, r0); _mm256_storeu_ps(x + j + h, r1);
          _mm256_storeu_ps(x + j + 2 * h, r2); _mm256_storeu_ps(x + j + 3 * h, r3);
        }
      }
      h *= 4;
    } else {  // radix-2
      for (int64_t i = 0; i < m; i += 2 * h) {
        for (int64_t j = i; j < i + h; j += 8) {
          __m256 r0 = _mm256_loadu_ps(x + j), r1 = _mm256_loadu_ps(x + j + h);
          bfly(r0, r1);
          _mm256_storeu_ps(x + j, r0); _mm256_storeu_ps(x + j + h, r1);
        }
      }
      h *= 2;
    }
  }
}

TB_AVX2 void scale_avx2(float* x, int64_t n, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), s));
  for (; j < n; ++j) x[j] *= scale;
}

// out[a*m + b] = scale * sum_a' hk[a, a'] z[a'*m + b], m >= 8; 4 output chunks share each z load.
TB_AVX2 void mix_avx2(const float* z, float* out, const float* hk, int64_t k, int64_t m, float scale) {
  for (int64_t b = 0; b < m; b += 8) {
    int64_t a = 0;
    for (; a + 4 <= k; a += 4) {
      __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
      for (int64_t ap = 0; ap < k; ++ap) {
        const __m256 zv = _mm256_loadu_ps(z + ap * m + b);
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(hk[(a + 0) * k + ap]), zv, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(hk[(a + 1) * k + ap]), zv, acc1);
        acc2 = _mm256_fmadd_ps(_mm256_set1_ps(hk[(a + 2) * k + ap]), zv, acc2);
        acc3 = _mm256_fmadd_ps(_mm256_set1_ps(hk[(a + 3) * k + ap]), zv, acc3);
      }
      const __m256 s = _mm256_set1_ps(scale);
      _mm256_storeu_ps(out + (a + 0) * m + b, _mm256_mul_ps(acc0, s));
      _mm256_storeu_ps(out + (a + 1) * m + b, _mm256_mul_ps(acc1, s));
      _mm256_storeu_ps(out + (a + 2) * m + b, _mm256_mul_ps(acc2, s));
      _mm256_storeu_ps(out + (a + 3) * m + b, _mm256_mul_ps(acc3, s));
    }
    for (; a < k; ++a) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t ap = 0; ap < k; ++ap)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(hk[a * k + ap]), _mm256_loadu_ps(z + ap * m + b), acc);
      _mm256_storeu_ps(out + a * m + b, _mm256_mul_ps(acc, _mm256_set1_ps(scale)));
    }
  }
}
#endif  // __x86_64__

// Transform one row held in buf (length k * m, compute type C); result in res (== buf or mix).
template <typename C>
C* transform_row(C* buf, C* mix, const float* hk, int64_t k, int64_t m, C scale, bool simd) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<C, float>) {
    if (simd && m >= 8) {
      for (int64_t a = 0; a < k; ++a) fwht_avx2(buf + a * m, m);
      if (k == 1) {
        scale_avx2(buf, m, scale);
        return buf;
      }
      mix_avx2(buf, mix, hk, k, m, scale);
      return mix;
    }
  }
#endif
  (void)simd;
  for (int64_t a = 0; a < k; ++a) fwht_scalar(buf + a * m, m);
  if (k == 1) {
    for (int64_t j = 0; j < m; ++j) buf[j] *= scale;
    return buf;
  }
  hadamard_mix_scalar(buf, mix, hk, k, m, scale);
  return mix;
}

template <typename T, typename C>
void hadamard_rows(const T* in, T* out, int64_t rows, int64_t n, const float* hk, int64_t k,
                   double scale) {
  const int64_t m = n / k;
  const bool simd = cpu::detect_isa() != cpu::Isa::kScalar;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<C> buf(n), mix(k > 1 ? n : 0);
    for (int64_t r = begin; r < end; ++r) {
      const T* src = in + r * n;
      for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<C>(src[j]);
      const C* res = transform_row<C>(buf.data(), mix.data(), hk, k, m, static_cast<C>(scale), simd);
      T* dst = out + r * n;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(res[j]);
    }
  });
}

// x [rows, n] contiguous (float32 / bfloat16 / float16 / float64), hk [K, K] float32 contiguous
// with n = K * 2^k. Validated in pyext/ops/hadamard.py; checks here guard memory safety only.
at::Tensor hadamard_transform_cpu(const at::Tensor& x, const at::Tensor& hk, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D tensor");
  TORCH_CHECK(hk.dim() == 2 && hk.size(0) == hk.size(1) && hk.scalar_type() == at::kFloat &&
                  hk.is_contiguous(),
              "hk must be a contiguous float32 K x K matrix");
  const int64_t rows = x.size(0), n = x.size(1), k = hk.size(0);
  TORCH_CHECK(k >= 1 && n % k == 0, "n must be a multiple of K");
  const int64_t m = n / k;
  TORCH_CHECK(m >= 1 && (m & (m - 1)) == 0, "n / K must be a power of two");
  at::Tensor out = at::empty_like(x);
  if (rows == 0 || n == 0) return out;
  const float* h = hk.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat:
      hadamard_rows<float, float>(x.data_ptr<float>(), out.data_ptr<float>(), rows, n, h, k, scale);
      break;
    case at::kDouble:
      hadamard_rows<double, double>(x.data_ptr<double>(), out.data_ptr<double>(), rows, n, h, k, scale);
      break;
    case at::kBFloat16:
      hadamard_rows<c10::BFloat16, float>(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(),
                                          rows, n, h, k, scale);
      break;
    case at::kHalf:
      hadamard_rows<c10::Half, float>(x.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), rows, n, h,
                                      k, scale);
      break;
    default:
      TORCH_CHECK(false, "hadamard_transform: unsupported dtype ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenbounds, CPU, m) { m.impl("hadamard_transform", &hadamard_transform_cpu); }

}  // namespace tokenbounds
