"""A linear layer whose weight stays FP8 e4m3 with 128x128 block scales, as the official checkpoint holds it.

Why: the weight is read at 1 byte per element on every call instead of 2 (bf16) or 4 (fp32) bytes, and
the product accumulates in fp32 (kernels.fp8_linear). Buffers, not parameters: `qweight` (uint8 bits of
e4m3, so dtype casts of the model leave it alone) and `scale` (fp32 multipliers); `model.to(device)`
moves both.
"""

from __future__ import annotations

import torch
from torch import nn

from . import act_quant_e4m3, bf16_linear, decode_rows, dequant_fp8, fp8_linear, gguf_dequant, gguf_linear
from .numerics import EXACT, FAST, REFERENCE
from .reference import GGUF_BLOCK_BYTES, GGUF_BLOCK_VALUES

FP8_BLOCK = 128


def _fuse_rows(mods: list, name: str, make) -> nn.Module:
    """One layer `make(buffer)` over the row-wise concatenation of the modules' buffer `name`; each
    module's buffer becomes a view of its rows in the fused one (Bf16Linear, GgufLinear)."""
    fused = make(torch.cat([getattr(m, name) for m in mods]))
    start = 0
    for m in mods:
        setattr(m, name, getattr(fused, name)[start:start + m.out_features])
        start += m.out_features
    return fused


class Fp8Linear(nn.Module):
    numerics = EXACT  # kernels/numerics.py; REFERENCE quantizes activations as DeepSeek does first

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        out_features, in_features = qweight.shape
        want = (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK))
        if tuple(scale.shape) != want:
            raise ValueError(f"FP8 weight {tuple(qweight.shape)} needs a scale grid {want}, got {tuple(scale.shape)}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", qweight.view(torch.uint8))
        self.register_buffer("scale", scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.numerics == REFERENCE and not x.is_cuda:
            x = act_quant_e4m3(x.float()).to(x.dtype)
        if decode_rows(x):
            return torch.ops.moeflash.fp8_linear(x, self.qweight, self.scale)  # the decode fast path
        return fp8_linear(x, self.qweight, self.scale).to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded fp32 weight [out, in] (a new tensor: for export and reference paths, not decode)."""
        return dequant_fp8(self.qweight, self.scale)

    def rows(self, start: int, end: int) -> "Fp8Linear":
        """Output rows start..end (block-aligned) as a view sharing this layer's storage."""
        if start % FP8_BLOCK or (end % FP8_BLOCK and end != self.out_features):
            raise ValueError(f"rows {start}..{end} cut through {FP8_BLOCK}-row scale blocks")
        view = Fp8Linear(self.qweight[start:end], self.scale[start // FP8_BLOCK: -(-end // FP8_BLOCK)])
        view.numerics = self.numerics
        return view

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 + 128x128 scales"

    @staticmethod
    def fuse(mods: list["Fp8Linear"]) -> "Fp8Linear | None":
        """One layer computing all of `mods` (same input) at once, when their row blocks line up; the
        modules' buffers become views of the fused ones. None when they cannot be fused."""
        if len({m.in_features for m in mods}) != 1 or any(m.out_features % FP8_BLOCK for m in mods[:-1]):
            return None
        fused = Fp8Linear(torch.cat([m.qweight for m in mods]), torch.cat([m.scale for m in mods]))
        fused.numerics = mods[0].numerics
        start = 0
        for m in mods:
            view = fused.rows(start, start + m.out_features)
            m.qweight, m.scale = view.qweight, view.scale
            start += m.out_features
        return fused


class Bf16Linear(nn.Module):
    """A linear layer whose weight stays bfloat16, as the checkpoint stores it, while activations and sums
    are fp32 (kernels.bf16_linear): the same products as an fp32 model on the stored values, at half the
    bytes read. The weight is a buffer named `weight`, so state dicts keep the checkpoint's names."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if decode_rows(x):
            return torch.ops.moeflash.bf16_linear(x, self.weight)  # the decode fast path
        return bf16_linear(x, self.weight).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 weight, fp32 compute"

    @staticmethod
    def fuse(mods: list["Bf16Linear"]) -> "Bf16Linear | None":
        """One layer computing all of `mods` (same input); their buffers become views of the fused one."""
        if len({m.in_features for m in mods}) != 1:
            return None
        return _fuse_rows(mods, "weight", Bf16Linear)


class GgufLinear(nn.Module):
    """A linear layer whose weight stays in its GGUF block format (Q4_0, Q4_1, Q5_0, Q8_0, MXFP4: blocks
    of 32 weights; Q4_K, Q6_K: super-blocks of 256), as the file stores it; products in fp32 (kernels.gguf_linear) on the exact decoded
    values, or with int8 activations and integer dot products under the `fast` numerics. `qblocks` is the
    raw bytes [out, row bytes]; `qtype` the ggml type id."""

    numerics = EXACT  # kernels/numerics.py

    def __init__(self, blocks: torch.Tensor, qtype: int):
        super().__init__()
        if qtype not in GGUF_BLOCK_BYTES:
            raise ValueError(f"ggml type {qtype} is not held packed (Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q8_0 = 8, "
                             "Q4_K = 12, Q6_K = 14, MXFP4 = 39)")
        self.qtype = qtype
        self.out_features = blocks.shape[0]
        self.in_features = GGUF_BLOCK_VALUES[qtype] * (blocks.shape[1] // GGUF_BLOCK_BYTES[qtype])
        self.register_buffer("qblocks", blocks.view(torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.numerics == FAST:
            if decode_rows(x):  # int8 activations
                return torch.ops.moeflash.gguf_linear_q8(x, self.qblocks, self.qtype)
            return gguf_linear(x, self.qblocks, self.qtype, FAST).to(x.dtype)
        if decode_rows(x):
            return torch.ops.moeflash.gguf_linear(x, self.qblocks, self.qtype)  # the decode fast path
        return gguf_linear(x, self.qblocks, self.qtype).to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return gguf_dequant(self.qblocks, self.qtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ggml type {self.qtype}"

    @staticmethod
    def fuse(mods: list["GgufLinear"]) -> "GgufLinear | None":
        """One layer for several of the same type and input; their buffers become views of the fused one."""
        if len({(m.qtype, m.in_features) for m in mods}) != 1:
            return None
        fused = _fuse_rows(mods, "qblocks", lambda blocks: GgufLinear(blocks, mods[0].qtype))
        fused.numerics = mods[0].numerics
        return fused
