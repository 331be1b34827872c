#include "gpfm/isa.h"

#include <cstdlib>
#include <string>

namespace gpfm {
namespace {

Isa pick_isa() {
  const char* env = std::getenv("GPFM_SIMD");
  const std::string cap = env ? env : "";
  if (cap == "portable") return Isa::Portable;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (cap != "avx2" && __builtin_cpu_supports("avx512bw")) return Isa::Avx512;
  if (__builtin_cpu_supports("avx2")) return Isa::Avx2;
#endif
  return Isa::Portable;
}

}  // namespace

Isa cpu_isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

}  // namespace gpfm
