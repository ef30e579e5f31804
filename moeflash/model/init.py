"""Deterministic random weights for models built in code (the `tiny` preset, tests, benchmarks).

Plain N(0, 0.02) leaves V4 degenerate (V4-SPEC §6.2): zero sinks and position biases, all hash
rows pointing at expert 0, mHC weights that ignore the input. This init randomises those too, so
every component influences the output and a wrong implementation shows up in the logits.
"""

from __future__ import annotations

import torch
from torch import nn


class Codes(tuple):
    """An official-format weight drawn as its codes: (codes, scale) in the checkpoint's own dtypes (e4m3 or
    int8-packed e2m1; UE8M0), written as they are."""


def _official_codes(name: str, shape, std: float, g, device):
    """The codes of an official FP8 / FP4 weight of RMS about `std`, drawn directly (no fp32 values to
    quantize): FP4 experts as uniform random bytes (every e2m1 code equally likely, RMS 2.93) under one
    power-of-two scale per 32 inputs; FP8 linears as normal draws cast to e4m3 (RMS 64, well inside
    +-448) under one power-of-two scale per 128 x 128 block. None for other tensors."""
    import math

    from ..config import OFFICIAL_FP4_EXPERT, OFFICIAL_FP8_LINEAR

    if OFFICIAL_FP4_EXPERT.search(name):
        out, inp = shape
        codes = torch.randint(0, 256, (out, inp // 2), generator=g, device=device, dtype=torch.uint8)
        e = 127 + round(math.log2(std / 2.93))
        scale = torch.full((out, -(-inp // 32)), e, dtype=torch.uint8, device=device)
        return Codes((codes.view(torch.int8), scale.view(torch.float8_e8m0fnu)))
    if OFFICIAL_FP8_LINEAR.search(name):
        out, inp = shape
        codes = (torch.randn((out, inp), generator=g, device=device) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        e = 127 + round(math.log2(std / 64))
        scale = torch.full((-(-out // 128), -(-inp // 128)), e, dtype=torch.uint8, device=device)
        return Codes((codes, scale.view(torch.float8_e8m0fnu)))
    return None


def random_tensors(model: nn.Module, seed: int = 0, std: float = 0.1, device: str | torch.device = "cpu",
                   codes: bool = False):
    """Yield (state_dict name, value) for every parameter, then the tid2eid / gate.bias buffers, one
    at a time and in a fixed order from one generator: the same values `randomize_` gives. Works on a
    model built on the meta device, so a checkpoint bigger than RAM can be written tensor by tensor
    (weights/save.py). `device`: where the values are drawn (a GPU draws a V4-Flash layer's 6.4 billion
    values in a moment; the CPU takes minutes); each device's generator gives its own seeded values.
    `codes`: the official format's FP8 / FP4 weights come as `Codes` drawn directly (`_official_codes`),
    which writes real-size layers in about a minute instead of quantizing billions of drawn values; a
    different random model from the one drawn without it."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(shape, s=1.0):
        return torch.randn(shape, generator=g, device=device) * s

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("_fn"):
            v = rand(p.shape, 0.05)
        elif leaf.endswith("_base"):
            v = rand(p.shape)
        elif leaf.endswith("_scale"):
            v = torch.rand(p.shape, generator=g, device=device) * 2 + 0.5
        elif leaf in ("attn_sink", "ape"):
            v = rand(p.shape)
        elif codes and (c := _official_codes(name, p.shape, std, g, device)) is not None:
            yield name, c
            continue
        elif ".norm" in name or "norm." in name or name.startswith("norm"):
            v = 1 + rand(p.shape, 0.2)
        else:
            v = rand(p.shape, std)
        yield name, v.to(p.dtype)
    for name, b in model.named_buffers():
        if name.endswith("tid2eid"):
            n_exp = model.config.n_routed_experts if hasattr(model, "config") else int(b.max()) + 1
            rows = [torch.randperm(n_exp, generator=g, device=device)[: b.shape[1]] for _ in range(b.shape[0])]
            yield name, torch.stack(rows).to(b.dtype)
        elif name.endswith("gate.bias"):
            yield name, rand(b.shape, 0.1).to(b.dtype)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, v in random_tensors(model, seed, std):
        tensors[name].copy_(v)
    return model
