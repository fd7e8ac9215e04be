// CUDA fused linear head of tokenbounds::linear_smoothed_nll (torch-free: CUDA headers +
// csrc/include; the binding is csrc/cuda_bindings/smoothed_nll.cpp). Element math:
// tokenbounds/smoothed_loss.h; per-row state and its merges: smoothed_nll_device.cuh.
//
// logits = hidden @ weight^T (+ bias) are never stored. (1) one warp per token computes the target
// logit; (2) a shared-memory tiled matmul (64 x 64 tiles; float32: SIMT IEEE FMAs, 4 x 4 per
// thread; bfloat16/float16: WMMA tensor cores; float32 accumulation; no cuBLAS) reduces each tile
// to per-row partials (max, sum, count) written to a workspace [rows, num_vtiles]; (3) one warp
// per row merges its partials. No locks or atomics; rows are processed in chunks so the workspace
// never exceeds the caller's budget.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "smoothed_nll_device.cuh"
#include "tokenbounds/cuda_launch.h"

namespace tokenbounds {
namespace {
using namespace nll_device;

constexpr int kTileRows = 64;   // hidden rows per tile
constexpr int kTileCols = 64;   // vocabulary entries per tile
constexpr int kTileK = 16;      // depth of one shared-memory stage
constexpr int kTileThreads = 256;
constexpr int kMicro = 4;       // each thread owns rows ty + 16 i and columns tx + 16 j, i, j < 4
constexpr int kLinWarpsPerBlock = 8;
static_assert(kTileRows == kTileCols && kTileThreads == 256 && kMicro * 16 == kTileRows,
              "the tile loaders and tile_epilogue assume 64 x 64 tiles and 256 threads");

// x_y = <hidden_i, weight_{y_i}> (+ bias_{y_i}) in float32, one warp per token.
template <typename T>
__global__ void __launch_bounds__(kLinWarpsPerBlock * 32)
    target_logit_kernel(const T* __restrict__ hidden, const T* __restrict__ weight,
                        const T* __restrict__ bias, const int64_t* __restrict__ targets, int64_t n,
                        int64_t d, int64_t vocab,
                        int64_t ignore_index, float* __restrict__ target_logit) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kLinWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;  // warp-uniform
  const int64_t y = targets[row];
  float acc = 0.f;
  if (y == ignore_index) {
    acc = 0.f;
  } else if (y < 0 || y >= vocab) {
    acc = NAN;  // never read outside the weight; reported as a bad row
  } else {
    const T* h = hidden + row * d;
    const T* w = weight + y * d;
    for (int64_t k = lane; k < d; k += 32) acc = fmaf(to_float(h[k]), to_float(w[k]), acc);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(kFullMask, acc, off);
    if (bias != nullptr) acc += to_float(bias[y]);
  }
  if (lane == 0) target_logit[row] = acc;
}

// Epilogue of one 64 x 64 logit tile held as acc[i][j] = dot(row0 + ty + 16 i, col0 + tx + 16 j)
// (the logit adds the column's bias): the 16 threads sharing ty hold one row's 64 columns (lanes
// 0-15 or 16-31 of a warp), so the row reduction is a 16-wide shuffle. A row whose tile holds NaN or +inf gets sum = NaN, which
// the merge reports as a bad row.
template <typename T>
__device__ __forceinline__ void tile_epilogue(const float (&acc)[kMicro][kMicro], int tx, int ty,
                                              int64_t row0, int64_t col0, int vtile,
                                              const T* __restrict__ bias,
                                              const int64_t* __restrict__ targets,
                                              const float* __restrict__ target_logit, int64_t n,
                                              int64_t vocab, int num_vtiles,
                                              float* __restrict__ part_max,
                                              float* __restrict__ part_sum,
                                              int* __restrict__ part_count) {
  float col_bias[kMicro];
#pragma unroll
  for (int j = 0; j < kMicro; ++j) {
    const int64_t c = col0 + tx + 16 * j;
    col_bias[j] = (bias != nullptr && c < vocab) ? to_float(bias[c]) : 0.f;
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t r = row0 + ty + 16 * i;
    const bool row_ok = r < n;
    const int64_t y = row_ok ? targets[r] : -1;
    const float xt = row_ok ? target_logit[r] : 0.f;
    float v[kMicro];
    RowState st = empty_state();
    int own = 0;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t c = col0 + tx + 16 * j;
      v[j] = c < vocab ? acc[i][j] + col_bias[j] : -INFINITY;
      // The target's own column is never counted: its value here may differ from the separately
      // computed x_y by rounding (another summation order).
      if (c == y && v[j] > xt) own = 1;
    }
    consume(st, v, xt);
    st.count -= own;
    warp_merge<16>(st);
    if (tx == 0 && row_ok) {
      const int64_t out = r * num_vtiles + vtile;
      part_max[out] = st.lse.max;
      part_sum[out] = st.bad ? NAN : st.lse.sum;
      part_count[out] = st.count;
    }
  }
}

// One 64 x 64 tile of hidden @ weight^T -> per-row (max, sum exp(x - max), #{x > x_y}) partials.
// SIMT float32 (IEEE products, as the CPU path): used for float32 inputs.
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    linear_tile_kernel(const T* __restrict__ hidden, const T* __restrict__ weight,
                       const T* __restrict__ bias, const int64_t* __restrict__ targets, const float* __restrict__ target_logit,
                       int64_t n, int64_t d, int64_t vocab, int num_vtiles,
                       float* __restrict__ part_max, float* __restrict__ part_sum,
                       int* __restrict__ part_count) {
  // +1 padding: the transposed stores (consecutive threads, consecutive k) hit distinct banks.
  __shared__ float a_s[kTileK][kTileRows + 1];
  __shared__ float b_s[kTileK][kTileCols + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int vtile = blockIdx.y;
  const int64_t col0 = static_cast<int64_t>(vtile) * kTileCols;

  float acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < d; k0 += kTileK) {
    // 64 x 16 elements of each operand, 4 per thread, consecutive threads along k (coalesced).
#pragma unroll
    for (int e = 0; e < (kTileRows * kTileK) / kTileThreads; ++e) {
      const int idx = tid + e * kTileThreads;
      const int r = idx / kTileK, k = idx % kTileK;
      const int64_t gk = k0 + k;
      const int64_t gr = row0 + r, gc = col0 + r;
      a_s[k][r] = (gr < n && gk < d) ? to_float(hidden[gr * d + gk]) : 0.f;
      b_s[k][r] = (gc < vocab && gk < d) ? to_float(weight[gc * d + gk]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float a[kMicro], b[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) a[i] = a_s[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) b[j] = b_s[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  tile_epilogue(acc, tx, ty, row0, col0, vtile, bias, targets, target_logit, n, vocab, num_vtiles,
                part_max, part_sum, part_count);
}

// Same tile with tensor cores (WMMA 16 x 16 x 16, float32 accumulation) for bfloat16 / float16
// inputs: 8 warps, each a 16 x 32 block of the tile. The accumulators go through shared memory
// into the layout tile_epilogue expects.
constexpr int kWmmaK = 32;              // depth of one shared-memory stage
constexpr int kWmmaLd = kWmmaK + 8;     // 16-bit elements; a multiple of 8 as WMMA requires
constexpr int kWmmaLdc = kTileCols + 4; // floats; a multiple of 4

template <typename T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.f); }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }

template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    linear_tile_wmma_kernel(const T* __restrict__ hidden, const T* __restrict__ weight,
                            const T* __restrict__ bias, const int64_t* __restrict__ targets,
                            const float* __restrict__ target_logit, int64_t n, int64_t d,
                            int64_t vocab, int num_vtiles, float* __restrict__ part_max,
                            float* __restrict__ part_sum, int* __restrict__ part_count) {
  using namespace nvcuda;
  __shared__ __align__(32) T a_s[kTileRows][kWmmaLd];     // hidden rows: row-major A
  __shared__ __align__(32) T b_s[kTileCols][kWmmaLd];     // weight rows: column-major B
  __shared__ __align__(32) float c_s[kTileRows][kWmmaLdc];
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wr = (warp / 2) * 16, wc = (warp % 2) * 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int vtile = blockIdx.y;
  const int64_t col0 = static_cast<int64_t>(vtile) * kTileCols;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c0, c1;
  wmma::fill_fragment(c0, 0.f);
  wmma::fill_fragment(c1, 0.f);
  for (int64_t k0 = 0; k0 < d; k0 += kWmmaK) {
#pragma unroll
    for (int e = 0; e < (kTileRows * kWmmaK) / kTileThreads; ++e) {
      const int idx = tid + e * kTileThreads;
      const int r = idx / kWmmaK, k = idx % kWmmaK;
      const int64_t gk = k0 + k;
      const int64_t gr = row0 + r, gc = col0 + r;
      a_s[r][k] = (gr < n && gk < d) ? hidden[gr * d + gk] : zero_of<T>();
      b_s[r][k] = (gc < vocab && gk < d) ? weight[gc * d + gk] : zero_of<T>();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kWmmaK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b0, b1;
      wmma::load_matrix_sync(a, &a_s[wr][kk], kWmmaLd);
      wmma::load_matrix_sync(b0, &b_s[wc][kk], kWmmaLd);
      wmma::load_matrix_sync(b1, &b_s[wc + 16][kk], kWmmaLd);
      wmma::mma_sync(c0, a, b0, c0);
      wmma::mma_sync(c1, a, b1, c1);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(&c_s[wr][wc], c0, kWmmaLdc, wmma::mem_row_major);
  wmma::store_matrix_sync(&c_s[wr][wc + 16], c1, kWmmaLdc, wmma::mem_row_major);
  __syncthreads();
  const int tx = tid % 16, ty = tid / 16;
  float acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = c_s[ty + 16 * i][tx + 16 * j];
  tile_epilogue(acc, tx, ty, row0, col0, vtile, bias, targets, target_logit, n, vocab, num_vtiles,
                part_max, part_sum, part_count);
}

// Merge one row's partials (one warp per row) and finish it.
__global__ void __launch_bounds__(kLinWarpsPerBlock * 32)
    linear_merge_kernel(const float* __restrict__ part_max, const float* __restrict__ part_sum,
                        const int* __restrict__ part_count, const int64_t* __restrict__ targets,
                        const float* __restrict__ target_logit, const double* __restrict__ log_keep,
                        const double* __restrict__ log_floor, int num_alphas, int64_t n,
                        int num_vtiles, int64_t ignore_index, float* __restrict__ nll_bits,
                        float* __restrict__ logp_out, int32_t* __restrict__ rank_out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kLinWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;  // warp-uniform
  if (targets[row] == ignore_index) {
    write_ignored_row(row, num_alphas, nll_bits, logp_out, rank_out, lane, 32);
    return;
  }
  RowState st = empty_state();
  const int64_t base = row * num_vtiles;
  for (int t = lane; t < num_vtiles; t += 32) {
    const float m = part_max[base + t], s = part_sum[base + t];
    st.bad |= (s != s || m == INFINITY) ? 1 : 0;
    st.lse = lse_merge(st.lse, LsePartial{m, s}, FastExp{});
    st.count += part_count[base + t];
  }
  warp_merge<32>(st);
  const float xt = target_logit[row];
  double logp = target_logp(static_cast<double>(xt), st.lse.max, st.lse.sum);
  if (st.bad || is_bad(xt)) logp = NAN;
  if (lane == 0) {
    logp_out[row] = static_cast<float>(logp);
    rank_out[row] = st.count;
  }
  write_row_losses(row, logp, log_keep, log_floor, num_alphas, nll_bits, lane, 32);
}

// Workspace per row: target logit + (max, sum, count) per vocabulary tile.
int64_t linear_row_bytes(int64_t vocab) {
  const int64_t tiles = (vocab + kTileCols - 1) / kTileCols;
  return static_cast<int64_t>(sizeof(float)) + tiles * static_cast<int64_t>(2 * sizeof(float) + sizeof(int));
}

size_t align256(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

}  // namespace

// ---------------------------------------------------------- launchers (tokenbounds/cuda_launch.h)
size_t linear_smoothed_nll_workspace_bytes(int64_t n, int64_t vocab) {
  return static_cast<size_t>(n * linear_row_bytes(vocab)) + 4 * 256;
}

size_t linear_smoothed_nll_min_workspace_bytes(int64_t vocab) {
  return linear_smoothed_nll_workspace_bytes(1, vocab);
}

template <typename T>
cudaError_t launch_linear_smoothed_nll(const T* hidden, const T* weight, const T* bias,
                                       const int64_t* targets, const double* log_keep,
                                       const double* log_floor, int num_alphas, int64_t n, int64_t d,
                                       int64_t vocab, int64_t ignore_index, float* nll_bits,
                                       float* logp, int32_t* rank, void* workspace,
                                       size_t workspace_bytes, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t num_vtiles = (vocab + kTileCols - 1) / kTileCols;
  if (vocab < 1 || d < 1 || num_vtiles > 65535 || num_alphas < 0) return cudaErrorInvalidValue;
  // Rows per chunk: as many as the workspace holds (4 arrays, each 256-byte aligned), rounded
  // down to whole row tiles when possible.
  const int64_t slack = 4 * 256;
  int64_t rows = (static_cast<int64_t>(workspace_bytes) - slack) / linear_row_bytes(vocab);
  if (rows < 1) return cudaErrorInvalidValue;
  if (rows > n) rows = n;
  if (rows >= kTileRows) rows -= rows % kTileRows;
  const int64_t max_grid_rows = static_cast<int64_t>(INT32_MAX) / kTileRows * kTileRows;
  if (rows > max_grid_rows) rows = max_grid_rows;

  char* ws = static_cast<char*>(workspace);
  float* tlogit = reinterpret_cast<float*>(ws);
  ws += align256(static_cast<size_t>(rows) * sizeof(float));
  float* pmax = reinterpret_cast<float*>(ws);
  ws += align256(static_cast<size_t>(rows * num_vtiles) * sizeof(float));
  float* psum = reinterpret_cast<float*>(ws);
  ws += align256(static_cast<size_t>(rows * num_vtiles) * sizeof(float));
  int* pcount = reinterpret_cast<int*>(ws);

  for (int64_t start = 0; start < n; start += rows) {
    const int64_t m = n - start < rows ? n - start : rows;
    const T* h = hidden + start * d;
    const int64_t* tg = targets + start;
    const unsigned row_blocks = static_cast<unsigned>((m + kLinWarpsPerBlock - 1) / kLinWarpsPerBlock);
    target_logit_kernel<T><<<row_blocks, kLinWarpsPerBlock * 32, 0, stream>>>(
        h, weight, bias, tg, m, d, vocab, ignore_index, tlogit);
    const dim3 grid(static_cast<unsigned>((m + kTileRows - 1) / kTileRows),
                    static_cast<unsigned>(num_vtiles));
    if constexpr (std::is_same_v<T, float>) {
      linear_tile_kernel<T><<<grid, kTileThreads, 0, stream>>>(
          h, weight, bias, tg, tlogit, m, d, vocab, static_cast<int>(num_vtiles), pmax, psum, pcount);
    } else {
      linear_tile_wmma_kernel<T><<<grid, kTileThreads, 0, stream>>>(
          h, weight, bias, tg, tlogit, m, d, vocab, static_cast<int>(num_vtiles), pmax, psum, pcount);
    }
    linear_merge_kernel<<<row_blocks, kLinWarpsPerBlock * 32, 0, stream>>>(
        pmax, psum, pcount, tg, tlogit, log_keep, log_floor, num_alphas, m,
        static_cast<int>(num_vtiles), ignore_index, nll_bits + start * num_alphas, logp + start,
        rank + start);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template cudaError_t launch_linear_smoothed_nll<float>(const float*, const float*, const float*,
                                                       const int64_t*, const double*, const double*, int,
                                                       int64_t, int64_t, int64_t, int64_t, float*, float*,
                                                       int32_t*, void*, size_t, cudaStream_t);
template cudaError_t launch_linear_smoothed_nll<__nv_bfloat16>(
    const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, const int64_t*, const double*,
    const double*, int, int64_t, int64_t, int64_t, int64_t, float*, float*, int32_t*, void*, size_t,
    cudaStream_t);
template cudaError_t launch_linear_smoothed_nll<__half>(const __half*, const __half*, const __half*,
                                                        const int64_t*, const double*, const double*, int,
                                                        int64_t, int64_t, int64_t, int64_t, float*, float*,
                                                        int32_t*, void*, size_t, cudaStream_t);

}  // namespace tokenbounds
