// CPU kernel, layer 1 of 5: vector primitives. 16-lane logical vectors (V16: kN registers of
// kW floats, at::vec::Vectorized of the set steer_isa.h picked), fused multiply-add, loads and
// stores of float32/bf16/fp16 with their conversions (the only intrinsics besides the lane
// sums), lane sums by the fixed tree (l + 8, l + 4, l + 2, l + 1), and the scalar helpers
// mul_n/add_to_n. Defines EMOKERN_INLINE and EMOKERN_UNROLL for the layers above.
//
// Layers (each includes only the one below it; steer_kernel.h includes the top one):
//   vec.h -> sizes.h -> tiles.h -> sweeps.h -> driver.h.
// Includes: ATen's vector headers and the standard library only. steer_isa.h must come first
// in the translation unit (it picks the Vectorized implementation).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/macros/Macros.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace emokern {
namespace cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;

// 16-lane logical vectors. kN registers of kW floats each.

constexpr int kLanes = 16;
constexpr int kW = static_cast<int>(Vec::size());
static_assert(kLanes % kW == 0, "a register holds at most 16 floats");
constexpr int kN = kLanes / kW;

struct V16 {
  Vec v[kN];
};

#if defined(__GNUC__) || defined(__clang__)
#define EMOKERN_INLINE __attribute__((always_inline))
#else
#define EMOKERN_INLINE
#endif

// Loops over registers and tiles have constant bounds; unrolled, their sums stay in registers.
// The tiles are separate functions (C10_NOINLINE): inlined into a large caller, the compiler
// kept their sums in memory.
#if defined(__clang__)
#define EMOKERN_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define EMOKERN_UNROLL _Pragma("GCC unroll 16")
#else
#define EMOKERN_UNROLL
#endif


EMOKERN_INLINE inline Vec fma1(const Vec& a, const Vec& b, const Vec& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512) || defined(__aarch64__)
  return at::vec::fmadd(a, b, c);  // vfmadd / vfmaq / svmad: one rounding
#elif defined(__FMA__)
  __at_align__ float x[kW], y[kW], z[kW];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int i = 0; i < kW; ++i) z[i] = std::fma(x[i], y[i], z[i]);  // compiled to vfmadd
  return Vec::loadu(z);
#else
  return a * b + c;  // no FMA unit: products round separately (documented exception)
#endif
}

inline V16 zero16() {
  V16 r;
  for (int j = 0; j < kN; ++j) r.v[j] = Vec(0.0f);
  return r;
}
inline V16 splat16(float a) {
  V16 r;
  for (int j = 0; j < kN; ++j) r.v[j] = Vec(a);
  return r;
}
inline V16 add16(const V16& a, const V16& b) {
  V16 r;
  for (int j = 0; j < kN; ++j) r.v[j] = a.v[j] + b.v[j];
  return r;
}
inline V16 sub16(const V16& a, const V16& b) {
  V16 r;
  for (int j = 0; j < kN; ++j) r.v[j] = a.v[j] - b.v[j];
  return r;
}
inline V16 mul16(const V16& a, const V16& b) {
  V16 r;
  for (int j = 0; j < kN; ++j) r.v[j] = a.v[j] * b.v[j];
  return r;
}
inline V16 fma16(const V16& a, const V16& b, const V16& c) {  // a * b + c, one rounding
  V16 r;
  for (int j = 0; j < kN; ++j) r.v[j] = fma1(a.v[j], b.v[j], c.v[j]);
  return r;
}

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512: 16 bf16/fp16 elements as one 256-bit half, converted by one widening load or one
// narrowing instruction (no masked access, no shuffles). The same numbers as ATen's
// conversions: bf16 -> fp32 places the bits high; fp16 <-> fp32 by vcvtph2ps / vcvtps2ph
// (nearest even); fp32 -> bf16 by vcvtne(2)ps2bf16 where the CPU has it, which rounds to
// nearest even exactly as ATen's integer rounding except that it flushes denormal inputs to
// zero (checked exhaustively over all 2^32 inputs, NaN payloads aside): a vector holding a
// denormal takes ATen's conversion.
template <typename T>
EMOKERN_INLINE inline __m512 widen16(const T* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else {
    return _mm512_cvtph_ps(raw);
  }
}

template <typename T>
EMOKERN_INLINE inline __m256i narrow16(const __m512 a) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(__AVX512BF16__)
    if (C10_LIKELY(_mm512_fpclass_ps_mask(a, 0x20) == 0))  // 0x20: denormal
      return __m256i(_mm512_cvtneps_pbh(a));
#endif
    const __m512i both = at::vec::convert_from_float<T>(Vec(a), Vec(a));
    return _mm512_castsi512_si256(both);
  } else {
    return _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}

template <typename T>
EMOKERN_INLINE inline __m512i narrow32(const __m512 a, const __m512 b) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (C10_LIKELY((_mm512_fpclass_ps_mask(a, 0x20) | _mm512_fpclass_ps_mask(b, 0x20)) == 0))
      return __m512i(_mm512_cvtne2ps_pbh(b, a));
    return at::vec::convert_from_float<T>(Vec(a), Vec(b));
  }
#endif
  return _mm512_inserti64x4(_mm512_castsi256_si512(narrow16<T>(a)), narrow16<T>(b), 1);
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// AVX2: 16 floats to bf16 by ATen's integer rounding (x + 0x7fff + lsb) >> 16, with one NaN
// test for all 16 instead of a blend per register; a vector holding a NaN takes ATen's
// conversion (NaN -> 0xffff). The same bits as ATen's.
EMOKERN_INLINE inline __m256i narrow16_bf16(const __m256 a, const __m256 b) {
  if (C10_UNLIKELY(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q)) != 0))
    return at::vec::convert_from_float<c10::BFloat16>(Vec(a), Vec(b));
  auto round = [](const __m256 f) EMOKERN_INLINE {  // (x + 0x7fff + lsb) >> 16, per lane
    const __m256i x = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)),
                                              x), 16);
  };
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(round(a), round(b)), 0xd8);
}
#endif

// Loads and stores of 16 elements, converting bf16/fp16 <-> float32 (round to nearest even)
// with ATen's vectorised conversions (AVX-512 and AVX2 bf16 stores: the functions above).
template <typename T>
inline V16 load16(const T* p) {
  V16 r;
  if constexpr (std::is_same_v<T, float>) {
    for (int j = 0; j < kN; ++j) r.v[j] = Vec::loadu(p + j * kW);
#if defined(CPU_CAPABILITY_AVX512)
  } else if constexpr (true) {
    r.v[0] = widen16(p);
#elif defined(CPU_CAPABILITY_AVX2)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bits placed high, 8 at a time
    for (int j = 0; j < kN; ++j)
      r.v[j] = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j * kW))),
          16));
#endif
  } else {
    using VT = at::vec::Vectorized<T>;
    constexpr int n = static_cast<int>(VT::size());  // 2 kW
    if constexpr (n > kLanes) {  // one 32-lane register: convert a half-width load
      auto converted = at::vec::convert_to_float<T>(VT::loadu(p, kLanes));
      r.v[0] = std::get<0>(converted);
    } else {
      for (int j = 0; j < kLanes / n; ++j) {
        auto converted = at::vec::convert_to_float<T>(VT::loadu(p + j * n));
        r.v[2 * j] = std::get<0>(converted);
        r.v[2 * j + 1] = std::get<1>(converted);
      }
    }
  }
  return r;
}

template <typename T>
inline void store16(T* p, const V16& a) {
  if constexpr (std::is_same_v<T, float>) {
    for (int j = 0; j < kN; ++j) a.v[j].store(p + j * kW);
#if defined(CPU_CAPABILITY_AVX512)
  } else if constexpr (true) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow16<T>(a.v[0]));
#elif defined(CPU_CAPABILITY_AVX2)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow16_bf16(a.v[0], a.v[1]));
#endif
  } else {
    using VT = at::vec::Vectorized<T>;
    constexpr int n = static_cast<int>(VT::size());
    if constexpr (n > kLanes) {
      at::vec::convert_from_float<T>(a.v[0], a.v[0]).store(p, kLanes);
    } else {
      for (int j = 0; j < kLanes / n; ++j)
        at::vec::convert_from_float<T>(a.v[2 * j], a.v[2 * j + 1]).store(p + j * n);
    }
  }
}

// Two logical vectors at once (32 elements): one full conversion on 32-lane bf16/fp16 registers
// (AVX-512), and no masked access: a load overlapping a masked store waits for that store.
template <typename T>
inline void store16x2(T* p, const V16& a, const V16& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (!std::is_same_v<T, float>) {
    _mm512_storeu_si512(p, narrow32<T>(a.v[0], b.v[0]));
    return;
  }
#endif
  if constexpr (!std::is_same_v<T, float> &&
                static_cast<int>(at::vec::Vectorized<T>::size()) == 2 * kLanes) {
    at::vec::convert_from_float<T>(a.v[0], b.v[0]).store(p);
  } else {
    store16(p, a);
    store16(p + kLanes, b);
  }
}

template <typename T>
inline void load16x2(const T* p, V16& a, V16& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (!std::is_same_v<T, float>) {  // two widening loads
    a.v[0] = widen16(p);
    b.v[0] = widen16(p + kLanes);
    return;
  }
#endif
  if constexpr (!std::is_same_v<T, float> &&
                static_cast<int>(at::vec::Vectorized<T>::size()) == 2 * kLanes) {
    auto converted = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    a.v[0] = std::get<0>(converted);
    b.v[0] = std::get<1>(converted);
  } else {
    a = load16(p);
    b = load16(p + kLanes);
  }
}

// The first n < 16 elements (the rest read as zero / left alone).
template <typename T>
inline V16 load16(const T* p, int64_t n) {
  T tmp[kLanes] = {};
  std::memcpy(tmp, p, sizeof(T) * size_t(n));
  return load16(static_cast<const T*>(tmp));
}
template <typename T>
inline void store16(T* p, const V16& a, int64_t n) {
  T tmp[kLanes];
  store16(static_cast<T*>(tmp), a);
  std::memcpy(p, tmp, sizeof(T) * size_t(n));
}

// Lane sums by the fixed tree (l + 8, l + 4, l + 2, l + 1).
inline float hsum16(const V16& a) {
  __at_align__ float f[kLanes];
  store16(f, a);
  for (int h = kLanes / 2; h >= 1; h /= 2)
    for (int l = 0; l < h; ++l) f[l] += f[l + h];
  return f[0];
}

// out[i] = hsum16(acc[i]) for i < n <= 16: the same tree run on 16 sums at once.
#if defined(CPU_CAPABILITY_AVX512)
// In registers: each shuffle level adds the lanes the portable tree adds (l and l + 8, then
// l + 4, l + 2, l + 1), 15 adds and 30 shuffles for 16 sums, one permute to put them in order.
// With the bf16/fp16 conversions above, the places the core names intrinsics; the portable
// version below defines the result (the tests compare them).
inline void hsum16_many(const V16* acc, int n, float* out) {
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = i < n ? __m512(acc[i].v[0]) : _mm512_setzero_ps();
  __m512 c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i)  // [l + (l + 8) of v[2i] | of v[2i + 1]], l < 8
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
  for (int i = 0; i < 4; ++i)  // 128-bit block j: l + (l + 4) of v[4i + j], l < 4
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
  for (int i = 0; i < 2; ++i)  // block j: l + (l + 2) of v[8i + j], of v[8i + 4 + j]
    e[i] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0xee));
  const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88),  // l + (l + 1)
                                 _mm512_shuffle_ps(e[0], e[1], 0xdd));
  // Block j of f holds the sums of v[j], v[4 + j], v[8 + j], v[12 + j]: sum i sits in lane
  // 4 (i mod 4) + i / 4.
  const __m512i lane = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512 sums = _mm512_permutexvar_ps(lane, f);
  if (n == 16) {
    _mm512_storeu_ps(out, sums);
    return;
  }
  // Not a masked store: a load of what a masked store wrote waits until the store retires
  // (no forwarding), and the callers read the sums at once. A whole store forwards to the
  // copy's loads.
  __at_align__ float tmp[kLanes];
  _mm512_store_ps(tmp, sums);
  for (int i = 0; i < n; ++i) out[i] = tmp[i];
}
#elif defined(CPU_CAPABILITY_AVX2)
// In registers, eight sums at a time: l + (l + 8) is one add of a logical vector's two halves,
// then the AVX-512 version's levels on 128-bit blocks (l + 4, l + 2, l + 1) and one permute.
inline void hsum8_avx2(const V16* acc, int n, float* out) {
  __m256 c[8];
  for (int i = 0; i < 8; ++i)
    c[i] = i < n ? _mm256_add_ps(acc[i].v[0], acc[i].v[1]) : _mm256_setzero_ps();
  __m256 d[4], e[2];
  for (int i = 0; i < 4; ++i)  // block j: l + (l + 4) of c[2i + j], l < 4
    d[i] = _mm256_add_ps(_mm256_permute2f128_ps(c[2 * i], c[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(c[2 * i], c[2 * i + 1], 0x31));
  for (int i = 0; i < 2; ++i)  // block j: l + (l + 2) of c[4i + j], of c[4i + 2 + j]
    e[i] = _mm256_add_ps(_mm256_shuffle_ps(d[2 * i], d[2 * i + 1], 0x44),
                         _mm256_shuffle_ps(d[2 * i], d[2 * i + 1], 0xee));
  const __m256 f = _mm256_add_ps(_mm256_shuffle_ps(e[0], e[1], 0x88),  // l + (l + 1)
                                 _mm256_shuffle_ps(e[0], e[1], 0xdd));
  // Block j of f holds the sums of c[j], c[2 + j], c[4 + j], c[6 + j]: sum i sits in lane
  // 4 (i mod 2) + i / 2.
  const __m256 sums = _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if (n >= 8) {
    _mm256_storeu_ps(out, sums);
  } else {
    __at_align__ float tmp[8];
    _mm256_store_ps(tmp, sums);
    for (int i = 0; i < n; ++i) out[i] = tmp[i];
  }
}
inline void hsum16_many(const V16* acc, int n, float* out) {
  hsum8_avx2(acc, std::min(n, 8), out);
  if (n > 8) hsum8_avx2(acc + 8, n - 8, out + 8);
}
#else
inline void hsum16_many(const V16* acc, int n, float* out) {
  __at_align__ float a[kLanes * kLanes];
  __at_align__ float t[kLanes * kLanes];
  for (int i = 0; i < n; ++i) store16(a + kLanes * i, acc[i]);
  std::memset(a + kLanes * n, 0, sizeof(float) * size_t(kLanes * (kLanes - n)));
  at::vec::transpose_mxn<float, kLanes, kLanes>(a, kLanes, t, kLanes);  // t[l][i] = a[i][l]
  V16 r[kLanes];
  for (int l = 0; l < kLanes; ++l) r[l] = load16(static_cast<const float*>(t + kLanes * l));
  for (int h = kLanes / 2; h >= 1; h /= 2)
    for (int l = 0; l < h; ++l) r[l] = add16(r[l], r[l + h]);
  store16(out, r[0], n);
}
#endif

inline void hsum16_all(const V16* acc, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += kLanes)
    hsum16_many(acc + i, int(std::min<int64_t>(kLanes, n - i)), out + i);
}

// out[i] = a[i] * b[i] and acc[i] += a[i] for i < n: the scalar arithmetic, in registers.
inline void mul_n(const float* a, const float* b, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) (Vec::loadu(a + i) * Vec::loadu(b + i)).store(out + i);
  for (; i < n; ++i) out[i] = a[i] * b[i];
}
inline void add_to_n(float* acc, const float* a, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) (Vec::loadu(acc + i) + Vec::loadu(a + i)).store(acc + i);
  for (; i < n; ++i) acc[i] += a[i];
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace emokern
