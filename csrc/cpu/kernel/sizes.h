// CPU kernel, layer 2 of 5: sizes per instruction set (how many logical vectors fit the
// registers: tile shapes, sweep rows, block and chunk rows, panel widths, the threading grain)
// and VView, the vectors as the tiles read them (in place or packed panel-major).
//
// Includes: vec.h only.
#pragma once

#include "vec.h"

#include <algorithm>
#include <cstdint>

namespace emokern {
namespace cpu {
namespace CPU_CAPABILITY {

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

// The vectors as the tiles read them: vector k's columns [p * width, (p + 1) * width) start at
// base + p * panel_stride + k * k_stride. Unpacked: panel_stride = width, k_stride = D.
// Packed: panels of K x k_stride floats (width plus a line), zero padded.
struct VView {
  const float* base;
  int64_t width, panel_stride, k_stride;
  const float* panel(int64_t p) const { return base + p * panel_stride; }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace emokern
