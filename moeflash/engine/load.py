"""Load a model for the engine: every weight in memory (weights.build), or a V4 checkpoint whose routed
experts stream from disk through an expert store (engine/experts.py) under a byte budget.

The store is engine state (a cache with a policy, counters, a prefetch thread), so it is attached here,
above the weights layer, which only builds the model without its experts."""

from __future__ import annotations

from pathlib import Path

import torch

from ..devices import default_dtype, move_model, resolve_device
from ..kernels.numerics import code, set_numerics
from ..tokenizer import load_tokenizer
from ..weights import build
from .expert_tier import DeviceTier
from .experts import DiskExperts, ExpertStore


def load_model(spec: str | Path, dtype: str | torch.dtype = "auto", expert_memory: float | None = None,
               expert_policy: str = "lfu", prefetch: bool = False, memory_limit: float | None = None,
               dequantize: bool = False, progress=None, experts: range | None = None,
               device: str | torch.device | None = "cpu", device_expert_memory: float | None = None,
               numerics: str = "exact", head: str = "stored", state_dtype: str = "auto"):
    """(model, tokenizer or None) for `tiny`, `smollm2`, a .gguf file or a checkpoint directory.

    With `expert_memory` (GiB; V4 checkpoint directories only) the routed experts are not loaded: an
    `ExpertStore` with `expert_policy` (and `prefetch`) serves them from the files. `memory_limit`,
    `dequantize`, `progress`: see weights.build.

    `device` (cpu, cuda, cuda:N, auto): the model is loaded on the host and moved there whole (`--dtype
    auto` is bfloat16 on a GPU). With an expert store on a GPU, `device_expert_memory` (GiB) is the GPU
    tier's budget (engine/expert_tier.py) above `expert_memory` of pinned host RAM.

    `numerics` (exact, reference, fast): how the CPU kernels multiply activations with quantized weights
    (kernels/numerics.py). `head`: `stored` keeps the LM head as the checkpoint stores it; `q8_0`
    requantizes it to Q8_0 blocks (`requantize_head_`), a trade of accuracy for bytes stated in the README.
    `state_dtype` (auto, bf16, fp32): the dtype of a V4 sequence's records, its window ring and compressed
    entries (model/state.new_seq_state); auto is the compute dtype."""
    code(numerics)  # an unknown mode fails before the load, not after
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"unknown state dtype {state_dtype!r}; choose one of {', '.join(STATE_DTYPES)}")
    model, tok = _load(spec, dtype, expert_memory, expert_policy, prefetch, memory_limit, dequantize, progress,
                       experts, device, device_expert_memory)
    if head == "q8_0":
        requantize_head_(model)
    set_numerics(model, numerics)
    if STATE_DTYPES[state_dtype] is not None:
        if not hasattr(model, "forward_static"):
            raise ValueError(f"--state-dtype {state_dtype} applies to V4 models; this one is {type(model).__name__} "
                             "(its KV cache is held in the compute dtype)")
        model.state_dtype = STATE_DTYPES[state_dtype]
    return model, tok


HEADS = ("stored", "q8_0")
STATE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def requantize_head_(model) -> None:
    """Hold the LM head as Q8_0 blocks (1.06 bytes a weight instead of bf16's 2): on a V4 model the head is
    the largest dense read of a decode step (1.06 GB of V4-Flash's ~11 GB at bf16). A tied head gets its
    own blocks; the embedding keeps its storage. CPU models only (the GPU path has no GGUF kernels)."""
    from ..kernels.linear import GgufLinear
    from ..weights.quant import quant_q8_0

    head = model.head
    if isinstance(head, GgufLinear) and head.qtype == 8:
        return
    w = head.weight  # (a GGUF head decodes here, once)
    if w.device.type != "cpu":
        raise ValueError(f"--head q8_0 requantizes the head for the CPU kernels; the model is on {w.device}")
    blocks = torch.cat([quant_q8_0(w[i:i + 4096]) for i in range(0, w.shape[0], 4096)])  # bounded scratch
    model.head = GgufLinear(blocks, 8)


def _load(spec, dtype, expert_memory, expert_policy, prefetch, memory_limit, dequantize, progress, experts, device,
          device_expert_memory):
    dev = resolve_device(device)
    dtype = default_dtype(dev, dtype)
    if device_expert_memory is not None and expert_memory is None:
        raise ValueError("--device-expert-memory is the GPU tier above the host tier: give --expert-memory "
                         "(host RAM for experts) too")
    if expert_memory is not None and dev.type != "cpu" and device_expert_memory is None:
        raise ValueError(f"--expert-memory on {dev} needs --device-expert-memory GiB: the experts computed on "
                         "the GPU are held in its memory")
    if expert_memory is None:  # `experts`: read only those routed experts (expert parallelism)
        model, tok = build.load_model(spec, dtype, memory_limit, dequantize, progress, experts)
        return (model if dev.type == "cpu" else move_model(model, dev)), tok
    model, tok = _load_with_store(spec, dtype, expert_memory, expert_policy, prefetch, memory_limit, dequantize,
                                  progress, pin=dev.type == "cuda")
    if dev.type != "cpu":
        move_model(model, dev)
    if device_expert_memory is not None:
        DeviceTier(model.expert_store, dev, int(device_expert_memory * 2**30)).attach(model)
    return model, tok


def _load_with_store(spec, dtype, expert_memory: float, expert_policy: str, prefetch: bool, memory_limit,
                     dequantize: bool, progress, pin: bool):
    name = str(spec)
    if name.endswith(".gguf"):
        return _load_moefied_gguf(name, dtype, expert_memory, expert_policy, prefetch, pin)
    if not Path(name).is_dir():
        raise ValueError(build.NEEDS_CHECKPOINT_DIR)
    if dequantize:
        raise ValueError("--dequantize loads every weight decoded; it does not combine with --expert-memory")
    path = build.checkpoint_dir(name)
    model, ckpt, torch_dtype, budget = build.load_checkpoint_dense(path, expert_memory, dtype, memory_limit, progress)
    cfg = model.config
    store = ExpertStore(DiskExperts(ckpt, cfg), cfg, budget, expert_policy, torch_dtype, prefetch, pin_memory=pin)
    store.attach(model)
    return model, load_tokenizer(path, cfg.bos_token_id, cfg.eos_token_id)


def _load_moefied_gguf(path: str, dtype, expert_memory: float, policy: str, prefetch: bool, pin: bool = False):
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
                        int(expert_memory * 2**30), policy, torch_dtype, prefetch, pin_memory=pin)
    store.attach(model)
    return model.fuse_projections_(), tokenizer
