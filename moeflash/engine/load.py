"""Load a model for the engine: every weight in memory (weights.build), or a V4 checkpoint whose routed
experts stream from disk through an expert store (engine/experts.py) under a byte budget.

The store is engine state (a cache with a policy, counters, a prefetch thread), so it is attached here,
above the weights layer, which only builds the model without its experts."""

from __future__ import annotations

from pathlib import Path

import torch

from ..tokenizer import load_tokenizer
from ..weights import build
from .experts import DiskExperts, ExpertStore


def load_model(spec: str | Path, dtype: str | torch.dtype = "auto", expert_memory: float | None = None,
               expert_policy: str = "lfu", prefetch: bool = False, memory_limit: float | None = None,
               dequantize: bool = False, progress=None, experts: range | None = None):
    """(model, tokenizer or None) for `tiny`, `smollm2`, a .gguf file or a checkpoint directory.

    With `expert_memory` (GiB; V4 checkpoint directories only) the routed experts are not loaded: an
    `ExpertStore` with `expert_policy` (and `prefetch`) serves them from the files. `memory_limit`,
    `dequantize`, `progress`: see weights.build."""
    if expert_memory is None:  # `experts`: read only those routed experts (expert parallelism)
        return build.load_model(spec, dtype, memory_limit, dequantize, progress, experts)
    name = str(spec)
    if name.endswith(".gguf"):
        return _load_moefied_gguf(name, dtype, expert_memory, expert_policy, prefetch)
    if not Path(name).is_dir():
        raise ValueError(build.NEEDS_CHECKPOINT_DIR)
    if dequantize:
        raise ValueError("--dequantize loads every weight decoded; it does not combine with --expert-memory")
    path = build.checkpoint_dir(name)
    model, ckpt, torch_dtype, budget = build.load_checkpoint_dense(path, expert_memory, dtype, memory_limit, progress)
    cfg = model.config
    store = ExpertStore(DiskExperts(ckpt, cfg), cfg, budget, expert_policy, torch_dtype, prefetch)
    store.attach(model)
    return model, load_tokenizer(path, cfg.bos_token_id, cfg.eos_token_id)


def _load_moefied_gguf(path: str, dtype, expert_memory: float, policy: str, prefetch: bool):
    """A MoE-fied llama GGUF (`moeflash moefy`) whose experts an expert store serves from the file."""
    from ..weights.gguf import GGUFFile, llama_config, load_llama_gguf
    from .experts import GGUFExperts, StoreShape

    f = GGUFFile(path)
    cfg = llama_config(f)
    if not cfg.moe_experts:
        raise ValueError(f"{path} is a dense model: --expert-memory needs routed experts (a V4 checkpoint "
                         "directory, or a MoE-fied GGUF from `moeflash moefy`)")
    torch_dtype = build.resolve_dtype(dtype, cfg)
    model, tokenizer = load_llama_gguf(f, torch_dtype, packed=torch_dtype == torch.float32, skip_experts=True)
    store = ExpertStore(GGUFExperts(path, cfg), StoreShape(cfg.num_hidden_layers, cfg.moe_experts),
                        int(expert_memory * 2**30), policy, torch_dtype, prefetch)
    store.attach(model)
    return model.fuse_projections_(), tokenizer
