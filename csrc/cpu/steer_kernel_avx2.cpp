// The kernel core (steer_kernel.h) for AVX2, chosen at run time by steer_cpu.cpp when the
// CPU supports it. The ahead-of-time build (setup.py) compiles this file with -mavx2 -mfma -mf16c;
// the JIT build's -march=native implies them on CPUs that have AVX2, and elsewhere this
// file compiles to nothing (its entry point stays a null weak symbol).
#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#define EMOKERN_ISA_AVX2
#include "steer_isa.h"  // before any ATen header
#include "steer_kernel.h"

namespace emokern {
namespace cpu {
namespace AVX2 {

const KernelTable* isa_kernel_table() { return &kernel_table(); }

}  // namespace AVX2
}  // namespace cpu
}  // namespace emokern

#endif
