// CPU kernel, layer 4 of 5: passes over whole rows. load_row/write_row (float32 rows for the
// tiles and their writes), the sweeps for few vectors (one pass per row or row pair that
// accumulates every dot product and writes the steered row: sweep_rows and its modes,
// sweep_split and sweep_halves where a logical vector takes several registers, sweep_kb that
// picks one), rewrite_row, the second pass over a row the sweep has read (norm preserving, or
// with projection bounds), and level_write_row, the write of a row that bounds correct.
//
// Includes: tiles.h (steered16; and through it sizes.h, vec.h) only. The sweep macros
// (EMOKERN_SWEEP_STEP, ...) are local to this header.
#pragma once

#include "tiles.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace emokern {
namespace cpu {
namespace CPU_CAPABILITY {

// Row passes.

inline float norm_scale(const V16& xx, const V16& yy) {
  constexpr float kNormEps = 1e-6f;  // = emokern::kNormEps (steer.h)
  return std::sqrt(hsum16(xx)) / std::max(std::sqrt(hsum16(yy)), kNormEps);
}

// The norm-preserving scale of a row from its float32 x (D16 floats, zero padded) and offset:
// ||x||^2 and ||y||^2 in the lane order of the sweeps (a pass over L1/L2-resident data).
inline float row_scale(const float* x, const float* delta, int64_t dim) {
  const int64_t steps = dim / kLanes, tail = dim % kLanes;
  V16 xx = zero16(), yy = zero16();
  for (int64_t s = 0; s <= steps; ++s) {  // the padded tail adds zeros
    if (s == steps && tail == 0) break;
    const V16 xv = load16(x + s * kLanes);
    const V16 yv = add16(xv, load16(delta + s * kLanes));
    xx = fma16(xv, xv, xx);
    yy = fma16(yv, yv, yy);
  }
  return norm_scale(xx, yy);
}

// Writes a steered row from its float32 x (D16 floats, zero padded) and offset; NP: scaled by
// scale_value (row_scale).
template <typename T, bool NP, bool RES>
void write_row(T* h, const T* res, const float* x, const float* delta, int64_t dim,
               const T* ahead, float scale_value) {
  const V16 scale = splat16(NP ? scale_value : 1.0f);
  const int64_t steps = dim / kLanes, tail = dim % kLanes;
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
      if constexpr (KX) {                                                                \
        if (FULL) {                                                                      \
          store16(keep[r] + (d), y);                                                     \
        } else {                                                                         \
          store16(keep[r] + (d), y, n);                                                  \
        }                                                                                \
      }                                                                                  \
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
      if constexpr (KX) {                                                                \
        store16(keep[r] + (d), y0);                                                      \
        store16(keep[r] + (d) + kLanes, y1);                                             \
      }                                                                                  \
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
// next block (prefetched), and with KX (keep) where each row's float32 y = x + delta is stored
// as it is written (D floats), for a second write of the rows that projection bounds correct.
template <typename T>
struct SweepRows {
  T* const* h;
  const T* const* res;
  const float* const* delta;
  const float* const* w;
  const T* const* ahead;
  float* const* keep = nullptr;
};

// The sweep's row pointers as locals (registers): read through rows, every store of a step
// (whose vector types may alias anything) would make the compiler read them again.
#define EMOKERN_SWEEP_LOCALS                                                             \
  T* h[RS];                                                                              \
  const T* res[RS];                                                                      \
  const float* delta[RS];                                                                \
  float* keep[RS];                                                                       \
  const float* const* w = rows.w;                                                        \
  EMOKERN_UNROLL for (int r = 0; r < RS; ++r) {                                          \
    h[r] = rows.h[r];                                                                    \
    res[r] = rows.res[r];                                                                \
    delta[r] = rows.delta[r];                                                            \
    keep[r] = KX ? rows.keep[r] : nullptr;                                               \
  }

// The last n < 16 columns of a sweep, on the sums in st (kept apart from the main loop so that
// its partial loads do not push the main loop's sums out of registers).
template <typename T, int RS, int KB, bool NP, bool DW, bool KX>
C10_NOINLINE void sweep_tail(const SweepRows<T>& rows, const float* const* v, int64_t d,
                             int64_t n, SweepState& st) {
  constexpr int RM = kRowsAny;
  EMOKERN_SWEEP_LOCALS
  auto& a = st.a;
  auto& xx = st.xx;
  auto& yy = st.yy;
  EMOKERN_SWEEP_STEP(false, d, n)
}

template <typename T, int RS, int KB, bool NP, bool DW, int RM, bool KX>
void sweep_rows(const SweepRows<T>& rows, const float* const* v, int64_t c0, int64_t c1,
                SweepState& st, bool first) {
  static_assert(!(DW && NP), "norm-preserving sweeps read their offsets twice: from memory");
  static_assert(!(KX && NP), "norm-preserving sweeps write nothing: nothing to keep");
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
  if (d < c1) sweep_tail<T, RS, KB, NP, DW, KX>(rows, v, d, c1 - d, st);
}

// The rows' mode, then the sweep compiled for it: with several registers per logical vector
// (AVX2, NEON) the two common modes have their own loops; on AVX-512 GCC kept the specialised
// loop's 16 sums on the stack (slower), so it takes the general loop only.
template <typename T, int RS, int KB, bool NP, bool DW, bool KX = false>
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
      sweep_rows<T, RS, KB, NP, DW, kRowsWrite, KX>(rows, v, c0, c1, st, first);
      return;
    }
    if constexpr (!NP && !DW && !KX) {  // dot products only: sweep_halves' first pass, bounds
      if (!res && none) {
        sweep_rows<T, RS, KB, NP, DW, kRowsDots, false>(rows, v, c0, c1, st, first);
        return;
      }
    }
  }
  sweep_rows<T, RS, KB, NP, DW, kRowsAny, KX>(rows, v, c0, c1, st, first);
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
// products.
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

// The most vectors a keeping sweep (KX) takes: every sum live.
constexpr int kKeepSweepMaxK = kN == 1 ? kSweepMaxK : kLiveSweepMaxK;

// Sweep with KB in {0, 1, 2, 4, kSweepMaxK} vectors; NP norm preserving; DW offsets from the
// weights (decode, not norm preserving); KX keeping y (projection bounds, not norm preserving;
// 1 <= KB <= kKeepSweepMaxK).
template <typename T, int RS>
void sweep_kb(int kb, bool np, bool dw, bool kx, const SweepRows<T>& rows, const float* const* v,
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
#define EMOKERN_SWEEP_KEEP(KB, DW)                                                   \
  if constexpr (KB > 0 && KB <= kKeepSweepMaxK) {                                    \
    sweep<T, RS, KB, false, DW, true>(rows, v, c0, c1, st, first);                   \
  }
#define EMOKERN_SWEEP_CASE(KB)                                                       \
  if (np) {                                                                          \
    EMOKERN_SWEEP_ONE(KB, true, false)                                               \
  } else if (kx) {                                                                   \
    if (dw) {                                                                        \
      EMOKERN_SWEEP_KEEP(KB, true)                                                   \
    } else {                                                                         \
      EMOKERN_SWEEP_KEEP(KB, false)                                                  \
    }                                                                                \
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
#undef EMOKERN_SWEEP_KEEP
#undef EMOKERN_SWEEP_ONE
}

// The second pass over a row the sweep has read (and not written): hidden = (x + delta), times
// scale_value when NP, minus the residual, x read again from hidden (+ residual). The bits of
// the sweep's own writes (not NP) or of write_row (NP).
template <typename T, bool NP, bool RES>
void rewrite_row(T* h, const T* res, const float* delta, int64_t dim, float scale_value) {
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
    store16x2(h + d, steered16<NP, RES>(x0, load16(delta + d), scale, r0),
              steered16<NP, RES>(x1, load16(delta + d + kLanes), scale, r1));
  }
  for (; s < steps; ++s) {
    const int64_t d = s * kLanes;
    const V16 r = RES ? load16(res + d) : none;
    const V16 x = RES ? add16(load16(h + d), r) : load16(h + d);
    store16(h + d, steered16<NP, RES>(x, load16(delta + d), scale, r));
  }
  if (tail > 0) {
    const int64_t d = steps * kLanes;
    const V16 r = RES ? load16(res + d, tail) : none;
    const V16 x = RES ? add16(load16(h + d, tail), r) : load16(h + d, tail);
    store16(h + d, steered16<NP, RES>(x, load16(delta + d), scale, r), tail);
  }
}

// Where level_write_row reads a row's x: its float32 copy (D16 floats, zero padded; the tiles),
// hidden rows not yet written (+ residual), or, kFromSteered, not x but y = x + delta itself in
// float32: kept by a sweep (KX), or the row a float32 sweep without residual wrote (exact).
constexpr int kFromFloat = 0, kFromRows = 1, kFromSteered = 2;

// Projection levels and bounds: the corrected write of a row with m directions to correct
// (Problem::level_row). For 16 columns, with corr = sum_j coef[j] v_j (j in order, by fused
// multiply-add from zero):
//   y = fma(x + delta, c, corr) (NP) or (x + delta) + corr, then y - residual.
// M > 0: m = M directions, their coefficients and vectors in registers (the common caps); M = 0:
// any m.
template <typename T, bool NP, bool RES, int SRC, int M>
void level_write_row_m(T* h, const T* res, const void* src, const float* delta, float c, int m,
                       const float* coef, const float* const* vk, int64_t dim) {
  static_assert(SRC != kFromSteered || !NP, "a kept y is not scaled: the sweeps keep none");
  constexpr int NM = M > 0 ? M : 1;
  V16 cf[NM];
  const float* vm[NM];
  if constexpr (M > 0) {
    EMOKERN_UNROLL for (int j = 0; j < M; ++j) {
      cf[j] = splat16(coef[j]);
      vm[j] = vk[j];
    }
  }
  const V16 scale = splat16(c);
  const int64_t steps = dim / kLanes, tail = dim % kLanes;
  auto step = [&](int64_t d, int64_t n) EMOKERN_INLINE {
    const bool full = n == kLanes;
    V16 r = zero16(), x;
    if constexpr (RES) r = full ? load16(res + d) : load16(res + d, n);
    if constexpr (SRC == kFromFloat) {
      x = load16(static_cast<const float*>(src) + d);
    } else if constexpr (SRC == kFromSteered) {  // y, D floats
      const float* ys = static_cast<const float*>(src);
      x = full ? load16(ys + d) : load16(ys + d, n);
    } else {
      const T* xt = static_cast<const T*>(src);
      x = full ? load16(xt + d) : load16(xt + d, n);
      if constexpr (RES) x = add16(x, r);
    }
    V16 corr = zero16();
    if constexpr (M > 0) {
      EMOKERN_UNROLL for (int j = 0; j < M; ++j)
        corr = fma16(cf[j], full ? load16(vm[j] + d) : load16(vm[j] + d, n), corr);
    } else {
      for (int j = 0; j < m; ++j)
        corr = fma16(splat16(coef[j]), full ? load16(vk[j] + d) : load16(vk[j] + d, n), corr);
    }
    const V16 y = SRC == kFromSteered ? x : add16(x, load16(delta + d));
    V16 out = NP ? fma16(y, scale, corr) : add16(y, corr);
    if constexpr (RES) out = sub16(out, r);
    if (full) {
      store16(h + d, out);
    } else {
      store16(h + d, out, n);
    }
  };
  for (int64_t s = 0; s < steps; ++s) step(s * kLanes, kLanes);
  if (tail > 0) step(steps * kLanes, tail);
}

template <typename T, bool NP, bool RES, int SRC>
void level_write_row(T* h, const T* res, const void* src, const float* delta, float c, int m,
                     const float* coef, const float* const* vk, int64_t dim) {
  if (m == 1) {
    level_write_row_m<T, NP, RES, SRC, 1>(h, res, src, delta, c, m, coef, vk, dim);
  } else if (m == 2) {
    level_write_row_m<T, NP, RES, SRC, 2>(h, res, src, delta, c, m, coef, vk, dim);
  } else {
    level_write_row_m<T, NP, RES, SRC, 0>(h, res, src, delta, c, m, coef, vk, dim);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace emokern

#undef EMOKERN_SWEEP_STEP
#undef EMOKERN_HAS_RES
#undef EMOKERN_WRITES
#undef EMOKERN_SWEEP_STEP2
