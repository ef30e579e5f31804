"""Plain-torch references for the native kernels: the same maths, written for clarity, not speed.

They define what the native ops must compute (tests compare the two), and they run wherever the native
library cannot be built. Formats as in native/quant_ops.cpp: FP8 e4m3 bytes with fp32 multipliers per
128x128 block; FP4 e2m1 codes two a byte (element 2k low nibble) with UE8M0 exponent bytes per 32 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_BLOCK = 128
FP4_GROUP = 32
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """UE8M0 exponent bytes -> fp32 multipliers 2**(b - 127) (255 = NaN)."""
    b = s.view(torch.uint8).to(torch.int32)
    m = torch.ldexp(torch.ones(b.shape, dtype=torch.float32, device=b.device), b - 127)
    return torch.where(b == 255, torch.full_like(m, float("nan")), m)


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N, K] e4m3 bytes (uint8 or float8_e4m3fn) x fp32 [ceil(N/128), ceil(K/128)] -> fp32 [N, K]."""
    n, k = weight.shape
    w = weight.view(torch.float8_e4m3fn).float()
    s = scale.float().repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]
    return w * s


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[..., N, K/2] packed codes x UE8M0 [..., N, K/32] -> fp32 [..., N, K]."""
    p = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
    w = _E2M1.to(packed.device)[codes]
    return w * e8m0_to_float(scale).repeat_interleave(FP4_GROUP, -1)[..., : w.shape[-1]]


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), weight.float())


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), dequant_fp8(weight, scale))


def fp4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), dequant_fp4(packed, scale))


def moe_fp4(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor,
            w2: torch.Tensor, s2: torch.Tensor, limit: float) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{idx[t, j]}(x[t]); expert(x) = w2(SwiGLU(w1 x, w3 x)) with w13 = [w1; w3]."""
    x = x.float()
    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    for e in torch.unique(idx).tolist():
        t, j = (idx == e).nonzero(as_tuple=True)
        h = fp4_linear(x[t], w13[e], s13[e])
        gate, up = h[:, :inter], h[:, inter:]
        if limit > 0:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        y = fp4_linear(F.silu(gate) * up, w2[e], s2[e])
        out.index_add_(0, t, y * weights[t, j].float()[:, None])
    return out


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row-softmax (+ eps), then alternate column / row normalisation (column first); [..., n, n]."""
    c = torch.softmax(logits, dim=-1) + eps
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
    return c


GGUF_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}  # ggml type ids of the block formats held packed
GGUF_BLOCK_BYTES = {2: 18, 3: 20, 8: 34}


def gguf_dequant(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """Raw GGUF blocks [N, row bytes] of Q4_0 / Q4_1 / Q8_0 -> fp32 [N, K] (ggml's definitions: Q4_0
    d * (q - 8), Q4_1 d * q + m, Q8_0 d * q; a 4-bit byte j holds element j low and j + 16 high)."""
    bb = GGUF_BLOCK_BYTES[qtype]
    b = blocks.view(torch.uint8).reshape(blocks.shape[0], -1, bb)
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [N, nb, 1]
    if qtype == 8:
        q = b[..., 2:].contiguous().view(torch.int8).float()
        return (d * q).reshape(blocks.shape[0], -1)
    qs = b[..., (4 if qtype == 3 else 2):].to(torch.int64)
    q = torch.cat((qs & 0xF, qs >> 4), dim=-1).float()  # elements 0..15, then 16..31
    if qtype == 3:
        m = b[..., 2:4].contiguous().view(torch.float16).float()
        return (d * q + m).reshape(blocks.shape[0], -1)
    return (d * (q - 8)).reshape(blocks.shape[0], -1)


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    return F.linear(x.float(), gguf_dequant(blocks, qtype))


def hc_mix_logits(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """x [..., n, d] -> fn @ rmsnorm(flatten(x)) in fp32, shape [..., fn.shape[0]] (mHC's mix logits)."""
    flat = x.flatten(-2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    return F.linear(flat, fn.float())


def hc_weights(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int,
               hc_eps: float, norm_eps: float):
    """mHC (V4-SPEC 2.2): mix logits = fn @ rmsnorm(flatten(x)) in fp32, split into pre / post / comb parts;
    pre = sigmoid(m * s0 + b) + eps, post = 2 sigmoid(m * s1 + b), comb = Sinkhorn(m * s2 + b)."""
    n = x.shape[-2]
    mix = hc_mix_logits(x, fn, norm_eps)
    m_pre, m_post, m_comb = mix.split([n, n, n * n], dim=-1)
    b_pre, b_post, b_comb = base.float().split([n, n, n * n])
    s = scale.float()
    pre = torch.sigmoid(m_pre * s[0] + b_pre) + hc_eps
    post = 2 * torch.sigmoid(m_post * s[1] + b_post)
    comb = sinkhorn((m_comb * s[2] + b_comb).unflatten(-1, (n, n)), iters, hc_eps)
    return pre, post, comb
