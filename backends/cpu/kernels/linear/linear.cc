// The CPU linear layer y[M, N] = x[M, K] @ W^T as an XLA FFI handler, W stored by output
// channel: row n of W holds the K weights of output n (PyTorch's and GGUF's layout), in one
// of these formats (the `fmt` attribute, engine.model.quant.FORMATS keeps the same numbers):
//   0 f32   float32 [N, K]
//   1 bf16  bfloat16 [N, K] (uint16 bits)
//   2 int8  int8 [N, K] with float32 scales [N] (weight-only, per output channel)
//   3 q8_0  GGUF blocks of 32 along K: f16 d, 32 x int8 q; w = d * q          (34 bytes)
//   4 q4_0  GGUF blocks of 32: f16 d, 16 bytes of nibbles; w = d * (q - 8)    (18 bytes)
//   5 q4_1  GGUF blocks of 32: f16 d, f16 m, 16 bytes of nibbles; w = d*q + m (20 bytes)
//   6 q4_k  GGUF super-blocks of 256 (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales
//           and mins, 128 bytes of nibbles; sub-block s of 32: w = d*sc[s]*q - dmin*mn[s]
//   7 q6_k  GGUF super-blocks of 256 (210 bytes): 128 bytes low nibbles, 64 bytes high 2-bit
//           pairs, 16 int8 scales, f16 d; sub-block h of 16: w = d*sc[h]*(q - 32)
// In a nibble block, byte j holds element j in its low nibble and element j + 16 in its high.
//   8 q4_0x, 9 q4_1x, 10 q8_0x, 11 int8x: q4_0, q4_1, q8_0 and int8 packed at load for VNNI
//           (level 3 and up, integer activations only); packed.h and packed.cc.
//
// Activations (the `act` attribute): 0 float32 as given; 1 quantized per block of 32 to int8
// (llama.cpp's Q8 activations: d = max|x| * (1/127), q = round-half-even(x * (1/d))) and
// dotted with the weights' integers (block formats and int8 only, K a multiple of 32); see
// "Integer dots" below. engine.model.quant.quantize_activations is the same arithmetic.
//
// The work is split over tiles of 4 output rows: a tile's rows are decoded to float32 in a
// thread-local buffer (f32 rows are read in place), then every x row is dotted with the 4
// decoded rows (each x load feeds 4 FMAs). Batch-1 decode is bound by reading W, so the
// tiles are shared among a small pool of threads (one per core).
//
// ISA levels (the `isa` attribute, chosen in Python from engine_cpu_isa() and the
// ENGINE_CPU_ISA override): 0 generic C++, 1 AVX2 + FMA + F16C, 2 AVX-512 F/BW/VL. Every
// level computes the same sums in float32; only the summation order differs. Level 3 is
// level 2 with AVX-512 VNNI (vpdpbusd) for the integer dots. Level 4 is level 3 plus AMX
// bf16 tiles for steps above kDirectRows rows (see "AMX" below; it needs the OS's permission,
// asked for once, and a compiler that knows the AMX intrinsics: gcc 11, clang 12).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <sched.h>

#include "packed.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Fmt : int32_t {
  F32 = 0, BF16 = 1, INT8 = 2, Q8_0 = 3, Q4_0 = 4, Q4_1 = 5, Q4_K = 6, Q6_K = 7, NUM_FMTS = 12
};
using engine_cpu::IsPacked;
constexpr int kTile = 4;    // output rows decoded together
constexpr int kBlock = 32;  // GGUF block length along K
constexpr int kSuper = 256;  // GGUF K-quant super-block length
constexpr int kRowChunk = 64;  // x rows a float tile pass covers (64 x 1536 floats: 384 KiB)
constexpr int kDirectRows = 4;  // up to this many x rows, integer dots skip the decoded tile

// Bytes of one W row of K weights.
int64_t RowBytes(int32_t fmt, int64_t k) {
  switch (fmt) {
    case F32: return 4 * k;
    case BF16: return 2 * k;
    case INT8: return k;
    case Q8_0: return k / kBlock * 34;
    case Q4_0: return k / kBlock * 18;
    case Q4_1: return k / kBlock * 20;
    case Q4_K: return k / kSuper * 144;
    case Q6_K: return k / kSuper * 210;
  }
  return -1;
}

float HalfToFloat(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t Load16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }

// ---------------------------------------------------------------------------------------
// Generic C++ (level 0).

void DecodeRowGeneric(int32_t fmt, const uint8_t* row, int64_t k, float* out) {
  if (fmt == BF16) {
    for (int64_t i = 0; i < k; ++i) {
      uint32_t bits = uint32_t(Load16(row + 2 * i)) << 16;
      std::memcpy(out + i, &bits, 4);
    }
  } else if (fmt == INT8) {
    for (int64_t i = 0; i < k; ++i) out[i] = float(int8_t(row[i]));
  } else if (fmt == Q8_0) {
    for (int64_t b = 0; b < k / kBlock; ++b, row += 34) {
      float d = HalfToFloat(Load16(row));
      for (int j = 0; j < kBlock; ++j) out[b * kBlock + j] = d * float(int8_t(row[2 + j]));
    }
  } else {  // Q4_0, Q4_1
    const int head = fmt == Q4_0 ? 2 : 4;
    for (int64_t b = 0; b < k / kBlock; ++b, row += head + 16) {
      float d = HalfToFloat(Load16(row));
      float m = fmt == Q4_0 ? -8.0f * d : HalfToFloat(Load16(row + 2));
      float* o = out + b * kBlock;
      for (int j = 0; j < 16; ++j) {
        o[j] = d * float(row[head + j] & 0xf) + m;
        o[j + 16] = d * float(row[head + j] >> 4) + m;
      }
    }
  }
}

// y[j] = dot(x, w[j]) for the tile's rows j < rows.
void DotTileGeneric(const float* x, const float* const* w, int rows, int64_t k, float* y) {
  for (int j = 0; j < rows; ++j) {
    float s = 0.0f;
    for (int64_t i = 0; i < k; ++i) s += x[i] * w[j][i];
    y[j] = s;
  }
}

// ---------------------------------------------------------------------------------------
// AVX2 + FMA + F16C (level 1).

#define AVX2_FN __attribute__((target("avx2,fma,f16c")))

AVX2_FN inline float Hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 unsigned bytes -> 8 floats.
AVX2_FN inline __m256 U8ToPs(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }

AVX2_FN void DecodeRowAvx2(int32_t fmt, const uint8_t* row, int64_t k, float* out) {
  if (fmt == BF16) {
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i));
      __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
      _mm256_storeu_ps(out + i, _mm256_castsi256_ps(w));
    }
    DecodeRowGeneric(fmt, row + 2 * i, k - i, out + i);
  } else if (fmt == INT8) {
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + i));
      _mm256_storeu_ps(out + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
    }
    DecodeRowGeneric(fmt, row + i, k - i, out + i);
  } else if (fmt == Q8_0) {
    for (int64_t b = 0; b < k / kBlock; ++b, row += 34) {
      __m256 d = _mm256_set1_ps(_cvtsh_ss(Load16(row)));
      for (int j = 0; j < kBlock; j += 8) {
        __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 2 + j));
        __m256 w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
        _mm256_storeu_ps(out + b * kBlock + j, w);
      }
    }
  } else {  // Q4_0, Q4_1
    const int head = fmt == Q4_0 ? 2 : 4;
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int64_t b = 0; b < k / kBlock; ++b, row += head + 16) {
      float df = _cvtsh_ss(Load16(row));
      __m256 d = _mm256_set1_ps(df);
      __m256 m = _mm256_set1_ps(fmt == Q4_0 ? -8.0f * df : _cvtsh_ss(Load16(row + 2)));
      __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + head));
      __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
      float* o = out + b * kBlock;
      _mm256_storeu_ps(o, _mm256_fmadd_ps(d, U8ToPs(lo), m));
      _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(d, U8ToPs(_mm_srli_si128(lo, 8)), m));
      _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(d, U8ToPs(hi), m));
      _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(d, U8ToPs(_mm_srli_si128(hi, 8)), m));
    }
  }
}

AVX2_FN void DotTileAvx2(const float* x, const float* const* w, int rows, int64_t k, float* y) {
  if (rows < kTile) return DotTileGeneric(x, w, rows, k, y);
  // Two accumulators per row (16 columns a step) keep 8 FMAs in flight.
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m256 xa = _mm256_loadu_ps(x + i), xb = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w[0] + i), a0);
    a1 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w[1] + i), a1);
    a2 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w[2] + i), a2);
    a3 = _mm256_fmadd_ps(xa, _mm256_loadu_ps(w[3] + i), a3);
    b0 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w[0] + i + 8), b0);
    b1 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w[1] + i + 8), b1);
    b2 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w[2] + i + 8), b2);
    b3 = _mm256_fmadd_ps(xb, _mm256_loadu_ps(w[3] + i + 8), b3);
  }
  float s[kTile] = {Hsum256(_mm256_add_ps(a0, b0)), Hsum256(_mm256_add_ps(a1, b1)),
                    Hsum256(_mm256_add_ps(a2, b2)), Hsum256(_mm256_add_ps(a3, b3))};
  for (int j = 0; j < kTile; ++j) {
    for (int64_t t = i; t < k; ++t) s[j] += x[t] * w[j][t];
    y[j] = s[j];
  }
}

// ---------------------------------------------------------------------------------------
// AVX-512 F/BW/VL (level 2): wider dot products; the GGUF blocks decode as in AVX2.

#define AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

AVX512_FN void DecodeRowAvx512(int32_t fmt, const uint8_t* row, int64_t k, float* out) {
  int64_t i = 0;
  if (fmt == BF16) {
    for (; i + 16 <= k; i += 16) {
      __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * i));
      __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
      _mm512_storeu_ps(out + i, _mm512_castsi512_ps(w));
    }
    DecodeRowAvx2(fmt, row + 2 * i, k - i, out + i);
  } else if (fmt == INT8) {
    for (; i + 16 <= k; i += 16) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i));
      _mm512_storeu_ps(out + i, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
    }
    DecodeRowAvx2(fmt, row + i, k - i, out + i);
  } else {
    DecodeRowAvx2(fmt, row, k, out);
  }
}

AVX512_FN void DotTileAvx512(const float* x, const float* const* w, int rows, int64_t k,
                             float* y) {
  if (rows < kTile) return DotTileGeneric(x, w, rows, k, y);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    __m512 xa = _mm512_loadu_ps(x + i), xb = _mm512_loadu_ps(x + i + 16);
    a0 = _mm512_fmadd_ps(xa, _mm512_loadu_ps(w[0] + i), a0);
    a1 = _mm512_fmadd_ps(xa, _mm512_loadu_ps(w[1] + i), a1);
    a2 = _mm512_fmadd_ps(xa, _mm512_loadu_ps(w[2] + i), a2);
    a3 = _mm512_fmadd_ps(xa, _mm512_loadu_ps(w[3] + i), a3);
    b0 = _mm512_fmadd_ps(xb, _mm512_loadu_ps(w[0] + i + 16), b0);
    b1 = _mm512_fmadd_ps(xb, _mm512_loadu_ps(w[1] + i + 16), b1);
    b2 = _mm512_fmadd_ps(xb, _mm512_loadu_ps(w[2] + i + 16), b2);
    b3 = _mm512_fmadd_ps(xb, _mm512_loadu_ps(w[3] + i + 16), b3);
  }
  float s[kTile] = {_mm512_reduce_add_ps(_mm512_add_ps(a0, b0)),
                    _mm512_reduce_add_ps(_mm512_add_ps(a1, b1)),
                    _mm512_reduce_add_ps(_mm512_add_ps(a2, b2)),
                    _mm512_reduce_add_ps(_mm512_add_ps(a3, b3))};
  for (int j = 0; j < kTile; ++j) {
    for (int64_t t = i; t < k; ++t) s[j] += x[t] * w[j][t];
    y[j] = s[j];
  }
}

// Several x rows at once (register tiles of kTile weight rows x R x rows): each weight load
// feeds R FMAs and each x load kTile, so steps of many rows stay bound by the FMAs, not the
// loads. y[r * ldy + j] for r < R, j < kTile (full tiles only).
AVX2_FN void DotRowsAvx2(const float* x, int64_t ldx, const float* const* w, int64_t k,
                         float* y, int64_t ldy) {
  constexpr int R = 2;
  __m256 acc[R][kTile];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kTile; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * ldx + i);
    for (int j = 0; j < kTile; ++j) {
      const __m256 wv = _mm256_loadu_ps(w[j] + i);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(xv[r], wv, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < kTile; ++j) {
      float s = Hsum256(acc[r][j]);
      for (int64_t t = i; t < k; ++t) s += x[r * ldx + t] * w[j][t];
      y[r * ldy + j] = s;
    }
  }
}

AVX512_FN void DotRowsAvx512(const float* x, int64_t ldx, const float* const* w, int64_t k,
                             float* y, int64_t ldy) {
  constexpr int R = 4;
  __m512 acc[R][kTile];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kTile; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_ps(x + r * ldx + i);
    for (int j = 0; j < kTile; ++j) {
      const __m512 wv = _mm512_loadu_ps(w[j] + i);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_fmadd_ps(xv[r], wv, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < kTile; ++j) {
      float s = _mm512_reduce_add_ps(acc[r][j]);
      for (int64_t t = i; t < k; ++t) s += x[r * ldx + t] * w[j][t];
      y[r * ldy + j] = s;
    }
  }
}
constexpr int kRowsAvx2 = 2, kRowsAvx512 = 4;  // R of DotRowsAvx2 / DotRowsAvx512

// ---------------------------------------------------------------------------------------
// Integer dots (act = 1). Activations: per row, per block b of 32, int8 q [K], float d [B]
// and ds[b] = d[b] * sum(q of block b) (for the weights' offsets). A weight row is decoded
// per block into int8 q (|q| <= 128), a = |q| as unsigned bytes, two half-block scales and
// an offset: w[e] = d[e / 16] * q[e] + c[e / 32]. So a block's dot is
//   xd[b] * (wd[2b] * isum(elements 0-15) + wd[2b + 1] * isum(16-31)) + c[b] * ds[b].
// The SIMD dots take |w| (unsigned) times sign(w) * x (signed), in int32 lanes of 4 products:
// lanes 0-3 hold elements 0-15, so each half-block scale is stored 4 times (d8, [B * 8]).

struct IntRows {  // kTile decoded weight rows
  int8_t* q[kTile];
  uint8_t* a[kTile];
  float* d8[kTile];  // [B * 8]
  float* c[kTile];   // [B]
};

// One block of 32 weights: q[32] signed, the two half-block scales and the offset.
void DecodeBlockGeneric(int32_t fmt, const uint8_t* row, int64_t b, float scale, int8_t* q,
                        float* d2, float* c) {
  *c = 0.0f;
  if (fmt == INT8) {
    std::memcpy(q, row + b * kBlock, kBlock);
    d2[0] = d2[1] = scale;
  } else if (fmt == Q8_0) {
    const uint8_t* p = row + b * 34;
    std::memcpy(q, p + 2, kBlock);
    d2[0] = d2[1] = HalfToFloat(Load16(p));
  } else if (fmt == Q4_0 || fmt == Q4_1) {
    const int head = fmt == Q4_0 ? 2 : 4;
    const uint8_t* p = row + b * (head + 16);
    const int off = fmt == Q4_0 ? 8 : 0;
    for (int j = 0; j < 16; ++j) {
      q[j] = int8_t((p[head + j] & 0xf) - off);
      q[j + 16] = int8_t((p[head + j] >> 4) - off);
    }
    d2[0] = d2[1] = HalfToFloat(Load16(p));
    if (fmt == Q4_1) *c = HalfToFloat(Load16(p + 2));
  } else if (fmt == Q4_K) {
    const uint8_t* p = row + (b / 8) * 144;
    const int s = int(b % 8);
    const uint8_t* sc = p + 4;
    int scale6, min6;
    if (s < 4) {
      scale6 = sc[s] & 63;
      min6 = sc[s + 4] & 63;
    } else {
      scale6 = (sc[s + 4] & 0xf) | ((sc[s - 4] >> 6) << 4);
      min6 = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    }
    const uint8_t* qs = p + 16 + 32 * (s / 2);
    for (int j = 0; j < kBlock; ++j) q[j] = int8_t(s % 2 ? qs[j] >> 4 : qs[j] & 0xf);
    d2[0] = d2[1] = HalfToFloat(Load16(p)) * float(scale6);
    *c = -(HalfToFloat(Load16(p + 2)) * float(min6));
  } else {  // Q6_K
    const uint8_t* p = row + (b / 8) * 210;
    const int s = int(b % 8), n = s / 4, t = s % 4;
    const uint8_t* ql = p + 64 * n + 32 * (t & 1);
    const uint8_t* qh = p + 128 + 32 * n;
    for (int j = 0; j < kBlock; ++j) {
      int lo = t < 2 ? ql[j] & 0xf : ql[j] >> 4;
      q[j] = int8_t((lo | (((qh[j] >> (2 * t)) & 3) << 4)) - 32);
    }
    const float d = HalfToFloat(Load16(p + 208));
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    d2[0] = d * float(sc[2 * s]);
    d2[1] = d * float(sc[2 * s + 1]);
  }
}

bool HasOffset(int32_t fmt) { return fmt == Q4_1 || fmt == Q4_K; }

void DecodeRowIntGeneric(int32_t fmt, const uint8_t* row, int64_t k, float scale, int8_t* q,
                         uint8_t* a, float* d8, float* c) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    float d2[2];
    DecodeBlockGeneric(fmt, row, b, scale, q + b * kBlock, d2, c + b);
    for (int j = 0; j < kBlock; ++j) {
      int v = q[b * kBlock + j];
      a[b * kBlock + j] = uint8_t(v < 0 ? -v : v);
    }
    for (int l = 0; l < 8; ++l) d8[b * 8 + l] = d2[l / 4];
  }
}

// A float32 row from the integer decoding (the float path of the K-quants).
void DecodeRowViaInt(int32_t fmt, const uint8_t* row, int64_t k, float* out) {
  int8_t q[kBlock];
  for (int64_t b = 0; b < k / kBlock; ++b) {
    float d2[2], c;
    DecodeBlockGeneric(fmt, row, b, 1.0f, q, d2, &c);
    for (int j = 0; j < kBlock; ++j) out[b * kBlock + j] = d2[j / 16] * float(q[j]) + c;
  }
}

// xf (optional): the quantized row as floats d * q.
void QuantizeRowGeneric(const float* x, int64_t k, int8_t* q, float* d, float* ds, float* xf) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.0f;
    for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float db = amax * (1.0f / 127.0f), id = db > 0.0f ? 1.0f / db : 0.0f;
    int sum = 0;
    for (int j = 0; j < kBlock; ++j) {
      const int v = int(std::max(-127.0f, std::min(127.0f, std::nearbyint(xb[j] * id))));
      q[b * kBlock + j] = int8_t(v);
      if (xf) xf[b * kBlock + j] = float(v) * db;
      sum += v;
    }
    d[b] = db;
    ds[b] = db * float(sum);
  }
}

// y[j] for the tile's kTile rows: one activation row against the decoded weight rows.
void DotIntGeneric(const int8_t* xq, const float* xd, const float* xds, const IntRows& w,
                   int64_t nb, bool offset, float* y) {
  for (int j = 0; j < kTile; ++j) {
    float s = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t i0 = 0, i1 = 0;
      const int8_t *xp = xq + b * kBlock, *wp = w.q[j] + b * kBlock;
      for (int e = 0; e < 16; ++e) i0 += int32_t(xp[e]) * wp[e];
      for (int e = 16; e < 32; ++e) i1 += int32_t(xp[e]) * wp[e];
      s += xd[b] * (w.d8[j][b * 8] * float(i0) + w.d8[j][b * 8 + 4] * float(i1));
    }
    if (offset) {
      for (int64_t b = 0; b < nb; ++b) s += w.c[j][b] * xds[b];
    }
    y[j] = s;
  }
}

AVX2_FN void QuantizeRowAvx2(const float* x, int64_t k, int8_t* q, float* d, float* ds,
                             float* xf) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
    __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float db = _mm_cvtss_f32(h) * (1.0f / 127.0f), id = db > 0.0f ? 1.0f / db : 0.0f;
    const __m256 iv = _mm256_set1_ps(id);
    // cvtps rounds half to even (the default MXCSR mode), as jnp.round does.
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, iv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, iv));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, iv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, iv));
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    // packs work per 128-bit lane: bytes come out as dwords 0,2,4,6,1,3,5,7 of the row.
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), p);
    if (xf) {
      const __m256 dv = _mm256_set1_ps(db);
      float* o = xf + b * kBlock;
      _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(i0), dv));
      _mm256_storeu_ps(o + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(i1), dv));
      _mm256_storeu_ps(o + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(i2), dv));
      _mm256_storeu_ps(o + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(i3), dv));
    }
    d[b] = db;
    ds[b] = db * float(_mm_cvtsi128_si32(s4));
  }
}

// Nibbles of a 16-byte span as 32 bytes: element j low nibble of byte j, j + 16 high.
AVX2_FN inline __m256i Nibbles16(const uint8_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low = _mm_set1_epi8(0x0f);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
}

AVX2_FN void DecodeRowIntAvx2(int32_t fmt, const uint8_t* row, int64_t k, float scale,
                              int8_t* q, uint8_t* a, float* d8, float* c) {
  if (fmt == Q4_K || fmt == Q6_K) return DecodeRowIntGeneric(fmt, row, k, scale, q, a, d8, c);
  const __m256i eight = _mm256_set1_epi8(8);
  for (int64_t b = 0; b < k / kBlock; ++b) {
    __m256i v;
    float d, cb = 0.0f;
    if (fmt == INT8) {
      v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
      d = scale;
    } else if (fmt == Q8_0) {
      const uint8_t* p = row + b * 34;
      v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
      d = _cvtsh_ss(Load16(p));
    } else if (fmt == Q4_0) {
      const uint8_t* p = row + b * 18;
      v = _mm256_sub_epi8(Nibbles16(p + 2), eight);
      d = _cvtsh_ss(Load16(p));
    } else {  // Q4_1
      const uint8_t* p = row + b * 20;
      v = Nibbles16(p + 4);
      d = _cvtsh_ss(Load16(p));
      cb = _cvtsh_ss(Load16(p + 2));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + b * kBlock), _mm256_abs_epi8(v));
    _mm256_storeu_ps(d8 + b * 8, _mm256_set1_ps(d));
    c[b] = cb;
  }
}

// The SIMD integer dot, kTile weight rows at once; DOT32(a, sx) sums 4 adjacent byte
// products of |w| (unsigned) and sign(w) * x (signed) into 8 int32 lanes.
#define DOT_INT_BODY(DOT32)                                                                 \
  __m256 acc[kTile];                                                                        \
  for (int j = 0; j < kTile; ++j) acc[j] = _mm256_setzero_ps();                            \
  for (int64_t b = 0; b < nb; ++b) {                                                        \
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock)); \
    const __m256 xs = _mm256_set1_ps(xd[b]);                                                \
    for (int j = 0; j < kTile; ++j) {                                                       \
      const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q[j] + b * kBlock)); \
      const __m256i wa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.a[j] + b * kBlock)); \
      const __m256i s = DOT32(wa, _mm256_sign_epi8(xv, wq));                                \
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s),                                       \
                               _mm256_mul_ps(xs, _mm256_loadu_ps(w.d8[j] + b * 8)), acc[j]); \
    }                                                                                       \
  }                                                                                         \
  for (int j = 0; j < kTile; ++j) {                                                         \
    float s = Hsum256(acc[j]);                                                              \
    if (offset) {                                                                           \
      for (int64_t b = 0; b < nb; ++b) s += w.c[j][b] * xds[b];                             \
    }                                                                                       \
    y[j] = s;                                                                               \
  }

AVX2_FN inline __m256i Dot32Avx2(__m256i a, __m256i sx) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, sx), _mm256_set1_epi16(1));
}

AVX2_FN void DotIntAvx2(const int8_t* xq, const float* xd, const float* xds, const IntRows& w,
                        int64_t nb, bool offset, float* y) {
  DOT_INT_BODY(Dot32Avx2)
}

#define VNNI_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

VNNI_FN inline __m256i Dot32Vnni(__m256i a, __m256i sx) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, sx);
}

VNNI_FN void DotIntVnni(const int8_t* xq, const float* xd, const float* xds, const IntRows& w,
                        int64_t nb, bool offset, float* y) {
  DOT_INT_BODY(Dot32Vnni)
}

// Few activation rows (decode steps): each weight row's blocks are unpacked in registers
// once and dotted with every x row directly, without the decoded tile. Nibble formats dot their
// unsigned nibbles q in [0, 15] with x (w = d*q + c, c = -8d for q4_0, m for q4_1); q8_0 and
// int8 take |w| and sign(w) * x. DOT32 as in DOT_INT_BODY.
#define DOT_DIRECT_BODY(DOT32)                                                              \
  const int64_t nb = k / kBlock;                                                            \
  const __m128i low = _mm_set1_epi8(0x0f);                                                  \
  __m256 acc[kDirectRows];                                                                  \
  float off[kDirectRows];                                                                   \
  for (int64_t i = 0; i < m; ++i) acc[i] = _mm256_setzero_ps(), off[i] = 0.0f;             \
  for (int64_t b = 0; b < nb; ++b) {                                                        \
    const bool nibbles = fmt == Q4_0 || fmt == Q4_1;                                        \
    __m256i wv, wa;                                                                         \
    float d, c = 0.0f;                                                                      \
    if (!nibbles) {                                                                         \
      const uint8_t* p = fmt == INT8 ? row + b * kBlock : row + b * 34 + 2;                 \
      wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));                         \
      wa = _mm256_abs_epi8(wv);                                                             \
      d = fmt == INT8 ? scale : _cvtsh_ss(Load16(row + b * 34));                            \
    } else {                                                                                \
      const int head = fmt == Q4_0 ? 2 : 4;                                                 \
      const uint8_t* p = row + b * (head + 16);                                             \
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + head));        \
      wa = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low)); \
      wv = wa;                                                                              \
      d = _cvtsh_ss(Load16(p));                                                             \
      c = fmt == Q4_0 ? -8.0f * d : _cvtsh_ss(Load16(p + 2));                               \
    }                                                                                       \
    for (int64_t i = 0; i < m; ++i) {                                                       \
      const __m256i xv =                                                                    \
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * k + b * kBlock));    \
      const __m256i s = DOT32(wa, nibbles ? xv : _mm256_sign_epi8(xv, wv));                 \
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(xd[i * nb + b] * d), acc[i]); \
      off[i] += c * xds[i * nb + b];                                                        \
    }                                                                                       \
  }                                                                                         \
  for (int64_t i = 0; i < m; ++i) y[i] = Hsum256(acc[i]) + off[i];

// y[i] (i < m) = dot of activation row i with one weight row (formats int8, q8_0, q4_0, q4_1).
AVX2_FN void DotDirectAvx2(int32_t fmt, const uint8_t* row, float scale, const int8_t* xq,
                           const float* xd, const float* xds, int64_t m, int64_t k, float* y) {
  DOT_DIRECT_BODY(Dot32Avx2)
}

VNNI_FN void DotDirectVnni(int32_t fmt, const uint8_t* row, float scale, const int8_t* xq,
                           const float* xd, const float* xds, int64_t m, int64_t k, float* y) {
  DOT_DIRECT_BODY(Dot32Vnni)
}

// ---------------------------------------------------------------------------------------
// A small pool: parallel_for(n, fn) runs fn(0..n-1) on the caller and the workers. Workers
// spin briefly after a job (the next linear layer follows within microseconds in a decode
// step), then sleep on a condition variable so an idle engine costs no CPU.

class Pool {
 public:
  Pool() {
    cpu_set_t set;
    int cores = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set)
                                                             : int(std::thread::hardware_concurrency());
    for (int t = 1; t < std::max(cores, 1); ++t) workers_.emplace_back([this] { Work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      ++gen_;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return int(workers_.size()) + 1; }

  void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn) {
    // One job at a time; a concurrent caller (XLA may run independent ops in parallel) runs
    // its job alone rather than waiting.
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || workers_.empty() || n == 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      done_.store(0);
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    Drain();
    while (done_.load(std::memory_order_acquire) < n) _mm_pause();
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = nullptr;  // no worker joins this job from here on
    }
    while (active_.load(std::memory_order_acquire) > 0) _mm_pause();  // all out of Drain
  }

 private:
  void Drain() {
    for (int64_t i; (i = next_.fetch_add(1)) < n_;) {
      (*fn_)(i);
      done_.fetch_add(1, std::memory_order_release);
    }
  }
  void Work() {
    uint64_t seen = 0;
    for (;;) {
      for (int spin = 0; spin < 20000 && gen_.load() == seen; ++spin) _mm_pause();
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return gen_.load() != seen; });
      seen = gen_.load();
      if (stop_) return;
      if (fn_ == nullptr) continue;  // woke after the job was finished
      active_.fetch_add(1);
      lock.unlock();
      Drain();
      active_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, busy_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> next_{0}, done_{0};
  std::atomic<int> active_{0};  // workers inside Drain()
  int64_t n_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  bool stop_ = false;
};

Pool& GetPool() {
  static Pool* pool = new Pool();  // never destroyed: workers may outlive static teardown
  return *pool;
}

bool CpuHasAmx();

bool CpuHas(int level) {
  __builtin_cpu_init();
  if (level >= 4 && !CpuHasAmx()) return false;
  if (level >= 3 && !__builtin_cpu_supports("avx512vnni")) return false;
  if (level >= 2 && !(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl"))) {
    return false;
  }
  return level < 1 || (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                       __builtin_cpu_supports("f16c"));
}

// Runs run_tiles(t0, t1) over [0, tiles) on the pool; below ~64k multiply-adds a job is
// cheaper alone than handed to the pool.
template <typename F>
void ForTiles(int64_t tiles, int64_t work, const F& run_tiles) {
  Pool& pool = GetPool();
  const int64_t chunks = work < (1 << 16) ? 1 : std::min<int64_t>(tiles, 4 * pool.size());
  if (chunks <= 1) {
    run_tiles(0, tiles);
  } else {
    pool.ParallelFor(chunks, [&](int64_t c) {
      run_tiles(tiles * c / chunks, tiles * (c + 1) / chunks);
    });
  }
}

// act = 0: every tile's rows decoded to float32 (f32 read in place), dotted with float x.
void LinearFloat(const float* xp, const uint8_t* wp, const float* sp, float* yp, int64_t m,
                 int64_t n, int64_t k, int32_t fmt, int32_t isa) {
  auto decode = fmt == Q4_K || fmt == Q6_K ? DecodeRowViaInt
                : isa >= 2                 ? DecodeRowAvx512
                : isa == 1                 ? DecodeRowAvx2
                                           : DecodeRowGeneric;
  auto dot = isa >= 2 ? DotTileAvx512 : isa == 1 ? DotTileAvx2 : DotTileGeneric;
  const int64_t row_bytes = RowBytes(fmt, k), tiles = (n + kTile - 1) / kTile;
  ForTiles(tiles, m * n * k, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> buf;
    if (fmt != F32 && int64_t(buf.size()) < kTile * k) buf.resize(kTile * k);
    // x in chunks of kRowChunk rows that stay in L2 while the tiles pass over them (a
    // tile's rows are decoded again for each chunk).
    for (int64_t m0 = 0; m0 < m; m0 += kRowChunk)
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTile, m1 = std::min(m, m0 + kRowChunk);
      const int rows = int(std::min<int64_t>(kTile, n - n0));
      const float* wr[kTile];
      for (int j = 0; j < rows; ++j) {
        const uint8_t* row = wp + (n0 + j) * row_bytes;
        if (fmt == F32) {
          wr[j] = reinterpret_cast<const float*>(row);
        } else {
          decode(fmt, row, k, buf.data() + j * k);
          wr[j] = buf.data() + j * k;
        }
      }
      float out[kRowsAvx512 * kTile];
      int64_t r = m0;
      if (rows == kTile && isa >= 1) {  // register tiles of R x rows
        const int64_t step = isa >= 2 ? kRowsAvx512 : kRowsAvx2;
        for (; r + step <= m1; r += step) {
          (isa >= 2 ? DotRowsAvx512 : DotRowsAvx2)(xp + r * k, k, wr, k, out, kTile);
          for (int64_t i = 0; i < step; ++i) {
            for (int j = 0; j < kTile; ++j) {
              yp[(r + i) * n + n0 + j] = sp ? out[i * kTile + j] * sp[n0 + j] : out[i * kTile + j];
            }
          }
        }
      }
      for (; r < m1; ++r) {
        dot(xp + r * k, wr, rows, k, out);
        for (int j = 0; j < rows; ++j) yp[r * n + n0 + j] = sp ? out[j] * sp[n0 + j] : out[j];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Many x rows with VNNI (level 3, int8 and the 32-blocks Q8_0/Q4_0/Q4_1): register tiles of
// kVnniRows x rows by kVnniCols output columns of int32 accumulators, one column per lane, so
// a block's int32 sums need one conversion and one scale per 16 columns (not per column:
// that per-column conversion is why integer dots lost to float FMAs above 4 rows).
// A tile's weights are repacked once per call as unsigned bytes u with w = d * u + c per
// block: Q4_1 u = q, c = m; Q4_0 u = q, c = -8 d; Q8_0 and int8 u = q + 128, c = -128 d
// (int8: d = the column's scale). Then for x = xd * xq (per block):
//   sum_e w[e] x[e] = xd * d * sum_e u[e] xq[e] + c * ds,  ds = xd * sum_e xq[e].
// Packed layout of a 32-column tile, per block b (1024 bytes): [2 halves of 16 columns]
// [8 steps of 4 elements][16 columns][4 bytes]: vpdpbusd multiplies a step's 64 bytes by
// one x row's 4 bytes (broadcast) into the 16 columns' lanes. Scales d and offsets c: [b][32].

constexpr int kVnniCols = 32;
constexpr int kVnniRows = 4;

bool VnniTiled(int32_t fmt) { return fmt == INT8 || fmt == Q8_0 || fmt == Q4_0 || fmt == Q4_1; }

// Columns [n0, n0 + cols) of W into the packed tile (columns past `cols` are zeros). Per
// block, 8 columns at a time: their 32 bytes (8 dwords each) are decoded into 8 registers
// and transposed as an 8 x 8 matrix of dwords (step s of the 8 columns in one register).
AVX2_FN void PackTileVnni(int32_t fmt, const uint8_t* wp, int64_t row_bytes, const float* sp,
                          int64_t n0, int cols, int64_t nb, uint8_t* pq, float* pd, float* pc) {
  const __m256i flip = _mm256_set1_epi8(char(0x80));
  for (int64_t b = 0; b < nb; ++b) {
    for (int g = 0; g < kVnniCols / 8; ++g) {
      __m256i r[8];
      for (int j = 0; j < 8; ++j) {
        const int col = 8 * g + j;
        const uint8_t* row = wp + (n0 + col) * row_bytes;
        float d = 0.0f, c = 0.0f;
        if (col >= cols) {
          r[j] = _mm256_setzero_si256();
        } else if (fmt == Q4_0 || fmt == Q4_1) {
          const int head = fmt == Q4_0 ? 2 : 4;
          const uint8_t* p = row + b * (head + 16);
          r[j] = Nibbles16(p + head);
          d = _cvtsh_ss(Load16(p));
          c = fmt == Q4_0 ? -8.0f * d : _cvtsh_ss(Load16(p + 2));
        } else {
          const uint8_t* p = fmt == INT8 ? row + b * kBlock : row + b * 34 + 2;
          r[j] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), flip);
          d = fmt == INT8 ? sp[n0 + col] : _cvtsh_ss(Load16(row + b * 34));
          c = -128.0f * d;
        }
        pd[b * kVnniCols + col] = d;
        pc[b * kVnniCols + col] = c;
      }
      // 8 x 8 dword transpose: t[s] holds dword s of the 8 columns.
      __m256i a[8], t[8];
      for (int j = 0; j < 8; j += 2) {
        a[j] = _mm256_unpacklo_epi32(r[j], r[j + 1]);
        a[j + 1] = _mm256_unpackhi_epi32(r[j], r[j + 1]);
      }
      const __m256i b0 = _mm256_unpacklo_epi64(a[0], a[2]), b1 = _mm256_unpackhi_epi64(a[0], a[2]);
      const __m256i b2 = _mm256_unpacklo_epi64(a[1], a[3]), b3 = _mm256_unpackhi_epi64(a[1], a[3]);
      const __m256i b4 = _mm256_unpacklo_epi64(a[4], a[6]), b5 = _mm256_unpackhi_epi64(a[4], a[6]);
      const __m256i b6 = _mm256_unpacklo_epi64(a[5], a[7]), b7 = _mm256_unpackhi_epi64(a[5], a[7]);
      t[0] = _mm256_permute2x128_si256(b0, b4, 0x20);
      t[1] = _mm256_permute2x128_si256(b1, b5, 0x20);
      t[2] = _mm256_permute2x128_si256(b2, b6, 0x20);
      t[3] = _mm256_permute2x128_si256(b3, b7, 0x20);
      t[4] = _mm256_permute2x128_si256(b0, b4, 0x31);
      t[5] = _mm256_permute2x128_si256(b1, b5, 0x31);
      t[6] = _mm256_permute2x128_si256(b2, b6, 0x31);
      t[7] = _mm256_permute2x128_si256(b3, b7, 0x31);
      uint8_t* out = pq + b * 1024 + (g / 2) * 512 + (g % 2) * 32;
      for (int st = 0; st < 8; ++st) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(out + st * 64), t[st]);
      }
    }
  }
}

// y[r * ldy + col] for r < R, col < cols: x rows xq [R, K] (row stride k) against a tile.
template <int R>
VNNI_FN void TileVnni(const uint8_t* pq, const float* pd, const float* pc, const int8_t* xq,
                      const float* xd, const float* xds, int64_t k, int64_t nb, float* y,
                      int64_t ldy, int cols) {
  __m512 f[R][2];
  for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    const uint8_t* wb = pq + b * 1024;
    for (int s = 0; s < 8; ++s) {
      const __m512i w0 = _mm512_load_si512(wb + s * 64), w1 = _mm512_load_si512(wb + 512 + s * 64);
      for (int r = 0; r < R; ++r) {
        int32_t x4;
        std::memcpy(&x4, xq + r * k + b * kBlock + 4 * s, 4);
        const __m512i xv = _mm512_set1_epi32(x4);
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, xv);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], w1, xv);
      }
    }
    const __m512 d0 = _mm512_loadu_ps(pd + b * kVnniCols), d1 = _mm512_loadu_ps(pd + b * kVnniCols + 16);
    const __m512 c0 = _mm512_loadu_ps(pc + b * kVnniCols), c1 = _mm512_loadu_ps(pc + b * kVnniCols + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xs = _mm512_set1_ps(xd[r * nb + b]), ds = _mm512_set1_ps(xds[r * nb + b]);
      f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][0]), _mm512_mul_ps(d0, xs), f[r][0]);
      f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][1]), _mm512_mul_ps(d1, xs), f[r][1]);
      f[r][0] = _mm512_fmadd_ps(c0, ds, f[r][0]);
      f[r][1] = _mm512_fmadd_ps(c1, ds, f[r][1]);
    }
  }
  const __mmask16 m0 = cols >= 16 ? 0xffff : __mmask16((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xffff : cols <= 16 ? 0 : __mmask16((1u << (cols - 16)) - 1);
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(y + r * ldy, m0, f[r][0]);
    _mm512_mask_storeu_ps(y + r * ldy + 16, m1, f[r][1]);
  }
}

// y [M, N] for M > kDirectRows from the quantized x (xq [M, K], xd and xds [M, K / 32]).
void LinearIntVnni(const int8_t* xq, const float* xd, const float* xds, const uint8_t* wp,
                   const float* sp, float* yp, int64_t m, int64_t n, int64_t k, int32_t fmt) {
  const int64_t nb = k / kBlock, row_bytes = RowBytes(fmt, k);
  const int64_t tiles = (n + kVnniCols - 1) / kVnniCols;
  ForTiles(tiles, m * n * k / 4, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<uint8_t> qbuf;
    thread_local std::vector<float> pd, pc;
    if (int64_t(qbuf.size()) < nb * 1024 + 64) qbuf.resize(nb * 1024 + 64);
    if (int64_t(pd.size()) < nb * kVnniCols) pd.resize(nb * kVnniCols), pc.resize(nb * kVnniCols);
    uint8_t* pq = qbuf.data() + (-reinterpret_cast<uintptr_t>(qbuf.data()) & 63);  // 64-aligned
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kVnniCols;
      const int cols = int(std::min<int64_t>(kVnniCols, n - n0));
      PackTileVnni(fmt, wp, row_bytes, sp, n0, cols, nb, pq, pd.data(), pc.data());
      int64_t r = 0;
      for (; r + kVnniRows <= m; r += kVnniRows) {
        TileVnni<kVnniRows>(pq, pd.data(), pc.data(), xq + r * k, xd + r * nb,
                            xds + r * nb, k, nb, yp + r * n + n0, n, cols);
      }
      auto rest = m - r == 3 ? TileVnni<3> : m - r == 2 ? TileVnni<2> : TileVnni<1>;
      if (r < m) {
        rest(pq, pd.data(), pc.data(), xq + r * k, xd + r * nb, xds + r * nb, k, nb,
             yp + r * n + n0, n, cols);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// AMX (level 4: level 3 plus AMX-TILE/AMX-BF16, with the OS's permission for tile data).
// Steps above kDirectRows rows, every format and either activation mode: the weights of a
// 32-column tile are decoded to float32 (as level 3's float path does; int8 times its
// column scale), rounded to bf16 and packed for TDPBF16PS; x is rounded to bf16 once per
// call. Products of bf16 pairs are summed in float32 over all of K inside the tile unit, so
// unlike the integer dots there is no per-block conversion. The result differs from the
// other levels by bf16 rounding of both operands (relative ~2^-9 per element); with integer
// activations requested, x is rounded to bf16 instead of quantized per block.
// Packed B for a tile, per k-step s of 32 (2048 bytes): [2 halves of 16 columns][16 pairs p]
// [16 columns][2 bf16]: element (p, c) = (w[c][32 s + 2 p], w[c][32 s + 2 p + 1]), the
// layout TDPBF16PS reads (B rows are K pairs). A (x): [M padded to 16][K padded to 32] bf16.
// C: two 16 x 16 float32 tiles (16 x rows by 32 columns), tmm0 and tmm1; A in tmm2, B in
// tmm3 and tmm4.

#if (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || \
    (defined(__clang__) && __clang_major__ >= 12)
#define ENGINE_HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_FN __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))

constexpr int kAmxCols = 32;
constexpr int kAmxRows = 16;

// Linux: a process must ask for the AMX tile-data state before its first tile instruction
// (else SIGILL). Asked once; true when granted.
bool AmxPermitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kGetXcompPerm = 0x1022, kXtiledata = 18;
    if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) != 0) return false;
    unsigned long bits = 0;
    return syscall(SYS_arch_prctl, kGetXcompPerm, &bits) == 0 && (bits & (1ul << kXtiledata));
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

AMX_FN void AmxConfigure() {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

// float32 [n] -> bf16 bits [n], round to nearest even (n a multiple of 32).
AMX_FN void ToBf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 32) {
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(out + i, (__m512i)v);
  }
}

// The tile's columns [n0, n0 + cols) as packed B (columns past `cols`, and K past k, are 0).
AMX_FN void PackTileAmx(int32_t fmt, const uint8_t* wp, int64_t row_bytes, const float* sp,
                        int64_t n0, int cols, int64_t k, int64_t kp, float* rowf,
                        uint16_t* rowh, uint32_t* pb) {
  for (int col = 0; col < kAmxCols; ++col) {
    std::fill(rowf, rowf + kp, 0.0f);
    if (col < cols) {
      const uint8_t* row = wp + (n0 + col) * row_bytes;
      if (fmt == F32) {
        std::memcpy(rowf, row, 4 * k);
      } else if (fmt == Q4_K || fmt == Q6_K) {
        DecodeRowViaInt(fmt, row, k, rowf);
      } else {
        DecodeRowAvx512(fmt, row, k, rowf);
      }
      if (sp) {
        for (int64_t i = 0; i < k; ++i) rowf[i] *= sp[n0 + col];
      }
    }
    ToBf16(rowf, kp, rowh);
    const int half = col / 16, lane = col % 16;
    for (int64_t s = 0; s < kp / 32; ++s) {
      uint32_t* out = pb + s * 512 + half * 256 + lane;
      for (int p = 0; p < 16; ++p) std::memcpy(out + p * 16, rowh + 32 * s + 2 * p, 4);
    }
  }
}

AMX_FN void LinearAmxTiles(const uint16_t* xh, int64_t mp, int64_t kp, const uint8_t* wp,
                           const float* sp, float* yp, int64_t m, int64_t n, int64_t k,
                           int32_t fmt, int64_t t0, int64_t t1) {
  thread_local std::vector<float> rowf, cbuf;
  thread_local std::vector<uint16_t> rowh;
  thread_local std::vector<uint32_t> bbuf;
  if (int64_t(rowf.size()) < kp) rowf.resize(kp), rowh.resize(kp);
  if (int64_t(bbuf.size()) < kp * 16 + 16) bbuf.resize(kp * 16 + 16);
  cbuf.resize(kAmxRows * kAmxCols + 16);
  uint32_t* pb = bbuf.data() + ((-reinterpret_cast<uintptr_t>(bbuf.data()) & 63) / 4);
  float* cb = cbuf.data() + ((-reinterpret_cast<uintptr_t>(cbuf.data()) & 63) / 4);
  const int64_t row_bytes = RowBytes(fmt, k);
  AmxConfigure();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kAmxCols;
    const int cols = int(std::min<int64_t>(kAmxCols, n - n0));
    PackTileAmx(fmt, wp, row_bytes, sp, n0, cols, k, kp, rowf.data(), rowh.data(), pb);
    for (int64_t r0 = 0; r0 < mp; r0 += kAmxRows) {
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t s = 0; s < kp / 32; ++s) {
        _tile_loadd(2, xh + r0 * kp + 32 * s, kp * 2);
        _tile_loadd(3, pb + s * 512, 64);
        _tile_loadd(4, pb + s * 512 + 256, 64);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
      }
      _tile_stored(0, cb, kAmxCols * 4);
      _tile_stored(1, cb + 16, kAmxCols * 4);
      for (int64_t r = r0; r < std::min(m, r0 + kAmxRows); ++r) {
        std::memcpy(yp + r * n + n0, cb + (r - r0) * kAmxCols, 4 * cols);
      }
    }
  }
  _tile_release();
}

// y [M, N] (M > kDirectRows) with AMX bf16 tiles; x float32 [M, K].
AMX_FN void LinearAmx(const float* xp, const uint8_t* wp, const float* sp, float* yp,
                      int64_t m, int64_t n, int64_t k, int32_t fmt) {
  const int64_t mp = (m + kAmxRows - 1) / kAmxRows * kAmxRows, kp = (k + 31) / 32 * 32;
  std::vector<float> xf(kp, 0.0f);
  std::vector<uint16_t> xh(mp * kp + 32, 0);  // [Mp, Kp] bf16, zero padding
  uint16_t* xa = xh.data() + ((-reinterpret_cast<uintptr_t>(xh.data()) & 63) / 2);
  for (int64_t r = 0; r < m; ++r) {
    std::memcpy(xf.data(), xp + r * k, 4 * k);
    ToBf16(xf.data(), kp, xa + r * kp);
  }
  const int64_t tiles = (n + kAmxCols - 1) / kAmxCols;
  ForTiles(tiles, m * n * k, [&](int64_t t0, int64_t t1) {
    LinearAmxTiles(xa, mp, kp, wp, sp, yp, m, n, k, fmt, t0, t1);
  });
}

bool CpuHasAmx() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
         __builtin_cpu_supports("avx512bf16") && AmxPermitted();
}
#else
bool CpuHasAmx() { return false; }
#endif

// act = 1: x quantized per block (once per call). Up to kDirectRows rows: integer dots from
// the weight blocks unpacked in registers; the K-quants (and level 0) decode each tile's
// rows once to integers, then dot every x row with the tile (the decoded tile stays in L1).
void LinearInt(const float* xp, const uint8_t* wp, const float* sp, float* yp, int64_t m,
               int64_t n, int64_t k, int32_t fmt, int32_t isa) {
  const int64_t nb = k / kBlock, row_bytes = RowBytes(fmt, k), tiles = (n + kTile - 1) / kTile;
  // Many rows: with VNNI, int8/Q8_0/Q4_0/Q4_1 take the column-per-lane integer tiles
  // (LinearIntVnni); otherwise (AVX2, AVX-512 without VNNI, the K-quants) the float tiles'
  // FMAs beat row-by-row integer dots, so the quantized x, as floats d * q, takes the float
  // path.
  const bool packed = IsPacked(fmt);
  const bool tiled = isa >= 3 && m > kDirectRows && VnniTiled(fmt);
  const bool as_float = isa >= 1 && m > kDirectRows && !tiled && !packed;
  std::vector<int8_t> xq(m * k);
  std::vector<float> xd(m * nb), xds(m * nb), xf(as_float ? m * k : 0);
  auto quantize = isa >= 1 ? QuantizeRowAvx2 : QuantizeRowGeneric;
  for (int64_t r = 0; r < m; ++r) {
    quantize(xp + r * k, k, xq.data() + r * k, xd.data() + r * nb, xds.data() + r * nb,
             as_float ? xf.data() + r * k : nullptr);
  }
  if (as_float) return LinearFloat(xf.data(), wp, sp, yp, m, n, k, fmt, isa);
  if (packed) {  // one kernel for every m (packed.cc)
    const engine_cpu::PackedArgs args{xq.data(), xd.data(), xds.data(), wp, sp, yp, m, n, k, fmt};
    const int64_t tiles = (n + engine_cpu::kPackCols - 1) / engine_cpu::kPackCols;
    ForTiles(tiles, m * n * k / 4, [&](int64_t t0, int64_t t1) {
      engine_cpu::PackedTiles(args, t0, t1);
    });
    return;
  }
  if (tiled) return LinearIntVnni(xq.data(), xd.data(), xds.data(), wp, sp, yp, m, n, k, fmt);
  if (isa >= 1 && fmt <= Q4_1) {
    auto direct = isa >= 3 ? DotDirectVnni : DotDirectAvx2;
    ForTiles(n, m * n * k / 4, [&](int64_t n0, int64_t n1) {
      float out[kDirectRows];
      for (int64_t j = n0; j < n1; ++j) {
        direct(fmt, wp + j * row_bytes, sp ? sp[j] : 1.0f, xq.data(), xd.data(), xds.data(), m,
               k, out);
        for (int64_t r = 0; r < m; ++r) yp[r * n + j] = out[r];
      }
    });
    return;
  }
  auto decode = isa >= 1 ? DecodeRowIntAvx2 : DecodeRowIntGeneric;
  auto dot = isa >= 3 ? DotIntVnni : isa >= 1 ? DotIntAvx2 : DotIntGeneric;
  const bool offset = HasOffset(fmt);
  ForTiles(tiles, m * n * k / 4, [&](int64_t t0, int64_t t1) {
    // Per row: q [K], a [K], d8 [B * 8], c [B] (floats first for alignment).
    thread_local std::vector<float> fbuf;
    thread_local std::vector<int8_t> qbuf;
    if (int64_t(fbuf.size()) < kTile * nb * 9) fbuf.resize(kTile * nb * 9);
    if (int64_t(qbuf.size()) < 2 * kTile * k) qbuf.resize(2 * kTile * k);
    IntRows w;
    for (int j = 0; j < kTile; ++j) {
      w.q[j] = qbuf.data() + j * k;
      w.a[j] = reinterpret_cast<uint8_t*>(qbuf.data() + (kTile + j) * k);
      w.d8[j] = fbuf.data() + j * nb * 8;
      w.c[j] = fbuf.data() + kTile * nb * 8 + j * nb;
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTile;
      const int rows = int(std::min<int64_t>(kTile, n - n0));
      for (int j = 0; j < kTile; ++j) {  // a short last tile repeats its last row
        const int64_t nj = n0 + std::min(j, rows - 1);
        decode(fmt, wp + nj * row_bytes, k, sp ? sp[nj] : 1.0f, w.q[j], w.a[j], w.d8[j], w.c[j]);
      }
      float out[kTile];
      for (int64_t r = 0; r < m; ++r) {
        dot(xq.data() + r * k, xd.data() + r * nb, xds.data() + r * nb, w, nb, offset, out);
        for (int j = 0; j < rows; ++j) yp[r * n + n0 + j] = out[j];
      }
    }
  });
}

ffi::Error Linear(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scales,
                  ffi::ResultBuffer<ffi::F32> y, int32_t fmt, int32_t isa, int32_t act) {
  auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0]) {
    return ffi::Error::InvalidArgument("engine_cpu_linear: x must be [M, K] and y [M, N]");
  }
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  if (fmt < 0 || fmt >= NUM_FMTS) return ffi::Error::InvalidArgument("unknown weight format");
  if (fmt >= Q8_0 && k % kBlock != 0) {
    return ffi::Error::InvalidArgument("GGUF block formats need K divisible by 32");
  }
  if ((fmt == Q4_K || fmt == Q6_K) && k % kSuper != 0) {
    return ffi::Error::InvalidArgument("GGUF K-quants need K divisible by 256");
  }
  if (act != 0 && (act != 1 || fmt < INT8 || k % kBlock != 0)) {
    return ffi::Error::InvalidArgument(
        "integer activations need an int8 or GGUF weight and K divisible by 32");
  }
  if (IsPacked(fmt) && (act != 1 || isa < 3)) {
    return ffi::Error::InvalidArgument(
        "packed weights (q4_0x, q4_1x, q8_0x, int8x) need integer activations and VNNI");
  }
  const int64_t bytes = IsPacked(fmt) ? engine_cpu::PackedBytes(fmt, n, k) : n * RowBytes(fmt, k);
  if (int64_t(w.size_bytes()) != bytes) {
    return ffi::Error::InvalidArgument("engine_cpu_linear: W has the wrong byte count");
  }
  const int64_t ns = scales.element_count();
  if (ns != 0 && ns != n) return ffi::Error::InvalidArgument("scales must be [N] or empty");
  if ((fmt == INT8 || fmt == engine_cpu::kInt8x) && ns != n) {
    return ffi::Error::InvalidArgument("int8 weights need their scales [N]");
  }
  if (isa < 0 || isa > 4 || !CpuHas(isa)) {
    return ffi::Error::InvalidArgument("engine_cpu_linear: ISA level not supported here");
  }
  const float* sp = ns ? scales.typed_data() : nullptr;
  const uint8_t* wp = static_cast<const uint8_t*>(w.untyped_data());
#ifdef ENGINE_HAVE_AMX
  if (isa >= 4 && m > kDirectRows && !IsPacked(fmt)) {
    LinearAmx(x.typed_data(), wp, sp, y->typed_data(), m, n, k, fmt);
    return ffi::Error::Success();
  }
#endif
  (act ? LinearInt : LinearFloat)(x.typed_data(), wp, sp, y->typed_data(), m, n, k, fmt, isa);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EngineCpuLinear, Linear,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()         // W, by output channel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scales [N] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, N]
                                  .Attr<int32_t>("fmt")
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("act"));

// The highest ISA level this CPU runs (0 generic, 1 AVX2, 2 AVX-512, 3 AVX-512 VNNI, 4 AMX).
extern "C" int engine_cpu_isa() {
  return CpuHas(4) ? 4 : CpuHas(3) ? 3 : CpuHas(2) ? 2 : CpuHas(1) ? 1 : 0;
}

// The pool shared with the other kernels of this library (attention.cc): runs fn(ctx, i) for
// i in [0, n) on the caller and the pool's workers, returning when all are done.
extern "C" void engine_cpu_parallel_for(int64_t n, void (*fn)(void*, int64_t), void* ctx) {
  GetPool().ParallelFor(n, [&](int64_t i) { fn(ctx, i); });
}
