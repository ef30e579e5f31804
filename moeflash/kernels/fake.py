"""Fake (meta) kernels for the native ops: each op's output shapes and dtypes, computed without data.

Why: `torch.compile` traces a function with fake tensors. An op without a fake kernel cannot be traced, so
Dynamo breaks the graph at every native call, and a V4 decode step (a native call every few ops) falls
apart into dozens of small compiled pieces that run slower than eager. With these, the native ops are
opaque nodes inside one graph, and Inductor fuses the small ops between them. `torch.library.opcheck`
(tests/test_fake_kernels.py) checks each against the real kernel.

Registered once by `build.load()` after the library is loaded.
"""

from __future__ import annotations

import torch

from .reference import GGUF_BLOCK_BYTES, GGUF_BLOCK_VALUES


def _rows_out(x: torch.Tensor, n) -> torch.Tensor:
    """fp32 [M, n] for an input of M rows (the linear kernels' result)."""
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


def _gguf_values(weight: torch.Tensor, qtype: int):
    """Inputs per row of raw GGUF blocks [N, row bytes]."""
    return GGUF_BLOCK_VALUES[qtype] * (weight.shape[1] // GGUF_BLOCK_BYTES[qtype])


def register() -> None:
    """Attach a fake kernel to every tensor op of the `moeflash` library (idempotent)."""
    if getattr(register, "done", False):
        return
    lib = "moeflash::"

    def fake(name):
        return torch.library.register_fake(lib + name)

    def linear(x, weight, *_):  # x [M, K] times a weight of N rows, whatever its format -> fp32 [M, N]
        return _rows_out(x, weight.shape[0])

    for name in ("fp8_linear", "fp4_linear", "bf16_linear", "gguf_linear", "fp4_linear_q8", "gguf_linear_q8"):
        fake(name)(linear)

    @fake("fp8_grouped_linear")
    def _(x, weight, scale):
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)

    @fake("moe_fp4")
    def _(x, idx, weights, w13, s13, w2, s2, limit, numerics=0):
        return x.new_empty(x.shape, dtype=torch.float32)

    @fake("dequant_fp8")
    def _(weight, scale):
        return weight.new_empty(weight.shape, dtype=torch.float32)

    @fake("gguf_dequant")
    def _(weight, qtype):
        return weight.new_empty((weight.shape[0], _gguf_values(weight, qtype)), dtype=torch.float32)

    @fake("sinkhorn")
    def _(logits, iters, eps):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @fake("hc_weights")
    def _(x, fn, base, scale, iters, hc_eps, norm_eps):
        t, n = x.shape[0], x.shape[1]
        return (x.new_empty((t, n), dtype=torch.float32), x.new_empty((t, n), dtype=torch.float32),
                x.new_empty((t, n, n), dtype=torch.float32))

    @fake("attn_decode")
    def _(q, win, p, kv, ent, ent_valid, sink, scale):
        return q.new_empty(q.shape, dtype=torch.float32)

    @fake("attn_decode_batch")
    def _(q, wins, pos, kv, ents, valids, sink, scale):
        return q.new_empty(q.shape, dtype=torch.float32)

    @fake("gqa_decode")
    def _(q, keys, values, scale):
        return q.new_empty((q.shape[0], values.shape[-1]), dtype=torch.float32)

    @fake("rope")
    def _(x, cos, sin, inverse):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @fake("rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @fake("norm_rope")
    def _(x, weight, cos, sin, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @fake("hc_pre")
    def _(x, fn, base, scale, norm_weight, iters, hc_eps, norm_eps):
        t, n, d = x.shape
        return (x.new_empty((t, d), dtype=torch.float32), x.new_empty((t, n), dtype=torch.float32),
                x.new_empty((t, n, n), dtype=torch.float32))

    @fake("hc_post")
    def _(x, y, post, comb):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @fake("moe_gate")
    def _(logits, bias, hash_ids, k, func, normalize, scale):
        n = logits.shape[0]
        return logits.new_empty((n, k), dtype=torch.float32), logits.new_empty((n, k), dtype=torch.int64)

    @fake("swiglu")
    def _(h, limit):
        return h.new_empty((h.shape[0], h.shape[1] // 2), dtype=torch.float32)

    @fake("indexer_scores")
    def _(q, w, keys):
        return q.new_empty((q.shape[0], keys.shape[0]), dtype=torch.float32)

    @fake("q8_quantize")
    def _(x, layout):
        m, k = x.shape
        return (x.new_empty((m, k), dtype=torch.int8), x.new_empty((m, k // 32), dtype=torch.float32),
                x.new_empty((m, k // 32), dtype=torch.int32))

    @fake("act_quant_e4m3")
    def _(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    register.done = True
