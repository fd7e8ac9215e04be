// CPU kernels of the gram family (tokenbounds/gram.h):
//   gram_accumulate_(acc, x)         acc[i, j] += sum_r x[r, i] x[r, j] for j >= i only
//   rademacher_matmul(x, seed, offset, k) -> x @ Z with Z[i, c] = rademacher(seed, i, offset + c)
//   rademacher_probes(d, k, seed, offset, dtype) -> Z (materialised, for HVPs that need it)
//
// gram: rows are processed in chunks of kRows; a chunk is converted once into an fp32 / fp64 panel
// (the accumulation type), then the upper-triangle tiles of acc are updated in parallel, each tile
// by a register-blocked outer-product micro-kernel (6 x 16 fp32 or 6 x 8 fp64 with AVX2 + FMA).
// Only tiles that touch the upper triangle are computed (about half the flops of X^T X), and only
// entries with j >= i are written, so the strict lower triangle of acc is left as it was.
// By default (every dtype: BLAS wins for bf16/fp16 too, after a chunked conversion to the
// accumulation type; TOKENBOUNDS_GRAM_PATH=tile selects the SIMD tiles above) the upper triangle
// is computed by BLAS on 256-wide tiles I <= J: d^2 n (1 + 256 / d) flops instead of the
// 2 d^2 n of x.T @ x.
// bf16 / fp16 / mixed-precision inputs are first converted to the accumulation type in row chunks.
// rademacher_matmul: Z is regenerated per (row block, 16-column block) into a d x 16 buffer that
// stays in L2, so the n x k probe matrix is never materialised.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "tokenbounds/cpu_features.h"
#include "tokenbounds/gram.h"

namespace tokenbounds {
namespace {

constexpr int64_t kRows = 256;   // rows per panel
constexpr int64_t kTileI = 48;   // multiple of the micro-kernel's 6 rows
constexpr int64_t kTileJ = 128;  // multiple of 16 (fp32) and 8 (fp64)

#if defined(__x86_64__)
#define TB_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

// ------------------------------------------------------------------ panel conversion
template <typename T, typename Acc>
void to_panel(const T* x, int64_t ld, int64_t rows, int64_t d, Acc* panel) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < d; ++i) panel[r * d + i] = static_cast<Acc>(x[r * ld + i]);
}

// ------------------------------------------------------------------ gram micro-kernels
// C[a, b] (a < mi <= 6, b < nj) += sum_r P[r, i0 + a] P[r, j0 + b] over rows r < rows.
template <typename Acc>
void gram_tile_scalar(const Acc* P, int64_t d, int64_t rows, int64_t i0, int64_t mi, int64_t j0,
                      int64_t nj, Acc* C, int64_t ldc) {
  for (int64_t a = 0; a < mi; ++a)
    for (int64_t b = 0; b < nj; ++b) {
      Acc s = 0;
      for (int64_t r = 0; r < rows; ++r) s += P[r * d + i0 + a] * P[r * d + j0 + b];
      C[a * ldc + b] += s;
    }
}

#if defined(__x86_64__)
// 6 x 16 fp32 block: 12 accumulators, 2 loads and 1 broadcast live per step.
TB_AVX2 void gram_block_f32(const float* P, int64_t d, int64_t rows, int64_t i0, int64_t j0,
                            float* C, int64_t ldc) {
  __m256 c[6][2];
  for (int a = 0; a < 6; ++a) c[a][0] = c[a][1] = _mm256_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = P + r * d;
    const __m256 b0 = _mm256_loadu_ps(row + j0), b1 = _mm256_loadu_ps(row + j0 + 8);
    for (int a = 0; a < 6; ++a) {
      const __m256 av = _mm256_broadcast_ss(row + i0 + a);
      c[a][0] = _mm256_fmadd_ps(av, b0, c[a][0]);
      c[a][1] = _mm256_fmadd_ps(av, b1, c[a][1]);
    }
  }
  for (int a = 0; a < 6; ++a) {
    float* out = C + a * ldc;
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), c[a][0]));
    _mm256_storeu_ps(out + 8, _mm256_add_ps(_mm256_loadu_ps(out + 8), c[a][1]));
  }
}

TB_AVX2 void gram_block_f64(const double* P, int64_t d, int64_t rows, int64_t i0, int64_t j0,
                            double* C, int64_t ldc) {
  __m256d c[6][2];
  for (int a = 0; a < 6; ++a) c[a][0] = c[a][1] = _mm256_setzero_pd();
  for (int64_t r = 0; r < rows; ++r) {
    const double* row = P + r * d;
    const __m256d b0 = _mm256_loadu_pd(row + j0), b1 = _mm256_loadu_pd(row + j0 + 4);
    for (int a = 0; a < 6; ++a) {
      const __m256d av = _mm256_broadcast_sd(row + i0 + a);
      c[a][0] = _mm256_fmadd_pd(av, b0, c[a][0]);
      c[a][1] = _mm256_fmadd_pd(av, b1, c[a][1]);
    }
  }
  for (int a = 0; a < 6; ++a) {
    double* out = C + a * ldc;
    _mm256_storeu_pd(out, _mm256_add_pd(_mm256_loadu_pd(out), c[a][0]));
    _mm256_storeu_pd(out + 4, _mm256_add_pd(_mm256_loadu_pd(out + 4), c[a][1]));
  }
}
#endif

template <typename Acc>
constexpr int64_t block_cols() {
  return sizeof(Acc) == 4 ? 16 : 8;
}

// One tile [i0, i1) x [j0, j1) of the chunk's contribution, added into acc (upper entries only).
template <typename Acc>
void gram_tile(cpu::Isa isa, const Acc* P, int64_t d, int64_t rows, int64_t i0, int64_t i1,
               int64_t j0, int64_t j1, Acc* acc, int64_t ld_acc) {
  const int64_t ti = i1 - i0, tj = j1 - j0;
  Acc C[kTileI * kTileJ];
  std::fill(C, C + ti * tj, Acc(0));
  constexpr int64_t bc = block_cols<Acc>();
  for (int64_t a = 0; a < ti; a += 6) {
    const int64_t mi = std::min<int64_t>(6, ti - a);
    for (int64_t b = 0; b < tj; b += bc) {
      const int64_t nj = std::min<int64_t>(bc, tj - b);
      if (j0 + b + nj <= i0 + a) continue;  // block strictly below the diagonal
#if defined(__x86_64__)
      if (isa != cpu::Isa::kScalar && mi == 6 && nj == bc) {
        if constexpr (sizeof(Acc) == 4)
          gram_block_f32(reinterpret_cast<const float*>(P), d, rows, i0 + a, j0 + b,
                         reinterpret_cast<float*>(C) + a * tj + b, tj);
        else
          gram_block_f64(reinterpret_cast<const double*>(P), d, rows, i0 + a, j0 + b,
                         reinterpret_cast<double*>(C) + a * tj + b, tj);
        continue;
      }
#endif
      gram_tile_scalar(P, d, rows, i0 + a, mi, j0 + b, nj, C + a * tj + b, tj);
    }
  }
  for (int64_t a = 0; a < ti; ++a) {
    const int64_t i = i0 + a;
    for (int64_t b = std::max<int64_t>(0, i - j0); b < tj; ++b) acc[i * ld_acc + j0 + b] += C[a * tj + b];
  }
}

template <typename T, typename Acc>
void gram_accumulate_impl(at::Tensor& acc, const at::Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t ldx = x.stride(0);
  const T* xp = x.data_ptr<T>();
  Acc* ap = acc.data_ptr<Acc>();
  const int64_t ld_acc = acc.stride(0);
  const cpu::Isa isa = cpu::detect_isa();
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i0 = 0; i0 < d; i0 += kTileI)
    for (int64_t j0 = 0; j0 < d; j0 += kTileJ)
      if (gram::tile_touches_upper(i0, j0, std::min(kTileJ, d - j0))) tiles.emplace_back(i0, j0);
  std::vector<Acc> panel(static_cast<size_t>(std::min(n, kRows) * d));
  for (int64_t r0 = 0; r0 < n; r0 += kRows) {
    const int64_t rows = std::min(kRows, n - r0);
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      to_panel<T, Acc>(xp + (r0 + b) * ldx, ldx, e - b, d, panel.data() + b * d);
    });
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t i0 = tiles[t].first, j0 = tiles[t].second;
        gram_tile<Acc>(isa, panel.data(), d, rows, i0, std::min(d, i0 + kTileI), j0,
                       std::min(d, j0 + kTileJ), ap, ld_acc);
      }
    });
  }
}

// ------------------------------------------------------------------ BLAS block path
constexpr int64_t kGemmBlock = 256;  // tile width: diagonal tiles waste kGemmBlock / (2 d) of the flops
constexpr int64_t kGemmRows = 8192;  // rows converted per chunk when x is not in the acc dtype

// The tile kernel above is kept for TOKENBOUNDS_GRAM_PATH=tile (tests cover both paths).
inline bool gram_use_tiles() {
  const char* want = std::getenv("TOKENBOUNDS_GRAM_PATH");
  return want != nullptr && std::strcmp(want, "tile") == 0;
}

// acc[I, J] += X_I^T X_J for the kGemmBlock-wide column blocks I <= J. The tiles are the tasks of
// one parallel region, each a single-threaded BLAS call (BLAS runs serially inside an OpenMP
// region): one barrier per chunk instead of one per GEMM, which matters on a loaded machine
// (a recursive split into few large multithreaded GEMMs measured 1.2x slower than torch there).
// Diagonal tiles are multiplied in full into a temporary and added on and above the diagonal only.
template <typename Acc>
void gram_gemm_chunk(at::Tensor& acc, const at::Tensor& xc) {
  const int64_t d = xc.size(1);
  Acc* ap = acc.data_ptr<Acc>();
  const int64_t ld_acc = acc.stride(0);
  if (d < 2 * kGemmBlock) {  // too few tiles to share out: one (multithreaded) full product
    const at::Tensor full = at::mm(xc.t(), xc);
    const Acc* fp = full.data_ptr<Acc>();
    at::parallel_for(0, d, 16, [&](int64_t b, int64_t e) {
      for (int64_t a = b; a < e; ++a)
        for (int64_t c = a; c < d; ++c) ap[a * ld_acc + c] += fp[a * d + c];
    });
    return;
  }
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i0 = 0; i0 < d; i0 += kGemmBlock)
    for (int64_t j0 = i0; j0 < d; j0 += kGemmBlock) tiles.emplace_back(i0, j0);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t i0 = tiles[t].first, j0 = tiles[t].second;
      const int64_t m = std::min(kGemmBlock, d - i0), w = std::min(kGemmBlock, d - j0);
      const at::Tensor xi = xc.narrow(1, i0, m);
      if (i0 != j0) {
        at::Tensor out = acc.narrow(0, i0, m).narrow(1, j0, w);
        out.addmm_(xi.t(), xc.narrow(1, j0, w));
        continue;
      }
      const at::Tensor diag = at::mm(xi.t(), xi);  // [m, m], contiguous
      const Acc* dp = diag.data_ptr<Acc>();
      for (int64_t a = 0; a < m; ++a)
        for (int64_t c = a; c < m; ++c) ap[(i0 + a) * ld_acc + i0 + c] += dp[a * m + c];
    }
  });
}

template <typename Acc>
void gram_accumulate_gemm(at::Tensor& acc, const at::Tensor& x) {
  const auto acc_type = acc.scalar_type();
  if (x.scalar_type() == acc_type) {
    gram_gemm_chunk<Acc>(acc, x);
    return;
  }
  for (int64_t r0 = 0; r0 < x.size(0); r0 += kGemmRows) {
    const at::Tensor xc = x.narrow(0, r0, std::min(kGemmRows, x.size(0) - r0)).to(acc_type).contiguous();
    gram_gemm_chunk<Acc>(acc, xc);
  }
}

// acc [d, d] float32/float64 (row stride free, unit column stride), x [n, d] (unit column stride)
// float32/bfloat16/float16/float64. Validated in pyext/ops/gram.py.
void gram_accumulate_cpu(at::Tensor acc, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && (x.size(0) == 0 || x.stride(1) == 1), "x must be 2-D with unit column stride");
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == x.size(1) && acc.size(1) == x.size(1) && acc.stride(1) == 1,
              "acc must be [d, d] with unit column stride");
  if (x.size(0) == 0 || x.size(1) == 0) return;
  const bool f64 = acc.scalar_type() == at::kDouble;
  TORCH_CHECK(f64 || acc.scalar_type() == at::kFloat, "acc must be float32 or float64");
  if (!gram_use_tiles()) {
    if (f64) gram_accumulate_gemm<double>(acc, x);
    else gram_accumulate_gemm<float>(acc, x);
    return;
  }
#define TB_GRAM_CASE(T)                                   \
  if (f64) gram_accumulate_impl<T, double>(acc, x);       \
  else gram_accumulate_impl<T, float>(acc, x);
  switch (x.scalar_type()) {
    case at::kFloat: TB_GRAM_CASE(float) break;
    case at::kDouble: TB_GRAM_CASE(double) break;
    case at::kBFloat16: TB_GRAM_CASE(c10::BFloat16) break;
    case at::kHalf: TB_GRAM_CASE(c10::Half) break;
    default: TORCH_CHECK(false, "gram_accumulate_: unsupported x dtype ", x.scalar_type());
  }
#undef TB_GRAM_CASE
}

// ------------------------------------------------------------------ probes
constexpr int64_t kProbeCols = 16;
constexpr int64_t kProbeRows = 64;

template <typename Acc>
void fill_probe_block(gram::ProbeKey key, int64_t d, int64_t col0, int64_t cols, Acc* Z) {
  // Z[i * kProbeCols + c] for c < cols; unused columns are zero.
  for (int64_t i = 0; i < d; ++i) {
    const uint32_t rs = gram::probe_row_state(key, static_cast<uint32_t>(i));
    for (int64_t c = 0; c < kProbeCols; ++c)
      Z[i * kProbeCols + c] =
          c < cols ? gram::rademacher_from_row<Acc>(key, rs, static_cast<uint32_t>(col0 + c)) : Acc(0);
  }
}

template <typename T, typename Acc>
void probe_rows_scalar(const T* x, int64_t ldx, int64_t rows, int64_t d, const Acc* Z, Acc* y,
                       int64_t ldy, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    Acc s[kProbeCols] = {};
    for (int64_t i = 0; i < d; ++i) {
      const Acc xv = static_cast<Acc>(x[r * ldx + i]);
      for (int64_t c = 0; c < kProbeCols; ++c) s[c] += xv * Z[i * kProbeCols + c];
    }
    for (int64_t c = 0; c < cols; ++c) y[r * ldy + c] = s[c];
  }
}

#if defined(__x86_64__)
inline float load_scalar(const float* p) { return *p; }
inline float load_scalar(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline float load_scalar(const c10::Half* p) { return static_cast<float>(*p); }

// 4 rows x 16 probe columns in fp32: 8 accumulators.
template <typename T>
TB_AVX2 void probe_rows_f32(const T* x, int64_t ldx, int64_t rows, int64_t d, const float* Z,
                            float* y, int64_t ldy, int64_t cols) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    __m256 c[4][2];
    for (int a = 0; a < 4; ++a) c[a][0] = c[a][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; ++i) {
      const __m256 z0 = _mm256_loadu_ps(Z + i * kProbeCols), z1 = _mm256_loadu_ps(Z + i * kProbeCols + 8);
      for (int a = 0; a < 4; ++a) {
        const __m256 xv = _mm256_set1_ps(load_scalar(x + (r + a) * ldx + i));
        c[a][0] = _mm256_fmadd_ps(xv, z0, c[a][0]);
        c[a][1] = _mm256_fmadd_ps(xv, z1, c[a][1]);
      }
    }
    for (int a = 0; a < 4; ++a) {
      float tmp[kProbeCols];
      _mm256_storeu_ps(tmp, c[a][0]);
      _mm256_storeu_ps(tmp + 8, c[a][1]);
      for (int64_t cc = 0; cc < cols; ++cc) y[(r + a) * ldy + cc] = tmp[cc];
    }
  }
  if (r < rows) probe_rows_scalar<T, float>(x + r * ldx, ldx, rows - r, d, Z, y + r * ldy, ldy, cols);
}
#endif

template <typename T, typename Acc>
void rademacher_matmul_impl(const at::Tensor& x, gram::ProbeKey key, int64_t offset, int64_t k,
                            at::Tensor& y) {
  const int64_t n = x.size(0), d = x.size(1), ldx = x.stride(0);
  const T* xp = x.data_ptr<T>();
  Acc* yp = y.data_ptr<Acc>();
  const cpu::Isa isa = cpu::detect_isa();
  const int64_t row_blocks = (n + kProbeRows - 1) / kProbeRows;
  const int64_t col_blocks = (k + kProbeCols - 1) / kProbeCols;
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t b, int64_t e) {
    std::vector<Acc> Z(static_cast<size_t>(d * kProbeCols));
    int64_t cached_cb = -1;
    for (int64_t t = b; t < e; ++t) {
      const int64_t cb = t / row_blocks, rb = t % row_blocks;  // column block outer: Z reused
      const int64_t c0 = cb * kProbeCols, cols = std::min(kProbeCols, k - c0);
      if (cb != cached_cb) {
        fill_probe_block<Acc>(key, d, offset + c0, cols, Z.data());
        cached_cb = cb;
      }
      const int64_t r0 = rb * kProbeRows, rows = std::min(kProbeRows, n - r0);
#if defined(__x86_64__)
      if constexpr (sizeof(Acc) == 4 && !std::is_same<T, double>::value) {
        if (isa != cpu::Isa::kScalar) {
          probe_rows_f32<T>(xp + r0 * ldx, ldx, rows, d, Z.data(), yp + r0 * k + c0, k, cols);
          continue;
        }
      }
#endif
      probe_rows_scalar<T, Acc>(xp + r0 * ldx, ldx, rows, d, Z.data(), yp + r0 * k + c0, k, cols);
    }
  });
}

// x [n, d] (unit column stride) -> y [n, k] = x @ Z, Z[i, c] = rademacher(seed, i, offset + c).
// y is float64 when x is float64, float32 otherwise.
at::Tensor rademacher_matmul_cpu(const at::Tensor& x, int64_t seed, int64_t offset, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && (x.size(0) == 0 || x.stride(1) == 1), "x must be 2-D with unit column stride");
  TORCH_CHECK(k >= 0 && offset >= 0, "k and offset must be non-negative");
  const bool f64 = x.scalar_type() == at::kDouble;
  at::Tensor y = at::zeros({x.size(0), k}, x.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (x.size(0) == 0 || k == 0 || x.size(1) == 0) return y;
  const gram::ProbeKey key = gram::probe_key(static_cast<uint64_t>(seed));
  switch (x.scalar_type()) {
    case at::kFloat: rademacher_matmul_impl<float, float>(x, key, offset, k, y); break;
    case at::kDouble: rademacher_matmul_impl<double, double>(x, key, offset, k, y); break;
    case at::kBFloat16: rademacher_matmul_impl<c10::BFloat16, float>(x, key, offset, k, y); break;
    case at::kHalf: rademacher_matmul_impl<c10::Half, float>(x, key, offset, k, y); break;
    default: TORCH_CHECK(false, "rademacher_matmul: unsupported x dtype ", x.scalar_type());
  }
  return y;
}

// Z [d, k] with Z[i, c] = rademacher(seed, i, offset + c), in `dtype` (float32 or float64).
at::Tensor rademacher_probes_cpu(int64_t d, int64_t k, int64_t seed, int64_t offset, at::ScalarType dtype) {
  TORCH_CHECK(d >= 0 && k >= 0 && offset >= 0, "d, k, offset must be non-negative");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dtype must be float32 or float64");
  at::Tensor z = at::empty({d, k}, at::TensorOptions().dtype(dtype));
  const gram::ProbeKey key = gram::probe_key(static_cast<uint64_t>(seed));
  auto fill = [&](auto* zp) {
    using V = std::remove_pointer_t<decltype(zp)>;
    at::parallel_for(0, d, 1024, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const uint32_t rs = gram::probe_row_state(key, static_cast<uint32_t>(i));
        for (int64_t c = 0; c < k; ++c)
          zp[i * k + c] = gram::rademacher_from_row<V>(key, rs, static_cast<uint32_t>(offset + c));
      }
    });
  };
  if (dtype == at::kFloat) fill(z.data_ptr<float>());
  else fill(z.data_ptr<double>());
  return z;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenbounds, CPU, m) {
  m.impl("gram_accumulate_", &gram_accumulate_cpu);
  m.impl("rademacher_matmul", &rademacher_matmul_cpu);
}

// rademacher_probes has no tensor inputs, so it is registered for the catch-all key.
TORCH_LIBRARY_IMPL(tokenbounds, CompositeExplicitAutograd, m) {
  m.impl("rademacher_probes", &rademacher_probes_cpu);
}

}  // namespace tokenbounds
