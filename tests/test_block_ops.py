"""The fused block ops (native/block_ops.cpp) against their plain-torch references, and the V4 decode step
they make against the readable model (every kernel on its plain-torch reference), token for token."""

import pytest
import torch

from moeflash import kernels as K
from moeflash.engine.forward import run_tokens
from moeflash.engine.load import load_model
from moeflash.kernels import build, reference

pytestmark = pytest.mark.skipif(not build.load(), reason="native kernels not built")
OPS = torch.ops.moeflash


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# T = 640 rows of 4 x 128 streams crosses the size past which the ops spread rows over threads
@pytest.mark.parametrize("t,d", [(1, 64), (5, 96), (640, 128)])
def test_hc_pre_and_hc_post_equal_the_reference(t, d):
    n = 4
    x, fn, base, scale, w = _rand(t, n, d), _rand(n * (n + 2), n * d, seed=1) * 0.1, _rand(n * (n + 2), seed=2), \
        _rand(3, seed=3), _rand(d, seed=4)
    h, post, comb = OPS.hc_pre(x, fn, base, scale, w, 3, 1e-6, 1e-6)
    rh, rpost, rcomb = reference.hc_pre(x, fn, base, scale, w, 3, 1e-6, 1e-6)
    torch.testing.assert_close(h, rh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post, rpost, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb, rcomb, rtol=1e-5, atol=1e-6)
    y = _rand(t, d, seed=5)
    torch.testing.assert_close(OPS.hc_post(x, y, post, comb), reference.hc_expand(x, y, post, comb),
                               rtol=1e-5, atol=1e-5)


def test_hc_post_rows_do_not_depend_on_the_batch():
    x, y, post, comb = _rand(6, 4, 64), _rand(6, 64, seed=1), _rand(6, 4, seed=2), _rand(6, 4, 4, seed=3)
    full = OPS.hc_post(x, y, post, comb)
    for t in range(6):
        assert torch.equal(OPS.hc_post(x[t:t + 1], y[t:t + 1], post[t:t + 1], comb[t:t + 1])[0], full[t])


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("m,dim,half", [(1, 64, 8), (8, 64, 32), (3, 40, 4)])
def test_norm_rope_equals_the_reference(weighted, m, dim, half):
    x, cos, sin = _rand(5, m, dim), _rand(5, half, seed=1), _rand(5, half, seed=2)
    w = _rand(dim, seed=3) if weighted else None
    got = OPS.norm_rope(x, w, cos, sin, 1e-6)
    torch.testing.assert_close(got, reference.norm_rope(x, w, cos, sin, 1e-6), rtol=1e-5, atol=1e-5)
    assert torch.equal(OPS.norm_rope(x[2:3], w, cos[2:3], sin[2:3], 1e-6)[0], got[2])  # batch invariance


def test_norm_rope_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="rotated dims exceed"):
        OPS.norm_rope(_rand(2, 1, 8), None, _rand(2, 8), _rand(2, 8), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be float32"):
        OPS.norm_rope(_rand(2, 1, 8), _rand(4), _rand(2, 2), _rand(2, 2), 1e-6)


@pytest.mark.parametrize("func", reference.GATE_FUNCS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("routing", ["bias", "plain", "hash"])
def test_moe_gate_equals_the_reference(func, normalize, routing):
    n, e, k = 7, 48, 6
    logits = _rand(n, e) * 4
    logits[0, :3] = torch.tensor([25.0, -30.0, 21.0])  # past softplus's threshold of 20: its linear branch
    bias = _rand(e, seed=1) * 0.3 if routing == "bias" else None
    hashed = torch.randint(0, e, (n, k), generator=torch.Generator().manual_seed(2)) if routing == "hash" else None
    w, idx = OPS.moe_gate(logits, bias, hashed, k, reference.GATE_FUNCS.index(func), normalize, 1.5)
    rw, ridx = reference.moe_gate(logits, bias, hashed, k, func, normalize, 1.5)
    assert torch.equal(idx, ridx)  # highest first, as topk's sorted order
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32


def test_moe_gate_breaks_ties_to_the_lower_id_and_checks_hash_ids():
    logits = torch.zeros(2, 8)
    logits[1, 5] = logits[1, 2] = 1.0
    _, idx = OPS.moe_gate(logits, None, None, 3, 1, True, 1.0)
    assert idx.tolist() == [[0, 1, 2], [2, 5, 0]]
    with pytest.raises(RuntimeError, match="hash id lies outside"):
        OPS.moe_gate(logits, None, torch.tensor([[0, 9, 1], [0, 1, 2]]), 3, 0, True, 1.0)
    with pytest.raises(RuntimeError, match="k must lie in"):
        OPS.moe_gate(logits, None, None, 9, 0, True, 1.0)


@pytest.mark.parametrize("limit", [0.0, 0.5])
def test_swiglu_equals_the_reference(limit):
    h = _rand(5, 2 * 96) * 2
    got = OPS.swiglu(h, limit)
    torch.testing.assert_close(got, reference.swiglu(h, limit), rtol=1e-6, atol=1e-6)
    assert torch.equal(OPS.swiglu(h[3:4], limit)[0], got[3])


def test_wrappers_fall_back_off_fp32_and_under_autograd():
    """bf16 streams and tensors that need a gradient take the composition of the unfused ops."""
    x, fn, base, scale, w = _rand(2, 4, 32).bfloat16(), _rand(24, 128), _rand(24), _rand(3), _rand(32)
    h, _, _ = K.hc_pre(x, fn, base, scale, w, 3, 1e-6, 1e-6)
    assert h.dtype == torch.bfloat16
    y = _rand(3, 2 * 16).requires_grad_()
    K.swiglu(y, 0.0).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


# -- the decode step: fused ops against the readable model ------------------------------------------------
PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 87, 111, 114], [256, 33, 44, 55, 66, 77, 88, 99, 100]]


def _decode(model, steps: int):
    """Three sequences prefilled, then `steps` batched greedy decode steps: (tokens, logits of every step)."""
    states = [model.new_seq_state() for _ in PROMPTS]
    x = run_tokens(model, torch.tensor(sum(PROMPTS, [])), states, [len(p) for p in PROMPTS])
    rows = torch.tensor([len(p) for p in PROMPTS]).cumsum(0) - 1
    lg = model.logits(x[rows]).float()
    toks, logits = [lg.argmax(-1).tolist()], [lg]
    for _ in range(steps):
        x = run_tokens(model, torch.tensor(toks[-1]), states, [1] * len(PROMPTS))
        lg = model.logits(x).float()
        toks.append(lg.argmax(-1).tolist())
        logits.append(lg)
    return toks, torch.stack(logits)


@pytest.mark.parametrize("kind", ["official", "plain"])
def test_fused_decode_step_equals_the_reference_model(checkpoints, kind):
    with torch.inference_mode():
        model, _ = load_model(checkpoints[kind], "float32")
        with torch.profiler.profile() as prof:
            fused_tokens, fused_logits = _decode(model, 12)
        calls = {e.key: e.count for e in prof.key_averages()}
        layers = model.config.num_hidden_layers
        # the fused ops ran: two mHC sites a layer, a query and a key rotation, a router
        assert calls.get("moeflash::hc_pre", 0) >= 2 * layers * 13
        assert calls.get("moeflash::hc_post", 0) >= 2 * layers * 13
        assert calls.get("moeflash::norm_rope", 0) >= 2 * layers * 13
        assert calls.get("moeflash::moe_gate", 0) >= layers * 13
        saved = list(K._NATIVE)
        K._NATIVE[:] = [False]  # the readable model: every op its plain-torch reference
        try:
            ref_tokens, ref_logits = _decode(model, 12)
        finally:
            K._NATIVE[:] = saved
    assert fused_tokens == ref_tokens
    torch.testing.assert_close(fused_logits, ref_logits, rtol=1e-4, atol=1e-4)


# -- every instruction-set path gives the same bits ----------------------------------------------------------
PATHS_CHECK = r"""
import hashlib, json, torch
from moeflash.kernels import build
build.load()
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g)
O, h = torch.ops.moeflash, hashlib.sha256()
for t, n, d in [(1, 4, 768), (3, 4, 100), (16, 2, 37)]:
    x, fn, base, scale, w = r(t, n, d), r(n * (n + 2), n * d) * 0.05, r(n * (n + 2)), r(3), r(d)
    for out in (*O.hc_weights(x, fn, base, scale, 20, 1e-6, 1e-6), *O.hc_pre(x, fn, base, scale, w, 20, 1e-6, 1e-6),
                O.hc_post(x, r(t, d), r(t, n), r(t, n, n)), O.rms_norm(x, w, 1e-6)):
        h.update(out.numpy().tobytes())
for m, dim, half in [(8, 64, 32), (1, 128, 32), (3, 37, 4)]:
    x, cs, sn = r(4, m, dim), r(4, half), r(4, half)
    for w in (None, r(dim)):
        h.update(O.norm_rope(x, w, cs, sn, 1e-6).numpy().tobytes())
print(json.dumps({"isa": O.isa(), "sha256": h.hexdigest()}))
"""


def test_every_instruction_set_path_gives_the_same_bits():
    """Fixed lanes and no FMA contraction: the scalar, AVX2 and AVX-512 builds of the block ops agree bit for bit
    (each runs in its own process: the path is chosen once per process)."""
    import json
    import os
    import subprocess
    import sys

    from .cpu import cpu_flags

    flags = cpu_flags()
    paths = ["scalar"] + (["avx2"] if {"avx2", "fma", "f16c"} <= flags else []) + \
        (["avx512"] if {"avx512f", "avx512bw", "avx512vl"} <= flags else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = {}
    for isa in paths:
        r = subprocess.run([sys.executable, "-c", PATHS_CHECK], env={**os.environ, "MOEFLASH_ISA": isa}, cwd=root,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["isa"] == isa
        digests[isa] = out["sha256"]
    assert len(set(digests.values())) == 1, digests


# -- decode attention over several sequences in one call ------------------------------------------------------
@pytest.mark.parametrize("records", [torch.float32, torch.bfloat16])
def test_attn_decode_batch_equals_one_call_per_sequence_and_writes_the_rings(records):
    h, d, w = 8, 64, 16
    pos, counts = [0, 3, 40, 700], [0, 5, 9, 0]  # an empty ring, a partial one, wrapped ones; with and without entries
    q, kv, sink = _rand(4, h, d), _rand(4, d, seed=1), _rand(h, seed=2)
    wins = [_rand(w, d, seed=10 + b).to(records) for b in range(4)]
    ents = [_rand(t, d, seed=20 + b).to(records) for b, t in enumerate(counts)]
    valids = [torch.rand(t, generator=torch.Generator().manual_seed(30 + b)) < 0.7 for b, t in enumerate(counts)]
    before = [x.clone() for x in wins]
    got = OPS.attn_decode_batch(q, wins, pos, kv, ents, valids, sink, d ** -0.5)
    for b in range(4):
        want = reference.attn_decode(q[b], before[b], pos[b], kv[b], ents[b], valids[b], sink, d ** -0.5)
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
        one = OPS.attn_decode(q[b], before[b], pos[b], kv[b], ents[b], valids[b], sink, d ** -0.5)
        assert torch.equal(one, got[b])  # the same arithmetic whatever the batch
        ring = before[b].clone()
        ring[pos[b] % w] = kv[b].to(records)  # torch's cast: the op rounds the new key as torch does
        assert torch.equal(wins[b], ring)


def test_attn_decode_batch_rejects_mismatched_lists():
    with pytest.raises(RuntimeError, match="one window, position"):
        OPS.attn_decode_batch(_rand(2, 4, 16), [_rand(8, 16)], [1, 2], _rand(2, 16), [_rand(0, 16)] * 2,
                              [torch.zeros(0, dtype=torch.bool)] * 2, _rand(4), 0.25)
    with pytest.raises(RuntimeError, match="windows must be float32 or bfloat16"):
        OPS.attn_decode_batch(_rand(1, 4, 16), [_rand(8, 16).half()], [1], _rand(1, 16), [_rand(0, 16)],
                              [torch.zeros(0, dtype=torch.bool)], _rand(4), 0.25)
