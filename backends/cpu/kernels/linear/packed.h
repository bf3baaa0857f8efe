// Weights packed once at load for AVX-512 VNNI (level 3 and up): the formats q4_0x, q4_1x,
// q8_0x and int8x (engine.model.packed describes the layout and packs it). packed.cc holds
// the one kernel every row count runs on them; linear.cc quantizes x, checks the buffers
// and spreads the tiles over its pool.

#pragma once

#include <cstdint>

namespace engine_cpu {

constexpr int32_t kQ4_0x = 8, kQ4_1x = 9, kQ8_0x = 10, kInt8x = 11;
constexpr int kPackCols = 16;  // output columns of a packed tile (one int32 lane each)

inline bool IsPacked(int32_t fmt) { return fmt >= kQ4_0x && fmt <= kInt8x; }

// Bytes of one tile's block of 32 weights along K (16 columns).
inline int64_t PackedBlockBytes(int32_t fmt) {
  return fmt == kQ4_0x ? 288 : fmt == kQ4_1x ? 320 : fmt == kQ8_0x ? 544 : 512;
}

// Bytes of a whole packed weight of N outputs and K inputs (N padded to whole tiles).
inline int64_t PackedBytes(int32_t fmt, int64_t n, int64_t k) {
  return (n + kPackCols - 1) / kPackCols * (k / 32) * PackedBlockBytes(fmt);
}

struct PackedArgs {
  const int8_t* xq;   // [M, K] x quantized per block of 32
  const float* xd;    // [M, K / 32] the blocks' scales
  const float* xds;   // [M, K / 32] scale times the block's sum of q
  const uint8_t* w;   // the packed tiles
  const float* scales;  // int8x: [N] per output channel; otherwise unused
  float* y;           // [M, N]
  int64_t m, n, k;
  int32_t fmt;
};

// y's columns of tiles [t0, t1) for every row of x.
void PackedTiles(const PackedArgs& a, int64_t t0, int64_t t1);

}  // namespace engine_cpu
