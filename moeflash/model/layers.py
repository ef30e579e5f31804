"""Building blocks shared by every model: RMSNorm, rotary embedding (plain + YaRN), clamped SwiGLU.

Norms and rotations run in fp32 and cast back to the activation dtype, as DeepSeek's and
transformers' implementations do, so bf16 storage does not change which tokens win.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels.linear import Bf16Linear, Fp8Linear, GgufLinear
from ..kernels.reference import clamped_swiglu  # (also imported from here by moe and engine.experts)


class Rederived:
    """For a module holding tensors derived from its weights in plain attributes (`_derived`: fused
    projections, packed experts), which `.to(device)` and dtype casts would leave behind (each weight is
    moved on its own, and views would part from their base): `_apply` drops them, moves the weights, and
    rebuilds them with `_rederive`. Put it before nn.Module in the bases."""

    _derived: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        held = any(getattr(self, name) is not None for name in self._derived)
        for name in self._derived:
            setattr(self, name, None)
        out = super()._apply(fn, recurse)
        self._rederive(held)
        return out

    def _rederive(self, held: bool) -> None:
        if held:
            self.fuse_projections_()


class RMSNorm(nn.Module):
    """Weighted RMSNorm; statistics and the weight multiply in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)  # one native call (CPU) or Triton kernel (GPU)


def rope_inv_freq(rope_dim: int, base: float, yarn: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [rope_dim/2] for interleaved RoPE; YaRN blends in 1/factor slowly.

    YaRN (V4-SPEC §2.3): pairs below `lo` keep their frequency, pairs above `hi` are divided by
    `factor`, a linear ramp in between; cos/sin keep magnitude 1 (no attention factor).
    """
    idx = torch.arange(0, rope_dim, 2, dtype=torch.float32)
    freq = 1.0 / (base ** (idx / rope_dim))
    if not yarn:
        return freq
    factor = float(yarn["factor"])
    orig = float(yarn["original_max_position_embeddings"])
    beta_fast = float(yarn.get("beta_fast") or 32)
    beta_slow = float(yarn.get("beta_slow") or 1)

    def dim_for(rotations: float) -> float:
        return rope_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(dim_for(beta_fast)), 0)
    hi = min(math.ceil(dim_for(beta_slow)), rope_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # share of the original (extrapolated) frequency
    return (freq / factor) * (1 - keep) + freq * keep


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [*positions.shape, rope_dim/2] in fp32."""
    ang = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the trailing rope dims of x (kernels.apply_rope).

    x: [..., D]; cos/sin: broadcastable to [..., R/2]. `inverse` applies the conjugate rotation
    (V4 undoes the query-position rotation on the attention output).
    """
    return kernels.apply_rope(x, cos, sin, inverse)


class SwiGLU(Rederived, nn.Module):
    """One expert (routed or shared): w2(SwiGLU(w1 x, w3 x)); names follow the official checkpoint."""

    _derived = ("_w13",)  # w1 and w3 as one product, redone after a move (Rederived)

    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)
        self.limit = limit
        self._w13 = None  # see fuse_projections_

    @torch.no_grad()
    def fuse_projections_(self) -> None:
        """Run w1 and w3 (same input) as one product (FusedLinears); where they become one layer, its [.., 2I]
        output feeds the SwiGLU in one call (kernels.swiglu)."""
        if self._w13 is None:
            self._w13 = FusedLinears([self.w1, self.w3])  # (not a module: the state dict keeps w1 and w3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._w13 is None:
            return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit))
        if self._w13.joined is not None:
            return self.w2(kernels.swiglu(self._w13.joined(x), self.limit))
        return self.w2(clamped_swiglu(*self._w13(x), self.limit))


class FusedLinears:
    """Several bias-free Linear layers that read the same input, run as one matmul.

    A decode step is a long chain of small matrix-vector products whose fixed cost per call (tens of
    microseconds here) rivals their memory time; projections of the same input fused into one call
    pay it once. The modules' weights become row slices (views) of the fused matrix, so names, state
    dicts and memory stay as they were; the fused matrix keeps the layout of the originals.
    Layers held at storage precision (kernels.linear: Fp8Linear, Bf16Linear) fuse with their own kind
    (FP8 ones when their 128-row scale blocks line up); each kind is one call, and the outputs come back
    in the order of `mods`."""

    def __init__(self, mods: list[nn.Module]):
        self.sizes = [m.out_features for m in mods]
        kinds: dict[type, list[int]] = {}
        for i, m in enumerate(mods):
            kinds.setdefault(type(m), []).append(i)
        self.calls = []  # (callable, [indices into mods]) per kind
        for kind, idx in kinds.items():
            group = [mods[i] for i in idx]
            fused = _fuse(kind, group) if len(group) > 1 else None
            if fused is not None:
                self.calls.append((fused, idx))
            else:
                self.calls.extend((mods[i], [i]) for i in idx)
        # the one fused matrix, when plain Linears became a single call (tests check the views share it)
        self.weight = self.calls[0][0].weight if len(self.calls) == 1 and kinds.keys() == {nn.Linear} else None
        # the one fused layer, when every module became a single call: its output is the modules' outputs
        # side by side
        self.joined = self.calls[0][0] if len(self.calls) == 1 and len(mods) > 1 else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: list[torch.Tensor | None] = [None] * len(self.sizes)
        for fn, idx in self.calls:
            y = fn(x)
            parts = y.split([self.sizes[i] for i in idx], dim=-1) if len(idx) > 1 else (y,)
            for i, part in zip(idx, parts):
                out[i] = part
        return tuple(out)


class _FusedPlain:
    """Plain Linear layers as one matrix (views of it become the layers' weights)."""

    def __init__(self, mods: list[nn.Linear]):
        ws = [m.weight.detach() for m in mods]
        fused = torch.cat(ws)
        if ws[0].dim() == 2 and ws[0].stride(0) == 1 and ws[0].shape[0] > 1:  # input-major storage
            fused = fused.t().contiguous().t()
        start = 0
        for m in mods:
            n = m.out_features
            m.weight = nn.Parameter(fused[start:start + n], requires_grad=False)
            start += n
        self.weight = fused

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _fuse(kind: type, mods: list[nn.Module]):
    if kind is nn.Linear:
        return _FusedPlain(mods)
    if kind in (Fp8Linear, Bf16Linear, GgufLinear):
        return kind.fuse(mods)
    return None
