// Element math of the gram family (proxy Hessian X^T X and Rademacher probe products), shared by
// the CPU kernels (csrc/cpu/gram.cpp) and the CUDA kernels (csrc/cuda/gram.cu). The Triton kernels
// (triton_kernels/gram.py) and the torch fallback (pyext/ops/gram.py) mirror it bit for bit.
//
// Counter-based Rademacher probes: entry (row, col) of the probe matrix Z for seed s is a pure
// function of (s, row, col), so a kernel can regenerate any tile of Z on the fly and Z (n x k) never
// has to live in memory. The hash is three rounds of the "lowbias32" integer mixer
// (C. Wellons, 2018: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16),
// absorbing the row and the column one after the other (sponge style), keyed by the two 32-bit
// halves of the 64-bit seed. Only 32-bit multiply-low, xor and shift are used, so every backend
// (C++, CUDA, Triton, numpy/torch int64) computes identical bits.
#pragma once
#include <cstdint>

#include "tokenbounds/common.h"

namespace tokenbounds {
namespace gram {

TB_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct ProbeKey {
  uint32_t row_key;
  uint32_t col_key;
};

// Keys derived once per call from the 64-bit seed (host side; passed to kernels by value).
TB_HD ProbeKey probe_key(uint64_t seed) {
  const uint32_t lo = static_cast<uint32_t>(seed & 0xffffffffULL);
  const uint32_t hi = static_cast<uint32_t>(seed >> 32);
  ProbeKey k;
  k.row_key = mix32(lo ^ 0x9E3779B9U);
  k.col_key = mix32((hi + 0x85EBCA6BU) ^ k.row_key);
  return k;
}

// 32 random bits for entry (row, col). The row is absorbed first, so the hash of a tile row can be
// computed once and reused for all of its columns.
TB_HD uint32_t probe_row_state(ProbeKey k, uint32_t row) { return mix32(row ^ k.row_key); }
TB_HD uint32_t probe_bits_from_row(ProbeKey k, uint32_t row_state, uint32_t col) {
  return mix32(mix32(row_state ^ col ^ k.col_key) + 0x632BE5ABU);
}
TB_HD uint32_t probe_bits(ProbeKey k, uint32_t row, uint32_t col) {
  return probe_bits_from_row(k, probe_row_state(k, row), col);
}

// Rademacher sign: +1 when the top bit is clear, -1 when it is set.
template <typename T>
TB_HD T rademacher(ProbeKey k, uint32_t row, uint32_t col) {
  return (probe_bits(k, row, col) >> 31) ? T(-1) : T(1);
}
template <typename T>
TB_HD T rademacher_from_row(ProbeKey k, uint32_t row_state, uint32_t col) {
  return (probe_bits_from_row(k, row_state, col) >> 31) ? T(-1) : T(1);
}

// Tiles of the upper triangle: tile (ti, tj) of size tile_i x tile_j holds entries with j >= i iff
// its last column reaches its first row.
TB_HD bool tile_touches_upper(int64_t i0, int64_t j0, int64_t tile_j) { return j0 + tile_j > i0; }

}  // namespace gram
}  // namespace tokenbounds
