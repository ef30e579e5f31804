"""Triton kernels for weights held at storage precision on a GPU: FP8 e4m3 linears with 128x128 block
scales, and the routed FP4 (e2m1 + UE8M0) experts of a MoE layer, both read as stored bytes.

Why: a decode step is memory-bound, so its cost is the bytes it reads. Decoding an FP8 or FP4 weight to
bf16 first would write and read it again at two to four times its stored size; these kernels decode
each tile in registers and accumulate in fp32. The codes are decoded with integer arithmetic (no
float8 types, no lookup tables), which runs alike on every Triton backend, and under Triton's
interpreter (TRITON_INTERPRET=1) on the CPU, where the tests check them against `kernels.reference`.

Imported only when a CUDA tensor reaches `kernels` (or by the interpreter tests): Triton is what the
GPU machine has; the CPU install does not need it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_BLOCK = 128
# above this many input rows (prefill) an FP8 weight is decoded once to the activations' dtype and
# multiplied by cuBLAS; up to it (decode) the kernel reads the stored bytes
FP8_KERNEL_MAX_ROWS = 64
# at most this many (token, expert) pairs go through the per-pair FP4 kernels; larger calls (prefill)
# decode each used expert once instead (kernels.reference.moe_fp4), which reads an expert once per call
# rather than once per pair
FP4_MAX_PAIRS = 512


@triton.jit
def _e4m3_to_f32(b):
    """e4m3fn bytes (int32) -> fp32: normal numbers by bit placement, subnormals as m * 2**-9."""
    s = (b >> 7) & 1
    e = (b >> 3) & 15
    m = b & 7
    normal = ((s << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    sub = tl.where(s == 1, -sub, sub)
    return tl.where(e == 0, sub, normal)


@triton.jit
def _e2m1_to_f32(c):
    """e2m1 codes (int32, 0..15) -> fp32 {0, .5, 1, 1.5, 2, 3, 4, 6} with a sign bit."""
    s = (c >> 3) & 1
    e = (c >> 1) & 3
    m = c & 1
    bits = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22))
    return ((s << 31) | bits).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_to_f32(b):
    """UE8M0 exponent bytes (int32) -> 2**(b - 127); b = 0 is the subnormal 2**-127."""
    return tl.where(b == 0, 1 << 22, b << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_linear_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, sk_stride, k_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        kk = k0 + rk
        xt = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                     other=0.0).to(tl.float32)
        wb = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K),
                     other=0).to(tl.int32)
        # (a last split may run past K: its loads are masked to 0, and its scale index is kept in range)
        sc = tl.load(s_ptr + (rn // 128) * sk_stride + tl.minimum(k0 // 128, sk_stride - 1), mask=rn < N, other=0.0)
        w = _e4m3_to_f32(wb) * sc[:, None]
        if IEEE:
            acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
        else:  # bf16 activations: TF32 products are finer than the activations themselves
            acc += tl.dot(xt, tl.trans(w), input_precision="tf32")
    out = y_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


_SMS: dict = {}


def _programs_wanted(device: torch.device) -> int:
    """Programs that keep every SM streaming (two per SM); 4 under the interpreter (the CPU)."""
    if device.type != "cuda":
        return 4
    if device not in _SMS:
        _SMS[device] = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T for W = e4m3 bytes [N, K] x fp32 block scales [ceil(N/128), ceil(K/128)] -> fp32
    [M, N]. fp32 inputs multiply in IEEE fp32, bf16 inputs in TF32; above FP8_KERNEL_MAX_ROWS rows
    the weight is decoded once and multiplied by torch.

    A decode GEMV of a narrow weight (V4's 512- to 2,048-row projections) has too few 32-row tiles to
    keep a GPU's SMs reading, so K is split across programs (in whole 128-column scale blocks) and the
    partial sums are added in a fixed order afterwards: the split depends on the weight's shape only."""
    m, k = x.shape
    n = weight.shape[0]
    if m > FP8_KERNEL_MAX_ROWS:
        from .reference import dequant_fp8

        return torch.nn.functional.linear(x, dequant_fp8(weight, scale).to(x.dtype)).float()
    x = x.contiguous()
    block_m = max(16, triton.next_power_of_2(m))
    tiles = triton.cdiv(n, 32)
    k_blocks = triton.cdiv(k, FP8_BLOCK)
    splits = max(1, min(k_blocks, triton.cdiv(_programs_wanted(x.device), tiles)))
    per = triton.cdiv(k_blocks, splits) * FP8_BLOCK
    splits = triton.cdiv(k, per)
    y = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _fp8_linear_kernel[(tiles, triton.cdiv(m, block_m), splits)](
        x, weight.view(torch.uint8).contiguous(), scale.float().contiguous(), y, m, n, k, scale.shape[1], per,
        BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=FP8_BLOCK, IEEE=x.dtype == torch.float32)
    return y[0] if splits == 1 else y.sum(dim=0)


@triton.jit
def _fp4_rows(x_ptr, q_ptr, s_ptr, rows, K, row_ok, BLOCK_N: tl.constexpr, HALF: tl.constexpr):
    """sum_k W[rows, k] x[k] for FP4 rows (codes two a byte, element 2j in the low nibble; one UE8M0
    scale per 32 inputs): the even and odd inputs meet the low and high nibbles."""
    rb = tl.arange(0, HALF)  # HALF bytes = 2 * HALF inputs per iteration
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, 2 * HALF):
        byte = k0 // 2 + rb
        ok = row_ok[:, None] & (byte[None, :] < K // 2)
        q = tl.load(q_ptr + rows[:, None] * (K // 2) + byte[None, :], mask=ok, other=0).to(tl.int32)
        sc = tl.load(s_ptr + rows[:, None] * (K // 32) + byte[None, :] // 16, mask=ok, other=0).to(tl.int32)
        xe = tl.load(x_ptr + 2 * byte, mask=byte < K // 2, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + 2 * byte + 1, mask=byte < K // 2, other=0.0).to(tl.float32)
        w = _e2m1_to_f32(q & 15) * xe[None, :] + _e2m1_to_f32(q >> 4) * xo[None, :]
        acc += tl.sum(w * _e8m0_to_f32(sc), axis=1)
    return acc


@triton.jit
def _fp4_gate_up_kernel(x_ptr, idx_ptr, q13_ptr, s13_ptr, act_ptr, D, I, TOPK, limit,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0)
    t = p // TOPK
    e = tl.load(idx_ptr + p).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rn < I
    base_q = q13_ptr + e * (2 * I) * (D // 2)
    base_s = s13_ptr + e * (2 * I) * (D // 32)
    gate = _fp4_rows(x_ptr + t * D, base_q, base_s, rn, D, ok, BLOCK_N, BLOCK_K // 2)
    up = _fp4_rows(x_ptr + t * D, base_q, base_s, rn + I, D, ok, BLOCK_N, BLOCK_K // 2)
    if limit > 0:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + p * I + rn, act, mask=ok)


@triton.jit
def _fp4_down_kernel(act_ptr, idx_ptr, q2_ptr, s2_ptr, y_ptr, D, I,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0)
    e = tl.load(idx_ptr + p).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rn < D
    y = _fp4_rows(act_ptr + p * I, q2_ptr + e * D * (I // 2), s2_ptr + e * D * (I // 32), rn, I, ok, BLOCK_N, BLOCK_K // 2)
    tl.store(y_ptr + p * D + rn, y, mask=ok)


def moe_fp4(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor,
            w2: torch.Tensor, s2: torch.Tensor, limit: float) -> torch.Tensor:
    """kernels.moe_fp4 for a decode step: every (token, expert) pair runs the gate/up kernel (writing its
    SwiGLU activation) and the down kernel (writing its output row), each reading only the codes of the
    pair's expert; the k rows of a token are summed with their weights in a fixed order (no atomics, so
    the result does not depend on scheduling). No host synchronisation: a CUDA graph can hold it.
    x [T, D], idx / weights [T, k]; returns fp32 [T, D]."""
    t, d = x.shape
    k = idx.shape[1]
    inter = w13.shape[1] // 2
    pairs = t * k
    x = x.float().contiguous()
    flat = idx.reshape(-1).contiguous()
    act = torch.empty(pairs, inter, dtype=torch.float32, device=x.device)
    _fp4_gate_up_kernel[(pairs, triton.cdiv(inter, 32))](
        x, flat, w13.view(torch.uint8), s13.view(torch.uint8), act, d, inter, k, float(limit),
        BLOCK_N=32, BLOCK_K=64)
    y = torch.empty(pairs, d, dtype=torch.float32, device=x.device)
    _fp4_down_kernel[(pairs, triton.cdiv(d, 32))](
        act, flat, w2.view(torch.uint8), s2.view(torch.uint8), y, d, inter, BLOCK_N=32, BLOCK_K=64)
    return (y.view(t, k, d) * weights.float().unsqueeze(-1)).sum(dim=1)


@triton.jit
def _sinkhorn_tile(logits, mask, iters, eps):
    """Row-softmax (+ eps), then alternate column / row normalisation, on a masked [B, B] tile."""
    x = logits - tl.max(logits, axis=1)[:, None]
    e = tl.where(mask, tl.exp(x), 0.0)
    m = tl.where(mask, e / tl.sum(e, axis=1)[:, None] + eps, 0.0)
    m = tl.where(mask, m / (tl.sum(m, axis=0)[None, :] + eps), 0.0)
    for _ in range(iters - 1):
        m = tl.where(mask, m / (tl.sum(m, axis=1)[:, None] + eps), 0.0)
        m = tl.where(mask, m / (tl.sum(m, axis=0)[None, :] + eps), 0.0)
    return m


@triton.jit
def _sinkhorn_kernel(x_ptr, y_ptr, n, iters, eps, BLOCK: tl.constexpr):
    """One [n, n] matrix per program, every iteration in registers."""
    t = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    mask = (r < n) & (c < n)
    off = t * n * n + r * n + c
    x = tl.load(x_ptr + off, mask=mask, other=float("-inf"))
    tl.store(y_ptr + off, _sinkhorn_tile(x, mask, iters, eps), mask=mask)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """kernels.sinkhorn (mHC's doubly-stochastic mix) for fp32 logits [..., n, n] in one launch: the
    reference is about 6 x iters small kernels per call, which in a decode step's CUDA graph cost more
    than the step's matrix products at small batch."""
    n = logits.shape[-1]
    x = logits.contiguous()
    y = torch.empty_like(x)
    rows = x.numel() // (n * n)
    if rows:
        _sinkhorn_kernel[(rows,)](x, y, n, int(iters), float(eps), BLOCK=triton.next_power_of_2(n))
    return y


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < D
    x = tl.load(x_ptr + row * D + c, mask=ok, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + c, (w * (x * r)).to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis in one kernel (statistics and the weight multiply in fp32, the result
    in x's dtype), where the plain path is eight small kernels for a bf16 input."""
    d = x.shape[-1]
    xc = x.contiguous()
    y = torch.empty_like(xc)
    rows = xc.numel() // d if d else 0
    if rows:
        _rms_norm_kernel[(rows,)](xc, weight.contiguous(), y, d, float(eps), BLOCK=triton.next_power_of_2(d))
    return y


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, D, HALF, INVERSE: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """Row n of x [N, H, D]: every head's last 2 * HALF dims rotated pairwise by row n's angles, the rest
    copied."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = (h < H) & (d < D)
    base = x_ptr + n * H * D + h * D
    x = tl.load(base + d, mask=ok, other=0.0).to(tl.float32)
    start = D - 2 * HALF
    j = d - start  # position inside the rotated part
    in_rope = (j >= 0) & ok
    pair = tl.where(in_rope, j // 2, 0)
    cs = tl.load(cos_ptr + n * HALF + pair, mask=in_rope, other=1.0)
    sn = tl.load(sin_ptr + n * HALF + pair, mask=in_rope, other=0.0)
    if INVERSE:
        sn = -sn
    partner = tl.load(base + tl.where(j % 2 == 0, d + 1, d - 1), mask=in_rope, other=0.0).to(tl.float32)
    # even slot a: a cos - b sin; odd slot b: a sin + b cos (a = even element, b = odd element)
    rot = tl.where(j % 2 == 0, x * cs - partner * sn, partner * sn + x * cs)
    out = tl.where(in_rope, rot, x)
    tl.store(y_ptr + n * H * D + h * D + d, out.to(y_ptr.dtype.element_ty), mask=ok)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """kernels.apply_rope for x [N, ..., D] with one angle row per n (cos / sin [N, R/2] or [N, 1, R/2]) in
    one kernel, where the plain path is about a dozen small ones per call."""
    n, d = x.shape[0], x.shape[-1]
    half = cos.shape[-1]
    xc = x.reshape(n, -1, d).contiguous()
    y = torch.empty_like(xc)
    heads = xc.shape[1]
    if n and heads:
        _rope_kernel[(n,)](xc, cos.reshape(n, half).float().contiguous(), sin.reshape(n, half).float().contiguous(),
                           y, heads, d, half, INVERSE=bool(inverse), BLOCK_D=triton.next_power_of_2(d),
                           BLOCK_H=triton.next_power_of_2(heads))
    return y.view(x.shape)


def moe_fp4_by_expert(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                      s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, limit: float) -> torch.Tensor:
    """kernels.moe_fp4 for a large call (prefill): each used expert decoded once to the activations'
    precision (bf16 for bf16 activations: tensor-core GEMMs; fp32 otherwise) and its rows multiplied by
    torch; the SwiGLU and the weighted sum in fp32. Reads the ids on the host (not for CUDA graphs)."""
    from .reference import dequant_fp4

    dt = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    used, counts = torch.unique_consecutive(flat[order], return_counts=True)
    tokens = order // idx.shape[1]
    wsorted = weights.reshape(-1)[order].float()
    start = 0
    for e, n in zip(used.tolist(), counts.tolist()):
        rows = tokens[start:start + n]
        h = torch.nn.functional.linear(x[rows].to(dt), dequant_fp4(w13[e], s13[e]).to(dt)).float()
        gate, up = h[:, :inter], h[:, inter:]
        if limit > 0:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        act = torch.nn.functional.silu(gate) * up
        y = torch.nn.functional.linear(act.to(dt), dequant_fp4(w2[e], s2[e]).to(dt)).float()
        out.index_add_(0, rows, y * wsorted[start:start + n, None])
        start += n
    return out


@triton.jit
def _hc_post_kernel(x_ptr, mix_ptr, base_ptr, scale_ptr, pre_ptr, post_ptr, comb_ptr, ND, n, iters, hc_eps,
                    norm_eps, BLOCK: tl.constexpr, NB: tl.constexpr):
    """Token t's mHC weights from its raw mix logits (fn @ x, without the RMS factor, which is a scalar per
    token and applied here): pre, post, and the Sinkhorn comb."""
    t = tl.program_id(0).to(tl.int64)
    ar = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, ND, BLOCK):
        xs = tl.load(x_ptr + t * ND + k0 + ar, mask=k0 + ar < ND, other=0.0).to(tl.float32)
        acc += xs * xs
    r = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / ND + norm_eps)
    m_all = (2 + n) * n
    i = tl.arange(0, NB)
    ok = i < n
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    m_pre = tl.load(mix_ptr + t * m_all + i, mask=ok, other=0.0) * r
    pre = tl.sigmoid(m_pre * s0 + tl.load(base_ptr + i, mask=ok, other=0.0)) + hc_eps
    tl.store(pre_ptr + t * n + i, pre, mask=ok)
    m_post = tl.load(mix_ptr + t * m_all + n + i, mask=ok, other=0.0) * r
    post = 2.0 * tl.sigmoid(m_post * s1 + tl.load(base_ptr + n + i, mask=ok, other=0.0))
    tl.store(post_ptr + t * n + i, post, mask=ok)
    rr = tl.arange(0, NB)[:, None]
    cc = tl.arange(0, NB)[None, :]
    okc = (rr < n) & (cc < n)
    cell = rr * n + cc
    m_comb = tl.load(mix_ptr + t * m_all + 2 * n + cell, mask=okc, other=0.0) * r
    logits = tl.where(okc, m_comb * s2 + tl.load(base_ptr + 2 * n + cell, mask=okc, other=0.0), float("-inf"))
    tl.store(comb_ptr + t * n * n + cell, _sinkhorn_tile(logits, okc, iters, hc_eps), mask=okc)


def hc_weights(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int,
               hc_eps: float, norm_eps: float):
    """kernels.hc_weights (mHC's pre / post / comb for streams x [..., n, d]) in three kernels: a cast,
    the mix GEMM (fn @ x: the RMS factor of x is a scalar per token, applied after), and one kernel for
    the RMS factor, the sigmoids and the Sinkhorn; the plain path is about eighteen."""
    n, d = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    flat = x.reshape(-1, n * d).contiguous()
    mix = torch.nn.functional.linear(flat.float(), fn.float()).contiguous()
    rows = flat.shape[0]
    pre = torch.empty(rows, n, dtype=torch.float32, device=x.device)
    post = torch.empty_like(pre)
    comb = torch.empty(rows, n, n, dtype=torch.float32, device=x.device)
    if rows:
        _hc_post_kernel[(rows,)](flat, mix, base.float().contiguous(), scale.float().contiguous(), pre, post, comb,
                                 n * d, n, int(iters), float(hc_eps), float(norm_eps),
                                 BLOCK=min(1024, triton.next_power_of_2(n * d)), NB=triton.next_power_of_2(n))
    return pre.view(*lead, n), post.view(*lead, n), comb.view(*lead, n, n)


@triton.jit
def _hc_collapse_kernel(x_ptr, pre_ptr, y_ptr, n, D, BLOCK: tl.constexpr, NB: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j = tl.arange(0, NB)
    ok = (j[:, None] < n) & (c[None, :] < D)
    x = tl.load(x_ptr + t * n * D + j[:, None] * D + c[None, :], mask=ok, other=0.0).to(tl.float32)
    p = tl.load(pre_ptr + t * n + j, mask=j < n, other=0.0)
    tl.store(y_ptr + t * D + c, tl.sum(p[:, None] * x, axis=0).to(y_ptr.dtype.element_ty), mask=c < D)


def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum_j pre_j X_j in fp32, cast to x's dtype: [..., n, d] -> [..., d] in one kernel."""
    n, d = x.shape[-2], x.shape[-1]
    xc = x.reshape(-1, n, d).contiguous()
    y = torch.empty(xc.shape[0], d, dtype=x.dtype, device=x.device)
    if xc.shape[0]:
        block = min(1024, triton.next_power_of_2(d))
        _hc_collapse_kernel[(xc.shape[0], triton.cdiv(d, block))](
            xc, pre.reshape(-1, n).float().contiguous(), y, n, d, BLOCK=block, NB=triton.next_power_of_2(n))
    return y.view(*x.shape[:-2], d)


@triton.jit
def _hc_expand_kernel(x_ptr, y_ptr, post_ptr, comb_ptr, out_ptr, n, D, BLOCK: tl.constexpr, NB: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j = tl.arange(0, NB)
    okc = c < D
    ok = (j[:, None] < n) & okc[None, :]
    x = tl.load(x_ptr + t * n * D + j[:, None] * D + c[None, :], mask=ok, other=0.0).to(tl.float32)  # [j, c]
    y = tl.load(y_ptr + t * D + c, mask=okc, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t * n + j, mask=j < n, other=0.0)  # [k]
    comb = tl.load(comb_ptr + t * n * n + j[:, None] * n + j[None, :],
                   mask=(j[:, None] < n) & (j[None, :] < n), other=0.0)  # [j, k]
    mixed = tl.sum(comb[:, :, None] * x[:, None, :], axis=0)  # [k, c] = sum_j comb[j, k] x[j, c]
    out = post[:, None] * y[None, :] + mixed
    tl.store(out_ptr + t * n * D + j[:, None] * D + c[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


def hc_expand(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k * y + sum_j comb[j, k] X_j for x [..., n, d] in one kernel (fp32 inside, one rounding
    to x's dtype, where the plain path rounds after each of its five kernels)."""
    n, d = x.shape[-2], x.shape[-1]
    xc = x.reshape(-1, n, d).contiguous()
    out = torch.empty_like(xc)
    if xc.shape[0]:
        block = min(256, triton.next_power_of_2(d))
        _hc_expand_kernel[(xc.shape[0], triton.cdiv(d, block))](
            xc, y.reshape(-1, d).contiguous(), post.reshape(-1, n).float().contiguous(),
            comb.reshape(-1, n, n).float().contiguous(), out, n, d, BLOCK=block, NB=triton.next_power_of_2(n))
    return out.view(x.shape)
