// Quantized activations: the "fast" and "reference" numerics of the native kernels (quant_act.cpp).
//
// fast: each activation row is quantized once per op to int8 in blocks of 32 inputs, d = amax / 127,
// q = round(x * (127 / amax)) with ties to even (|q| <= 127), as llama.cpp's Q8_0. Weights are read as
// integer codes and multiplied with integer dot products; every 32-block's sum is exact in int32 and is
// scaled once by d_x * d_w.
// reference: DeepSeek's own activation quantization before every FP8 / FP4 product (V4-SPEC 5.3): per
// 1 x 128 block, amax clamped below at 1e-4, scale = amax / 448 rounded up to a power of two, values cast
// to e4m3 with ties to even. Here it is applied in place ("fake-quantized") before the exact kernels.
#pragma once

#include <cstdint>
#include <vector>

namespace moeflash_native {

// ggml type ids of the block formats the kernels read.
constexpr int GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q8_0 = 8, GGML_Q4_K = 12, GGML_Q6_K = 14,
              GGML_MXFP4 = 39;

// Numerics modes as the ops take them (kernels/numerics.py names them).
enum Numerics { NUM_EXACT = 0, NUM_REFERENCE = 1, NUM_FAST = 2 };

// The order of a row's int8 values. NATURAL: as x. FP4_PAIRS: per two 32-blocks (64 inputs), the even
// inputs of the first block, the even inputs of the second, then their odd inputs (a trailing single block:
// evens, then odds), which is where the low and high nibbles of FP4 bytes land after one shuffle.
enum Layout { NATURAL = 0, FP4_PAIRS = 1 };

struct Q8Rows {
  int64_t M = 0, K = 0, nb = 0;  // rows, inputs, 32-blocks per row
  Layout layout = NATURAL;
  std::vector<int8_t> q;          // [M, K]
  std::vector<float> d;           // [M, nb] block scales
  std::vector<float> xs;          // [M, nb] d * sum(q): a block's sum, for weight formats with a min term
  std::vector<int32_t> isum;      // [M, nb] sum(q)
  std::vector<int32_t> corr;      // FP4_PAIRS only: [M, ceil(nb / 2), 8] -12 * sum(q) at lanes 0 and 4
  int64_t pairs() const { return (nb + 1) / 2; }
  struct View view(int64_t row0, int64_t m) const;
};

// Rows row0..row0+m-1 of a Q8Rows, as the kernels read them.
struct View {
  const int8_t* q;
  const float* d;
  const float* xs;
  const int32_t* isum;
  const int32_t* corr;
  int64_t M, K, nb;
  Layout layout;
  int64_t pairs() const { return (nb + 1) / 2; }
};

inline View Q8Rows::view(int64_t row0, int64_t m) const {
  return View{q.data() + row0 * K, d.data() + row0 * nb, xs.data() + row0 * nb, isum.data() + row0 * nb,
              corr.empty() ? nullptr : corr.data() + row0 * pairs() * 8, m, K, nb, layout};
}

// Quantize rows x [M, K] (K a multiple of 32) into `out`.
void quantize_rows(const float* x, int64_t M, int64_t K, Layout layout, Q8Rows& out);
// Rows of x' [m, K] = the quantized rows a..a+m of `x` (gathered for one expert's tokens).
void gather_rows(const Q8Rows& x, const int64_t* rows, int64_t m, Q8Rows& out);

// y[i, n] = x_i . w_n for n in [n0, n1): FP4 weights [N, K/2] with UE8M0 scales [N, K/32], x in FP4_PAIRS.
// Every output is computed by the same operations whatever M is (batch invariance).
void fp4_q8_rows(const View& x, const uint8_t* w, const uint8_t* s, float* y, int64_t N, int64_t n0, int64_t n1);

// y[i, n] = x_i . w_n for n in [n0, n1): raw GGUF blocks [N, row_bytes] of `qtype`, x in NATURAL order
// (K a multiple of 256 for the K-quants). Batch-invariant like fp4_q8_rows.
void gguf_q8_rows(const View& x, const uint8_t* w, int64_t row_bytes, int qtype, float* y, int64_t N,
                  int64_t n0, int64_t n1);
bool gguf_q8_supported(int qtype);

// In place: DeepSeek's e4m3 activation quantization per 1 x 128 block, values returned as fp32.
void fake_quant_e4m3(float* x, int64_t M, int64_t K);

}  // namespace moeflash_native
