// Checks and work splitting shared by the ops of every native source file.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace moeflash_native {

// x must be fp32 [M, K] for a weight with K inputs.
inline void check_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == K, op, ": x has ", x.size(1), " columns but the weight has ", K, " inputs");
}

// Output rows per task: enough work to amortise scheduling, small enough to spread over the threads.
inline int64_t grain(int64_t N, int64_t M, int64_t K) {
  const int64_t per_row = std::max<int64_t>(1, M * K);
  return std::max<int64_t>(1, std::min<int64_t>(N, (1 << 16) / per_row + 1));
}

}  // namespace moeflash_native
