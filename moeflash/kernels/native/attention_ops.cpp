// moeflash native kernels: attention at decode time, and the lightning indexer's scores.
//
// attn_decode        one V4 query row over its window ring, new key and entries (with the sink);
// attn_decode_batch  the same for one row of each of B sequences in one call, each sequence's new key
//                    written into its ring: a batched decode step's attention without a Python loop;
// gqa_decode         a dense model's grouped-query decode attention over a KV cache;
// indexer_scores     the CSA indexer's scores over every compressed key.
// The window ring and the entries are read as the sequence state holds them: fp32, or bf16 records
// (`--state-dtype bf16`), widened exactly on the fly. Heads (and sequences) are spread over threads when
// the work is large; each head's sums run in sixteen lanes with a fixed combination order, whatever the
// number of sequences in the call (batch invariance).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu.h"

namespace moeflash_native {
namespace {

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

inline float bf16_to_float(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float widen_key(float v) { return v; }
inline float widen_key(uint16_t b) { return bf16_to_float(b); }

__attribute__((target("avx2,fma,f16c"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// a . b over n floats in sixteen lanes (the tail into lane d mod 16), combined pairwise in a fixed order:
// the dot product of every attention kernel here (inlined into each instruction set's build).
__attribute__((always_inline)) inline float lane_dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[d + l] * b[d + l];
  for (; d < n; ++d) acc[d & 15] += a[d] * b[d];
  for (int w2 = 8; w2 >= 1; w2 /= 2)
    for (int l = 0; l < w2; ++l) acc[l] += acc[l + w2];
  return acc[0];
}

// ---- V4 decode attention -------------------------------------------------------------------------
// One query row's sources: its window ring win [W, D] (before this step's write; slot j holds position
// p - 1 - ((p - 1 - j) mod W), visible when that is >= 0 and > p - W), the new key kv [D] at position p, and
// entries ent [T, D] where valid. K: the records' element type (float, or uint16_t bf16 bits).
template <typename K>
struct DecodeRow {
  const float* q;  // [H, D]
  const K* win;
  const char* win_ok;
  const float* kv;
  const K* ent;
  const bool* valid;
  int64_t W, T;
  float* out;  // [H, D]
};

// One head: scaled dot products with every visible source and the head's sink logit, a softmax, and the
// probability-weighted sum of the same rows (keys are values). Sums in sixteen lanes, fixed tree.
template <typename K>
__attribute__((always_inline)) inline void attn_head_impl(const DecodeRow<K>& r, int64_t h, const float* sp, float sc,
                                                         int64_t D, float* scratch_kf, float* lg) {
  const float* qh = r.q + h * D;
  auto dot = [&](const float* row) { return lane_dot(qh, row, D); };
  // a record row as fp32: itself, or widened into scratch (exact for bf16)
  auto row_f = [&](const K* row) -> const float* {
    if constexpr (std::is_same_v<K, float>) {
      return row;
    } else {
      for (int64_t d = 0; d < D; ++d) scratch_kf[d] = widen_key(row[d]);
      return scratch_kf;
    }
  };
  const int64_t W = r.W, T = r.T, rows = W + 1 + T;
  float m = sp[h];
  for (int64_t j = 0; j < W; ++j) {
    lg[j] = r.win_ok[j] ? dot(row_f(r.win + j * D)) * sc : -INFINITY;
    m = std::max(m, lg[j]);
  }
  lg[W] = dot(r.kv) * sc;
  m = std::max(m, lg[W]);
  for (int64_t t = 0; t < T; ++t) {
    lg[W + 1 + t] = r.valid[t] ? dot(row_f(r.ent + t * D)) * sc : -INFINITY;
    m = std::max(m, lg[W + 1 + t]);
  }
  float z = std::exp(sp[h] - m);
  for (int64_t i = 0; i < rows; ++i) {
    lg[i] = lg[i] == -INFINITY ? 0.0f : std::exp(lg[i] - m);
    z += lg[i];
  }
  float* oh = r.out + h * D;
  for (int64_t d = 0; d < D; ++d) oh[d] = 0.0f;
  auto add = [&](float w, const float* row) {
    if (w == 0.0f) return;
    for (int64_t d = 0; d < D; ++d) oh[d] += w * row[d];
  };
  const float inv = 1.0f / z;
  for (int64_t j = 0; j < W; ++j)
    if (lg[j] != 0.0f) add(lg[j] * inv, row_f(r.win + j * D));
  add(lg[W] * inv, r.kv);
  for (int64_t t = 0; t < T; ++t)
    if (lg[W + 1 + t] != 0.0f) add(lg[W + 1 + t] * inv, row_f(r.ent + t * D));
}

#define ATTN_HEAD_ARGS const DecodeRow<K>& r, int64_t h, const float* sp, float sc, int64_t D, float* kf, float* lg
template <typename K> AVX512_TARGET void attn_head_avx512(ATTN_HEAD_ARGS) { attn_head_impl(r, h, sp, sc, D, kf, lg); }
template <typename K> __attribute__((target("avx2,fma,f16c"))) void attn_head_avx2(ATTN_HEAD_ARGS) {
  attn_head_impl(r, h, sp, sc, D, kf, lg);
}
template <typename K> void attn_head_scalar(ATTN_HEAD_ARGS) { attn_head_impl(r, h, sp, sc, D, kf, lg); }

template <typename K>
void attn_head(const DecodeRow<K>& r, int64_t h, const float* sp, float sc, int64_t D) {
  std::vector<float> kf(D), lg(r.W + 1 + r.T);
  switch (isa()) {
    case AVX512: return attn_head_avx512(r, h, sp, sc, D, kf.data(), lg.data());
    case AVX2: return attn_head_avx2(r, h, sp, sc, D, kf.data(), lg.data());
    default: return attn_head_scalar(r, h, sp, sc, D, kf.data(), lg.data());
  }
}

// The ring slots visible to a query at position p.
std::vector<char> ring_visible(int64_t p, int64_t W) {
  std::vector<char> ok(W);
  for (int64_t j = 0; j < W; ++j) {
    const int64_t pos = p - 1 - (((p - 1 - j) % W) + W) % W;
    ok[j] = pos >= 0 && pos > p - W;
  }
  return ok;
}

bool is_record(const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; }

template <typename K>
const K* records(const at::Tensor& t) {
  return reinterpret_cast<const K*>(t.data_ptr());
}

// Runs every (row, head) pair, spread over threads when the work is large.
template <typename K>
void run_rows(const std::vector<DecodeRow<K>>& rows, int64_t H, const float* sp, float sc, int64_t D) {
  const int64_t B = static_cast<int64_t>(rows.size());
  int64_t work = 0;
  for (const auto& r : rows) work += H * (r.W + 1 + r.T) * D;
  auto pairs = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) attn_head(rows[i / H], i % H, sp, sc, D);
  };
  if (work >= (1 << 16)) at::parallel_for(0, B * H, 1, pairs);
  else pairs(0, B * H);
}

// Decode attention of one query row (V4-SPEC §2.5-2.8). q [H, D] fp32; win [W, D] the ring before this
// step's write; kv [D] fp32 the new key at position p; ent [T, D] with ent_valid [T]; win and ent fp32 or
// both bf16 records; sink [H]. Returns [H, D] fp32. One native call replaces ~25 small ops.
at::Tensor attn_decode(const at::Tensor& q_in, const at::Tensor& win_in, int64_t p, const at::Tensor& kv_in,
                       const at::Tensor& ent_in, const at::Tensor& valid_in, const at::Tensor& sink_in, double scale) {
  TORCH_CHECK(q_in.dim() == 2 && win_in.dim() == 2 && kv_in.dim() == 1 && ent_in.dim() == 2 && valid_in.dim() == 1 &&
                  sink_in.dim() == 1, "attn_decode: q [H, D], win [W, D], kv [D], ent [T, D], ent_valid [T], sink [H]");
  const int64_t H = q_in.size(0), D = q_in.size(1), W = win_in.size(0), T = ent_in.size(0);
  TORCH_CHECK(win_in.size(1) == D && kv_in.size(0) == D && (T == 0 || ent_in.size(1) == D) && valid_in.size(0) == T &&
                  sink_in.size(0) == H, "attn_decode: shapes disagree");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && kv_in.scalar_type() == at::kFloat && sink_in.scalar_type() == at::kFloat &&
                  valid_in.scalar_type() == at::kBool && is_record(win_in) &&
                  (T == 0 || ent_in.scalar_type() == win_in.scalar_type()),
              "attn_decode: q, kv and sink float32, win and ent float32 or bfloat16 (the same), a bool mask");
  const at::Tensor q = q_in.contiguous(), win = win_in.contiguous(), kv = kv_in.contiguous(),
                   ent = ent_in.contiguous(), valid = valid_in.contiguous(), sink = sink_in.contiguous();
  at::Tensor out = at::empty({H, D}, q.options());
  const std::vector<char> ok = ring_visible(p, W);
  const float sc = static_cast<float>(scale);
  auto run = [&](auto tag) {
    using K = decltype(tag);
    const K* ep = T ? records<K>(ent) : nullptr;
    run_rows<K>({{q.data_ptr<float>(), records<K>(win), ok.data(), kv.data_ptr<float>(), ep, valid.data_ptr<bool>(), W,
                  T, out.data_ptr<float>()}},
                H, sink.data_ptr<float>(), sc, D);
  };
  if (win.scalar_type() == at::kFloat) run(float{});
  else run(uint16_t{});
  return out;
}

// attn_decode for one row of each of B sequences: q [B, H, D] and kv [B, D] fp32; wins[b] [W_b, D] sequence b's
// ring (all fp32 or all bf16, the ents alike), pos[b] its position, ents[b] [T_b, D] with valids[b] [T_b];
// sink [H]. Returns [B, H, D] fp32, and then writes kv[b] into slot pos[b] mod W_b of wins[b] (cast to the
// ring's dtype, rounding to nearest even as torch does), so the step's attention and ring update are one call.
at::Tensor attn_decode_batch(const at::Tensor& q_in, at::TensorList wins, at::IntArrayRef pos, const at::Tensor& kv_in,
                             at::TensorList ents, at::TensorList valids, const at::Tensor& sink_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && kv_in.dim() == 2 && sink_in.dim() == 1, "attn_decode_batch: q [B, H, D], kv [B, D], sink [H]");
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  TORCH_CHECK(kv_in.size(0) == B && kv_in.size(1) == D && sink_in.size(0) == H, "attn_decode_batch: shapes disagree");
  TORCH_CHECK(static_cast<int64_t>(wins.size()) == B && static_cast<int64_t>(pos.size()) == B &&
                  static_cast<int64_t>(ents.size()) == B && static_cast<int64_t>(valids.size()) == B,
              "attn_decode_batch: one window, position, entry set and mask per sequence (", B, ")");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && kv_in.scalar_type() == at::kFloat && sink_in.scalar_type() == at::kFloat,
              "attn_decode_batch: q, kv and sink must be float32");
  const at::ScalarType rec = B ? wins[0].scalar_type() : at::kFloat;
  TORCH_CHECK(rec == at::kFloat || rec == at::kBFloat16, "attn_decode_batch: windows must be float32 or bfloat16");
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor &w = wins[b], &e = ents[b], &v = valids[b];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == D && w.size(0) > 0 && w.is_contiguous() && w.scalar_type() == rec,
                "attn_decode_batch: window ", b, " must be a contiguous [W, ", D, "] ", rec, " ring");
    TORCH_CHECK(e.dim() == 2 && v.dim() == 1 && v.size(0) == e.size(0) && v.scalar_type() == at::kBool &&
                    (e.size(0) == 0 || (e.size(1) == D && e.scalar_type() == rec)),
                "attn_decode_batch: entries ", b, " must be [T, ", D, "] ", rec, " with a bool mask [T]");
    TORCH_CHECK(pos[b] >= 0, "attn_decode_batch: positions must be >= 0");
  }
  const at::Tensor q = q_in.contiguous(), kv = kv_in.contiguous(), sink = sink_in.contiguous();
  std::vector<at::Tensor> ent(B), valid(B);
  std::vector<std::vector<char>> ok(B);
  for (int64_t b = 0; b < B; ++b) {
    ent[b] = ents[b].contiguous();
    valid[b] = valids[b].contiguous();
    ok[b] = ring_visible(pos[b], wins[b].size(0));
  }
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = kv.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto run = [&](auto tag) {
    using K = decltype(tag);
    std::vector<DecodeRow<K>> rows;
    rows.reserve(B);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t T = ent[b].size(0);
      rows.push_back({qp + b * H * D, records<K>(wins[b]), ok[b].data(), kp + b * D, T ? records<K>(ent[b]) : nullptr,
                      valid[b].data_ptr<bool>(), wins[b].size(0), T, op + b * H * D});
    }
    run_rows<K>(rows, H, sink.data_ptr<float>(), static_cast<float>(scale), D);
    for (int64_t b = 0; b < B; ++b) {  // after every read: the ring update of this step
      K* slot = reinterpret_cast<K*>(wins[b].data_ptr()) + (pos[b] % wins[b].size(0)) * D;
      for (int64_t d = 0; d < D; ++d) {
        if constexpr (std::is_same_v<K, float>) slot[d] = kp[b * D + d];
        else slot[d] = c10::BFloat16(kp[b * D + d]).x;
      }
    }
  };
  if (rec == at::kFloat) run(float{});
  else run(uint16_t{});
  return out;
}

// Grouped-query attention of one query row over a KV cache (a dense model's decode step): head h reads
// kv head h / (H / KV). q [H, d]; keys, values [T, KV, d] (positions 0..T-1, all visible). -> [H, d].
// Phase 1 (logits of head h into lg [T]) and phase 3 (the probability-weighted sum of values); the
// softmax between them is ATen's vectorised one over all heads at once.
__attribute__((always_inline)) inline void gqa_logits_impl(int64_t h, const float* qp, const float* kp, int64_t T,
                                                          int64_t KV, int64_t d, int64_t group, float sc, float* lg) {
  const float* qh = qp + h * d;
  const int64_t g = h / group, stride = KV * d;
  for (int64_t t = 0; t < T; ++t) {
    lg[t] = lane_dot(qh, kp + t * stride + g * d, d) * sc;
  }
}

__attribute__((always_inline)) inline void gqa_values_impl(int64_t h, const float* pr, const float* vp, int64_t T,
                                                          int64_t KV, int64_t d, int64_t group, float* op) {
  const int64_t g = h / group, stride = KV * d;
  float* oh = op + h * d;
  for (int64_t i = 0; i < d; ++i) oh[i] = 0.0f;
  for (int64_t t = 0; t < T; ++t) {
    const float w = pr[t];
    const float* r = vp + t * stride + g * d;
    for (int64_t i = 0; i < d; ++i) oh[i] += w * r[i];
  }
}

#define GQA_L_ARGS int64_t h, const float* qp, const float* kp, int64_t T, int64_t KV, int64_t d, int64_t group, \
                   float sc, float* lg
#define GQA_V_ARGS int64_t h, const float* pr, const float* vp, int64_t T, int64_t KV, int64_t d, int64_t group, float* op
AVX512_TARGET void gqa_logits_avx512(GQA_L_ARGS) { gqa_logits_impl(h, qp, kp, T, KV, d, group, sc, lg); }
__attribute__((target("avx2,fma,f16c"))) void gqa_logits_avx2(GQA_L_ARGS) { gqa_logits_impl(h, qp, kp, T, KV, d, group, sc, lg); }
void gqa_logits_scalar(GQA_L_ARGS) { gqa_logits_impl(h, qp, kp, T, KV, d, group, sc, lg); }
AVX512_TARGET void gqa_values_avx512(GQA_V_ARGS) { gqa_values_impl(h, pr, vp, T, KV, d, group, op); }
__attribute__((target("avx2,fma,f16c"))) void gqa_values_avx2(GQA_V_ARGS) { gqa_values_impl(h, pr, vp, T, KV, d, group, op); }
void gqa_values_scalar(GQA_V_ARGS) { gqa_values_impl(h, pr, vp, T, KV, d, group, op); }

at::Tensor gqa_decode(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale) {
  TORCH_CHECK(q_in.dim() == 2 && k_in.dim() == 3 && v_in.dim() == 3 && k_in.sizes() == v_in.sizes(),
              "gqa_decode: q [H, d], keys and values [T, KV, d]");
  const int64_t H = q_in.size(0), d = q_in.size(1), T = k_in.size(0), KV = k_in.size(1);
  TORCH_CHECK(k_in.size(2) == d && KV > 0 && H % KV == 0 && T > 0, "gqa_decode: shapes disagree: q ", q_in.sizes(),
              ", keys ", k_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat && v_in.scalar_type() == at::kFloat,
              "gqa_decode: float32 tensors");
  at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty({H, d}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t group = H / KV;
  const bool par = H * T * d >= (1 << 16);
  auto each = [&](auto fn) {
    if (par) {
      at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) { for (int64_t h = h0; h < h1; ++h) fn(h); });
    } else {
      for (int64_t h = 0; h < H; ++h) fn(h);
    }
  };
  at::Tensor lg = at::empty({H, T}, q.options());
  float* lp = lg.data_ptr<float>();
  const Isa which = isa();
  each([&](int64_t h) {
    if (which == AVX512) gqa_logits_avx512(h, qp, kp, T, KV, d, group, sc, lp + h * T);
    else if (which == AVX2) gqa_logits_avx2(h, qp, kp, T, KV, d, group, sc, lp + h * T);
    else gqa_logits_scalar(h, qp, kp, T, KV, d, group, sc, lp + h * T);
  });
  at::Tensor pr = at::softmax(lg, -1);
  const float* pp = pr.data_ptr<float>();
  each([&](int64_t h) {
    if (which == AVX512) gqa_values_avx512(h, pp + h * T, vp, T, KV, d, group, op);
    else if (which == AVX2) gqa_values_avx2(h, pp + h * T, vp, T, KV, d, group, op);
    else gqa_values_scalar(h, pp + h * T, vp, T, KV, d, group, op);
  });
  return out;
}


// ---- the lightning indexer's scores ---------------------------------------------------------------
// out[s, t] = sum_h w[s, h] * relu(q[s, h] . k[t]) (model/compressor.Indexer.select) for q [S, H, D] and w
// [S, H] fp32, keys [T, D] fp32 or bf16, read as stored (a bf16 key is widened exactly, once per key). The
// vectors run across the heads (q is transposed to [S, D, H] once), so a key costs D broadcasts and D * H / 8
// FMAs, with one horizontal sum per (s, t) and no [S, H, T] intermediate.


template <typename K>
void indexer_scalar(const float* qt, const float* w, const K* k, int64_t S, int64_t H, int64_t D, int64_t T,
                    int64_t t0, int64_t t1, float* out) {
  std::vector<float> acc(H), kf(D);
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t d = 0; d < D; ++d) kf[d] = widen_key(k[t * D + d]);
    for (int64_t s = 0; s < S; ++s) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t d = 0; d < D; ++d) {
        const float* qr = qt + (s * D + d) * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += kf[d] * qr[h];
      }
      float sum = 0.0f;
      for (int64_t h = 0; h < H; ++h) sum += w[s * H + h] * std::max(acc[h], 0.0f);
      out[s * T + t] = sum;
    }
  }
}

template <int NV, typename K>
__attribute__((target("avx2,fma,f16c"))) void indexer_avx2(const float* qt, const float* w, const K* k, int64_t S,
                                                           int64_t D, int64_t T, int64_t t0, int64_t t1, float* out) {
  constexpr int64_t H = 8 * NV;
  std::vector<float> kf(D);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t d = 0; d < D; ++d) kf[d] = widen_key(k[t * D + d]);
    for (int64_t s = 0; s < S; ++s) {
      __m256 acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = zero;
      const float* q = qt + s * D * H;
      for (int64_t d = 0; d < D; ++d) {
        const __m256 kv = _mm256_set1_ps(kf[d]);
        for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q + d * H + 8 * v), acc[v]);
      }
      __m256 tot = zero;
      for (int v = 0; v < NV; ++v) tot = _mm256_fmadd_ps(_mm256_loadu_ps(w + s * H + 8 * v), _mm256_max_ps(acc[v], zero), tot);
      out[s * T + t] = hsum_avx2(tot);
    }
  }
}

template <typename K>
void indexer_rows(const float* qt, const float* w, const K* k, int64_t S, int64_t H, int64_t D, int64_t T,
                  int64_t t0, int64_t t1, float* out) {
  if (isa() != SCALAR) {
    switch (H) {
      case 8: return indexer_avx2<1>(qt, w, k, S, D, T, t0, t1, out);
      case 16: return indexer_avx2<2>(qt, w, k, S, D, T, t0, t1, out);
      case 32: return indexer_avx2<4>(qt, w, k, S, D, T, t0, t1, out);
      case 64: return indexer_avx2<8>(qt, w, k, S, D, T, t0, t1, out);
      default: break;
    }
  }
  indexer_scalar(qt, w, k, S, H, D, T, t0, t1, out);
}

at::Tensor indexer_scores(const at::Tensor& q_in, const at::Tensor& w_in, const at::Tensor& k_in) {
  TORCH_CHECK(q_in.dim() == 3 && w_in.dim() == 2 && k_in.dim() == 2, "indexer_scores: q [S, H, D], w [S, H], keys [T, D]");
  const int64_t S = q_in.size(0), H = q_in.size(1), D = q_in.size(2), T = k_in.size(0);
  TORCH_CHECK(w_in.size(0) == S && w_in.size(1) == H && k_in.size(1) == D, "indexer_scores: shapes disagree: q ",
              q_in.sizes(), ", w ", w_in.sizes(), ", keys ", k_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat &&
                  (k_in.scalar_type() == at::kFloat || k_in.scalar_type() == at::kBFloat16),
              "indexer_scores: q and w float32, keys float32 or bfloat16");
  const at::Tensor qt = q_in.transpose(1, 2).contiguous(), w = w_in.contiguous(), k = k_in.contiguous();
  at::Tensor out = at::empty({S, T}, qt.options());
  const float* qp = qt.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(1, S * H * D));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    if (k.scalar_type() == at::kFloat)
      indexer_rows(qp, wp, k.data_ptr<float>(), S, H, D, T, t0, t1, op);
    else
      indexer_rows(qp, wp, reinterpret_cast<const uint16_t*>(k.data_ptr()), S, H, D, T, t0, t1, op);
  });
  return out;
}


}  // namespace
}  // namespace moeflash_native

TORCH_LIBRARY_FRAGMENT(moeflash, m) {
  m.def("attn_decode(Tensor q, Tensor win, int p, Tensor kv, Tensor ent, Tensor ent_valid, Tensor sink, float scale) -> Tensor");
  m.def("attn_decode_batch(Tensor q, Tensor(a!)[] wins, int[] pos, Tensor kv, Tensor[] ents, Tensor[] valids, Tensor sink, float scale) -> Tensor");
  m.def("gqa_decode(Tensor q, Tensor keys, Tensor values, float scale) -> Tensor");
  m.def("indexer_scores(Tensor q, Tensor w, Tensor keys) -> Tensor");
}

TORCH_LIBRARY_IMPL(moeflash, CPU, m) {
  m.impl("attn_decode", &moeflash_native::attn_decode);
  m.impl("attn_decode_batch", &moeflash_native::attn_decode_batch);
  m.impl("gqa_decode", &moeflash_native::gqa_decode);
  m.impl("indexer_scores", &moeflash_native::indexer_scores);
}
