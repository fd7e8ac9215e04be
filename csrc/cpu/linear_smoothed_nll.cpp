// CPU kernel for tokenbounds::linear_smoothed_nll: the smoothed loss of the logits
// hidden @ weight[:V]^T (+ bias) without storing them.
//
// AVX2 path (x86-64 with AVX2 + FMA, the default): a GEMM written for this reduction. Each logit
// is consumed in registers as soon as its dot product is complete, so there is no logit buffer
// and no second pass:
//   * the logits are computed transposed, in micro-tiles of 6 vocabulary rows x 16 tokens (12
//     AVX2 accumulators, one register lane per token). Weight rows are the broadcast operand and
//     are read in place (bfloat16 / float16 weights are widened into a small fp32 slice first);
//     hidden states are packed once per block of up to 256 tokens, 16 tokens per k.
//   * D is walked in passes of 256 (a 16 KiB token panel slice stays in L1, the 48 weight rows of
//     a vocabulary block stay in L2); partial tiles between passes live in a 48 x 256 buffer.
//   * after the last pass the tile's epilogue updates each token's (count of logits above x_y,
//     sum of exp(x - ref), max) with vertical SIMD only: lanes are tokens, so there are no
//     horizontal reductions. ref is the target logit x_y, which is computed beforehand with the
//     same FMA chain as the tile (so it equals the tile's value for the target column bit for bit
//     and the target is never counted above itself); a lane whose logits exceed ref by more than
//     64 moves its ref up (rare: p_y < e^-64). The float partial sums are flushed into float64
//     after every vocabulary block of 48 rows.
//   * token blocks (and, when there are fewer blocks than threads, vocabulary slices whose
//     partial states are merged at the end) run in parallel.
// Fallback (no AVX2, or TOKENBOUNDS_CPU_ISA=scalar): row chunks of at most max_bytes of logits,
// one BLAS GEMM per chunk into a reused buffer, then the row kernel (csrc/cpu/smoothed_nll.cpp).
//
// Inputs are validated in pyext/ops/losses.py; the checks here only guard memory safety.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "smoothed_nll_cpu.h"
#include "smoothed_nll_simd.h"
#include "tokenbounds/cpu_features.h"
#include "tokenbounds/smoothed_loss.h"

namespace tokenbounds {
namespace {

// ------------------------------------------------------------------ fallback: chunks + row kernel
void linear_chunked(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor* bias,
                    const int64_t* targets, const double* log_keep, const double* log_floor,
                    int64_t num_alphas, int64_t vocab, int64_t ignore_index, int64_t max_bytes,
                    float* nll, float* logp, int32_t* rank) {
  const int64_t n = hidden.size(0);
  const int64_t row_bytes = vocab * static_cast<int64_t>(hidden.element_size());
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(n, max_bytes / row_bytes));
  at::Tensor buffer = at::empty({rows, vocab}, hidden.options());
  const at::Tensor wt = weight.narrow(0, 0, vocab).t();
  for (int64_t start = 0; start < n; start += rows) {
    const int64_t m = std::min(rows, n - start);
    at::Tensor logits = buffer.narrow(0, 0, m);
    const at::Tensor h = hidden.narrow(0, start, m);
    if (bias != nullptr) at::addmm_out(logits, bias->narrow(0, 0, vocab), h, wt);
    else at::mm_out(logits, h, wt);
    smoothed_nll_rows(logits, targets + start, log_keep, log_floor, num_alphas, vocab, ignore_index,
                      nll + start * num_alphas, logp + start, rank + start);
  }
}

// Per-token summary of one vocabulary slice (written by the fused kernel, merged per token).
struct SliceState {
  float ref;     // reference point of the exponentials
  float max;     // max logit seen
  double total;  // sum of exp(x - ref); NaN when the row has a NaN / +inf logit
  int64_t count; // logits strictly above x_y
};

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace fused {
using namespace simd_avx2;

constexpr int kMR = 6;       // vocabulary rows per micro-tile (the broadcast operand)
constexpr int kNR = 16;      // tokens per micro-tile (two 8-lane registers)
constexpr int kKC = 256;     // depth of one pass over D
constexpr int kMC = 48;      // vocabulary rows per block (8 micro-tiles)
constexpr int kStrips = kMC / kMR;
constexpr int kTile = kMR * kNR;
constexpr int64_t kMaxTokens = 256;  // tokens per block
constexpr float kRefSlack = 64.f;    // exp(x - ref) is kept below e^64 (see smoothed_nll_simd.h)

inline float to_f32(float x) { return x; }
inline float to_f32(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_f32(c10::Half x) { return static_cast<float>(x); }

// Per-token state of one block; arrays of `tokens` (a multiple of 16) entries, 32-byte aligned.
struct TokenState {
  float* xt;       // target logit
  float* ref;      // exp reference point (x_t; moved up by more than kRefSlack when exceeded)
  float* part;     // sum of exp(x - ref) over the current vocabulary block (float)
  float* max;      // max logit
  int32_t* count;  // logits > x_t
  double* total;   // sum of exp(x - ref) over the finished vocabulary blocks
};

// Lanes of one half-tile whose tile max exceeds ref + kRefSlack get ref = that max (their sums
// rescaled); a +inf logit makes the lane NaN (no valid softmax).
inline void move_refs(const TokenState& st, int t, __m256 tile_max) {
  alignas(32) float tm[8];
  _mm256_store_ps(tm, tile_max);
  for (int l = 0; l < 8; ++l) {
    const int i = t + l;
    if (!(tm[l] > st.ref[i] + kRefSlack)) continue;
    if (tm[l] == INFINITY) {
      st.part[i] = NAN;
      continue;
    }
    const double scale = std::exp(static_cast<double>(st.ref[i]) - static_cast<double>(tm[l]));
    st.total[i] *= scale;
    st.part[i] = static_cast<float>(st.part[i] * scale);
    st.ref[i] = tm[l];
  }
}

// The epilogue of 8 tokens (lanes) x 6 vocabulary rows x[0..5] (rows >= nrows already -inf).
inline void consume_half(const TokenState& st, int t, const __m256 (&x)[kMR]) {
  const __m256 tile_max = _mm256_max_ps(_mm256_max_ps(_mm256_max_ps(x[0], x[1]), _mm256_max_ps(x[2], x[3])),
                                        _mm256_max_ps(x[4], x[5]));
  __m256 ref = _mm256_load_ps(st.ref + t);
  const __m256 limit = _mm256_add_ps(ref, _mm256_set1_ps(kRefSlack));
  if (_mm256_movemask_ps(_mm256_cmp_ps(tile_max, limit, _CMP_GT_OQ))) {
    move_refs(st, t, tile_max);
    ref = _mm256_load_ps(st.ref + t);
  }
  const __m256 xt = _mm256_load_ps(st.xt + t);
  __m256i cnt = _mm256_load_si256(reinterpret_cast<const __m256i*>(st.count + t));
  __m256 s0 = _mm256_load_ps(st.part + t), s1 = _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int r = 0; r < kMR; r += 2) {
    cnt = vcount_gt(cnt, x[r], xt);
    cnt = vcount_gt(cnt, x[r + 1], xt);
    s0 = _mm256_add_ps(s0, vexp_minus(x[r], ref));
    s1 = _mm256_add_ps(s1, vexp_minus(x[r + 1], ref));
  }
  _mm256_store_ps(st.part + t, _mm256_add_ps(s0, s1));
  _mm256_store_si256(reinterpret_cast<__m256i*>(st.count + t), cnt);
  _mm256_store_ps(st.max + t, _mm256_max_ps(_mm256_load_ps(st.max + t), tile_max));
}

// One micro-tile of the GEMM: tile[16 r + lane] (+)= sum_k a_r[k * kAStride] * hp[16 k + lane]
// over kc steps (r < 6 vocabulary rows, lane < 16 tokens), starting from zero when kFirst. Not
// inlined: alone in its function the 12 accumulators, 2 token vectors and the broadcast stay in
// the 16 AVX2 registers (inlined into the block loops they spill to the stack).
template <bool kFirst, int kAStride>
__attribute__((noinline)) void gemm_tile(const float* const* a, const float* __restrict__ hp, int64_t kc,
                                         float* __restrict__ tile) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if constexpr (kFirst) {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  } else {
    c00 = _mm256_load_ps(tile + 0);
    c01 = _mm256_load_ps(tile + 8);
    c10 = _mm256_load_ps(tile + 16);
    c11 = _mm256_load_ps(tile + 24);
    c20 = _mm256_load_ps(tile + 32);
    c21 = _mm256_load_ps(tile + 40);
    c30 = _mm256_load_ps(tile + 48);
    c31 = _mm256_load_ps(tile + 56);
    c40 = _mm256_load_ps(tile + 64);
    c41 = _mm256_load_ps(tile + 72);
    c50 = _mm256_load_ps(tile + 80);
    c51 = _mm256_load_ps(tile + 88);
  }
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(hp + 16 * k), b1 = _mm256_load_ps(hp + 16 * k + 8);
    __m256 w = _mm256_broadcast_ss(a0 + k * kAStride);
    c00 = _mm256_fmadd_ps(w, b0, c00);
    c01 = _mm256_fmadd_ps(w, b1, c01);
    w = _mm256_broadcast_ss(a1 + k * kAStride);
    c10 = _mm256_fmadd_ps(w, b0, c10);
    c11 = _mm256_fmadd_ps(w, b1, c11);
    w = _mm256_broadcast_ss(a2 + k * kAStride);
    c20 = _mm256_fmadd_ps(w, b0, c20);
    c21 = _mm256_fmadd_ps(w, b1, c21);
    w = _mm256_broadcast_ss(a3 + k * kAStride);
    c30 = _mm256_fmadd_ps(w, b0, c30);
    c31 = _mm256_fmadd_ps(w, b1, c31);
    w = _mm256_broadcast_ss(a4 + k * kAStride);
    c40 = _mm256_fmadd_ps(w, b0, c40);
    c41 = _mm256_fmadd_ps(w, b1, c41);
    w = _mm256_broadcast_ss(a5 + k * kAStride);
    c50 = _mm256_fmadd_ps(w, b0, c50);
    c51 = _mm256_fmadd_ps(w, b1, c51);
  }
  _mm256_store_ps(tile + 0, c00);
  _mm256_store_ps(tile + 8, c01);
  _mm256_store_ps(tile + 16, c10);
  _mm256_store_ps(tile + 24, c11);
  _mm256_store_ps(tile + 32, c20);
  _mm256_store_ps(tile + 40, c21);
  _mm256_store_ps(tile + 48, c30);
  _mm256_store_ps(tile + 56, c31);
  _mm256_store_ps(tile + 64, c40);
  _mm256_store_ps(tile + 72, c41);
  _mm256_store_ps(tile + 80, c50);
  _mm256_store_ps(tile + 88, c51);
}

// The epilogue of a finished micro-tile (still in L1): logit = dot + bias (one rounding, as
// x_t), rows past the vocabulary -inf, then each half of 8 tokens.
inline void tile_epilogue(const float* __restrict__ tile, const TokenState& st, int t, int nrows,
                          const float* bias) {
  __m256 lo[kMR], hi[kMR];
  for (int r = 0; r < kMR; ++r) {
    lo[r] = _mm256_load_ps(tile + 16 * r);
    hi[r] = _mm256_load_ps(tile + 16 * r + 8);
    if (r >= nrows) {
      lo[r] = hi[r] = _mm256_set1_ps(-INFINITY);
    } else if (bias != nullptr) {
      const __m256 b = _mm256_set1_ps(bias[r]);
      lo[r] = _mm256_add_ps(lo[r], b);
      hi[r] = _mm256_add_ps(hi[r], b);
    }
  }
  consume_half(st, t, lo);
  consume_half(st, t + 8, hi);
}

template <int kAStride>
inline void run_tile(bool first, bool last, const float* const* a, const float* hp, int64_t kc,
                     float* tile, const TokenState& st, int t, int nrows, const float* bias) {
  if (first) gemm_tile<true, kAStride>(a, hp, kc, tile);
  else gemm_tile<false, kAStride>(a, hp, kc, tile);
  if (last) tile_epilogue(tile, st, t, nrows, bias);
}

template <typename T>
struct Problem {
  const T* hidden;   // [n, d]
  const T* weight;   // [>= vocab, d]
  const float* bias; // [vocab] float32 or nullptr
  const int64_t* targets;
  const int64_t* rows;  // the valid (non-ignored) rows, in order
  int64_t num_rows, d, vocab;
  int64_t tokens_per_block, vocab_slices, vocab_per_slice;
  SliceState* out;  // [vocab_slices, num_rows]
  float* xt_out;    // [num_rows] target logits (written by slice 0)
};

// x_y = <hidden_i, weight_y> (+ bias_y) with the tile's FMA chain: k ascending from 0, one fused
// multiply-add per k, bias added last. Equal bit for bit to the tile's logit for column y.
template <typename T>
float target_logit(const T* h, const T* w, int64_t d, const float* bias, int64_t y) {
  float acc = 0.f;
  for (int64_t k = 0; k < d; ++k) acc = std::fma(to_f32(w[k]), to_f32(h[k]), acc);
  return bias != nullptr ? acc + bias[y] : acc;
}

// Work item (token block b, vocabulary slice s) with this thread's buffers.
template <typename T>
void run_item(const Problem<T>& pb, int64_t b, int64_t s, float* hp, float* tiles, float* wpack,
              const TokenState& st, const float* zero_row) {
  constexpr bool kWide = std::is_same_v<T, float>;  // weight rows read in place
  const int64_t d = pb.d;
  const int64_t first_row = b * pb.tokens_per_block;
  const int64_t nt = std::min(pb.tokens_per_block, pb.num_rows - first_row);
  const int64_t panels = (nt + kNR - 1) / kNR;
  // Pack the block's hidden states: panel p, k, 16 tokens (the last token repeated as padding).
  for (int64_t p = 0; p < panels; ++p)
    for (int i = 0; i < kNR; ++i) {
      const int64_t row = pb.rows[first_row + std::min<int64_t>(p * kNR + i, nt - 1)];
      const T* src = pb.hidden + row * d;
      float* dst = hp + p * d * kNR + i;
      for (int64_t k = 0; k < d; ++k) dst[k * kNR] = to_f32(src[k]);
    }
  for (int64_t i = 0; i < panels * kNR; ++i) {
    const int64_t row = pb.rows[first_row + std::min<int64_t>(i, nt - 1)];
    const int64_t y = pb.targets[row];
    const float xt = target_logit(pb.hidden + row * d, pb.weight + y * d, d, pb.bias, y);
    st.xt[i] = xt;
    const bool finite = xt > -INFINITY && xt < INFINITY;
    // x_t = -inf (p_y = 0): any finite reference works; the first finite logit replaces it.
    st.ref[i] = finite ? xt : -FLT_MAX;
    st.part[i] = (finite || xt == -INFINITY) ? 0.f : NAN;  // NaN / +inf target: no valid softmax
    st.max[i] = -INFINITY;
    st.count[i] = 0;
    st.total[i] = 0.0;
  }
  const int64_t v_begin = s * pb.vocab_per_slice;
  const int64_t v_end = std::min(pb.vocab, v_begin + pb.vocab_per_slice);
  const int64_t passes = std::max<int64_t>(1, (d + kKC - 1) / kKC);
  for (int64_t v0 = v_begin; v0 < v_end; v0 += kMC) {
    const int64_t block_rows = std::min<int64_t>(kMC, v_end - v0);
    for (int64_t pass = 0; pass < passes; ++pass) {
      const int64_t pc = pass * kKC;
      const int64_t kc = std::min<int64_t>(kKC, d - pc);
      const bool first = pass == 0, last = pass == passes - 1;
      if constexpr (!kWide) {
        // Widen this block's weight slice once: strip, k, 6 rows (zeros past the vocabulary).
        for (int st_i = 0; st_i < kStrips; ++st_i)
          for (int r = 0; r < kMR; ++r) {
            const int64_t v = st_i * kMR + r;
            float* dst = wpack + st_i * kKC * kMR + r;
            if (v < block_rows) {
              const T* src = pb.weight + (v0 + v) * d + pc;
              for (int64_t k = 0; k < kc; ++k) dst[k * kMR] = to_f32(src[k]);
            } else {
              for (int64_t k = 0; k < kc; ++k) dst[k * kMR] = 0.f;
            }
          }
      }
      for (int64_t p = 0; p < panels; ++p) {
        const float* hpp = hp + p * d * kNR + pc * kNR;
        for (int st_i = 0; st_i * kMR < block_rows; ++st_i) {
          const int nrows = static_cast<int>(std::min<int64_t>(kMR, block_rows - st_i * kMR));
          const int64_t v = v0 + st_i * kMR;
          float* tile = tiles + (p * kStrips + st_i) * kTile;
          const float* bias = pb.bias != nullptr ? pb.bias + v : nullptr;
          const int t = static_cast<int>(p * kNR);
          if constexpr (kWide) {
            const float* a[kMR];
            for (int r = 0; r < kMR; ++r)
              a[r] = r < nrows ? reinterpret_cast<const float*>(pb.weight) + (v + r) * d + pc : zero_row;
            run_tile<1>(first, last, a, hpp, kc, tile, st, t, nrows, bias);
          } else {
            const float* strip = wpack + st_i * kKC * kMR;
            const float* a[kMR] = {strip, strip + 1, strip + 2, strip + 3, strip + 4, strip + 5};
            run_tile<kMR>(first, last, a, hpp, kc, tile, st, t, nrows, bias);
          }
        }
      }
    }
    for (int64_t i = 0; i < panels * kNR; ++i) {  // flush the float partial sums into float64
      st.total[i] += static_cast<double>(st.part[i]);
      st.part[i] = std::isnan(st.part[i]) ? NAN : 0.f;
    }
  }
  SliceState* out = pb.out + s * pb.num_rows + first_row;
  for (int64_t i = 0; i < nt; ++i) out[i] = SliceState{st.ref[i], st.max[i], st.total[i], st.count[i]};
  if (s == 0) std::memcpy(pb.xt_out + first_row, st.xt, static_cast<size_t>(nt) * sizeof(float));
}

template <typename T>
void run_fused(const Problem<T>& pb) {
  const int64_t blocks = (pb.num_rows + pb.tokens_per_block - 1) / pb.tokens_per_block;
  const int64_t items = blocks * pb.vocab_slices;
  const int64_t tokens = (pb.tokens_per_block + kNR - 1) / kNR * kNR;
  // Items are taken from a shared counter rather than split statically, so on a loaded machine a
  // thread that is descheduled for a while does not leave the others idle at the end.
  std::atomic<int64_t> next_item{0};
  const int64_t workers = std::min<int64_t>(items, std::max<int64_t>(1, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // This thread's buffers (at::empty: 64-byte aligned).
    at::Tensor hp = at::empty({tokens * std::max<int64_t>(pb.d, 1)}, at::kFloat);
    at::Tensor tiles = at::empty({tokens / kNR * kStrips * kTile}, at::kFloat);
    at::Tensor wpack = at::empty({std::is_same_v<T, float> ? 1 : kStrips * kKC * kMR}, at::kFloat);
    at::Tensor state = at::empty({tokens * 8}, at::kFloat);  // 5 x 4-byte + 1 x 8-byte arrays
    at::Tensor zero = at::zeros({kKC}, at::kFloat);
    float* sp = state.data_ptr<float>();
    const TokenState st{sp, sp + tokens, sp + 2 * tokens, sp + 3 * tokens,
                        reinterpret_cast<int32_t*>(sp + 4 * tokens),
                        reinterpret_cast<double*>(sp + 6 * tokens)};
    for (int64_t item = next_item.fetch_add(1); item < items; item = next_item.fetch_add(1))
      run_item(pb, item / pb.vocab_slices, item % pb.vocab_slices, hp.data_ptr<float>(),
               tiles.data_ptr<float>(), wpack.data_ptr<float>(), st, zero.data_ptr<float>());
  });
}

}  // namespace fused
#pragma GCC pop_options
#endif  // __x86_64__

// Work split of the fused kernel: token blocks of at most 256 tokens (fewer when max_bytes is
// small: the per-thread buffers are ~4 (D + 56) bytes per token), and vocabulary slices when there
// are fewer blocks than threads.
struct FusedPlan {
  int64_t tokens_per_block, vocab_slices, vocab_per_slice;
};

FusedPlan plan_fused(int64_t num_rows, int64_t d, int64_t vocab, int64_t max_bytes) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_token = 4 * (std::max<int64_t>(d, 1) + 56);
  int64_t budget_tokens = max_bytes / std::max<int64_t>(1, threads * per_token);
  budget_tokens = std::max<int64_t>(16, std::min<int64_t>(256, budget_tokens / 16 * 16));
  const int64_t per_thread = (num_rows + threads - 1) / threads;
  const int64_t tokens = std::min(budget_tokens, std::max<int64_t>(16, (per_thread + 15) / 16 * 16));
  const int64_t blocks = (num_rows + tokens - 1) / tokens;
  const int64_t max_slices = std::max<int64_t>(1, (vocab + 8 * 48 - 1) / (8 * 48));  // >= 8 blocks each
  const int64_t slices = blocks >= threads ? 1 : std::min(max_slices, (threads + blocks - 1) / blocks);
  int64_t per_slice = (vocab + slices - 1) / slices;
  per_slice = (per_slice + 47) / 48 * 48;  // whole vocabulary blocks
  return {tokens, (vocab + per_slice - 1) / per_slice, per_slice};
}

// Merge the slices of every valid row and write its outputs.
void finish_fused(const std::vector<int64_t>& rows, const std::vector<float>& xt_of_row,
                  const std::vector<SliceState>& slices, int64_t num_slices, const double* log_keep,
                  const double* log_floor, int64_t num_alphas, float* nll, float* lp, int32_t* rk) {
  const int64_t m = static_cast<int64_t>(rows.size());
  at::parallel_for(0, m, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      float ref = -INFINITY, mx = -INFINITY;
      int64_t count = 0;
      for (int64_t s = 0; s < num_slices; ++s) {
        const SliceState& p = slices[s * m + j];
        ref = std::max(ref, p.ref);
        mx = std::max(mx, p.max);
        count += p.count;
      }
      double total = 0.0;
      for (int64_t s = 0; s < num_slices; ++s) {
        const SliceState& p = slices[s * m + j];
        total += p.total * std::exp(static_cast<double>(p.ref) - static_cast<double>(ref));
      }
      // total is relative to ref; a row without a finite logit (max = -inf) has no softmax.
      const bool bad = std::isnan(total) || mx == -INFINITY;
      const double logp = bad ? NAN : target_logp(static_cast<double>(xt_of_row[j]), ref, total);
      finish_row(rows[j], logp, count, log_keep, log_floor, num_alphas, nll, lp, rk);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_smoothed_nll_cpu(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& targets, const at::Tensor& log_keep_in, const at::Tensor& log_floor_in,
    int64_t vocab_size, int64_t ignore_index, int64_t max_bytes) {
  TORCH_CHECK(hidden_in.dim() == 2 && weight_in.dim() == 2 && weight_in.size(1) == hidden_in.size(1),
              "hidden must be [N, D] and weight [V, D]");
  TORCH_CHECK(hidden_in.scalar_type() == weight_in.scalar_type(), "hidden and weight dtypes differ");
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= weight_in.size(0), "vocab_size out of range");
  TORCH_CHECK(max_bytes > 0, "max_bytes must be positive");
  const at::ScalarType dtype = hidden_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "linear_smoothed_nll: unsupported dtype ", dtype);
  const int64_t n = hidden_in.size(0), d = hidden_in.size(1);
  check_targets(targets, n, vocab_size, ignore_index);
  const SmoothingConstants c = smoothing_constants_of(log_keep_in, log_floor_in);
  auto [nll_bits, logp, rank] = empty_outputs(hidden_in.options(), n, c.num_alphas);
  if (n == 0) return {nll_bits, logp, rank};
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const double* lk = c.log_keep.data_ptr<double>();
  const double* lf = c.log_floor.data_ptr<double>();
  float* out_nll = nll_bits.data_ptr<float>();
  float* out_lp = logp.data_ptr<float>();
  int32_t* out_rk = rank.data_ptr<int32_t>();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) >= vocab_size, "bias must be [V]");
    bias = bias_in->to(hidden.scalar_type()).contiguous();
  }

#if defined(__x86_64__)
  const cpu::Isa isa = cpu::detect_isa();
  if (isa != cpu::Isa::kScalar) {
    std::vector<int64_t> rows;
    rows.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      if (tgt[i] == ignore_index) write_ignored_row(i, c.num_alphas, out_nll, out_lp, out_rk);
      else rows.push_back(i);
    }
    const int64_t m = static_cast<int64_t>(rows.size());
    if (m == 0) return {nll_bits, logp, rank};
    // The bias in float32 (its values are those of the input dtype, as in the fallback's GEMM).
    const at::Tensor bias32 = bias.defined() ? bias.narrow(0, 0, vocab_size).to(at::kFloat).contiguous() : at::Tensor();
    const FusedPlan plan = plan_fused(m, d, vocab_size, max_bytes);
    std::vector<SliceState> slices(static_cast<size_t>(plan.vocab_slices * m));
    std::vector<float> xt(static_cast<size_t>(m));
    auto run = [&](auto* hidden_ptr, auto* weight_ptr) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(hidden_ptr)>>;
      fused::Problem<T> pb{hidden_ptr, weight_ptr, bias32.defined() ? bias32.data_ptr<float>() : nullptr,
                           tgt, rows.data(), m, d, vocab_size, plan.tokens_per_block,
                           plan.vocab_slices, plan.vocab_per_slice, slices.data(), xt.data()};
      fused::run_fused(pb);
    };
    switch (dtype) {
      case at::kFloat: run(hidden.data_ptr<float>(), weight.data_ptr<float>()); break;
      case at::kBFloat16: run(hidden.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>()); break;
      default: run(hidden.data_ptr<c10::Half>(), weight.data_ptr<c10::Half>()); break;
    }
    finish_fused(rows, xt, slices, plan.vocab_slices, lk, lf, c.num_alphas, out_nll, out_lp, out_rk);
    return {nll_bits, logp, rank};
  }
#endif
  linear_chunked(hidden, weight, bias.defined() ? &bias : nullptr, tgt, lk, lf, c.num_alphas,
                 vocab_size, ignore_index, max_bytes, out_nll, out_lp, out_rk);
  return {nll_bits, logp, rank};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenbounds, CPU, m) { m.impl("linear_smoothed_nll", &linear_smoothed_nll_cpu); }

}  // namespace tokenbounds
