"""FP8 / FP4 decode is exact, encode rounds to nearest with power-of-two scales, files keep the bits."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeflash.weights.quant import (
    E2M1_VALUES, dequant_fp4, dequant_fp8, pack_fp4, quant_fp4, quant_fp8, scale_multiplier, unpack_fp4,
)


def e8m0(*bytes_):
    return torch.tensor(bytes_, dtype=torch.uint8).view(torch.float8_e8m0fnu)


def all_e4m3():
    """Every finite e4m3 value (0x7F / 0xFF are NaN), as float8."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    return codes.view(torch.float8_e4m3fn)


def test_torch_has_the_float8_dtypes():
    assert torch.float8_e8m0fnu.itemsize == 1 and torch.float8_e4m3fn.itemsize == 1
    # e8m0 is a pure exponent: byte b == 2**(b-127), 255 is NaN
    got = scale_multiplier(e8m0(0, 1, 126, 127, 128, 254, 255))
    want = torch.tensor([2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127, float("nan")])
    assert torch.equal(got[:-1], want[:-1]) and got[-1].isnan()
    # the same bytes as uint8 mean the same; a float scale is the multiplier itself (HF weight_scale_inv)
    assert torch.equal(scale_multiplier(e8m0(3, 130).view(torch.uint8)), torch.tensor([2.0**-124, 8.0]))
    assert torch.equal(scale_multiplier(torch.tensor([0.25, 3.0])), torch.tensor([0.25, 3.0]))
    with pytest.raises(TypeError, match="UE8M0"):
        scale_multiplier(torch.tensor([1], dtype=torch.int32))


def test_dequant_fp8_hand_example_with_partial_blocks():
    # weight [3, 5] with 2x2 blocks -> scale grid [2, 3]; last block row/col are partial
    w = torch.arange(15, dtype=torch.float32).view(3, 5).to(torch.float8_e4m3fn)  # 0..14 exact in e4m3
    s = e8m0(127, 128, 126, 129, 125, 127).view(2, 3)  # x1 x2 x0.5 / x4 x0.25 x1
    mult = torch.tensor([[1, 1, 2, 2, 0.5], [1, 1, 2, 2, 0.5], [4, 4, 0.25, 0.25, 1]])
    assert torch.equal(dequant_fp8(w, s, block=2), torch.arange(15.0).view(3, 5) * mult)
    # uint8 bits are accepted as e4m3
    assert torch.equal(dequant_fp8(w.view(torch.uint8), s, block=2), dequant_fp8(w, s, block=2))


def test_dequant_fp8_default_blocks_match_a_loop():
    torch.manual_seed(0)
    w = torch.randn(130, 260).to(torch.float8_e4m3fn)
    s = torch.randint(120, 135, (2, 3), dtype=torch.uint8)
    got = dequant_fp8(w, s.view(torch.float8_e8m0fnu))
    want = w.float().clone()
    for i in range(2):
        for j in range(3):
            want[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= 2.0 ** (int(s[i, j]) - 127)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # HF convention: a float32 multiplier grid gives the same result
    assert torch.equal(dequant_fp8(w, scale_multiplier(s.view(torch.float8_e8m0fnu))), want)


def test_dequant_fp8_rejects_misshaped_scale():
    with pytest.raises(ValueError, match=r"needs \[2, 1\]"):
        dequant_fp8(torch.zeros(200, 64, dtype=torch.float8_e4m3fn), e8m0(127))


def test_fp4_nibble_order_and_scale_hand_example():
    # byte 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) is element 1
    # byte 0xF8: low nibble 8 (-0.0) is element 2, high nibble 15 (-6.0) is element 3
    packed = torch.tensor([[0x21, 0xF8 - 256]], dtype=torch.int8)
    got = dequant_fp4(packed, e8m0(128).view(1, 1))  # scale 2**(128-127) = 2
    assert torch.equal(got, torch.tensor([[1.0, 2.0, -0.0, -12.0]]))
    assert torch.signbit(got[0, 2])
    assert torch.equal(unpack_fp4(packed), torch.tensor([[1, 2, 8, 15]], dtype=torch.uint8))
    assert torch.equal(pack_fp4(unpack_fp4(packed)), packed)


def test_dequant_fp4_one_scale_per_32_inputs():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    s = torch.tensor([[127, 130], [100, 127], [140, 120]], dtype=torch.uint8)
    got = dequant_fp4(pack_fp4(codes), s.view(torch.float8_e8m0fnu))
    lut = torch.tensor(E2M1_VALUES)
    want = lut[codes.long()] * (2.0 ** (s.float() - 127)).repeat_interleave(32, dim=1)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"needs \[3, 2\]"):
        dequant_fp4(pack_fp4(codes), s[:, :1])


def test_fp8_representable_values_round_trip_bit_exactly():
    vals = all_e4m3()
    w = vals.float().view(2, -1) * 2.0**-5  # 2 x 127 values, one block, max |value| 448 -> scale 2**-5
    q, s = quant_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert s.view(torch.uint8).tolist() == [[127 - 5]]
    assert torch.equal(q.view(torch.uint8), vals.view(2, -1).view(torch.uint8))  # incl. -0.0
    assert torch.equal(dequant_fp8(q, s), w)


def test_fp4_representable_values_round_trip_bit_exactly():
    codes = torch.arange(16, dtype=torch.uint8).repeat(2).view(1, 32)  # one 32-group, max 6
    w = torch.tensor(E2M1_VALUES)[codes.long()] * 8.0
    q, s = quant_fp4(w)
    assert q.dtype == torch.int8 and s.view(torch.uint8).tolist() == [[130]]
    assert torch.equal(unpack_fp4(q), codes)
    assert torch.equal(dequant_fp4(q, s), w)


def test_fp4_rounds_to_nearest_ties_to_even():
    x = torch.tensor([0.2, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, -0.1, -2.9] + [0.0] * 19 + [6.0])
    q, s = quant_fp4(x.view(1, 32))
    assert s.view(torch.uint8).item() == 127
    got = dequant_fp4(q, s)[0, :12].tolist()
    assert got == [0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -3.0]


@pytest.mark.parametrize("shape", [(256, 384), (130, 200)])
def test_fp8_error_is_within_half_an_e4m3_step(shape):
    torch.manual_seed(1)
    w = torch.randn(shape) * torch.logspace(-3, 2, shape[1])  # blocks with very different ranges
    q, s = quant_fp8(w)
    assert tuple(s.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
    back = dequant_fp8(q, s)
    mult = scale_multiplier(s).repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    # 3 mantissa bits: relative error <= 2**-4; below e4m3's smallest normal (2**-6) the step is 2**-9
    assert ((back - w).abs() <= torch.maximum(w.abs() * 2.0**-4, mult * 2.0**-10)).all()
    # the scale is the smallest power of two that fits: every block's scaled max lies in (224, 448]
    scaled = torch.nn.functional.pad((w / mult).abs(), (0, -shape[1] % 128, 0, -shape[0] % 128))
    block_max = scaled.view(s.shape[0], 128, s.shape[1], 128).amax(dim=(1, 3))
    assert ((block_max > 224) & (block_max <= 448)).all()
    rel = ((back - w).norm() / w.norm()).item()
    assert 0.005 < rel < 0.04


def test_fp4_error_is_within_half_an_e2m1_step():
    torch.manual_seed(2)
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 96)
    q, s = quant_fp4(w)
    assert q.shape == (64, 48) and s.shape == (64, 3)
    back = dequant_fp4(q, s)
    mult = scale_multiplier(s).repeat_interleave(32, 1)
    # 1 mantissa bit: relative error <= 1/4 above 1.0 (x scale); below, the step is 0.5 (x scale)
    assert ((back - w).abs() <= torch.maximum(w.abs() / 4, mult / 4) + 1e-12).all()
    group_max = (w / mult).abs().view(64, 3, 32).amax(dim=2)
    assert ((group_max > 3) & (group_max <= 6)).all()  # smallest power-of-two scale that fits
    assert 0.05 < ((back - w).norm() / w.norm()).item() < 0.2


def test_quant_rejects_bad_inputs():
    with pytest.raises(ValueError, match="inf or NaN"):
        quant_fp8(torch.tensor([[float("inf")]]))
    with pytest.raises(ValueError, match="even"):
        quant_fp4(torch.zeros(2, 3))
    q, s = quant_fp8(torch.zeros(4, 4))  # all-zero blocks get scale 1
    assert s.view(torch.uint8).tolist() == [[127]] and not q.float().any()


def test_float8_tensors_round_trip_through_safetensors(tmp_path):
    torch.manual_seed(3)
    q8, s8 = quant_fp8(torch.randn(130, 256))
    q4, s4 = quant_fp4(torch.randn(8, 64))
    path = tmp_path / "q.safetensors"
    save_file({"a.weight": q8, "a.scale": s8, "b.weight": q4, "b.scale": s4}, str(path))
    raw = path.read_bytes()
    header = json.loads(raw[8: 8 + struct.unpack("<Q", raw[:8])[0]])
    assert {k: v["dtype"] for k, v in header.items()} == {
        "a.weight": "F8_E4M3", "a.scale": "F8_E8M0", "b.weight": "I8", "b.scale": "F8_E8M0"}
    with safe_open(str(path), framework="pt") as f:
        back = {k: f.get_tensor(k) for k in f.keys()}
    assert back["a.weight"].dtype == torch.float8_e4m3fn and back["a.scale"].dtype == torch.float8_e8m0fnu
    for k, v in {"a.weight": q8, "a.scale": s8, "b.weight": q4, "b.scale": s4}.items():
        assert torch.equal(back[k].view(torch.uint8), v.view(torch.uint8))
    assert torch.equal(dequant_fp8(back["a.weight"], back["a.scale"]), dequant_fp8(q8, s8))
    assert torch.equal(dequant_fp4(back["b.weight"], back["b.scale"]), dequant_fp4(q4, s4))
