#pragma once

namespace gpfm {

// The widest x86 vector ISA the CPU hot loops may use: the CPU's own, capped by the environment
// variable GPFM_SIMD ("portable" = the plain C++ loops that non-x86 builds run, "avx2" = no
// AVX-512), which is how the tests reach every path on one machine. Chosen once per process.
enum class Isa { Portable, Avx2, Avx512 };

Isa cpu_isa();

}  // namespace gpfm
