// CPU kernel, layer 3 of 5: register tiles, used where there are many vectors. Dot products
// (proj_tile, block_dots: R rows x KT vectors per column panel), offsets
// delta = sum_k w[k] v_k (delta_tile, block_deltas), and the decode tiles that write
// y = x + delta without storing delta (delta_write_tile, block_delta_write); steered16, the
// value of 16 steered columns that every write shares; and the data checks on the vectors and
// weights (all_finite, inv_norms) in the same lane order as the dot products.
//
// Includes: sizes.h (and through it vec.h) only.
#pragma once

#include "sizes.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace emokern {
namespace cpu {
namespace CPU_CAPABILITY {

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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace emokern
