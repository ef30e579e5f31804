// moeflash native kernels: products on weights kept at their storage precision.
//
// Formats (moeflash/weights/quant.py):
//   FP8 e4m3 weight [N, K] (uint8 bits), fp32 multipliers [ceil(N/128), ceil(K/128)] per 128x128 block.
//   FP4 e2m1 weight [N, K/2] (two codes a byte, element 2k in the low nibble), UE8M0 exponent bytes
//   [N, K/32] per 32 consecutive inputs of a row.
// All products accumulate in fp32. Each output element is computed by the same sequence of operations
// whatever M (the number of input rows) is, so a row's result does not depend on which other rows share
// the call (batch invariance). The code path (AVX-512, AVX2+FMA+F16C, scalar) is chosen at run time from
// the CPU's features; MOEFLASH_ISA=scalar|avx2|avx512 (or ATen's ATEN_CPU_CAPABILITY) can lower it, never
// raise it past the CPU.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include "cpu.h"
#include "ops_common.h"
#include "quant_act.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace {

using moeflash_native::Isa;
using moeflash_native::isa;
using moeflash_native::SCALAR;
using moeflash_native::AVX2;
using moeflash_native::AVX512;

// ---- scalar decoding -----------------------------------------------------------------------------

struct Tables {
  float e4m3[256];
  float e2m1[16];
  Tables() {
    for (int b = 0; b < 256; ++b) {
      int s = b >> 7, e = (b >> 3) & 0xF, m = b & 7;
      float v = e == 0 ? std::ldexp(m / 8.0f, -6) : std::ldexp(1.0f + m / 8.0f, e - 7);
      if (e == 15 && m == 7) v = NAN;
      e4m3[b] = s ? -v : v;
    }
    const float mags[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    for (int c = 0; c < 16; ++c) e2m1[c] = (c & 8) ? -mags[c & 7] : mags[c & 7];
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

inline float e8m0(uint8_t b) {
  if (b == 0) return std::ldexp(1.0f, -127);
  if (b == 255) return NAN;
  uint32_t bits = static_cast<uint32_t>(b) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// ---- FP8 e4m3 rows -------------------------------------------------------------------------------
// y[m, n] = sum_b s[n/128, b] * sum_{k in block b} x[m, k] * w[n, k], for rows n in [n0, n1).
// The e4m3 byte is widened into fp16 bits (sign << 15 | magnitude << 7), converted by the F16C unit and
// corrected by 2^8 (the bias difference, 15 - 7), folded into the block's scale. fp16 subnormals convert
// exactly, so e4m3 subnormals need no special case.

constexpr int FP8_BLOCK = 128;
constexpr int FP4_GROUP = 32;

void fp8_rows_scalar(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* s, int64_t kb,
                     float* y, int64_t N, int64_t n0, int64_t n1) {
  const float* lut = tables().e4m3;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * K;
    const float* sr = s + (n / FP8_BLOCK) * kb;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.0f;
      for (int64_t k0 = 0; k0 < K; k0 += FP8_BLOCK) {
        int64_t k1 = std::min<int64_t>(K, k0 + FP8_BLOCK);
        float part = 0.0f;
        for (int64_t k = k0; k < k1; ++k) part = std::fma(lut[wr[k]], xr[k], part);
        acc = std::fma(part, sr[k0 / FP8_BLOCK], acc);
      }
      y[m * N + n] = acc;
    }
  }
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 e4m3x8_avx2(const uint8_t* p) {
  __m128i h = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  __m128i sign = _mm_slli_epi16(_mm_and_si128(h, _mm_set1_epi16(0x80)), 8);
  __m128i mag = _mm_slli_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7F)), 7);
  return _mm256_cvtph_ps(_mm_or_si128(sign, mag));
}

__attribute__((target("avx2,fma,f16c"))) inline float hsum_avx2(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// One output row n against R rows of x (R a compile-time constant, so accumulators stay in registers).
// Per 128-block: lanes accumulate w * x, then the block's scale multiplies the lane vector into the
// running sum; one horizontal sum at the end. The order is the same for every R.
// 16 e4m3 bytes -> two vectors of 8 floats (times 2^-8), as e4m3x32_avx512.
__attribute__((target("avx2,fma,f16c"))) inline void e4m3x16_avx2(const uint8_t* p, __m256& lo, __m256& hi) {
  __m256i t = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 7);
  t = _mm256_add_epi16(t, _mm256_and_si256(t, _mm256_set1_epi16(0x4000)));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(t));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(t, 1));
}

// One output row n against R rows of x (R a compile-time constant, so accumulators stay in registers).
// Per 128-block: four partial sums per row (32 weights a step, so FMA latency does not bound one row),
// then the block's scale multiplies their sum into the running total; one horizontal sum at the end.
// The order is the same for every R.
template <int R>
__attribute__((target("avx2,fma,f16c"))) inline void fp8_row_avx2(const float* x, int64_t K, const uint8_t* wr,
                                                                  const float* sr, float* y, int64_t N) {
  const float* lut = tables().e4m3;
  __m256 acc[R];
  float tail[R];
  for (int i = 0; i < R; ++i) { acc[i] = _mm256_setzero_ps(); tail[i] = 0.0f; }
  for (int64_t k0 = 0; k0 < K; k0 += FP8_BLOCK) {
    const int64_t k1 = std::min<int64_t>(K, k0 + FP8_BLOCK), kv = k0 + ((k1 - k0) / 8) * 8;
    __m256 p0[R], p1[R], p2[R], p3[R];
    for (int i = 0; i < R; ++i) p0[i] = p1[i] = p2[i] = p3[i] = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 32 <= kv; k += 32) {
      __m256 a, b, c, d;
      e4m3x16_avx2(wr + k, a, b);
      e4m3x16_avx2(wr + k + 16, c, d);
      for (int i = 0; i < R; ++i) {
        const float* xr = x + i * K + k;
        p0[i] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xr), p0[i]);
        p1[i] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xr + 8), p1[i]);
        p2[i] = _mm256_fmadd_ps(c, _mm256_loadu_ps(xr + 16), p2[i]);
        p3[i] = _mm256_fmadd_ps(d, _mm256_loadu_ps(xr + 24), p3[i]);
      }
    }
    for (; k < kv; k += 8) {
      const __m256 wv = e4m3x8_avx2(wr + k);
      for (int i = 0; i < R; ++i) p0[i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * K + k), p0[i]);
    }
    const float sc = sr[k0 / FP8_BLOCK];
    const __m256 scv = _mm256_set1_ps(sc * 256.0f);
    for (int i = 0; i < R; ++i) {
      const __m256 part = _mm256_add_ps(_mm256_add_ps(p0[i], p1[i]), _mm256_add_ps(p2[i], p3[i]));
      acc[i] = _mm256_fmadd_ps(part, scv, acc[i]);
      for (int64_t kk = kv; kk < k1; ++kk) tail[i] = std::fma(lut[wr[kk]] * sc, x[i * K + kk], tail[i]);
    }
  }
  for (int i = 0; i < R; ++i) y[i * N] = hsum_avx2(acc[i]) + tail[i];
}

__attribute__((target("avx2,fma,f16c"))) void fp8_rows_avx2(const float* x, int64_t M, int64_t K,
                                                             const uint8_t* w, const float* s, int64_t kb,
                                                             float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * K;
    const float* sr = s + (n / FP8_BLOCK) * kb;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) fp8_row_avx2<2>(x + m * K, K, wr, sr, y + m * N + n, N);
    if (m < M) fp8_row_avx2<1>(x + m * K, K, wr, sr, y + m * N + n, N);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c"))) inline __m512 e4m3x16_avx512(const uint8_t* p) {
  __m256i h = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  __m256i sign = _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x80)), 8);
  __m256i mag = _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7F)), 7);
  return _mm512_cvtph_ps(_mm256_or_si256(sign, mag));
}

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

// 32 e4m3 bytes -> two vectors of 16 floats (times 2^-8). The byte moves into fp16 bits with one shift
// (the sign lands on bit 14) and one masked add (which carries the sign up to bit 15).
AVX512_TARGET inline void e4m3x32_avx512(const uint8_t* p, __m512& lo, __m512& hi) {
  __m512i t = _mm512_slli_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 7);
  t = _mm512_add_epi16(t, _mm512_and_si512(t, _mm512_set1_epi16(0x4000)));
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(t));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(t, 1));
}

// The AVX-512 FP8 arithmetic of one (output, row) pair: inside each 128-input block one chain of FMAs over
// the inputs in order, 16 at a time; then acc = block sum * block scale + acc, block after block; then the
// lanes' sum plus the scalar tail (inputs past the last multiple of 16 in a block). Every kernel below keeps
// exactly this order, so a row's result never depends on the other rows of the call (batch invariance).

// One block's chain for RN outputs x RM rows (register blocking: each weight vector decoded once for the RM
// rows, each x vector loaded once for the RN outputs). w points at output n's row.
template <int RN, int RM>
AVX512_TARGET inline void fp8_chain_avx512(const float* x, int64_t K, const uint8_t* w, int64_t k0, int64_t kv,
                                           __m512 (&p)[RN][RM]) {
  for (int r = 0; r < RN; ++r)
    for (int m = 0; m < RM; ++m) p[r][m] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 32 <= kv; k += 32) {  // two 16-input steps of the chain, their weights decoded at once
    __m512 xlo[RM], xhi[RM];
    for (int m = 0; m < RM; ++m) {
      xlo[m] = _mm512_loadu_ps(x + m * K + k);
      xhi[m] = _mm512_loadu_ps(x + m * K + k + 16);
    }
    for (int r = 0; r < RN; ++r) {
      __m512 lo, hi;
      e4m3x32_avx512(w + r * K + k, lo, hi);
      for (int m = 0; m < RM; ++m) p[r][m] = _mm512_fmadd_ps(hi, xhi[m], _mm512_fmadd_ps(lo, xlo[m], p[r][m]));
    }
  }
  for (; k < kv; k += 16) {
    __m512 xv[RM];
    for (int m = 0; m < RM; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
    for (int r = 0; r < RN; ++r) {
      const __m512 wv = e4m3x16_avx512(w + r * K + k);
      for (int m = 0; m < RM; ++m) p[r][m] = _mm512_fmadd_ps(wv, xv[m], p[r][m]);
    }
  }
}

// RN outputs (n ..) x RM rows, whole rows.
template <int RN, int RM>
AVX512_TARGET inline void fp8_tile_avx512(const float* x, int64_t K, const uint8_t* w, const float* s, int64_t kb,
                                          int64_t n, float* y, int64_t N) {
  const float* lut = tables().e4m3;
  __m512 acc[RN][RM], p[RN][RM];
  float tail[RN][RM];
  for (int r = 0; r < RN; ++r)
    for (int m = 0; m < RM; ++m) { acc[r][m] = _mm512_setzero_ps(); tail[r][m] = 0.0f; }
  for (int64_t k0 = 0; k0 < K; k0 += FP8_BLOCK) {
    const int64_t k1 = std::min<int64_t>(K, k0 + FP8_BLOCK), kv = k0 + ((k1 - k0) / 16) * 16;
    fp8_chain_avx512<RN, RM>(x, K, w + n * K, k0, kv, p);
    for (int r = 0; r < RN; ++r) {
      const uint8_t* wr = w + (n + r) * K;
      const float sc = s[((n + r) / FP8_BLOCK) * kb + k0 / FP8_BLOCK];
      const __m512 scv = _mm512_set1_ps(sc * 256.0f);
      for (int m = 0; m < RM; ++m) {
        acc[r][m] = _mm512_fmadd_ps(p[r][m], scv, acc[r][m]);
        for (int64_t kk = kv; kk < k1; ++kk) tail[r][m] = std::fma(lut[wr[kk]] * sc, x[m * K + kk], tail[r][m]);
      }
    }
  }
  for (int r = 0; r < RN; ++r)
    for (int m = 0; m < RM; ++m) y[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + tail[r][m];
}

// One row, one output: four blocks' chains at a time (independent, so the FMA latency is hidden while the
// weight row streams in order), added into acc in block order: the same arithmetic as fp8_tile_avx512.
AVX512_TARGET inline void fp8_row1_avx512(const float* x, int64_t K, const uint8_t* wr, const float* sr, float* y) {
  const float* lut = tables().e4m3;
  __m512 acc = _mm512_setzero_ps();
  float tail = 0.0f;
  int64_t k0 = 0;
  for (; k0 + 4 * FP8_BLOCK <= K; k0 += 4 * FP8_BLOCK) {  // four whole blocks
    __m512 p[4];
    for (int b = 0; b < 4; ++b) p[b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < FP8_BLOCK; k += 32) {
      for (int b = 0; b < 4; ++b) {
        const int64_t kk = k0 + b * FP8_BLOCK + k;
        __m512 lo, hi;
        e4m3x32_avx512(wr + kk, lo, hi);
        p[b] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + kk + 16), _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + kk), p[b]));
      }
    }
    for (int b = 0; b < 4; ++b) acc = _mm512_fmadd_ps(p[b], _mm512_set1_ps(sr[k0 / FP8_BLOCK + b] * 256.0f), acc);
  }
  for (; k0 < K; k0 += FP8_BLOCK) {  // the rest, block by block
    const int64_t k1 = std::min<int64_t>(K, k0 + FP8_BLOCK), kv = k0 + ((k1 - k0) / 16) * 16;
    __m512 p[1][1];
    fp8_chain_avx512<1, 1>(x, K, wr, k0, kv, p);
    const float sc = sr[k0 / FP8_BLOCK];
    acc = _mm512_fmadd_ps(p[0][0], _mm512_set1_ps(sc * 256.0f), acc);
    for (int64_t kk = kv; kk < k1; ++kk) tail = std::fma(lut[wr[kk]] * sc, x[kk], tail);
  }
  *y = _mm512_reduce_add_ps(acc) + tail;
}

template <int RN>
AVX512_TARGET inline void fp8_rows_tile_avx512(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* s,
                                               int64_t kb, int64_t n, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) fp8_tile_avx512<RN, 4>(x + m * K, K, w, s, kb, n, y + m * N, N);
  switch (M - m) {
    case 3: fp8_tile_avx512<RN, 3>(x + m * K, K, w, s, kb, n, y + m * N, N); break;
    case 2: fp8_tile_avx512<RN, 2>(x + m * K, K, w, s, kb, n, y + m * N, N); break;
    case 1: fp8_tile_avx512<RN, 1>(x + m * K, K, w, s, kb, n, y + m * N, N); break;
    default: break;
  }
}

AVX512_TARGET void fp8_rows_avx512(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* s,
                                   int64_t kb, float* y, int64_t N, int64_t n0, int64_t n1) {
  if (M == 1) {
    for (int64_t n = n0; n < n1; ++n) fp8_row1_avx512(x, K, w + n * K, s + (n / FP8_BLOCK) * kb, y + n);
    return;
  }
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) fp8_rows_tile_avx512<4>(x, M, K, w, s, kb, n, y, N);
  switch (n1 - n) {
    case 3: fp8_rows_tile_avx512<3>(x, M, K, w, s, kb, n, y, N); break;
    case 2: fp8_rows_tile_avx512<2>(x, M, K, w, s, kb, n, y, N); break;
    case 1: fp8_rows_tile_avx512<1>(x, M, K, w, s, kb, n, y, N); break;
    default: break;
  }
}

// Products in the vector paths sum 8 or 16 partial lanes; the scalar path sums in order. The paths differ
// by fp32 rounding only (tested against the plain-torch reference), never by CPU within one path.

// ---- FP4 e2m1 rows -------------------------------------------------------------------------------
// x is first de-interleaved per 32-group: [16 even elements][16 odd elements], so the low nibbles of 16
// bytes multiply the evens and the high nibbles the odds, with no shuffle of the weights.

void deinterleave(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K; g += FP4_GROUP)
      for (int j = 0; j < FP4_GROUP / 2; ++j) {
        out[m * K + g + j] = x[m * K + g + 2 * j];
        out[m * K + g + 16 + j] = x[m * K + g + 2 * j + 1];
      }
}

void fp4_rows_scalar(const float* xd, int64_t M, int64_t K, const uint8_t* w, const uint8_t* s, float* y,
                     int64_t N, int64_t n0, int64_t n1) {
  const float* lut = tables().e2m1;
  const int64_t G = K / FP4_GROUP;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    const uint8_t* sr = s + n * G;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xd + m * K;
      float acc = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        float part = 0.0f;
        for (int j = 0; j < 16; ++j) {
          uint8_t b = wr[g * 16 + j];
          part = std::fma(lut[b & 0xF], xr[g * 32 + j], part);
          part = std::fma(lut[b >> 4], xr[g * 32 + 16 + j], part);
        }
        acc = std::fma(part, e8m0(sr[g]), acc);
      }
      y[m * N + n] = acc;
    }
  }
}

template <int R>
__attribute__((target("avx2,fma,f16c"))) inline void fp4_row_avx2(const float* xd, int64_t K, const uint8_t* wr,
                                                                  const uint8_t* sr, float* y, int64_t N) {
  const int64_t G = K / FP4_GROUP;
  const __m256 mags = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
  const __m256i seven = _mm256_set1_epi32(7), eight = _mm256_set1_epi32(8), fifteen = _mm256_set1_epi32(15);
  __m256 acc[2][R];  // even and odd groups: two independent chains per row
  for (int i = 0; i < R; ++i) acc[0][i] = acc[1][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256 sc = _mm256_set1_ps(e8m0(sr[g]));
    const int ch = g & 1;
    __m256 wv[4];  // low codes 0-7, low 8-15, high 0-7, high 8-15
    for (int half = 0; half < 2; ++half) {
      __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + g * 16 + half * 8)));
      __m256i codes[2] = {_mm256_and_si256(b, fifteen), _mm256_srli_epi32(b, 4)};
      for (int c = 0; c < 2; ++c) {
        __m256 mag = _mm256_permutevar8x32_ps(mags, _mm256_and_si256(codes[c], seven));
        __m256i sign = _mm256_slli_epi32(_mm256_and_si256(codes[c], eight), 28);
        wv[c * 2 + half] = _mm256_xor_ps(mag, _mm256_castsi256_ps(sign));
      }
    }
    for (int i = 0; i < R; ++i) {
      const float* xr = xd + i * K + g * 32;
      __m256 p = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xr));
      p = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xr + 8), p);
      p = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xr + 16), p);
      p = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xr + 24), p);
      acc[ch][i] = _mm256_fmadd_ps(p, sc, acc[ch][i]);
    }
  }
  for (int i = 0; i < R; ++i) y[i * N] = hsum_avx2(_mm256_add_ps(acc[0][i], acc[1][i]));
}

__attribute__((target("avx2,fma,f16c"))) void fp4_rows_avx2(const float* xd, int64_t M, int64_t K,
                                                             const uint8_t* w, const uint8_t* s, float* y,
                                                             int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / FP4_GROUP;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    const uint8_t* sr = s + n * G;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) fp4_row_avx2<4>(xd + m * K, K, wr, sr, y + m * N + n, N);
    switch (M - m) {
      case 3: fp4_row_avx2<3>(xd + m * K, K, wr, sr, y + m * N + n, N); break;
      case 2: fp4_row_avx2<2>(xd + m * K, K, wr, sr, y + m * N + n, N); break;
      case 1: fp4_row_avx2<1>(xd + m * K, K, wr, sr, y + m * N + n, N); break;
      default: break;
    }
  }
}

template <int R>
AVX512_TARGET inline void fp4_row_avx512(const float* xd, int64_t K, const uint8_t* wr, const uint8_t* sr, float* y,
                                         int64_t N) {
  const int64_t G = K / FP4_GROUP;
  const __m512 lut = _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f, -0.5f, -1.0f, -1.5f,
                                    -2.0f, -3.0f, -4.0f, -6.0f);
  __m512 acc[2][R];  // even and odd groups: two independent chains per row
  for (int i = 0; i < R; ++i) acc[0][i] = acc[1][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + g * 16)));
    const __m512 wlo = _mm512_permutexvar_ps(b, lut) /* reads the low 4 bits of each index */;
    const __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
    const __m512 sc = _mm512_set1_ps(e8m0(sr[g]));
    const int c = g & 1;
    for (int i = 0; i < R; ++i) {
      const float* xr = xd + i * K + g * 32;
      __m512 p = _mm512_mul_ps(wlo, _mm512_loadu_ps(xr));
      p = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xr + 16), p);
      acc[c][i] = _mm512_fmadd_ps(p, sc, acc[c][i]);
    }
  }
  for (int i = 0; i < R; ++i) y[i * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][i], acc[1][i]));
}

// One input row against 4 weight rows at once: 4 independent accumulator chains share each x load (the
// batch-1 decode case, where one chain per weight row leaves the FMA unit waiting on its latency). Each
// output's operations are those of fp4_row_avx512<1> in the same order, so results do not change.
AVX512_TARGET inline void fp4_row1x4_avx512(const float* xd, int64_t K, const uint8_t* wr, const uint8_t* sr, float* y) {
  const int64_t G = K / FP4_GROUP;
  const __m512 lut = _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f, -0.5f, -1.0f, -1.5f,
                                    -2.0f, -3.0f, -4.0f, -6.0f);
  // the 4 rows' UE8M0 scales as floats, 16 at a time (e8m0() for each byte, without its branches)
  constexpr int64_t kMaxG = 512;
  alignas(64) float sc[4 * kMaxG];
  if (G > kMaxG) {
    for (int j = 0; j < 4; ++j) fp4_row_avx512<1>(xd, K, wr + j * (K / 2), sr + j * G, y + j, 1);
    return;
  }
  for (int j = 0; j < 4; ++j)
    for (int64_t g = 0; g < G; g += 16) {
      const int64_t n = std::min<int64_t>(16, G - g);
      const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
      const __m512i e = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, sr + j * G + g));
      __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
      f = _mm512_mask_mov_ps(f, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()), _mm512_set1_ps(e8m0(0)));
      f = _mm512_mask_mov_ps(f, _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(255)), _mm512_set1_ps(NAN));
      _mm512_mask_storeu_ps(sc + j * G + g, live, f);
    }
  __m512 acc[2][4];
  for (int j = 0; j < 4; ++j) acc[0][j] = acc[1][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m512 x0 = _mm512_loadu_ps(xd + g * 32), x1 = _mm512_loadu_ps(xd + g * 32 + 16);
    const int c = g & 1;
    for (int j = 0; j < 4; ++j) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + j * (K / 2) + g * 16)));
      const __m512 wlo = _mm512_permutexvar_ps(b, lut) /* reads the low 4 bits of each index */;
      const __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
      __m512 p = _mm512_mul_ps(wlo, x0);
      p = _mm512_fmadd_ps(whi, x1, p);
      acc[c][j] = _mm512_fmadd_ps(p, _mm512_set1_ps(sc[j * G + g]), acc[c][j]);
    }
  }
  for (int j = 0; j < 4; ++j) y[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][j], acc[1][j]));
}

AVX512_TARGET void fp4_rows_avx512(const float* xd, int64_t M, int64_t K, const uint8_t* w, const uint8_t* s,
                                   float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / FP4_GROUP;
  if (M == 1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) fp4_row1x4_avx512(xd, K, w + n * (K / 2), s + n * G, y + n);
    for (; n < n1; ++n) fp4_row_avx512<1>(xd, K, w + n * (K / 2), s + n * G, y + n, N);
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    const uint8_t* sr = s + n * G;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) fp4_row_avx512<4>(xd + m * K, K, wr, sr, y + m * N + n, N);
    switch (M - m) {
      case 3: fp4_row_avx512<3>(xd + m * K, K, wr, sr, y + m * N + n, N); break;
      case 2: fp4_row_avx512<2>(xd + m * K, K, wr, sr, y + m * N + n, N); break;
      case 1: fp4_row_avx512<1>(xd + m * K, K, wr, sr, y + m * N + n, N); break;
      default: break;
    }
  }
}

// ---- bf16 rows (weights stored bf16, activations and sums fp32) -----------------------------------
// bf16 -> fp32 is exact (a 16-bit shift), so this equals an fp32 product on the stored values.

inline float bf16_to_float(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

constexpr int BF16_CHUNK = 64;  // weights per step: four chains of 16 (AVX-512) or 8 x 2 (AVX2)

void bf16_rows_scalar(const float* x, int64_t M, int64_t K, const uint16_t* w, float* y, int64_t N, int64_t n0,
                      int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(bf16_to_float(w[n * K + k]), x[m * K + k], acc);
      y[m * N + n] = acc;
    }
}

template <int R>
__attribute__((target("avx2,fma,f16c"))) inline void bf16_row_avx2(const float* x, int64_t K, const uint16_t* wr,
                                                                   float* y, int64_t N) {
  __m256 p[4][R];
  float tail[R];
  for (int i = 0; i < R; ++i) { p[0][i] = p[1][i] = p[2][i] = p[3][i] = _mm256_setzero_ps(); tail[i] = 0.0f; }
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256 wv[4];
    for (int c = 0; c < 4; ++c)
      wv[c] = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k + 8 * c))), 16));
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < 4; ++c) p[c][i] = _mm256_fmadd_ps(wv[c], _mm256_loadu_ps(x + i * K + k + 8 * c), p[c][i]);
  }
  for (int i = 0; i < R; ++i) {
    for (int64_t kk = k; kk < K; ++kk) tail[i] = std::fma(bf16_to_float(wr[kk]), x[i * K + kk], tail[i]);
    y[i * N] = hsum_avx2(_mm256_add_ps(_mm256_add_ps(p[0][i], p[1][i]), _mm256_add_ps(p[2][i], p[3][i]))) + tail[i];
  }
}

template <int R>
AVX512_TARGET inline void bf16_row_avx512(const float* x, int64_t K, const uint16_t* wr, float* y, int64_t N) {
  __m512 p[4][R];
  float tail[R];
  for (int i = 0; i < R; ++i) { p[0][i] = p[1][i] = p[2][i] = p[3][i] = _mm512_setzero_ps(); tail[i] = 0.0f; }
  int64_t k = 0;
  for (; k + BF16_CHUNK <= K; k += BF16_CHUNK) {
    __m512 wv[4];
    for (int c = 0; c < 4; ++c)
      wv[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k + 16 * c))), 16));
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < 4; ++c) p[c][i] = _mm512_fmadd_ps(wv[c], _mm512_loadu_ps(x + i * K + k + 16 * c), p[c][i]);
  }
  for (int i = 0; i < R; ++i) {
    for (int64_t kk = k; kk < K; ++kk) tail[i] = std::fma(bf16_to_float(wr[kk]), x[i * K + kk], tail[i]);
    y[i * N] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(p[0][i], p[1][i]), _mm512_add_ps(p[2][i], p[3][i]))) +
               tail[i];
  }
}

__attribute__((target("avx2,fma,f16c"))) void bf16_rows_avx2(const float* x, int64_t M, int64_t K,
                                                              const uint16_t* w, float* y, int64_t N, int64_t n0,
                                                              int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) bf16_row_avx2<2>(x + m * K, K, w + n * K, y + m * N + n, N);
    if (m < M) bf16_row_avx2<1>(x + m * K, K, w + n * K, y + m * N + n, N);
  }
}

AVX512_TARGET void bf16_rows_avx512(const float* x, int64_t M, int64_t K, const uint16_t* w, float* y, int64_t N,
                                    int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) bf16_row_avx512<4>(x + m * K, K, w + n * K, y + m * N + n, N);
    switch (M - m) {
      case 3: bf16_row_avx512<3>(x + m * K, K, w + n * K, y + m * N + n, N); break;
      case 2: bf16_row_avx512<2>(x + m * K, K, w + n * K, y + m * N + n, N); break;
      case 1: bf16_row_avx512<1>(x + m * K, K, w + n * K, y + m * N + n, N); break;
      default: break;
    }
  }
}

// ---- FP4 rows decoded to fp32, in the de-interleaved column order of `deinterleave` ------------------
// For the prefill path: an expert with many rows is decoded once and multiplied by torch's GEMM. The
// columns come out per 32-group as [16 even elements][16 odd elements], matching the de-interleaved x,
// so the products are the same sums over a permuted K and no shuffle back is needed.

void fp4_decode_scalar(const uint8_t* w, const uint8_t* s, int64_t K, int64_t n0, int64_t n1, float* out) {
  const float* lut = tables().e2m1;
  const int64_t G = K / FP4_GROUP;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const float sc = e8m0(s[n * G + g]);
      const uint8_t* b = w + n * (K / 2) + g * 16;
      float* o = out + n * K + g * 32;
      for (int j = 0; j < 16; ++j) { o[j] = lut[b[j] & 0xF] * sc; o[16 + j] = lut[b[j] >> 4] * sc; }
    }
}

AVX512_TARGET void fp4_decode_avx512(const uint8_t* w, const uint8_t* s, int64_t K, int64_t n0, int64_t n1,
                                     float* out) {
  const int64_t G = K / FP4_GROUP;
  const __m512 lut = _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f, -0.5f, -1.0f, -1.5f,
                                    -2.0f, -3.0f, -4.0f, -6.0f);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const __m512 sc = _mm512_set1_ps(e8m0(s[n * G + g]));
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + n * (K / 2) + g * 16)));
      float* o = out + n * K + g * 32;
      _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_permutexvar_ps(b, lut) /* reads the low 4 bits of each index */, sc));
      _mm512_storeu_ps(o + 16, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut), sc));
    }
}

void fp4_decode(const uint8_t* w, const uint8_t* s, int64_t K, int64_t n0, int64_t n1, float* out) {
  if (isa() == AVX512) return fp4_decode_avx512(w, s, K, n0, n1, out);
  return fp4_decode_scalar(w, s, K, n0, n1, out);
}

// ---- GGUF blocks of 32: Q4_0 (fp16 d, 16 bytes: d * (q - 8)), Q4_1 (fp16 d, fp16 m, 16 bytes: d * q + m),
// Q8_0 (fp16 d, 32 int8: d * q). A 4-bit byte j holds element j (low nibble) and j + 16 (high nibble).
// For the 4-bit types a block's product is d * sum(q x) + m * sum(x) (Q4_0: m = -8 d), with sum(x) per
// block computed once per call.

constexpr int GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q8_0 = 8;

inline int64_t block_bytes(int qtype) {
  return qtype == GGML_Q4_0 ? 18 : qtype == GGML_Q4_1 ? 20 : qtype == GGML_Q5_0 ? 22 : 34;
}
// where a 4-bit type's nibbles start; Q5_0 keeps each value's fifth bit in the 32-bit word at byte 2
inline int qs_offset(int qtype) { return qtype == GGML_Q4_1 ? 4 : qtype == GGML_Q5_0 ? 6 : 2; }
inline uint32_t q5_high(const uint8_t* blk) {
  uint32_t h;
  std::memcpy(&h, blk + 2, 4);
  return h;
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline void q4_dm(const uint8_t* blk, int qtype, float& d, float& m) {
  d = half_at(blk);
  m = qtype == GGML_Q4_1 ? half_at(blk + 2) : (qtype == GGML_Q5_0 ? -16.0f : -8.0f) * d;
}

__attribute__((target("avx2,fma,f16c"))) inline float half_f16c(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

__attribute__((target("avx2,fma,f16c"))) inline void q4_dm_f16c(const uint8_t* blk, int qtype, float& d, float& m) {
  d = half_f16c(blk);
  m = qtype == GGML_Q4_1 ? half_f16c(blk + 2) : (qtype == GGML_Q5_0 ? -16.0f : -8.0f) * d;
}

void block_sums(const float* x, int64_t M, int64_t K, float* out) {
  const int64_t nb = K / 32;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      float acc = 0.0f;
      for (int j = 0; j < 32; ++j) acc += x[i * K + b * 32 + j];
      out[i * nb + b] = acc;
    }
}

void gguf_rows_scalar(const float* x, const float* xs, int64_t M, int64_t K, const uint8_t* w, int qtype, float* y,
                      int64_t N, int64_t n0, int64_t n1) {
  const int64_t nb = K / 32, bb = block_bytes(qtype);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t i = 0; i < M; ++i) {
      const float* xr = x + i * K;
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = w + (n * nb + b) * bb;
        float p = 0.0f;
        if (qtype == GGML_Q8_0) {
          const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
          for (int j = 0; j < 32; ++j) p = std::fma(static_cast<float>(q[j]), xr[b * 32 + j], p);
          acc = std::fma(p, half_at(blk), acc);
        } else {
          float d, m;
          q4_dm(blk, qtype, d, m);
          const uint8_t* q = blk + qs_offset(qtype);
          const uint32_t h = qtype == GGML_Q5_0 ? q5_high(blk) : 0;
          for (int j = 0; j < 16; ++j) {
            p = std::fma(static_cast<float>((q[j] & 0xF) | (((h >> j) & 1) << 4)), xr[b * 32 + j], p);
            p = std::fma(static_cast<float>((q[j] >> 4) | (((h >> (j + 16)) & 1) << 4)), xr[b * 32 + 16 + j], p);
          }
          acc = std::fma(p, d, acc);
          acc = std::fma(m, xs[i * nb + b], acc);
        }
      }
      y[i * N + n] = acc;
    }
}

template <int R>
AVX512_TARGET inline void gguf_row_avx512(const float* x, const float* xs, int64_t K, const uint8_t* wr, int qtype,
                                          float* y, int64_t N) {
  const int64_t nb = K / 32, bb = block_bytes(qtype);
  const __m512i fifteen = _mm512_set1_epi32(15);
  __m512 acc[2][R];
  float macc[R];
  for (int i = 0; i < R; ++i) { acc[0][i] = acc[1][i] = _mm512_setzero_ps(); macc[i] = 0.0f; }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wr + b * bb;
    __m512 q0, q1;
    float d, m = 0.0f;
    if (qtype == GGML_Q8_0) {
      d = half_f16c(blk);
      q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2))));
      q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18))));
    } else {
      q4_dm_f16c(blk, qtype, d, m);
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + qs_offset(qtype))));
      __m512i lo = _mm512_and_si512(v, fifteen), hi = _mm512_srli_epi32(v, 4);
      if (qtype == GGML_Q5_0) {  // fifth bits: lane j of the low half gets bit j, of the high half bit 16 + j
        const uint32_t h = q5_high(blk);
        const __m512i sixteen = _mm512_set1_epi32(16);
        lo = _mm512_mask_add_epi32(lo, static_cast<__mmask16>(h & 0xFFFF), lo, sixteen);
        hi = _mm512_mask_add_epi32(hi, static_cast<__mmask16>(h >> 16), hi, sixteen);
      }
      q0 = _mm512_cvtepi32_ps(lo);
      q1 = _mm512_cvtepi32_ps(hi);
    }
    const __m512 dv = _mm512_set1_ps(d);
    const int c = b & 1;
    for (int i = 0; i < R; ++i) {
      const float* xr = x + i * K + b * 32;
      __m512 p = _mm512_mul_ps(q0, _mm512_loadu_ps(xr));
      p = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xr + 16), p);
      acc[c][i] = _mm512_fmadd_ps(p, dv, acc[c][i]);
      if (qtype != GGML_Q8_0) macc[i] = std::fma(m, xs[i * nb + b], macc[i]);
    }
  }
  for (int i = 0; i < R; ++i) y[i * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][i], acc[1][i])) + macc[i];
}

template <int R>
__attribute__((target("avx2,fma,f16c"))) inline void gguf_row_avx2(const float* x, const float* xs, int64_t K,
                                                                   const uint8_t* wr, int qtype, float* y, int64_t N) {
  const int64_t nb = K / 32, bb = block_bytes(qtype);
  const __m256i fifteen = _mm256_set1_epi32(15);
  __m256 acc[2][R];
  float macc[R];
  for (int i = 0; i < R; ++i) { acc[0][i] = acc[1][i] = _mm256_setzero_ps(); macc[i] = 0.0f; }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wr + b * bb;
    __m256 q[4];
    float d, m = 0.0f;
    if (qtype == GGML_Q8_0) {
      d = half_f16c(blk);
      for (int h = 0; h < 4; ++h)
        q[h] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * h))));
    } else {
      q4_dm_f16c(blk, qtype, d, m);
      const uint8_t* qs = blk + qs_offset(qtype);
      const uint32_t qh = qtype == GGML_Q5_0 ? q5_high(blk) : 0;
      const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * h)));
        __m256i lo = _mm256_and_si256(v, fifteen), hi = _mm256_srli_epi32(v, 4);
        if (qtype == GGML_Q5_0) {  // bit (8h + lane) for the low nibbles, bit (16 + 8h + lane) for the high
          const __m256i bl = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>((qh >> (8 * h)) & 0xFF)), lane_bit);
          const __m256i bh = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>((qh >> (16 + 8 * h)) & 0xFF)), lane_bit);
          lo = _mm256_add_epi32(lo, _mm256_and_si256(_mm256_cmpeq_epi32(bl, lane_bit), _mm256_set1_epi32(16)));
          hi = _mm256_add_epi32(hi, _mm256_and_si256(_mm256_cmpeq_epi32(bh, lane_bit), _mm256_set1_epi32(16)));
        }
        q[h] = _mm256_cvtepi32_ps(lo);      // elements 8h .. 8h+7
        q[2 + h] = _mm256_cvtepi32_ps(hi);  // elements 16+8h .. 16+8h+7
      }
    }
    const __m256 dv = _mm256_set1_ps(d);
    const int c = b & 1;
    for (int i = 0; i < R; ++i) {
      const float* xr = x + i * K + b * 32;
      __m256 p = _mm256_mul_ps(q[0], _mm256_loadu_ps(xr));
      p = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xr + 8), p);
      p = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xr + 16), p);
      p = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xr + 24), p);
      acc[c][i] = _mm256_fmadd_ps(p, dv, acc[c][i]);
      if (qtype != GGML_Q8_0) macc[i] = std::fma(m, xs[i * nb + b], macc[i]);
    }
  }
  for (int i = 0; i < R; ++i) y[i * N] = hsum_avx2(_mm256_add_ps(acc[0][i], acc[1][i])) + macc[i];
}

void gguf_rows(const float* x, const float* xs, int64_t M, int64_t K, const uint8_t* w, int qtype, float* y, int64_t N,
               int64_t n0, int64_t n1) {
  const int64_t row_bytes = (K / 32) * block_bytes(qtype), nb = K / 32;
  if (isa() == SCALAR) return gguf_rows_scalar(x, xs, M, K, w, qtype, y, N, n0, n1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * row_bytes;
    int64_t m = 0;
    if (isa() == AVX512) {
      for (; m + 4 <= M; m += 4) gguf_row_avx512<4>(x + m * K, xs + m * nb, K, wr, qtype, y + m * N + n, N);
      for (; m < M; ++m) gguf_row_avx512<1>(x + m * K, xs + m * nb, K, wr, qtype, y + m * N + n, N);
    } else {
      for (; m + 2 <= M; m += 2) gguf_row_avx2<2>(x + m * K, xs + m * nb, K, wr, qtype, y + m * N + n, N);
      for (; m < M; ++m) gguf_row_avx2<1>(x + m * K, xs + m * nb, K, wr, qtype, y + m * N + n, N);
    }
  }
}

// ---- GGUF K-quants and MXFP4: Q4_K (super-blocks of 256: fp16 d and dmin, 12 bytes of 6-bit scales and
// mins for 8 sub-blocks of 32, 128 bytes of nibbles), Q6_K (256: 128 bytes low nibbles, 64 bytes high
// 2-bit pairs, 16 int8 scales, fp16 d) and MXFP4 (32: an E8M0 byte, 16 bytes of e2m1 codes, ggml's doubled
// table with a halved scale). A block is decoded into fp32 (the values ggml decodes) once per call and
// dotted with every input row: 16 independent lane sums per row in a fixed order, reduced at the end, so
// a row's result does not depend on M.

constexpr int GGML_Q4_K = 12, GGML_Q6_K = 14, GGML_MXFP4 = 39;
inline bool is_kq(int q) { return q == GGML_Q4_K || q == GGML_Q6_K || q == GGML_MXFP4; }
inline int kq_values(int q) { return q == GGML_MXFP4 ? 32 : 256; }
inline int kq_bytes(int q) { return q == GGML_Q4_K ? 144 : q == GGML_Q6_K ? 210 : 17; }

__attribute__((always_inline)) inline void decode_kq(const uint8_t* b, int q, float* o) {
  if (q == GGML_Q4_K) {
    const float d = half_at(b), dmin = half_at(b + 2);
    const uint8_t* sc = b + 4;
    const uint8_t* qs = b + 16;
    for (int s = 0; s < 8; ++s) {
      const int scale = s < 4 ? (sc[s] & 63) : ((sc[s + 4] & 0xF) | ((sc[s - 4] >> 6) << 4));
      const int mn = s < 4 ? (sc[s + 4] & 63) : ((sc[s + 4] >> 4) | ((sc[s] >> 6) << 4));
      const float dl = d * static_cast<float>(scale), ml = dmin * static_cast<float>(mn);
      const uint8_t* qq = qs + (s / 2) * 32;
      const int shift = (s & 1) * 4;
      for (int l = 0; l < 32; ++l) o[s * 32 + l] = dl * static_cast<float>((qq[l] >> shift) & 0xF) - ml;
    }
  } else if (q == GGML_Q6_K) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half_at(b + 208);
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 4; ++k) {
        const uint8_t* lo = ql + h * 64 + (k & 1) * 32;
        const int lshift = (k >> 1) * 4;
        for (int half = 0; half < 2; ++half) {
          const float ds = d * static_cast<float>(sc[h * 8 + k * 2 + half]);
          for (int l = half * 16; l < half * 16 + 16; ++l) {
            const int v = ((lo[l] >> lshift) & 0xF) | (((qh[h * 32 + l] >> (2 * k)) & 3) << 4);
            o[h * 128 + k * 32 + l] = ds * static_cast<float>(v - 32);
          }
        }
      }
  } else {
    static const float kv[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
    const float d = std::ldexp(1.0f, static_cast<int>(b[0]) - 128);
    for (int j = 0; j < 16; ++j) {
      o[j] = d * kv[b[1 + j] & 0xF];
      o[16 + j] = d * kv[b[1 + j] >> 4];
    }
  }
}

__attribute__((always_inline)) inline void kq_rows_impl(const float* x, int64_t M, int64_t K, const uint8_t* w, int q,
                                                       float* y, int64_t N, int64_t n0, int64_t n1) {
  const int V = kq_values(q), B = kq_bytes(q);
  const int64_t nb = K / V, row_bytes = nb * B;
  constexpr int R = 8;  // input rows per pass over a weight row (its blocks are decoded once per pass)
  alignas(64) float buf[256];
  alignas(64) float acc[R][16];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * row_bytes;
    for (int64_t m0 = 0; m0 < M; m0 += R) {
      const int mm = static_cast<int>(std::min<int64_t>(R, M - m0));
      std::memset(acc, 0, sizeof(acc));
      for (int64_t b = 0; b < nb; ++b) {
        decode_kq(wr + b * B, q, buf);
        for (int m = 0; m < mm; ++m) {
          const float* xr = x + (m0 + m) * K + b * V;
          float* a = acc[m];
          for (int i = 0; i < V; i += 16)
            for (int l = 0; l < 16; ++l) a[l] += buf[i + l] * xr[i + l];
        }
      }
      for (int m = 0; m < mm; ++m) {
        float* a = acc[m];
        for (int w2 = 8; w2 >= 1; w2 /= 2)
          for (int l = 0; l < w2; ++l) a[l] += a[l + w2];
        y[(m0 + m) * N + n] = a[0];
      }
    }
  }
}

AVX512_TARGET void kq_rows_avx512(const float* x, int64_t M, int64_t K, const uint8_t* w, int q, float* y, int64_t N,
                                  int64_t n0, int64_t n1) {
  kq_rows_impl(x, M, K, w, q, y, N, n0, n1);
}
__attribute__((target("avx2,fma,f16c"))) void kq_rows_avx2(const float* x, int64_t M, int64_t K, const uint8_t* w,
                                                            int q, float* y, int64_t N, int64_t n0, int64_t n1) {
  kq_rows_impl(x, M, K, w, q, y, N, n0, n1);
}
void kq_rows_scalar(const float* x, int64_t M, int64_t K, const uint8_t* w, int q, float* y, int64_t N, int64_t n0,
                    int64_t n1) {
  kq_rows_impl(x, M, K, w, q, y, N, n0, n1);
}

// AVX-512 Q4_K and Q6_K rows without the fp32 staging buffer: each 16- or 32-value group's codes are
// widened in registers and multiplied into 16-lane sums (Q4_K: d * scale * sum(q x) - dmin * min * sum(x),
// the second term as its own vector sum). Fixed order per output: batch-invariant.
AVX512_TARGET float q4k_dot_avx512(const float* x, const uint8_t* wr, int64_t nb) {
  __m512 acc = _mm512_setzero_ps(), macc = _mm512_setzero_ps();
  const __m512i fifteen = _mm512_set1_epi32(15);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wr + b * 144;
    const float d = half_f16c(blk), dmin = half_f16c(blk + 2);
    const uint8_t* sc = blk + 4;
    const uint8_t* qs = blk + 16;
    const float* xb = x + b * 256;
    for (int s = 0; s < 8; ++s) {
      const int scale = s < 4 ? (sc[s] & 63) : ((sc[s + 4] & 0xF) | ((sc[s - 4] >> 6) << 4));
      const int mn = s < 4 ? (sc[s + 4] & 63) : ((sc[s + 4] >> 4) | ((sc[s] >> 6) << 4));
      const uint8_t* qq = qs + (s / 2) * 32;
      const int shift = (s & 1) * 4;
      const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qq)));
      const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qq + 16)));
      const __m512 q0 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v0, shift), fifteen));
      const __m512 q1 = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v1, shift), fifteen));
      const __m512 x0 = _mm512_loadu_ps(xb + s * 32), x1 = _mm512_loadu_ps(xb + s * 32 + 16);
      __m512 p = _mm512_mul_ps(q0, x0);
      p = _mm512_fmadd_ps(q1, x1, p);
      acc = _mm512_fmadd_ps(p, _mm512_set1_ps(d * static_cast<float>(scale)), acc);
      macc = _mm512_fmadd_ps(_mm512_add_ps(x0, x1), _mm512_set1_ps(dmin * static_cast<float>(mn)), macc);
    }
  }
  return _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(macc);
}

AVX512_TARGET float q6k_dot_avx512(const float* x, const uint8_t* wr, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  const __m512i fifteen = _mm512_set1_epi32(15), three = _mm512_set1_epi32(3), thirty_two = _mm512_set1_epi32(32);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wr + b * 210;
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const float d = half_f16c(blk + 208);
    const float* xb = x + b * 256;
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 4; ++k) {
        const uint8_t* lo = ql + h * 64 + (k & 1) * 32;
        const int lshift = (k >> 1) * 4, hshift = 2 * k;
        for (int half = 0; half < 2; ++half) {
          const __m512i l = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + half * 16)));
          const __m512i hb = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + h * 32 + half * 16)));
          const __m512i v = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(l, lshift), fifteen),
                                            _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hb, hshift), three), 4));
          const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(v, thirty_two));
          const __m512 xv = _mm512_loadu_ps(xb + h * 128 + k * 32 + half * 16);
          acc = _mm512_fmadd_ps(_mm512_mul_ps(q, xv), _mm512_set1_ps(d * static_cast<float>(sc[h * 8 + k * 2 + half])), acc);
        }
      }
  }
  return _mm512_reduce_add_ps(acc);
}

AVX512_TARGET void kq_fast_rows_avx512(const float* x, int64_t M, int64_t K, const uint8_t* w, int q, float* y,
                                       int64_t N, int64_t n0, int64_t n1) {
  const int64_t nb = K / 256, row_bytes = nb * kq_bytes(q);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m)
      y[m * N + n] = q == GGML_Q4_K ? q4k_dot_avx512(x + m * K, w + n * row_bytes, nb)
                                    : q6k_dot_avx512(x + m * K, w + n * row_bytes, nb);
}

void kq_rows(const float* x, int64_t M, int64_t K, const uint8_t* w, int q, float* y, int64_t N, int64_t n0,
             int64_t n1) {
  switch (isa()) {
    case AVX512:
      if (q == GGML_Q4_K || q == GGML_Q6_K) return kq_fast_rows_avx512(x, M, K, w, q, y, N, n0, n1);
      return kq_rows_avx512(x, M, K, w, q, y, N, n0, n1);
    case AVX2: return kq_rows_avx2(x, M, K, w, q, y, N, n0, n1);
    default: return kq_rows_scalar(x, M, K, w, q, y, N, n0, n1);
  }
}

// ---- dispatch helpers ----------------------------------------------------------------------------

void fp8_rows(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* s, int64_t kb, float* y,
              int64_t N, int64_t n0, int64_t n1) {
  switch (isa()) {
    case AVX512: return fp8_rows_avx512(x, M, K, w, s, kb, y, N, n0, n1);
    case AVX2: return fp8_rows_avx2(x, M, K, w, s, kb, y, N, n0, n1);
    default: return fp8_rows_scalar(x, M, K, w, s, kb, y, N, n0, n1);
  }
}

void fp4_rows(const float* xd, int64_t M, int64_t K, const uint8_t* w, const uint8_t* s, float* y, int64_t N,
              int64_t n0, int64_t n1) {
  switch (isa()) {
    case AVX512: return fp4_rows_avx512(xd, M, K, w, s, y, N, n0, n1);
    case AVX2: return fp4_rows_avx2(xd, M, K, w, s, y, N, n0, n1);
    default: return fp4_rows_scalar(xd, M, K, w, s, y, N, n0, n1);
  }
}

void bf16_rows(const float* x, int64_t M, int64_t K, const uint16_t* w, float* y, int64_t N, int64_t n0, int64_t n1) {
  switch (isa()) {
    case AVX512: return bf16_rows_avx512(x, M, K, w, y, N, n0, n1);
    case AVX2: return bf16_rows_avx2(x, M, K, w, y, N, n0, n1);
    default: return bf16_rows_scalar(x, M, K, w, y, N, n0, n1);
  }
}

using moeflash_native::check_x;
using moeflash_native::grain;

// ---- ops -----------------------------------------------------------------------------------------

at::Tensor fp8_linear(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& s_in) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.element_size() == 1, "fp8_linear: weight must be [N, K] of 1-byte e4m3");
  const int64_t N = w_in.size(0), K = w_in.size(1);
  check_x(x_in, K, "fp8_linear");
  const int64_t nb = (N + FP8_BLOCK - 1) / FP8_BLOCK, kb = (K + FP8_BLOCK - 1) / FP8_BLOCK;
  TORCH_CHECK(s_in.dim() == 2 && s_in.size(0) == nb && s_in.size(1) == kb && s_in.scalar_type() == at::kFloat,
              "fp8_linear: scale must be float32 [", nb, ", ", kb, "], got ", s_in.scalar_type(), " ", s_in.sizes());
  at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), s = s_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(N, M, K), [&](int64_t n0, int64_t n1) { fp8_rows(xp, M, K, wp, sp, kb, yp, N, n0, n1); });
  return y;
}

// V4's grouped output projection over an FP8 weight: x [M, G, Kg], weight [G * R, Kg] (group g owns rows
// g*R .. g*R+R-1, R a multiple of 128) -> [M, G * R], out[:, g*R + r] = x[:, g] . w[g*R + r]. One call and
// one parallel region instead of G products.
at::Tensor fp8_grouped_linear(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& s_in) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.scalar_type() == at::kFloat, "fp8_grouped_linear: x must be float32 [M, G, Kg]");
  TORCH_CHECK(w_in.dim() == 2 && w_in.element_size() == 1, "fp8_grouped_linear: weight must be [G * R, Kg] e4m3");
  const int64_t M = x_in.size(0), G = x_in.size(1), K = x_in.size(2), N = w_in.size(0);
  TORCH_CHECK(w_in.size(1) == K && N % G == 0 && (N / G) % FP8_BLOCK == 0,
              "fp8_grouped_linear: weight ", w_in.sizes(), " does not split into ", G, " groups of whole 128-row blocks over ", K, " inputs");
  const int64_t R = N / G, kb = (K + FP8_BLOCK - 1) / FP8_BLOCK;
  TORCH_CHECK(s_in.dim() == 2 && s_in.size(0) == N / FP8_BLOCK && s_in.size(1) == kb && s_in.scalar_type() == at::kFloat,
              "fp8_grouped_linear: scale must be float32 [", N / FP8_BLOCK, ", ", kb, "]");
  at::Tensor xg = x_in.transpose(0, 1).contiguous();  // [G, M, Kg]: each group's rows back to back
  at::Tensor w = w_in.contiguous(), s = s_in.contiguous();
  at::Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0) return y;
  const float* xp = xg.data_ptr<float>();
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(N, M, K), [&](int64_t n0, int64_t n1) {
    for (int64_t a = n0; a < n1;) {
      const int64_t g = a / R, b = std::min(n1, (g + 1) * R);
      fp8_rows(xp + g * M * K, M, K, wp, sp, kb, yp, N, a, b);
      a = b;
    }
  });
  return y;
}

at::Tensor fp4_linear(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& s_in) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.element_size() == 1, "fp4_linear: weight must be [N, K/2] packed bytes");
  const int64_t N = w_in.size(0), K = 2 * w_in.size(1);
  TORCH_CHECK(K % FP4_GROUP == 0, "fp4_linear: inputs (", K, ") must be a multiple of ", FP4_GROUP);
  check_x(x_in, K, "fp4_linear");
  TORCH_CHECK(s_in.dim() == 2 && s_in.size(0) == N && s_in.size(1) == K / FP4_GROUP && s_in.element_size() == 1,
              "fp4_linear: scale must be UE8M0 bytes [", N, ", ", K / FP4_GROUP, "], got ", s_in.sizes());
  at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), s = s_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  at::Tensor xd = at::empty_like(x);
  deinterleave(x.data_ptr<float>(), M, K, xd.data_ptr<float>());
  const float* xp = xd.data_ptr<float>();
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  const uint8_t* sp = static_cast<const uint8_t*>(s.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(N, M, K), [&](int64_t n0, int64_t n1) { fp4_rows(xp, M, K, wp, sp, yp, N, n0, n1); });
  return y;
}

at::Tensor bf16_linear(const at::Tensor& x_in, const at::Tensor& w_in) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.scalar_type() == at::kBFloat16, "bf16_linear: weight must be bfloat16 [N, K]");
  const int64_t N = w_in.size(0), K = w_in.size(1);
  check_x(x_in, K, "bf16_linear");
  at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(N, M, K), [&](int64_t n0, int64_t n1) { bf16_rows(xp, M, K, wp, yp, N, n0, n1); });
  return y;
}

at::Tensor gguf_linear(const at::Tensor& x_in, const at::Tensor& w_in, int64_t qtype) {
  TORCH_CHECK(qtype == GGML_Q4_0 || qtype == GGML_Q4_1 || qtype == GGML_Q5_0 || qtype == GGML_Q8_0 ||
                  is_kq(static_cast<int>(qtype)),
              "gguf_linear: type ", qtype, " is not Q4_0 (2), Q4_1 (3), Q5_0 (6), Q8_0 (8), Q4_K (12), Q6_K (14) or MXFP4 (39)");
  const int q = static_cast<int>(qtype);
  const int64_t bb = is_kq(q) ? kq_bytes(q) : block_bytes(q), bv = is_kq(q) ? kq_values(q) : 32;
  TORCH_CHECK(w_in.dim() == 2 && w_in.element_size() == 1, "gguf_linear: weight must be raw blocks [N, row bytes]");
  TORCH_CHECK(w_in.size(1) % bb == 0, "gguf_linear: row bytes ", w_in.size(1), " are not whole blocks");
  const int64_t N = w_in.size(0), K = bv * (w_in.size(1) / bb);
  check_x(x_in, K, "gguf_linear");
  at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  if (is_kq(q)) {
    at::parallel_for(0, N, grain(N, M, K), [&](int64_t n0, int64_t n1) { kq_rows(xp, M, K, wp, q, yp, N, n0, n1); });
    return y;
  }
  std::vector<float> xs(M * (K / 32));
  block_sums(xp, M, K, xs.data());
  at::parallel_for(0, N, grain(N, M, K), [&](int64_t n0, int64_t n1) { gguf_rows(xp, xs.data(), M, K, wp, q, yp, N, n0, n1); });
  return y;
}

// Decode GGUF blocks [N, row bytes] of Q4_0 / Q4_1 / Q8_0 to float32 [N, K] (the prefill path).
at::Tensor gguf_dequant(const at::Tensor& w_in, int64_t qtype) {
  if (is_kq(static_cast<int>(qtype))) {
    const int q = static_cast<int>(qtype);
    TORCH_CHECK(w_in.dim() == 2 && w_in.element_size() == 1 && w_in.size(1) % kq_bytes(q) == 0,
                "gguf_dequant: weight must be raw blocks [N, row bytes]");
    at::Tensor w = w_in.contiguous();
    const int64_t N = w.size(0), nb = w.size(1) / kq_bytes(q), V = kq_values(q), K = V * nb;
    at::Tensor out = at::empty({N, K}, at::TensorOptions().dtype(at::kFloat));
    const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
    float* op = out.data_ptr<float>();
    at::parallel_for(0, N * nb, 64, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) decode_kq(wp + b * kq_bytes(q), q, op + b * V);
    });
    return out;
  }
  TORCH_CHECK(qtype == GGML_Q4_0 || qtype == GGML_Q4_1 || qtype == GGML_Q5_0 || qtype == GGML_Q8_0,
              "gguf_dequant: unsupported type ", qtype);
  TORCH_CHECK(w_in.dim() == 2 && w_in.element_size() == 1 && w_in.size(1) % block_bytes(qtype) == 0,
              "gguf_dequant: weight must be raw blocks [N, row bytes]");
  at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), nb = w.size(1) / block_bytes(qtype), K = 32 * nb, bb = block_bytes(qtype);
  at::Tensor out = at::empty({N, K}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  float* op = out.data_ptr<float>();
  const int q = static_cast<int>(qtype);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = wp + (n * nb + b) * bb;
        float* o = op + n * K + b * 32;
        if (q == GGML_Q8_0) {
          const float d = half_at(blk);
          const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
          for (int j = 0; j < 32; ++j) o[j] = d * static_cast<float>(qs[j]);
        } else {
          float d, m;
          q4_dm(blk, q, d, m);
          const uint8_t* qs = blk + qs_offset(q);
          const uint32_t h = q == GGML_Q5_0 ? q5_high(blk) : 0;
          for (int j = 0; j < 16; ++j) {
            o[j] = std::fma(d, static_cast<float>((qs[j] & 0xF) | (((h >> j) & 1) << 4)), m);
            o[16 + j] = std::fma(d, static_cast<float>((qs[j] >> 4) | (((h >> (j + 16)) & 1) << 4)), m);
          }
        }
      }
  });
  return out;
}

// Routed experts of one MoE layer over packed FP4 weights, every (token, expert) pair in one call.
// x [T, D]; idx [T, k] expert ids; wts [T, k] route weights; w13 [E, 2I, D/2] (w1 rows then w3 rows),
// s13 [E, 2I, D/32]; w2 [E, D, I/2], s2 [E, D, I/32]; limit: the SwiGLU clamp (<= 0: none).
// Returns sum_j wts[t, j] * expert_{idx[t, j]}(x[t]) [T, D] in fp32. Experts run in increasing id order
// and each token's contributions are added in that order, whatever other tokens share the call.
at::Tensor moe_fp4(const at::Tensor& x_in, const at::Tensor& idx_in, const at::Tensor& wts_in, const at::Tensor& w13,
                   const at::Tensor& s13, const at::Tensor& w2, const at::Tensor& s2, double limit, int64_t numerics) {
  TORCH_CHECK(numerics >= moeflash_native::NUM_EXACT && numerics <= moeflash_native::NUM_FAST,
              "moe_fp4: numerics must be 0 (exact), 1 (reference) or 2 (fast), got ", numerics);
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "moe_fp4: x must be float32 [T, D]");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.element_size() == 1 && w2.element_size() == 1,
              "moe_fp4: w13 / w2 must be packed bytes [E, rows, cols/2]");
  const int64_t T = x_in.size(0), D = x_in.size(1), E = w13.size(0), I2 = w13.size(1), I = I2 / 2;
  TORCH_CHECK(2 * w13.size(2) == D && w2.size(0) == E && w2.size(1) == D && 2 * w2.size(2) == I,
              "moe_fp4: shapes disagree: x ", x_in.sizes(), ", w13 ", w13.sizes(), ", w2 ", w2.sizes());
  TORCH_CHECK(D % FP4_GROUP == 0 && I % FP4_GROUP == 0, "moe_fp4: dims must be multiples of ", FP4_GROUP);
  TORCH_CHECK(s13.dim() == 3 && s13.size(0) == E && s13.size(1) == I2 && s13.size(2) == D / FP4_GROUP &&
              s2.dim() == 3 && s2.size(0) == E && s2.size(1) == D && s2.size(2) == I / FP4_GROUP &&
              s13.element_size() == 1 && s2.element_size() == 1, "moe_fp4: scales must be UE8M0 bytes");
  TORCH_CHECK(idx_in.dim() == 2 && idx_in.size(0) == T && wts_in.sizes() == idx_in.sizes(),
              "moe_fp4: idx and wts must both be [T, k]");
  at::Tensor x = x_in.contiguous(), idx = idx_in.to(at::kLong).contiguous(), wts = wts_in.to(at::kFloat).contiguous();
  at::Tensor w13c = w13.contiguous(), s13c = s13.contiguous(), w2c = w2.contiguous(), s2c = s2.contiguous();
  const int64_t k = idx.size(1);
  at::Tensor out = at::zeros({T, D}, x.options());
  if (T == 0) return out;
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* wtp = wts.data_ptr<float>();
  // tokens of each expert, in token order
  std::vector<std::vector<std::pair<int64_t, float>>> rows(E);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e = ip[t * k + j];
      TORCH_CHECK(e >= 0 && e < E, "moe_fp4: expert id ", e, " outside [0, ", E, ")");
      rows[e].emplace_back(t, wtp[t * k + j]);
    }
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const uint8_t* w13p = static_cast<const uint8_t*>(w13c.data_ptr());
  const uint8_t* s13p = static_cast<const uint8_t*>(s13c.data_ptr());
  const uint8_t* w2p = static_cast<const uint8_t*>(w2c.data_ptr());
  const uint8_t* s2p = static_cast<const uint8_t*>(s2c.data_ptr());
  // The active experts and their rows, laid out back to back: one parallel region for every expert's
  // w1|w3 rows and one for every expert's w2 rows (fork/join once per layer, not once per expert).
  std::vector<int64_t> active, off;  // off[a]: first row (token slot) of active expert a
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e)
    if (!rows[e].empty()) { active.push_back(e); off.push_back(total); total += static_cast<int64_t>(rows[e].size()); }
  off.push_back(total);
  const int64_t A = static_cast<int64_t>(active.size());
  std::vector<float> h(total * I2), act(total * I), y(total * D);
  const float lim = static_cast<float>(limit);
  auto swiglu = [&]() {
    for (int64_t i = 0; i < total; ++i)
      for (int64_t c = 0; c < I; ++c) {
        float g = h[i * I2 + c], u = h[i * I2 + I + c];
        if (lim > 0) { g = std::min(g, lim); u = std::max(-lim, std::min(u, lim)); }
        act[i * I + c] = g / (1.0f + std::exp(-g)) * u;
      }
  };
  auto combine = [&]() {  // experts in increasing id order, whatever else is in the call
    for (int64_t a = 0; a < A; ++a) {
      const auto& r = rows[active[a]];
      for (int64_t i = 0; i < off[a + 1] - off[a]; ++i) {
        float* o = op + r[i].first * D;
        const float wt = r[i].second;
        const float* yr = &y[(off[a] + i) * D];
        for (int64_t c = 0; c < D; ++c) o[c] = std::fma(wt, yr[c], o[c]);
      }
    }
  };
  if (numerics == moeflash_native::NUM_FAST) {
    // Each token's row is quantized once and shared by all of its experts; every expert, whatever its
    // number of rows, runs the integer row kernel (it reads the weights once per 64 rows).
    using moeflash_native::FP4_PAIRS;
    moeflash_native::Q8Rows xt, xg, ag;
    moeflash_native::quantize_rows(xp, T, D, FP4_PAIRS, xt);
    std::vector<int64_t> tok(total);
    for (int64_t a = 0; a < A; ++a)
      for (int64_t i = 0; i < off[a + 1] - off[a]; ++i) tok[off[a] + i] = rows[active[a]][i].first;
    moeflash_native::gather_rows(xt, tok.data(), total, xg);
    auto region_q8 = [&](int64_t per_expert, int64_t in, const moeflash_native::Q8Rows& src, const uint8_t* wbase,
                         const uint8_t* sbase, float* dst) {
      const int64_t wrow = in / 2, srow = in / FP4_GROUP;
      const int64_t g = grain(per_expert, total / A, in);
      const int64_t per_task = (per_expert + g - 1) / g;  // tasks per expert
      at::parallel_for(0, A * per_task, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t a = t / per_task, n0 = (t % per_task) * g, n1 = std::min(per_expert, n0 + g);
          const int64_t e = active[a], m = off[a + 1] - off[a];
          moeflash_native::fp4_q8_rows(src.view(off[a], m), wbase + e * per_expert * wrow,
                                       sbase + e * per_expert * srow, dst + off[a] * per_expert, per_expert, n0, n1);
        }
      });
    };
    region_q8(I2, D, xg, w13p, s13p, h.data());
    swiglu();
    moeflash_native::quantize_rows(act.data(), total, I, FP4_PAIRS, ag);
    region_q8(D, I, ag, w2p, s2p, y.data());
    combine();
    return out;
  }
  std::vector<float> xs(total * D), xd(total * D), actd(total * I);
  for (int64_t a = 0; a < A; ++a)
    for (int64_t i = 0; i < off[a + 1] - off[a]; ++i)
      std::memcpy(&xs[(off[a] + i) * D], xp + rows[active[a]][i].first * D, D * sizeof(float));
  // DeepSeek's activation quantization before each FP4 product (the reference numerics)
  if (numerics == moeflash_native::NUM_REFERENCE) moeflash_native::fake_quant_e4m3(xs.data(), total, D);
  deinterleave(xs.data(), total, D, xd.data());
  // Experts with more than kRowKernelMaxRows rows (prefill) are decoded and multiplied by torch's GEMM;
  // the others run the row kernel. Decode steps of up to 16 sequences never reach the GEMM path, so their
  // rows stay batch-invariant.
  constexpr int64_t kRowKernelMaxRows = 16;
  std::vector<int64_t> small, big;
  for (int64_t a = 0; a < A; ++a) (off[a + 1] - off[a] > kRowKernelMaxRows ? big : small).push_back(a);
  const int64_t S = static_cast<int64_t>(small.size());
  // a "row" of the region is (small expert j, output row n): index j * rows_per_expert + n
  auto region = [&](int64_t per_expert, int64_t in, const float* src, const uint8_t* wbase, const uint8_t* sbase,
                    float* dst) {
    const int64_t wrow = in / 2, srow = in / FP4_GROUP;
    if (S == 0) return;
    at::parallel_for(0, S * per_expert, grain(per_expert, total / std::max<int64_t>(A, 1), in), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1;) {
        const int64_t a = small[r / per_expert], n0 = r % per_expert, n1 = std::min(per_expert, n0 + (r1 - r));
        const int64_t e = active[a], m = off[a + 1] - off[a];
        fp4_rows(src + off[a] * in, m, in, wbase + e * per_expert * wrow, sbase + e * per_expert * srow,
                 dst + off[a] * per_expert, per_expert, n0, n1);
        r += n1 - n0;
      }
    });
  };
  auto gemm = [&](int64_t a, int64_t per_expert, int64_t in, float* src, const uint8_t* wbase, const uint8_t* sbase,
                  float* dst) {
    const int64_t e = active[a], m = off[a + 1] - off[a];
    at::Tensor wf = at::empty({per_expert, in}, at::TensorOptions().dtype(at::kFloat));
    const uint8_t* we = wbase + e * per_expert * (in / 2);
    const uint8_t* se = sbase + e * per_expert * (in / FP4_GROUP);
    float* wp = wf.data_ptr<float>();
    at::parallel_for(0, per_expert, 16, [&](int64_t n0, int64_t n1) { fp4_decode(we, se, in, n0, n1, wp); });
    at::Tensor xin = at::from_blob(src + off[a] * in, {m, in}, at::TensorOptions().dtype(at::kFloat));
    at::Tensor res = at::from_blob(dst + off[a] * per_expert, {m, per_expert}, at::TensorOptions().dtype(at::kFloat));
    at::mm_out(res, xin, wf.t());
  };
  region(I2, D, xd.data(), w13p, s13p, h.data());
  for (int64_t a : big) gemm(a, I2, D, xd.data(), w13p, s13p, h.data());
  swiglu();
  if (numerics == moeflash_native::NUM_REFERENCE) moeflash_native::fake_quant_e4m3(act.data(), total, I);
  deinterleave(act.data(), total, I, actd.data());
  region(D, I, actd.data(), w2p, s2p, y.data());
  for (int64_t a : big) gemm(a, D, I, actd.data(), w2p, s2p, y.data());
  combine();
  return out;
}

// Decode to float32: FP8 [N, K] with block multipliers, for the tiled prefill path and for references.
at::Tensor dequant_fp8(const at::Tensor& w_in, const at::Tensor& s_in) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.element_size() == 1, "dequant_fp8: weight must be [N, K] of 1-byte e4m3");
  const int64_t N = w_in.size(0), K = w_in.size(1), kb = (K + FP8_BLOCK - 1) / FP8_BLOCK;
  TORCH_CHECK(s_in.dim() == 2 && s_in.size(0) == (N + FP8_BLOCK - 1) / FP8_BLOCK && s_in.size(1) == kb &&
              s_in.scalar_type() == at::kFloat, "dequant_fp8: scale must be float32 per 128x128 block");
  at::Tensor w = w_in.contiguous(), s = s_in.contiguous();
  at::Tensor out = at::empty({N, K}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* lut = tables().e4m3;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) op[n * K + k] = lut[wp[n * K + k]] * sp[(n / FP8_BLOCK) * kb + k / FP8_BLOCK];
  });
  return out;
}

std::string isa_name() {
  switch (isa()) {
    case AVX512: return "avx512";
    case AVX2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace

TORCH_LIBRARY(moeflash, m) {
  m.def("fp8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("fp4_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("moe_fp4(Tensor x, Tensor idx, Tensor weights, Tensor w13, Tensor s13, Tensor w2, Tensor s2, float limit, int numerics=0) -> Tensor");
  m.def("dequant_fp8(Tensor weight, Tensor scale) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("gguf_linear(Tensor x, Tensor weight, int qtype) -> Tensor");
  m.def("gguf_dequant(Tensor weight, int qtype) -> Tensor");
  m.def("fp8_grouped_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("isa", &isa_name);
}

TORCH_LIBRARY_IMPL(moeflash, CPU, m) {
  m.impl("fp8_linear", &fp8_linear);
  m.impl("fp4_linear", &fp4_linear);
  m.impl("moe_fp4", &moe_fp4);
  m.impl("dequant_fp8", &dequant_fp8);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("gguf_linear", &gguf_linear);
  m.impl("gguf_dequant", &gguf_dequant);
  m.impl("fp8_grouped_linear", &fp8_grouped_linear);
}
