// The instruction set one translation unit compiles the kernel core for, as ATen does for its
// own kernels: the core is written once on at::vec::Vectorized, and the macros CPU_CAPABILITY
// (namespace name) and CPU_CAPABILITY_<NAME> pick the Vectorized implementation. Define
// exactly one EMOKERN_ISA_<SET>, then include this before any ATen header:
//   DEFAULT  plain C++ arrays the compiler vectorises for its target (NEON on aarch64),
//   AVX2     x86-64 with AVX2, FMA and F16C,
//   AVX512   x86-64 with AVX-512 F, BW, VL and DQ,
//   SVE256   aarch64 with 256-bit SVE.
#pragma once

#if defined(EMOKERN_ISA_AVX512)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define EMOKERN_ISA_NAME "avx512"
#elif defined(EMOKERN_ISA_AVX2)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define EMOKERN_ISA_NAME "avx2"
#elif defined(EMOKERN_ISA_SVE256)
#define CPU_CAPABILITY SVE256
#define CPU_CAPABILITY_SVE
#define CPU_CAPABILITY_SVE256
#define EMOKERN_ISA_NAME "sve256"
#elif defined(EMOKERN_ISA_DEFAULT)
#define CPU_CAPABILITY DEFAULT
#if defined(__aarch64__)
#define EMOKERN_ISA_NAME "neon"  // ATen's default Vectorized on aarch64 is NEON
#else
#define EMOKERN_ISA_NAME "default"
#endif
#else
#error "define one of EMOKERN_ISA_DEFAULT, _AVX2, _AVX512, _SVE256 before steer_isa.h"
#endif
