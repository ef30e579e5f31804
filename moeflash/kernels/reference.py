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
            w2: torch.Tensor, s2: torch.Tensor, limit: float, numerics: int = 0) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{idx[t, j]}(x[t]); expert(x) = w2(SwiGLU(w1 x, w3 x)) with w13 = [w1; w3].
    `numerics` (kernels/numerics.py): 0 exact, 1 DeepSeek's e4m3 activations before both products, 2 the
    int8 activations of the fast kernels."""
    def product(a, packed, scale):
        if numerics == 2:
            return fp4_linear_q8(a, packed, scale)
        return fp4_linear(act_quant_e4m3(a) if numerics == 1 else a, packed, scale)

    x = x.float()
    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    for e in torch.unique(idx).tolist():
        t, j = (idx == e).nonzero(as_tuple=True)
        h = product(x[t], w13[e], s13[e])
        gate, up = h[:, :inter], h[:, inter:]
        if limit > 0:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        y = product(F.silu(gate) * up, w2[e], s2[e])
        out.index_add_(0, t, y * weights[t, j].float()[:, None])
    return out


# ---- quantized activations (kernels/numerics.py) ------------------------------------------------------

Q8_BLOCK = 32
E4M3_MAX = 448.0


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The "fast" numerics' activation rows: x [M, K] (K a multiple of 32) -> int8 codes [M, K] and fp32
    scales [M, K/32], per 32 inputs d = amax / 127 and q = round(x * (127 / amax)), ties to even (the
    native quantizer's exact operations, so the codes agree bit for bit)."""
    xb = x.float().unflatten(-1, (-1, Q8_BLOCK))
    amax = xb.abs().amax(-1)
    d = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv.unsqueeze(-1))
    return q.to(torch.int8).flatten(-2), d


def dequant_q8(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return (q.float().unflatten(-1, (-1, Q8_BLOCK)) * d.unsqueeze(-1)).flatten(-2)


def q8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] quantized as `quantize_q8`, times a decoded fp32 weight [N, K]; summed in fp64 so that the
    reference carries no rounding of its own beyond the activation's quantization."""
    xq = dequant_q8(*quantize_q8(x))
    return F.linear(xq.double(), weight.double()).float()


def fp4_linear_q8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q8_linear(x, dequant_fp4(packed, scale))


def gguf_linear_q8(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    return q8_linear(x, gguf_dequant(blocks, qtype))


def act_quant_e4m3(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DeepSeek's activation quantization before FP8 / FP4 products (V4-SPEC 5.3), returned dequantized: per
    1 x `block` inputs (the last block may be shorter), amax clamped below at 1e-4, scale = amax / 448
    rounded up to a power of two (the exact ceiling of log2, as its kernel takes it from the bits), values
    cast to e4m3 with ties to even."""
    xf = x.float()
    k = xf.shape[-1]
    pad = (-k) % block
    xp = F.pad(xf, (0, pad)) if pad else xf
    xb = xp.unflatten(-1, (-1, block))
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = amax * (1.0 / E4M3_MAX)
    m, e = torch.frexp(s)
    s = torch.where(m == 0.5, s, torch.ldexp(torch.ones_like(s), e))
    y = (xb / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s
    return y.flatten(-2)[..., :k].reshape(x.shape)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row-softmax (+ eps), then alternate column / row normalisation (column first); [..., n, n]."""
    c = torch.softmax(logits, dim=-1) + eps
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
    return c


# ggml ids of the types held packed, their block bytes and values per block
GGUF_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14, "MXFP4": 39}
GGUF_BLOCK_BYTES = {2: 18, 3: 20, 6: 22, 8: 34, 12: 144, 14: 210, 39: 17}
GGUF_BLOCK_VALUES = {2: 32, 3: 32, 6: 32, 8: 32, 12: 256, 14: 256, 39: 32}
_MXFP4_VALUES = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 0.0, -1.0, -2.0, -3.0, -4.0, -6.0, -8.0, -12.0)


def _half(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    """Q4_K super-blocks [..., 144] -> [..., 256]: 8 sub-blocks of 32, value = d * scale_s * q - dmin * min_s
    with 6-bit scales / mins (the first four in bytes 0-7, the last four split over bytes 8-11 and the
    top bits of bytes 0-7); sub-blocks 2c and 2c+1 are the low and high nibbles of bytes 32c..32c+31."""
    d, dmin = _half(b[..., 0:2]), _half(b[..., 2:4])
    sc = b[..., 4:16].to(torch.int32)
    lo, mid, hi = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scale = torch.cat((lo & 63, (hi & 0xF) | ((lo >> 6) << 4)), dim=-1).float()
    mins = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=-1).float()
    qs = b[..., 16:].to(torch.int32).unflatten(-1, (4, 32))
    q = torch.stack((qs & 0xF, qs >> 4), dim=-2).flatten(-3, -2).float()  # [..., 8, 32]
    return ((d * scale).unsqueeze(-1) * q - (dmin * mins).unsqueeze(-1)).flatten(-2)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """Q6_K super-blocks [..., 210] -> [..., 256]: per half of 128 values, 64 bytes of low nibbles (values
    0-63 low, 64-127 high) and 32 bytes of 2-bit high parts (value 32k + l at bits 2k of byte l); minus 32,
    times d and an int8 scale per 16 values."""
    ql = b[..., :128].to(torch.int32).unflatten(-1, (2, 64))
    qh = b[..., 128:192].to(torch.int32).unflatten(-1, (2, 32))
    sc = b[..., 192:208].contiguous().view(torch.int8).float()
    d = _half(b[..., 208:210])
    low = torch.cat((ql & 0xF, ql >> 4), dim=-1)  # [..., 2, 128]
    high = torch.cat([(qh >> (2 * k)) & 3 for k in range(4)], dim=-1)  # [..., 2, 128]
    q = ((low | (high << 4)) - 32).float().flatten(-2)  # [..., 256]
    return ((d * sc).unsqueeze(-1) * q.unflatten(-1, (16, 16))).flatten(-2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    """Q5_0 blocks [..., 22] -> [..., 32]: d * (q - 16), q = a nibble (byte j: element j low, j + 16 high)
    plus bit j of the 32-bit little-endian word at bytes 2-5 as its fifth bit."""
    d = _half(b[..., 0:2])
    qh = b[..., 2:6].to(torch.int64)
    bits = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
    high = (bits.unsqueeze(-1) >> torch.arange(32, device=bits.device)) & 1
    qs = b[..., 6:].to(torch.int64)
    q = torch.cat((qs & 0xF, qs >> 4), dim=-1) | (high << 4)
    return d * (q - 16).float()


def _mxfp4(b: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks [..., 17] -> [..., 32]: 2^(e - 128) times ggml's doubled e2m1 value; byte j holds
    element j (low nibble) and j + 16 (high)."""
    d = torch.ldexp(torch.ones(b.shape[:-1] + (1,), device=b.device), b[..., 0:1].to(torch.int32) - 128)
    qs = b[..., 1:].to(torch.int64)
    table = torch.tensor(_MXFP4_VALUES)
    return d * table[torch.cat((qs & 0xF, qs >> 4), dim=-1)]


def gguf_dequant(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """Raw GGUF blocks [N, row bytes] -> fp32 [N, K], by ggml's definitions: Q4_0 d * (q - 8), Q4_1
    d * q + m, Q8_0 d * q (a 4-bit byte j holds element j low and j + 16 high); Q5_0, Q4_K, Q6_K and
    MXFP4 as in `_q5_0`, `_q4_k`, `_q6_k`, `_mxfp4`."""
    bb = GGUF_BLOCK_BYTES[qtype]
    b = blocks.view(torch.uint8).reshape(blocks.shape[0], -1, bb)
    if qtype in (6, 12, 14, 39):
        return {6: _q5_0, 12: _q4_k, 14: _q6_k, 39: _mxfp4}[qtype](b).reshape(blocks.shape[0], -1)
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


def attn_decode(q: torch.Tensor, win: torch.Tensor, p: int, kv: torch.Tensor, ent: torch.Tensor,
                ent_valid: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row's attention: q [H, D] against the window ring win [W, D] (slot j holds position
    p - 1 - ((p - 1 - j) mod W), visible when >= 0 and > p - W), the new key kv [D] at position p and
    entries ent [T, D] where ent_valid; a softmax with the per-head sink logit; values = keys. -> [H, D]."""
    w = win.shape[0]
    slot = torch.arange(w, device=q.device)
    pos = p - 1 - torch.remainder(p - 1 - slot, w)
    keys = torch.cat((win.float(), kv[None].float(), ent.float()))
    ok = torch.cat(((pos >= 0) & (pos > p - w), torch.ones(1, dtype=torch.bool, device=q.device), ent_valid))
    logits = (q.float() @ keys.T * scale).masked_fill(~ok[None], float("-inf"))
    full = torch.cat((logits, sink.float()[:, None]), dim=-1)
    probs = torch.softmax(full, dim=-1)[:, :-1]
    return probs @ keys


def gqa_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row q [H, d] over a KV cache keys / values [T, KV, d], head h reading kv head
    h // (H / KV); every position visible. -> [H, d]."""
    group = q.shape[0] // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)  # [T, H, d]
    v = values.float().repeat_interleave(group, dim=1)
    p = torch.softmax(torch.einsum("hd,thd->ht", q.float(), k) * scale, dim=-1)
    return torch.einsum("ht,thd->hd", p, v)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the trailing 2 * R/2 dims of x [..., D] by cos / sin
    (broadcastable to [..., R/2]), in fp32, cast back to x's dtype; `inverse`: by the negative angle."""
    half = cos.shape[-1]
    rope = x[..., -2 * half:]
    rope = (rope if rope.dtype == torch.float32 else rope.float()).unflatten(-1, (half, 2))
    a, b = rope[..., 0], rope[..., 1]
    if inverse:
        sin = -sin
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    if rotated.dtype != x.dtype:
        rotated = rotated.to(x.dtype)
    return torch.cat((x[..., : x.shape[-1] - 2 * half], rotated), dim=-1)



def indexer_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The lightning indexer's scores: q [S, H, D], head weights w [S, H], keys [T, D] ->
    [S, T] = sum_h w[s, h] * relu(q[s, h] . keys[t]), in fp32 (model/compressor.Indexer.select)."""
    scores = torch.einsum("shd,td->sht", q.float(), keys.float()).relu_()
    return torch.bmm(w.float().unsqueeze(1), scores).squeeze(1)


# ---- the small ops of a block (native/block_ops.cpp) ---------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis in fp32 (times `weight` when given), cast back to x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (y if weight is None else weight.float() * y).to(x.dtype)


def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """mHC's collapse: sum_j pre_j X_j in fp32, cast back: [..., n, d] -> [..., d]."""
    out = (pre.unsqueeze(-1) * x).sum(dim=-2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def hc_expand(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC's expansion: X'_k = post_k * y + sum_j comb[j, k] X_j, in x's dtype; x [..., n, d], y [..., d]."""
    dt = x.dtype
    if post.dtype != dt:  # (a cast to the same dtype still costs a dispatch per call)
        post, comb = post.to(dt), comb.to(dt)
    return post.unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), x)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
           iters: int, hc_eps: float, norm_eps: float):
    """mHC before a sub-layer: the site's weights, the collapse, and the sub-layer's RMSNorm ->
    (normed input [..., d], post, comb)."""
    pre, post, comb = hc_weights(x, fn, base, scale, iters, hc_eps, norm_eps)
    return rms_norm(hc_collapse(x, pre), norm_weight, norm_eps), post, comb


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
              eps: float) -> torch.Tensor:
    """x [N, M, D]: each row RMS-normalised (times `weight` when given), then its trailing dims rotated by
    row n's cos / sin [N, R/2]."""
    return apply_rope(rms_norm(x, weight, eps), cos[:, None, :], sin[:, None, :])


GATE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")  # moe_gate's `func` numbering


def gate_scores(logits: torch.Tensor, func: str) -> torch.Tensor:
    if func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if func == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def moe_gate(logits: torch.Tensor, bias: torch.Tensor | None, hash_ids: torch.Tensor | None, k: int, func: str,
             normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's epilogue: logits [N, E] fp32 -> (weights [N, k] fp32, expert ids [N, k]). The ids are
    `hash_ids` when given, else the top k of score + bias (the bias picks, it does not weigh); the weights
    are the chosen scores, normalised to sum 1 when `normalize`, times `scale`."""
    scores = gate_scores(logits, func)
    if hash_ids is not None:
        idx = hash_ids
    else:
        idx = torch.topk(scores if bias is None else scores + bias, k, dim=-1).indices
    w = scores.gather(1, idx)
    if normalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scale, idx


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """SiLU(min(gate, limit)) * clamp(up, -limit, limit); limit <= 0 disables the clamp."""
    if limit and limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamped SwiGLU of a fused w1|w3 product h [..., 2I] -> [..., I]."""
    return clamped_swiglu(*h.chunk(2, dim=-1), limit)
