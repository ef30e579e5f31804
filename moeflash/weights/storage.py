"""Load a V4 checkpoint's quantized weights at their storage precision, tensor by tensor.

Why: decoding FP8 to bf16 doubles those weights and FP4 experts grow 4x; V4-Flash's 160 GB of files
would need about 570 GB. Here an FP8 linear weight stays 1 byte per element (kernels.linear.Fp8Linear)
and a layer's FP4 routed experts stay packed with their UE8M0 scales in four stacked buffers
(MoE.hold_fp4_), filled in place one expert tensor at a time. Under fp32 compute, bf16 linear weights
stay bf16 (kernels.linear.Bf16Linear). Everything else is read in the compute dtype.
A tensor that cannot be held this way (an FP8 expert half whose rows cut a scale block, FP4 with
floating scales, a weight that is not a Linear's) is decoded as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels.linear import Bf16Linear, Fp8Linear
from ..model.moe import Gate
from ..model.v4 import Transformer
from .loader import Checkpoint, CheckpointError
from .quant import FP8_BLOCK, scale_multiplier

_EXPERT = re.compile(r"^(.*\.ffn)\.experts\.(\d+)\.(w[123])\.weight$")


@dataclass
class Plan:
    """Which expected tensors are held quantized, decided from headers alone (no data read)."""

    fp8: set[str] = field(default_factory=set)   # Linear weight names kept FP8
    fp4: set[str] = field(default_factory=set)   # routed expert weight names kept FP4
    bf16: set[str] = field(default_factory=set)  # Linear weight names kept bf16 under fp32 compute

    def quantized(self, name: str) -> bool:
        return name in self.fp8 or name in self.fp4 or name in self.bf16


def _linear_weights(model: nn.Module, names: list[str]) -> set[str]:
    """The names that are the weight of an nn.Linear of the (meta) model."""
    mods = dict(model.named_modules())
    return {n for n in names if n.endswith(".weight") and isinstance(mods.get(n[: -len(".weight")]), nn.Linear)}


def plan(ckpt: Checkpoint, model: nn.Module, names: list[str]) -> Plan:
    """The tensors of `names` (expected by the meta `model`) that can stay at storage precision."""
    linear = _linear_weights(model, names)
    p = Plan()
    by_layer: dict[str, list[str]] = {}  # routed expert weights per MoE layer
    for name in names:
        info = ckpt.info(name)
        m = _EXPERT.match(name)
        if m:
            by_layer.setdefault(m.group(1), []).append(name)
        if info.fmt == "fp8" and name in linear and (info.half is None or info.shape[0] % FP8_BLOCK == 0):
            p.fp8.add(name)  # a merged HF expert's half only when it does not cut a scale block
        elif info.fmt == "fp4" and m and info.scale is not None and info.scale.dtype in ("F8_E8M0", "U8"):
            p.fp4.add(name)
    # A layer's experts are held packed only if all of them are FP4; otherwise they are decoded.
    for members in by_layer.values():
        if not all(n in p.fp4 for n in members):
            p.fp4.difference_update(members)
    return p


def _tables(model: nn.Module, names: list[str]) -> set[str]:
    """The names that are a MoE router's weight (model.moe.Gate) or a V4 model's embedding table: matrices,
    but not an nn.Linear's. (A llama model's embedding may be its tied head: not one of these.)"""
    mods = dict(model.named_modules())
    return {n for n in names if n.endswith(".weight") and (isinstance(mods.get(n[: -len(".weight")]), Gate)
                                                           or (isinstance(model, Transformer) and n == "embed.weight"))}


def keep_bf16(p: Plan, ckpt: Checkpoint, model: nn.Module, names: list[str]) -> None:
    """Under fp32 compute, Linear weights, routers and the embedding table the checkpoint stores in bf16 stay
    bf16 (kernels.linear.Bf16Linear; a router multiplies its bf16 weight with kernels.bf16_linear; the
    embedding's rows are cast when looked up, Transformer.embed_rows): the same values at half the bytes of
    an fp32 copy."""
    for name in _linear_weights(model, names) | _tables(model, names):
        info = ckpt.info(name)
        if info.fmt is None and info.source.dtype == "BF16" and info.expert is None:
            p.bf16.add(name)


def stored_bytes(ckpt: Checkpoint, p: Plan, name: str, numel: int) -> int | None:
    """Bytes a held-quantized tensor takes in memory (weight + scales); None if it is not held so."""
    if name in p.fp8:
        out, in_ = ckpt.info(name).shape[:2]
        return numel + 4 * (-(-out // FP8_BLOCK)) * (-(-in_ // FP8_BLOCK))
    if name in p.fp4:
        return numel // 2 + numel // 32
    if name in p.bf16:
        return 2 * numel
    return None


@torch.no_grad()
def load_quantized(ckpt: Checkpoint, model: nn.Module, p: Plan, progress=None, experts: range | None = None) -> None:
    """Read the planned tensors and install them: FP8 Linears replaced by Fp8Linear, FP4 experts packed
    into their MoE (only the routed experts `experts` when given: expert parallelism). `progress(name)`
    is called after each tensor."""
    for name in sorted(p.fp8):
        w, s, _ = ckpt.get_quantized(name)
        parent, _, attr = name[:-7].rpartition(".")
        setattr(model.get_submodule(parent), attr, Fp8Linear(w.view(torch.uint8).clone(), scale_multiplier(s)))
        if progress:
            progress(name)
    for name in sorted(p.bf16):
        parent, _, attr = name[:-7].rpartition(".")
        w = ckpt.get(name).to(torch.bfloat16, copy=True)
        mod = model.get_submodule(name[:-7])
        if isinstance(mod, nn.Linear):
            setattr(model.get_submodule(parent), attr, Bf16Linear(w))
        else:  # a router (model.moe.Gate) or the embedding: its weight parameter, held in bf16
            mod.weight = nn.Parameter(w, requires_grad=False)
        if progress:
            progress(name)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name in sorted(p.fp4, key=_parts):
        layer, j, proj = _parts(name)
        moe = model.get_submodule(layer)
        n_exp = len(moe.experts)
        if experts is not None and not layer.startswith("mtp."):
            if j not in experts:
                continue  # another process's expert: never read
            j, n_exp = j - experts.start, len(experts)
        w, s, _ = ckpt.get_quantized(name)
        w, s = w.view(torch.uint8), s.view(torch.uint8)
        buf = layers.get(layer)
        if buf is None:
            inter = ckpt.info(f"{layer}.experts.0.w1.weight").shape[0]
            dim = ckpt.info(f"{layer}.experts.0.w2.weight").shape[0]
            buf = layers[layer] = {
                "q13": torch.empty(n_exp, 2 * inter, dim // 2, dtype=torch.uint8),
                "s13": torch.empty(n_exp, 2 * inter, dim // 32, dtype=torch.uint8),
                "q2": torch.empty(n_exp, dim, inter // 2, dtype=torch.uint8),
                "s2": torch.empty(n_exp, dim, inter // 32, dtype=torch.uint8)}
        inter = buf["q13"].shape[1] // 2
        if proj == "w2":
            buf["q2"][j].copy_(w)
            buf["s2"][j].copy_(s)
        else:
            rows = slice(0, inter) if proj == "w1" else slice(inter, 2 * inter)
            buf["q13"][j, rows].copy_(w)
            buf["s13"][j, rows].copy_(s)
        if progress:
            progress(name)
    for layer, buf in layers.items():
        model.get_submodule(layer).hold_fp4_(buf["q13"], buf["s13"], buf["q2"], buf["s2"])


def _parts(name: str) -> tuple[str, int, str]:
    m = _EXPERT.match(name)
    return m.group(1), int(m.group(2)), m.group(3)


def check_materialised(model: nn.Module) -> None:
    """Every parameter and buffer holds real memory (none left on the meta device)."""
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{len(left)} tensors were not loaded, e.g. {left[:3]}")
