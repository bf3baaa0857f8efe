// The linear kernel on weights packed for VNNI (packed.h), one code path for every row count.
//
// Layout (engine.model.packed makes it): tiles of 16 output columns, each a run of K/32
// blocks; a block holds the 16 columns' 32 weights as unsigned bytes u with w = d * u + c:
//   q4_0x  u = q (0..15), c = -8 d    4 chunks of 64 bytes, then f16 d[16]          288 B
//   q4_1x  u = q,         c = m       4 chunks, f16 d[16], f16 m[16]                320 B
//   q8_0x  u = q + 128,   c = -128 d  8 chunks of 64 bytes, then f16 d[16]          544 B
//   int8x  u = q + 128,   c = -128 d  8 chunks; d = the column's float32 scale      512 B
// A chunk is [16 columns][4 bytes]: for the 8-bit formats chunk s holds elements 4s..4s+3
// of each column, so vpdpbusd multiplies it by one x row's 4 bytes (broadcast) into the 16
// columns' int32 lanes. The 4-bit formats stay 4 bits a weight: chunk j's low nibbles are
// elements 4j..4j+3 and its high nibbles elements 16+4j..16+4j+3 (one and, one shift and
// one and give both vpdpbusd operands), so batch 1 reads the bytes the GGUF blocks had.
//
// For x quantized per block (x = xd * xq, ds = xd * sum(xq)), a block's dot is
//   sum_e w[e] x[e] = (d * xd) * sum_e u[e] xq[e] + c * ds,
// integer sums exact, then per row and column f = fma(float(isum), d * xd, f);
// f = fma(c, ds, f) over the blocks in order. Those are the same operations in the same order
// whatever the number of rows and however rows and tiles are grouped into register tiles:
// a row's result does not depend on the batch it came in (batch invariance).

#include "packed.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace engine_cpu {
namespace {

#define PACKED_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

constexpr int kBlock = 32;

constexpr bool Nibbles(int32_t f) { return f == kQ4_0x || f == kQ4_1x; }
constexpr int QuantBytes(int32_t f) { return Nibbles(f) ? 256 : 512; }
constexpr int BlockBytes(int32_t f) {
  return f == kQ4_0x ? 288 : f == kQ4_1x ? 320 : f == kQ8_0x ? 544 : 512;
}

PACKED_FN inline __m512i Bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

PACKED_FN inline __mmask16 ColMask(int64_t n, int64_t col0) {
  const int64_t cols = std::min<int64_t>(kPackCols, n - col0);
  return cols >= kPackCols ? __mmask16(0xffff) : __mmask16((1u << cols) - 1);
}

// R x rows from r0 by CT tiles from t0: y[r0 + r, 16 (t0 + ct) + lane].
template <int32_t F, int R, int CT>
PACKED_FN void Kernel(const PackedArgs& a, int64_t t0, int64_t r0) {
  constexpr int BS = BlockBytes(F), QB = QuantBytes(F);
  const int64_t nb = a.k / kBlock, k = a.k;
  const uint8_t* w[CT];
  __m512 f[R][CT], scale[CT];
  for (int ct = 0; ct < CT; ++ct) {
    w[ct] = a.w + (t0 + ct) * nb * BS;
    if (F == kInt8x) {
      const int64_t col0 = (t0 + ct) * kPackCols;
      scale[ct] = _mm512_maskz_loadu_ps(ColMask(a.n, col0), a.scales + col0);
    }
    for (int r = 0; r < R; ++r) f[r][ct] = _mm512_setzero_ps();
  }
  const int8_t* x = a.xq + r0 * k;
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int64_t b = 0; b < nb; ++b) {
    __m512i acc[R][CT];
    for (int r = 0; r < R; ++r)
      for (int ct = 0; ct < CT; ++ct) acc[r][ct] = _mm512_setzero_si512();
    const int8_t* xb = x + b * kBlock;
    if (Nibbles(F)) {
      for (int j = 0; j < 4; ++j) {
        __m512i lo[CT], hi[CT];
        for (int ct = 0; ct < CT; ++ct) {
          const __m512i v = _mm512_loadu_si512(w[ct] + b * BS + 64 * j);
          lo[ct] = _mm512_and_si512(v, low);
          hi[ct] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        for (int r = 0; r < R; ++r) {
          const __m512i xl = Bcast4(xb + r * k + 4 * j), xh = Bcast4(xb + r * k + 16 + 4 * j);
          for (int ct = 0; ct < CT; ++ct) {
            acc[r][ct] = _mm512_dpbusd_epi32(acc[r][ct], lo[ct], xl);
            acc[r][ct] = _mm512_dpbusd_epi32(acc[r][ct], hi[ct], xh);
          }
        }
      }
    } else {
      for (int s = 0; s < 8; ++s) {
        __m512i v[CT];
        for (int ct = 0; ct < CT; ++ct) v[ct] = _mm512_loadu_si512(w[ct] + b * BS + 64 * s);
        for (int r = 0; r < R; ++r) {
          const __m512i xv = Bcast4(xb + r * k + 4 * s);
          for (int ct = 0; ct < CT; ++ct) acc[r][ct] = _mm512_dpbusd_epi32(acc[r][ct], v[ct], xv);
        }
      }
    }
    for (int ct = 0; ct < CT; ++ct) {
      const uint8_t* tail = w[ct] + b * BS + QB;
      __m512 d, c;
      if (F == kInt8x) {
        d = scale[ct];
      } else {
        d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tail)));
      }
      if (F == kQ4_1x) {
        c = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tail + 32)));
      } else {
        c = _mm512_mul_ps(d, _mm512_set1_ps(F == kQ4_0x ? -8.0f : -128.0f));
      }
      for (int r = 0; r < R; ++r) {
        const int64_t i = (r0 + r) * nb + b;
        const __m512 xs = _mm512_set1_ps(a.xd[i]), ds = _mm512_set1_ps(a.xds[i]);
        f[r][ct] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][ct]), _mm512_mul_ps(d, xs), f[r][ct]);
        f[r][ct] = _mm512_fmadd_ps(c, ds, f[r][ct]);
      }
    }
  }
  for (int ct = 0; ct < CT; ++ct) {
    const int64_t col0 = (t0 + ct) * kPackCols;
    const __mmask16 mask = ColMask(a.n, col0);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(a.y + (r0 + r) * a.n + col0, mask, f[r][ct]);
  }
}

// Tiles [t0, t0 + ct) (ct 1, 2 or 4) for every row: 4 rows by 2 tiles at a time (32 int32
// and float accumulators fit the 32 registers with room for the weights), the last 1-2 rows
// by up to 4 tiles (fewer x broadcasts per weight: batch 1 is bound by instructions).
template <int32_t F>
void Group(const PackedArgs& a, int64_t t0, int ct) {
  int64_t r = 0;
  for (; r + 4 <= a.m; r += 4) {
    if (ct == 1) {
      Kernel<F, 4, 1>(a, t0, r);
    } else {
      for (int c = 0; c < ct; c += 2) Kernel<F, 4, 2>(a, t0 + c, r);
    }
  }
  const int64_t rest = a.m - r;
  if (rest == 3) {
    if (ct == 1) {
      Kernel<F, 3, 1>(a, t0, r);
    } else {
      for (int c = 0; c < ct; c += 2) Kernel<F, 3, 2>(a, t0 + c, r);
    }
  } else if (rest > 0) {
    auto run = rest == 2 ? (ct == 4 ? Kernel<F, 2, 4> : ct == 2 ? Kernel<F, 2, 2> : Kernel<F, 2, 1>)
                         : (ct == 4 ? Kernel<F, 1, 4> : ct == 2 ? Kernel<F, 1, 2> : Kernel<F, 1, 1>);
    run(a, t0, r);
  }
}

template <int32_t F>
void Tiles(const PackedArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1;) {
    const int ct = t1 - t >= 4 ? 4 : t1 - t >= 2 ? 2 : 1;
    Group<F>(a, t, ct);
    t += ct;
  }
}

}  // namespace

void PackedTiles(const PackedArgs& a, int64_t t0, int64_t t1) {
  switch (a.fmt) {
    case kQ4_0x: return Tiles<kQ4_0x>(a, t0, t1);
    case kQ4_1x: return Tiles<kQ4_1x>(a, t0, t1);
    case kQ8_0x: return Tiles<kQ8_0x>(a, t0, t1);
    case kInt8x: return Tiles<kInt8x>(a, t0, t1);
  }
}

}  // namespace engine_cpu
