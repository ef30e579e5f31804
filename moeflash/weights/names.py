"""Tensor names: official DeepSeek-V4 (= moeflash internal) <-> Hugging Face transformers 5.23.

moeflash names its tensors exactly as the official checkpoint does (`layers.3.attn.wq_a.weight`,
routed experts as separate `ffn.experts.{j}.w1.weight` ...), so an official checkpoint loads with
no renaming. Hugging Face differs in three ways:
- module names: `model.` prefix (not on `lm_head.weight`) and other leaf names (table below);
- routed experts merged per layer: `mlp.experts.gate_up_proj` [E, 2I, d] = per expert cat(w1, w3)
  on the rows, `mlp.experts.down_proj` [E, d, I] = stack of w2;
- quantized checkpoints name the scale `<weight>_scale_inv` (official: `<module>.scale`).
HF has no MTP (`mtp.*`) tensors.

`save_pretrained` of transformers 5.23 writes yet another spelling (official leaf names with a
`model.` prefix, `head.weight`, `model.embed_tokens.weight`, `model.hc_head.hc_fn`, and
`attn.norm.weight` for `attn.kv_norm.weight`); `hf_to_internal_name` reads that spelling too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

OFFICIAL = "official"
HF = "hf"

# Top-level tensors: internal -> HF.
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}

# Per-block tensors (after `layers.{i}.`): internal -> HF (after `model.layers.{i}.`).
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn",
    "hc_attn_base": "attn_hc.base",
    "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn",
    "hc_ffn_base": "ffn_hc.base",
    "hc_ffn_scale": "ffn_hc.scale",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
_BLOCK_FROM_HF = {v: k for k, v in _BLOCK.items()}
_TOP_FROM_HF = {v: k for k, v in _TOP.items()}

# Extra tensors of the MTP block (`mtp.{k}.`), besides the block tensors and routed experts.
_MTP_EXTRA = (
    "e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight",
    "hc_head_fn", "hc_head_base", "hc_head_scale",
)

# What save_pretrained writes (after `model.`) that is neither an HF module name nor official.
_SAVED_TOP = {"embed_tokens.weight": "embed.weight", "head.weight": "head.weight",
              "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
              "hc_head.hc_scale": "hc_head_scale"}
_SAVED_BLOCK = {"attn.norm.weight": "attn.kv_norm.weight"}

_BLOCK_RE = re.compile(r"^(layers\.\d+\.|mtp\.\d+\.)(.+)$")
_EXPERT_RE = re.compile(r"^(layers\.\d+\.|mtp\.\d+\.)ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")
_HF_EXPERT_RE = re.compile(r"^model\.(layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)(_scale_inv)?$")


def _split_scale(name: str) -> tuple[str, bool]:
    """`X.scale` -> (`X.weight`, True); anything else -> (name, False)."""
    if name.endswith(".scale"):
        return name[: -len(".scale")] + ".weight", True
    return name, False


def is_internal_name(name: str) -> bool:
    """Whether `name` is a tensor name of the official / internal scheme (incl. `.scale` companions)."""
    if _EXPERT_RE.match(name):
        return True
    base, is_scale = _split_scale(name)
    if is_scale and not base.endswith(".weight"):
        return False
    if base in _TOP:
        return True
    m = _BLOCK_RE.match(base)
    if not m:
        return False
    prefix, rest = m.groups()
    return rest in _BLOCK or (prefix.startswith("mtp.") and rest in _MTP_EXTRA)


def is_routed_expert(name: str) -> bool:
    """Whether an internal name is a routed expert's weight or scale (`...ffn.experts.{j}.w?.*`)."""
    return _EXPERT_RE.match(name) is not None


def is_hf_merged_expert(name: str) -> bool:
    """Whether an HF name holds all routed experts of a layer (`mlp.experts.gate_up_proj` ...)."""
    return _HF_EXPERT_RE.match(name) is not None


def internal_to_hf_name(name: str) -> str:
    """HF module name of one internal tensor that HF keeps as its own tensor.

    Routed experts are merged in HF (use `hf_expert_location`), and MTP tensors do not exist there.
    """
    if _EXPERT_RE.match(name):
        raise ValueError(f"{name!r} is a routed expert; HF merges experts, use hf_expert_location()")
    if name.startswith("mtp."):
        raise ValueError(f"{name!r} is an MTP tensor; transformers has no MTP module, so it has no HF name")
    base, is_scale = _split_scale(name)
    hf = _TOP.get(base)
    if hf is None:
        m = _BLOCK_RE.match(base)
        if m and m.group(2) in _BLOCK:
            hf = f"model.{m.group(1)}{_BLOCK[m.group(2)]}"
    if hf is None:
        raise ValueError(f"{name!r} is not a DeepSeek-V4 tensor name (see moeflash/weights/names.py)")
    return hf + "_scale_inv" if is_scale else hf


def hf_to_internal_name(name: str) -> str:
    """Internal name of one HF tensor (module name or save_pretrained spelling), merged experts excepted."""
    if _HF_EXPERT_RE.match(name):
        raise ValueError(f"{name!r} holds all routed experts of a layer; split it with hf_expert_names()")
    base, is_scale = name, False
    if name.endswith(".weight_scale_inv"):
        base, is_scale = name[: -len("_scale_inv")], True
    elif name.endswith(".scale") and not name.endswith("_hc.scale"):
        base, is_scale = _split_scale(name)
    out = _hf_base_to_internal(base)
    if out is None:
        raise ValueError(f"{name!r} is not a DeepSeek-V4 tensor name in the Hugging Face scheme")
    return out[: -len(".weight")] + ".scale" if is_scale else out


def _hf_base_to_internal(name: str) -> str | None:
    if name in _TOP_FROM_HF:
        return _TOP_FROM_HF[name]
    if name in ("head.weight", "lm_head.weight"):
        return "head.weight"
    if not name.startswith("model."):
        return None
    rest = name[len("model."):]
    if rest in _SAVED_TOP:
        return _SAVED_TOP[rest]
    m = _BLOCK_RE.match(rest)
    if m is None:
        return rest if rest in _TOP else None
    prefix, tail = m.groups()
    if tail in _BLOCK_FROM_HF:
        return prefix + _BLOCK_FROM_HF[tail]
    if tail in _SAVED_BLOCK:
        return prefix + _SAVED_BLOCK[tail]
    return rest if is_internal_name(rest) else None


def hf_expert_names(name: str, n_experts: int) -> list[tuple[str, int, int | None]]:
    """Internal tensors inside a merged HF expert tensor, as (internal name, expert j, half).

    half 0 / 1 = first / second half of dim 1 of expert j (w1 / w3 of `gate_up_proj`), None = all of it.
    """
    m = _HF_EXPERT_RE.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a merged HF expert tensor (`model.layers.N.mlp.experts.*_proj`)")
    prefix, proj, scale = m.groups()
    kind = "scale" if scale else "weight"
    if proj == "down_proj":
        return [(f"{prefix}ffn.experts.{j}.w2.{kind}", j, None) for j in range(n_experts)]
    return [(f"{prefix}ffn.experts.{j}.{w}.{kind}", j, h) for j in range(n_experts) for h, w in ((0, "w1"), (1, "w3"))]


def hf_expert_location(name: str) -> tuple[str, int, int | None]:
    """Where an internal routed-expert tensor lives in HF: (merged HF name, expert j, half)."""
    m = _EXPERT_RE.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a routed expert tensor (`layers.N.ffn.experts.J.w{{1,2,3}}.*`)")
    prefix, j, w, kind = m.groups()
    if prefix.startswith("mtp."):
        raise ValueError(f"{name!r} is an MTP tensor; transformers has no MTP module, so it has no HF name")
    proj = "down_proj" if w == "w2" else "gate_up_proj"
    half = {"w1": 0, "w2": None, "w3": 1}[w]
    return f"model.{prefix}mlp.experts.{proj}" + ("_scale_inv" if kind == "scale" else ""), int(j), half


def detect_scheme(names: Iterable[str]) -> str:
    """"official" or "hf" from a checkpoint's tensor names (HF = `model.` prefix or `lm_head.weight`)."""
    hf = official = neutral = 0
    for n in names:
        if n == "head.weight":  # official, but save_pretrained writes it too
            neutral += 1
        elif n.startswith("model.") or n == "lm_head.weight":
            hf += 1
        elif is_internal_name(n) or n.startswith(("layers.", "mtp.")):
            official += 1
    if hf and official:
        raise ValueError(
            f"tensor names mix the official DeepSeek scheme ({official} names like `layers.0.attn.wq_a.weight`) "
            f"and the Hugging Face scheme ({hf} names starting with `model.`); convert the checkpoint to one scheme"
        )
    if hf:
        return HF
    if official or neutral:
        return OFFICIAL
    raise ValueError("no DeepSeek-V4 tensor names found (expected `layers.N.*` or `model.layers.N.*`)")


# -- whole state dicts ---------------------------------------------------------------------------
# Values are tensors, or anything with `.shape` and `[j]` indexing (e.g. meta tensors) when splitting.

def _half(t: Any, half: int | None) -> Any:
    if half is None:
        return t
    rows = t.shape[0]
    if rows % 2:
        raise ValueError(f"cannot split a merged gate_up tensor with an odd number of rows ({rows}) into w1 / w3")
    return t[: rows // 2] if half == 0 else t[rows // 2:]


def hf_to_internal(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename an HF state dict to internal names, splitting merged experts (views, no copies)."""
    out: dict[str, Any] = {}
    for name, value in state.items():
        if _HF_EXPERT_RE.match(name):
            for iname, j, half in hf_expert_names(name, value.shape[0]):
                out[iname] = _half(value[j], half)
        else:
            out[hf_to_internal_name(name)] = value
    return out


def internal_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an internal state dict to HF names, merging routed experts; MTP tensors are an error."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, dict[int | None, torch.Tensor]]] = {}
    for name, value in state.items():
        if _EXPERT_RE.match(name):
            hf, j, half = hf_expert_location(name)
            out.setdefault(hf, None)  # keep first-seen order
            groups.setdefault(hf, {}).setdefault(j, {})[half] = value
        else:
            out[internal_to_hf_name(name)] = value
    for hf, experts in groups.items():
        need = (None,) if "down_proj" in hf else (0, 1)
        rows = []
        for j in range(max(experts) + 1):
            parts = experts.get(j, {})
            for h in need:
                if h not in parts:
                    w = {None: "w2", 0: "w1", 1: "w3"}[h]
                    layer = hf[len("model."): hf.index(".mlp.")]
                    raise ValueError(
                        f"cannot merge experts into {hf!r}: {layer}.ffn.experts.{j}.{w} is missing "
                        f"(HF keeps all {max(experts) + 1} experts of a layer in one tensor)"
                    )
            rows.append(parts[None] if need == (None,) else torch.cat([parts[0], parts[1]], dim=0))
        out[hf] = torch.stack(rows)
    return out


__all__ = [
    "OFFICIAL", "HF", "is_internal_name", "is_routed_expert", "is_hf_merged_expert", "internal_to_hf_name", "hf_to_internal_name",
    "hf_expert_names", "hf_expert_location", "detect_scheme", "hf_to_internal", "internal_to_hf",
]
