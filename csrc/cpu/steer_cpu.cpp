// Fused CPU kernel of emokern::steer_ (semantics: DESIGN.md §2, oracle: ref_steer_).
//
// One read and one write of every hidden row from memory. Per call:
//   1. data checks before anything is written: weights finite, every ||v_k|| finite and > 0
//      (the norms are needed anyway for the projections);
//   2. steering offsets delta_b = sum_k w[b,k] v_k: when sequences have several rows (T >= 2)
//      once per sequence into a scratch [B, D]; in decode (T == 1) per block of 4 rows, where
//      each row is its own sequence;
//   3. rows in blocks of up to 4: all K dot products <x_r, v_k> in register tiles of
//      4 rows x 4 vectors (every vector load feeds 4 FMAs, every row load 4), walking D in
//      chunks that keep the rows and the vector slices in L1; then each masked row is written
//      once: y = x + delta (norm-preserving: ||x||^2 and ||y||^2 from one more sweep over the
//      row while it is still in L1, the exact way rather than through the Gram matrix);
//   4. running statistics over masked rows, reduced deterministically (below).
//
// Determinism: every number a row produces depends only on that row and the call's shape,
// never on the thread count or on which block the row landed in (each dot product
// accumulates lane-wise over D in the same order for every tile shape, so results are even
// batch-invariant). Running sums use fixed chunks of kChunkRows rows per sequence, summed in
// double within a chunk and reduced over chunks in order after the parallel loop - no atomics.
//
// bf16/fp16 rows are converted to float32 in a per-thread scratch (L1-resident), computed in
// float32, and rounded to nearest-even on the store, bit-compatible with c10's conversions.

#include "../steer.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

// EMOKERN_PORTABLE_SIMD forces the portable path (its tests build it on AVX-512 machines).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    !defined(EMOKERN_PORTABLE_SIMD)
#define EMOKERN_AVX512 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace emokern {
namespace {

// ---------------------------------------------------------------------------------------------
// A minimal SIMD layer: AVX-512 intrinsics where available (the machines this is tuned on),
// else fixed-width lane arrays that -O3 -march=native vectorises for the host (AVX2, NEON).
// The kernels below are written once against it.
namespace simd {

#ifdef EMOKERN_AVX512
constexpr int64_t L = 16;
using vf = __m512;

inline vf zero() { return _mm512_setzero_ps(); }
inline vf set1(float a) { return _mm512_set1_ps(a); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline float sum(vf a) { return _mm512_reduce_add_ps(a); }

// Lane of f (sum16) holding the sum of v[i].
constexpr int kSum16Lane[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

// out[i] = sum of the lanes of a[i], i < n <= 16, through a transpose network: 15 adds and
// 31 shuffles for 16 sums instead of 16 separate reductions. Every a[i] goes through the same
// addition tree whatever its slot or n (padding slots are zero), so results do not depend on
// how accumulators were grouped.
inline void sum16(const vf* a, int n, float* out) {
  vf v[16];
  for (int i = 0; i < 16; ++i) v[i] = i < n ? a[i] : _mm512_setzero_ps();
  vf c[8], d[4], e[2];
  // c[i] = [8 partials of v[2i] | of v[2i+1]]; d[i], 128-bit block j: 4 partials of v[4i+j];
  // e[i], block j: 2 partials of v[8i+j], of v[8i+4+j]; f, block j: v[j], v[4+j], v[8+j], v[12+j].
  for (int i = 0; i < 8; ++i)  // lanes l and l + 8
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
  for (int i = 0; i < 4; ++i)  // lanes l and l + 4
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
  for (int i = 0; i < 2; ++i)  // lanes l and l + 2
    e[i] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0xee));
  const vf f = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88),  // lanes l and l + 1
                             _mm512_shuffle_ps(e[0], e[1], 0xdd));
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, f);
  for (int i = 0; i < n; ++i) out[i] = tmp[kSum16Lane[i]];
}
inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline vf load(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline void store(float* p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, tail_mask(n), v); }

inline vf bf16_bits_to_float(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
// Round to nearest even, like c10::BFloat16(float). AVX512-BF16 does it in one instruction
// (which also flushes fp32 denormals, below 1.2e-38, to zero); else integer arithmetic with
// NaN -> 0x7fc0, bit-identical to c10.
inline __m256i float_to_bf16_bits(vf v) {
#ifdef __AVX512BF16__
  return (__m256i)_mm512_cvtneps_pbh(v);
#endif
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  r = _mm512_srli_epi32(r, 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r,
                              _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}
inline vf load(const c10::BFloat16* p) {
  return bf16_bits_to_float(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vf load(const c10::BFloat16* p, int64_t n) {
  return bf16_bits_to_float(_mm256_maskz_loadu_epi16(tail_mask(n), p));
}
inline void store(c10::BFloat16* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), float_to_bf16_bits(v));
}
inline void store(c10::BFloat16* p, vf v, int64_t n) {
  _mm256_mask_storeu_epi16(p, tail_mask(n), float_to_bf16_bits(v));
}

constexpr int kHalfRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
inline vf load(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vf load(const c10::Half* p, int64_t n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail_mask(n), p));
}
inline void store(c10::Half* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, kHalfRound));
}
inline void store(c10::Half* p, vf v, int64_t n) {
  _mm256_mask_storeu_epi16(p, tail_mask(n), _mm512_cvtps_ph(v, kHalfRound));
}

#else  // portable lanes

constexpr int64_t L = 8;
struct vf {
  float v[L];
};

inline vf zero() { return vf{}; }
inline vf set1(float a) {
  vf r;
  for (int64_t i = 0; i < L; ++i) r.v[i] = a;
  return r;
}
#define EMOKERN_LANEWISE(name, expr)              \
  inline vf name(vf a, vf b) {                    \
    vf r;                                         \
    for (int64_t i = 0; i < L; ++i) r.v[i] = expr; \
    return r;                                     \
  }
EMOKERN_LANEWISE(add, a.v[i] + b.v[i])
EMOKERN_LANEWISE(sub, a.v[i] - b.v[i])
EMOKERN_LANEWISE(mul, a.v[i] * b.v[i])
#undef EMOKERN_LANEWISE
inline vf fma(vf a, vf b, vf c) {
  vf r;
  for (int64_t i = 0; i < L; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return r;
}
inline float sum(vf a) {
  // Pairwise, a fixed order.
  for (int64_t w = L / 2; w >= 1; w /= 2)
    for (int64_t i = 0; i < w; ++i) a.v[i] += a.v[i + w];
  return a.v[0];
}
inline void sum16(const vf* a, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = sum(a[i]);
}
template <typename T>
inline vf load(const T* p, int64_t n = L) {
  vf r{};
  for (int64_t i = 0; i < n; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
}
template <typename T>
inline void store(T* p, vf v, int64_t n = L) {
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(v.v[i]);
}

#endif

}  // namespace simd

using simd::L;
using simd::vf;

// Columns of D per pass of the dot tiles: a tile's rows (4 x 2 KiB) stay in L1 while every
// k-tile walks them and streams its vector slices through.
constexpr int64_t kDimChunk = 512;
// Rows per work unit of a sequence (T >= 2); fixes the boundaries of the running-sum partials.
constexpr int64_t kChunkRows = 32;
// Rows per block: the row dimension of the register tiles.
constexpr int kRowBlock = 8;
// Rows of the dot-product register tiles (a block runs them in halves).
constexpr int kDotRows = 4;
// Below this much work (multiply-adds) per thread, waking a second thread costs more than it
// saves, so small decode calls stay on the calling thread.
constexpr int64_t kMinWorkPerThread = 1 << 18;

// ---------------------------------------------------------------------------------------------
// Row kernels (float32 rows).

// acc[r*K + k] += lane-wise products of rows x[r] and vectors V[k] over columns [d0, d1),
// for the KB vectors starting at k0. One accumulator per (row, vector); lanes accumulate in
// column order, whatever R and KB are.
template <int R, int KB>
inline void dot_tile(const float* const* x, const float* vectors, int64_t dim, int64_t d0,
                     int64_t d1, int64_t k0, int64_t n_vec, vf* acc, bool first) {
  vf a[R][KB];
  for (int r = 0; r < R; ++r)
    for (int kk = 0; kk < KB; ++kk) a[r][kk] = first ? simd::zero() : acc[r * n_vec + k0 + kk];
  const float* v = vectors + k0 * dim;
  int64_t d = d0;
  for (; d + L <= d1; d += L) {
    vf xv[R];
    for (int r = 0; r < R; ++r) xv[r] = simd::load(x[r] + d);
    for (int kk = 0; kk < KB; ++kk) {
      const vf vv = simd::load(v + kk * dim + d);
      for (int r = 0; r < R; ++r) a[r][kk] = simd::fma(xv[r], vv, a[r][kk]);
    }
  }
  if (d < d1) {
    const int64_t n = d1 - d;
    vf xv[R];
    for (int r = 0; r < R; ++r) xv[r] = simd::load(x[r] + d, n);
    for (int kk = 0; kk < KB; ++kk) {
      const vf vv = simd::load(v + kk * dim + d, n);
      for (int r = 0; r < R; ++r) a[r][kk] = simd::fma(xv[r], vv, a[r][kk]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int kk = 0; kk < KB; ++kk) acc[r * n_vec + k0 + kk] = a[r][kk];
}

template <int R, int KB>
inline void dot_tile_rest(int64_t rest, const float* const* x, const float* vectors, int64_t dim,
                          int64_t d0, int64_t d1, int64_t k0, int64_t n_vec, vf* acc,
                          bool first) {
  if constexpr (KB > 0) {
    if (rest == KB) {
      dot_tile<R, KB>(x, vectors, dim, d0, d1, k0, n_vec, acc, first);
    } else {
      dot_tile_rest<R, KB - 1>(rest, x, vectors, dim, d0, d1, k0, n_vec, acc, first);
    }
  }
}

// out[r*K + k] = <x[r], V[k]> for R rows. acc: scratch of R*K vectors.
template <int R>
void dot_rows(const float* const* x, const float* vectors, int64_t dim, int64_t n_vec,
              vf* acc, float* out) {
  // At least 8 independent accumulator chains hide the FMA latency; at most 16 accumulators
  // fit the registers with the rows' loads.
  constexpr int KB = R == 1 ? 8 : 4;
  for (int64_t d0 = 0; d0 < dim; d0 += kDimChunk) {
    const int64_t d1 = std::min(dim, d0 + kDimChunk);
    const bool first = d0 == 0;
    int64_t k0 = 0;
    for (; k0 + KB <= n_vec; k0 += KB)
      dot_tile<R, KB>(x, vectors, dim, d0, d1, k0, n_vec, acc, first);
    if (k0 < n_vec)
      dot_tile_rest<R, KB - 1>(n_vec - k0, x, vectors, dim, d0, d1, k0, n_vec, acc, first);
  }
  for (int64_t i = 0; i < R * n_vec; i += 16)
    simd::sum16(acc + i, int(std::min<int64_t>(16, R * n_vec - i)), out + i);
}

// out[r] = sum_k w[r][k] V[k] (k in order) for R weight rows. Register tile of R rows x DV
// column vectors (at least 8 independent sums to hide the FMA latency): each vector load
// feeds R rows and the sums stay in registers over k.
template <int R>
void delta_rows(const float* const* w, const float* vectors, int64_t dim, int64_t n_vec,
                float* const* out) {
  constexpr int DV = R >= 4 ? 2 : (R >= 2 ? 4 : 8);
  int64_t d = 0;
  for (; d + DV * L <= dim; d += DV * L) {
    vf a[R][DV];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < DV; ++j) a[r][j] = simd::zero();
    const float* v = vectors + d;
    for (int64_t k = 0; k < n_vec; ++k, v += dim) {
      vf vv[DV];
      for (int j = 0; j < DV; ++j) vv[j] = simd::load(v + j * L);
      for (int r = 0; r < R; ++r) {
        const vf wr = simd::set1(w[r][k]);
        for (int j = 0; j < DV; ++j) a[r][j] = simd::fma(wr, vv[j], a[r][j]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < DV; ++j) simd::store(out[r] + d + j * L, a[r][j]);
  }
  for (; d < dim; d += L) {
    const int64_t n = std::min(L, dim - d);
    vf a[R];
    for (int r = 0; r < R; ++r) a[r] = simd::zero();
    for (int64_t k = 0; k < n_vec; ++k) {
      const vf v = simd::load(vectors + k * dim + d, n);
      for (int r = 0; r < R; ++r) a[r] = simd::fma(simd::set1(w[r][k]), v, a[r]);
    }
    for (int r = 0; r < R; ++r) simd::store(out[r] + d, a[r], n);
  }
}

// ss[r] = ||V[r]||^2 for R vectors at once (independent chains).
template <int R>
void sumsq_rows(const float* const* v, int64_t dim, double* ss) {
  vf a[R];
  for (int r = 0; r < R; ++r) a[r] = simd::zero();
  int64_t d = 0;
  for (; d + L <= dim; d += L)
    for (int r = 0; r < R; ++r) {
      const vf x = simd::load(v[r] + d);
      a[r] = simd::fma(x, x, a[r]);
    }
  if (d < dim)
    for (int r = 0; r < R; ++r) {
      const vf x = simd::load(v[r] + d, dim - d);
      a[r] = simd::fma(x, x, a[r]);
    }
  for (int r = 0; r < R; ++r) ss[r] = simd::sum(a[r]);
}

// Writes the steered row: out = x + delta, or rescaled to ||x|| when norm preserving.
// out may alias x (float32 rows are steered in place). ahead: a row to prefetch meanwhile.
template <typename T>
void steer_row(const float* x, const float* delta, T* out, int64_t dim, bool norm_preserving,
               const T* ahead) {
  if (ahead == nullptr) ahead = out;
  float scale = 1.0f;
  if (norm_preserving) {
    vf xx0 = simd::zero(), xx1 = simd::zero(), yy0 = simd::zero(), yy1 = simd::zero();
    int64_t d = 0;
    for (; d + 2 * L <= dim; d += 2 * L) {
      const vf x0 = simd::load(x + d), x1 = simd::load(x + d + L);
      const vf y0 = simd::add(x0, simd::load(delta + d));
      const vf y1 = simd::add(x1, simd::load(delta + d + L));
      xx0 = simd::fma(x0, x0, xx0);
      xx1 = simd::fma(x1, x1, xx1);
      yy0 = simd::fma(y0, y0, yy0);
      yy1 = simd::fma(y1, y1, yy1);
    }
    for (; d < dim; d += L) {
      const int64_t n = std::min(L, dim - d);
      const vf x0 = simd::load(x + d, n);
      const vf y0 = simd::add(x0, simd::load(delta + d, n));
      xx0 = simd::fma(x0, x0, xx0);
      yy0 = simd::fma(y0, y0, yy0);
    }
    const float norm_x = std::sqrt(simd::sum(simd::add(xx0, xx1)));
    const float norm_y = std::sqrt(simd::sum(simd::add(yy0, yy1)));
    scale = norm_x / std::max(norm_y, kNormEps);
  }
  const vf s = simd::set1(scale);
  int64_t d = 0;
  if (norm_preserving) {
    for (; d + L <= dim; d += L) {
      __builtin_prefetch(ahead + d, 0, 2);
      simd::store(out + d, simd::mul(simd::add(simd::load(x + d), simd::load(delta + d)), s));
    }
  } else {
    for (; d + L <= dim; d += L) {
      __builtin_prefetch(ahead + d, 0, 2);
      simd::store(out + d, simd::add(simd::load(x + d), simd::load(delta + d)));
    }
  }
  if (d < dim) {
    const int64_t n = dim - d;
    vf y = simd::add(simd::load(x + d, n), simd::load(delta + d, n));
    if (norm_preserving) y = simd::mul(y, s);
    simd::store(out + d, y, n);
  }
}

template <typename T>
void load_row(const T* src, float* dst, int64_t dim, const T* ahead) {
  if (ahead == nullptr) ahead = src;
  int64_t d = 0;
  for (; d + L <= dim; d += L) {
    __builtin_prefetch(ahead + d, 0, 2);
    simd::store(dst + d, simd::load(src + d));
  }
  if (d < dim) simd::store(dst + d, simd::load(src + d, dim - d), dim - d);
}

// Few vectors (K <= 8): up to two rows in a single sweep. Each row is loaded once (converted
// in registers), all its dot products accumulate (the same lane order as dot_tile), and
// y = x + delta is written in the same pass. Norm preserving needs ||y|| before the first
// write, so that case accumulates ||x||^2 and ||y||^2 instead and writes in a second pass
// over the row, now in cache (sweep_finish). KB = number of vectors (padded with a zero row),
// 0 = no dots. When K x D does not fit L1, a block's row pairs sweep column chunks in turn, so
// each chunk of the vectors is loaded once per block; SweepState carries the sums across.
constexpr int kSweepMaxK = 8;

struct SweepState {
  vf a[2][kSweepMaxK];
  vf xx[2], yy[2];
};

template <typename T, int KB, bool NP>
void sweep_rows(T* const* rows, int n_rows, const float* const* delta, const float* const* v,
                const T* const* ahead, int64_t c0, int64_t c1, SweepState& st, bool first) {
  constexpr int NA = KB > 0 ? KB : 1;
  T* const r0 = rows[0];
  T* const r1 = n_rows > 1 ? rows[1] : rows[0];
  // The rows the next block will sweep, fetched a line per step while this one computes:
  // memory traffic overlaps the arithmetic instead of stalling the next block's first loads.
  const T* const next0 = ahead[0] != nullptr ? ahead[0] : r0;
  const T* const next1 = n_rows > 1 && ahead[1] != nullptr ? ahead[1] : next0;
  const float* const d0 = delta[0];
  const float* const d1 = n_rows > 1 ? delta[1] : nullptr;
  vf a0[NA], a1[NA];
  for (int k = 0; k < NA; ++k) {
    a0[k] = first ? simd::zero() : st.a[0][k];
    a1[k] = first ? simd::zero() : st.a[1][k];
  }
  vf xx0 = first ? simd::zero() : st.xx[0], yy0 = first ? simd::zero() : st.yy[0];
  vf xx1 = first ? simd::zero() : st.xx[1], yy1 = first ? simd::zero() : st.yy[1];
  auto step = [&](int64_t d, int64_t n) {
    __builtin_prefetch(next0 + d, 0, 2);
    __builtin_prefetch(next1 + d, 0, 2);
    const vf x0 = simd::load(r0 + d, n);
    const vf x1 = simd::load(r1 + d, n);
    for (int k = 0; k < KB; ++k) {
      const vf vv = simd::load(v[k] + d, n);
      a0[k] = simd::fma(x0, vv, a0[k]);
      a1[k] = simd::fma(x1, vv, a1[k]);
    }
    if (d0 != nullptr) {
      const vf y0 = simd::add(x0, simd::load(d0 + d, n));
      if constexpr (NP) {
        xx0 = simd::fma(x0, x0, xx0);
        yy0 = simd::fma(y0, y0, yy0);
      } else {
        simd::store(r0 + d, y0, n);
      }
    }
    if (d1 != nullptr) {
      const vf y1 = simd::add(x1, simd::load(d1 + d, n));
      if constexpr (NP) {
        xx1 = simd::fma(x1, x1, xx1);
        yy1 = simd::fma(y1, y1, yy1);
      } else {
        simd::store(r1 + d, y1, n);
      }
    }
  };
  int64_t d = c0;
  for (; d + L <= c1; d += L) step(d, L);
  if (d < c1) step(d, c1 - d);
  for (int k = 0; k < KB; ++k) {
    st.a[0][k] = a0[k];
    st.a[1][k] = a1[k];
  }
  st.xx[0] = xx0;
  st.yy[0] = yy0;
  st.xx[1] = xx1;
  st.yy[1] = yy1;
}

// After the last chunk: the norm-preserving write pass and the pair's 2 x kb dot products.
template <typename T>
void sweep_finish(T* const* rows, int n_rows, const float* const* delta, int64_t dim, int kb,
                  bool norm_preserving, const SweepState& st, float* dots) {
  if (norm_preserving) {
    for (int r = 0; r < n_rows; ++r) {
      if (delta[r] == nullptr) continue;
      const float scale = std::sqrt(simd::sum(st.xx[r])) /
                          std::max(std::sqrt(simd::sum(st.yy[r])), kNormEps);
      const vf sv = simd::set1(scale);
      T* const out = rows[r];
      const float* const dl = delta[r];
      int64_t e = 0;
      for (; e + L <= dim; e += L)
        simd::store(out + e, simd::mul(simd::add(simd::load(out + e), simd::load(dl + e)), sv));
      if (e < dim) {
        const int64_t n = dim - e;
        simd::store(out + e, simd::mul(simd::add(simd::load(out + e, n),
                                                 simd::load(dl + e, n)), sv), n);
      }
    }
  }
  if (kb > 0) {
    vf all[2 * kSweepMaxK];
    for (int k = 0; k < kb; ++k) {
      all[k] = st.a[0][k];
      all[kb + k] = st.a[1][k];
    }
    simd::sum16(all, 2 * kb, dots);
  }
}

template <typename T, bool NP>
void sweep_rows_kb(int kb, T* const* rows, int n_rows, const float* const* delta,
                   const float* const* v, const T* const* ahead, int64_t c0, int64_t c1,
                   SweepState& st, bool first) {
  switch (kb) {
    case 0: sweep_rows<T, 0, NP>(rows, n_rows, delta, v, ahead, c0, c1, st, first); break;
    case 1: sweep_rows<T, 1, NP>(rows, n_rows, delta, v, ahead, c0, c1, st, first); break;
    case 2: sweep_rows<T, 2, NP>(rows, n_rows, delta, v, ahead, c0, c1, st, first); break;
    case 4: sweep_rows<T, 4, NP>(rows, n_rows, delta, v, ahead, c0, c1, st, first); break;
    default: sweep_rows<T, 8, NP>(rows, n_rows, delta, v, ahead, c0, c1, st, first); break;
  }
}

// Vectors a sweep may keep in L1 whole (bytes); beyond, the block sweeps column chunks.
constexpr int64_t kSweepL1Bytes = 24 * 1024;

// Vectors per sweep: K rounded up to 1, 2, 4 or 8 (zero rows pad), 0 without projections.
inline int sweep_width(int64_t n_vec, bool need_proj) {
  if (!need_proj) return 0;
  return n_vec <= 1 ? 1 : n_vec <= 2 ? 2 : n_vec <= 4 ? 4 : 8;
}

bool all_finite(const float* p, int64_t n) {
  // x - x is 0 for finite x and NaN otherwise; one branch at the end.
  vf acc = simd::zero();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const vf x = simd::load(p + i);
    acc = simd::add(acc, simd::sub(x, x));
  }
  if (i < n) {
    const vf x = simd::load(p + i, n - i);
    acc = simd::add(acc, simd::sub(x, x));
  }
  return simd::sum(acc) == 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Per-thread scratch, grown on demand and kept across calls (no allocation on the hot path).

struct Scratch {
  std::vector<float> rows;    // [kRowBlock, D] float32 copies of bf16/fp16 rows
  std::vector<float> deltas;  // [kRowBlock, D] per-row offsets (decode)
  std::vector<float> dots;    // [kRowBlock, K]
  std::vector<float> proj;    // [kRowBlock, K] projections when proj_out is not given
  std::vector<float> last;    // [K] projections of the newest masked row of a unit
  std::vector<double> sums;   // [K] running-sum partial of a unit
  std::vector<vf> acc;        // [kRowBlock, K] lane accumulators
  std::vector<float> zeros;   // [D] the padding vector of the sweeps (never written)

  template <typename V>
  static typename V::value_type* take(V& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }
};

Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

// ---------------------------------------------------------------------------------------------
// The problem, as raw pointers.

struct Problem {
  void* hidden;
  int64_t B, T, D, K;
  int64_t stride_b, stride_t;  // hidden strides in elements
  const float* vectors;        // [K, D]
  const float* inv_norm;       // [K]
  const float* weights;        // [B, K]
  const bool* mask;            // [B, T] or null
  float* proj_out;             // [B, T, K] or null
  float* run_sum;              // [B, K] or null (then run_count, run_last are null too)
  int64_t* run_count;          // [B]
  float* run_last;             // [B, K]
  bool norm_preserving;
  bool need_proj;  // projections are wanted (proj_out or running statistics)

  bool masked(int64_t b, int64_t t) const { return mask == nullptr || mask[b * T + t]; }
};

template <int R>
void dot_rows_n(int rows, const float* const* x, const float* vectors, int64_t dim,
                int64_t n_vec, vf* acc, float* out) {
  if (rows > kDotRows) {
    // Tiles of at most 4 rows x 4 vectors: with 8 rows x 2 vectors, rows whose addresses
    // differ by multiples of 4 KiB (D = 1024, 2048, 4096) crowd the same L1 sets.
    dot_rows_n<kDotRows>(kDotRows, x, vectors, dim, n_vec, acc, out);
    dot_rows_n<kDotRows>(rows - kDotRows, x + kDotRows, vectors, dim, n_vec, acc,
                         out + kDotRows * n_vec);
    return;
  }
  if constexpr (R > 0) {
    if (rows == R) {
      dot_rows<R>(x, vectors, dim, n_vec, acc, out);
    } else {
      dot_rows_n<R - 1>(rows, x, vectors, dim, n_vec, acc, out);
    }
  }
}

template <int R>
void delta_rows_n(int rows, const float* const* w, const float* vectors, int64_t dim,
                  int64_t n_vec, float* const* out) {
  if constexpr (R > 0) {
    if (rows == R) {
      delta_rows<R>(w, vectors, dim, n_vec, out);
    } else {
      delta_rows_n<R - 1>(rows, w, vectors, dim, n_vec, out);
    }
  }
}

// Processes rows (b[r], t[r]), r < rows <= kRowBlock: projections into proj[r] (K floats
// each) when wanted, and each row with a non-null delta[r] steered. Each row is read from
// memory once: K <= 8 takes single sweeps over row pairs; more vectors take the register
// tiles (rows in float32, all K dot products, then the write), whose later passes hit L1.
template <typename T>
void process_block(const Problem& P, int rows, const int64_t* b, const int64_t* t,
                   const float* const* delta, float* const* proj, Scratch& s) {
  T* hidden_rows[kRowBlock];
  const T* ahead_rows[kRowBlock];  // row r of the next block (same slot), null past the end
  for (int r = 0; r < rows; ++r) {
    hidden_rows[r] = static_cast<T*>(P.hidden) + b[r] * P.stride_b + t[r] * P.stride_t;
    int64_t nb = b[r], nt = t[r] + kRowBlock;
    if (P.T == 1) {
      nb = b[r] + kRowBlock;
      nt = 0;
    }
    ahead_rows[r] = nb < P.B && nt < P.T ? hidden_rows[r] + (nb - b[r]) * P.stride_b +
                                               (nt - t[r]) * P.stride_t
                                         : nullptr;
  }
  if (P.K <= kSweepMaxK || !P.need_proj) {
    const int kb = sweep_width(P.K, P.need_proj);
    const float* v[kSweepMaxK];
    if (kb > 0) {
      const float* zeros = nullptr;
      if (kb > P.K) {
        zeros = Scratch::take(s.zeros, size_t(P.D));
      }
      for (int k = 0; k < kb; ++k) v[k] = k < P.K ? P.vectors + k * P.D : zeros;
    }
    const int64_t chunk = kb * P.D * int64_t(sizeof(float)) <= kSweepL1Bytes ? P.D : kDimChunk;
    SweepState state[kRowBlock / 2];
    for (int64_t c0 = 0; c0 < P.D; c0 += chunk) {
      const int64_t c1 = std::min(P.D, c0 + chunk);
      for (int r = 0; r < rows; r += 2) {
        const int n = std::min(2, rows - r);
        if (P.norm_preserving) {
          sweep_rows_kb<T, true>(kb, hidden_rows + r, n, delta + r, v, ahead_rows + r, c0, c1,
                                 state[r / 2], c0 == 0);
        } else {
          sweep_rows_kb<T, false>(kb, hidden_rows + r, n, delta + r, v, ahead_rows + r, c0, c1,
                                  state[r / 2], c0 == 0);
        }
      }
    }
    float dots[2 * kSweepMaxK];
    for (int r = 0; r < rows; r += 2) {
      const int n = std::min(2, rows - r);
      sweep_finish(hidden_rows + r, n, delta + r, P.D, kb, P.norm_preserving, state[r / 2],
                   dots);
      for (int i = 0; i < n && kb > 0; ++i)
        for (int64_t k = 0; k < P.K; ++k) proj[r + i][k] = dots[i * kb + k] * P.inv_norm[k];
    }
    return;
  }
  const float* x[kRowBlock];
  for (int r = 0; r < rows; ++r) {
    if constexpr (std::is_same_v<T, float>) {
      x[r] = hidden_rows[r];
    } else {
      float* row = Scratch::take(s.rows, size_t(kRowBlock * P.D)) + r * P.D;
      load_row(hidden_rows[r], row, P.D, ahead_rows[r]);
      x[r] = row;
    }
  }
  if (P.need_proj) {
    vf* acc = Scratch::take(s.acc, size_t(kRowBlock * P.K));
    float* dots = Scratch::take(s.dots, size_t(kRowBlock * P.K));
    dot_rows_n<kDotRows>(rows, x, P.vectors, P.D, P.K, acc, dots);
    for (int r = 0; r < rows; ++r)
      for (int64_t k = 0; k < P.K; ++k) proj[r][k] = dots[r * P.K + k] * P.inv_norm[k];
  }
  for (int r = 0; r < rows; ++r)
    if (delta[r] != nullptr)
      steer_row(x[r], delta[r], hidden_rows[r], P.D, P.norm_preserving,
                std::is_same_v<T, float> ? ahead_rows[r] : nullptr);
}

float* proj_row(const Problem& P, Scratch& s, int64_t b, int64_t t, int r) {
  if (P.proj_out != nullptr) return P.proj_out + (b * P.T + t) * P.K;
  return Scratch::take(s.proj, size_t(kRowBlock * P.K)) + r * P.K;
}

// Decode (T == 1): every row is its own sequence. Block i = rows (sequences) 4i .. 4i+3;
// their offsets are computed together (each vector load feeds 4 rows) and the running
// statistics are updated directly (each sequence belongs to one block).
template <typename T>
void decode_blocks(const Problem& P, int64_t block_begin, int64_t block_end) {
  Scratch& s = thread_scratch();
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    const int64_t b0 = blk * kRowBlock;
    const int rows = int(std::min<int64_t>(kRowBlock, P.B - b0));
    int64_t b[kRowBlock], t[kRowBlock] = {};
    const float* delta[kRowBlock];
    float* proj[kRowBlock];
    const float* w_steered[kRowBlock];
    float* delta_steered[kRowBlock];
    int n_steered = 0;
    float* delta_buf = Scratch::take(s.deltas, size_t(kRowBlock * P.D));
    for (int r = 0; r < rows; ++r) {
      b[r] = b0 + r;
      proj[r] = proj_row(P, s, b[r], 0, r);
      delta[r] = nullptr;
      if (P.masked(b[r], 0)) {
        float* own = delta_buf + r * P.D;
        delta[r] = own;
        w_steered[n_steered] = P.weights + b[r] * P.K;
        delta_steered[n_steered++] = own;
      }
    }
    delta_rows_n<kRowBlock>(n_steered, w_steered, P.vectors, P.D, P.K, delta_steered);
    process_block<T>(P, rows, b, t, delta, proj, s);
    if (P.run_sum != nullptr) {
      for (int r = 0; r < rows; ++r) {
        if (delta[r] == nullptr) continue;
        float* sum = P.run_sum + b[r] * P.K;
        float* last = P.run_last + b[r] * P.K;
        for (int64_t k = 0; k < P.K; ++k) {
          sum[k] += proj[r][k];
          last[k] = proj[r][k];
        }
        P.run_count[b[r]] += 1;
      }
    }
  }
}

// Running-statistics partial of one (sequence, chunk) unit.
struct Partial {
  double* sums;  // [K]
  float* last;   // [K]
  int64_t count;
  bool has_last;
};

// Prefill (T >= 2): unit u = rows [c*kChunkRows, (c+1)*kChunkRows) of sequence b, with
// u = b * n_chunks + c; all rows of a sequence share the precomputed offset deltas[b].
// With one chunk per sequence the unit owns the sequence's running statistics and updates
// them directly; otherwise it leaves a partial for the ordered reduction.
template <typename T>
void prefill_units(const Problem& P, const float* deltas, int64_t n_chunks, Partial* partials,
                   int64_t unit_begin, int64_t unit_end) {
  Scratch& s = thread_scratch();
  const bool running = P.run_sum != nullptr;
  double* sums = running ? Scratch::take(s.sums, size_t(P.K)) : nullptr;
  float* last = running ? Scratch::take(s.last, size_t(P.K)) : nullptr;
  for (int64_t u = unit_begin; u < unit_end; ++u) {
    const int64_t seq = u / n_chunks, chunk = u % n_chunks;
    const int64_t t_begin = chunk * kChunkRows;
    const int64_t t_end = std::min(P.T, t_begin + kChunkRows);
    int64_t count = 0;
    if (running) std::fill(sums, sums + P.K, 0.0);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kRowBlock) {
      const int rows = int(std::min<int64_t>(kRowBlock, t_end - t0));
      int64_t b[kRowBlock], t[kRowBlock];
      const float* delta[kRowBlock];
      float* proj[kRowBlock];
      for (int r = 0; r < rows; ++r) {
        b[r] = seq;
        t[r] = t0 + r;
        proj[r] = proj_row(P, s, seq, t[r], r);
        delta[r] = P.masked(seq, t[r]) ? deltas + seq * P.D : nullptr;
      }
      process_block<T>(P, rows, b, t, delta, proj, s);
      if (!running) continue;
      for (int r = 0; r < rows; ++r) {
        if (delta[r] == nullptr) continue;
        for (int64_t k = 0; k < P.K; ++k) sums[k] += proj[r][k];
        std::memcpy(last, proj[r], sizeof(float) * size_t(P.K));
        ++count;
      }
    }
    if (!running) continue;
    if (partials == nullptr) {
      float* sum = P.run_sum + seq * P.K;
      for (int64_t k = 0; k < P.K; ++k) sum[k] += static_cast<float>(sums[k]);
      P.run_count[seq] += count;
      if (count > 0) std::memcpy(P.run_last + seq * P.K, last, sizeof(float) * size_t(P.K));
    } else {
      Partial& part = partials[u];
      std::copy(sums, sums + P.K, part.sums);
      part.count = count;
      part.has_last = count > 0;
      if (count > 0) std::memcpy(part.last, last, sizeof(float) * size_t(P.K));
    }
  }
}

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work_per_item));
}

template <typename T>
void run(const Problem& P) {
  if (P.T == 1) {
    const int64_t n_blocks = (P.B + kRowBlock - 1) / kRowBlock;
    const int64_t work = kRowBlock * P.D * (2 * P.K + 2);
    at::parallel_for(0, n_blocks, grain_for(work), [&](int64_t begin, int64_t end) {
      decode_blocks<T>(P, begin, end);
    });
    return;
  }
  // One offset per sequence, computed in blocks of 4 sequences.
  std::unique_ptr<float[]> deltas(new float[size_t(P.B * P.D)]);
  const int64_t n_seq_blocks = (P.B + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, n_seq_blocks, grain_for(kRowBlock * P.K * P.D),
                   [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b0 = blk * kRowBlock;
      const int rows = int(std::min<int64_t>(kRowBlock, P.B - b0));
      const float* w[kRowBlock];
      float* out[kRowBlock];
      for (int r = 0; r < rows; ++r) {
        w[r] = P.weights + (b0 + r) * P.K;
        out[r] = deltas.get() + (b0 + r) * P.D;
      }
      delta_rows_n<kRowBlock>(rows, w, P.vectors, P.D, P.K, out);
    }
  });

  const int64_t n_chunks = (P.T + kChunkRows - 1) / kChunkRows;
  const int64_t n_units = P.B * n_chunks;
  std::vector<Partial> partials;
  std::vector<double> partial_sums;
  std::vector<float> partial_last;
  if (P.run_sum != nullptr && n_chunks > 1) {
    partials.resize(size_t(n_units));
    partial_sums.resize(size_t(n_units * P.K));
    partial_last.resize(size_t(n_units * P.K));
    for (int64_t u = 0; u < n_units; ++u) {
      partials[u].sums = partial_sums.data() + u * P.K;
      partials[u].last = partial_last.data() + u * P.K;
    }
  }
  Partial* partial_ptr = partials.empty() ? nullptr : partials.data();
  const int64_t work = std::min(kChunkRows, P.T) * P.D * (P.K + 3);
  at::parallel_for(0, n_units, grain_for(work), [&](int64_t begin, int64_t end) {
    prefill_units<T>(P, deltas.get(), n_chunks, partial_ptr, begin, end);
  });
  if (partial_ptr == nullptr) return;
  // Ordered reduction over the chunks of each sequence: fixed boundaries, fixed order.
  for (int64_t seq = 0; seq < P.B; ++seq) {
    const Partial* part = partial_ptr + seq * n_chunks;
    float* sum = P.run_sum + seq * P.K;
    for (int64_t k = 0; k < P.K; ++k) {
      double total = 0.0;
      for (int64_t c = 0; c < n_chunks; ++c) total += part[c].sums[k];
      sum[k] += static_cast<float>(total);
    }
    for (int64_t c = n_chunks - 1; c >= 0; --c) {
      P.run_count[seq] += part[c].count;
    }
    for (int64_t c = n_chunks - 1; c >= 0; --c) {
      if (part[c].has_last) {
        std::memcpy(P.run_last + seq * P.K, part[c].last, sizeof(float) * size_t(P.K));
        break;
      }
    }
  }
}

void steer_cpu(const at::Tensor& hidden, const at::Tensor& vectors, const at::Tensor& weights,
               const std::optional<at::Tensor>& mask, bool norm_preserving,
               const std::optional<at::Tensor>& proj_out,
               const std::optional<at::Tensor>& run_sum,
               const std::optional<at::Tensor>& run_count,
               const std::optional<at::Tensor>& run_last) {
  const SteerSizes sz = check_steer_args(hidden, vectors, weights, mask, proj_out, run_sum,
                                         run_count, run_last);
  TORCH_CHECK_VALUE(hidden.device().is_cpu(), "emokern.steer_: the CPU kernel got hidden on ",
                    hidden.device());
  // Inputs in the layout the kernel reads; no copies when the wrapper already passes them so.
  const at::Tensor vec = (vectors.scalar_type() == at::kFloat && vectors.is_contiguous())
                             ? vectors : vectors.to(at::kFloat).contiguous();
  const at::Tensor w = weights.contiguous();
  std::optional<at::Tensor> m;
  if (mask.has_value()) m = mask->contiguous();

  // Data checks, before anything is written.
  const int64_t K = sz.n_vec, D = sz.dim;
  TORCH_CHECK_VALUE(all_finite(w.data_ptr<float>(), w.numel()),
                    "emokern.steer_: weights must be finite (found NaN or inf)");
  c10::SmallVector<float, 64> inv_norm(static_cast<size_t>(K));
  {
    const float* v = vec.data_ptr<float>();
    int64_t k = 0;
    double ss[8];
    for (; k < K; k += 8) {
      const int n = int(std::min<int64_t>(8, K - k));
      const float* rows[8];
      for (int i = 0; i < n; ++i) rows[i] = v + (k + i) * D;
      switch (n) {
        case 8: sumsq_rows<8>(rows, D, ss); break;
        case 7: sumsq_rows<7>(rows, D, ss); break;
        case 6: sumsq_rows<6>(rows, D, ss); break;
        case 5: sumsq_rows<5>(rows, D, ss); break;
        case 4: sumsq_rows<4>(rows, D, ss); break;
        case 3: sumsq_rows<3>(rows, D, ss); break;
        case 2: sumsq_rows<2>(rows, D, ss); break;
        default: sumsq_rows<1>(rows, D, ss); break;
      }
      for (int i = 0; i < n; ++i) {
        const double norm = std::sqrt(ss[i]);
        TORCH_CHECK_VALUE(std::isfinite(norm) && norm > 0.0, "emokern.steer_: vectors[", k + i,
                          "] has zero or non-finite norm; an emotion vector needs a direction");
        inv_norm[size_t(k + i)] = static_cast<float>(1.0 / norm);
      }
    }
  }
  if (sz.batch == 0 || sz.seq_len == 0) return;

  Problem P;
  P.hidden = hidden.data_ptr();
  P.B = sz.batch;
  P.T = sz.seq_len;
  P.D = D;
  P.K = K;
  P.stride_b = hidden.stride(0);
  P.stride_t = hidden.stride(1);
  P.vectors = vec.data_ptr<float>();
  P.inv_norm = inv_norm.data();
  P.weights = w.data_ptr<float>();
  P.mask = m.has_value() ? m->data_ptr<bool>() : nullptr;
  P.proj_out = proj_out.has_value() ? proj_out->data_ptr<float>() : nullptr;
  P.run_sum = run_sum.has_value() ? run_sum->data_ptr<float>() : nullptr;
  P.run_count = run_count.has_value() ? run_count->data_ptr<int64_t>() : nullptr;
  P.run_last = run_last.has_value() ? run_last->data_ptr<float>() : nullptr;
  P.norm_preserving = norm_preserving;
  P.need_proj = P.proj_out != nullptr || P.run_sum != nullptr;

  switch (hidden.scalar_type()) {
    case at::kFloat: run<float>(P); break;
    case at::kBFloat16: run<c10::BFloat16>(P); break;
    case at::kHalf: run<c10::Half>(P); break;
    default: TORCH_CHECK(false, "unreachable");
  }
}

}  // namespace
}  // namespace emokern

TORCH_LIBRARY_IMPL(emokern, CPU, m) { m.impl("steer_", &emokern::steer_cpu); }

#ifdef EMOKERN_AOT_MODULE
// Ahead-of-time builds (setup.py) make this file the Python extension module emokern._C:
// importing it runs the registration above; it exports nothing else.
#include <Python.h>
static struct PyModuleDef emokern_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                              nullptr, nullptr, nullptr, nullptr, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&emokern_c_module); }
#endif
