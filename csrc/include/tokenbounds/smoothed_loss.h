// Element math of the fused softmax + prediction smoothing + log-loss kernels, shared by the CPU
// (csrc/cpu), CUDA (csrc/cuda) kernels and mirrored by the Triton kernel (triton_kernels/).
//
// A row of logits x_0..x_{V-1} with target y is summarised by three numbers:
//   (row max m, s = sum_j exp(x_j - m), target logit x_y)  and  rank = #{j : x_j > x_y}.
// Everything the bounds need follows: log p_y = x_y - m - log s, every smoothing level
// (Lotfi et al. 2024, eq. "prediction smoothing": p_a = (1 - a) p + a / V), and top-k correctness.
#pragma once

#include <cmath>
#include <cstdint>

#include "tokenbounds/common.h"

namespace tokenbounds {

constexpr double kInvLn2 = 1.4426950408889634074;  // 1 / ln 2: nats -> bits

// Partial log-sum-exp state: sum of exp(x - max) over the elements seen so far. An empty state
// has max = -inf and sum = 0.
struct LsePartial {
  float max;
  float sum;
};

// Merge two partial states (the "online softmax" merge of Milakov & Gimelshein 2018). Safe when
// either side is empty or has max = -inf (a block of -inf logits).
template <typename ExpFn>
TB_HD LsePartial lse_merge(LsePartial a, LsePartial b, ExpFn exp_fn) {
  if (b.max == -INFINITY) return a;
  if (a.max == -INFINITY) return b;
  if (b.max > a.max) return LsePartial{b.max, a.sum * exp_fn(a.max - b.max) + b.sum};
  return LsePartial{a.max, a.sum + b.sum * exp_fn(b.max - a.max)};
}

// Natural log p_y from the merged state. -inf when the target logit is -inf (p_y = 0);
// NaN when the row has no finite logit (max = -inf), which validation reports to the user.
TB_HD double target_logp(double target_logit, double row_max, double sum_exp) {
  if (row_max == -INFINITY) return NAN;
  if (target_logit == -INFINITY) return -INFINITY;
  return (target_logit - row_max) - log(sum_exp);
}

// Per-alpha constants log(1 - a) (-inf at a = 1) and log(a / V) (-inf at a = 0, the unsmoothed
// loss). They are computed once per call, on the host, by these two functions
// (tokenbounds._C.smoothing_constants, used by pyext/ops/losses.py), and passed as two float64
// vectors to every backend: the CPU and CUDA ops and the Triton kernels.
TB_HD double smoothing_log_keep(double alpha) { return log1p(-alpha); }
TB_HD double smoothing_log_floor(double alpha, double vocab_size) {
  return alpha > 0.0 ? log(alpha) - log(vocab_size) : -INFINITY;
}

// Smoothed loss in bits, -log2((1 - a) p_y + a / V), evaluated in log space as
// -logaddexp(log(1 - a) + log p_y, log(a / V)) / ln 2 so it stays finite when p_y underflows.
TB_HD double smoothed_nll_bits(double logp, double log_keep, double log_floor) {
  if (logp != logp) return logp;  // NaN row (reported by validation) stays NaN at every level
  const double u = log_keep + logp;
  const double v = log_floor;
  const double hi = u > v ? u : v;
  if (hi == -INFINITY) return INFINITY;  // a = 0 and p_y = 0
  const double lo = u > v ? v : u;
  return -(hi + log1p(exp(lo - hi))) * kInvLn2;
}

}  // namespace tokenbounds
