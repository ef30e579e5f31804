"""Run by tests/test_gpu_kernels.py in a child process with TRITON_INTERPRET=1 (the variable must be set
before Triton decorates the kernels): the GPU kernels of moeflash/kernels/gpu.py on CPU tensors, against
the plain-torch references. Prints one JSON line of relative errors."""

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from moeflash.kernels import gpu, reference  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def fp8_case(m: int, n: int, k: int, dtype: torch.dtype, g: torch.Generator) -> float:
    w = (torch.randn(n, k, generator=g) * 0.3).to(torch.float8_e4m3fn).view(torch.uint8)
    # every byte that is not NaN appears somewhere: subnormals, both zeros, the largest magnitudes
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    w.view(-1)[: codes.numel()] = codes[: w.numel()]
    s = torch.rand(-(-n // 128), -(-k // 128), generator=g) + 0.25
    x = torch.randn(m, k, generator=g).to(dtype)
    return rel(gpu.fp8_linear(x, w, s), reference.fp8_linear(x.float(), w, s))


def fp4_case(t: int, topk: int, experts: int, d: int, inter: int, limit: float, g: torch.Generator) -> float:
    q13 = torch.randint(0, 256, (experts, 2 * inter, d // 2), dtype=torch.uint8, generator=g)
    s13 = torch.randint(115, 132, (experts, 2 * inter, d // 32), dtype=torch.uint8, generator=g)
    q2 = torch.randint(0, 256, (experts, d, inter // 2), dtype=torch.uint8, generator=g)
    s2 = torch.randint(115, 132, (experts, d, inter // 32), dtype=torch.uint8, generator=g)
    s13.view(-1)[:3] = torch.tensor([0, 1, 254], dtype=torch.uint8)  # subnormal and extreme exponents
    x = torch.randn(t, d, generator=g)
    idx = torch.randint(0, experts, (t, topk), generator=g)
    idx[0, 0] = idx[-1, -1] = experts - 1  # one expert shared by several pairs
    w = torch.rand(t, topk, generator=g)
    return rel(gpu.moe_fp4(x, idx, w, q13, s13, q2, s2, limit),
               reference.moe_fp4(x, idx, w, q13, s13, q2, s2, limit))


def sinkhorn_case(shape: tuple, iters: int, g: torch.Generator) -> float:
    x = torch.randn(*shape, generator=g) * 3
    return rel(gpu.sinkhorn(x, iters, 1e-6), reference.sinkhorn(x, iters, 1e-6))


def norm_case(shape: tuple, dtype: torch.dtype, g: torch.Generator) -> float:
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = 1 + torch.randn(shape[-1], generator=g) * 0.2
    xf = x.float()
    want = (w * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6))).to(dtype)
    return rel(gpu.rms_norm(x, w, 1e-6), want)


def rope_case(n: int, heads: int, d: int, half: int, dtype: torch.dtype, inverse: bool, g: torch.Generator) -> float:
    x = torch.randn(n, heads, d, generator=g).to(dtype)
    ang = torch.randn(n, half, generator=g) * 3
    cos, sin = ang.cos(), ang.sin()
    return rel(gpu.apply_rope(x, cos[:, None, :], sin[:, None, :], inverse),
               reference.apply_rope(x, cos[:, None, :], sin[:, None, :], inverse))


def fp4_by_expert_case(dtype: torch.dtype, g: torch.Generator) -> float:
    """The prefill path (plain torch, on the CPU here): fp32 exact, bf16 within bf16's rounding."""
    e, d, inter, t, k = 4, 64, 32, 40, 2
    q13 = torch.randint(0, 256, (e, 2 * inter, d // 2), dtype=torch.uint8, generator=g)
    s13 = torch.randint(120, 128, (e, 2 * inter, d // 32), dtype=torch.uint8, generator=g)
    q2 = torch.randint(0, 256, (e, d, inter // 2), dtype=torch.uint8, generator=g)
    s2 = torch.randint(120, 128, (e, d, inter // 32), dtype=torch.uint8, generator=g)
    x = torch.randn(t, d, generator=g)
    idx = torch.randint(0, e, (t, k), generator=g)
    w = torch.rand(t, k, generator=g)
    return rel(gpu.moe_fp4_by_expert(x.to(dtype), idx, w, q13, s13, q2, s2, 4.0),
               reference.moe_fp4(x.to(dtype), idx, w, q13, s13, q2, s2, 4.0))


def hc_case(t: int, n: int, d: int, dtype: torch.dtype, g: torch.Generator) -> dict:
    """mHC on one token batch: weights, collapse and expand against the references."""
    x = torch.randn(t, n, d, generator=g).to(dtype)
    fn = torch.randn((2 + n) * n, n * d, generator=g) * 0.05
    base, scale = torch.randn((2 + n) * n, generator=g), torch.rand(3, generator=g) * 2 + 0.5
    got = gpu.hc_weights(x, fn, base, scale, 20, 1e-6, 1e-6)
    want = reference.hc_weights(x, fn, base, scale, 20, 1e-6, 1e-6)
    weights = max(rel(a, b) for a, b in zip(got, want))
    pre, post, comb = want
    collapse = rel(gpu.hc_collapse(x, pre), (pre.unsqueeze(-1) * x.float()).sum(-2).to(dtype))
    y = torch.randn(t, d, generator=g).to(dtype)
    exact = post.unsqueeze(-1) * y.float().unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), x.float())
    expand = rel(gpu.hc_expand(x, y, post, comb), exact.to(dtype))
    return {"weights": weights, "collapse": collapse, "expand": expand}


def main() -> int:
    g = torch.Generator().manual_seed(0)
    out = {
        "fp8_fp32": max(fp8_case(m, n, k, torch.float32, g) for m, n, k in
                        [(1, 256, 256), (3, 200, 300), (17, 130, 128), (40, 96, 520),
                         (2, 40, 520), (1, 32, 1024)]),  # the last two split K across programs
        "fp8_bf16": max(fp8_case(m, n, k, torch.bfloat16, g) for m, n, k in [(1, 256, 384), (5, 160, 200)]),
        "fp4": max(fp4_case(t, k, e, d, i, lim, g) for t, k, e, d, i, lim in
                   [(1, 2, 4, 64, 64, 0.0), (3, 3, 5, 96, 96, 7.0), (6, 2, 3, 128, 32, 0.5)]),
        "rms_norm_fp32": max(norm_case(s, torch.float32, g) for s in [(3, 64), (2, 5, 96), (1, 7)]),
        "rms_norm_bf16": max(norm_case(s, torch.bfloat16, g) for s in [(3, 64), (4, 160)]),
        "rope_fp32": max(rope_case(n, h, d, hf, torch.float32, inv, g) for n, h, d, hf, inv in
                         [(3, 4, 32, 4, False), (2, 1, 64, 32, True), (5, 3, 24, 8, False)]),
        "rope_bf16": max(rope_case(n, h, d, hf, torch.bfloat16, inv, g) for n, h, d, hf, inv in
                         [(3, 4, 32, 4, True), (2, 2, 64, 16, False)]),
        "fp4_by_expert_fp32": fp4_by_expert_case(torch.float32, g),
        "fp4_by_expert_bf16": fp4_by_expert_case(torch.bfloat16, g),
        "hc_fp32": {k: max(v) for k, v in zip(("weights", "collapse", "expand"), zip(*(
            hc_case(t, n, d, torch.float32, g).values() for t, n, d in [(3, 4, 64), (2, 3, 40)])))},
        "hc_bf16": hc_case(4, 4, 96, torch.bfloat16, g),
        "sinkhorn": max(sinkhorn_case(s, it, g) for s, it in [((5, 4, 4), 20), ((2, 3, 3, 3), 7), ((1, 4, 4), 1)]),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
