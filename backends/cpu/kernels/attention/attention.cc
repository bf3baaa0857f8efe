// Ragged paged attention for the CPU backend as an XLA FFI handler: the contract of the
// plain-JAX oracle (backends/cpu/attention.py, ragged_paged_attention), computed flash-style.
//
// Inputs (engine/attention.py's AttentionMetadata gives the metadata):
//   q          float32 [T, Hq, D]
//   k, v       [num_pages, page, Hkv, D], or every layer's [L, num_pages, page, Hkv, D] read
//              in place at `layer`; float32, bfloat16 or float8_e4m3fn (read upcast)
//   positions  int32 [T]   token_seq int32 [T]   seq_lens int32 [S]   page_table int32 [S, P]
//   num_tokens int32 []    layer int32 [] (ignored for 4-d caches)
// Output float32 [T, Hq, D]. Token t (t < num_tokens) of sequence s = token_seq[t] attends
// to key positions [0, min(positions[t] + 1, seq_lens[s], P * page)): causal by position,
// as the oracle's mask. Query head i reads kv head i / g (GQA, Hq = g * Hkv). Padding
// tokens (t >= num_tokens) and tokens with no key get zeros; they read nothing. Indices
// are clamped into range (page ids, layer, sequence) as XLA's gather clamps, so malformed
// metadata never reads outside the buffers.
//
// Work item = one token with all its heads (a key row's Hkv * D elements are contiguous, so
// a page is read front to back, and the next block's rows are prefetched). Keys are taken in
// blocks of up to kBlock = 16 positions (across page boundaries); per kv head, its g query
// heads share every K/V row load: scores [g, 16], an online softmax (running max m, sum l,
// the accumulator rescaled by exp(m_old - m_new)), then acc[g, D] += p @ V. float32
// throughout. Items are shared among the linear kernel's thread pool
// (engine_cpu_parallel_for, linear.cc).
//
// ISA levels (`isa`, as the linear kernel's): 0 generic C++, 1 AVX2 + FMA, >= 2 AVX-512 F.
// The vector levels need D divisible by their width (8 or 16) and run level 0 otherwise.
// Only the order of the sums and the exp's last bits (a polynomial) differ between levels.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" int engine_cpu_isa();
extern "C" void engine_cpu_parallel_for(int64_t n, void (*fn)(void*, int64_t), void* ctx);

namespace {

constexpr int kBlock = 16;  // key positions per softmax block (one AVX-512 vector of scores)
constexpr int kGroup = 4;   // query heads a register tile covers
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------
// Cache element types: float32 read in place; bfloat16 and float8_e4m3fn rows decoded to
// float32 in a per-thread buffer (exactly: both are subsets of float32).

enum Elem { F32, BF16, F8 };

struct F8Table {  // float8_e4m3fn -> float32: 1 sign, 4 exponent (bias 7), 3 mantissa bits
  float v[256];
  F8Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, mant = b & 7;
      float x = e == 0 ? std::ldexp(float(mant), -9) : std::ldexp(float(8 + mant), e - 10);
      if (e == 15 && mant == 7) x = std::numeric_limits<float>::quiet_NaN();  // no infinity
      v[b] = b & 0x80 ? -x : x;
    }
  }
};

const F8Table& Fp8() {
  static const F8Table table;
  return table;
}

void DecodeRowGeneric(int e, const void* row, int64_t d, float* out) {
  if (e == BF16) {
    const uint16_t* h = static_cast<const uint16_t*>(row);
    for (int64_t i = 0; i < d; ++i) {
      const uint32_t bits = uint32_t(h[i]) << 16;
      std::memcpy(out + i, &bits, 4);
    }
  } else {
    const uint8_t* b = static_cast<const uint8_t*>(row);
    const float* t = Fp8().v;
    for (int64_t i = 0; i < d; ++i) out[i] = t[b[i]];
  }
}

// The steps of one key block, per ISA level. k[j], v[j]: key position j's D floats.
struct Ops {
  // s[x * kBlock + j] = dot(q[x], k[j]) for x < g, j < n.
  void (*scores)(const float* q, int g, int64_t d, const float* const* k, int n, float* s);
  // Per head x: m' = max(m[x], s[x, :n]); s[x, j] = exp(s[x, j] - m') (0 for j >= n);
  // l[x] = l[x] * c + sum_j s[x, j]; corr[x] = c = exp(m[x] - m'); m[x] = m'.
  void (*softmax)(float* s, int g, int n, float* m, float* l, float* corr);
  // acc[x] = acc[x] * corr[x] + sum_j s[x, j] * v[j] for x < g.
  void (*accumulate)(const float* s, int g, int64_t d, const float* const* v, int n,
                     const float* corr, float* acc);
  // out[:d] = a bf16 or fp8 row (Elem) as float32.
  void (*decode)(int elem, const void* row, int64_t d, float* out);
};

// ---------------------------------------------------------------------------------------
// Generic C++ (level 0).

void ScoresGeneric(const float* q, int g, int64_t d, const float* const* k, int n, float* s) {
  for (int x = 0; x < g; ++x) {
    for (int j = 0; j < n; ++j) {
      float a = 0.0f;
      for (int64_t i = 0; i < d; ++i) a += q[x * d + i] * k[j][i];
      s[x * kBlock + j] = a;
    }
  }
}

void SoftmaxGeneric(float* s, int g, int n, float* m, float* l, float* corr) {
  for (int x = 0; x < g; ++x) {
    float* sx = s + x * kBlock;
    float mx = m[x];
    for (int j = 0; j < n; ++j) mx = std::max(mx, sx[j]);
    float sum = 0.0f;
    for (int j = 0; j < kBlock; ++j) {
      sx[j] = j < n ? std::exp(sx[j] - mx) : 0.0f;
      sum += sx[j];
    }
    corr[x] = m[x] == kNegInf ? 0.0f : std::exp(m[x] - mx);
    l[x] = l[x] * corr[x] + sum;
    m[x] = mx;
  }
}

void AccumulateGeneric(const float* s, int g, int64_t d, const float* const* v, int n,
                       const float* corr, float* acc) {
  for (int x = 0; x < g; ++x) {
    float* ax = acc + x * d;
    for (int64_t i = 0; i < d; ++i) ax[i] *= corr[x];
    for (int j = 0; j < n; ++j) {
      const float p = s[x * kBlock + j];
      for (int64_t i = 0; i < d; ++i) ax[i] += p * v[j][i];
    }
  }
}

// ---------------------------------------------------------------------------------------
// AVX2 + FMA (level 1): 8 lanes; D divisible by 8.

#define AVX2_FN __attribute__((target("avx2,fma")))

AVX2_FN inline float Hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AVX2_FN inline float Hmax256(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 (softmax arguments): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by Cephes'
// degree-5 polynomial, 2^n put into the exponent bits. Below -87.3 the result is ~1e-38.
AVX2_FN inline __m256 Exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

template <int G>
AVX2_FN inline void ScoresTile256(const float* q, int64_t d, const float* const* k, int n,
                                  float* s) {
  for (int j = 0; j < n; ++j) {
    __m256 a[G];
    for (int x = 0; x < G; ++x) a[x] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 kv = _mm256_loadu_ps(k[j] + i);
      for (int x = 0; x < G; ++x) a[x] = _mm256_fmadd_ps(_mm256_loadu_ps(q + x * d + i), kv, a[x]);
    }
    for (int x = 0; x < G; ++x) s[x * kBlock + j] = Hsum256(a[x]);
  }
}

AVX2_FN void ScoresAvx2(const float* q, int g, int64_t d, const float* const* k, int n,
                        float* s) {
  for (int x0 = 0; x0 < g; x0 += kGroup) {
    const float* qx = q + x0 * d;
    float* sx = s + x0 * kBlock;
    switch (std::min(kGroup, g - x0)) {
      case 1: ScoresTile256<1>(qx, d, k, n, sx); break;
      case 2: ScoresTile256<2>(qx, d, k, n, sx); break;
      case 3: ScoresTile256<3>(qx, d, k, n, sx); break;
      default: ScoresTile256<4>(qx, d, k, n, sx); break;
    }
  }
}

AVX2_FN void SoftmaxAvx2(float* s, int g, int n, float* m, float* l, float* corr) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 neg = _mm256_set1_ps(kNegInf);
  const __m256 lo = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
  const __m256 hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), lane));
  for (int x = 0; x < g; ++x) {
    float* sx = s + x * kBlock;
    const __m256 a = _mm256_blendv_ps(neg, _mm256_loadu_ps(sx), lo);
    const __m256 b = _mm256_blendv_ps(neg, _mm256_loadu_ps(sx + 8), hi);
    const float mx = std::max(m[x], Hmax256(_mm256_max_ps(a, b)));
    const __m256 mv = _mm256_set1_ps(mx);
    const __m256 ea = _mm256_and_ps(Exp256(_mm256_sub_ps(a, mv)), lo);
    const __m256 eb = _mm256_and_ps(Exp256(_mm256_sub_ps(b, mv)), hi);
    _mm256_storeu_ps(sx, ea);
    _mm256_storeu_ps(sx + 8, eb);
    corr[x] = m[x] == kNegInf ? 0.0f : std::exp(m[x] - mx);
    l[x] = l[x] * corr[x] + Hsum256(_mm256_add_ps(ea, eb));
    m[x] = mx;
  }
}

template <int G>
AVX2_FN inline void AccumulateTile256(const float* s, int64_t d, const float* const* v, int n,
                                      const float* corr, float* acc) {
  for (int64_t i = 0; i < d; i += 8) {
    __m256 a[G];
    for (int x = 0; x < G; ++x) {
      a[x] = _mm256_mul_ps(_mm256_loadu_ps(acc + x * d + i), _mm256_set1_ps(corr[x]));
    }
    for (int j = 0; j < n; ++j) {
      const __m256 vv = _mm256_loadu_ps(v[j] + i);
      for (int x = 0; x < G; ++x) {
        a[x] = _mm256_fmadd_ps(_mm256_set1_ps(s[x * kBlock + j]), vv, a[x]);
      }
    }
    for (int x = 0; x < G; ++x) _mm256_storeu_ps(acc + x * d + i, a[x]);
  }
}

AVX2_FN void AccumulateAvx2(const float* s, int g, int64_t d, const float* const* v, int n,
                            const float* corr, float* acc) {
  for (int x0 = 0; x0 < g; x0 += kGroup) {
    const float* sx = s + x0 * kBlock;
    float* ax = acc + x0 * d;
    switch (std::min(kGroup, g - x0)) {
      case 1: AccumulateTile256<1>(sx, d, v, n, corr + x0, ax); break;
      case 2: AccumulateTile256<2>(sx, d, v, n, corr + x0, ax); break;
      case 3: AccumulateTile256<3>(sx, d, v, n, corr + x0, ax); break;
      default: AccumulateTile256<4>(sx, d, v, n, corr + x0, ax); break;
    }
  }
}

// fp8 e4m3fn bytes (in 32-bit lanes) -> float32: normal numbers by moving the exponent and
// mantissa bits (bias 7 -> 127), subnormals (exponent 0) as m * 2^-9, 0x7f as NaN, then the
// sign.
AVX2_FN inline __m256 Fp8ToPs256(__m256i b) {
  const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
  const __m256 normal = _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23)));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(1.0f / 512));
  __m256 x = _mm256_blendv_ps(
      sub, normal, _mm256_castsi256_ps(_mm256_cmpgt_epi32(mag, _mm256_set1_epi32(7))));
  x = _mm256_blendv_ps(x, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()),
                       _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f))));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  return _mm256_or_ps(x, _mm256_castsi256_ps(sign));
}

AVX2_FN void DecodeRowAvx2(int e, const void* row, int64_t d, float* out) {
  for (int64_t i = 0; i < d; i += 8) {  // d divisible by 8
    if (e == BF16) {
      const __m128i h = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + i));
      _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    } else {
      const __m128i b = _mm_loadl_epi64(
          reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(row) + i));
      _mm256_storeu_ps(out + i, Fp8ToPs256(_mm256_cvtepu8_epi32(b)));
    }
  }
}

// ---------------------------------------------------------------------------------------
// AVX-512 F (level 2 and up): 16 lanes, one vector per head's block of scores; D divisible
// by 16.

#define AVX512_FN __attribute__((target("avx512f,avx2,fma")))

// exp(x) for x <= 0 as Exp256; 2^n applied by vscalefps.
AVX512_FN inline __m512 Exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

template <int G>
AVX512_FN inline void ScoresTile512(const float* q, int64_t d, const float* const* k, int n,
                                    float* s) {
  for (int j = 0; j < n; ++j) {
    __m512 a[G];
    for (int x = 0; x < G; ++x) a[x] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 kv = _mm512_loadu_ps(k[j] + i);
      for (int x = 0; x < G; ++x) a[x] = _mm512_fmadd_ps(_mm512_loadu_ps(q + x * d + i), kv, a[x]);
    }
    for (int x = 0; x < G; ++x) s[x * kBlock + j] = _mm512_reduce_add_ps(a[x]);
  }
}

AVX512_FN void ScoresAvx512(const float* q, int g, int64_t d, const float* const* k, int n,
                            float* s) {
  for (int x0 = 0; x0 < g; x0 += kGroup) {
    const float* qx = q + x0 * d;
    float* sx = s + x0 * kBlock;
    switch (std::min(kGroup, g - x0)) {
      case 1: ScoresTile512<1>(qx, d, k, n, sx); break;
      case 2: ScoresTile512<2>(qx, d, k, n, sx); break;
      case 3: ScoresTile512<3>(qx, d, k, n, sx); break;
      default: ScoresTile512<4>(qx, d, k, n, sx); break;
    }
  }
}

AVX512_FN void SoftmaxAvx512(float* s, int g, int n, float* m, float* l, float* corr) {
  const __mmask16 valid = __mmask16((1u << n) - 1u);  // n <= 16
  for (int x = 0; x < g; ++x) {
    float* sx = s + x * kBlock;
    const __m512 a = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), valid, sx);
    const float mx = std::max(m[x], _mm512_reduce_max_ps(a));
    const __m512 e = _mm512_maskz_mov_ps(valid, Exp512(_mm512_sub_ps(a, _mm512_set1_ps(mx))));
    _mm512_storeu_ps(sx, e);
    corr[x] = m[x] == kNegInf ? 0.0f : std::exp(m[x] - mx);
    l[x] = l[x] * corr[x] + _mm512_reduce_add_ps(e);
    m[x] = mx;
  }
}

template <int G>
AVX512_FN inline void AccumulateTile512(const float* s, int64_t d, const float* const* v,
                                        int n, const float* corr, float* acc) {
  for (int64_t i = 0; i < d; i += 16) {
    __m512 a[G];
    for (int x = 0; x < G; ++x) {
      a[x] = _mm512_mul_ps(_mm512_loadu_ps(acc + x * d + i), _mm512_set1_ps(corr[x]));
    }
    for (int j = 0; j < n; ++j) {
      const __m512 vv = _mm512_loadu_ps(v[j] + i);
      for (int x = 0; x < G; ++x) {
        a[x] = _mm512_fmadd_ps(_mm512_set1_ps(s[x * kBlock + j]), vv, a[x]);
      }
    }
    for (int x = 0; x < G; ++x) _mm512_storeu_ps(acc + x * d + i, a[x]);
  }
}

AVX512_FN void AccumulateAvx512(const float* s, int g, int64_t d, const float* const* v, int n,
                                const float* corr, float* acc) {
  for (int x0 = 0; x0 < g; x0 += kGroup) {
    const float* sx = s + x0 * kBlock;
    float* ax = acc + x0 * d;
    switch (std::min(kGroup, g - x0)) {
      case 1: AccumulateTile512<1>(sx, d, v, n, corr + x0, ax); break;
      case 2: AccumulateTile512<2>(sx, d, v, n, corr + x0, ax); break;
      case 3: AccumulateTile512<3>(sx, d, v, n, corr + x0, ax); break;
      default: AccumulateTile512<4>(sx, d, v, n, corr + x0, ax); break;
    }
  }
}

// As Fp8ToPs256, 16 lanes.
AVX512_FN inline __m512 Fp8ToPs512(__m512i b) {
  const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
  const __m512 normal = _mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23)));
  const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.0f / 512));
  __m512 x = _mm512_mask_blend_ps(_mm512_cmpgt_epi32_mask(mag, _mm512_set1_epi32(7)), sub,
                                  normal);
  x = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f)), x,
                           _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), sign));
}

AVX512_FN void DecodeRowAvx512(int e, const void* row, int64_t d, float* out) {
  for (int64_t i = 0; i < d; i += 16) {  // d divisible by 16
    if (e == BF16) {
      const __m256i h = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + i));
      _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    } else {
      const __m128i b = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(row) + i));
      _mm512_storeu_ps(out + i, Fp8ToPs512(_mm512_cvtepu8_epi32(b)));
    }
  }
}

constexpr Ops kGeneric{ScoresGeneric, SoftmaxGeneric, AccumulateGeneric, DecodeRowGeneric};
constexpr Ops kAvx2{ScoresAvx2, SoftmaxAvx2, AccumulateAvx2, DecodeRowAvx2};
constexpr Ops kAvx512{ScoresAvx512, SoftmaxAvx512, AccumulateAvx512, DecodeRowAvx512};

// ---------------------------------------------------------------------------------------
// The driver: one work item (token, kv head) at a time.

struct Job {
  const Ops* ops;
  Elem elem;
  int64_t elem_bytes;
  const float* q;  // [T, Hq, D]
  const uint8_t* k;  // this layer's [num_pages, page, Hkv, D]
  const uint8_t* v;
  const int32_t* positions;
  const int32_t* token_seq;
  const int32_t* seq_lens;
  const int32_t* page_table;  // [S, P]
  float* out;  // [T, Hq, D]
  int64_t num_tokens, num_seqs, pages_per_seq, num_pages, page, hkv, g, d;
  float scale;
  int64_t items, chunks;
};

// Byte offsets of key positions [b0, b0 + n) of a sequence (pages: its page-table row) in
// one layer's cache: position p is row p % page of page pages[p / page] (clamped into
// [0, num_pages)); a row holds the Hkv heads' D elements.
void RowOffsets(const Job& jb, const int32_t* pages, int64_t b0, int n, int64_t* at) {
  const int64_t row_bytes = jb.hkv * jb.d * jb.elem_bytes;
  int64_t pi = b0 / jb.page, off = b0 % jb.page;
  for (int j = 0; j < n; ++j) {
    const int64_t pg = std::clamp<int64_t>(pages[pi], 0, jb.num_pages - 1);
    at[j] = (pg * jb.page + off) * row_bytes;
    if (++off == jb.page) off = 0, ++pi;
  }
}

// One work item: token t, every kv head. A key block's rows (all heads: hkv * D contiguous
// elements, so a page is read front to back) are prefetched one block ahead.
void RunItem(const Job& jb, int64_t t) {
  const int64_t g = jb.g, d = jb.d, hq = jb.hkv * g;
  float* out = jb.out + t * hq * d;  // [Hq, D]
  int64_t kv_len = 0, seq = 0;
  if (t < jb.num_tokens) {
    seq = std::clamp<int64_t>(jb.token_seq[t], 0, jb.num_seqs - 1);
    kv_len = std::min<int64_t>({int64_t(jb.positions[t]) + 1, jb.seq_lens[seq],
                                jb.pages_per_seq * jb.page});
  }
  if (kv_len <= 0) {  // padding token (or no key): zeros, nothing read
    std::fill(out, out + hq * d, 0.0f);
    return;
  }
  // Per-thread scratch: q [Hq, D] (scaled), acc [Hq, D], scores [g, 16], m, l, corr [Hq],
  // and for bf16/fp8 caches one head's decoded K and V rows of the block, [16, D] each.
  thread_local std::vector<float> buf;
  const bool decode = jb.elem != F32;
  buf.resize(2 * hq * d + g * kBlock + 3 * hq + (decode ? 2 * kBlock * d : 0));
  float* q = buf.data();
  float* acc = q + hq * d;
  float* s = acc + hq * d;
  float* m = s + g * kBlock;
  float* l = m + hq;
  float* corr = l + hq;
  float* kdec = corr + hq;
  float* vdec = kdec + kBlock * d;
  const float* src = jb.q + t * hq * d;
  for (int64_t i = 0; i < hq * d; ++i) q[i] = src[i] * jb.scale;
  std::fill(acc, acc + hq * d, 0.0f);
  std::fill(m, m + hq, kNegInf);
  std::fill(l, l + hq, 0.0f);
  const int32_t* pages = jb.page_table + seq * jb.pages_per_seq;
  const int64_t row_bytes = jb.hkv * d * jb.elem_bytes, head_bytes = d * jb.elem_bytes;
  int64_t at[2][kBlock];  // this block's and the next one's row offsets
  const float* krow[kBlock];
  const float* vrow[kBlock];
  RowOffsets(jb, pages, 0, int(std::min<int64_t>(kBlock, kv_len)), at[0]);
  for (int64_t b0 = 0, cur = 0; b0 < kv_len; b0 += kBlock, cur ^= 1) {
    const int n = int(std::min<int64_t>(kBlock, kv_len - b0));
    if (b0 + kBlock < kv_len) {
      const int nn = int(std::min<int64_t>(kBlock, kv_len - b0 - kBlock));
      RowOffsets(jb, pages, b0 + kBlock, nn, at[cur ^ 1]);
      for (int j = 0; j < nn; ++j) {
        for (int64_t c = 0; c < row_bytes; c += 64) {
          __builtin_prefetch(jb.k + at[cur ^ 1][j] + c);
          __builtin_prefetch(jb.v + at[cur ^ 1][j] + c);
        }
      }
    }
    for (int64_t h = 0; h < jb.hkv; ++h) {
      for (int j = 0; j < n; ++j) {
        const int64_t o = at[cur][j] + h * head_bytes;
        if (decode) {
          jb.ops->decode(jb.elem, jb.k + o, d, kdec + j * d);
          jb.ops->decode(jb.elem, jb.v + o, d, vdec + j * d);
          krow[j] = kdec + j * d;
          vrow[j] = vdec + j * d;
        } else {
          krow[j] = reinterpret_cast<const float*>(jb.k + o);
          vrow[j] = reinterpret_cast<const float*>(jb.v + o);
        }
      }
      const int64_t x = h * g;  // this kv head's first query head
      jb.ops->scores(q + x * d, int(g), d, krow, n, s);
      jb.ops->softmax(s, int(g), n, m + x, l + x, corr + x);
      jb.ops->accumulate(s, int(g), d, vrow, n, corr + x, acc + x * d);
    }
  }
  for (int64_t x = 0; x < hq; ++x) {
    const float inv = 1.0f / l[x];  // l >= 1: the block holding the max adds exp(0)
    for (int64_t i = 0; i < d; ++i) out[x * d + i] = acc[x * d + i] * inv;
  }
}

void RunChunk(void* ctx, int64_t c) {
  const Job& jb = *static_cast<const Job*>(ctx);
  for (int64_t i = jb.items * c / jb.chunks, e = jb.items * (c + 1) / jb.chunks; i < e; ++i) {
    RunItem(jb, i);
  }
}

ffi::Error Attention(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> token_seq,
                     ffi::Buffer<ffi::S32> seq_lens, ffi::Buffer<ffi::S32> page_table,
                     ffi::Buffer<ffi::S32> num_tokens, ffi::Buffer<ffi::S32> layer,
                     ffi::ResultBuffer<ffi::F32> out, float scale, int32_t isa) {
  auto qd = q.dimensions(), kd = k.dimensions(), od = out->dimensions();
  auto pd = page_table.dimensions();
  if (qd.size() != 3 || od.size() != 3 || qd[0] != od[0] || qd[1] != od[1] || qd[2] != od[2]) {
    return ffi::Error::InvalidArgument("engine_cpu_attention: q and out must be [T, Hq, D]");
  }
  if ((kd.size() != 4 && kd.size() != 5) || k.element_type() != v.element_type() ||
      !std::equal(kd.begin(), kd.end(), v.dimensions().begin(), v.dimensions().end())) {
    return ffi::Error::InvalidArgument(
        "engine_cpu_attention: k and v must be [(L,) num_pages, page, Hkv, D] of one dtype");
  }
  const size_t r = kd.size();
  const int64_t t = qd[0], hq = qd[1], d = qd[2], hkv = kd[r - 2], page = kd[r - 3];
  const int64_t num_pages = kd[r - 4], layers = r == 5 ? kd[0] : 1;
  if (kd[r - 1] != d || hkv <= 0 || hq % hkv != 0) {
    return ffi::Error::InvalidArgument(
        "engine_cpu_attention: the caches' D must be q's and Hkv must divide Hq");
  }
  if (pd.size() != 2 || pd[0] != int64_t(seq_lens.element_count()) || pd[0] <= 0 ||
      pd[1] <= 0 || int64_t(positions.element_count()) != t ||
      int64_t(token_seq.element_count()) != t ||
      num_tokens.element_count() != 1 || layer.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "engine_cpu_attention: metadata shapes must be positions/token_seq [T], seq_lens [S], "
        "page_table [S, P], num_tokens and layer scalars");
  }
  Elem elem;
  switch (k.element_type()) {
    case ffi::DataType::F32: elem = F32; break;
    case ffi::DataType::BF16: elem = BF16; break;
    case ffi::DataType::F8E4M3FN: elem = F8; break;
    default:
      return ffi::Error::InvalidArgument(
          "engine_cpu_attention: caches must be float32, bfloat16 or float8_e4m3fn");
  }
  if (isa < 0 || isa > 4 || isa > engine_cpu_isa()) {
    return ffi::Error::InvalidArgument("engine_cpu_attention: ISA level not supported here");
  }
  if (t == 0 || hq == 0 || d == 0) return ffi::Error::Success();
  const int64_t eb = elem == F32 ? 4 : elem == BF16 ? 2 : 1;
  const int64_t lay = r == 5 ? std::clamp<int64_t>(layer.typed_data()[0], 0, layers - 1) : 0;
  const int64_t layer_bytes = num_pages * page * hkv * d * eb;
  const uint8_t* kp = static_cast<const uint8_t*>(k.untyped_data()) + lay * layer_bytes;
  const uint8_t* vp = static_cast<const uint8_t*>(v.untyped_data()) + lay * layer_bytes;
  const Ops* ops = isa >= 2 && d % 16 == 0 ? &kAvx512 : isa >= 1 && d % 8 == 0 ? &kAvx2
                                                                             : &kGeneric;
  const int64_t n_tok = std::clamp<int64_t>(num_tokens.typed_data()[0], 0, t);
  Job jb{ops, elem, eb, q.typed_data(), kp, vp, positions.typed_data(),
         token_seq.typed_data(), seq_lens.typed_data(), page_table.typed_data(),
         out->typed_data(), n_tok, pd[0], pd[1], num_pages, page, hkv, hq / hkv, d, scale,
         t, 1};
  // Multiply-adds of the real tokens (an upper bound: each reads at most P * page keys);
  // below ~64k a job is cheaper alone than handed to the pool (as the linear kernel's).
  int64_t work = 0;
  for (int64_t i = 0; i < n_tok && work < (1 << 16); ++i) {
    work += 2 * std::min<int64_t>(positions.typed_data()[i] + 1, pd[1] * page) * hq * d;
  }
  jb.chunks = work < (1 << 16) ? 1 : std::min<int64_t>(jb.items, 32);
  if (jb.chunks == 1) {
    RunChunk(&jb, 0);
  } else {
    engine_cpu_parallel_for(jb.chunks, RunChunk, &jb);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EngineCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [T, Hq, D]
                                  .Arg<ffi::AnyBuffer>()         // k [(L,) pages, page, Hkv, D]
                                  .Arg<ffi::AnyBuffer>()         // v, as k
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions [T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // token_seq [T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // seq_lens [S]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table [S, P]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_tokens []
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [T, Hq, D]
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("isa"));
