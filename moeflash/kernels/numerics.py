"""How activations meet weights held at storage precision: the three numerics modes.

- `exact`: fp32 activations times the exactly decoded weights, summed in fp32 (the reference model's
  products; what transformers computes on the same weights).
- `reference`: DeepSeek's own inference numerics: before every FP8 and FP4 product each activation row is
  quantized to e4m3 per 1 x 128 block with a power-of-two scale (`act_quant`, V4-SPEC 5.3), then multiplied
  exactly. GGUF and bf16 weights have no such step (they are not DeepSeek's formats) and stay exact.
- `fast`: llama.cpp's way: each activation row is quantized once per op to int8 per 32 inputs
  (d = amax / 127) and meets the weights' integer codes in integer dot products (AVX2 vpmaddubsw, or
  VNNI vpdpbusd), every 32-block's sum exact in int32: FP4 experts (e2m1 codes read doubled, so exact) and
  every GGUF block type. FP8 e4m3 weights are not integers, so FP8 linears keep the exact kernel.

The mode is a property of the layers that hold quantized weights (`Fp8Linear`, `GgufLinear`, `MoE`): set it
for a whole model with `set_numerics`. On a GPU the Triton kernels ignore it (they compute in the
activations' dtype). `bench/numerics_accuracy.py` measures how far each mode lands from `exact`, from
transformers and from llama.cpp on real text.
"""

from __future__ import annotations

from torch import nn

EXACT, REFERENCE, FAST = 0, 1, 2
MODES = {"exact": EXACT, "reference": REFERENCE, "fast": FAST}
NAMES = {v: k for k, v in MODES.items()}


def code(mode: str | int) -> int:
    """The op-level code of a mode given by name (or already a code)."""
    if isinstance(mode, int) and mode in NAMES:
        return mode
    if mode not in MODES:
        raise ValueError(f"unknown numerics {mode!r}; choose one of {', '.join(MODES)}")
    return MODES[mode]


def _layers(model: nn.Module):
    """Every layer with a `numerics` attribute: the modules, and the fused layers that fused projections
    (model/layers.FusedLinears) hold outside the module tree."""
    mods = list(model.modules())
    seen = {id(m) for m in mods}
    for m in mods:
        if hasattr(m, "numerics"):
            yield m
        for value in vars(m).values():
            for fn, _ in getattr(value, "calls", None) or ():
                if hasattr(fn, "numerics") and id(fn) not in seen:
                    seen.add(id(fn))
                    yield fn


def set_numerics(model: nn.Module, mode: str | int) -> int:
    """Set the numerics of every layer of `model` that holds quantized weights; returns how many layers."""
    c = code(mode)
    n = 0
    for m in _layers(model):
        m.numerics = c
        n += 1
    return n


def numerics_of(model: nn.Module) -> str:
    """The mode the model's quantized layers run in ("exact" when it has none); mixed modes are an error
    of whoever set them, reported as such."""
    modes = {m.numerics for m in _layers(model)}
    if len(modes) > 1:
        raise ValueError(f"layers of this model run mixed numerics {sorted(NAMES[c] for c in modes)}")
    return NAMES[modes.pop()] if modes else "exact"
