// CPU kernel for tokenbounds::smoothed_nll: one sweep over each row of logits, row-parallel.
//
// Per row: the max (to keep exponentials in range), the count of logits strictly above the
// target logit, and sum exp(x - ref) with ref = the target logit (NaN/+inf logits make the row
// invalid: NaN propagates through the sum, +inf shows in the max), all in one
// loop (smoothed_nll_row.inc). Memory traffic is one read of the logits; the work is the
// vectorized exp. The per-row finish (log p_y and every smoothing level) is the shared math of
// tokenbounds/smoothed_loss.h. SIMD paths (AVX2+FMA+F16C; AVX-512 on request, see
// cpu_features.h; scalar fallback) are compiled under `#pragma GCC target` and chosen at run
// time; no -march flag is needed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tokenbounds/cpu_features.h"
#include "tokenbounds/smoothed_loss.h"

namespace tokenbounds {
namespace {

constexpr int64_t kChunk = 2048;  // elements per chunk: 8 KiB of fp32, stays in L1

struct RowStats {
  float max = -INFINITY;  // reference point of the exponentials (the target logit when finite)
  double sum = 0.0;       // sum_j exp(x_j - max)
  int64_t count_greater = 0;
  bool has_nan = false;   // NaN or +inf seen: the row has no valid softmax
};

// ---------------------------------------------------------------- scalar fallback
template <typename T>
RowStats row_stats_scalar(const T* row, int64_t vocab, float target) {
  RowStats st;
  float row_max = -INFINITY;
  for (int64_t j = 0; j < vocab; ++j) {
    const float x = static_cast<float>(row[j]);
    if (x != x || x == INFINITY) st.has_nan = true;
    if (x > target) ++st.count_greater;
    row_max = std::max(row_max, x);
  }
  if (target != target) st.has_nan = true;
  st.max = row_max;
  if (row_max == -INFINITY) return st;
  double total = 0.0;
  for (int64_t j = 0; j < vocab; ++j) total += std::exp(static_cast<double>(row[j]) - row_max);
  st.sum = total;
  return st;
}

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
namespace avx2 {
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

#include "smoothed_nll_row.inc"
}  // namespace avx2
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX-512 (F + BW + VL)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
namespace avx512 {
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

#include "smoothed_nll_row.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif  // __x86_64__

template <typename T>
RowStats row_stats(cpu::Isa isa, const T* row, int64_t vocab, float target) {
#if defined(__x86_64__)
  if (isa == cpu::Isa::kAvx512) return avx512::row_stats_simd(row, vocab, target);
  if (isa == cpu::Isa::kAvx2) return avx2::row_stats_simd(row, vocab, target);
#endif
  return row_stats_scalar(row, vocab, target);
}

template <typename T>
void smoothed_nll_rows(const at::Tensor& logits, const at::Tensor& targets,
                       const std::vector<double>& log_keep, const std::vector<double>& log_floor,
                       int64_t vocab, int64_t ignore_index, at::Tensor& nll_bits,
                       at::Tensor& logp_out, at::Tensor& rank_out) {
  const int64_t n = logits.size(0);
  const int64_t row_stride = logits.stride(0);
  const int64_t num_alphas = static_cast<int64_t>(log_keep.size());
  const T* base = logits.data_ptr<T>();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  float* nll = nll_bits.data_ptr<float>();
  float* lp = logp_out.data_ptr<float>();
  int32_t* rk = rank_out.data_ptr<int32_t>();
  const cpu::Isa isa = cpu::detect_isa();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = tgt[i];
      float* nll_row = nll + i * num_alphas;
      if (y == ignore_index) {
        lp[i] = 0.f;
        rk[i] = 0;
        for (int64_t a = 0; a < num_alphas; ++a) nll_row[a] = 0.f;
        continue;
      }
      const T* row = base + i * row_stride;
      const float target = static_cast<float>(row[y]);
      const RowStats st = row_stats(isa, row, vocab, target);
      double logp = target_logp(target, st.max, st.sum);
      if (st.has_nan) logp = NAN;
      lp[i] = static_cast<float>(logp);
      rk[i] = static_cast<int32_t>(std::min<int64_t>(st.count_greater, INT32_MAX));
      for (int64_t a = 0; a < num_alphas; ++a)
        nll_row[a] = static_cast<float>(smoothed_nll_bits(logp, log_keep[a], log_floor[a]));
    }
  });
}

// logits [N, V_padded] (last dim contiguous), targets [N] int64, alphas [A] float64.
// Returns (nll_bits [N, A] float32, logp [N] float32, rank [N] int32). Inputs are validated in
// pyext/ops/losses.py; the checks here only guard memory safety.
std::tuple<at::Tensor, at::Tensor, at::Tensor> smoothed_nll_cpu(const at::Tensor& logits,
                                                                const at::Tensor& targets,
                                                                const at::Tensor& alphas,
                                                                int64_t vocab_size,
                                                                int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 && (logits.size(0) == 0 || logits.stride(1) == 1), "logits must be 2-D with unit column stride");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) &&
                  targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "targets must be contiguous int64 [N]");
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= logits.size(1), "vocab_size out of range");
  const at::Tensor alphas64 = alphas.to(at::kDouble).contiguous();
  const int64_t num_alphas = alphas64.numel();
  std::vector<double> log_keep(num_alphas), log_floor(num_alphas);
  for (int64_t a = 0; a < num_alphas; ++a) {
    const double alpha = alphas64.data_ptr<double>()[a];
    log_keep[a] = smoothing_log_keep(alpha);
    log_floor[a] = smoothing_log_floor(alpha, static_cast<double>(vocab_size));
  }
  const int64_t n = logits.size(0);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor nll_bits = at::empty({n, num_alphas}, f32);
  at::Tensor logp = at::empty({n}, f32);
  at::Tensor rank = at::empty({n}, logits.options().dtype(at::kInt));
  if (n == 0) return {nll_bits, logp, rank};
  // Targets are checked in Python; re-check bounds cheaply to never read out of the row.
  const int64_t* tgt = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(tgt[i] == ignore_index || (tgt[i] >= 0 && tgt[i] < vocab_size),
                "target out of range at row ", i);
  switch (logits.scalar_type()) {
    case at::kFloat:
      smoothed_nll_rows<float>(logits, targets, log_keep, log_floor, vocab_size, ignore_index,
                               nll_bits, logp, rank);
      break;
    case at::kBFloat16:
      smoothed_nll_rows<c10::BFloat16>(logits, targets, log_keep, log_floor, vocab_size,
                                       ignore_index, nll_bits, logp, rank);
      break;
    case at::kHalf:
      smoothed_nll_rows<c10::Half>(logits, targets, log_keep, log_floor, vocab_size, ignore_index,
                                   nll_bits, logp, rank);
      break;
    default:
      TORCH_CHECK(false, "smoothed_nll: unsupported logits dtype ", logits.scalar_type());
  }
  return {nll_bits, logp, rank};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenbounds, m) {
  m.def(
      "smoothed_nll(Tensor logits, Tensor targets, Tensor alphas, int vocab_size, "
      "int ignore_index) -> (Tensor nll_bits, Tensor logp, Tensor rank)");
}

TORCH_LIBRARY_IMPL(tokenbounds, CPU, m) { m.impl("smoothed_nll", &smoothed_nll_cpu); }

}  // namespace tokenbounds
