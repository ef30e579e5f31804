// Which instruction-set paths the native kernels may take on this CPU, decided once per process.
//
// Shared by every source file of the library, so that one environment variable lowers every kernel at
// once. Two independent choices:
//   isa()      the fp32-activation kernels ("exact" numerics): scalar, AVX2 (+FMA, F16C) or AVX-512.
//   dot_path() the integer dot products of the quantized-activation kernels ("fast" numerics): scalar,
//              AVX2 (vpmaddubsw) or VNNI (vpdpbusd on 256-bit vectors, AVX512-VNNI + AVX512VL).
// MOEFLASH_ISA=scalar|avx2|avx512 (or ATen's own ATEN_CPU_CAPABILITY=default|avx2|avx512) can lower
// both, never raise them past the CPU; MOEFLASH_DOT=scalar|avx2|vnni lowers the dot path alone (tests
// run each path in its own process). The integer paths give bit-identical results: every block's dot
// product is exact in int32 on all of them.
#pragma once

#include <cstdlib>
#include <initializer_list>
#include <string>

namespace moeflash_native {

enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2 };
enum DotPath { DOT_SCALAR = 0, DOT_AVX2 = 1, DOT_VNNI = 2 };

inline bool cpu_has(const char* feature) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const std::string f(feature);
  if (f == "avx2") return __builtin_cpu_supports("avx2");
  if (f == "fma") return __builtin_cpu_supports("fma");
  if (f == "f16c") return __builtin_cpu_supports("f16c");
  if (f == "avx512f") return __builtin_cpu_supports("avx512f");
  if (f == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (f == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (f == "avx512vnni") return __builtin_cpu_supports("avx512vnni");
#endif
  (void)feature;
  return false;
}

// The lowest level the environment asks for among `vars` (names mapped by `level`), or `best`.
template <class F>
inline int env_cap(int best, std::initializer_list<const char*> vars, F level) {
  for (const char* var : vars) {
    const char* env = std::getenv(var);
    if (!env) continue;
    const int want = level(std::string(env));
    if (want >= 0 && want < best) best = want;
  }
  return best;
}

inline int isa_level(const std::string& s) {
  return (s == "scalar" || s == "default") ? SCALAR : s == "avx2" ? AVX2 : s == "avx512" ? AVX512 : -1;
}

inline Isa detect_isa() {
  int best = SCALAR;
  if (cpu_has("avx2") && cpu_has("fma") && cpu_has("f16c")) best = AVX2;
  if (best == AVX2 && cpu_has("avx512f") && cpu_has("avx512bw") && cpu_has("avx512vl")) best = AVX512;
  return static_cast<Isa>(env_cap(best, {"MOEFLASH_ISA", "ATEN_CPU_CAPABILITY"}, isa_level));
}

inline Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

inline DotPath detect_dot_path() {
  if (isa() == SCALAR) return DOT_SCALAR;
  int best = DOT_AVX2;
  if (isa() == AVX512 && cpu_has("avx512vnni")) best = DOT_VNNI;
  return static_cast<DotPath>(env_cap(best, {"MOEFLASH_DOT"}, [](const std::string& s) {
    return s == "scalar" ? DOT_SCALAR : s == "avx2" ? DOT_AVX2 : s == "vnni" ? DOT_VNNI : -1;
  }));
}

inline DotPath dot_path() {
  static const DotPath chosen = detect_dot_path();
  return chosen;
}

}  // namespace moeflash_native
