// CPU kernel, layer 5 of 5: the plan and the run. Per-thread scratch (Scratch), the Plan of a
// call (tiles or sweeps, offsets per slot or per block, packing of the vectors, chunk sizes,
// with projection bounds the projections needed and how rows are corrected),
// process_block/process_chunk (a block of rows through the sweeps or the tiles, the bounds'
// corrections, then its running-statistics partials), run (the offset table, the parallel loop over chunks, the
// ordered reduction of the partials), and kernel_table(), the core's entry points.
//
// Includes: sweeps.h (and through it every lower layer), steer_cpu.h (Problem, KernelTable)
// and ATen/Parallel.h.
#pragma once

#include "../steer_cpu.h"
#include "sweeps.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>

namespace emokern {
namespace cpu {
namespace CPU_CAPABILITY {

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
  Buffer<V16> acc;       // [kBlock, K] lane accumulators (tiles; a keeping sweep's test)
  Buffer<float> dots;    // [kBlock, K]
  Buffer<float> level;   // level_row's work, then [kBlock, K] coefficients of corrections
  Buffer<int32_t> level_idx;          // [kBlock, K] their directions
  Buffer<const float*> level_vecs;    // [K] their vectors
  // Per call, on the calling thread:
  Buffer<float> packed;  // vectors, panel-major
  Buffer<float> table;   // [S, D16] offsets per slot
  Buffer<double> entry_sums;
  Buffer<float> entry_last;
  Buffer<int64_t> entry_meta;  // [slot, count] per entry, entry counts per chunk
  Buffer<double> slot_sums;
  Buffer<int64_t> slot_meta;
  Buffer<int32_t> bounded;  // the directions some slot bounds
  Buffer<float> dot_vecs;   // their vectors, panel-major
  Buffer<float> push;       // [S, K] level_push per slot
  Buffer<float> box;        // [S, 3, n_bounded] bounds and pushes of the bounded directions
};

inline Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

// The problem, blocks and chunks.

struct Plan {
  const Problem* P;
  VView V;
  VView Vd;              // the vectors of the tiles' dot products: V, or the bounded ones
  const float* table;    // [S, D16] offsets per slot, or null (offsets per block)
  int64_t d16;
  int64_t row_stride;    // of float scratch rows: D16 plus a line, so rows D apart do not all
                         // fall into the same L1 sets
  bool need_proj;
  bool readings;         // projections or running statistics written
  bool leveled;          // projection bounds, some of them finite
  bool keep;             // bounds on the sweeps, not norm preserving: written in the sweep, y kept
  const int32_t* dot_k;  // the projections the rows need: dot_k[0 .. n_dots) (null: all K)
  int64_t n_dots;
  const int32_t* bounded;  // the directions some slot bounds, n_bounded of them
  int64_t n_bounded;
  const float* push;     // [S, K] level_push of every slot
  const float* box;      // [S, 3, n_bounded]: lo, hi and q of slot s on L.bounded[j] at
                         // box[(3 s + {0, 1, 2}) n_bounded + j], the per-row test's reads
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
  // or, decode without norm preservation, in registers while writing (below; with bounds on
  // the tiles only, for the rows inside them: the others get theirs in memory there).
  const bool leveled = L.leveled;
  const bool fused_write = L.table == nullptr && !P.norm_preserving &&
                           (!leveled || L.tiles || L.keep);
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

  // Projection bounds: each steered row's correction (level_row) once its projections (and
  // norm-preserving scale) are known, before anything of it is written.
  float* level_work = nullptr;
  float* coefs = nullptr;  // [kBlock, K]
  int32_t* idxs = nullptr;
  const float** vk = nullptr;
  if (leveled) {
    level_work = s.level.take(size_t(level_work_floats(K) + kBlock * K));
    coefs = level_work + level_work_floats(K);
    idxs = s.level_idx.take(size_t(kBlock * K));
    vk = s.level_vecs.take(size_t(K));
  }
  // The correction of row r with scale c: 0 (none) or its number of directions, their
  // coefficients in coefs + q K and their indices in idxs + q K.
  auto solve = [&](int r, float c, int q) -> int {
    return P.level_row(P, slot[r], proj[r], c, L.push + slot[r] * K, coefs + q * K,
                       idxs + q * K, level_work);
  };
  // Rows whose projections after the pushes, p'_k = c (p_k + q_k) on the bounded directions,
  // are all finite and within their bounds (the common case with caps) skip the solve: the
  // test is level_row's, operation for operation (it would return 0). Branch-free over j.
  const int64_t nb = L.n_bounded;
  auto level = [&](int r, float c, int q) -> int {
    const float* lo = L.box + 3 * slot[r] * nb;
    const float* hi = lo + nb;
    const float* push = hi + nb;
    bool inside = true;
    for (int64_t j = 0; j < nb; ++j) {
      const float p_after = c * (proj[r][L.bounded[j]] + push[j]);
      inside &= (p_after >= lo[j]) & (p_after <= hi[j]) & (p_after - p_after == 0.0f);
    }
    return inside ? 0 : solve(r, c, q);
  };
  auto level_vectors = [&](int q, int m) {
    for (int j = 0; j < m; ++j) vk[j] = P.vectors + idxs[q * K + j] * D;
  };
  const float* const coef = coefs;  // the sweeps' rows take slot 0
  int n_dirs[kBlock] = {};           // each row's number of corrected directions
  // Without norm preservation, the rows that bounds correct, after the others were written as
  // without bounds: y + correction - residual, y read as SRC says (level_write_row) from xs[r]:
  // kFromFloat, y = x + delta with offsets from the table, else computed here for these rows
  // only (the others took theirs in registers); kFromSteered, y itself.
  auto write_corrected = [&](auto src_tag, const void* const* xs) {
    constexpr int SRC = decltype(src_tag)::value;
    const float* dl[kBlock] = {};
    if (SRC == kFromSteered) {
      // no offsets: y holds them
    } else if (L.table == nullptr) {
      float* buf = s.deltas.take(size_t(kBlock * L.row_stride));
      const float* w[kBlock];
      float* out[kBlock];
      int m = 0;
      for (int r = 0; r < n; ++r) {
        if (slot[r] < 0 || n_dirs[r] == 0) continue;
        w[m] = P.weights + slot[r] * K;
        out[m] = buf + m * L.row_stride;
        dl[r] = out[m++];
      }
      if (m == 0) return;
      block_deltas(w, m, L.V, K, D, out);
    } else {
      for (int r = 0; r < n; ++r)
        if (slot[r] >= 0) dl[r] = L.table + slot[r] * L.row_stride;
    }
    for (int r = 0; r < n; ++r) {
      if (slot[r] < 0 || n_dirs[r] == 0) continue;
      level_vectors(r, n_dirs[r]);
      if (res[r] != nullptr) {
        level_write_row<T, false, true, SRC>(h[r], res[r], xs[r], dl[r], 1.0f, n_dirs[r],
                                             coefs + r * K, vk, D);
      } else {
        level_write_row<T, false, false, SRC>(h[r], nullptr, xs[r], dl[r], 1.0f, n_dirs[r],
                                              coefs + r * K, vk, D);
      }
    }
  };

  if (!L.tiles) {
    // Decode without norm preservation: the offsets come from the weights inside the sweep.
    const bool dw = fused_write;
    // The vectors of the dot products: all K, or the bounded ones (bounds, readings off; not
    // with offsets from the weights, which take every vector).
    const int32_t* dot_k = dw ? nullptr : L.dot_k;
    const int64_t kd = dot_k != nullptr ? L.n_dots : K;
    int kb = !L.need_proj && !dw ? 0 : kd <= 1 ? 1 : kd <= 2 ? 2 : kd <= 4 ? 4 : kSweepMaxK;
    const float* v[kSweepMaxK];
    if (kb > 0) {
      float* zeros = nullptr;
      if (kb > kd) {
        zeros = s.zeros.take(size_t(L.d16));
        fill_n(zeros, L.d16, 0.0f);
      }
      for (int k = 0; k < kb; ++k)
        v[k] = k >= kd ? zeros : P.vectors + (dot_k != nullptr ? dot_k[k] : k) * D;
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
    // Bounds without norm preservation: the sweeps write every row as without bounds and keep
    // its float32 y = x + delta (L.keep), from which the few rows a bound corrects are written
    // again (no offsets recomputed), or only read (dot products) and the rows are written
    // below. Norm-preserving sweeps never write.
    // Float32 rows without a residual keep nothing: the written y is exact, the row itself.
    const bool kept = L.keep;
    const bool kx = kept && !(std::is_same_v<T, float> && P.residual == nullptr);
    const float* sweep_delta[kBlock];
    for (int r = 0; r < n; ++r)
      sweep_delta[r] = leveled && !P.norm_preserving && !kept ? nullptr : delta[r];
    float* keep[kBlock];
    if (kx) {
      float* buf = s.rows.take(size_t(kBlock * L.row_stride));
      for (int r = 0; r < n; ++r) keep[r] = buf + r * L.row_stride;
    }
    SweepState state[kBlock / kSweepRows];
    for (int64_t c0 = 0; c0 < D; c0 += chunk) {
      const int64_t c1 = std::min(D, c0 + chunk);
      for (int r = 0; r < n; r += kSweepRows) {
        SweepState& st = state[r / kSweepRows];
        const SweepRows<T> rows{h + r, res + r, sweep_delta + r, dw ? w + r : nullptr,
                                ahead + r, kx ? keep + r : nullptr};
        const bool np = P.norm_preserving, first = c0 == 0;
        if (r + kSweepRows <= n) {
          sweep_kb<T, kSweepRows>(kb, np, dw, kx, rows, v, c0, c1, st, first);
        } else {  // the odd row of the block
          sweep_kb<T, 1>(kb, np, dw, kx, rows, v, c0, c1, st, first);
        }
      }
    }
    // Written rows with readings off: the whole block's test at once (below).
    const bool block_test = kept && !L.readings;
    for (int r = 0; r < n && !block_test; r += kSweepRows) {
      const SweepState& st = state[r / kSweepRows];
      const int rows = std::min(kSweepRows, n - r);
      for (int q = 0; q < rows; ++q) {
        const int i = r + q;
        if (kb > 0 && L.need_proj) {
          float dots[kSweepMaxK];
          hsum16_many(st.a[q], kb, dots);
          if (dot_k == nullptr) {
            mul_n(dots, P.inv_norm, proj[i], K);
          } else {  // the others stay 0: open on both sides, no row needs them
            fill_n(proj[i], K, 0.0f);
            for (int64_t j = 0; j < kd; ++j) proj[i][dot_k[j]] = dots[j] * P.inv_norm[dot_k[j]];
          }
        }
        if (delta[i] == nullptr || !(P.norm_preserving || leveled)) continue;
        if (kept) {  // written; corrected below
          n_dirs[i] = level(i, 1.0f, i);
          continue;
        }
        const float scale = P.norm_preserving ? norm_scale(st.xx[q], st.yy[q]) : 1.0f;
        const int m = leveled ? level(i, scale, 0) : 0;
        level_vectors(0, m);
        const bool with_res = res[i] != nullptr;
#define EMOKERN_REWRITE(NP)                                                                  \
  if (m > 0) {                                                                               \
    if (with_res) level_write_row<T, NP, true, kFromRows>(h[i], res[i], h[i], delta[i],      \
                                                          scale, m, coef, vk, D);            \
    else level_write_row<T, NP, false, kFromRows>(h[i], nullptr, h[i], delta[i], scale, m,   \
                                                  coef, vk, D);                              \
  } else if (with_res) {                                                                     \
    rewrite_row<T, NP, true>(h[i], res[i], delta[i], D, scale);                              \
  } else {                                                                                   \
    rewrite_row<T, NP, false>(h[i], nullptr, delta[i], D, scale);                            \
  }
        if (P.norm_preserving) {
          EMOKERN_REWRITE(true)
        } else {
          EMOKERN_REWRITE(false)
        }
#undef EMOKERN_REWRITE
      }
    }
    if (block_test) {
      // Lane l = (steered row, bounded direction j), row i's from first[i]: the dot products'
      // lane sums all at once (hsum16_all: hsum16_many's tree, as per row; the accumulators
      // copied to scratch, which is not zeroed as a V16 array would be), p = dot / ||v_k||
      // (mul_n's product) and level()'s test; only the rows outside take proj (their bounded
      // projections) and the solve.
      constexpr int kMaxLanes = kBlock * kKeepSweepMaxK;
      float inv[kKeepSweepMaxK];
      int col[kKeepSweepMaxK];  // the accumulator of bounded direction j
      for (int64_t j = 0; j < nb; ++j) {
        inv[j] = P.inv_norm[L.bounded[j]];
        col[j] = int(dot_k != nullptr ? j : L.bounded[j]);
      }
      V16* acc = s.acc.take(size_t(kMaxLanes));
      float sums[kMaxLanes];
      int first[kBlock + 1];
      int m = 0;
      for (int i = 0; i < n; ++i) {
        first[i] = m;
        if (delta[i] == nullptr) continue;
        const V16* a = state[i / kSweepRows].a[i % kSweepRows];
        for (int64_t j = 0; j < nb; ++j) acc[m++] = a[col[j]];
      }
      first[n] = m;
      hsum16_all(acc, m, sums);
      for (int i = 0; i < n; ++i) {
        if (first[i] == first[i + 1]) continue;  // not steered
        const float* lo = L.box + 3 * slot[i] * nb;
        const float* hi = lo + nb;
        const float* push = hi + nb;
        float p[kKeepSweepMaxK];
        bool inside = true;
        for (int64_t j = 0; j < nb; ++j) {
          p[j] = sums[first[i] + j] * inv[j];
          const float p_after = p[j] + push[j];  // c (p + q) with c = 1
          inside &= (p_after >= lo[j]) & (p_after <= hi[j]) & (p_after - p_after == 0.0f);
        }
        if (inside) continue;
        fill_n(proj[i], K, 0.0f);  // the others stay 0: open on both sides, no row needs them
        for (int64_t j = 0; j < nb; ++j) proj[i][L.bounded[j]] = p[j];
        n_dirs[i] = solve(i, 1.0f, i);
      }
    }
    if (kept) {
      const void* ys[kBlock];
      for (int r = 0; r < n; ++r) ys[r] = kx ? static_cast<const void*>(keep[r]) : h[r];
      write_corrected(std::integral_constant<int, kFromSteered>{}, ys);
    }
    return;
  }

  // Many vectors: float32 rows, tiles, then the writes.
  const float* x[kBlock];
  // Rows read in place are not prefetched by load_row: the writes prefetch the next block's.
  const bool in_place = std::is_same_v<T, float> && P.residual == nullptr && D % kLanes == 0;
  if (in_place) {
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
    const int64_t kd = L.dot_k != nullptr ? L.n_dots : K;
    V16* acc = s.acc.take(size_t(kBlock * K));
    float* dots = s.dots.take(size_t(kBlock * K));
    block_dots(x, n, L.Vd, kd, D, acc, dots);
    for (int r = 0; r < n; ++r) {
      if (L.dot_k == nullptr) {
        mul_n(dots + r * K, P.inv_norm, proj[r], K);
      } else {  // the others stay 0: open on both sides, no row needs them
        fill_n(proj[r], K, 0.0f);
        for (int64_t j = 0; j < kd; ++j)
          proj[r][L.dot_k[j]] = dots[r * kd + j] * P.inv_norm[L.dot_k[j]];
      }
    }
  }
  // Projection bounds: every steered row's correction first (NP: from its scale).
  float scales[kBlock];
  if (leveled) {
    for (int r = 0; r < n; ++r) {
      if (slot[r] < 0) continue;
      scales[r] = P.norm_preserving ? row_scale(x[r], delta[r], D) : 1.0f;
      n_dirs[r] = level(r, scales[r], r);
    }
  }
  if (fused_write) {
    const float* w[kBlock];
    const float* xs[kBlock];
    T* hs[kBlock];
    const T* rs[kBlock];
    int m = 0;
    for (int r = 0; r < n; ++r) {
      if (slot[r] < 0 || n_dirs[r] > 0) continue;
      w[m] = P.weights + slot[r] * K;
      xs[m] = x[r];
      hs[m] = h[r];
      rs[m++] = res[r];
    }
    if (m > 0) {
      if (P.residual != nullptr) {
        block_delta_write<T, true>(w, m, L.V, K, D, xs, hs, rs);
      } else {
        block_delta_write<T, false>(w, m, L.V, K, D, xs, hs, rs);
      }
    }
    if (leveled) {
      const void* xs[kBlock];
      for (int r = 0; r < n; ++r) xs[r] = x[r];
      write_corrected(std::integral_constant<int, kFromFloat>{}, xs);
    }
    return;
  }
  for (int r = 0; r < n; ++r) {
    if (delta[r] == nullptr) continue;
    const bool with_res = res[r] != nullptr;
    const float scale = !P.norm_preserving ? 1.0f : leveled ? scales[r]
                                                             : row_scale(x[r], delta[r], D);
    const int m = n_dirs[r];
    if (m > 0) level_vectors(r, m);
    const float* coef_r = m > 0 ? coefs + r * K : nullptr;
    const T* pre = in_place ? ahead[r] : nullptr;
#define EMOKERN_WRITE(NP)                                                                    \
  if (m > 0) {                                                                               \
    if (with_res) level_write_row<T, NP, true, kFromFloat>(h[r], res[r], x[r], delta[r],     \
                                                           scale, m, coef_r, vk, D);         \
    else level_write_row<T, NP, false, kFromFloat>(h[r], nullptr, x[r], delta[r], scale, m,  \
                                                   coef_r, vk, D);                           \
  } else if (with_res) {                                                                     \
    write_row<T, NP, true>(h[r], res[r], x[r], delta[r], D, pre, scale);                     \
  } else {                                                                                   \
    write_row<T, NP, false>(h[r], nullptr, x[r], delta[r], D, pre, scale);                   \
  }
    if (P.norm_preserving) {
      EMOKERN_WRITE(true)
    } else {
      EMOKERN_WRITE(false)
    }
#undef EMOKERN_WRITE
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
  const bool readings = P.proj_out != nullptr || P.run_sum != nullptr;
  L.readings = readings;
  // Projection bounds: the directions some slot bounds (finite lower or upper). With none the
  // call is a call without bounds; with readings off only their projections are computed.
  if (P.bounds != nullptr) {
    int32_t* bounded = s.bounded.take(size_t(K));
    int64_t n = 0;
    for (int64_t k = 0; k < K; ++k) {
      bool finite = false;
      for (int64_t slot = 0; slot < P.n_slots && !finite; ++slot)
        finite = P.bounds[slot * 2 * K + k] > -INFINITY ||
                 P.bounds[(slot * 2 + 1) * K + k] < INFINITY;
      if (finite) bounded[n++] = int32_t(k);
    }
    L.leveled = n > 0;
    L.bounded = bounded;
    L.n_bounded = n;
    if (L.leveled && !readings && n < K) {
      L.dot_k = bounded;
      L.n_dots = n;
    }
  }
  L.need_proj = readings || L.leveled;
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
  // Bounds without norm preservation, on few dot products: the sweeps write the rows as without
  // bounds in one pass, keeping each row's x for the few that a bound corrects (decode: with
  // offsets from the weights, so on every vector). Other bounds with readings off take the
  // tiles, on the bounded vectors only; bounds on every vector the tiles too, unless norm
  // preserving (on this AVX2 machine faster than two sweeps over four vectors each).
  const int64_t kd = L.dot_k != nullptr ? L.n_dots : K;
  L.keep = L.leveled && !P.norm_preserving && kd <= kKeepSweepMaxK &&
           (per_slot || K <= kKeepSweepMaxK);
  L.tiles = !L.keep &&
            (L.dot_k != nullptr || (L.leveled && !P.norm_preserving) ||
             (K > (per_slot ? kSweepMaxK : kDecodeTilesAboveK) &&
              (L.need_proj || (!per_slot && !P.norm_preserving))));

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
  // Vectors ks[0 .. nk) (null: all K in order).
  auto pack_some = [&](float* packed, int64_t p_begin, int64_t p_end, const int32_t* ks,
                       int64_t nk) {
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int64_t c0 = p * panel, width = std::min(panel, D - c0);
      for (int64_t k = 0; k < nk; ++k) {
        float* dst = packed + (p * nk + k) * k_stride;
        std::memcpy(dst, P.vectors + (ks != nullptr ? ks[k] : k) * D + c0,
                    sizeof(float) * size_t(width));
        fill_n(dst + width, k_stride - width, 0.0f);
      }
    }
    return VView{packed, panel, nk * k_stride, k_stride};
  };
  auto pack = [&](float* packed, int64_t p_begin, int64_t p_end) {
    return pack_some(packed, p_begin, p_end, nullptr, K);
  };
  // Prefill packs once, for the offset table and every row; decode packs on each thread, inside
  // the parallel loop, into that thread's scratch: a core reading a copy another core has just
  // written pulls every line across.
  const bool pack_per_thread = pack_tiles && !per_slot;
  if (per_slot && (pack_tiles || P.n_slots >= kPackMinRows)) {
    float* packed = s.packed.take(size_t(n_panels * K * k_stride));
    at::parallel_for(0, n_panels, std::max<int64_t>(1, (1 << 16) / (K * panel)),
                     [&](int64_t begin, int64_t end) { pack(packed, begin, end); });
    L.V = VView{packed, panel, K * k_stride, k_stride};
  }

  if (L.leveled) {  // the pushes' share of every projection, once per slot; the per-row test's
                    // reads together (box)
    const int64_t S = P.n_slots, nb = L.n_bounded;
    float* push = s.push.take(size_t(S * K));
    float* box = s.box.take(size_t(S * 3 * nb));
    P.level_push(P, 0, S, push);
    for (int64_t slot = 0; slot < S; ++slot) {
      const float* q = push + slot * K;
      const float* lo = P.bounds + slot * 2 * K;
      float* b = box + slot * 3 * nb;
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t k = L.bounded[j];
        b[j] = lo[k];
        b[nb + j] = lo[K + k];
        b[2 * nb + j] = q[k];
      }
    }
    L.push = push;
    L.box = box;
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

  // The tiles' dot products: on the bounded vectors, packed once (small), or on all.
  L.Vd = L.V;
  if (L.tiles && L.dot_k != nullptr)
    L.Vd = pack_some(s.dot_vecs.take(size_t(n_panels * L.n_dots * k_stride)), 0, n_panels,
                     L.dot_k, L.n_dots);

  at::parallel_for(0, n_chunks, grain, [&](int64_t begin, int64_t end) {
    Scratch& ts = thread_scratch();
    Plan local = L;
    if (pack_per_thread) {
      local.V = pack(ts.packed.take(size_t(n_panels * K * k_stride)), 0, n_panels);
      if (L.dot_k == nullptr) local.Vd = local.V;
    }
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
