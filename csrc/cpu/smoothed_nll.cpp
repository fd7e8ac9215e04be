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

#include "smoothed_nll_cpu.h"
#include "smoothed_nll_simd.h"
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
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
using namespace simd_avx2;
#include "smoothed_nll_row.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
namespace avx512 {
using namespace simd_avx512;
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
void rows_typed(const T* base, int64_t n, int64_t row_stride, const int64_t* tgt, const double* log_keep,
                const double* log_floor, int64_t num_alphas, int64_t vocab, int64_t ignore_index,
                float* nll, float* lp, int32_t* rk) {
  const cpu::Isa isa = cpu::detect_isa();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = tgt[i];
      if (y == ignore_index) {
        write_ignored_row(i, num_alphas, nll, lp, rk);
        continue;
      }
      const T* row = base + i * row_stride;
      const float target = static_cast<float>(row[y]);
      const RowStats st = row_stats(isa, row, vocab, target);
      const double logp = st.has_nan ? NAN : target_logp(target, st.max, st.sum);
      finish_row(i, logp, st.count_greater, log_keep, log_floor, num_alphas, nll, lp, rk);
    }
  });
}

}  // namespace

void smoothed_nll_rows(const at::Tensor& logits, const int64_t* targets, const double* log_keep,
                       const double* log_floor, int64_t num_alphas, int64_t vocab,
                       int64_t ignore_index, float* nll_bits, float* logp, int32_t* rank) {
  const int64_t n = logits.size(0);
  if (n == 0) return;
  const int64_t stride = logits.stride(0);
  switch (logits.scalar_type()) {
    case at::kFloat:
      rows_typed(logits.data_ptr<float>(), n, stride, targets, log_keep, log_floor, num_alphas,
                 vocab, ignore_index, nll_bits, logp, rank);
      break;
    case at::kBFloat16:
      rows_typed(logits.data_ptr<c10::BFloat16>(), n, stride, targets, log_keep, log_floor,
                 num_alphas, vocab, ignore_index, nll_bits, logp, rank);
      break;
    case at::kHalf:
      rows_typed(logits.data_ptr<c10::Half>(), n, stride, targets, log_keep, log_floor, num_alphas,
                 vocab, ignore_index, nll_bits, logp, rank);
      break;
    default:
      TORCH_CHECK(false, "smoothed_nll: unsupported logits dtype ", logits.scalar_type());
  }
}

namespace {

// logits [N, V_padded] (last dim contiguous), targets [N] int64, log_keep / log_floor [A] float64
// (tokenbounds/smoothed_loss.h). Returns (nll_bits [N, A] float32, logp [N] float32, rank [N]
// int32). Inputs are validated in pyext/ops/losses.py; the checks here only guard memory safety.
std::tuple<at::Tensor, at::Tensor, at::Tensor> smoothed_nll_cpu(const at::Tensor& logits,
                                                                const at::Tensor& targets,
                                                                const at::Tensor& log_keep,
                                                                const at::Tensor& log_floor,
                                                                int64_t vocab_size,
                                                                int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 && (logits.size(0) == 0 || logits.stride(1) == 1),
              "logits must be 2-D with unit column stride");
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= logits.size(1), "vocab_size out of range");
  const int64_t n = logits.size(0);
  check_targets(targets, n, vocab_size, ignore_index);
  const SmoothingConstants c = smoothing_constants_of(log_keep, log_floor);
  auto [nll_bits, logp, rank] = empty_outputs(logits.options(), n, c.num_alphas);
  smoothed_nll_rows(logits, targets.data_ptr<int64_t>(), c.log_keep.data_ptr<double>(),
                    c.log_floor.data_ptr<double>(), c.num_alphas, vocab_size, ignore_index,
                    nll_bits.data_ptr<float>(), logp.data_ptr<float>(), rank.data_ptr<int32_t>());
  return {nll_bits, logp, rank};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenbounds, CPU, m) { m.impl("smoothed_nll", &smoothed_nll_cpu); }

}  // namespace tokenbounds
