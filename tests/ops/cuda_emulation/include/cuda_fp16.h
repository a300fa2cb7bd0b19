// CPU emulation of the cuda_fp16.h subset used by csrc/cuda/steer_cuda.cu (tests only):
// float16 through the compiler's _Float16.
#pragma once
#include <cstdint>
#include <cstring>
struct __half { uint16_t bits; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return float(f); }
inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  __half out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}
