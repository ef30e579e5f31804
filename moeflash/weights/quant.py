"""FP8 / FP4 weight formats of the official DeepSeek-V4 checkpoints: exact decode, and encoders.

Formats (V4-SPEC 5.3):
- FP8 linear: weight e4m3 [out, in], scale [ceil(out/128), ceil(in/128)], one scale per 128x128 block.
- FP4 routed expert: weight int8 [out, in/2], two e2m1 codes per byte (element 2k in the LOW nibble,
  2k+1 in the HIGH nibble), scale [out, ceil(in/32)], one scale per 32 consecutive inputs of a row.

A scale tensor comes in one of two conventions, told apart by its dtype:
- UE8M0 exponent bytes (`torch.float8_e8m0fnu`, or `torch.uint8` holding the same bytes): the official
  `.scale` tensors. Byte b means the multiplier 2**(b - 127); b = 255 is NaN.
- a floating dtype (float32 / bfloat16 / float16): the multiplier itself, as in Hugging Face's
  `weight_scale_inv` (W = q * scale_inv blockwise; the "inv" is the inverse of the quantizer's scale).
Decoding is exact: e4m3 and e2m1 values times a power of two are representable in float32.
"""

from __future__ import annotations


import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
FP8_BLOCK = 128
FP4_GROUP = 32

# e2m1 code -> value; bit 3 is the sign, so code 8 is -0.0.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between consecutive non-negative e2m1 magnitudes (used to round to nearest).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

_EXPONENT_DTYPES = (torch.float8_e8m0fnu, torch.uint8)


def fp8_scale_shape(out: int, in_: int, block: int = FP8_BLOCK) -> tuple[int, int]:
    """Scale grid of an FP8 weight [out, in]: one entry per (partial) block x block tile."""
    return (-(-out // block), -(-in_ // block))


def fp4_scale_shape(out: int, in_: int, group: int = FP4_GROUP) -> tuple[int, int]:
    """Scale grid of an FP4 weight with logical shape [out, in]: one entry per `group` inputs of a row."""
    return (out, -(-in_ // group))


def scale_multiplier(scale: torch.Tensor) -> torch.Tensor:
    """Return the float32 multipliers a scale tensor stands for (see the module docstring)."""
    if scale.dtype in _EXPONENT_DTYPES:
        b = scale.view(torch.uint8).to(torch.int32)
        m = torch.ldexp(torch.ones(b.shape, dtype=torch.float32, device=b.device), b - 127)
        return torch.where(b == 255, torch.full_like(m, float("nan")), m)
    if scale.dtype.is_floating_point:
        return scale.to(torch.float32)
    raise TypeError(
        f"scale has dtype {scale.dtype}; expected UE8M0 exponent bytes (torch.float8_e8m0fnu or "
        "torch.uint8) or a floating multiplier (float32/bfloat16/float16)"
    )


def _expand(mult: torch.Tensor, rows: int, cols: int, rblock: int, cblock: int) -> torch.Tensor:
    """Repeat each scale over its tile and crop to [..., rows, cols] (last tiles may be partial)."""
    m = mult
    if rblock > 1:
        m = m.repeat_interleave(rblock, dim=-2)
    if cblock > 1:
        m = m.repeat_interleave(cblock, dim=-1)
    return m[..., :rows, :cols]


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Decode an FP8 block-quantized weight [..., out, in] to float32.

    weight: float8_e4m3fn, or uint8 holding e4m3 bits. scale: [..., ceil(out/block), ceil(in/block)].
    """
    if weight.dtype == torch.uint8:
        weight = weight.view(torch.float8_e4m3fn)
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"FP8 weight has dtype {weight.dtype}; expected torch.float8_e4m3fn (or uint8 bits)")
    out, in_ = weight.shape[-2:]
    want = (*weight.shape[:-2], *fp8_scale_shape(out, in_, block))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"FP8 scale has shape {list(scale.shape)} but a weight of shape {list(weight.shape)} with "
            f"{block}x{block} blocks needs {list(want)}"
        )
    mult = _expand(scale_multiplier(scale), out, in_, block, block)
    return weight.to(torch.float32) * mult


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Split packed bytes [..., n] into e2m1 codes [..., 2n] (uint8): low nibble first, then high."""
    if packed.dtype not in (torch.int8, torch.uint8, torch.float4_e2m1fn_x2):
        raise TypeError(f"FP4 weight has dtype {packed.dtype}; expected int8/uint8 with two e2m1 codes per byte")
    b = packed.view(torch.uint8)
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1)
    return codes.reshape(*b.shape[:-1], 2 * b.shape[-1])


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack e2m1 codes [..., 2n] (0..15) into int8 bytes [..., n]; inverse of `unpack_fp4`."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of FP4 codes per row ({codes.shape[-1]})")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, group: int = FP4_GROUP) -> torch.Tensor:
    """Decode an FP4 weight, packed [..., out, in/2] with scale [..., out, ceil(in/group)], to float32."""
    codes = unpack_fp4(packed)
    out, in_ = codes.shape[-2:]
    want = (*codes.shape[:-2], *fp4_scale_shape(out, in_, group))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"FP4 scale has shape {list(scale.shape)} but a packed weight of shape {list(packed.shape)} "
            f"(logical [{out}, {in_}]) with one scale per {group} inputs needs {list(want)}"
        )
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mult = _expand(scale_multiplier(scale), out, in_, 1, group)
    return lut[codes.long()] * mult


def _pow2_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest e with amax <= qmax * 2**e (so the block fits after dividing by 2**e), as int32.

    All-zero blocks get e = 0. e is clamped to [-127, 127], the range of a UE8M0 byte.
    """
    a = amax.to(torch.float64)
    if not torch.isfinite(a).all():
        raise ValueError("cannot quantize a tensor that contains inf or NaN")
    e = torch.ceil(torch.log2(a / qmax)).nan_to_num(0.0, neginf=0.0)
    e = torch.where(a > qmax * torch.exp2(e), e + 1, e)  # log2 rounding may be off by one
    e = torch.where(a <= qmax * torch.exp2(e - 1), e - 1, e)
    e = torch.where(a == 0, torch.zeros_like(e), e)
    if (e > 127).any():
        raise ValueError(f"values too large for a UE8M0 scale (need 2**{int(e.max())}; the limit is 2**127)")
    return e.clamp(-127, 127).to(torch.int32)


def _e8m0(e: torch.Tensor) -> torch.Tensor:
    return (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, cols - x.shape[-1], 0, rows - x.shape[-2]))


def quant_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode w [out, in] as (float8_e4m3fn [out, in], float8_e8m0fnu scale [ceil(out/b), ceil(in/b)]).

    Each block gets the smallest power-of-two scale that keeps its values within +-448; values are
    rounded to the nearest e4m3 (ties to even, torch's cast).
    """
    if w.dim() != 2:
        raise ValueError(f"quant_fp8 expects a 2-D weight [out, in], got shape {list(w.shape)}")
    x = w.to(torch.float32).contiguous()
    out, in_ = x.shape
    ob, ib = fp8_scale_shape(out, in_, block)
    tiles = _pad_to(x, ob * block, ib * block).view(ob, block, ib, block)
    e = _pow2_exponent(tiles.abs().amax(dim=(1, 3)), E4M3_MAX)
    q = torch.ldexp(x, -_expand(e, out, in_, block, block))
    q = q.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, _e8m0(e)


def _e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code of each float (ties to even mantissa), sign kept (also for -0.0)."""
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=q.dtype, device=q.device)
    mag = q.abs()
    idx = torch.bucketize(mag, mids, right=False)  # mids[idx-1] < mag <= mids[idx]
    tie = (idx < len(_E2M1_MIDPOINTS)) & (mag == mids[idx.clamp(max=len(_E2M1_MIDPOINTS) - 1)]) & (idx % 2 == 1)
    idx = idx + tie.to(idx.dtype)
    return (idx | (torch.signbit(q).to(idx.dtype) << 3)).to(torch.uint8)


def quant_fp4(w: torch.Tensor, group: int = FP4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode w [out, in] as (int8 packed [out, in/2], float8_e8m0fnu scale [out, ceil(in/group)]).

    Each group of `group` inputs in a row gets the smallest power-of-two scale that keeps its values
    within +-6; values are rounded to the nearest e2m1 (ties to even).
    """
    if w.dim() != 2:
        raise ValueError(f"quant_fp4 expects a 2-D weight [out, in], got shape {list(w.shape)}")
    x = w.to(torch.float32).contiguous()
    out, in_ = x.shape
    if in_ % 2:
        raise ValueError(f"FP4 packs two inputs per byte, so `in` must be even (got {in_})")
    ng = fp4_scale_shape(out, in_, group)[1]
    groups = _pad_to(x, out, ng * group).view(out, ng, group)
    e = _pow2_exponent(groups.abs().amax(dim=2), E2M1_MAX)
    q = torch.ldexp(x, -_expand(e, out, in_, 1, group))
    return pack_fp4(_e2m1_codes(q)), _e8m0(e)


__all__ = [
    "E4M3_MAX", "E2M1_MAX", "FP8_BLOCK", "FP4_GROUP", "E2M1_VALUES",
    "fp8_scale_shape", "fp4_scale_shape", "scale_multiplier",
    "dequant_fp8", "dequant_fp4", "quant_fp8", "quant_fp4", "pack_fp4", "unpack_fp4",
]


def quant_q8_0(w: torch.Tensor) -> torch.Tensor:
    """Encode w [out, in] (in a multiple of 32) as ggml Q8_0 blocks [out, in / 32 * 34]: per 32 inputs an
    fp16 d = amax / 127 and int8 q = round(w / d), ties to even (ggml's quantizer, computed in fp32)."""
    if w.dim() != 2 or w.shape[1] % 32:
        raise ValueError(f"Q8_0 needs a 2-D weight whose inputs are a multiple of 32, got {list(w.shape)}")
    x = w.float().reshape(w.shape[0], -1, 32)
    amax = x.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(x * inv).clamp(-127, 127).to(torch.int8)
    blocks = torch.cat((d.half().view(torch.uint8).reshape(*d.shape[:-1], 2), q.view(torch.uint8)), dim=-1)
    return blocks.reshape(w.shape[0], -1).contiguous()
