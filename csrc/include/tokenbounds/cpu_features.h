// Run-time CPU feature detection: release builds never use -march=native; each SIMD kernel is
// compiled with a function-level target attribute and chosen here at run time.
#pragma once
#include <cstdlib>
#include <cstring>

namespace tokenbounds {
namespace cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
  // TOKENBOUNDS_CPU_ISA=scalar|avx2|avx512 caps the choice (tests use it to cover every path).
  Isa best = Isa::kScalar;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
    best = Isa::kAvx512;
#endif
  const char* cap = std::getenv("TOKENBOUNDS_CPU_ISA");
  if (cap != nullptr) {
    Isa want = best;
    if (std::strcmp(cap, "scalar") == 0) want = Isa::kScalar;
    else if (std::strcmp(cap, "avx2") == 0) want = Isa::kAvx2;
    else if (std::strcmp(cap, "avx512") == 0) want = Isa::kAvx512;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace cpu
}  // namespace tokenbounds
