// Pieces shared by the two CPU smoothed-loss ops: tokenbounds::smoothed_nll (the row kernel,
// csrc/cpu/smoothed_nll.cpp) and tokenbounds::linear_smoothed_nll (the fused head,
// csrc/cpu/linear_smoothed_nll.cpp, whose fallback path runs the row kernel on logit chunks).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "tokenbounds/smoothed_loss.h"

namespace tokenbounds {

// The row kernel on logits [n, >= vocab] (unit column stride, any row stride; float32, bfloat16
// or float16): writes nll_bits [n, num_alphas], logp [n] and rank [n]. Rows run in parallel.
void smoothed_nll_rows(const at::Tensor& logits, const int64_t* targets, const double* log_keep,
                       const double* log_floor, int64_t num_alphas, int64_t vocab,
                       int64_t ignore_index, float* nll_bits, float* logp, int32_t* rank);

// Per-call smoothing constants log(1 - a) and log(a / V) (smoothed_loss.h), as the ops receive
// them: two float64 vectors of one length.
struct SmoothingConstants {
  at::Tensor log_keep, log_floor;
  int64_t num_alphas;
};

inline SmoothingConstants smoothing_constants_of(const at::Tensor& log_keep, const at::Tensor& log_floor) {
  TORCH_CHECK(log_keep.dim() == 1 && log_floor.dim() == 1 && log_keep.numel() == log_floor.numel(),
              "log_keep and log_floor must be 1-D of one length (one entry per smoothing level)");
  return {log_keep.to(at::kDouble).contiguous(), log_floor.to(at::kDouble).contiguous(), log_keep.numel()};
}

// Targets are validated in Python; re-checked here because the kernels index rows with them.
inline void check_targets(const at::Tensor& targets, int64_t n, int64_t vocab, int64_t ignore_index) {
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n && targets.scalar_type() == at::kLong &&
                  targets.is_contiguous(),
              "targets must be contiguous int64 [N]");
  const int64_t* tgt = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(tgt[i] == ignore_index || (tgt[i] >= 0 && tgt[i] < vocab), "target out of range at row ", i);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const at::TensorOptions& like,
                                                                    int64_t n, int64_t num_alphas) {
  return {at::empty({n, num_alphas}, like.dtype(at::kFloat)), at::empty({n}, like.dtype(at::kFloat)),
          at::empty({n}, like.dtype(at::kInt))};
}

inline void write_ignored_row(int64_t i, int64_t num_alphas, float* nll, float* lp, int32_t* rk) {
  lp[i] = 0.f;
  rk[i] = 0;
  for (int64_t a = 0; a < num_alphas; ++a) nll[i * num_alphas + a] = 0.f;
}

// log p_y (NaN for a row without a valid softmax) and the rank -> every output of row i.
inline void finish_row(int64_t i, double logp, int64_t count_greater, const double* log_keep,
                       const double* log_floor, int64_t num_alphas, float* nll, float* lp, int32_t* rk) {
  lp[i] = static_cast<float>(logp);
  rk[i] = static_cast<int32_t>(std::min<int64_t>(count_greater, INT32_MAX));
  for (int64_t a = 0; a < num_alphas; ++a)
    nll[i * num_alphas + a] = static_cast<float>(smoothed_nll_bits(logp, log_keep[a], log_floor[a]));
}

}  // namespace tokenbounds
