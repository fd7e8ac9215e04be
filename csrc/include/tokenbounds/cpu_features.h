// Run-time CPU feature detection: release builds never use -march=native; each SIMD kernel is
// compiled with a function-level target attribute and chosen here at run time.
#pragma once
#include <cstdlib>
#include <cstring>

namespace tokenbounds {
namespace cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// AVX2 is the default on every x86-64 CPU that has it. The AVX-512 path shares all of its logic
// with the AVX2 path (csrc/cpu/smoothed_nll_row.inc) but our CI machines lack AVX-512, so it is
// used only when asked for with TOKENBOUNDS_CPU_ISA=avx512 on a CPU that supports it.
// TOKENBOUNDS_CPU_ISA=scalar|avx2 forces a lower path (tests use it to cover every path).
inline Isa detect_isa() {
  bool has_avx2 = false, has_avx512 = false;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
#endif
  const char* want = std::getenv("TOKENBOUNDS_CPU_ISA");
  if (want != nullptr && std::strcmp(want, "scalar") == 0) return Isa::kScalar;
  if (want != nullptr && std::strcmp(want, "avx512") == 0 && has_avx512) return Isa::kAvx512;
  return has_avx2 ? Isa::kAvx2 : Isa::kScalar;
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
