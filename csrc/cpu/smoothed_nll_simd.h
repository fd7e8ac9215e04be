// SIMD primitives of the CPU smoothed-loss kernels (csrc/cpu/smoothed_nll.cpp, the row kernel, and
// csrc/cpu/linear_smoothed_nll.cpp, the fused linear head): loads that widen bfloat16 / float16 to
// float32, horizontal reductions, and exp(x - ref) as a polynomial 2^t. Each instruction set lives
// in its own namespace compiled under `#pragma GCC target`, so no -march flag is needed and the
// kernels choose a path at run time (tokenbounds/cpu_features.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace tokenbounds {

#if defined(__x86_64__)
// exp(x - ref) as 2^t with t = (x - ref) log2(e) (x - ref first: exact for nearby values, which
// dominate the sum; fusing it into one FMA loses ~1e-5 when |ref| ~ 1e3): t = n + f, n = round(t)
// taken from the low mantissa bits of t + 1.5 * 2^23 (which also yields 2^n by one shift),
// |f| <= 1/2, and 2^f from a degree-5 minimax polynomial (max relative error 2.3e-7, fitted for
// this kernel). t is clamped at -126, so -inf and tiny terms contribute at most 2^-126 each
// (< 1e-33 relative to the sum, which is >= 1). The clamp is max(-126, t) with t SECOND: maxps
// returns its second operand when one is NaN, so a NaN logit makes the row's sum NaN (which is
// how NaN rows are detected, at no extra cost). Arguments
// above the reference by more than 64 are re-summed with a new reference, so no upper clamp.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kExp2Min = -126.f;
constexpr float kRoundMagic = 12582912.f + 127.f;  // 1.5 * 2^23, plus the exponent bias
constexpr float kP0 = 1.0000001192092896f, kP1 = 0.6931469440460205f, kP2 = 0.24022120237350464f,
                kP3 = 0.05550713464617729f, kP4 = 0.009675541892647743f,
                kP5 = 0.0013276445679366589f;

// ------------------------------------------------------------------ AVX2 + FMA + F16C
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace simd_avx2 {
using Vec = __m256;
using CountVec = __m256i;
constexpr int64_t kWidth = 8;

inline Vec vset1(float x) { return _mm256_set1_ps(x); }
inline Vec vmax_(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline CountVec count_zero() { return _mm256_setzero_si256(); }
// A true compare is all ones (-1 as int32): subtracting it adds 1 to the lane's count.
inline CountVec vcount_gt(CountVec c, Vec a, Vec t) {
  return _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(a, t, _CMP_GT_OQ)));
}
inline int64_t hsum_count(CountVec c) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), c);
  int64_t s = 0;
  for (int k = 0; k < 8; ++k) s += lanes[k];
  return s;
}
inline float hmax(Vec v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
inline float hsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline Vec vexp_minus(Vec x, Vec ref) {
  const Vec t = _mm256_max_ps(_mm256_set1_ps(kExp2Min), _mm256_mul_ps(_mm256_sub_ps(x, ref), _mm256_set1_ps(kLog2e)));
  const Vec biased = _mm256_add_ps(t, _mm256_set1_ps(kRoundMagic));
  const Vec f = _mm256_sub_ps(t, _mm256_sub_ps(biased, _mm256_set1_ps(kRoundMagic)));
  Vec p = _mm256_set1_ps(kP5);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP0));
  const Vec pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(biased), 23));
  return _mm256_mul_ps(p, pow2n);
}
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline Vec vload(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <typename T>
inline Vec vload_tail(const T* p, int64_t remaining) {
  if (remaining >= kWidth) return vload(p);
  alignas(32) float buf[kWidth];
  for (int64_t k = 0; k < kWidth; ++k) buf[k] = k < remaining ? static_cast<float>(p[k]) : -INFINITY;
  return _mm256_load_ps(buf);
}

}  // namespace simd_avx2
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX-512 (F + BW + VL)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
namespace simd_avx512 {
using Vec = __m512;
using CountVec = __m512i;
constexpr int64_t kWidth = 16;

inline Vec vset1(float x) { return _mm512_set1_ps(x); }
inline Vec vmax_(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline CountVec count_zero() { return _mm512_setzero_si512(); }
inline CountVec vcount_gt(CountVec c, Vec a, Vec t) {
  return _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(a, t, _CMP_GT_OQ), c, _mm512_set1_epi32(1));
}
inline int64_t hsum_count(CountVec c) { return _mm512_reduce_add_epi32(c); }
inline float hmax(Vec v) { return _mm512_reduce_max_ps(v); }
inline float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec vexp_minus(Vec x, Vec ref) {
  const Vec t = _mm512_max_ps(_mm512_set1_ps(kExp2Min), _mm512_mul_ps(_mm512_sub_ps(x, ref), _mm512_set1_ps(kLog2e)));
  const Vec biased = _mm512_add_ps(t, _mm512_set1_ps(kRoundMagic));
  const Vec f = _mm512_sub_ps(t, _mm512_sub_ps(biased, _mm512_set1_ps(kRoundMagic)));
  Vec p = _mm512_set1_ps(kP5);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kP0));
  const Vec pow2n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(biased), 23));
  return _mm512_mul_ps(p, pow2n);
}
inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF)
                         : static_cast<__mmask16>((1u << remaining) - 1u);
}
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline Vec vload(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Vec vload_tail(const float* p, int64_t remaining) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_mask(remaining), p);
}
inline Vec vload_tail(const c10::BFloat16* p, int64_t remaining) {
  const __mmask16 m = tail_mask(remaining);
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  const Vec v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), m, v);
}
inline Vec vload_tail(const c10::Half* p, int64_t remaining) {
  const __mmask16 m = tail_mask(remaining);
  return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)));
}

}  // namespace simd_avx512
#pragma GCC pop_options
#endif  // __x86_64__


}  // namespace tokenbounds
