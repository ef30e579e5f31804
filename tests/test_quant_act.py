"""The quantized-activation kernels (kernels/numerics.py: `fast` and `reference`) against their plain-torch
references, on every integer dot-product path this CPU can run, and the numerics modes in the models.

Each path (scalar, AVX2 vpmaddubsw, VNNI vpdpbusd where the CPU has AVX512-VNNI) runs in its own subprocess
with MOEFLASH_DOT set, since the path is chosen once per process. Checked there: the activation codes bit
for bit; FP4, every GGUF type and the fused MoE against references that sum the decoded values in fp64
(so the only allowed difference is fp32 rounding); DeepSeek's e4m3 activation quantization bit for bit;
batch invariance (a row's output is the same bits whatever else is in the call, decode and prefill sizes,
across the 64-row chunks). On a VNNI CPU the AVX2 and VNNI paths must agree bit for bit (every block's
integer sum is exact on both)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moeflash import kernels as K
from moeflash.kernels import reference as R
from moeflash.kernels.numerics import FAST, code, numerics_of, set_numerics

from .cpu import cpu_flags

needs_native = pytest.mark.skipif(not K.build.load(), reason=f"native kernels unavailable: {K.status()}")

CHECK = r"""
import json, sys, torch
from moeflash import kernels as K
from moeflash.kernels import reference as R
from tests.test_kernels import fp4_weight, gguf_blocks
torch.manual_seed(0)
worst, outputs = {}, {}
def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
def note(name, a, b):
    worst[name] = max(worst.get(name, 0.0), rel(a, b))
def rows_alone(fn, x):
    return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])
def fp4_order(q, nb):
    # the FP4_PAIRS layout of natural codes q [M, K] (quant_act.h)
    out = torch.empty_like(q)
    for b in range(nb):
        base = 64 * (b // 2)
        single = nb % 2 == 1 and b == nb - 1
        for e in range(32):
            pos = base + (e % 2) * 16 + e // 2 if single else base + (b % 2) * 16 + (e % 2) * 32 + e // 2
            out[:, pos] = q[:, 32 * b + e]
    return out
# activation codes: bit for bit, both layouts
for m, k in [(1, 32), (3, 96), (2, 4096), (5, 160)]:
    x = torch.randn(m, k) * torch.rand(m, 1) * 10
    x[0, :32] = 0.0  # an all-zero block
    q, d, s = torch.ops.moeflash.q8_quantize(x, 0)
    rq, rd = R.quantize_q8(x)
    assert torch.equal(q, rq) and torch.equal(d, rd), (m, k)
    assert torch.equal(s, rq.view(m, -1, 32).int().sum(-1))
    q1, d1, _ = torch.ops.moeflash.q8_quantize(x, 1)
    assert torch.equal(q1, fp4_order(rq, k // 32)) and torch.equal(d1, rd), (m, k)
# FP4 (odd and even block counts, decode and prefill sizes)
for m, n, k in [(1, 256, 512), (1, 103, 96), (4, 100, 64), (9, 130, 1024), (70, 40, 288), (2, 6, 32)]:
    q, s = fp4_weight((n, k))
    x = torch.randn(m, k)
    y = torch.ops.moeflash.fp4_linear_q8(x, q.view(torch.uint8), s.view(torch.uint8))
    note("fp4", y, R.fp4_linear_q8(x, q, s))
    assert torch.equal(y, rows_alone(lambda r: torch.ops.moeflash.fp4_linear_q8(r, q.view(torch.uint8), s.view(torch.uint8)), x)), "fp4 batch"
    outputs[f"fp4 {m} {n} {k}"] = y.tolist()
# every GGUF type
for qtype in (2, 3, 6, 8, 12, 14, 39):
    shapes = [(1, 100, 512), (5, 64, 256), (70, 12, 768)] if qtype in (12, 14) else \
        [(1, 100, 576), (5, 64, 64), (20, 48, 128), (70, 9, 96)]
    for m, n, k in shapes:
        blocks = gguf_blocks(n, k, qtype)
        x = torch.randn(m, k)
        y = torch.ops.moeflash.gguf_linear_q8(x, blocks, qtype)
        note(f"gguf{qtype}", y, R.gguf_linear_q8(x, blocks, qtype))
        assert torch.equal(y, rows_alone(lambda r: torch.ops.moeflash.gguf_linear_q8(r, blocks, qtype), x)), qtype
        outputs[f"gguf {qtype} {m} {n} {k}"] = y.tolist()
# the fused MoE in each numerics mode, decode and prefill sizes
E, D, I = 8, 160, 96
w13, s13 = fp4_weight((E, 2 * I, D), 1)
w2, s2 = fp4_weight((E, D, I), 2)
for t, k in [(1, 3), (6, 3), (80, 2)]:
    x = torch.randn(t, D)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(t)])
    wt = torch.rand(t, k)
    for numerics in (1, 2):
        for limit in (0.0, 0.02):
            y = K.moe_fp4(x, idx, wt, w13, s13, w2, s2, limit, numerics)
            note(f"moe{numerics}", y, R.moe_fp4(x, idx, wt, w13, s13, w2, s2, limit, numerics))
    y = K.moe_fp4(x, idx, wt, w13, s13, w2, s2, 0.0, 2)
    alone = torch.cat([K.moe_fp4(x[i:i + 1], idx[i:i + 1], wt[i:i + 1], w13, s13, w2, s2, 0.0, 2) for i in range(t)])
    assert torch.equal(y, alone), "moe batch"
    outputs[f"moe {t}"] = y.tolist()
# DeepSeek's e4m3 activations: bit for bit (partial last block, tiny and large values)
for shape in [(3, 300), (2, 128), (1, 7)]:
    x = torch.randn(*shape) * torch.logspace(-6, 3, shape[-1])
    assert torch.equal(torch.ops.moeflash.act_quant_e4m3(x), R.act_quant_e4m3(x)), shape
print(json.dumps({"dot": torch.ops.moeflash.dot_path(), "worst": worst, "outputs": outputs}))
"""


def run_path(path: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", CHECK], env={**os.environ, "MOEFLASH_DOT": path}, cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def has_path(path: str) -> bool:
    flags = cpu_flags()
    if path == "avx2":
        return {"avx2", "fma", "f16c"} <= flags
    if path == "vnni":
        return {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
    return True


@needs_native
@pytest.mark.parametrize("path", ["scalar", "avx2", "vnni"])
def test_every_dot_path_matches_the_reference(path):
    if not has_path(path):
        pytest.skip(f"this CPU has no {path} path")
    out = run_path(path)
    assert out["dot"] == path  # the cap took: the path under test is the one that ran
    print(f"\n[quantized activations, {path}] worst relative error vs reference: {out['worst']}")
    for name, err in out["worst"].items():
        # references sum in fp64; the kernels' fp32 block scaling and accumulation leave ~1e-7 relative.
        # The fast MoE requantizes its SwiGLU output: where the reference's fp64 value and the kernel's fp32
        # value of an element straddle a rounding boundary, that code differs by one step (1/127 of its
        # block's largest value), which moves the output by ~1e-4.
        assert err < (2e-3 if name == "moe2" else 2e-5), (name, err)


@needs_native
def test_avx2_and_vnni_give_the_same_bits():
    if not has_path("vnni"):
        pytest.skip("this CPU has no VNNI path to compare with AVX2")
    assert run_path("avx2")["outputs"] == run_path("vnni")["outputs"]


def test_references_quantize_as_documented():
    x = torch.randn(4, 96) * 3
    q, d = R.quantize_q8(x)
    assert q.abs().max() <= 127
    err = (R.dequant_q8(q, d) - x).abs().unflatten(-1, (-1, 32))
    assert (err <= d.unsqueeze(-1) / 2 * (1 + 1e-6)).all()  # rounding to nearest: half a step at most
    # e4m3: values that are e4m3 numbers times a power-of-two scale come back unchanged
    vals = torch.tensor([448.0, -256.0, 1.75, 0.015625, 0.001953125, 0.0, -3.5] + [1.0] * 121)
    assert torch.equal(R.act_quant_e4m3(vals[None]), vals[None])
    y = R.act_quant_e4m3(torch.tensor([[448.0] + [0.3] * 127]))
    assert y[0, 1].item() == 0.3125  # 0.3 -> nearest e4m3 (5/16) at scale 1


def test_numerics_names():
    assert code("fast") == FAST and code(FAST) == FAST
    with pytest.raises(ValueError, match="unknown numerics 'quick'"):
        code("quick")


@needs_native
def test_numerics_reach_fused_layers_and_match_their_definition(checkpoints, monkeypatch):
    """An official-format model (FP8 dense, FP4 experts) in each mode: every quantized layer, the fused
    projections included, runs the mode set. `reference` equals the exact model with DeepSeek's activation
    quantization applied by the plain-torch reference before every FP8 linear and inside every FP4 MoE;
    `fast` stays near exact (int8 activations per 32: ~1% per product). Unknown modes fail before loading."""
    import moeflash.model.moe as moe_module
    from moeflash.engine.load import load_model
    from moeflash.kernels.linear import Fp8Linear

    model, _ = load_model(checkpoints["official"], dtype="float32")
    ids = torch.randint(0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    out = {}
    for mode in ("exact", "reference", "fast"):
        set_numerics(model, mode)
        assert numerics_of(model) == mode
        fused = [fn for m in model.modules() for v in vars(m).values() for fn, _ in getattr(v, "calls", ()) or ()
                 if isinstance(fn, Fp8Linear)]
        assert fused and all(f.numerics == code(mode) for f in fused)
        with torch.inference_mode():
            out[mode] = model(ids[None])[0]

    def rel(a, b):
        return ((a - b).norm(dim=-1) / b.norm(dim=-1)).median().item()

    assert 0 < rel(out["fast"], out["exact"]) < 0.05
    assert (out["fast"].argmax(-1) == out["exact"].argmax(-1)).float().mean() >= 0.9
    # the reference numerics, spelled out with the plain-torch pieces
    set_numerics(model, "exact")
    monkeypatch.setattr(Fp8Linear, "forward", lambda self, x: K.fp8_linear(R.act_quant_e4m3(x), self.qweight, self.scale))
    monkeypatch.setattr(moe_module, "moe_fp4", lambda *a: R.moe_fp4(*a[:8], 1))
    with torch.inference_mode():
        spelled = model(ids[None])[0]
    assert rel(out["reference"], spelled) < 1e-4 < rel(out["reference"], out["exact"])
    with pytest.raises(ValueError, match="unknown numerics"):
        load_model(checkpoints["official"], dtype="float32", numerics="quick")


@needs_native
def test_fast_smollm2_is_batch_invariant_in_the_engine():
    """SmolLM2's packed Q4_1 file under `fast`: two prompts generated together give the tokens each gives
    alone (the integer kernels' outputs do not depend on the batch)."""
    from moeflash.engine import LLMEngine, SamplingParams
    from moeflash.engine.load import load_model

    model, tok = load_model("smollm2", dtype="float32", numerics="fast")
    assert numerics_of(model) == "fast"
    prompts = [tok.encode("The capital of France is", add_bos=True), tok.encode("def fibonacci(n):", add_bos=True)]
    params = SamplingParams(max_tokens=12, temperature=0.0)

    def generate(batch):
        eng = LLMEngine(model)
        return [r.token_ids for r in eng.generate(batch, params)]

    together = generate(prompts)
    assert together == [generate([p])[0] for p in prompts]


def test_cli_takes_numerics(capsys):
    from moeflash.cli import main

    assert main(["generate", "--model", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--numerics",
                 "fast", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"]
    with pytest.raises(SystemExit):
        main(["generate", "--model", "tiny", "--prompt-ids", "1", "--numerics", "quick"])
