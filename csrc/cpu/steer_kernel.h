// The core of the CPU kernel: one source for every instruction set, written on ATen's portable
// vector types (at::vec::Vectorized: AVX-512, AVX2, SVE, NEON or plain arrays, with vectorised
// bf16/fp16 conversion). steer_isa.h picks the set; this file is compiled once per set into
// namespace emokern::cpu::<set> and exposes kernel_table().
//
// Semantics (docs/design.md; oracle: emokern.ops.reference): for every row with
// x = hidden (+ residual), in float32,
//   p_k = <x, v_k> / ||v_k||;  if the row has a slot s: y = x + delta_s with
//   delta_s = sum_k w[s, k] v_k (k in order), y *= ||x|| / max(||y||, 1e-6) when norm
//   preserving, hidden = y (- residual), and the running statistics of s take p.
//
// Arithmetic, identical on every instruction set (bit for bit; bf16/fp16 NaN payloads aside):
//   * sums over D run in 16 logical lanes (lane l takes columns d = l mod 16, in increasing d,
//     by fused multiply-add), one to four registers per logical vector depending on the set,
//     then one fixed tree over the lanes (l + 8, l + 4, l + 2, l + 1);
//   * delta_s[d] accumulates k in order by fused multiply-add;
//   * y (- residual) rounds once: fma(x + delta, scale, -residual) when norm preserving.
// So every number a row produces depends on that row only: not on the thread count, the tile
// a row lands in, the batch around it, or the machine (x86 without FMA, the one exception,
// rounds products separately).
//
// Work (rows in blocks of 8 (AVX2: 9), blocks in chunks that fix the running-sum partials):
//   * few vectors (K <= 8; decode on AVX2: K <= 4): one sweep per row (pair) reads the row
//     from memory once and converts it in registers; with one register per logical vector
//     (AVX-512), or up to four vectors, it accumulates every dot product and writes y in the
//     same pass; with several registers (AVX2, NEON) and more vectors, two such sweeps over an
//     L1-resident column chunk, four vectors each, the second writing (decode offsets built
//     from the weights: the dot products one register part at a time, then the writes);
//   * many vectors: float32 rows (read in place, or converted once into scratch), register
//     tiles of kTileRows rows x kTileVecs vectors per column panel (vectors packed panel-major
//     once per call when enough rows share them and, in decode, when their layout needs it:
//     then once per thread),
//     then the writes;
//   * offsets delta_s: once per slot up front when slots have several rows (prefill);
//     otherwise (decode) built in registers from the weights, inside the sweep or by register
//     tiles of kDeltaRows rows x kDeltaCols logical vectors that write y = x + delta directly
//     (norm preserving: per block into scratch, then the scaled writes).
// Running statistics: each chunk of rows sums its rows' projections per slot in double, in
// row order; the chunks are reduced in order after the parallel loop (no atomics).

#include "steer_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/macros/Macros.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>

namespace emokern {
namespace cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;

// ---------------------------------------------------------------------------------------------
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
  _mm512_mask_storeu_ps(out, __mmask16((1u << n) - 1u), _mm512_permutexvar_ps(lane, f));
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

// ---------------------------------------------------------------------------------------------
// Sizes, per instruction set: how many logical vectors fit the registers.

#if defined(CPU_CAPABILITY_AVX512)
// 32 registers, one logical vector each.
constexpr int kTileRows = 4, kTileVecs = 6;    // projections: 24 accumulators
constexpr int kDeltaRows = 4, kDeltaCols = 4;  // offsets: 16 accumulators
constexpr int kSweepRows = 2;                  // sweeps: 16 accumulators + norms
constexpr int kNormGroup = 8;
constexpr int kDecodeTilesAboveK = 8;          // decode: more vectors take the tiles
#elif defined(CPU_CAPABILITY_AVX2)
// 16 registers, two per logical vector.
// Projections: 12 sums (one register part at a time) + 3 rows + 1 vector, 7 loads per 12
// FMAs; offsets: 12 sums (3 rows x 2 logical vectors) + 4 vector loads and 3 broadcasts.
constexpr int kTileRows = 3, kTileVecs = 4;
constexpr int kDeltaRows = 3, kDeltaCols = 2;
constexpr int kSweepRows = 1;                  // sweeps: 8 sums per register half
constexpr int kNormGroup = 4;
constexpr int kDecodeTilesAboveK = 4;  // (offsets built per row: the tiles share the loads)
#else
// NEON (32 x 128-bit: four registers per logical vector), or plain arrays.
constexpr int kTileRows = 2, kTileVecs = 3;
constexpr int kDeltaRows = 2, kDeltaCols = 2;
constexpr int kSweepRows = 1;
constexpr int kNormGroup = 4;
constexpr int kDecodeTilesAboveK = 8;
#endif
constexpr int kSweepMaxK = 8;  // sweeps up to 8 vectors
// With several registers per logical vector, sweeps over more vectors than this split their dot
// products (sweep_halves, sweep_split); up to this many, every sum stays live.
constexpr int kLiveSweepMaxK = 4;

constexpr int64_t kMaxPanel = 512;     // columns per panel of the tiles, at most
// Rows per block: whole row tiles (AVX2: three of 3 rows). The running-sum partials are fixed
// apart from it: chunks of kStatsRows rows (4 kStatsRows past 256 rows) wherever rows share a
// slot, so that their sums associate the same on every instruction set.
#if defined(CPU_CAPABILITY_AVX2)
constexpr int kBlock = 9;
#else
constexpr int kBlock = 8;
#endif
constexpr int kStatsRows = 8;
constexpr int64_t kSweepL1Bytes = 24 * 1024;  // vectors a sweep keeps in L1 whole
constexpr int64_t kSweepChunk = 512;   // else columns per sweep pass
constexpr int64_t kPackMinRows = 16;   // pack the vectors when this many rows share them
// Below this much work (multiply-adds) per thread, waking a second thread costs more than it
// saves, so small decode calls stay on the calling thread.
constexpr int64_t kMinWorkPerThread = 1 << 18;

inline int64_t round16(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Panel width for D columns: one panel up to 768 columns (a tile's vectors and a block's rows
// still fit L1), else D split evenly into panels of at most kMaxPanel, a multiple of 16.
inline int64_t panel_width(int64_t dim) {
  const int64_t n = dim <= 768 ? 1 : (dim + kMaxPanel - 1) / kMaxPanel;
  return std::max<int64_t>(kLanes, round16((dim + n - 1) / n));
}

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work_per_item));
}

// ---------------------------------------------------------------------------------------------
// Scratch owned by a thread, grown on demand and kept across calls (no allocation, no page
// faults on the hot path).

template <typename E>
struct Buffer {
  E* data = nullptr;
  size_t size = 0;
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { ::operator delete[](data, std::align_val_t(64)); }
  // 64-byte aligned: a 512-bit load across two cache lines costs two.
  E* take(size_t n) {
    if (n > size) {
      ::operator delete[](data, std::align_val_t(64));
      data = static_cast<E*>(::operator new[](sizeof(E) * n, std::align_val_t(64)));
      size = n;
    }
    return data;
  }
};

// Local helpers rather than std:: algorithms: a template instantiated in several cores is kept
// once by the linker, and must not carry wider instructions into the portable path.
template <typename E>
inline void fill_n(E* p, int64_t n, E value) {
  for (int64_t i = 0; i < n; ++i) p[i] = value;
}

struct Scratch {
  Buffer<float> rows;    // [kBlock, D16] float32 rows (tile path)
  Buffer<float> deltas;  // [kBlock, D16] offsets of a block (decode)
  Buffer<float> proj;    // [kBlock, K] projections when proj_out is not given
  Buffer<float> zeros;   // [D16] padding vector of the sweeps
  Buffer<V16> acc;       // [kBlock, K] lane accumulators
  Buffer<float> dots;    // [kBlock, K]
  // Per call, on the calling thread:
  Buffer<float> packed;  // vectors, panel-major
  Buffer<float> table;   // [S, D16] offsets per slot
  Buffer<double> entry_sums;
  Buffer<float> entry_last;
  Buffer<int64_t> entry_meta;  // [slot, count] per entry, entry counts per chunk
  Buffer<double> slot_sums;
  Buffer<int64_t> slot_meta;
};

inline Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

// The vectors as the tiles read them: vector k's columns [p * width, (p + 1) * width) start at
// base + p * panel_stride + k * k_stride. Unpacked: panel_stride = width, k_stride = D.
// Packed: panels of K x k_stride floats (width plus a line), zero padded.
struct VView {
  const float* base;
  int64_t width, panel_stride, k_stride;
  const float* panel(int64_t p) const { return base + p * panel_stride; }
};

// ---------------------------------------------------------------------------------------------
// Register tiles.

// acc[r * acc_stride + k] (+)= lane-wise x_r * v_k over `steps` logical vectors (the sums stay
// in registers for the whole panel). x: R float rows at the panel's first column; v: vector 0
// of the tile.
template <int R, int KT>
C10_NOINLINE void proj_tile(const float* const* x, const float* v, int64_t k_stride,
                            int64_t steps, V16* acc, int64_t acc_stride, bool first) {
  const float* xr[R];
  EMOKERN_UNROLL for (int r = 0; r < R; ++r) xr[r] = x[r];
  // One register part of the logical vectors at a time (kN > 1: AVX2, NEON): R x KT sums live,
  // not R x KT x kN. Each lane still takes its columns in order.
  EMOKERN_UNROLL for (int j = 0; j < kN; ++j) {
    Vec a[R][KT];
    EMOKERN_UNROLL for (int r = 0; r < R; ++r)
      EMOKERN_UNROLL for (int k = 0; k < KT; ++k) a[r][k] = first ? Vec(0.0f)
                                                                  : acc[r * acc_stride + k].v[j];
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t d = s * kLanes + j * kW;
      Vec xv[R];
      EMOKERN_UNROLL for (int r = 0; r < R; ++r) xv[r] = Vec::loadu(xr[r] + d);
      EMOKERN_UNROLL for (int k = 0; k < KT; ++k) {
        const Vec vv = Vec::loadu(v + k * k_stride + d);
        EMOKERN_UNROLL for (int r = 0; r < R; ++r) a[r][k] = fma1(xv[r], vv, a[r][k]);
      }
    }
    EMOKERN_UNROLL for (int r = 0; r < R; ++r)
      EMOKERN_UNROLL for (int k = 0; k < KT; ++k) acc[r * acc_stride + k].v[j] = a[r][k];
  }
}

template <int R, int KT>
void proj_tile_k(int kt, const float* const* x, const float* v, int64_t k_stride,
                 int64_t steps, V16* acc, int64_t acc_stride, bool first) {
  if constexpr (KT > 0) {
    if (kt == KT) {
      proj_tile<R, KT>(x, v, k_stride, steps, acc, acc_stride, first);
    } else {
      proj_tile_k<R, KT - 1>(kt, x, v, k_stride, steps, acc, acc_stride, first);
    }
  }
}

template <int R>
void proj_tile_rk(int rows, int kt, const float* const* x, const float* v, int64_t k_stride,
                  int64_t steps, V16* acc, int64_t acc_stride, bool first) {
  if constexpr (R > 0) {
    if (rows == R) {
      proj_tile_k<R, kTileVecs>(kt, x, v, k_stride, steps, acc, acc_stride, first);
    } else {
      proj_tile_rk<R - 1>(rows, kt, x, v, k_stride, steps, acc, acc_stride, first);
    }
  }
}

// dots[r * K + k] = <x_r, v_k> for rows r < n_rows (float rows of D16 floats, zero padded).
// Panel by panel: a tile of kTileVecs vectors stays in L1 while the row tiles walk the panel,
// each tile's sums in registers for the panel's width; acc holds them between panels.
inline void block_dots(const float* const* x, int n_rows, const VView& V, int64_t n_vec,
                       int64_t dim, V16* acc, float* dots) {
  const int64_t n_panels = (dim + V.width - 1) / V.width;
  for (int64_t p = 0; p < n_panels; ++p) {
    const int64_t c0 = p * V.width;
    const int64_t width = std::min(V.width, dim - c0);
    const int64_t steps = width / kLanes, tail = width % kLanes;
    const float* vp = V.panel(p);
    // Tiles of near-equal widths (32 = 6 + 6 + 5 + 5 + 5 + 5, not 6 x 5 + 2).
    const int64_t n_tiles = (n_vec + kTileVecs - 1) / kTileVecs;
    for (int64_t t = 0, k0 = 0; t < n_tiles; ++t) {
      const int kt = int(n_vec / n_tiles + (t < n_vec % n_tiles ? 1 : 0));
      for (int r0 = 0; r0 < n_rows; r0 += kTileRows) {
        const int rows = std::min(kTileRows, n_rows - r0);
        const float* xr[kTileRows];
        for (int r = 0; r < rows; ++r) xr[r] = x[r0 + r] + c0;
        proj_tile_rk<kTileRows>(rows, kt, xr, vp + k0 * V.k_stride, V.k_stride, steps,
                                acc + r0 * n_vec + k0, n_vec, p == 0);
      }
      k0 += kt;
    }
    if (tail > 0) {  // the last panel's partial logical vector (rows are zero padded)
      const int64_t d = steps * kLanes;
      for (int r = 0; r < n_rows; ++r) {
        const V16 xv = load16(x[r] + c0 + d);
        for (int64_t k = 0; k < n_vec; ++k) {
          V16& a = acc[r * n_vec + k];  // set by the tiles above, even with steps == 0
          a = fma16(xv, load16(vp + k * V.k_stride + d, tail), a);
        }
      }
    }
  }
  hsum16_all(acc, n_rows * n_vec, dots);
}

// out_r[c .. c + 16 CT) = sum_k w_r[k] v_k[c ..] (k in order) for R weight rows; v: vector 0
// at column c.
template <int R, int CT>
C10_NOINLINE void delta_tile(const float* const* w, const float* v, int64_t k_stride, int64_t n_vec,
                float* const* out) {
  V16 a[R][CT];
  EMOKERN_UNROLL for (int r = 0; r < R; ++r)
    EMOKERN_UNROLL for (int c = 0; c < CT; ++c) a[r][c] = zero16();
  const float* wr[R];
  EMOKERN_UNROLL for (int r = 0; r < R; ++r) wr[r] = w[r];
  for (int64_t k = 0; k < n_vec; ++k) {
    const float* vk = v + k * k_stride;
    Vec wk[R];
    EMOKERN_UNROLL for (int r = 0; r < R; ++r) wk[r] = Vec(wr[r][k]);
    EMOKERN_UNROLL for (int c = 0; c < CT; ++c)
      EMOKERN_UNROLL for (int j = 0; j < kN; ++j) {
        const Vec vv = Vec::loadu(vk + c * kLanes + j * kW);
        EMOKERN_UNROLL for (int r = 0; r < R; ++r) a[r][c].v[j] = fma1(wk[r], vv, a[r][c].v[j]);
      }
  }
  EMOKERN_UNROLL for (int r = 0; r < R; ++r)
    EMOKERN_UNROLL for (int c = 0; c < CT; ++c) store16(out[r] + c * kLanes, a[r][c]);
}

// The same for one logical vector of which only `tail` < 16 columns exist (16 are written).
inline void delta_tail(const float* const* w, int rows, const float* v, int64_t k_stride,
                       int64_t n_vec, int64_t tail, float* const* out) {
  for (int r = 0; r < rows; ++r) {
    V16 a = zero16();
    for (int64_t k = 0; k < n_vec; ++k)
      a = fma16(splat16(w[r][k]), load16(v + k * k_stride, tail), a);
    store16(out[r], a);
  }
}

template <int R>
void delta_rows_r(int rows, const float* const* w, const float* v, int64_t k_stride,
                  int64_t n_vec, int ct, float* const* out) {
  if constexpr (R > 0) {
    if (rows == R) {
      if (ct == kDeltaCols) {
        delta_tile<R, kDeltaCols>(w, v, k_stride, n_vec, out);
      } else {
        float* o[R];
        for (int c = 0; c < ct; ++c) {
          for (int r = 0; r < R; ++r) o[r] = out[r] + c * kLanes;
          delta_tile<R, 1>(w, v + c * kLanes, k_stride, n_vec, o);
        }
      }
    } else {
      delta_rows_r<R - 1>(rows, w, v, k_stride, n_vec, ct, out);
    }
  }
}

// out[r][0 .. D16) = sum_k w[r][k] v_k for r < n_rows (columns past D are zero). Column tiles
// outer, so that a tile of every vector stays in L1 while the row tiles use it.
inline void block_deltas(const float* const* w, int n_rows, const VView& V, int64_t n_vec,
                         int64_t dim, float* const* out) {
  const int64_t n_panels = (dim + V.width - 1) / V.width;
  for (int64_t p = 0; p < n_panels; ++p) {
    const int64_t c0 = p * V.width;
    const int64_t width = std::min(V.width, dim - c0);
    const int64_t full = width / kLanes, tail = width % kLanes;
    const float* vp = V.panel(p);
    for (int64_t c = 0; c < full; c += kDeltaCols) {
      const int ct = int(std::min<int64_t>(kDeltaCols, full - c));
      for (int r0 = 0; r0 < n_rows; r0 += kDeltaRows) {
        const int rows = std::min(kDeltaRows, n_rows - r0);
        float* o[kDeltaRows];
        for (int r = 0; r < rows; ++r) o[r] = out[r0 + r] + c0 + c * kLanes;
        delta_rows_r<kDeltaRows>(rows, w + r0, vp + c * kLanes, V.k_stride, n_vec, ct, o);
      }
    }
    if (tail > 0) {
      float* o[kBlock];
      for (int r0 = 0; r0 < n_rows; r0 += kBlock) {
        const int rows = std::min(kBlock, n_rows - r0);
        for (int r = 0; r < rows; ++r) o[r] = out[r0 + r] + c0 + full * kLanes;
        delta_tail(w + r0, rows, vp + full * kLanes, V.k_stride, n_vec, tail, o);
      }
    }
  }
}

// The steered value of 16 columns: y = x + delta, then (x + delta) * scale or minus the
// residual (one rounding when both).
template <bool NP, bool RES>
inline V16 steered16(const V16& x, const V16& delta, const V16& scale, const V16& res) {
  const V16 y = add16(x, delta);
  if constexpr (NP && RES) return fma16(y, scale, sub16(zero16(), res));
  if constexpr (NP) return mul16(y, scale);
  if constexpr (RES) return sub16(y, res);
  return y;
}

// Decode without norm preservation: the offsets never leave the registers. For R steered rows
// and CT logical vectors of columns: delta as in delta_tile, then hidden = x + delta (minus the
// residual) is written at once. x, h, res point at the tile's first column.
template <typename T, int R, int CT, bool RES>
C10_NOINLINE void delta_write_tile(const float* const* w, const float* v, int64_t k_stride,
                                   int64_t n_vec, const float* const* x, T* const* h,
                                   const T* const* res) {
  V16 a[R][CT];
  EMOKERN_UNROLL for (int r = 0; r < R; ++r)
    EMOKERN_UNROLL for (int c = 0; c < CT; ++c) a[r][c] = zero16();
  const float* wr[R];
  EMOKERN_UNROLL for (int r = 0; r < R; ++r) wr[r] = w[r];
  for (int64_t k = 0; k < n_vec; ++k) {
    const float* vk = v + k * k_stride;
    Vec wk[R];
    EMOKERN_UNROLL for (int r = 0; r < R; ++r) wk[r] = Vec(wr[r][k]);
    EMOKERN_UNROLL for (int c = 0; c < CT; ++c)
      EMOKERN_UNROLL for (int j = 0; j < kN; ++j) {
        const Vec vv = Vec::loadu(vk + c * kLanes + j * kW);
        EMOKERN_UNROLL for (int r = 0; r < R; ++r) a[r][c].v[j] = fma1(wk[r], vv, a[r][c].v[j]);
      }
  }
  const V16 none = zero16();
  EMOKERN_UNROLL for (int r = 0; r < R; ++r) {
    EMOKERN_UNROLL for (int c2 = 0; c2 < CT / 2; ++c2) {
      const int c = 2 * c2;
      V16 r0 = none, r1 = none;
      if constexpr (RES) load16x2(res[r] + c * kLanes, r0, r1);
      store16x2(h[r] + c * kLanes,
                steered16<false, RES>(load16(x[r] + c * kLanes), a[r][c], none, r0),
                steered16<false, RES>(load16(x[r] + (c + 1) * kLanes), a[r][c + 1], none, r1));
    }
    if constexpr (CT % 2 == 1) {
      constexpr int c = CT - 1;
      const V16 r0 = RES ? load16(res[r] + c * kLanes) : none;
      store16(h[r] + c * kLanes,
              steered16<false, RES>(load16(x[r] + c * kLanes), a[r][c], none, r0));
    }
  }
}

template <typename T, int R, bool RES>
void delta_write_rows(int ct, const float* const* w, const float* v, int64_t k_stride,
                      int64_t n_vec, const float* const* x, T* const* h, const T* const* res) {
  if (ct == kDeltaCols) {
    delta_write_tile<T, R, kDeltaCols, RES>(w, v, k_stride, n_vec, x, h, res);
    return;
  }
  const float* xc[R];
  T* hc[R];
  const T* rc[R];
  for (int c = 0; c < ct; ++c) {
    for (int r = 0; r < R; ++r) {
      xc[r] = x[r] + c * kLanes;
      hc[r] = h[r] + c * kLanes;
      rc[r] = RES ? res[r] + c * kLanes : nullptr;
    }
    delta_write_tile<T, R, 1, RES>(w, v + c * kLanes, k_stride, n_vec, xc, hc, rc);
  }
}

template <typename T, int R, bool RES>
void delta_write_r(int rows, int ct, const float* const* w, const float* v, int64_t k_stride,
                   int64_t n_vec, const float* const* x, T* const* h, const T* const* res) {
  if constexpr (R > 0) {
    if (rows == R) {
      delta_write_rows<T, R, RES>(ct, w, v, k_stride, n_vec, x, h, res);
    } else {
      delta_write_r<T, R - 1, RES>(rows, ct, w, v, k_stride, n_vec, x, h, res);
    }
  }
}

// hidden_r = x_r + sum_k w_r[k] v_k (- residual_r) for r < n_rows, panel by panel and column
// tile by column tile like block_deltas.
template <typename T, bool RES>
void block_delta_write(const float* const* w, int n_rows, const VView& V, int64_t n_vec,
                       int64_t dim, const float* const* x, T* const* h, const T* const* res) {
  const int64_t n_panels = (dim + V.width - 1) / V.width;
  for (int64_t p = 0; p < n_panels; ++p) {
    const int64_t c0 = p * V.width;
    const int64_t width = std::min(V.width, dim - c0);
    const int64_t full = width / kLanes, tail = width % kLanes;
    const float* vp = V.panel(p);
    for (int64_t c = 0; c < full; c += kDeltaCols) {
      const int ct = int(std::min<int64_t>(kDeltaCols, full - c));
      const int64_t col = c0 + c * kLanes;
      for (int r0 = 0; r0 < n_rows; r0 += kDeltaRows) {
        const int rows = std::min(kDeltaRows, n_rows - r0);
        const float* xr[kDeltaRows];
        T* hr[kDeltaRows];
        const T* rr[kDeltaRows];
        for (int r = 0; r < rows; ++r) {
          xr[r] = x[r0 + r] + col;
          hr[r] = h[r0 + r] + col;
          rr[r] = RES ? res[r0 + r] + col : nullptr;
        }
        delta_write_r<T, kDeltaRows, RES>(rows, ct, w + r0, vp + c * kLanes, V.k_stride,
                                          n_vec, xr, hr, rr);
      }
    }
    if (tail > 0) {
      const int64_t col = c0 + full * kLanes;
      for (int r = 0; r < n_rows; ++r) {
        __at_align__ float delta[kLanes];
        float* out[1] = {delta};
        delta_tail(w + r, 1, vp + full * kLanes, V.k_stride, n_vec, tail, out);
        const V16 rv = RES ? load16(res[r] + col, tail) : zero16();
        store16(h[r] + col,
                steered16<false, RES>(load16(x[r] + col, tail), load16(delta), zero16(), rv),
                tail);
      }
    }
  }
}

// Whether all n floats are finite (x - x is 0 for finite x, NaN otherwise).
inline bool all_finite(const float* p, int64_t n) {
  V16 acc = zero16();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const V16 x = load16(p + i);
    acc = add16(acc, sub16(x, x));
  }
  if (i < n) {
    const V16 x = load16(p + i, n - i);
    acc = add16(acc, sub16(x, x));
  }
  return hsum16(acc) == 0.0f;
}

// ||v_k||: the same lane order and tree as the dot products.
inline int64_t inv_norms(const float* vectors, int64_t n_vec, int64_t dim, float* inv_norm) {
  const int64_t steps = dim / kLanes, tail = dim % kLanes;
  constexpr int G = kNormGroup;  // independent sums in flight
  for (int64_t k0 = 0; k0 < n_vec; k0 += G) {
    const int n = int(std::min<int64_t>(G, n_vec - k0));
    const float* row[G];  // a short last group repeats its first vector (results unused)
    EMOKERN_UNROLL for (int i = 0; i < G; ++i) row[i] = vectors + (k0 + (i < n ? i : 0)) * dim;
    V16 a[G];
    EMOKERN_UNROLL for (int i = 0; i < G; ++i) a[i] = zero16();
    for (int64_t s = 0; s < steps; ++s)
      EMOKERN_UNROLL for (int i = 0; i < G; ++i) {
        const V16 x = load16(row[i] + s * kLanes);
        a[i] = fma16(x, x, a[i]);
      }
    if (tail > 0)
      for (int i = 0; i < G; ++i) {
        const V16 x = load16(row[i] + steps * kLanes, tail);
        a[i] = fma16(x, x, a[i]);
      }
    float ss[G];
    hsum16_many(a, G, ss);  // the tree of hsum16, on the group at once
    for (int i = 0; i < n; ++i) {
      const double norm = std::sqrt(double(ss[i]));
      if (!(std::isfinite(norm) && norm > 0.0)) return k0 + i;
      inv_norm[k0 + i] = static_cast<float>(1.0 / norm);
    }
  }
  return -1;
}

// ---------------------------------------------------------------------------------------------
// Row passes.

inline float norm_scale(const V16& xx, const V16& yy) {
  constexpr float kNormEps = 1e-6f;  // = emokern::kNormEps (steer.h)
  return std::sqrt(hsum16(xx)) / std::max(std::sqrt(hsum16(yy)), kNormEps);
}

// Writes a steered row from its float32 x (D16 floats, zero padded) and offset. Norm
// preserving: ||x||^2 and ||y||^2 first (a pass over L1/L2-resident data).
template <typename T, bool NP, bool RES>
void write_row(T* h, const T* res, const float* x, const float* delta, int64_t dim,
               const T* ahead) {
  V16 scale = splat16(1.0f);
  const int64_t steps = dim / kLanes, tail = dim % kLanes;
  if constexpr (NP) {
    V16 xx = zero16(), yy = zero16();
    for (int64_t s = 0; s <= steps; ++s) {  // the padded tail adds zeros
      if (s == steps && tail == 0) break;
      const V16 xv = load16(x + s * kLanes);
      const V16 yv = add16(xv, load16(delta + s * kLanes));
      xx = fma16(xv, xv, xx);
      yy = fma16(yv, yv, yy);
    }
    scale = splat16(norm_scale(xx, yy));
  }
  const V16 none = zero16();
  int64_t s = 0;
  for (; s + 2 <= steps; s += 2) {
    const int64_t d = s * kLanes;
    if (ahead != nullptr) __builtin_prefetch(ahead + d, 0, 2);
    const V16 y0 = steered16<NP, RES>(load16(x + d), load16(delta + d), scale,
                                      RES ? load16(res + d) : none);
    const V16 y1 = steered16<NP, RES>(load16(x + d + kLanes), load16(delta + d + kLanes), scale,
                                      RES ? load16(res + d + kLanes) : none);
    store16x2(h + d, y0, y1);
  }
  for (; s < steps; ++s) {
    const int64_t d = s * kLanes;
    store16(h + d, steered16<NP, RES>(load16(x + d), load16(delta + d), scale,
                                      RES ? load16(res + d) : none));
  }
  if (tail > 0) {
    const int64_t d = steps * kLanes;
    store16(h + d,
            steered16<NP, RES>(load16(x + d), load16(delta + d), scale,
                               RES ? load16(res + d, tail) : none),
            tail);
  }
}

// x = hidden (+ residual) as float32, D16 floats with a zero tail.
template <typename T>
void load_row(const T* h, const T* res, float* x, int64_t dim, const T* ahead) {
  const int64_t steps = dim / kLanes, tail = dim % kLanes;
  int64_t s = 0;
  for (; s + 2 <= steps; s += 2) {
    const int64_t d = s * kLanes;
    if (ahead != nullptr) __builtin_prefetch(ahead + d, 0, 2);
    V16 a, b;
    load16x2(h + d, a, b);
    if (res != nullptr) {
      V16 ra, rb;
      load16x2(res + d, ra, rb);
      a = add16(a, ra);
      b = add16(b, rb);
    }
    store16(x + d, a);
    store16(x + d + kLanes, b);
  }
  for (; s < steps; ++s) {
    const int64_t d = s * kLanes;
    V16 v = load16(h + d);
    if (res != nullptr) v = add16(v, load16(res + d));
    store16(x + d, v);
  }
  if (tail > 0) {
    const int64_t d = steps * kLanes;
    V16 v = load16(h + d, tail);
    if (res != nullptr) v = add16(v, load16(res + d, tail));
    store16(x + d, v);
  }
}

// Few vectors: RS rows at once, columns [c0, c1), each loaded once (converted in registers):
// every dot product accumulates (KB vectors, zero padded, 0 = none), and each steered row is
// written in the same pass, or, norm preserving, its ||x||^2 and ||y||^2 accumulate for a
// second pass (sweep_finish). SweepState carries the sums across column chunks.
struct SweepState {
  V16 a[kSweepRows][kSweepMaxK];
  V16 xx[kSweepRows], yy[kSweepRows];
};

// The rows of a sweep, known when it is compiled (RM, rows mode) or tested at every step:
// kRowsAny: residual and writes per row; kRowsWrite: no residual, every row written (the
// common prefill and decode); kRowsDots: no residual, nothing written (dot products only).
constexpr int kRowsAny = 0, kRowsWrite = 1, kRowsDots = 2;
#define EMOKERN_HAS_RES(r) (RM == kRowsAny && res[r] != nullptr)
#define EMOKERN_WRITES(r) (RM == kRowsAny ? delta[r] != nullptr : RM == kRowsWrite)

// One step of a sweep over 16 columns; FULL = false: the row's last n < 16 columns. Every
// loop has constant bounds and is unrolled, so the sums stay in registers.

// With DW (decode: every row its own slot), a row's offset is not read but accumulated here
// from its weights w[r] (KB of them, zero padded) and the vectors the step loads anyway: k in
// order, by fused multiply-add from zero, the arithmetic of delta_tile.
#define EMOKERN_SWEEP_STEP(FULL, d, n)                                                   \
  {                                                                                      \
    V16 x[RS], rv[RS], dl[RS];                                                           \
    EMOKERN_UNROLL for (int r = 0; r < RS; ++r) {                                        \
      x[r] = FULL ? load16(h[r] + (d)) : load16(h[r] + (d), n);                          \
      rv[r] = zero16();                                                                  \
      dl[r] = zero16();                                                                  \
      if (EMOKERN_HAS_RES(r)) {                                                          \
        rv[r] = FULL ? load16(res[r] + (d)) : load16(res[r] + (d), n);                   \
        x[r] = add16(x[r], rv[r]);                                                       \
      }                                                                                  \
    }                                                                                    \
    EMOKERN_UNROLL for (int k = 0; k < KB; ++k) {                                        \
      const V16 vv = FULL ? load16(v[k] + (d)) : load16(v[k] + (d), n);                  \
      EMOKERN_UNROLL for (int r = 0; r < RS; ++r) {                                      \
        a[r][k] = fma16(x[r], vv, a[r][k]);                                              \
        if constexpr (DW) dl[r] = fma16(splat16(w[r][k]), vv, dl[r]);                    \
      }                                                                                  \
    }                                                                                    \
    EMOKERN_UNROLL for (int r = 0; r < RS; ++r) {                                        \
      if (!EMOKERN_WRITES(r)) continue;                                                  \
      if constexpr (!DW) dl[r] = load16(delta[r] + (d)); /* offsets are D16 long */      \
      const V16 y = add16(x[r], dl[r]);                                                  \
      if constexpr (NP) {                                                                \
        xx[r] = fma16(x[r], x[r], xx[r]);                                                \
        yy[r] = fma16(y, y, yy[r]);                                                      \
      } else {                                                                           \
        const V16 out = EMOKERN_HAS_RES(r) ? sub16(y, rv[r]) : y;                        \
        if (FULL) {                                                                      \
          store16(h[r] + (d), out);                                                      \
        } else {                                                                         \
          store16(h[r] + (d), out, n);                                                   \
        }                                                                                \
      }                                                                                  \
    }                                                                                    \
  }

// Two logical vectors (32 columns) per step: whole 64-byte bf16/fp16 vectors, and the same
// per-lane order as two single steps.
#define EMOKERN_SWEEP_STEP2(d)                                                           \
  {                                                                                      \
    V16 x0[RS], x1[RS], r0[RS], r1[RS], d0[RS], d1[RS];                                  \
    EMOKERN_UNROLL for (int r = 0; r < RS; ++r) {                                        \
      if (ahead[r] != nullptr) __builtin_prefetch(ahead[r] + (d), 0, 2);                 \
      load16x2(h[r] + (d), x0[r], x1[r]);                                                \
      r0[r] = zero16();                                                                  \
      r1[r] = zero16();                                                                  \
      d0[r] = zero16();                                                                  \
      d1[r] = zero16();                                                                  \
      if (EMOKERN_HAS_RES(r)) {                                                          \
        load16x2(res[r] + (d), r0[r], r1[r]);                                            \
        x0[r] = add16(x0[r], r0[r]);                                                     \
        x1[r] = add16(x1[r], r1[r]);                                                     \
      }                                                                                  \
    }                                                                                    \
    EMOKERN_UNROLL for (int k = 0; k < KB; ++k) {                                        \
      const V16 v0 = load16(v[k] + (d)), v1 = load16(v[k] + (d) + kLanes);               \
      EMOKERN_UNROLL for (int r = 0; r < RS; ++r) {                                      \
        a[r][k] = fma16(x0[r], v0, a[r][k]);                                             \
        a[r][k] = fma16(x1[r], v1, a[r][k]);                                             \
        if constexpr (DW) {                                                              \
          const V16 wk = splat16(w[r][k]);                                               \
          d0[r] = fma16(wk, v0, d0[r]);                                                  \
          d1[r] = fma16(wk, v1, d1[r]);                                                  \
        }                                                                                \
      }                                                                                  \
    }                                                                                    \
    EMOKERN_UNROLL for (int r = 0; r < RS; ++r) {                                        \
      if (!EMOKERN_WRITES(r)) continue;                                                  \
      if constexpr (!DW) {                                                               \
        d0[r] = load16(delta[r] + (d));                                                  \
        d1[r] = load16(delta[r] + (d) + kLanes);                                         \
      }                                                                                  \
      const V16 y0 = add16(x0[r], d0[r]);                                                \
      const V16 y1 = add16(x1[r], d1[r]);                                                \
      if constexpr (NP) {                                                                \
        xx[r] = fma16(x0[r], x0[r], xx[r]);                                              \
        xx[r] = fma16(x1[r], x1[r], xx[r]);                                              \
        yy[r] = fma16(y0, y0, yy[r]);                                                    \
        yy[r] = fma16(y1, y1, yy[r]);                                                    \
      } else if (EMOKERN_HAS_RES(r)) {                                                   \
        store16x2(h[r] + (d), sub16(y0, r0[r]), sub16(y1, r1[r]));                       \
      } else {                                                                           \
        store16x2(h[r] + (d), y0, y1);                                                   \
      }                                                                                  \
    }                                                                                    \
  }

// The arguments of a sweep over RS rows: hidden (and residual) rows, offsets (null: the row is
// not steered; with DW any non-null value), KB vectors, weights per row (DW), the rows of the
// next block (prefetched).
template <typename T>
struct SweepRows {
  T* const* h;
  const T* const* res;
  const float* const* delta;
  const float* const* w;
  const T* const* ahead;
};

// The sweep's row pointers as locals (registers): read through rows, every store of a step
// (whose vector types may alias anything) would make the compiler read them again.
#define EMOKERN_SWEEP_LOCALS                                                             \
  T* h[RS];                                                                              \
  const T* res[RS];                                                                      \
  const float* delta[RS];                                                                \
  const float* const* w = rows.w;                                                        \
  EMOKERN_UNROLL for (int r = 0; r < RS; ++r) {                                          \
    h[r] = rows.h[r];                                                                    \
    res[r] = rows.res[r];                                                                \
    delta[r] = rows.delta[r];                                                            \
  }

// The last n < 16 columns of a sweep, on the sums in st (kept apart from the main loop so that
// its partial loads do not push the main loop's sums out of registers).
template <typename T, int RS, int KB, bool NP, bool DW>
C10_NOINLINE void sweep_tail(const SweepRows<T>& rows, const float* const* v, int64_t d,
                             int64_t n, SweepState& st) {
  constexpr int RM = kRowsAny;
  EMOKERN_SWEEP_LOCALS
  auto& a = st.a;
  auto& xx = st.xx;
  auto& yy = st.yy;
  EMOKERN_SWEEP_STEP(false, d, n)
}

template <typename T, int RS, int KB, bool NP, bool DW, int RM>
void sweep_rows(const SweepRows<T>& rows, const float* const* v, int64_t c0, int64_t c1,
                SweepState& st, bool first) {
  static_assert(!(DW && NP), "norm-preserving sweeps read their offsets twice: from memory");
  constexpr int NA = KB > 0 ? KB : 1;
  EMOKERN_SWEEP_LOCALS
  const T* ahead[RS];
  EMOKERN_UNROLL for (int r = 0; r < RS; ++r) ahead[r] = rows.ahead[r];
  V16 a[RS][NA], xx[RS], yy[RS];
  EMOKERN_UNROLL for (int r = 0; r < RS; ++r) {
    EMOKERN_UNROLL for (int k = 0; k < NA; ++k) a[r][k] = first ? zero16() : st.a[r][k];
    xx[r] = first ? zero16() : st.xx[r];
    yy[r] = first ? zero16() : st.yy[r];
  }
  int64_t d = c0;
  if constexpr (kN == 1) {  // with several registers per logical vector, one at a time
    for (; d + 2 * kLanes <= c1; d += 2 * kLanes) EMOKERN_SWEEP_STEP2(d)
  }
  for (; d + kLanes <= c1; d += kLanes) {
    if constexpr (kN > 1) {
      EMOKERN_UNROLL for (int r = 0; r < RS; ++r)
        if (ahead[r] != nullptr) __builtin_prefetch(ahead[r] + d, 0, 2);
    }
    EMOKERN_SWEEP_STEP(true, d, kLanes)
  }
  EMOKERN_UNROLL for (int r = 0; r < RS; ++r) {
    EMOKERN_UNROLL for (int k = 0; k < NA; ++k) st.a[r][k] = a[r][k];
    st.xx[r] = xx[r];
    st.yy[r] = yy[r];
  }
  if (d < c1) sweep_tail<T, RS, KB, NP, DW>(rows, v, d, c1 - d, st);
}

// The rows' mode, then the sweep compiled for it: with several registers per logical vector
// (AVX2, NEON) the two common modes have their own loops; on AVX-512 GCC kept the specialised
// loop's 16 sums on the stack (12% slower), so it takes the general loop only.
template <typename T, int RS, int KB, bool NP, bool DW>
void sweep(const SweepRows<T>& rows, const float* const* v, int64_t c0, int64_t c1,
           SweepState& st, bool first) {
  if constexpr (kN > 1) {
    bool res = false, all = true, none = true;
    for (int r = 0; r < RS; ++r) {
      res = res || rows.res[r] != nullptr;
      all = all && rows.delta[r] != nullptr;
      none = none && rows.delta[r] == nullptr;
    }
    if (!res && all) {
      sweep_rows<T, RS, KB, NP, DW, kRowsWrite>(rows, v, c0, c1, st, first);
      return;
    }
    if constexpr (KB == kLiveSweepMaxK && !NP && !DW) {  // sweep_halves' first pass
      if (!res && none) {
        sweep_rows<T, RS, KB, NP, DW, kRowsDots>(rows, v, c0, c1, st, first);
        return;
      }
    }
  }
  sweep_rows<T, RS, KB, NP, DW, kRowsAny>(rows, v, c0, c1, st, first);
}

// Register part j (columns j * kW .. of a logical vector) of 16 elements at p, as float32.
template <typename T>
inline Vec load_part(const T* p, int j) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p + j * kW);
#if defined(CPU_CAPABILITY_AVX2)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    Vec out;
    at::vec::load_fp32_from_bf16(p + j * kW, out);  // kW elements, converted
    return out;
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    Vec out;
    at::vec::load_fp32_from_fp16(p + j * kW, out);
    return out;
#endif
  } else {
    return load16(p).v[j];
  }
}

// Decode with offsets from the weights, where a logical vector takes several registers (kN > 1:
// NEON; AVX2 decode takes the tiles above four vectors) and KB of them do not fit: the dot
// products in kN passes over the column chunk, one register part each (KB sums live, not
// KB x kN), then one pass that builds the offsets and writes the steered row. The chunk is in
// L1 after the first pass; every lane sums its columns in the same order as everywhere.
template <typename T, int KB>
void sweep_split(const SweepRows<T>& rows, const float* const* v, int64_t c0, int64_t c1,
                 SweepState& st, bool first) {
  T* const h = rows.h[0];
  const T* const res = rows.res[0];
  const T* const ahead = rows.ahead[0];
  const int64_t full_end = c0 + (c1 - c0) / kLanes * kLanes;
  const int64_t n_tail = c1 - full_end;
  EMOKERN_UNROLL for (int j = 0; j < kN; ++j) {
    Vec a[KB];
    EMOKERN_UNROLL for (int k = 0; k < KB; ++k) a[k] = first ? Vec(0.0f) : st.a[0][k].v[j];
    for (int64_t d = c0; d < full_end; d += kLanes) {
      Vec x = load_part(h + d, j);
      if (res != nullptr) x = x + load_part(res + d, j);
      EMOKERN_UNROLL for (int k = 0; k < KB; ++k)
        a[k] = fma1(x, Vec::loadu(v[k] + d + j * kW), a[k]);
    }
    if (n_tail > 0) {
      V16 x = load16(h + full_end, n_tail);
      if (res != nullptr) x = add16(x, load16(res + full_end, n_tail));
      EMOKERN_UNROLL for (int k = 0; k < KB; ++k)
        a[k] = fma1(x.v[j], load16(v[k] + full_end, n_tail).v[j], a[k]);
    }
    EMOKERN_UNROLL for (int k = 0; k < KB; ++k) st.a[0][k].v[j] = a[k];
  }
  if (rows.delta[0] == nullptr) return;  // not steered: nothing to write
  const float* const w = rows.w[0];
  auto step = [&](int64_t d, int64_t n) EMOKERN_INLINE {
    const bool full = n == kLanes;
    V16 r = zero16();
    V16 x = full ? load16(h + d) : load16(h + d, n);
    if (res != nullptr) {
      r = full ? load16(res + d) : load16(res + d, n);
      x = add16(x, r);
    }
    V16 dl = zero16();
    EMOKERN_UNROLL for (int k = 0; k < KB; ++k)
      dl = fma16(splat16(w[k]), full ? load16(v[k] + d) : load16(v[k] + d, n), dl);
    const V16 y = add16(x, dl);
    const V16 out = res != nullptr ? sub16(y, r) : y;
    if (full) {
      store16(h + d, out);
    } else {
      store16(h + d, out, n);
    }
  };
  for (int64_t d = c0; d < full_end; d += kLanes) {
    if (ahead != nullptr) __builtin_prefetch(ahead + d, 0, 2);
    step(d, kLanes);
  }
  if (n_tail > 0) step(full_end, n_tail);
}

// kSweepMaxK = 2 kLiveSweepMaxK vectors with several registers per logical vector and offsets
// from memory (prefill): two sweeps with every sum live, the first over the first half of the
// vectors (dot products only), the second over the rest, writing. Against sweep_split's three
// passes (each dot product one register part at a time, then the writes) the row is read and
// converted twice instead of three times and the writes overlap the second half's dot
// products: AVX2, 4096 x 576 bf16 rows, eight vectors, 1 thread: 1130 -> 1090 us.
template <typename T, bool NP>
void sweep_halves(const SweepRows<T>& rows, const float* const* v, int64_t c0, int64_t c1,
                  SweepState& st, bool first) {
  constexpr int kHalf = kLiveSweepMaxK;
  static_assert(2 * kHalf == kSweepMaxK, "two halves");
  const float* const none[1] = {nullptr};
  const T* const no_rows[1] = {nullptr};
  SweepState rest;  // the second half's sums, and the norms
  if (!first) {
    EMOKERN_UNROLL for (int k = 0; k < kHalf; ++k) rest.a[0][k] = st.a[0][kHalf + k];
    rest.xx[0] = st.xx[0];
    rest.yy[0] = st.yy[0];
  }
  const SweepRows<T> dots_only{rows.h, rows.res, none, nullptr, rows.ahead};  // writes nothing
  sweep<T, 1, kHalf, false, false>(dots_only, v, c0, c1, st, first);
  const SweepRows<T> writes{rows.h, rows.res, rows.delta, nullptr, no_rows};
  sweep<T, 1, kHalf, NP, false>(writes, v + kHalf, c0, c1, rest, first);
  EMOKERN_UNROLL for (int k = 0; k < kHalf; ++k) st.a[0][kHalf + k] = rest.a[0][k];
  st.xx[0] = rest.xx[0];
  st.yy[0] = rest.yy[0];
}

// Sweep with KB in {0, 1, 2, 4, kSweepMaxK} vectors; NP norm preserving; DW offsets from the
// weights (decode, not norm preserving).
template <typename T, int RS>
void sweep_kb(int kb, bool np, bool dw, const SweepRows<T>& rows, const float* const* v,
              int64_t c0, int64_t c1, SweepState& st, bool first) {
#define EMOKERN_SWEEP_ONE(KB, NP, DW)                                                \
  if constexpr (kN == 1 || KB <= kLiveSweepMaxK) {                                   \
    sweep<T, RS, KB, NP, DW>(rows, v, c0, c1, st, first);                            \
  } else if constexpr (!DW) {                                                        \
    static_assert(RS == 1, "split sweeps take one row at a time");                   \
    sweep_halves<T, NP>(rows, v, c0, c1, st, first);                                 \
  } else {                                                                           \
    static_assert(RS == 1, "split sweeps take one row at a time");                   \
    sweep_split<T, KB>(rows, v, c0, c1, st, first);                                  \
  }
#define EMOKERN_SWEEP_CASE(KB)                                                       \
  if (np) {                                                                          \
    EMOKERN_SWEEP_ONE(KB, true, false)                                               \
  } else if (dw) {                                                                   \
    EMOKERN_SWEEP_ONE(KB, false, true)                                               \
  } else {                                                                           \
    EMOKERN_SWEEP_ONE(KB, false, false)                                              \
  }
  switch (kb) {
    case 0: EMOKERN_SWEEP_CASE(0) break;
    case 1: EMOKERN_SWEEP_CASE(1) break;
    case 2: EMOKERN_SWEEP_CASE(2) break;
    case 4: EMOKERN_SWEEP_CASE(4) break;
    default: EMOKERN_SWEEP_CASE(kSweepMaxK) break;
  }
#undef EMOKERN_SWEEP_CASE
#undef EMOKERN_SWEEP_ONE
}

template <typename T, bool RES>
void rescale_row(T* h, const T* res, const float* delta, int64_t dim, float scale_value) {
  const V16 scale = splat16(scale_value);
  const V16 none = zero16();
  const int64_t steps = dim / kLanes, tail = dim % kLanes;
  int64_t s = 0;
  for (; s + 2 <= steps; s += 2) {
    const int64_t d = s * kLanes;
    V16 x0, x1, r0 = none, r1 = none;
    load16x2(h + d, x0, x1);
    if constexpr (RES) {
      load16x2(res + d, r0, r1);
      x0 = add16(x0, r0);
      x1 = add16(x1, r1);
    }
    store16x2(h + d, steered16<true, RES>(x0, load16(delta + d), scale, r0),
              steered16<true, RES>(x1, load16(delta + d + kLanes), scale, r1));
  }
  for (; s < steps; ++s) {
    const int64_t d = s * kLanes;
    const V16 r = RES ? load16(res + d) : none;
    const V16 x = RES ? add16(load16(h + d), r) : load16(h + d);
    store16(h + d, steered16<true, RES>(x, load16(delta + d), scale, r));
  }
  if (tail > 0) {
    const int64_t d = steps * kLanes;
    const V16 r = RES ? load16(res + d, tail) : none;
    const V16 x = RES ? add16(load16(h + d, tail), r) : load16(h + d, tail);
    store16(h + d, steered16<true, RES>(x, load16(delta + d), scale, r), tail);
  }
}

// ---------------------------------------------------------------------------------------------
// The problem, blocks and chunks.

struct Plan {
  const Problem* P;
  VView V;
  const float* table;    // [S, D16] offsets per slot, or null (offsets per block)
  int64_t d16;
  int64_t row_stride;    // of float scratch rows: D16 plus a line, so rows D apart do not all
                         // fall into the same L1 sets
  bool need_proj;
  bool tiles;            // many vectors: register tiles instead of sweeps
  bool direct_stats;     // every row its own slot (batched decode): statistics updated in place
  int64_t chunk_rows;    // rows per chunk (running-sum partial boundaries)
  int64_t entry_cap;     // running-sum partials per chunk
  double* entry_sums;    // [n_chunks * entry_cap, K]
  float* entry_last;     // [n_chunks * entry_cap, K]
  int64_t* entry_meta;   // [n_chunks * entry_cap, 2] (slot, count); [n_chunks] used (tail)
  int64_t* entry_used;
};

template <typename T>
inline T* row_ptr(void* base, int64_t i, int64_t seq_len, int64_t sb, int64_t st) {
  return static_cast<T*>(base) + (i / seq_len) * sb + (i % seq_len) * st;
}
template <typename T>
inline const T* row_ptr(const void* base, int64_t i, int64_t seq_len, int64_t sb, int64_t st) {
  return static_cast<const T*>(base) + (i / seq_len) * sb + (i % seq_len) * st;
}

// One block of rows [i0, i0 + n): projections into proj[r], steered rows written.
template <typename T>
void process_block(const Plan& L, int64_t i0, int n, const int64_t* slot, float* const* proj,
                   Scratch& s) {
  const Problem& P = *L.P;
  const int64_t K = P.n_vec, D = P.dim;
  T* h[kBlock];
  const T* res[kBlock];
  const T* ahead[kBlock];
  const float* delta[kBlock];
  for (int r = 0; r < n; ++r) {
    const int64_t i = i0 + r;
    h[r] = row_ptr<T>(P.hidden, i, P.seq_len, P.stride_b, P.stride_t);
    res[r] = P.residual != nullptr
                 ? row_ptr<T>(P.residual, i, P.seq_len, P.res_stride_b, P.res_stride_t)
                 : nullptr;
    ahead[r] = i + kBlock < P.n_rows
                   ? row_ptr<T>(P.hidden, i + kBlock, P.seq_len, P.stride_b, P.stride_t)
                   : nullptr;
    delta[r] = nullptr;
  }
  // Offsets: from the table, or computed here once per distinct slot of the block (decode),
  // or, decode on the tiles without norm preservation, in registers while writing (below).
  const bool fused_write = L.table == nullptr && !P.norm_preserving;
  if (fused_write) {
    for (int r = 0; r < n; ++r)
      if (slot[r] >= 0) delta[r] = P.weights;  // only tested against null
  } else if (L.table != nullptr) {
    for (int r = 0; r < n; ++r)
      if (slot[r] >= 0) delta[r] = L.table + slot[r] * L.row_stride;
  } else {
    float* buf = s.deltas.take(size_t(kBlock * L.row_stride));
    const float* w[kBlock];
    float* out[kBlock];
    int64_t distinct[kBlock];
    int m = 0;
    for (int r = 0; r < n; ++r) {
      if (slot[r] < 0) continue;
      int j = 0;
      while (j < m && distinct[j] != slot[r]) ++j;
      if (j == m) {
        distinct[m] = slot[r];
        w[m] = P.weights + slot[r] * K;
        out[m] = buf + m * L.row_stride;
        ++m;
      }
      delta[r] = out[j];
    }
    if (m > 0) block_deltas(w, m, L.V, K, D, out);
  }

  if (!L.tiles) {
    // Decode without norm preservation: the offsets come from the weights inside the sweep.
    const bool dw = L.table == nullptr && !P.norm_preserving;
    int kb = !L.need_proj && !dw ? 0 : K <= 1 ? 1 : K <= 2 ? 2 : K <= 4 ? 4 : kSweepMaxK;
    const float* v[kSweepMaxK];
    if (kb > 0) {
      float* zeros = nullptr;
      if (kb > K) {
        zeros = s.zeros.take(size_t(L.d16));
        fill_n(zeros, L.d16, 0.0f);
      }
      for (int k = 0; k < kb; ++k) v[k] = k < K ? P.vectors + k * D : zeros;
    }
    float wpad[kBlock][kSweepMaxK];
    const float* w[kBlock];
    if (dw) {
      for (int r = 0; r < n; ++r) {
        w[r] = wpad[r];
        for (int k = 0; k < kb; ++k)
          wpad[r][k] = slot[r] >= 0 && k < K ? P.weights[slot[r] * K + k] : 0.0f;
      }
    }
    const int64_t chunk = kb * D * int64_t(sizeof(float)) <= kSweepL1Bytes ? D : kSweepChunk;
    SweepState state[kBlock / kSweepRows];
    for (int64_t c0 = 0; c0 < D; c0 += chunk) {
      const int64_t c1 = std::min(D, c0 + chunk);
      for (int r = 0; r < n; r += kSweepRows) {
        SweepState& st = state[r / kSweepRows];
        const SweepRows<T> rows{h + r, res + r, delta + r, dw ? w + r : nullptr, ahead + r};
        const bool np = P.norm_preserving, first = c0 == 0;
        if (r + kSweepRows <= n) {
          sweep_kb<T, kSweepRows>(kb, np, dw, rows, v, c0, c1, st, first);
        } else {  // the odd row of the block
          sweep_kb<T, 1>(kb, np, dw, rows, v, c0, c1, st, first);
        }
      }
    }
    for (int r = 0; r < n; r += kSweepRows) {
      const SweepState& st = state[r / kSweepRows];
      const int rows = std::min(kSweepRows, n - r);
      for (int q = 0; q < rows; ++q) {
        if (P.norm_preserving && delta[r + q] != nullptr) {
          const float scale = norm_scale(st.xx[q], st.yy[q]);
          if (res[r + q] != nullptr) {
            rescale_row<T, true>(h[r + q], res[r + q], delta[r + q], D, scale);
          } else {
            rescale_row<T, false>(h[r + q], nullptr, delta[r + q], D, scale);
          }
        }
        if (kb > 0 && L.need_proj) {
          float dots[kSweepMaxK];
          hsum16_many(st.a[q], kb, dots);
          mul_n(dots, P.inv_norm, proj[r + q], K);
        }
      }
    }
    return;
  }

  // Many vectors: float32 rows, tiles, then the writes.
  const float* x[kBlock];
  if (std::is_same_v<T, float> && P.residual == nullptr && D % kLanes == 0) {
    for (int r = 0; r < n; ++r) x[r] = reinterpret_cast<const float*>(h[r]);  // read in place
  } else {
    float* xbuf = s.rows.take(size_t(kBlock * L.row_stride));
    for (int r = 0; r < n; ++r) {
      float* row = xbuf + r * L.row_stride;
      load_row(h[r], res[r], row, D, ahead[r]);
      fill_n(row + D, L.d16 - D, 0.0f);
      x[r] = row;
    }
  }
  if (L.need_proj) {
    V16* acc = s.acc.take(size_t(kBlock * K));
    float* dots = s.dots.take(size_t(kBlock * K));
    block_dots(x, n, L.V, K, D, acc, dots);
    for (int r = 0; r < n; ++r) mul_n(dots + r * K, P.inv_norm, proj[r], K);
  }
  if (fused_write) {
    const float* w[kBlock];
    const float* xs[kBlock];
    T* hs[kBlock];
    const T* rs[kBlock];
    int m = 0;
    for (int r = 0; r < n; ++r) {
      if (slot[r] < 0) continue;
      w[m] = P.weights + slot[r] * K;
      xs[m] = x[r];
      hs[m] = h[r];
      rs[m++] = res[r];
    }
    if (m == 0) return;
    if (P.residual != nullptr) {
      block_delta_write<T, true>(w, m, L.V, K, D, xs, hs, rs);
    } else {
      block_delta_write<T, false>(w, m, L.V, K, D, xs, hs, rs);
    }
    return;
  }
  for (int r = 0; r < n; ++r) {
    if (delta[r] == nullptr) continue;
    const bool with_res = res[r] != nullptr;
    if (P.norm_preserving) {
      if (with_res) write_row<T, true, true>(h[r], res[r], x[r], delta[r], D, nullptr);
      else write_row<T, true, false>(h[r], nullptr, x[r], delta[r], D, nullptr);
    } else {
      if (with_res) write_row<T, false, true>(h[r], res[r], x[r], delta[r], D, nullptr);
      else write_row<T, false, false>(h[r], nullptr, x[r], delta[r], D, nullptr);
    }
  }
}

// Chunk c: rows [c * chunk_rows, ...), blocks of kBlock; each steered row's projections go to
// the chunk's partial of its slot (double sums in row order, count, newest row's values).
template <typename T>
void process_chunk(const Plan& L, int64_t c, Scratch& s) {
  const Problem& P = *L.P;
  const int64_t K = P.n_vec;
  const int64_t i_begin = c * L.chunk_rows;
  const int64_t i_end = std::min(P.n_rows, i_begin + L.chunk_rows);
  const bool running = P.run_sum != nullptr;
  int64_t used = 0;
  int64_t cached_slot = -1, cached_entry = -1;
  const int64_t e0 = c * L.entry_cap;
  for (int64_t i0 = i_begin; i0 < i_end; i0 += kBlock) {
    const int n = int(std::min<int64_t>(kBlock, i_end - i0));
    int64_t slot[kBlock];
    float* proj[kBlock];
    float* proj_buf = s.proj.take(size_t(kBlock * K));
    for (int r = 0; r < n; ++r) {
      slot[r] = P.slot(i0 + r);
      proj[r] = P.proj_out != nullptr ? P.proj_out + (i0 + r) * K : proj_buf + r * K;
    }
    process_block<T>(L, i0, n, slot, proj, s);
    if (!running) continue;
    if (L.direct_stats) {  // one row per slot: sum += float(double(p)) is sum += p
      for (int r = 0; r < n; ++r) {
        if (slot[r] < 0) continue;
        float* sum = P.run_sum + slot[r] * K;
        add_to_n(sum, proj[r], K);
        std::memcpy(P.run_last + slot[r] * K, proj[r], sizeof(float) * size_t(K));
        P.run_count[slot[r]] += 1;
      }
      continue;
    }
    for (int r = 0; r < n; ++r) {
      if (slot[r] < 0) continue;
      int64_t e = slot[r] == cached_slot ? cached_entry : -1;
      if (e < 0) {
        for (int64_t j = 0; j < used; ++j)
          if (L.entry_meta[2 * (e0 + j)] == slot[r]) {
            e = e0 + j;
            break;
          }
        if (e < 0) {
          e = e0 + used++;
          L.entry_meta[2 * e] = slot[r];
          L.entry_meta[2 * e + 1] = 0;
          fill_n(L.entry_sums + e * K, K, 0.0);
        }
        cached_slot = slot[r];
        cached_entry = e;
      }
      double* sums = L.entry_sums + e * K;
      for (int64_t k = 0; k < K; ++k) sums[k] += proj[r][k];
      std::memcpy(L.entry_last + e * K, proj[r], sizeof(float) * size_t(K));
      L.entry_meta[2 * e + 1] += 1;
    }
  }
  if (running && !L.direct_stats) L.entry_used[c] = used;
}

template <typename T>
void run(const Problem& P) {
  const int64_t K = P.n_vec, D = P.dim, N = P.n_rows;
  Scratch& s = thread_scratch();
  Plan L{};
  L.P = &P;
  L.d16 = round16(D);
  L.row_stride = L.d16 + kLanes;
  L.need_proj = P.proj_out != nullptr || P.run_sum != nullptr;
  const int64_t panel = panel_width(D);
  L.V = VView{P.vectors, panel, panel, D};

  // Work units: chunks of rows; their size fixes the partial sums, so it depends on the shape
  // only (never on the thread count).
  const bool running = P.run_sum != nullptr;
  L.direct_stats = P.token_slot == nullptr && P.seq_len == 1;
  const int chunk_unit = running && !L.direct_stats ? kStatsRows : kBlock;
  L.chunk_rows = N <= 256 ? chunk_unit : 4 * chunk_unit;
  const int64_t n_chunks = (N + L.chunk_rows - 1) / L.chunk_rows;
  const int64_t work_per_chunk = L.chunk_rows * D * (2 * K + 2);
  const int64_t grain = grain_for(work_per_chunk);

  // Offsets once per slot when slots average two rows or more (sequences in prefill).
  const bool per_slot = P.token_slot == nullptr ? P.seq_len >= 2 : N >= 2 * P.n_slots;
  // Many vectors take the tiles where the rows need their dot products or build their offsets
  // from the weights (decode without norm preservation); else the sweeps only write
  // x + delta from the offsets computed up front. Rows with offsets from the table (prefill)
  // sweep up to kSweepMaxK vectors, decode rows up to kDecodeTilesAboveK.
  L.tiles = K > (per_slot ? kSweepMaxK : kDecodeTilesAboveK) &&
            (L.need_proj || (!per_slot && !P.norm_preserving));

  // Pack the vectors panel-major when enough rows share them: each panel of every vector is
  // then one contiguous block (no L1 set conflicts between vectors D floats apart). Decode
  // reads them in place where that is as good: rows of whole 64-byte lines, not a multiple of
  // 1 KiB apart (the copy, rewritten at every call, costs more than it saves there).
  const int64_t n_panels = (D + panel - 1) / panel;
  const bool lines_apart = reinterpret_cast<uintptr_t>(P.vectors) % 64 == 0 && D % kLanes == 0 &&
                           D * int64_t(sizeof(float)) % 1024 != 0;
  const bool pack_tiles = L.tiles && N >= kPackMinRows && (per_slot || !lines_apart);
  // A line of padding per vector: panels of vectors 2 KiB apart would share L1 sets.
  const int64_t k_stride = panel + kLanes;
  auto pack = [&](float* packed, int64_t p_begin, int64_t p_end) {
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int64_t c0 = p * panel, width = std::min(panel, D - c0);
      for (int64_t k = 0; k < K; ++k) {
        float* dst = packed + (p * K + k) * k_stride;
        std::memcpy(dst, P.vectors + k * D + c0, sizeof(float) * size_t(width));
        fill_n(dst + width, k_stride - width, 0.0f);
      }
    }
    return VView{packed, panel, K * k_stride, k_stride};
  };
  // Prefill packs once, for the offset table and every row; decode packs on each thread, inside
  // the parallel loop, into that thread's scratch: a core reading a copy another core has just
  // written pulls every line across (64 rows x 2048 x 32 on 2 threads: 97 -> 75 us).
  const bool pack_per_thread = pack_tiles && !per_slot;
  if (per_slot && (pack_tiles || P.n_slots >= kPackMinRows)) {
    float* packed = s.packed.take(size_t(n_panels * K * k_stride));
    at::parallel_for(0, n_panels, std::max<int64_t>(1, (1 << 16) / (K * panel)),
                     [&](int64_t begin, int64_t end) { pack(packed, begin, end); });
    L.V = VView{packed, panel, K * k_stride, k_stride};
  }

  if (per_slot) {
    const int64_t S = P.n_slots;
    float* table = s.table.take(size_t(S * L.row_stride));
    const int64_t tile = kBlock;
    at::parallel_for(0, (S + tile - 1) / tile, grain_for(tile * K * D),
                     [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t s0 = b * tile;
        const int rows = int(std::min<int64_t>(tile, S - s0));
        const float* w[kBlock];
        float* out[kBlock];
        for (int r = 0; r < rows; ++r) {
          w[r] = P.weights + (s0 + r) * K;
          out[r] = table + (s0 + r) * L.row_stride;
        }
        block_deltas(w, rows, L.V, K, D, out);
      }
    });
    L.table = table;
  }

  if (running && !L.direct_stats) {
    L.entry_cap = std::min<int64_t>(L.chunk_rows, P.n_slots);
    if (P.token_slot == nullptr)  // a chunk spans at most this many sequences
      L.entry_cap = std::min<int64_t>(L.entry_cap, (L.chunk_rows - 1) / P.seq_len + 2);
    const int64_t n_entries = n_chunks * L.entry_cap;
    L.entry_sums = s.entry_sums.take(size_t(n_entries * K));
    L.entry_last = s.entry_last.take(size_t(n_entries * K));
    int64_t* meta = s.entry_meta.take(size_t(2 * n_entries + n_chunks));
    L.entry_meta = meta;
    L.entry_used = meta + 2 * n_entries;
  }

  at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
    Scratch& ts = thread_scratch();
    Plan local = L;
    if (pack_per_thread)
      local.V = pack(ts.packed.take(size_t(n_panels * K * k_stride)), 0, n_panels);
    for (int64_t c = begin; c < end; ++c) process_chunk<T>(local, c, ts);
  });

  if (!running || L.direct_stats) return;
  // Ordered reduction: chunks in order, so every sum has one association.
  const int64_t S = P.n_slots;
  double* sums = s.slot_sums.take(size_t(S * K));
  int64_t* meta = s.slot_meta.take(size_t(2 * S));  // [count, newest entry + 1]
  fill_n(meta, 2 * S, int64_t(0));
  for (int64_t c = 0; c < n_chunks; ++c) {
    for (int64_t j = 0; j < L.entry_used[c]; ++j) {
      const int64_t e = c * L.entry_cap + j;
      const int64_t slot = L.entry_meta[2 * e];
      double* acc = sums + slot * K;
      if (meta[2 * slot] == 0) fill_n(acc, K, 0.0);
      for (int64_t k = 0; k < K; ++k) acc[k] += L.entry_sums[e * K + k];
      meta[2 * slot] += L.entry_meta[2 * e + 1];
      meta[2 * slot + 1] = e + 1;
    }
  }
  for (int64_t slot = 0; slot < S; ++slot) {
    if (meta[2 * slot] == 0) continue;
    float* sum = P.run_sum + slot * K;
    for (int64_t k = 0; k < K; ++k) sum[k] += static_cast<float>(sums[slot * K + k]);
    P.run_count[slot] += meta[2 * slot];
    std::memcpy(P.run_last + slot * K, L.entry_last + (meta[2 * slot + 1] - 1) * K,
                sizeof(float) * size_t(K));
  }
}

inline void steer(const Problem& P) {
  switch (P.dtype) {
    case Dtype::kFloat32: run<float>(P); break;
    case Dtype::kBFloat16: run<c10::BFloat16>(P); break;
    case Dtype::kFloat16: run<c10::Half>(P); break;
  }
}

inline const KernelTable& kernel_table() {
  static const KernelTable table{EMOKERN_ISA_NAME, &steer, &inv_norms, &all_finite};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace emokern

#undef EMOKERN_SWEEP_STEP
#undef EMOKERN_HAS_RES
#undef EMOKERN_WRITES
#undef EMOKERN_SWEEP_STEP2
#undef EMOKERN_UNROLL
#undef EMOKERN_INLINE
