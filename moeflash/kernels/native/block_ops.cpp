// moeflash native kernels: the small ops of a transformer block, each one call where plain torch takes
// several (kernels/__init__.py wraps each; kernels/reference.py holds the plain-torch definition each is
// tested against).
//
// A batch-1 decode step of a V4 block is a chain of products on a few kilobytes of activations. Each ATen
// op costs a few microseconds of dispatch and allocation whatever its size, so the glue between the
// weight products (mHC's mixes, norms, rotations, the router's epilogue, SwiGLU) cost as much as the
// products. These ops fuse that glue:
//   rms_norm, rope, sinkhorn, hc_weights  the pieces (also used alone);
//   hc_pre    mHC's weights, the collapse of the streams and the sub-layer's RMSNorm, in one call;
//   hc_post   mHC's expansion: the sub-layer output spread back over the streams plus the residual mix;
//   norm_rope an RMS norm (weighted or not) and the rotation of the trailing dims, per head;
//   moe_gate  the router's epilogue: scores, biased top-k (or hash ids), normalisation and scale;
//   swiglu    the clamped SwiGLU of a fused w1|w3 product.
// All fp32. The loops are written once (the `*_body` functions) and compiled three times, for AVX-512, AVX2
// and the x86-64 baseline, picked at run time by isa() (cpu.h; MOEFLASH_ISA lowers it). Sums run in sixteen
// lanes combined in a fixed order and nothing is contracted into an FMA, so the three paths give the same
// bits, and a row's result does not depend on the other rows of the call (batch invariance; up to
// HC_ROW_MAX rows for hc_weights, past which its projection is torch's GEMM). Rows are spread over threads
// only when a call is large (prefill).

// no contraction of a * b + c into an FMA: the same bits on every instruction-set path (g++ contracts by
// default in C++ mode, clang within expressions)
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#else
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu.h"

namespace moeflash_native {
namespace {

#define BODY static inline __attribute__((always_inline))

// `name(args)` runs name##_body compiled for the best instruction set isa() allows.
#define ISA_DISPATCH(name, params, args)                                                               \
  __attribute__((target("avx512f,avx512bw,avx512vl"))) void name##_avx512 params { name##_body args; } \
  __attribute__((target("avx2"))) void name##_avx2 params { name##_body args; }                       \
  void name##_base params { name##_body args; }                                                        \
  void name params {                                                                                   \
    switch (isa()) {                                                                                   \
      case AVX512: name##_avx512 args; return;                                                         \
      case AVX2: name##_avx2 args; return;                                                             \
      default: name##_base args; return;                                                               \
    }                                                                                                  \
  }

constexpr int LANES = 16;

// sum_k a[k] * b[k] in sixteen lanes, combined pairwise in a fixed order, then the tail.
BODY float dot_lanes(const float* a, const float* b, int64_t n) {
  float acc[LANES] = {};
  int64_t k = 0;
  for (; k + LANES <= n; k += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += a[k + l] * b[k + l];
  for (int w = LANES / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  float s = acc[0];
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// Below this many elements a call runs on the calling thread (waking the team costs more than the work).
constexpr int64_t PARALLEL_MIN = 1 << 18;

template <class F>
void rows_maybe_parallel(int64_t rows, int64_t per_row, F&& body) {
  if (rows * per_row >= PARALLEL_MIN) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(per_row, 1)), body);
  } else {
    body(0, rows);
  }
}

// 1 / sqrt(mean(x^2) + eps) of one row.
BODY float inv_rms(const float* x, int64_t D, float eps) {
  return 1.0f / std::sqrt(dot_lanes(x, x, D) / static_cast<float>(D) + eps);
}

// y = w * (x * inv) over one row (w may be null: unweighted).
BODY void scale_row(const float* x, const float* w, float inv, int64_t D, float* y) {
  if (w) {
    for (int64_t c = 0; c < D; ++c) y[c] = w[c] * (x[c] * inv);
  } else {
    for (int64_t c = 0; c < D; ++c) y[c] = x[c] * inv;
  }
}

// Interleaved rotation of the trailing 2 * half dims of one row in place: a cos - b sin, a sin + b cos
// (sg = -1 rotates by -angle).
BODY void rotate_row(float* r, const float* cs, const float* sn, int64_t lead, int64_t half, float sg) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = r[lead + 2 * i], b = r[lead + 2 * i + 1], c = cs[i], s = sg * sn[i];
    const float ac = a * c, bs = b * s, as = a * s, bc = b * c;
    r[lead + 2 * i] = ac - bs;
    r[lead + 2 * i + 1] = as + bc;
  }
}

// Rows r0..r1 of x [*, D] RMS-normalised (times w when not null) into y.
BODY void norm_rows_body(const float* x, const float* w, int64_t D, float eps, int64_t r0, int64_t r1, float* y) {
  for (int64_t r = r0; r < r1; ++r) scale_row(x + r * D, w, inv_rms(x + r * D, D, eps), D, y + r * D);
}
ISA_DISPATCH(norm_rows, (const float* x, const float* w, int64_t D, float eps, int64_t r0, int64_t r1, float* y),
             (x, w, D, eps, r0, r1, y))

// Rows r0..r1 of x [N * M, D]: normalised (times w when not null), then rotated by row n = r / M's angle.
BODY void norm_rope_rows_body(const float* x, const float* w, const float* cs, const float* sn, int64_t M, int64_t D,
                              int64_t half, float eps, int64_t r0, int64_t r1, float* y) {
  for (int64_t r = r0; r < r1; ++r) {
    scale_row(x + r * D, w, inv_rms(x + r * D, D, eps), D, y + r * D);
    rotate_row(y + r * D, cs + (r / M) * half, sn + (r / M) * half, D - 2 * half, half, 1.0f);
  }
}
ISA_DISPATCH(norm_rope_rows, (const float* x, const float* w, const float* cs, const float* sn, int64_t M, int64_t D,
                              int64_t half, float eps, int64_t r0, int64_t r1, float* y),
             (x, w, cs, sn, M, D, half, eps, r0, r1, y))

// RMSNorm over the last axis of fp32 rows with an fp32 weight: x * rsqrt(mean(x^2) + eps) * w. One call
// instead of ATen's composite (pow, mean, add, rsqrt, mul, mul: ~40 us per call at batch 1 here).
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.scalar_type() == at::kFloat, "rms_norm: x must be float32");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(w_in.dim() == 1 && w_in.size(0) == D && w_in.scalar_type() == at::kFloat,
              "rms_norm: weight must be float32 [", D, "]");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t rows = D ? x.numel() / D : 0;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  rows_maybe_parallel(rows, D, [&](int64_t r0, int64_t r1) { norm_rows(xp, wp, D, e, r0, r1, yp); });
  return y;
}

// Interleaved RoPE on the trailing 2 * half dims of x [N, M, D] (pairs 2i, 2i+1 of that tail), with
// cos / sin [N, half] shared by the M rows of each n; `inverse` rotates by -angle. The leading dims are
// copied. The same products as kernels.reference.apply_rope.
void check_rope(const at::Tensor& x, const at::Tensor& c, const at::Tensor& s, const char* op) {
  TORCH_CHECK(x.dim() == 3 && c.dim() == 2 && c.sizes() == s.sizes() && c.size(0) == x.size(0), op,
              ": x [N, M, D], cos / sin [N, half]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat, op,
              ": float32 tensors");
  TORCH_CHECK(2 * c.size(1) <= x.size(2), op, ": ", 2 * c.size(1), " rotated dims exceed D = ", x.size(2));
}

at::Tensor rope(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, bool inverse) {
  check_rope(x_in, cos_in, sin_in, "rope");
  const int64_t M = x_in.size(1), D = x_in.size(2), half = cos_in.size(1), lead = D - 2 * half;
  at::Tensor out = x_in.clone(at::MemoryFormat::Contiguous), c = cos_in.contiguous(), sn = sin_in.contiguous();
  const float* cp = c.data_ptr<float>();
  const float* sp = sn.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sg = inverse ? -1.0f : 1.0f;
  rows_maybe_parallel(x_in.size(0) * M, D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rotate_row(op + r * D, cp + (r / M) * half, sp + (r / M) * half, lead, half, sg);
  });
  return out;
}

// An RMS norm of every [D] row of x [N, M, D] (times `weight` when given), then the rotation of its
// trailing dims by row n's angle: V4's query heads (unweighted) and its key (kv_norm's weight) in one call
// each, instead of a norm, its casts and a rope call.
at::Tensor norm_rope(const at::Tensor& x_in, const std::optional<at::Tensor>& w_in, const at::Tensor& cos_in,
                     const at::Tensor& sin_in, double eps) {
  check_rope(x_in, cos_in, sin_in, "norm_rope");
  const int64_t M = x_in.size(1), D = x_in.size(2), half = cos_in.size(1);
  at::Tensor w;
  if (w_in.has_value()) {
    w = w_in->contiguous();
    TORCH_CHECK(w.dim() == 1 && w.size(0) == D && w.scalar_type() == at::kFloat, "norm_rope: weight must be float32 [",
                D, "]");
  }
  const at::Tensor x = x_in.contiguous(), c = cos_in.contiguous(), sn = sin_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* cp = c.data_ptr<float>();
  const float* sp = sn.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  rows_maybe_parallel(x.size(0) * M, D, [&](int64_t r0, int64_t r1) {
    norm_rope_rows(xp, wp, cp, sp, M, D, half, e, r0, r1, op);
  });
  return out;
}

// mHC's Sinkhorn on [..., n, n] fp32 logits, in place: row softmax + eps, column normalisation, then
// (iters - 1) rounds of row and column normalisation (each divides by sum + eps).
void sinkhorn_inplace(float* p, int64_t B, int64_t n, int64_t iters, float eps) {
  for (int64_t b = 0; b < B; ++b) {
    float* m = p + b * n * n;
    for (int64_t i = 0; i < n; ++i) {
      float mx = m[i * n];
      for (int64_t j = 1; j < n; ++j) mx = std::max(mx, m[i * n + j]);
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) { m[i * n + j] = std::exp(m[i * n + j] - mx); sum += m[i * n + j]; }
      for (int64_t j = 0; j < n; ++j) m[i * n + j] = m[i * n + j] / sum + eps;
    }
    // divide each line by its sum + eps: the columns (line stride 1, element stride n) or the rows (n, 1)
    auto lines = [&](int64_t line_stride, int64_t elem_stride) {
      for (int64_t a = 0; a < n; ++a) {
        float* l = m + a * line_stride;
        float sum = 0.0f;
        for (int64_t b = 0; b < n; ++b) sum += l[b * elem_stride];
        sum += eps;
        for (int64_t b = 0; b < n; ++b) l[b * elem_stride] /= sum;
      }
    };
    lines(1, n);
    for (int64_t it = 1; it < iters; ++it) {
      lines(n, 1);
      lines(1, n);
    }
  }
}

// One call instead of ~60 tiny ops.
at::Tensor sinkhorn(const at::Tensor& logits_in, int64_t iters, double eps) {
  TORCH_CHECK(logits_in.dim() >= 2 && logits_in.size(-1) == logits_in.size(-2) && logits_in.scalar_type() == at::kFloat,
              "sinkhorn: logits must be float32 [..., n, n]");
  TORCH_CHECK(iters >= 1, "sinkhorn: iters must be >= 1");
  at::Tensor c = logits_in.clone(at::MemoryFormat::Contiguous);
  const int64_t n = c.size(-1);
  sinkhorn_inplace(c.data_ptr<float>(), n ? c.numel() / (n * n) : 0, n, iters, static_cast<float>(eps));
  return c;
}

// mHC's per-site weights (model/hyper.py hc_weights): x [T, n, d] fp32 streams, fn [n(n+2), n d], base
// [n(n+2)], scale [3] -> pre [T, n], post [T, n], comb [T, n, n]. The mix logits are fn @ x_t / rms(x_t):
// up to HC_ROW_MAX rows as one dot product per logit here (fn read once per row, no copy of x), past it
// the rows normalised and multiplied by torch's GEMM (prefill).
constexpr int64_t HC_ROW_MAX = 16;

void check_hc(const at::Tensor& x, const at::Tensor& fn, const at::Tensor& base, const at::Tensor& scale, const char* op) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, op, ": x must be float32 [T, n, d]");
  const int64_t n = x.size(1), d = x.size(2), F = n * (n + 2);
  TORCH_CHECK(fn.dim() == 2 && fn.size(0) == F && fn.size(1) == n * d && base.numel() == F && scale.numel() == 3, op,
              ": fn must be [", F, ", ", n * d, "], base [", F, "], scale [3]");
}

// mix[t, f] = (fn[f] . x[t]) / rms(x[t]) for rows t0..t1 of x [T, K].
BODY void hc_mix_rows_body(const float* x, const float* fn, int64_t F, int64_t K, float eps, int64_t t0, int64_t t1,
                           float* mix) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* xt = x + t * K;
    const float inv = inv_rms(xt, K, eps);
    for (int64_t f = 0; f < F; ++f) mix[t * F + f] = dot_lanes(fn + f * K, xt, K) * inv;
  }
}
ISA_DISPATCH(hc_mix_rows, (const float* x, const float* fn, int64_t F, int64_t K, float eps, int64_t t0, int64_t t1,
                           float* mix),
             (x, fn, F, K, eps, t0, t1, mix))

std::tuple<at::Tensor, at::Tensor, at::Tensor> hc_weights(const at::Tensor& x_in, const at::Tensor& fn_in,
                                                          const at::Tensor& base_in, const at::Tensor& scale_in,
                                                          int64_t iters, double hc_eps, double norm_eps) {
  check_hc(x_in, fn_in, base_in, scale_in, "hc_weights");
  TORCH_CHECK(iters >= 1, "hc_weights: iters must be >= 1");
  const int64_t T = x_in.size(0), n = x_in.size(1), d = x_in.size(2), F = n * (n + 2), K = n * d;
  const float ne = static_cast<float>(norm_eps);
  const at::Tensor x = x_in.contiguous(), fn = fn_in.to(at::kFloat).contiguous();
  at::Tensor mix;
  if (T <= HC_ROW_MAX) {
    mix = at::empty({T, F}, x.options());
    hc_mix_rows(x.data_ptr<float>(), fn.data_ptr<float>(), F, K, ne, 0, T, mix.data_ptr<float>());
  } else {
    at::Tensor flat = x.reshape({T, K}).clone();
    float* fp = flat.data_ptr<float>();
    rows_maybe_parallel(T, K, [&](int64_t t0, int64_t t1) { norm_rows(fp, nullptr, K, ne, t0, t1, fp); });
    mix = at::mm(flat, fn.t()).contiguous();  // [T, F]
  }
  at::Tensor base = base_in.to(at::kFloat).contiguous(), scale = scale_in.to(at::kFloat).contiguous();
  const float* mp = mix.data_ptr<float>();
  const float* bp = base.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  at::Tensor pre = at::empty({T, n}, x.options()), post = at::empty({T, n}, x.options());
  at::Tensor comb = at::empty({T, n, n}, x.options());
  float* pr = pre.data_ptr<float>();
  float* po = post.data_ptr<float>();
  float* cb = comb.data_ptr<float>();
  const float he = static_cast<float>(hc_eps);
  for (int64_t t = 0; t < T; ++t) {
    const float* m = mp + t * F;
    for (int64_t j = 0; j < n; ++j) {
      pr[t * n + j] = 1.0f / (1.0f + std::exp(-(m[j] * sp[0] + bp[j]))) + he;
      po[t * n + j] = 2.0f / (1.0f + std::exp(-(m[n + j] * sp[1] + bp[n + j])));
    }
    for (int64_t j = 0; j < n * n; ++j) cb[t * n * n + j] = m[2 * n + j] * sp[2] + bp[2 * n + j];
  }
  sinkhorn_inplace(cb, T, n, iters, he);
  return {pre, post, comb};
}

// h[t] = norm(sum_j pre[t, j] x[t, j]) (j in order, products then sums) for rows t0..t1 of x [T, n, d]; c is
// scratch [d].
BODY void collapse_norm_rows_body(const float* x, const float* pre, const float* w, int64_t n, int64_t d, float eps,
                                  int64_t t0, int64_t t1, float* c, float* h) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* xt = x + t * n * d;
    const float* pt = pre + t * n;
    for (int64_t k = 0; k < d; ++k) c[k] = pt[0] * xt[k];
    for (int64_t j = 1; j < n; ++j)
      for (int64_t k = 0; k < d; ++k) c[k] += pt[j] * xt[j * d + k];
    scale_row(c, w, inv_rms(c, d, eps), d, h + t * d);
  }
}
ISA_DISPATCH(collapse_norm_rows, (const float* x, const float* pre, const float* w, int64_t n, int64_t d, float eps,
                                  int64_t t0, int64_t t1, float* c, float* h),
             (x, pre, w, n, d, eps, t0, t1, c, h))

// mHC before a sub-layer, in one call: the site's weights (hc_weights), the collapse of the streams
// sum_j pre_j x_j and the sub-layer's RMSNorm (weight norm_w [d]). Returns (h [T, d], post [T, n], comb [T, n, n]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> hc_pre(const at::Tensor& x_in, const at::Tensor& fn,
                                                      const at::Tensor& base, const at::Tensor& scale,
                                                      const at::Tensor& norm_w_in, int64_t iters, double hc_eps,
                                                      double norm_eps) {
  check_hc(x_in, fn, base, scale, "hc_pre");
  const int64_t T = x_in.size(0), n = x_in.size(1), d = x_in.size(2);
  TORCH_CHECK(norm_w_in.dim() == 1 && norm_w_in.size(0) == d && norm_w_in.scalar_type() == at::kFloat,
              "hc_pre: norm weight must be float32 [", d, "]");
  auto [pre, post, comb] = hc_weights(x_in, fn, base, scale, iters, hc_eps, norm_eps);
  const at::Tensor x = x_in.contiguous(), w = norm_w_in.contiguous();
  at::Tensor h = at::empty({T, d}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* pp = pre.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const float e = static_cast<float>(norm_eps);
  rows_maybe_parallel(T, n * d, [&](int64_t t0, int64_t t1) {
    std::vector<float> c(d);
    collapse_norm_rows(xp, pp, wp, n, d, e, t0, t1, c.data(), hp);
  });
  return {h, post, comb};
}

// out[t, k] = post[t, k] * y[t] + sum_j comb[t, j, k] * x[t, j] (j in order) for rows r = t * n + k in r0..r1.
BODY void hc_post_rows_body(const float* x, const float* y, const float* post, const float* comb, int64_t n, int64_t d,
                            int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = r / n, k = r % n;
    const float* xt = x + t * n * d;
    const float* yt = y + t * d;
    const float* ct = comb + t * n * n;
    const float pk = post[t * n + k];
    float* o = out + r * d;
    for (int64_t c = 0; c < d; ++c) o[c] = ct[k] * xt[c];
    for (int64_t j = 1; j < n; ++j)
      for (int64_t c = 0; c < d; ++c) o[c] += ct[j * n + k] * xt[j * d + c];
    for (int64_t c = 0; c < d; ++c) o[c] += pk * yt[c];
  }
}
ISA_DISPATCH(hc_post_rows, (const float* x, const float* y, const float* post, const float* comb, int64_t n, int64_t d,
                            int64_t r0, int64_t r1, float* out),
             (x, y, post, comb, n, d, r0, r1, out))

// mHC after a sub-layer: out[t, k] = post[t, k] * y[t] + sum_j comb[t, j, k] * x[t, j], for streams x [T, n, d],
// the sub-layer output y [T, d], post [T, n], comb [T, n, n].
at::Tensor hc_post(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& post_in, const at::Tensor& comb_in) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.scalar_type() == at::kFloat, "hc_post: x must be float32 [T, n, d]");
  const int64_t T = x_in.size(0), n = x_in.size(1), d = x_in.size(2);
  TORCH_CHECK(y_in.dim() == 2 && y_in.size(0) == T && y_in.size(1) == d && y_in.scalar_type() == at::kFloat,
              "hc_post: y must be float32 [", T, ", ", d, "], got ", y_in.sizes());
  TORCH_CHECK(post_in.dim() == 2 && post_in.size(0) == T && post_in.size(1) == n && comb_in.dim() == 3 &&
                  comb_in.size(0) == T && comb_in.size(1) == n && comb_in.size(2) == n &&
                  post_in.scalar_type() == at::kFloat && comb_in.scalar_type() == at::kFloat,
              "hc_post: post must be float32 [T, n], comb [T, n, n]");
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), post = post_in.contiguous(), comb = comb_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const float* pp = post.data_ptr<float>();
  const float* cp = comb.data_ptr<float>();
  float* op = out.data_ptr<float>();
  rows_maybe_parallel(T * n, d * n, [&](int64_t r0, int64_t r1) { hc_post_rows(xp, yp, pp, cp, n, d, r0, r1, op); });
  return out;
}

// The router's epilogue (model/moe.Gate): logits [N, E] fp32 -> (weights [N, k] fp32, ids [N, k] int64).
// func 0: sqrt(softplus), 1: sigmoid, 2: softmax. The ids are `hash_ids` [N, k] when given (hash routing),
// else the top k of score + bias (bias [E], selection only), highest first, ties to the lower id. The
// weights are the chosen scores, divided by their sum (+1e-20) when `normalize`, times `scale`.
std::tuple<at::Tensor, at::Tensor> moe_gate(const at::Tensor& logits_in, const std::optional<at::Tensor>& bias_in,
                                            const std::optional<at::Tensor>& hash_in, int64_t k, int64_t func,
                                            bool normalize, double scale) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.scalar_type() == at::kFloat, "moe_gate: logits must be float32 [N, E]");
  const int64_t N = logits_in.size(0), E = logits_in.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "moe_gate: k must lie in [1, ", E, "], got ", k);
  TORCH_CHECK(func >= 0 && func <= 2, "moe_gate: func must be 0 (sqrtsoftplus), 1 (sigmoid) or 2 (softmax)");
  at::Tensor bias, hash;
  if (bias_in.has_value()) {
    bias = bias_in->to(at::kFloat).contiguous();
    TORCH_CHECK(bias.numel() == E, "moe_gate: bias must have ", E, " entries");
  }
  if (hash_in.has_value()) {
    hash = hash_in->contiguous();
    TORCH_CHECK(hash.scalar_type() == at::kLong && hash.dim() == 2 && hash.size(0) == N && hash.size(1) == k,
                "moe_gate: hash ids must be int64 [", N, ", ", k, "]");
  }
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor wts = at::empty({N, k}, logits.options()), ids = at::empty({N, k}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t* hp = hash.defined() ? hash.data_ptr<int64_t>() : nullptr;
  float* wp = wts.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  bool bad_id = false;
  std::vector<float> s(E), key(E);
  for (int64_t t = 0; t < N; ++t) {
    const float* l = lp + t * E;
    if (func == 0) {
      for (int64_t e = 0; e < E; ++e) s[e] = std::sqrt(l[e] > 20.0f ? l[e] : std::log1p(std::exp(l[e])));
    } else if (func == 1) {
      for (int64_t e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + std::exp(-l[e]));
    } else {
      float mx = l[0], sum = 0.0f;
      for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
      for (int64_t e = 0; e < E; ++e) { s[e] = std::exp(l[e] - mx); sum += s[e]; }
      for (int64_t e = 0; e < E; ++e) s[e] /= sum;
    }
    int64_t* it = ip + t * k;
    if (hp) {
      for (int64_t j = 0; j < k; ++j) {
        it[j] = hp[t * k + j];
        bad_id |= it[j] < 0 || it[j] >= E;
      }
    } else {
      for (int64_t e = 0; e < E; ++e) key[e] = bp ? s[e] + bp[e] : s[e];
      for (int64_t j = 0; j < k; ++j) {  // k passes of a max: k is a handful, E a few hundred
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (!std::isnan(key[e]) && (best < 0 || key[e] > key[best])) best = e;
        if (best < 0) best = j;  // every key NaN: any ids; the weights are NaN as the scores are
        it[j] = best;
        key[best] = std::nanf("");  // taken: never chosen again
      }
    }
    if (bad_id) break;
    float* wt = wp + t * k;
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) { wt[j] = s[it[j]]; sum += wt[j]; }
    const float div = normalize ? sum + 1e-20f : 1.0f;
    for (int64_t j = 0; j < k; ++j) wt[j] = (normalize ? wt[j] / div : wt[j]) * static_cast<float>(scale);
  }
  TORCH_CHECK(!bad_id, "moe_gate: a hash id lies outside [0, ", E, ")");
  return {wts, ids};
}

// Clamped SwiGLU of a fused w1|w3 product h [N, 2I]: silu(min(g, limit)) * clamp(u, -limit, limit) with
// g = h[:, :I], u = h[:, I:] (limit <= 0: no clamp) -> [N, I].
at::Tensor swiglu(const at::Tensor& h_in, double limit_d) {
  TORCH_CHECK(h_in.dim() == 2 && h_in.size(1) % 2 == 0 && h_in.scalar_type() == at::kFloat,
              "swiglu: h must be float32 [N, 2I]");
  const int64_t N = h_in.size(0), I = h_in.size(1) / 2;
  const at::Tensor h = h_in.contiguous();
  at::Tensor out = at::empty({N, I}, h.options());
  const float* hp = h.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float lim = static_cast<float>(limit_d);
  rows_maybe_parallel(N, 2 * I, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = hp + r * 2 * I;
      const float* u = g + I;
      float* o = op + r * I;
      for (int64_t c = 0; c < I; ++c) {
        float gc = g[c], uc = u[c];
        if (lim > 0.0f) {
          gc = std::min(gc, lim);
          uc = std::min(std::max(uc, -lim), lim);
        }
        o[c] = gc / (1.0f + std::exp(-gc)) * uc;
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace moeflash_native

TORCH_LIBRARY_FRAGMENT(moeflash, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool inverse) -> Tensor");
  m.def("norm_rope(Tensor x, Tensor? weight, Tensor cos, Tensor sin, float eps) -> Tensor");
  m.def("sinkhorn(Tensor logits, int iters, float eps) -> Tensor");
  m.def("hc_weights(Tensor x, Tensor fn, Tensor base, Tensor scale, int iters, float hc_eps, float norm_eps) -> (Tensor, Tensor, Tensor)");
  m.def("hc_pre(Tensor x, Tensor fn, Tensor base, Tensor scale, Tensor norm_weight, int iters, float hc_eps, float norm_eps) -> (Tensor, Tensor, Tensor)");
  m.def("hc_post(Tensor x, Tensor y, Tensor post, Tensor comb) -> Tensor");
  m.def("moe_gate(Tensor logits, Tensor? bias, Tensor? hash_ids, int k, int func, bool normalize, float scale) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor h, float limit) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeflash, CPU, m) {
  m.impl("rms_norm", &moeflash_native::rms_norm);
  m.impl("rope", &moeflash_native::rope);
  m.impl("norm_rope", &moeflash_native::norm_rope);
  m.impl("sinkhorn", &moeflash_native::sinkhorn);
  m.impl("hc_weights", &moeflash_native::hc_weights);
  m.impl("hc_pre", &moeflash_native::hc_pre);
  m.impl("hc_post", &moeflash_native::hc_post);
  m.impl("moe_gate", &moeflash_native::moe_gate);
  m.impl("swiglu", &moeflash_native::swiglu);
}
