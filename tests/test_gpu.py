"""The GPU half, as tests: skipped with a reason where torch sees no CUDA GPU (everything device-independent is
checked on the CPU in tests/test_device.py). On a GPU machine they run the same checks as bench/gpu_check.py's
`kernel_checks`, `parity` and `tiers` sections at small sizes (that script also measures speed)."""

from __future__ import annotations

import pytest
import torch

from moeflash.devices import move_model
from moeflash.engine.forward import advance, run_tokens
from moeflash.engine.load import load_model
from moeflash.weights.build import build_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU here: the GPU half runs where one is (bench/gpu_check.sh)")
CUDA = torch.device("cuda")
PROMPT = [256] + list(range(60, 90))


@pytest.fixture
def official(checkpoints):
    return checkpoints["official"]


def run(model, steps: int, graphs: bool):
    from moeflash.engine.graphs import GraphDecoder

    dev = model.embed.weight.device
    dec = GraphDecoder(model, 1, len(PROMPT) + steps + 8) if graphs else None
    st = model.new_seq_state()
    out = []
    with torch.inference_mode():
        x = run_tokens(model, torch.tensor(PROMPT, device=dev), [st], [len(PROMPT)])
        for _ in range(steps):
            lg = model.logits(x[-1:]).float()
            out.append(lg[0].cpu())
            ids = lg.argmax(-1)
            if dec is not None:
                x = dec.decode([st], ids)
                advance([st], [1])
            else:
                x = run_tokens(model, ids, [st], [1])
    return torch.stack(out)


def test_triton_kernels_equal_the_references_on_the_gpu():
    from moeflash import kernels
    from moeflash.kernels import reference
    from moeflash.weights.quant import quant_fp4, quant_fp8

    g = torch.Generator(device="cuda").manual_seed(0)
    q, s = quant_fp8(torch.randn(384, 512, device=CUDA, generator=g) * 0.05)
    for rows in (1, 7, 64, 100):
        x = torch.randn(rows, 512, device=CUDA, generator=g)
        got, want = kernels.fp8_linear(x, q.view(torch.uint8), s), reference.fp8_linear(x, q.view(torch.uint8), s)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    e, d, inter = 8, 256, 128
    qs = [quant_fp4(torch.randn(2 * inter, d, device=CUDA, generator=g) * 0.05) for _ in range(e)]
    q13, s13 = (torch.stack([t[i].view(torch.uint8) for t in qs]) for i in (0, 1))
    qs = [quant_fp4(torch.randn(d, inter, device=CUDA, generator=g) * 0.05) for _ in range(e)]
    q2, s2 = (torch.stack([t[i].view(torch.uint8) for t in qs]) for i in (0, 1))
    for tokens in (1, 16, 200):  # 200 x 3 pairs: the by-expert prefill path
        x = torch.randn(tokens, d, device=CUDA, generator=g)
        idx = torch.randint(0, e, (tokens, 3), device=CUDA, generator=g)
        w = torch.rand(tokens, 3, device=CUDA, generator=g)
        got = kernels.moe_fp4(x, idx, w, q13, s13, q2, s2, 5.0)
        want = reference.moe_fp4(x, idx, w, q13, s13, q2, s2, 5.0)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graph"])
@pytest.mark.parametrize("kind", ["tiny", "official"])
def test_gpu_logits_equal_the_cpu_in_fp32(official, kind, graphs):
    cpu = build_tiny("float32") if kind == "tiny" else load_model(official, "float32")[0]
    gpu = (move_model(build_tiny("float32"), CUDA) if kind == "tiny"
           else load_model(official, "float32", device="cuda")[0])
    want, got = run(cpu, 8, False), run(gpu, 8, graphs)
    assert (got - want).abs().max() < 1e-3


def test_gpu_bf16_stays_within_bf16_of_the_cpu(official):
    want = run(load_model(official, "float32")[0], 4, False)
    got = run(load_model(official, "bfloat16", device="cuda")[0], 4, True)
    assert (got[0] - want[0]).abs().max() < 0.25 * want[0].abs().max()


@pytest.mark.parametrize("prefetch", [False, True])
def test_gpu_expert_tier_tokens_equal_all_resident(official, prefetch):
    want = run(load_model(official, "float32", device="cuda")[0], 10, False).argmax(-1)
    probe, _ = load_model(official, "float32", expert_memory=1.0)
    eb = probe.expert_store.expert_bytes
    probe.expert_store.close()
    model, _ = load_model(official, "float32", expert_memory=12 * eb / 2**30, device="cuda",
                          device_expert_memory=5 * eb / 2**30, prefetch=prefetch)
    try:
        got = run(model, 10, True).argmax(-1)  # piecewise graphs around the store's experts
        st = model.expert_store.stats()["device"]
    finally:
        model.expert_store.close()
    assert torch.equal(got, want) and st["misses"] > 0
