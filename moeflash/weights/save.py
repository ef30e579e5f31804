"""Write a model as a normal checkpoint: safetensors shards under the official names, an index, and
config.json, so any loader (moeflash, or transformers via its official-name conversion) reads it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import OFFICIAL_FP4_EXPERT, OFFICIAL_FP8_LINEAR
from ..model.layout import keeps_fp32
from ..model.v4 import Transformer
from .quant import quant_fp4, quant_fp8



def save_checkpoint(model: Transformer, out: str | Path, dtype: torch.dtype = torch.bfloat16,
                    shard_bytes: int = 2 << 30, official: bool = False) -> Path:
    """Save `model` to directory `out` (created); returns the path. `official`: quantize as DeepSeek's
    official checkpoints are (config.OFFICIAL_FP8_LINEAR / OFFICIAL_FP4_EXPERT with their `.scale` tensors, the rest in
    `dtype`), one tensor at a time."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        base = name[: -len(".weight")]
        if official and OFFICIAL_FP8_LINEAR.search(name):
            tensors[name], tensors[base + ".scale"] = quant_fp8(t.float())
            continue
        if official and OFFICIAL_FP4_EXPERT.search(name):
            tensors[name], tensors[base + ".scale"] = quant_fp4(t.float())
            continue
        if t.dtype.is_floating_point and not keeps_fp32(name):
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    cfg = (model.config.replace(expert_dtype="fp4") if official else model.config).to_dict()
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out
