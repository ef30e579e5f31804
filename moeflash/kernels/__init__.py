"""Compute on weights at their storage precision: FP8 block-scaled linears, FP4 experts, fused MoE.

Every op has a plain-torch reference (`reference.py`) and a native CPU path (`native/quant_ops.cpp`,
loaded by `build.py` as `torch.ops.moeflash.*`) that picks AVX-512, AVX2 or scalar code from the CPU's
features at run time. The native path is used for CPU tensors when the library could be built; the
reference otherwise (and on other devices). Both accumulate in fp32 and return fp32.

Decode (up to `ROW_KERNEL_MAX_ROWS` input rows) runs the row kernel, which reads each weight byte once
per call and computes every output element in the same order whatever the number of rows (batch
invariance). Larger inputs (prefill) decode the weight tile by tile into fp32 and use torch's GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .build import load as _load_native
from .build import status
from .numerics import EXACT, FAST, REFERENCE

__all__ = ["rope_rows", "attn_decode_batch", "hc_collapse", "hc_expand", "hc_pre", "norm_rope", "moe_gate", "swiglu", "indexer_scores", "apply_rope", "rms_norm", "attn_decode", "gqa_decode", "hc_weights", "gguf_linear", "gguf_dequant", "fp8_grouped_linear", "sinkhorn", "bf16_linear",
           "fp8_linear", "fp4_linear", "moe_fp4", "dequant_fp8", "dequant_fp4", "native", "decode_rows",
           "status", "ROW_KERNEL_MAX_ROWS", "act_quant_e4m3", "q8_rows", "dot_path"]

# Above this many rows the tiled-dequant GEMM is faster than the row kernel (bench/kernels.py).
ROW_KERNEL_MAX_ROWS = 16
_TILE_ROWS = 256  # output rows decoded to fp32 at a time on the GEMM path (bounded scratch memory)


_NATIVE: list[bool] = []  # cached: load() once per process


def native(t: torch.Tensor) -> bool:
    if t.device.type != "cpu":
        return False
    if not _NATIVE:
        _NATIVE.append(_load_native())
    return _NATIVE[0]


_GPU: list = []  # cached: the Triton module (kernels/gpu.py), or None where Triton is missing


def gpu_kernels(t: torch.Tensor):
    """The Triton kernels for a CUDA tensor (kernels/gpu.py), None for other devices or without Triton
    (the plain-torch reference runs then, decoding weights to fp32 first)."""
    if t.device.type != "cuda":
        return None
    if not _GPU:
        try:
            from . import gpu as module
        except ImportError:
            module = None
        _GPU.append(module)
    return _GPU[0]


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32 without a dispatch when it already is (a no-op cast still costs ~1 us on the CPU)."""
    return t if t.dtype == torch.float32 else t.float()


def _u8(t: torch.Tensor) -> torch.Tensor:
    """t's bytes as uint8 without a dispatch when they already are (held buffers are)."""
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def decode_rows(x: torch.Tensor) -> bool:
    """True when x can go straight to a native row kernel: fp32 [M <= ROW_KERNEL_MAX_ROWS, K] on the CPU
    with the library loaded (the layers' decode fast path, which skips the wrappers' reshapes)."""
    return x.dim() == 2 and x.dtype == torch.float32 and x.shape[0] <= ROW_KERNEL_MAX_ROWS and native(x)


def _tiled_gemm(x2: torch.Tensor, n: int, tile_rows: int, decode) -> torch.Tensor:
    """The prefill path: x2 [M, K] @ W.T with W decoded `tile_rows` output rows at a time into fp32
    (`decode(r0, r1)` -> [r1 - r0, K]) and multiplied by torch's GEMM; scratch memory stays bounded."""
    y = torch.empty(x2.shape[0], n, dtype=torch.float32, device=x2.device)
    for r0 in range(0, n, tile_rows):
        r1 = min(n, r0 + tile_rows)
        torch.mm(x2, decode(r0, r1).t(), out=y[:, r0:r1])
    return y


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if native(weight):
        return torch.ops.moeflash.dequant_fp8(weight.view(torch.uint8), scale.float())
    return reference.dequant_fp8(weight, scale)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return reference.dequant_fp4(packed, scale)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] (any float dtype, computed in fp32) @ W.T for a bf16 weight [N, K] -> fp32 [..., N]."""
    if decode_rows(x):  # the decode fast path: no reshapes
        return torch.ops.moeflash.bf16_linear(x, weight)
    x2 = _rows(x)
    n = weight.shape[0]
    if not native(weight):
        y = reference.bf16_linear(x2, weight)
    elif x2.shape[0] <= ROW_KERNEL_MAX_ROWS:
        y = torch.ops.moeflash.bf16_linear(x2, weight)
    else:
        y = _tiled_gemm(x2, n, _TILE_ROWS * 4, lambda r0, r1: weight[r0:r1].float())
    return y.view(*x.shape[:-1], n)


def act_quant_e4m3(x: torch.Tensor) -> torch.Tensor:
    """DeepSeek's activation quantization (e4m3 per 1 x 128, power-of-two scales), returned as fp32 values:
    the `reference` numerics' step before FP8 / FP4 products (kernels/numerics.py)."""
    if native(x) and x.dtype == torch.float32 and x.dim() >= 1 and not x.requires_grad:
        return torch.ops.moeflash.act_quant_e4m3(x)
    return reference.act_quant_e4m3(x)


def q8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the `fast` numerics see it: quantized to int8 per 32 inputs and decoded back to fp32."""
    q, d, _ = torch.ops.moeflash.q8_quantize(x.contiguous(), 0)
    return reference.dequant_q8(q, d).view(x.shape)


def dot_path() -> str:
    """The instruction set of the `fast` numerics' integer dot products: vnni, avx2 or scalar (or torch when
    the native library is missing)."""
    return torch.ops.moeflash.dot_path() if _load_native() else "torch"


def q8_rows(x: torch.Tensor, k_multiple: int = 32) -> bool:
    """True when x can go straight to a native quantized-activation kernel: fp32 [M, K] on the CPU (any M:
    the integer kernels also serve prefill) with K a multiple of `k_multiple`."""
    return (x.dim() == 2 and x.dtype == torch.float32 and x.shape[1] % k_multiple == 0 and not x.requires_grad
            and native(x))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, numerics: int = EXACT) -> torch.Tensor:
    """x [..., K] @ W.T for W = e4m3 weight [N, K] x fp32 block scale [ceil(N/128), ceil(K/128)] -> fp32 [..., N].
    `numerics` REFERENCE quantizes x as DeepSeek does first; FAST is EXACT here (e4m3 codes are not
    integers, so there is no integer product to take)."""
    if numerics == REFERENCE and weight.device.type == "cpu":
        x = act_quant_e4m3(x.float())
    n = weight.shape[0]
    g = gpu_kernels(weight)
    if g is not None:  # bf16 activations stay bf16 (tensor cores); fp32 ones multiply in fp32
        x2 = x.reshape(-1, x.shape[-1])
        return g.fp8_linear(x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float(), weight,
                            scale).view(*x.shape[:-1], n)
    x2 = _rows(x)
    if not native(weight):
        y = reference.fp8_linear(x2, weight, scale)
    elif x2.shape[0] <= ROW_KERNEL_MAX_ROWS:
        y = torch.ops.moeflash.fp8_linear(x2, weight.view(torch.uint8), scale.float())
    else:
        w8, s = weight.view(torch.uint8), scale.float()
        # _TILE_ROWS is a multiple of the 128-row scale block
        y = _tiled_gemm(x2, n, _TILE_ROWS,
                        lambda r0, r1: torch.ops.moeflash.dequant_fp8(w8[r0:r1], s[r0 // 128: -(-r1 // 128)]))
    return y.view(*x.shape[:-1], n)


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, G, Kg], FP8 weight [G * R, Kg] (group g owns rows g*R..g*R+R-1, R a multiple of 128) ->
    fp32 [M, G * R] with out[:, g*R + r] = x[:, g] . w[g*R + r]: V4's grouped output projection."""
    m, g, k = x.shape
    if native(weight) and x.shape[0] <= ROW_KERNEL_MAX_ROWS:
        return torch.ops.moeflash.fp8_grouped_linear(_f32(x), _u8(weight), _f32(scale))
    r = weight.shape[0] // g
    rows = scale.shape[0] // g
    return torch.cat([fp8_linear(x[:, i], weight[i * r:(i + 1) * r], scale[i * rows:(i + 1) * rows])
                      for i in range(g)], dim=-1)


def gguf_dequant(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    if native(blocks):
        return torch.ops.moeflash.gguf_dequant(blocks, qtype)
    return reference.gguf_dequant(blocks, qtype)


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: int, numerics: int = EXACT) -> torch.Tensor:
    """x [..., K] @ W.T for W held as raw GGUF blocks [N, row bytes] (reference.GGUF_TYPES) -> fp32 [..., N].
    `numerics` FAST: int8 activations and integer dot products (any number of rows)."""
    x2 = _rows(x)
    n = blocks.shape[0]
    if numerics == FAST:
        if not native(blocks) or not q8_rows(x2, 256 if qtype in (12, 14) else 32):
            return reference.gguf_linear_q8(x2, blocks, qtype).view(*x.shape[:-1], n)
        if x2.shape[0] <= ROW_KERNEL_MAX_ROWS:
            return torch.ops.moeflash.gguf_linear_q8(x2, blocks, qtype).view(*x.shape[:-1], n)
        # prefill: the same int8 activations, multiplied by the tiled GEMM below (faster than the integer
        # row kernel at many rows for these small-block formats; the products differ by fp32 rounding)
        x2 = q8_roundtrip(x2)
    if not native(blocks):
        y = reference.gguf_linear(x2, blocks, qtype)
    elif x2.shape[0] <= ROW_KERNEL_MAX_ROWS:
        y = torch.ops.moeflash.gguf_linear(x2, blocks, qtype)
    else:
        y = _tiled_gemm(x2, n, _TILE_ROWS * 4, lambda r0, r1: torch.ops.moeflash.gguf_dequant(blocks[r0:r1], qtype))
    return y.view(*x.shape[:-1], n)


def fp4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, numerics: int = EXACT) -> torch.Tensor:
    """x [..., K] @ W.T for W = e2m1 codes [N, K/2] x UE8M0 scale [N, K/32] -> fp32 [..., N] (`numerics`:
    kernels/numerics.py)."""
    x2 = _rows(x)
    n = packed.shape[0]
    if numerics == FAST:
        y = (torch.ops.moeflash.fp4_linear_q8(x2, packed.view(torch.uint8), scale.view(torch.uint8))
             if q8_rows(x2) and native(packed) else reference.fp4_linear_q8(x2, packed, scale))
        return y.view(*x.shape[:-1], n)
    if numerics == REFERENCE:
        x2 = act_quant_e4m3(x2)
    if native(packed) and x2.shape[1] % 32 == 0:
        y = torch.ops.moeflash.fp4_linear(x2, packed.view(torch.uint8), scale.view(torch.uint8))
    else:
        y = reference.fp4_linear(x2, packed, scale)
    return y.view(*x.shape[:-1], n)


def moe_fp4(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor,
            w2: torch.Tensor, s2: torch.Tensor, limit: float, numerics: int = EXACT) -> torch.Tensor:
    """All (token, expert) pairs of one MoE layer in one call over packed FP4 experts: x [T, D], idx and
    weights [T, k], w13 [E, 2I, D/2] (w1 rows then w3 rows), s13 [E, 2I, D/32], w2 [E, D, I/2],
    s2 [E, D, I/32]; `limit` is the SwiGLU clamp (0: none). Returns fp32 [T, D]. `numerics`
    (kernels/numerics.py) applies on the CPU: FAST quantizes each token's row once for all its experts."""
    g = gpu_kernels(w13)
    # past FP4_MAX_PAIRS the reference decodes each used expert once (a host round trip for the ids):
    # never while a CUDA graph is being recorded
    if g is not None and (idx.numel() <= g.FP4_MAX_PAIRS or torch.cuda.is_current_stream_capturing()) \
            and x.shape[-1] % 32 == 0 and w2.shape[-1] % 16 == 0:
        return g.moe_fp4(x, idx, weights, w13, s13, w2, s2, limit)
    if g is not None:  # prefill: each used expert decoded once, bf16 GEMMs for bf16 activations
        return g.moe_fp4_by_expert(x, idx, weights, w13, s13, w2, s2, limit)
    if native(w13) and x.shape[-1] % 32 == 0 and w2.shape[-1] * 2 % 32 == 0:
        return torch.ops.moeflash.moe_fp4(_f32(x), idx, _f32(weights), _u8(w13), _u8(s13), _u8(w2), _u8(s2),
                                          float(limit), int(numerics))
    return reference.moe_fp4(x, idx, weights, w13, s13, w2, s2, limit, numerics if x.device.type == "cpu" else EXACT)


def _records(t: torch.Tensor) -> torch.Tensor:
    """A sequence state's records as the native attention reads them: fp32 or bf16 as held, else fp32."""
    return t if t.dtype in (torch.float32, torch.bfloat16) else t.float()


def attn_decode(q: torch.Tensor, win: torch.Tensor, p: int, kv: torch.Tensor, ent: torch.Tensor,
                ent_valid: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode query's attention over its window ring, new key and (compressed or gathered) entries
    with the sink (reference.attn_decode) in one native call, the ring and entries read as held (fp32 or bf16
    records); fp32 [H, D]."""
    if native(q):
        win = _records(win)
        ent = ent.to(win.dtype) if ent.dtype != win.dtype else ent
        return torch.ops.moeflash.attn_decode(_f32(q), win, int(p), _f32(kv), ent, ent_valid, _f32(sink), float(scale))
    return reference.attn_decode(q, win, p, kv, ent, ent_valid, sink, scale)


def attn_decode_batch(q: torch.Tensor, wins: list[torch.Tensor], pos: list[int], kv: torch.Tensor,
                      ents: list[torch.Tensor], valids: list[torch.Tensor], sink: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """attn_decode for one query row of each of B sequences, q [B, H, D], kv [B, D], each with its own ring
    wins[b], position pos[b] and entries ents[b] / valids[b]; then each new key is written into its ring
    (slot pos mod W). One native call on the CPU when the rings share a dtype (fp32 or bf16); elsewhere a loop
    over the sequences. Returns fp32 [B, H, D]."""
    dt = wins[0].dtype if wins else torch.float32
    if (native(q) and dt in (torch.float32, torch.bfloat16) and all(w.dtype == dt and w.is_contiguous() for w in wins)
            and all(e.dtype == dt or e.shape[0] == 0 for e in ents)):
        return torch.ops.moeflash.attn_decode_batch(_f32(q), wins, pos, _f32(kv), ents, valids, _f32(sink), float(scale))
    out = torch.stack([attn_decode(q[b], wins[b], pos[b], kv[b], ents[b], valids[b], sink, scale)
                       for b in range(len(wins))]) if wins else q.new_zeros(q.shape, dtype=torch.float32)
    for b, w in enumerate(wins):
        w[pos[b] % w.shape[0]] = kv[b]  # (index_put casts to the ring's dtype)
    return out


def gqa_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """A dense model's decode attention (reference.gqa_decode) in one native call; fp32 [H, d]."""
    if native(q):
        return torch.ops.moeflash.gqa_decode(_f32(q), _f32(keys), _f32(values), float(scale))
    return reference.gqa_decode(q, keys, values, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, statistics and the weight multiply in fp32, cast back to x's dtype: one
    Triton kernel for a CUDA tensor without autograd; for fp32 on the CPU one native call without autograd
    (ATen's composite `rms_norm` is ~8 ops, ~40 us a call at batch 1), ATen's op with it; plain torch
    otherwise."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    g = gpu_kernels(x)
    if g is not None and not needs_grad:
        return g.rms_norm(x, weight, eps)
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and not x.is_cuda:
        if not needs_grad and native(x):
            return torch.ops.moeflash.rms_norm(x, weight, eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return reference.rms_norm(x, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Interleaved RoPE (reference.apply_rope). One native call (CPU, fp32) or one Triton kernel (CUDA) for
    x [N, ..., D] with cos / sin of shape [N, R/2] or [N, 1, R/2] (one angle per row n, shared by its
    heads), the reference otherwise."""
    n, half = x.shape[0] if x.dim() else 0, cos.shape[-1]
    g = gpu_kernels(x)
    if (g is not None and x.dim() >= 2 and cos.shape[0] == n and cos.numel() == n * half and sin.shape == cos.shape
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return g.apply_rope(x, cos, sin, inverse)
    if (x.dim() >= 2 and x.dtype == torch.float32 and cos.dtype == torch.float32 and sin.shape == cos.shape
            and cos.dim() in (2, 3) and cos.shape[0] == n and cos.numel() == n * half and not x.requires_grad
            and not cos.requires_grad and native(x)):
        out = torch.ops.moeflash.rope(x.reshape(n, -1, x.shape[-1]), cos.reshape(n, half), sin.reshape(n, half),
                                      inverse)
        return out.view(x.shape)
    return reference.apply_rope(x, cos, sin, inverse)


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """apply_rope for x [N, M, D] with one angle per row n, shared by its M heads: cos / sin [N, R/2]. Straight to
    the native op for fp32 CPU tensors outside autograd (no reshapes); apply_rope with the angles broadcast
    otherwise."""
    if (x.dim() == 3 and cos.dim() == 2 and cos.shape[0] == x.shape[0] and sin.shape == cos.shape
            and _fused(x, cos, sin)):
        return torch.ops.moeflash.rope(x, cos, sin, inverse)
    return apply_rope(x, cos[:, None, :], sin[:, None, :], inverse)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """mHC's doubly-stochastic mix (reference.sinkhorn) in one call on the CPU (~60 tiny ops otherwise)."""
    if native(logits) and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.ops.moeflash.sinkhorn(logits, iters, eps)
    g = gpu_kernels(logits)
    if g is not None and logits.dtype == torch.float32 and not logits.requires_grad and iters >= 1:
        return g.sinkhorn(logits, iters, eps)
    return reference.sinkhorn(logits, iters, eps)


def hc_weights(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int,
               hc_eps: float, norm_eps: float):
    """mHC's pre / post / comb for streams x [..., n, d] (model/hyper.py): one native call for CPU
    tensors of shape [T, n, d] without autograd, the plain-torch reference otherwise."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, fn, base, scale))
    if x.dim() == 3 and native(x) and not needs_grad:
        return torch.ops.moeflash.hc_weights(_f32(x), fn, base, scale, iters, hc_eps, norm_eps)
    g = gpu_kernels(x)
    if g is not None and not needs_grad and iters >= 1 and x.dim() >= 2:
        return g.hc_weights(x, fn, base, scale, iters, hc_eps, norm_eps)  # three kernels on a GPU
    return reference.hc_weights(x, fn, base, scale, iters, hc_eps, norm_eps)


def indexer_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The lightning indexer's scores (reference.indexer_scores) in one native call on the CPU: the keys read
    as stored (fp32 or bf16 records), no [S, H, T] intermediate; the reference elsewhere."""
    if (native(q) and q.dim() == 3 and q.dtype == torch.float32 and w.dtype == torch.float32
            and keys.dtype in (torch.float32, torch.bfloat16) and not (torch.is_grad_enabled() and q.requires_grad)):
        return torch.ops.moeflash.indexer_scores(q, w, keys)
    return reference.indexer_scores(q, w, keys)


# ---- the small ops of a block, fused (native/block_ops.cpp) ------------------------------------------------
def _fused(*ts: torch.Tensor) -> bool:
    """True when the fused block ops take these tensors: fp32 on the CPU, outside autograd, with the native
    library loaded. Anything else (bf16 models, a GPU, training) runs the composition of the unfused ops."""
    if ts[0].device.type != "cpu" or not native(ts[0]):
        return False
    grad = torch.is_grad_enabled()
    return all(t.dtype == torch.float32 and not (grad and t.requires_grad) for t in ts)


def hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """mHC's collapse sum_j pre_j X_j (reference.hc_collapse): one Triton kernel on a GPU outside autograd."""
    g = gpu_kernels(x)
    if g is not None and not torch.is_grad_enabled():
        return g.hc_collapse(x, pre)
    return reference.hc_collapse(x, pre)


def hc_expand(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC's expansion X'_k = post_k y + sum_j comb[j, k] X_j (reference.hc_expand): one native call for fp32
    CPU streams [T, n, d] (~8 ATen ops otherwise), one Triton kernel on a GPU outside autograd."""
    g = gpu_kernels(x)
    if g is not None and not torch.is_grad_enabled():
        return g.hc_expand(x, y, post, comb)
    if x.dim() == 3 and y.dim() == 2 and _fused(x, y, post, comb):
        return torch.ops.moeflash.hc_post(x, y, post, comb)
    return reference.hc_expand(x, y, post, comb)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
           iters: int, hc_eps: float, norm_eps: float):
    """mHC before a sub-layer (reference.hc_pre): the site's weights, the collapse of the streams and the
    sub-layer's RMSNorm -> (h [T, d], post [T, n], comb [T, n, n]). One native call for fp32 CPU streams
    [T, n, d]; elsewhere the unfused ops, each on its own best path."""
    if x.dim() == 3 and iters >= 1 and _fused(x, norm_weight, fn, base, scale):
        return torch.ops.moeflash.hc_pre(x, fn, base, scale, norm_weight, iters, hc_eps, norm_eps)
    pre, post, comb = hc_weights(x, fn, base, scale, iters, hc_eps, norm_eps)
    return rms_norm(hc_collapse(x, pre), norm_weight, norm_eps), post, comb


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
              eps: float) -> torch.Tensor:
    """x [N, M, D]: each row RMS-normalised (times `weight` when given), its trailing dims rotated by row n's
    cos / sin [N, R/2] (reference.norm_rope). One native call for fp32 CPU tensors; elsewhere a norm and a
    rotation, each on its own best path."""
    ok = x.dim() == 3 and cos.dim() == 2 and cos.shape[0] == x.shape[0] and sin.shape == cos.shape
    if ok and _fused(x, cos, sin, *(() if weight is None else (weight,))):
        return torch.ops.moeflash.norm_rope(x, weight, cos, sin, eps)
    y = reference.rms_norm(x, None, eps) if weight is None else rms_norm(x, weight, eps)
    return apply_rope(y, cos[:, None, :], sin[:, None, :])


def moe_gate(logits: torch.Tensor, bias: torch.Tensor | None, hash_ids: torch.Tensor | None, k: int, func: str,
             normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's epilogue (reference.moe_gate): scores, the biased top k (or the hash ids), normalisation and
    scale -> (weights [N, k] fp32, ids [N, k] int64). One native call for fp32 CPU logits (~10 ATen ops
    otherwise); the native top k lists the ids highest first, ties to the lower id."""
    extra = tuple(t for t in (bias, hash_ids) if t is not None)
    if (logits.dim() == 2 and func in reference.GATE_FUNCS and _fused(logits)
            and all(t.device.type == "cpu" for t in extra)):
        return torch.ops.moeflash.moe_gate(logits, bias, hash_ids, k, reference.GATE_FUNCS.index(func),
                                           normalize, float(scale))
    return reference.moe_gate(logits, bias, hash_ids, k, func, normalize, scale)


def swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamped SwiGLU of a fused w1|w3 product h [N, 2I] (reference.swiglu): one native call for fp32 CPU
    rows (four ATen ops otherwise)."""
    if h.dim() == 2 and _fused(h):
        return torch.ops.moeflash.swiglu(h, float(limit))
    return reference.swiglu(h, limit)
