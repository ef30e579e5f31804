"""Write a model as a normal checkpoint: safetensors shards under the official names, an index, and
config.json, so any loader (moeflash, or transformers via its official-name conversion) reads it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import OFFICIAL_FP4_EXPERT, OFFICIAL_FP8_LINEAR, ModelConfig
from ..model.init import Codes
from ..model.layout import keeps_fp32
from ..model.v4 import Transformer
from .quant import quant_fp4, quant_fp8



def save_checkpoint(model: Transformer, out: str | Path, dtype: torch.dtype = torch.bfloat16,
                    shard_bytes: int = 2 << 30, official: bool = False) -> Path:
    """Save `model` to directory `out` (created); returns the path. `official`: quantize as DeepSeek's
    official checkpoints are (config.OFFICIAL_FP8_LINEAR / OFFICIAL_FP4_EXPERT with their `.scale`
    tensors, the rest in `dtype`), one tensor at a time."""
    return write_checkpoint(model.config, model.state_dict().items(), out, dtype, shard_bytes, official)


def _encoded(name: str, t: torch.Tensor, dtype: torch.dtype, official: bool):
    """(stored name, tensor) pairs for one state_dict entry: a quantized weight and its scale, or the
    tensor in `dtype` (fp32-kept tensors and integer buffers as they are)."""
    base = name[: -len(".weight")]
    if isinstance(t, Codes):  # drawn as codes already (model.init.random_tensors(codes=True))
        if not official:
            raise ValueError(f"{name}: drawn as official-format codes, written without --official")
        w, sc = t
        return [(name, w.cpu()), (base + ".scale", sc.cpu())]
    if official and OFFICIAL_FP8_LINEAR.search(name):
        w, sc = quant_fp8(t.float())
        return [(name, w.cpu()), (base + ".scale", sc.cpu())]
    if official and OFFICIAL_FP4_EXPERT.search(name):
        w, sc = quant_fp4(t.float())
        return [(name, w.cpu()), (base + ".scale", sc.cpu())]  # (quantized where t was drawn)
    if t.dtype.is_floating_point and not keeps_fp32(name):
        t = t.to(dtype)
    return [(name, t.cpu().contiguous())]


def write_checkpoint(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], out: str | Path,
                     dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 2 << 30, official: bool = False,
                     progress=None) -> Path:
    """Write (name, tensor) pairs as a checkpoint, encoding each as it arrives and flushing a shard
    once it is full: memory holds one shard of encoded tensors, never the model. So a checkpoint
    bigger than RAM can be written from a generator (model.init.random_tensors on a meta-device model).
    `progress(done, None)` is called after each tensor."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    files: list[tuple[Path, list[str]]] = []
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            part = out / f"model-{len(files) + 1:05d}.safetensors.part"
            save_file(shard, str(part), metadata={"format": "pt"})
            files.append((part, list(shard)))
            shard, size = {}, 0

    for n, (name, t) in enumerate(tensors, 1):
        for key, enc in _encoded(name, t, dtype, official):
            nbytes = enc.numel() * enc.element_size()
            if shard and size + nbytes > shard_bytes:
                flush()
            shard[key] = enc
            size += nbytes
            total += nbytes
        if progress is not None:
            progress(n, None)
    flush()
    weight_map = {}
    for i, (part, names) in enumerate(files):
        fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        part.replace(out / fname)
        weight_map.update({k: fname for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    cfg = (config.replace(expert_dtype="fp4") if official else config).to_dict()
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out
