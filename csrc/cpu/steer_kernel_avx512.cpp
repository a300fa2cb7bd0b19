// The kernel core (steer_kernel.h) for AVX-512, chosen at run time by steer_cpu.cpp when the
// CPU supports it. The ahead-of-time build (setup.py) compiles this file with -mavx512f -mavx512bw -mavx512vl
// -mavx512dq -mfma -mf16c;
// the JIT build's -march=native implies them on CPUs that have AVX-512, and elsewhere this
// file compiles to nothing (its entry point stays a null weak symbol).
#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__FMA__)

#define EMOKERN_ISA_AVX512
#include "steer_isa.h"  // before any ATen header
#include "steer_kernel.h"

namespace emokern {
namespace cpu {
namespace AVX512 {

const KernelTable* isa_kernel_table() { return &kernel_table(); }

}  // namespace AVX512
}  // namespace cpu
}  // namespace emokern

#endif
