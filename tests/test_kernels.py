"""The native kernels against their plain-torch references, on every instruction-set path of this CPU.

Each path (scalar, AVX2, AVX-512 where the CPU has it) runs in its own subprocess with MOEFLASH_ISA set,
since the path is chosen once per process. Shapes include partial 128-blocks, K not a multiple of the
vector width, and 1..17 input rows (decode, the row kernel) as well as the tiled-GEMM prefill path.
Also checked: batch invariance (a row's output does not depend on the other rows in the call), the
references against weights/quant.py's independent decoders, and clear errors for bad shapes.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from moeflash import kernels as K
from moeflash.kernels import reference as R
from moeflash.weights.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8

from .cpu import cpu_flags

needs_native = pytest.mark.skipif(not K.build.load(), reason=f"native kernels unavailable: {K.status()}")


def fp8_weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = quant_fp8(torch.randn(n, k, generator=g) * 0.05)
    return q, s.float() if s.dtype.is_floating_point else R.e8m0_to_float(s)


def fp4_weight(shape, seed=0):
    """FP4 codes and scales for a random [N, K] weight, or [E, N, K] experts (quantized one by one)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    if w.dim() == 2:
        return quant_fp4(w)
    parts = [quant_fp4(e) for e in w]
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])


def gguf_blocks(n, k, qtype, seed=0):
    """Random raw GGUF blocks [n, row bytes] with sane fp16 scales (and Q4_1 / Q4_K minimums): Q4_0,
    Q4_1, Q5_0, Q8_0 and MXFP4 in blocks of 32 values, Q4_K and Q6_K in super-blocks of 256."""
    g = torch.Generator().manual_seed(seed)
    bb = {2: 18, 3: 20, 6: 22, 8: 34, 12: 144, 14: 210, 39: 17}[qtype]
    nb = k // (256 if qtype in (12, 14) else 32)
    raw = torch.randint(0, 256, (n, nb, bb), generator=g, dtype=torch.uint8)

    def half(lo, hi, scale, shift=0.0):
        raw[..., lo:hi] = (torch.rand(n, nb, 1, generator=g) * scale + shift).half().view(torch.uint8)
    if qtype in (2, 3, 6, 8):
        half(0, 2, 0.01, 0.001)
    if qtype == 3:
        raw[..., 2:4] = (torch.randn(n, nb, 1, generator=g) * 0.05).half().view(torch.uint8)
    if qtype == 12:  # d and dmin; the 6-bit scales are any bytes
        half(0, 2, 0.001, 0.0001)
        half(2, 4, 0.001, 0.0001)
    if qtype == 14:  # int8 scales are any bytes, then d
        half(208, 210, 0.001, 0.0001)
    if qtype == 39:  # E8M0 exponents around 2^-6
        raw[..., 0] = torch.randint(118, 126, (n, nb), generator=g, dtype=torch.uint8)
    return raw.reshape(n, -1)


def test_gguf_reference_decodes_as_ggml():
    """kernels.reference.gguf_dequant against gguf-py's decoder (which tests/test_gguf_llama.py checks
    bit for bit against ggml's own C decoder)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    for name, qtype in (("Q4_0", 2), ("Q4_1", 3), ("Q5_0", 6), ("Q8_0", 8), ("Q4_K", 12), ("Q6_K", 14),
                        ("MXFP4", 39)):
        blocks = gguf_blocks(16, 512, qtype, seed=qtype)
        ref = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[name])
        got = R.gguf_dequant(blocks, qtype).numpy()
        assert np.array_equal(got, np.asarray(ref, dtype=np.float32).reshape(16, 512)), name
        assert np.abs(got).max() > 0 and len(np.unique(got)) > 16, name  # the blocks carry real values
    for qtype in (0, 13):
        with pytest.raises(KeyError):
            R.gguf_dequant(gguf_blocks(1, 32, 2), qtype)


def test_references_agree_with_the_checkpoint_decoders():
    q, s = quant_fp8(torch.randn(200, 300) * 0.1)
    assert torch.equal(R.dequant_fp8(q, R.e8m0_to_float(s) if not s.dtype.is_floating_point else s), dequant_fp8(q, s))
    q4, s4 = fp4_weight((3, 64, 96))
    assert torch.equal(R.dequant_fp4(q4, s4), dequant_fp4(q4, s4))


CHECK = r"""
import json, sys, torch
from moeflash import kernels as K
from moeflash.kernels import reference as R
from tests.test_kernels import fp8_weight, fp4_weight, gguf_blocks
torch.manual_seed(0)
worst = {}
def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
for m, n, k in [(1, 256, 512), (3, 300, 200), (5, 130, 1000), (17, 384, 256), (40, 260, 384), (1, 7, 5)]:
    q, s = fp8_weight(n, k)
    x = torch.randn(m, k)
    worst["fp8"] = max(worst.get("fp8", 0), rel(K.fp8_linear(x, q, s), R.fp8_linear(x, q, s)))
for m, n, k in [(1, 256, 512), (3, 100, 70), (17, 130, 1024), (40, 64, 128)]:
    w = torch.randn(n, k).bfloat16()
    x = torch.randn(m, k)
    worst["bf16"] = max(worst.get("bf16", 0), rel(K.bf16_linear(x, w), R.bf16_linear(x, w)))
for m, n, k in [(1, 256, 512), (1, 103, 96), (1, 6, 32 * 520), (4, 100, 64), (9, 130, 1024)]:
    q, s = fp4_weight((n, k))
    x = torch.randn(m, k)
    worst["fp4"] = max(worst.get("fp4", 0), rel(K.fp4_linear(x, q, s), R.fp4_linear(x, q, s)))
E, D, I, T, k = 8, 160, 64, 6, 3
w13, s13 = fp4_weight((E, 2 * I, D), 1)
w2, s2 = fp4_weight((E, D, I), 2)
x = torch.randn(T, D)
idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
wt = torch.rand(T, k)
for limit in (0.0, 0.02):
    worst["moe"] = max(worst.get("moe", 0), rel(K.moe_fp4(x, idx, wt, w13, s13, w2, s2, limit),
                                                  R.moe_fp4(x, idx, wt, w13, s13, w2, s2, limit)))
# prefill: 40 tokens over 4 experts, so experts get more than 16 rows (the decode-then-GEMM path)
xp = torch.randn(40, D)
idxp = torch.stack([torch.randperm(4)[:2] for _ in range(40)])
wtp = torch.rand(40, 2)
worst["moe_prefill"] = rel(K.moe_fp4(xp, idxp, wtp, w13, s13, w2, s2, 0.0), R.moe_fp4(xp, idxp, wtp, w13, s13, w2, s2, 0.0))
for m, g, r, k in [(1, 4, 256, 256), (3, 2, 128, 200), (16, 8, 128, 64)]:
    q, s = fp8_weight(g * r, k)
    x = torch.randn(m, g, k)
    ref = torch.cat([R.fp8_linear(x[:, i], q[i * r:(i + 1) * r], s[i * r // 128:(i + 1) * r // 128]) for i in range(g)], -1)
    worst["fp8_grouped"] = max(worst.get("fp8_grouped", 0), rel(K.fp8_grouped_linear(x, q, s), ref))
for qtype in (2, 3, 6, 8, 12, 14, 39):
    shapes = [(1, 100, 512), (5, 64, 256), (20, 48, 768), (9, 3, 1024)] if qtype in (12, 14) else \
        [(1, 100, 576), (5, 64, 64), (20, 48, 128)]
    for m, n, k in shapes:
        blocks = gguf_blocks(n, k, qtype)
        x = torch.randn(m, k)
        worst[f"gguf{qtype}"] = max(worst.get(f"gguf{qtype}", 0),
                                    rel(K.gguf_linear(x, blocks, qtype), R.gguf_linear(x, blocks, qtype)))
        # decoded values: exact, except where a compiler may fuse Q4_1's / Q4_K's d * q - m into one FMA
        dq = rel(K.gguf_dequant(blocks, qtype), R.gguf_dequant(blocks, qtype))
        assert dq == 0 or (qtype in (3, 12) and dq < 1e-6), (qtype, dq)
for t, n, d in [(1, 4, 64), (7, 2, 96), (3, 3, 40)]:
    f = n * (n + 2)
    args = (torch.randn(t, n, d) * 5, torch.randn(f, n * d) * 0.05, torch.randn(f), torch.rand(3) + 0.5, 20, 1e-6, 1e-6)
    worst["hc_weights"] = max([worst.get("hc_weights", 0)] + [rel(a, b) for a, b in zip(K.hc_weights(*args), R.hc_weights(*args))])
for h, d, w, t, p in [(4, 32, 8, 0, 0), (4, 32, 8, 5, 3), (8, 64, 16, 7, 40), (2, 128, 128, 16, 1000)]:
    q, win, kv = torch.randn(h, d), torch.randn(w, d), torch.randn(d)
    ent, ok = torch.randn(t, d), torch.rand(t) < 0.7
    args = (q, win, p, kv, ent, ok, torch.randn(h), d ** -0.5)
    worst["attn_decode"] = max(worst.get("attn_decode", 0), rel(K.attn_decode(*args), R.attn_decode(*args)))
for h, kvh, d, t in [(9, 3, 64, 1), (9, 3, 64, 37), (4, 4, 32, 200), (8, 2, 128, 600)]:
    args = (torch.randn(h, d), torch.randn(t, kvh, d), torch.randn(t, kvh, d), d ** -0.5)
    worst["gqa_decode"] = max(worst.get("gqa_decode", 0), rel(K.gqa_decode(*args), R.gqa_decode(*args)))
for s_, h, d, t, kdt in [(1, 16, 64, 300, torch.float32), (1, 64, 128, 77, torch.bfloat16), (5, 16, 64, 1000, torch.bfloat16),
                         (3, 12, 32, 50, torch.float32)]:  # 12 heads: no vector path, the scalar loop
    args = (torch.randn(s_, h, d), torch.randn(s_, h), torch.randn(t, d).to(kdt))
    worst["indexer_scores"] = max(worst.get("indexer_scores", 0), rel(K.indexer_scores(*args), R.indexer_scores(*args)))
for shape, half, cs in [((5, 64), 16, (5, 16)), ((7, 4, 32), 4, (7, 1, 4)), ((3, 2, 8), 4, (3, 4)), ((600, 8, 96), 32, (600, 1, 32))]:
    x, ang = torch.randn(*shape), torch.randn(*cs)
    if len(shape) == 3 and len(cs) == 2:
        continue  # [N, half] angles with [N, H, D] rows do not broadcast per row: not a rope call
    for inv in (False, True):
        got, want = K.apply_rope(x, ang.cos(), ang.sin(), inv), R.apply_rope(x, ang.cos(), ang.sin(), inv)
        worst["rope"] = max(worst.get("rope", 0), rel(got, want))
for n in (2, 4):
    logits = torch.randn(5, n, n) * 3
    worst["sinkhorn"] = max(worst.get("sinkhorn", 0), rel(K.sinkhorn(logits, 20, 1e-6), R.sinkhorn(logits, 20, 1e-6)))
print(json.dumps({"isa": torch.ops.moeflash.isa(), "worst": worst}))
"""


@needs_native
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_path_matches_the_reference(isa):
    flags = cpu_flags()
    if isa == "avx2" and not {"avx2", "fma", "f16c"} <= flags:
        pytest.skip("no AVX2/FMA/F16C here")
    if isa == "avx512" and not {"avx512f", "avx512bw", "avx512vl"} <= flags:
        pytest.skip("no AVX-512 here")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", CHECK], env={**os.environ, "MOEFLASH_ISA": isa}, cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["isa"] == isa
    print(f"\n[kernels {isa}] worst relative error vs reference: {out['worst']}")
    assert all(v < 1e-5 for v in out["worst"].values()), out


@needs_native
def test_a_forced_path_never_exceeds_the_cpu():
    r = subprocess.run([sys.executable, "-c", "import torch; from moeflash.kernels import build; build.load(); "
                        "print(torch.ops.moeflash.isa())"], env={**os.environ, "MOEFLASH_ISA": "nonsense"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() in ("scalar", "avx2", "avx512")


@needs_native
@pytest.mark.parametrize("op,k", [("fp8", 512), ("fp8", 1000), ("fp8", 2080), ("fp4", 512), ("bf16", 512),
                                  ("q4_1", 512), ("q5_0", 512), ("q4_k", 512), ("q6_k", 512), ("mxfp4", 512)])
def test_rows_do_not_depend_on_the_batch(op, k):
    """Batch invariance on the decode path: row i of a 1..16-row call equals the same row computed alone.
    (FP8 at K = 1000 and 2080: whole groups of four 128-input blocks, then single blocks, a partial one and a
    scalar tail; one row and several rows take different loops with the same arithmetic.)"""
    if op == "fp8":
        q, s = fp8_weight(383, k)
        f = lambda x: K.fp8_linear(x, q, s)  # noqa: E731
    elif op == "fp4":
        q, s = fp4_weight((384, k))
        f = lambda x: K.fp4_linear(x, q, s)  # noqa: E731
    elif op == "bf16":
        w = torch.randn(384, k).bfloat16()
        f = lambda x: K.bf16_linear(x, w)  # noqa: E731
    else:
        qtype = {"q4_1": 3, "q5_0": 6, "q4_k": 12, "q6_k": 14, "mxfp4": 39}[op]
        blocks = gguf_blocks(384, k, qtype)
        f = lambda x: K.gguf_linear(x, blocks, qtype)  # noqa: E731
    x = torch.randn(K.ROW_KERNEL_MAX_ROWS, k)
    alone = torch.cat([f(x[i:i + 1]) for i in range(x.shape[0])])
    for m in range(1, K.ROW_KERNEL_MAX_ROWS + 1):
        assert torch.equal(f(x[:m]), alone[:m]), m


@needs_native
def test_moe_tokens_do_not_depend_on_the_batch():
    E, D, I = 8, 128, 64
    w13, s13 = fp4_weight((E, 2 * I, D), 1)
    w2, s2 = fp4_weight((E, D, I), 2)
    x = torch.randn(10, D)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(10)])
    wt = torch.rand(10, 2)
    together = K.moe_fp4(x, idx, wt, w13, s13, w2, s2, 0.0)
    for t in range(10):
        assert torch.equal(K.moe_fp4(x[t:t + 1], idx[t:t + 1], wt[t:t + 1], w13, s13, w2, s2, 0.0), together[t:t + 1])


@needs_native
def test_bad_shapes_are_clear_errors():
    q, s = fp8_weight(256, 256)
    with pytest.raises(RuntimeError, match="columns but the weight has 256 inputs"):
        torch.ops.moeflash.fp8_linear(torch.randn(1, 128), q.view(torch.uint8), s)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        torch.ops.moeflash.fp8_linear(torch.randn(1, 256), q.view(torch.uint8), s[:1])
    q4, s4 = fp4_weight((4, 64, 64))  # 4 experts, 2I = 64, D = 64
    w2, s2 = torch.zeros(4, 64, 16, dtype=torch.uint8), torch.zeros(4, 64, 1, dtype=torch.uint8)
    args = (q4.view(torch.uint8), s4.view(torch.uint8), w2, s2, 0.0)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.moeflash.moe_fp4(torch.randn(1, 64), torch.tensor([[9]]), torch.ones(1, 1), *args)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        torch.ops.moeflash.moe_fp4(torch.randn(1, 96), torch.tensor([[1]]), torch.ones(1, 1), *args)


def test_reference_path_when_native_is_off():
    """MOEFLASH_KERNELS=torch: the references run, and give the same results."""
    code = ("import torch; from moeflash import kernels as K; from tests.test_kernels import fp8_weight; "
            "q, s = fp8_weight(130, 200); x = torch.randn(2, 200); "
            "print(K.status()['kernels'], float((K.fp8_linear(x, q, s) - x @ K.dequant_fp8(q, s).t()).abs().max()))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MOEFLASH_KERNELS": "torch"}, cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    kind, err = r.stdout.split()
    assert kind == "torch" and float(err) < 1e-5


@pytest.mark.slow
def test_models_run_on_the_references_without_the_native_library():
    """A machine without a compiler runs every op's plain-torch reference: SmolLM2 (packed Q4_1 / Q8_0)
    still answers as with the native kernels."""
    code = ("import json, torch; from moeflash.weights.build import load_model; from moeflash.cli import _encode_prompt; "
            "from moeflash.engine import LLMEngine, SamplingParams; from moeflash import kernels as K; "
            "m, tok = load_model('smollm2'); ids = _encode_prompt(tok, 'What is the capital of France?', chat=True, system=None); "
            "out = LLMEngine(m, tok).generate([ids], SamplingParams(max_tokens=8, temperature=0.0))[0]; "
            "print(json.dumps({'kernels': K.status()['kernels'], 'text': out.text, 'head': type(m.head).__name__}))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MOEFLASH_KERNELS": "torch"}, cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kernels"] == "torch" and out["head"] == "GgufLinear"
    assert "Paris" in out["text"], out


@needs_native
def test_fp4_scale_extremes_follow_the_reference():
    """UE8M0 bytes 0 (2^-127) and 255 (NaN) decode as the reference decodes them, on the batch-1 path
    that converts 16 scales at a time and on the multi-row path."""
    q, s = fp4_weight((8, 64))
    s = s.view(torch.uint8).clone()
    s[1, 0], s[2, 1], s[5, 0] = 0, 255, 0
    for m in (1, 3):
        x = torch.randn(m, 64)
        got, want = K.fp4_linear(x, q, s), R.fp4_linear(x, q, s)
        assert torch.equal(got.isnan(), want.isnan()) and got[:, 2].isnan().all()
        ok = ~want.isnan()
        assert torch.allclose(got[ok], want[ok], rtol=1e-5, atol=1e-6)
