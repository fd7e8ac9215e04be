// CUDA kernels of the gram family (torch-free; math in tokenbounds/gram.h).
//
// gram_accumulate: acc[i, j] += sum_r x[r, i] x[r, j] for j >= i. One 64 x 64 output tile per
//   block; blocks whose tile lies strictly below the diagonal exit at once (about half the grid).
//   16-row slabs of the two column panels are staged in shared memory (converted to the
//   accumulation type), each of the 256 threads owns a 4 x 4 register tile. Each tile is owned by
//   one block, so the read-modify-write of acc needs no atomics.
// rademacher_matmul: y = x @ Z, Z[i, c] = rademacher(seed, i, offset + c). The 32 x 32 tile of Z
//   is generated into shared memory from the counter-based hash, so Z never exists in global
//   memory; each thread accumulates 8 rows of one probe column.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "tokenbounds/cuda_launch.h"
#include "tokenbounds/gram.h"

namespace tokenbounds {
namespace {

template <typename Acc>
__device__ __forceinline__ Acc load_as(const float* p) { return static_cast<Acc>(*p); }
template <typename Acc>
__device__ __forceinline__ Acc load_as(const double* p) { return static_cast<Acc>(*p); }
template <typename Acc>
__device__ __forceinline__ Acc load_as(const __nv_bfloat16* p) { return static_cast<Acc>(__bfloat162float(*p)); }
template <typename Acc>
__device__ __forceinline__ Acc load_as(const __half* p) { return static_cast<Acc>(__half2float(*p)); }

constexpr int kTile = 64;
constexpr int kSlab = 16;

template <typename T, typename Acc>
__global__ void gram_accumulate_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t ldx,
                                       Acc* __restrict__ acc, int64_t ld_acc) {
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  if (!gram::tile_touches_upper(i0, j0, kTile)) return;
  __shared__ Acc As[kSlab][kTile];
  __shared__ Acc Bs[kSlab][kTile];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  Acc c[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) c[a][b] = Acc(0);
  for (int64_t r0 = 0; r0 < n; r0 += kSlab) {
    for (int e = threadIdx.x; e < kSlab * kTile; e += blockDim.x) {
      const int rr = e / kTile, cc = e % kTile;
      const int64_t r = r0 + rr, ci = i0 + cc, cj = j0 + cc;
      As[rr][cc] = (r < n && ci < d) ? load_as<Acc>(x + r * ldx + ci) : Acc(0);
      Bs[rr][cc] = (r < n && cj < d) ? load_as<Acc>(x + r * ldx + cj) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kSlab; ++rr) {
      Acc av[4], bv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) av[a] = As[rr][ty * 4 + a];
#pragma unroll
      for (int b = 0; b < 4; ++b) bv[b] = Bs[rr][tx * 4 + b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) c[a][b] += av[a] * bv[b];
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t i = i0 + ty * 4 + a;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t j = j0 + tx * 4 + b;
      if (i < d && j < d && j >= i) acc[i * ld_acc + j] += c[a][b];
    }
  }
}

constexpr int kRowsPerBlock = 64;
constexpr int kColsPerBlock = 32;
constexpr int kInner = 32;

template <typename T, typename Acc>
__global__ void rademacher_matmul_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t ldx,
                                         gram::ProbeKey key, uint32_t offset, int64_t k,
                                         Acc* __restrict__ y) {
  __shared__ Acc Xs[kRowsPerBlock][kInner + 1];
  __shared__ Acc Zs[kInner][kColsPerBlock];
  const int tx = threadIdx.x;  // probe column within the tile
  const int ty = threadIdx.y;  // rows ty, ty + 8, ...
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kColsPerBlock + tx;
  Acc s[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) s[r] = Acc(0);
  const int tid = ty * kColsPerBlock + tx;
  for (int64_t i0 = 0; i0 < d; i0 += kInner) {
    for (int e = tid; e < kRowsPerBlock * kInner; e += 256) {
      const int rr = e / kInner, ii = e % kInner;
      const int64_t r = row0 + rr, i = i0 + ii;
      Xs[rr][ii] = (r < n && i < d) ? load_as<Acc>(x + r * ldx + i) : Acc(0);
    }
    for (int e = tid; e < kInner * kColsPerBlock; e += 256) {
      const int ii = e / kColsPerBlock, cc = e % kColsPerBlock;
      const int64_t i = i0 + ii;
      const int64_t c = static_cast<int64_t>(blockIdx.y) * kColsPerBlock + cc;
      Zs[ii][cc] = (i < d && c < k)
                       ? gram::rademacher<Acc>(key, static_cast<uint32_t>(i), offset + static_cast<uint32_t>(c))
                       : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int ii = 0; ii < kInner; ++ii) {
      const Acc z = Zs[ii][tx];
#pragma unroll
      for (int r = 0; r < 8; ++r) s[r] += Xs[ty + 8 * r][ii] * z;
    }
    __syncthreads();
  }
  if (col < k) {
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int64_t row = row0 + ty + 8 * r;
      if (row < n) y[row * k + col] = s[r];
    }
  }
}

}  // namespace

// ---------------------------------------------------------- launchers (tokenbounds/cuda_launch.h)
template <typename T, typename Acc>
cudaError_t launch_gram_accumulate(const T* x, int64_t n, int64_t d, int64_t ldx, Acc* acc, int64_t ld_acc,
                                   cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  const unsigned tiles = static_cast<unsigned>((d + kTile - 1) / kTile);
  gram_accumulate_kernel<T, Acc><<<dim3(tiles, tiles), 256, 0, stream>>>(x, n, d, ldx, acc, ld_acc);
  return cudaGetLastError();
}

// y [n, k] float32 (float64 for float64 x), row-major, fully overwritten.
template <typename T, typename Out>
cudaError_t launch_rademacher_matmul(const T* x, int64_t n, int64_t d, int64_t ldx, uint64_t seed,
                                     uint32_t offset, int64_t k, Out* y, cudaStream_t stream) {
  if (n == 0 || k == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>((k + kColsPerBlock - 1) / kColsPerBlock));
  rademacher_matmul_kernel<T, Out><<<grid, dim3(kColsPerBlock, 8), 0, stream>>>(
      x, n, d, ldx, gram::probe_key(seed), offset, k, y);
  return cudaGetLastError();
}

template cudaError_t launch_gram_accumulate<float, float>(const float*, int64_t, int64_t, int64_t, float*,
                                                          int64_t, cudaStream_t);
template cudaError_t launch_gram_accumulate<float, double>(const float*, int64_t, int64_t, int64_t, double*,
                                                           int64_t, cudaStream_t);
template cudaError_t launch_gram_accumulate<double, float>(const double*, int64_t, int64_t, int64_t, float*,
                                                           int64_t, cudaStream_t);
template cudaError_t launch_gram_accumulate<double, double>(const double*, int64_t, int64_t, int64_t, double*,
                                                            int64_t, cudaStream_t);
template cudaError_t launch_gram_accumulate<__nv_bfloat16, float>(const __nv_bfloat16*, int64_t, int64_t,
                                                                  int64_t, float*, int64_t, cudaStream_t);
template cudaError_t launch_gram_accumulate<__nv_bfloat16, double>(const __nv_bfloat16*, int64_t, int64_t,
                                                                   int64_t, double*, int64_t, cudaStream_t);
template cudaError_t launch_gram_accumulate<__half, float>(const __half*, int64_t, int64_t, int64_t, float*,
                                                           int64_t, cudaStream_t);
template cudaError_t launch_gram_accumulate<__half, double>(const __half*, int64_t, int64_t, int64_t, double*,
                                                            int64_t, cudaStream_t);
template cudaError_t launch_rademacher_matmul<float, float>(const float*, int64_t, int64_t, int64_t, uint64_t,
                                                            uint32_t, int64_t, float*, cudaStream_t);
template cudaError_t launch_rademacher_matmul<double, double>(const double*, int64_t, int64_t, int64_t,
                                                              uint64_t, uint32_t, int64_t, double*,
                                                              cudaStream_t);
template cudaError_t launch_rademacher_matmul<__nv_bfloat16, float>(const __nv_bfloat16*, int64_t, int64_t,
                                                                    int64_t, uint64_t, uint32_t, int64_t,
                                                                    float*, cudaStream_t);
template cudaError_t launch_rademacher_matmul<__half, float>(const __half*, int64_t, int64_t, int64_t,
                                                             uint64_t, uint32_t, int64_t, float*,
                                                             cudaStream_t);

}  // namespace tokenbounds
