// CPU kernel for tokenbounds::smoothed_nll: one pass over each row of logits, row-parallel.
//
// Each row is read in chunks that fit in L1. For a chunk we take the max, count the logits
// strictly above the target logit and flag NaNs (first sweep), merge the chunk max into the
// running log-sum-exp state (tokenbounds/smoothed_loss.h), then add exp(x - max) from L1 (second
// sweep). Memory traffic is one read of the logits; the work is the vectorized exp.
// SIMD paths (AVX-512, AVX2+FMA, scalar) are compiled with function target attributes and chosen
// at run time (tokenbounds/cpu_features.h); no -march flag is needed.
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
  float max = -INFINITY;
  float sum = 0.f;
  int64_t count_greater = 0;
  bool has_nan = false;
};

inline float exp_scalar(float x) { return std::exp(x); }

// ---------------------------------------------------------------- scalar fallback
template <typename T>
RowStats row_stats_scalar(const T* row, int64_t vocab, float target) {
  RowStats st;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t end = std::min(vocab, start + kChunk);
    float cmax = -INFINITY;
    for (int64_t j = start; j < end; ++j) {
      const float x = static_cast<float>(row[j]);
      if (x != x) st.has_nan = true;
      if (x > target) ++st.count_greater;
      cmax = std::max(cmax, x);
    }
    if (cmax == -INFINITY) continue;
    if (cmax > st.max) {
      st.sum = st.max == -INFINITY ? 0.f : st.sum * std::exp(st.max - cmax);
      st.max = cmax;
    }
    float s = 0.f;
    for (int64_t j = start; j < end; ++j) s += std::exp(static_cast<float>(row[j]) - st.max);
    st.sum += s;
  }
  return st;
}

#if defined(__x86_64__)
#define TB_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// exp(x) for x <= 0 (arguments are always x - row max): Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2/2, degree-6 Taylor polynomial for e^r (relative error ~1.2e-7), 2^n by exponent
// arithmetic. Inputs below -87.3 (including -inf) give exactly 0; NaN is flagged separately.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpMin = -87.3f;

TB_AVX512 inline __m512 exp512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpMin), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

TB_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(kExpMin), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// ---- loads: 16 (AVX-512) or 8 (AVX2) elements as fp32; masked tails read -inf.
TB_AVX512 inline __m512 load16(const float* p, __mmask16 m) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, p);
}
TB_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), m, v);
}
TB_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), m, _mm512_cvtph_ps(raw));
}

TB_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TB_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
TB_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

TB_AVX512 inline float hmax512(__m512 v) { return _mm512_reduce_max_ps(v); }
TB_AVX2 inline float hmax256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
TB_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline __mmask16 tail_mask16(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF)
                         : static_cast<__mmask16>((1u << remaining) - 1u);
}

// NaN compares false with everything, so max/greater ignore it; it is flagged by an unordered
// compare and the row's log p becomes NaN, which ops.py reports as an input error.
template <typename T>
TB_AVX512 RowStats row_stats_avx512(const T* row, int64_t vocab, float target) {
  RowStats st;
  const __m512 vt = _mm512_set1_ps(target);
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t end = std::min(vocab, start + kChunk);
    __m512 vmax0 = _mm512_set1_ps(-INFINITY), vmax1 = vmax0;
    int64_t gt = 0;
    __mmask16 nan_seen = 0;
    int64_t j = start;
    for (; j + 32 <= end; j += 32) {
      const __m512 a = load16(row + j, 0xFFFF), b = load16(row + j + 16, 0xFFFF);
      vmax0 = _mm512_max_ps(vmax0, a);
      vmax1 = _mm512_max_ps(vmax1, b);
      gt += __builtin_popcount(_mm512_cmp_ps_mask(a, vt, _CMP_GT_OQ)) +
            __builtin_popcount(_mm512_cmp_ps_mask(b, vt, _CMP_GT_OQ));
      nan_seen |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
    }
    for (; j < end; j += 16) {
      const __mmask16 m = tail_mask16(end - j);
      const __m512 a = load16(row + j, m);
      vmax0 = _mm512_max_ps(vmax0, a);
      gt += __builtin_popcount(_mm512_cmp_ps_mask(a, vt, _CMP_GT_OQ));
      nan_seen |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    }
    st.count_greater += gt;
    st.has_nan |= nan_seen != 0;
    const float cmax = hmax512(_mm512_max_ps(vmax0, vmax1));
    if (cmax == -INFINITY) continue;
    if (cmax > st.max) {
      st.sum = st.max == -INFINITY ? 0.f : st.sum * std::exp(st.max - cmax);
      st.max = cmax;
    }
    const __m512 vm = _mm512_set1_ps(st.max);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    j = start;
    for (; j + 32 <= end; j += 32) {
      s0 = _mm512_add_ps(s0, exp512(_mm512_sub_ps(load16(row + j, 0xFFFF), vm)));
      s1 = _mm512_add_ps(s1, exp512(_mm512_sub_ps(load16(row + j + 16, 0xFFFF), vm)));
    }
    for (; j < end; j += 16) {
      s0 = _mm512_add_ps(s0, exp512(_mm512_sub_ps(load16(row + j, tail_mask16(end - j)), vm)));
    }
    st.sum += _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  }
  return st;
}

template <typename T>
TB_AVX2 RowStats row_stats_avx2(const T* row, int64_t vocab, float target) {
  RowStats st;
  const __m256 vt = _mm256_set1_ps(target);
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t end = std::min(vocab, start + kChunk);
    __m256 vmax0 = _mm256_set1_ps(-INFINITY), vmax1 = vmax0;
    int64_t gt = 0;
    int nan_seen = 0;
    int64_t j = start;
    for (; j + 16 <= end; j += 16) {
      const __m256 a = load8(row + j), b = load8(row + j + 8);
      vmax0 = _mm256_max_ps(vmax0, a);
      vmax1 = _mm256_max_ps(vmax1, b);
      gt += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(a, vt, _CMP_GT_OQ))) +
            __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(b, vt, _CMP_GT_OQ)));
      nan_seen |= _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q));
    }
    float cmax = hmax256(_mm256_max_ps(vmax0, vmax1));
    for (int64_t k = j; k < end; ++k) {
      const float x = static_cast<float>(row[k]);
      if (x != x) nan_seen = 1;
      if (x > target) ++gt;
      cmax = std::max(cmax, x);
    }
    st.count_greater += gt;
    st.has_nan |= nan_seen != 0;
    if (cmax == -INFINITY) continue;
    if (cmax > st.max) {
      st.sum = st.max == -INFINITY ? 0.f : st.sum * std::exp(st.max - cmax);
      st.max = cmax;
    }
    const __m256 vm = _mm256_set1_ps(st.max);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    j = start;
    for (; j + 16 <= end; j += 16) {
      s0 = _mm256_add_ps(s0, exp256(_mm256_sub_ps(load8(row + j), vm)));
      s1 = _mm256_add_ps(s1, exp256(_mm256_sub_ps(load8(row + j + 8), vm)));
    }
    float tail = 0.f;
    for (int64_t k = j; k < end; ++k) tail += std::exp(static_cast<float>(row[k]) - st.max);
    st.sum += hsum256(_mm256_add_ps(s0, s1)) + tail;
  }
  return st;
}
#endif  // __x86_64__

template <typename T>
RowStats row_stats(cpu::Isa isa, const T* row, int64_t vocab, float target) {
#if defined(__x86_64__)
  if (isa == cpu::Isa::kAvx512) return row_stats_avx512(row, vocab, target);
  if (isa == cpu::Isa::kAvx2) return row_stats_avx2(row, vocab, target);
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
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be 2-D with unit column stride");
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
