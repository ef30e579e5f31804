// moeflash native kernels, part 2: products with quantized activations (quant_act.h says which).
//
// Why: with fp32 activations every weight is widened to fp32 and multiplied by an FMA, so the kernels are
// bound by arithmetic, not by the bytes they read. Quantizing the activation row once to int8 lets a
// 32-byte vector of weight codes meet 32 activation bytes in one or two integer instructions. FP4 e2m1
// values times two are the integers {0, 1, 2, 3, 4, 6, 8, 12}, so FP4 experts (and ggml's MXFP4) need no
// approximation on the weight side at all; the GGUF block formats are integer codes already.
//
// Paths: scalar, AVX2 (vpmaddubsw) and VNNI (vpdpbusd), chosen at run time (cpu.h). The vector paths are
// one source (quant_act_kernels.inc) compiled twice with different target options.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>

#include "cpu.h"
#include "ops_common.h"
#include "quant_act.h"

namespace moeflash_native {

namespace {

inline float half_bits(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// 2^(e - 128) for a UE8M0 byte (the FP4 scale halved: codes are read doubled); NaN for 255.
inline float e8m0_half(uint8_t e) { return e == 255 ? NAN : std::ldexp(1.0f, static_cast<int>(e) - 128); }

constexpr int kFp4Doubled[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// Where input e (0..31) of block b sits in a row stored in `layout`.
inline int64_t position(Layout layout, int64_t nb, int64_t b, int e) {
  if (layout == NATURAL) return 32 * b + e;
  const int64_t base = 64 * (b / 2);
  const bool single = (nb & 1) && b == nb - 1;
  if (single) return base + (e & 1) * 16 + e / 2;
  return base + (b & 1) * 16 + (e & 1) * 32 + e / 2;
}

}  // namespace

namespace avx2 {
void quantize_rows(const float* x, int64_t M, int64_t K, Layout layout, Q8Rows& out);
}
namespace vnni {
void quantize_rows(const float* x, int64_t M, int64_t K, Layout layout, Q8Rows& out);
}

void quantize_rows(const float* x, int64_t M, int64_t K, Layout layout, Q8Rows& out) {
  const int64_t nb = K / 32;
  out.M = M, out.K = K, out.nb = nb, out.layout = layout;
  out.q.resize(M * K);
  out.d.resize(M * nb);
  out.xs.resize(M * nb);
  out.isum.resize(M * nb);
  out.corr.assign(layout == FP4_PAIRS ? M * out.pairs() * 8 : 0, 0);
  if (dot_path() == DOT_AVX2) return avx2::quantize_rows(x, M, K, layout, out);
  if (dot_path() == DOT_VNNI) return vnni::quantize_rows(x, M, K, layout, out);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + i * K + 32 * b;
      float amax = 0.0f;
      for (int e = 0; e < 32; ++e) {
        const float a = std::fabs(xb[e]);
        if (!(a <= amax)) amax = a;  // NaN wins
      }
      int8_t qb[32];
      int32_t sum = 0;
      float d;
      if (std::isfinite(amax)) {
        d = amax / 127.0f;
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int e = 0; e < 32; ++e) {
          qb[e] = static_cast<int8_t>(std::nearbyint(xb[e] * id));  // ties to even, |q| <= 127
          sum += qb[e];
        }
      } else {  // a NaN or an infinity makes the block's products NaN
        d = NAN;
        std::memset(qb, 0, sizeof(qb));
      }
      for (int e = 0; e < 32; ++e) out.q[i * K + position(layout, nb, b, e)] = qb[e];
      out.d[i * nb + b] = d;
      out.isum[i * nb + b] = sum;
      out.xs[i * nb + b] = d * static_cast<float>(sum);
      if (layout == FP4_PAIRS) out.corr[(i * out.pairs() + b / 2) * 8 + (b & 1) * 4] = -12 * sum;
    }
}

void gather_rows(const Q8Rows& x, const int64_t* rows, int64_t m, Q8Rows& out) {
  const int64_t K = x.K, nb = x.nb, np = x.pairs();
  out.M = m, out.K = K, out.nb = nb, out.layout = x.layout;
  out.q.resize(m * K);
  out.d.resize(m * nb);
  out.xs.resize(m * nb);
  out.isum.resize(m * nb);
  out.corr.resize(x.corr.empty() ? 0 : m * np * 8);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = rows[i];
    std::memcpy(&out.q[i * K], &x.q[r * K], K);
    std::memcpy(&out.d[i * nb], &x.d[r * nb], nb * sizeof(float));
    std::memcpy(&out.xs[i * nb], &x.xs[r * nb], nb * sizeof(float));
    std::memcpy(&out.isum[i * nb], &x.isum[r * nb], nb * sizeof(int32_t));
    if (!x.corr.empty()) std::memcpy(&out.corr[i * np * 8], &x.corr[r * np * 8], np * 8 * sizeof(int32_t));
  }
}

// ---- scalar path ---------------------------------------------------------------------------------
// Block b of a weight row as 32 signed integer codes with value = dw * code + mw.

namespace {

void scalar_block(int qtype, const uint8_t* row, int64_t b, int32_t* code, float& dw, float& mw) {
  mw = 0.0f;
  switch (qtype) {
    case GGML_Q8_0: {
      const uint8_t* blk = row + b * 34;
      dw = half_bits(blk);
      for (int e = 0; e < 32; ++e) code[e] = static_cast<int8_t>(blk[2 + e]);
      return;
    }
    case GGML_Q4_0:
    case GGML_Q4_1:
    case GGML_Q5_0: {
      const int64_t bb = qtype == GGML_Q4_0 ? 18 : qtype == GGML_Q4_1 ? 20 : 22;
      const uint8_t* blk = row + b * bb;
      dw = half_bits(blk);
      uint32_t qh = 0;
      if (qtype == GGML_Q5_0) std::memcpy(&qh, blk + 2, 4);
      if (qtype == GGML_Q4_1) mw = half_bits(blk + 2);
      const uint8_t* qs = blk + (qtype == GGML_Q4_0 ? 2 : qtype == GGML_Q4_1 ? 4 : 6);
      const int off = qtype == GGML_Q4_0 ? 8 : qtype == GGML_Q4_1 ? 0 : 16;
      for (int e = 0; e < 16; ++e) {
        code[e] = ((qs[e] & 0xF) | (((qh >> e) & 1) << 4)) - off;
        code[e + 16] = ((qs[e] >> 4) | (((qh >> (e + 16)) & 1) << 4)) - off;
      }
      return;
    }
    case GGML_MXFP4: {
      const uint8_t* blk = row + b * 17;
      dw = e8m0_half(blk[0]);
      for (int e = 0; e < 16; ++e) {
        code[e] = kFp4Doubled[blk[1 + e] & 0xF];
        code[e + 16] = kFp4Doubled[blk[1 + e] >> 4];
      }
      return;
    }
    case GGML_Q4_K: {
      const uint8_t* blk = row + (b / 8) * 144;
      const uint8_t* sc = blk + 4;
      const int s = static_cast<int>(b & 7);
      const int scale = s < 4 ? (sc[s] & 63) : ((sc[s + 4] & 0xF) | ((sc[s - 4] >> 6) << 4));
      const int mn = s < 4 ? (sc[s + 4] & 63) : ((sc[s + 4] >> 4) | ((sc[s] >> 6) << 4));
      dw = half_bits(blk) * static_cast<float>(scale);
      mw = -half_bits(blk + 2) * static_cast<float>(mn);
      const uint8_t* qq = blk + 16 + (s / 2) * 32;
      for (int e = 0; e < 32; ++e) code[e] = (qq[e] >> ((s & 1) * 4)) & 0xF;
      return;
    }
    case GGML_Q6_K: {
      const uint8_t* blk = row + (b / 8) * 210;
      const int c = static_cast<int>(b & 7), h = c / 4, k = c % 4;
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      dw = half_bits(blk + 208);
      for (int e = 0; e < 32; ++e) {
        const int lo = (blk[h * 64 + (k & 1) * 32 + e] >> ((k >> 1) * 4)) & 0xF;
        const int hi = (blk[128 + h * 32 + e] >> (2 * k)) & 3;
        code[e] = sc[h * 8 + k * 2 + e / 16] * ((lo | (hi << 4)) - 32);
      }
      return;
    }
    default:
      dw = NAN;
      std::memset(code, 0, 32 * sizeof(int32_t));
  }
}

float scalar_dot(const View& x, int64_t i, int qtype, const uint8_t* row, const uint8_t* fp4_scales) {
  float acc = 0.0f, macc = 0.0f;
  int32_t code[32];
  for (int64_t b = 0; b < x.nb; ++b) {
    float dw, mw;
    if (qtype < 0) {  // FP4: codes [K/2], scales [K/32]
      dw = e8m0_half(fp4_scales[b]);
      mw = 0.0f;
      for (int e = 0; e < 32; ++e) {
        const uint8_t byte = row[16 * b + e / 2];
        code[e] = kFp4Doubled[e & 1 ? byte >> 4 : byte & 0xF];
      }
    } else {
      scalar_block(qtype, row, b, code, dw, mw);
    }
    int32_t s = 0;
    for (int e = 0; e < 32; ++e) s += code[e] * x.q[i * x.K + position(x.layout, x.nb, b, e)];
    acc = std::fma(static_cast<float>(s), dw * x.d[i * x.nb + b], acc);
    macc = std::fma(mw, x.xs[i * x.nb + b], macc);
  }
  return acc + macc;
}

}  // namespace

// ---- AVX2 and VNNI paths ------------------------------------------------------------------------

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
inline __m256i dp(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
inline __m256i dp2(__m256i acc, __m256i u0, __m256i s0, __m256i u1, __m256i s1) {
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
#include "quant_act_kernels.inc"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")
#endif
namespace vnni {
inline __m256i dp(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
inline __m256i dp2(__m256i acc, __m256i u0, __m256i s0, __m256i u1, __m256i s1) {
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, u0, s0), u1, s1);
}
#include "quant_act_kernels.inc"
}  // namespace vnni
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---- dispatch ------------------------------------------------------------------------------------

void fp4_q8_rows(const View& x, const uint8_t* w, const uint8_t* s, float* y, int64_t N, int64_t n0, int64_t n1) {
  switch (dot_path()) {
    case DOT_VNNI: return vnni::fp4_rows(x, w, s, y, N, n0, n1);
    case DOT_AVX2: return avx2::fp4_rows(x, w, s, y, N, n0, n1);
    default:
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t i = 0; i < x.M; ++i)
          y[i * N + n] = scalar_dot(x, i, -1, w + n * (x.K / 2), s + n * x.nb);
  }
}

bool gguf_q8_supported(int q) {
  return q == GGML_Q4_0 || q == GGML_Q4_1 || q == GGML_Q5_0 || q == GGML_Q8_0 || q == GGML_MXFP4 ||
         q == GGML_Q4_K || q == GGML_Q6_K;
}

void gguf_q8_rows(const View& x, const uint8_t* w, int64_t row_bytes, int qtype, float* y, int64_t N,
                  int64_t n0, int64_t n1) {
  switch (dot_path()) {
    case DOT_VNNI: return vnni::gguf_rows(x, w, row_bytes, qtype, y, N, n0, n1);
    case DOT_AVX2: return avx2::gguf_rows(x, w, row_bytes, qtype, y, N, n0, n1);
    default:
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t i = 0; i < x.M; ++i) y[i * N + n] = scalar_dot(x, i, qtype, w + n * row_bytes, nullptr);
  }
}

// ---- DeepSeek's activation quantization (the "reference" numerics) -------------------------------

namespace {

// |v| <= 448 -> the nearest e4m3 value (ties to even), as a float.
inline float round_e4m3(float v) {
  const float a = std::fabs(v);
  float r;
  if (a < 0.015625f) {  // below e4m3's smallest normal (2^-6): multiples of 2^-9
    r = std::nearbyint(a * 512.0f) / 512.0f;
  } else {  // three mantissa bits, ties to even
    uint32_t bits;
    std::memcpy(&bits, &a, 4);
    bits += 0x7FFFFu + ((bits >> 20) & 1u);
    bits &= ~0xFFFFFu;
    std::memcpy(&r, &bits, 4);
  }
  return std::copysign(r, v);
}

}  // namespace

void fake_quant_e4m3(float* x, int64_t M, int64_t K) {
  constexpr int64_t kBlock = 128;
  constexpr float kMax = 448.0f;
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0; i < m1; ++i)
      for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
        float* xb = x + i * K + k0;
        const int64_t n = std::min(kBlock, K - k0);
        float amax = 0.0f;
        for (int64_t e = 0; e < n; ++e) amax = std::max(amax, std::fabs(xb[e]));
        amax = std::max(amax, 1e-4f);
        float s = amax * (1.0f / kMax);
        int ex;
        const float m = std::frexp(s, &ex);  // s = m * 2^ex, m in [0.5, 1): round up to a power of two
        s = m == 0.5f ? s : std::ldexp(1.0f, ex);
        for (int64_t e = 0; e < n; ++e) xb[e] = round_e4m3(std::clamp(xb[e] / s, -kMax, kMax)) * s;
      }
  });
}

namespace {

// ---- ops -----------------------------------------------------------------------------------------

template <class Rows>
void parallel_rows(int64_t N, int64_t M, int64_t K, Rows rows) {
  const int64_t g = grain(N, M, K), tasks = (N + g - 1) / g;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) { rows(t0 * g, std::min(N, t1 * g)); });
}

// y [M, N] for x [M, K]: its rows quantized once in `layout`, then rows(view, y, n0, n1) over output rows
// [0, N) in parallel.
template <class Rows>
at::Tensor q8_product(const at::Tensor& x_in, int64_t N, Layout layout, Rows rows) {
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  Q8Rows xq;
  quantize_rows(x.data_ptr<float>(), M, K, layout, xq);
  const View xv = xq.view(0, M);
  float* yp = y.data_ptr<float>();
  parallel_rows(N, M, K, [&](int64_t n0, int64_t n1) { rows(xv, yp, n0, n1); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> q8_quantize(const at::Tensor& x_in, int64_t layout) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.size(1) % 32 == 0,
              "q8_quantize: x must be float32 [M, K] with K a multiple of 32");
  TORCH_CHECK(layout == NATURAL || layout == FP4_PAIRS, "q8_quantize: layout must be 0 (natural) or 1 (FP4 pairs)");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  Q8Rows r;
  quantize_rows(x.data_ptr<float>(), M, K, static_cast<Layout>(layout), r);
  at::Tensor q = at::empty({M, K}, at::kChar), d = at::empty({M, K / 32}, at::kFloat),
             s = at::empty({M, K / 32}, at::kInt);
  std::memcpy(q.data_ptr(), r.q.data(), r.q.size());
  std::memcpy(d.data_ptr(), r.d.data(), r.d.size() * sizeof(float));
  std::memcpy(s.data_ptr(), r.isum.data(), r.isum.size() * sizeof(int32_t));
  return {q, d, s};
}

at::Tensor fp4_linear_q8(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& s_in) {
  TORCH_CHECK(w_in.dim() == 2 && w_in.element_size() == 1, "fp4_linear_q8: weight must be [N, K/2] packed bytes");
  const int64_t N = w_in.size(0), K = 2 * w_in.size(1);
  TORCH_CHECK(K % 32 == 0, "fp4_linear_q8: inputs (", K, ") must be a multiple of 32");
  check_x(x_in, K, "fp4_linear_q8");
  TORCH_CHECK(s_in.dim() == 2 && s_in.size(0) == N && s_in.size(1) == K / 32 && s_in.element_size() == 1,
              "fp4_linear_q8: scale must be UE8M0 bytes [", N, ", ", K / 32, "], got ", s_in.sizes());
  const at::Tensor w = w_in.contiguous(), s = s_in.contiguous();
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  const uint8_t* sp = static_cast<const uint8_t*>(s.data_ptr());
  return q8_product(x_in, N, FP4_PAIRS, [&](const View& xv, float* yp, int64_t n0, int64_t n1) {
    fp4_q8_rows(xv, wp, sp, yp, N, n0, n1);
  });
}

at::Tensor gguf_linear_q8(const at::Tensor& x_in, const at::Tensor& w_in, int64_t qtype) {
  const int q = static_cast<int>(qtype);
  TORCH_CHECK(gguf_q8_supported(q), "gguf_linear_q8: type ", qtype,
              " is not Q4_0 (2), Q4_1 (3), Q5_0 (6), Q8_0 (8), Q4_K (12), Q6_K (14) or MXFP4 (39)");
  const bool kq = q == GGML_Q4_K || q == GGML_Q6_K;
  const int64_t bb = q == GGML_Q4_0 ? 18 : q == GGML_Q4_1 ? 20 : q == GGML_Q5_0 ? 22 : q == GGML_Q8_0 ? 34
                     : q == GGML_MXFP4 ? 17 : q == GGML_Q4_K ? 144 : 210;
  const int64_t bv = kq ? 256 : 32;
  TORCH_CHECK(w_in.dim() == 2 && w_in.element_size() == 1 && w_in.size(1) % bb == 0,
              "gguf_linear_q8: weight must be raw blocks [N, row bytes] of whole ", bb, "-byte blocks");
  const int64_t N = w_in.size(0), K = bv * (w_in.size(1) / bb);
  check_x(x_in, K, "gguf_linear_q8");
  const at::Tensor w = w_in.contiguous();
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  const int64_t row_bytes = w.size(1);
  return q8_product(x_in, N, NATURAL, [&](const View& xv, float* yp, int64_t n0, int64_t n1) {
    gguf_q8_rows(xv, wp, row_bytes, q, yp, N, n0, n1);
  });
}

at::Tensor act_quant_e4m3(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.scalar_type() == at::kFloat, "act_quant_e4m3: x must be float32");
  at::Tensor x = x_in.contiguous().clone();
  const int64_t K = x.size(-1);
  if (x.numel() > 0) fake_quant_e4m3(x.data_ptr<float>(), x.numel() / K, K);
  return x;
}

std::string dot_path_name() {
  switch (dot_path()) {
    case DOT_VNNI: return "vnni";
    case DOT_AVX2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace
}  // namespace moeflash_native

TORCH_LIBRARY_FRAGMENT(moeflash, m) {
  m.def("q8_quantize(Tensor x, int layout) -> (Tensor, Tensor, Tensor)");
  m.def("fp4_linear_q8(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("gguf_linear_q8(Tensor x, Tensor weight, int qtype) -> Tensor");
  m.def("act_quant_e4m3(Tensor x) -> Tensor");
  m.def("dot_path", &moeflash_native::dot_path_name);
}

TORCH_LIBRARY_IMPL(moeflash, CPU, m) {
  m.impl("q8_quantize", &moeflash_native::q8_quantize);
  m.impl("fp4_linear_q8", &moeflash_native::fp4_linear_q8);
  m.impl("gguf_linear_q8", &moeflash_native::gguf_linear_q8);
  m.impl("act_quant_e4m3", &moeflash_native::act_quant_e4m3);
}
