"""Every native op has a fake kernel that agrees with the real one (torch.library.opcheck: shapes, dtypes,
strides, schema), and torch.compile traces a function calling them without a graph break."""

import pytest
import torch

from moeflash.kernels import build, native, reference
from moeflash.weights.quant import quant_fp4, quant_fp8

pytestmark = pytest.mark.skipif(not build.load(), reason="native kernels not built")

OPS = torch.ops.moeflash


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    w8, s8 = quant_fp8(r(256, 256))
    wg, sg = quant_fp8(r(256, 128))
    w4, s4 = quant_fp4(r(64, 128))
    e, inter, dim = 4, 64, 128
    w13, s13 = zip(*(quant_fp4(r(2 * inter, dim)) for _ in range(e)))
    w2, s2 = zip(*(quant_fp4(r(dim, inter)) for _ in range(e)))
    w13, s13, w2, s2 = (torch.stack(t) for t in (w13, s13, w2, s2))
    q40 = torch.randint(0, 255, (8, 18 * 4), dtype=torch.uint8, generator=g)
    q40[:, 0::18], q40[:, 1::18] = 0, 40  # fp16 scales: small, finite
    x, u8 = r(3, 128), lambda t: t.view(torch.uint8)
    cases = {
        "fp8_linear": (r(3, 256), u8(w8), s8.float()),
        "fp8_grouped_linear": (r(3, 2, 128), u8(wg), sg.float()),
        "dequant_fp8": (u8(w8), s8.float()),
        "fp4_linear": (x, u8(w4), u8(s4)),
        "fp4_linear_q8": (x, u8(w4), u8(s4)),
        "bf16_linear": (x, r(32, 128).bfloat16()),
        "gguf_linear": (x, q40, 2),
        "gguf_linear_q8": (x, q40, 2),
        "gguf_dequant": (q40, 2),
        "moe_fp4": (x, torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2, generator=g), u8(w13), u8(s13),
                    u8(w2), u8(s2), 7.0, 2),
        "sinkhorn": (r(5, 4, 4), 3, 1e-6),
        "hc_weights": (r(3, 4, 32), r(24, 128), r(24), r(3), 3, 1e-6, 1e-6),
        "attn_decode": (r(4, 64), r(8, 64), 5, r(64), r(6, 64), torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool),
                        r(4), 0.125),
        "attn_decode_batch": (r(2, 4, 64), [r(8, 64), r(8, 64).bfloat16().float()], [5, 12], r(2, 64),
                              [r(6, 64), r(0, 64)], [torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool),
                                                     torch.zeros(0, dtype=torch.bool)], r(4), 0.125),
        "gqa_decode": (r(4, 16), r(7, 2, 16), r(7, 2, 16), 0.25),
        "rope": (r(3, 4, 64), r(3, 16), r(3, 16), False),
        "rms_norm": (r(3, 128), r(128), 1e-6),
        "indexer_scores": (r(2, 16, 64), r(2, 16), r(40, 64).bfloat16()),
        "norm_rope": (r(3, 4, 64), None, r(3, 16), r(3, 16), 1e-6),
        "hc_pre": (r(3, 4, 32), r(24, 128), r(24), r(3), r(32), 3, 1e-6, 1e-6),
        "hc_post": (r(3, 4, 32), r(3, 32), r(3, 4), r(3, 4, 4)),
        "moe_gate": (r(3, 16), r(16), None, 4, 0, True, 1.5),
        "swiglu": (r(3, 64), 7.0),
        "q8_quantize": (x, 1),
        "act_quant_e4m3": (r(3, 200),),
    }
    return cases


def test_every_tensor_op_is_covered():
    """A new native op must come with a fake kernel and a case here."""
    schemas = [s for s in torch._C._jit_get_all_schemas() if s.name.startswith("moeflash::")]
    tensor_ops = {s.name.split("::")[1] for s in schemas if any("Tensor" in str(r.type) for r in s.returns)}
    assert tensor_ops == set(_cases())


@pytest.mark.parametrize("name", sorted(_cases()))
def test_fake_kernel_agrees_with_the_native_op(name):
    torch.library.opcheck(getattr(OPS, name).default, _cases()[name],
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_traces_native_ops_in_one_graph():
    """fullgraph=True fails on a graph break: the ops must be traceable, and the result the eager one."""
    assert native(torch.zeros(1))
    w4, s4 = quant_fp4(torch.randn(64, 128))
    weight = torch.randn(128)

    def f(x):
        h = OPS.rms_norm(torch.nn.functional.silu(x) * 2.0, weight, 1e-6)
        return OPS.fp4_linear_q8(h, w4.view(torch.uint8), s4.view(torch.uint8)).relu() + 1.0

    x = torch.randn(2, 128)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, dynamic=False)(x)
    assert torch.equal(got, f(x))
    assert torch.allclose(got, reference.fp4_linear_q8(reference_rms(x, weight), w4, s4).relu() + 1.0,
                          rtol=1e-4, atol=1e-4)


def reference_rms(x, weight):
    h = torch.nn.functional.silu(x) * 2.0
    return weight * (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6))
