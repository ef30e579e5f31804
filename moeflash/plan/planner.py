"""The planner: memory, bytes per token, tokens/s and dollars for a V4-class model on some hardware.

Everything is derived from the ModelConfig (parameter shapes, layer types) and a Hardware profile:

- **Weights** by component and by tier. Total parameters decide memory; each tensor is sized in the
  chosen precision (bf16; fp32; official FP8 e4m3 with one UE8M0 scale per 128x128 block; official
  FP4 e2m1 experts, two per byte plus one UE8M0 scale per 32 inputs = 4.25 bits), exactly as the
  checkpoint or the engine stores it (the V4-Flash checkpoint: 159,609,485,896 bytes, V4-SPEC §5.1).
  Routed experts fill the fast memory left after dense weights and sequence state (or
  `expert_memory` GiB); the rest sit in host RAM (GPU boxes) or on disk.
- **State** per sequence, component by component (sliding window, CSA entries, indexer keys, HCA
  entries, compressor rows in flight), equal to `model.state.state_bytes` (V4-SPEC §4: 6,880 bytes
  per token in bf16 for V4-Flash).
- **Bytes read per decode step** by tier: dense weights once per step (one embedding row per token),
  distinct routed experts (expected E (1 - (1 - k/E)^B) per layer at batch B under uniform routing),
  split by the cache hit rate between fast memory and the lower tier, and each sequence's state read
  (window, HCA entries, top-k CSA entries plus every indexer key once the indexer is in use).
- **Tokens/s**: the roofline (each tier at full bandwidth, overlapped; compute at peak) and the
  expected value: bytes / (bandwidth x measured efficiency), tiers one after another (misses are
  loaded synchronously), compute-bound steps at peak x prefill efficiency, plus moeflash's measured
  per-step overhead on CPUs (`hardware.EngineCosts`). Prefill: FLOPs (2 x activated parameters per
  token without the embedding; attention per key attended; the lightning indexer per entry scored)
  at peak x efficiency, plus the weights each chunk re-reads.
- **Dollars** per million input / cached-input / output tokens at a price per hour and a
  utilisation, monthly costs for a daily volume, and DeepSeek's API prices (dated) beside them.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import (CSA, FP32_KEPT_SUFFIXES, HCA, OFFICIAL_FP8_LINEAR, PRESETS, SLIDING, ModelConfig,
                      prefix_block_tokens)
from .hardware import Hardware

GIB = 2 ** 30

# DeepSeek API list prices, $ per million tokens (source: issue 7 of this project, quoting DeepSeek's
# pricing page; input = cache miss, cached = cache hit). Dates are when each price applied.
API_PRICES = [
    {"model": "DeepSeek-V4-Flash", "date": "2026-04-24 (launch)", "input": 0.14, "cached_input": 0.028, "output": 0.28},
    {"model": "DeepSeek-V4-Flash", "date": "from 2026-04-26", "input": 0.14, "cached_input": 0.0028, "output": 0.28},
    {"model": "DeepSeek-V4-Pro", "date": "list price", "input": 1.74, "cached_input": None, "output": 3.48},
]
DAYS_PER_MONTH = 30
HOURS_PER_MONTH = 24 * DAYS_PER_MONTH

WEIGHT_DTYPES = {  # --weights-dtype -> (dense format, routed-expert format)
    "bf16": ("bf16", "bf16"),
    "fp32": ("fp32", "fp32"),
    "fp8": ("fp8", "fp8"),
    "fp4-experts": ("fp8", "fp4"),  # the official V4 checkpoints: FP8 dense linears, FP4 experts
}
DENSE_FORMATS = ("bf16", "fp32", "fp8")
EXPERT_FORMATS = ("bf16", "fp32", "fp8", "fp4")
STATE_DTYPES = ("bf16", "fp32", "fp8")

# The official checkpoints' formats (config.py): FP8 linears, FP32-kept tensors, BF16 for the rest.
FP8_LINEAR = OFFICIAL_FP8_LINEAR
FP32_SUFFIXES = FP32_KEPT_SUFFIXES

COMPONENTS = ["embedding", "attention", "compressors", "lightning indexer", "mHC + norms", "router",
              "shared expert", "routed experts", "head (+ final norm, hyper head)", "rope tables", "mtp"]


class PlanError(ValueError):
    """Bad planner input; the message says what to change."""


def _component(name: str) -> str:
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith("embed."):
        return "embedding"
    if name.startswith(("head.", "norm.", "hc_head_")):
        return "head (+ final norm, hyper head)"
    if name.startswith("inv_freq"):
        return "rope tables"
    if ".ffn.experts." in name or re.search(r"\.ffn\.(q13|s13|q2|s2)$", name):  # (packed FP4 as held)
        return "routed experts"
    if ".ffn.shared_experts." in name:
        return "shared expert"
    if ".ffn.gate." in name:
        return "router"
    if ".attn.indexer." in name:
        return "lightning indexer"
    if ".attn.compressor." in name:
        return "compressors"
    if ".attn." in name:
        return "attention"
    return "mHC + norms"


# Under fp8 dense weights, the norms are held in the compute dtype (the other Linear weights, the routers
# and the embedding stay bf16 as stored: kernels.linear.Bf16Linear, weights/storage.keep_bf16).
HELD_IN_COMPUTE_DTYPE = re.compile(r"norm\.weight$")


def tensor_bytes(name: str, shape: tuple, is_float: bool, itemsize: int, dense_fmt: str, expert_fmt: str,
                 compute: str = "bf16") -> int:
    """Bytes of one tensor in the given formats (the checkpoint's layout for fp8 / fp4, the engine's
    for bf16 / fp32: fp32-kept tensors stay 4 bytes, integer buffers keep their size). `compute`
    (bf16 / fp32): the dtype the engine computes in, which the non-Linear tensors of an fp8 model take."""
    numel = math.prod(shape)
    if not is_float:
        return numel * itemsize
    if name.startswith("inv_freq"):  # RoPE tables: the engine casts them with the model (fp32 beside fp8)
        return numel * (2 if dense_fmt == "bf16" else 4)
    if name.endswith(FP32_SUFFIXES):
        return numel * 4
    routed = ".ffn.experts." in name
    fmt = expert_fmt if routed else dense_fmt
    if fmt == "fp32":
        return numel * 4
    if fmt == "bf16":
        return numel * 2
    if fmt == "fp8":
        if routed or FP8_LINEAR.search(name):
            out, inp = shape
            return numel + math.ceil(out / 128) * math.ceil(inp / 128)
        return numel * (4 if compute == "fp32" and HELD_IN_COMPUTE_DTYPE.search(name) else 2)
    if fmt == "fp4":  # routed experts only: two e2m1 per byte + one UE8M0 scale per 32 inputs
        out, inp = shape
        return out * math.ceil(inp / 2) + out * math.ceil(inp / 32)
    raise PlanError(f"unknown weight format {fmt!r}")


def _config_key(config: ModelConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


@functools.lru_cache(maxsize=32)
def _tensors(key: str) -> tuple:
    """(name, shape, is_float, itemsize, is_parameter) of every parameter and buffer of the model,
    built on the meta device one block per distinct (attention type, routing type) and repeated, so
    even V4-Pro takes well under a second."""
    import torch

    from ..model.v4 import Block, MTPBlock

    c = ModelConfig.from_dict(json.loads(key))
    d, n = c.hidden_size, c.hc_mult

    def rows(prefix, module):
        return ([(prefix + nm, tuple(t.shape), t.dtype.is_floating_point, t.element_size(), True)
                 for nm, t in module.named_parameters()]
                + [(prefix + nm, tuple(t.shape), t.dtype.is_floating_point, t.element_size(), False)
                   for nm, t in module.named_buffers()])
    out = [("embed.weight", (c.vocab_size, d), True, 4, True), ("head.weight", (c.vocab_size, d), True, 4, True),
           ("norm.weight", (d,), True, 4, True), ("hc_head_fn", (n, n * d), True, 4, True),
           ("hc_head_base", (n,), True, 4, True), ("hc_head_scale", (1,), True, 4, True),
           ("inv_freq_main", (c.qk_rope_head_dim // 2,), True, 4, False),
           ("inv_freq_compress", (c.qk_rope_head_dim // 2,), True, 4, False)]
    blocks = {}
    with torch.device("meta"):
        for i, (lt, mt) in enumerate(zip(c.layer_types, c.mlp_layer_types)):
            if (lt, mt) not in blocks:
                blocks[(lt, mt)] = rows("", Block(c, lt, i))
            out += [(f"layers.{i}.{nm}", *rest) for nm, *rest in blocks[(lt, mt)]]
        if c.num_nextn_predict_layers:
            out += rows("mtp.0.", MTPBlock(c))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _summary(key: str, dense_fmt: str, expert_fmt: str, mtp: bool, compute: str = "bf16") -> dict:
    config = ModelConfig.from_dict(json.loads(key))
    comps = {name: {"params": 0, "bytes": 0} for name in COMPONENTS}
    read = 0  # bytes a decode step reads of the dense part (floating tensors; embedding table excluded)
    expert_one = None
    mtp_params = 0
    for name, shape, is_float, itemsize, is_param in _tensors(key):
        comp = _component(name)
        if comp == "mtp":
            mtp_params += math.prod(shape) if is_param else 0
            if not mtp:
                continue
        b = tensor_bytes(name, shape, is_float, itemsize, dense_fmt, expert_fmt, compute)
        if is_param:
            comps[comp]["params"] += math.prod(shape)
        comps[comp]["bytes"] += b
        if comp not in ("routed experts", "embedding", "mtp") and is_float:
            read += b
        if comp == "routed experts" and name.startswith("layers.0.ffn.experts.0."):
            expert_one = (expert_one or 0) + b
    c = config
    n_experts = c.num_hidden_layers * c.n_routed_experts
    expert_params = 3 * c.hidden_size * c.moe_intermediate_size
    total_params = sum(v["params"] for k, v in comps.items() if k != "mtp")
    routed_params = comps["routed experts"]["params"]
    embed_bytes = comps["embedding"]["bytes"]
    dense_bytes = sum(v["bytes"] for k, v in comps.items() if k != "routed experts")
    return {
        "components": comps, "total_params": total_params, "mtp_params": mtp_params,
        "activated_params": total_params - routed_params + c.num_hidden_layers * c.num_experts_per_tok * expert_params,
        "routed_params": routed_params, "expert_params": expert_params, "n_experts": n_experts,
        "expert_bytes": expert_one, "routed_bytes": comps["routed experts"]["bytes"],
        "dense_bytes": dense_bytes, "total_bytes": dense_bytes + comps["routed experts"]["bytes"],
        "dense_read_bytes": read, "embed_row_bytes": embed_bytes // c.vocab_size,
        "head_params": c.vocab_size * c.hidden_size, "embed_params": c.vocab_size * c.hidden_size,
        "layers": c.num_hidden_layers, "experts_per_layer": c.n_routed_experts, "top_k": c.num_experts_per_tok,
        "dense_format": dense_fmt, "expert_format": expert_fmt, "mtp_included": mtp,
    }


def model_summary(config: ModelConfig, dense_fmt: str = "bf16", expert_fmt: str = "bf16", mtp: bool = False,
                  compute: str = "bf16") -> dict:
    """Parameters and bytes by component for `config` in the given formats (see `tensor_bytes`)."""
    if dense_fmt not in DENSE_FORMATS:
        raise PlanError(f"unknown dense format {dense_fmt!r}; choose {', '.join(DENSE_FORMATS)}")
    if expert_fmt not in EXPERT_FORMATS:
        raise PlanError(f"unknown expert format {expert_fmt!r}; choose {', '.join(EXPERT_FORMATS)}")
    if compute not in ("bf16", "fp32"):
        raise PlanError(f"unknown compute dtype {compute!r}; choose bf16 or fp32")
    s = dict(_summary(_config_key(config), dense_fmt, expert_fmt, mtp, compute))
    s["config"] = config
    return s


# ---------------------------------------------------------------------------------------------------
# state


def _record_bytes(config: ModelConfig, state_dtype: str) -> tuple[float, float, int]:
    """(bytes per compressed kv entry or window row, bytes per indexer key, bytes per value of the
    compressor rows in flight). fp8: vLLM's V4 record, 448 e4m3 nope + 64 bf16 rope + one UE8M0
    scale per 64 nope dims, padded to 8 bytes = 584 B; indexer key 128 e4m3 + a 4-byte scale (V4-SPEC §4)."""
    c = config
    if state_dtype in ("bf16", "fp32"):
        b = 2 if state_dtype == "bf16" else 4
        return c.head_dim * b, c.index_head_dim * b, b
    if state_dtype == "fp8":
        nope = c.head_dim - c.qk_rope_head_dim
        rec = nope + 2 * c.qk_rope_head_dim + math.ceil(nope / 64)
        return 8 * math.ceil(rec / 8), c.index_head_dim + 4, 2
    raise PlanError(f"unknown --state-dtype {state_dtype!r}; choose {', '.join(STATE_DTYPES)}")


def state_components(config: ModelConfig, tokens: int, state_dtype: str = "bf16", mtp: bool = False) -> dict:
    """Live state bytes of ONE sequence after `tokens` tokens, by component. With bf16 / fp32 the
    total equals `model.state.state_bytes(config, tokens, 2 / 4)` (what `SeqState.used_bytes` reports)."""
    c = config
    kv, idx, b = _record_bytes(c, state_dtype)
    out = {"window": 0, "csa_entries": 0, "indexer_keys": 0, "hca_entries": 0, "compressor_pending": 0}
    types = list(c.layer_types) + ([c.mtp_layer_type] if mtp and c.num_nextn_predict_layers else [])
    for t in types:
        out["window"] += min(tokens, c.sliding_window) * kv
        if t == SLIDING:
            continue
        m = c.compress_ratio(t)
        if t == CSA:
            out["csa_entries"] += (tokens // m) * kv
            out["indexer_keys"] += (tokens // m) * idx
            for w in (c.head_dim, c.index_head_dim):
                out["compressor_pending"] += (tokens % m) * 2 * w * 2 * b + (m * w * 2 * b if tokens >= m else 0)
        else:
            out["hca_entries"] += (tokens // m) * kv
            out["compressor_pending"] += (tokens % m) * c.head_dim * 2 * b
    out = {k: int(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def state_per_token(config: ModelConfig, state_dtype: str = "bf16") -> dict:
    """Asymptotic growth per token, by component (the window and pending rows are fixed-size)."""
    c = config
    kv, idx, _ = _record_bytes(c, state_dtype)
    out = {"window": 0.0, "csa_entries": 0.0, "indexer_keys": 0.0, "hca_entries": 0.0}
    for t in c.layer_types:
        if t == CSA:
            out["csa_entries"] += kv / c.compress_ratio(t)
            out["indexer_keys"] += idx / c.compress_ratio(t)
        elif t == HCA:
            out["hca_entries"] += kv / c.compress_ratio(t)
    out["total"] = sum(out.values())
    return out


def state_read_bytes(config: ModelConfig, position: int, state_dtype: str = "bf16") -> int:
    """State bytes one decode query reads when `position` tokens are already held: the visible
    window; HCA: every entry; CSA: the top-k entries plus every indexer key, or every entry (and no
    keys) while there are no more than index_topk of them (the indexer is skipped then)."""
    c = config
    kv, idx, _ = _record_bytes(c, state_dtype)
    total = 0.0
    for t in c.layer_types:
        total += min(position + 1, c.sliding_window) * kv
        if t == SLIDING:
            continue
        n = position // c.compress_ratio(t)
        if t == HCA:
            total += n * kv
        else:
            total += min(n, c.index_topk) * kv + (n * idx if n > c.index_topk else 0)
    return int(total)


# ---------------------------------------------------------------------------------------------------
# FLOPs


def _sum_min(p: int, w: int) -> int:
    """sum_{i=1..p} min(i, w)"""
    if p <= w:
        return p * (p + 1) // 2
    return w * (w + 1) // 2 + (p - w) * w


def _sum_floor(p: int, m: int) -> int:
    """sum_{i=1..p} floor(i / m)"""
    q, r = divmod(p, m)
    return m * q * (q - 1) // 2 + q * (r + 1)


def attention_keys(config: ModelConfig, start: int, end: int) -> dict:
    """Keys attended and indexer keys scored, summed over the queries at positions start..end-1
    (query p sees p+1 tokens: min(p+1, W) window rows, (p+1)//m compressed entries)."""
    c = config
    keys = index = 0
    for t in c.layer_types:
        keys += _sum_min(end, c.sliding_window) - _sum_min(start, c.sliding_window)
        if t == SLIDING:
            continue
        m = c.compress_ratio(t)
        full = _sum_floor(end, m) - _sum_floor(start, m)
        if t == HCA:
            keys += full
        else:
            cut = m * (c.index_topk + 1) - 1  # queries up to here see <= index_topk entries

            def capped(p, m=m, cut=cut):  # sum_{i=1..p} min(floor(i/m), K)
                return _sum_floor(min(p, cut), m) + c.index_topk * max(0, p - cut)
            keys += capped(end) - capped(start)
            index += (full - (_sum_floor(min(end, cut), m) - _sum_floor(min(start, cut), m)))
    return {"keys": keys, "index_keys": index}


def _attn_flops(config: ModelConfig, keys: dict) -> tuple[float, float]:
    c = config
    return 4.0 * c.num_attention_heads * c.head_dim * keys["keys"], 2.0 * c.index_n_heads * c.index_head_dim * keys["index_keys"]


def prefill_flops(config: ModelConfig, prompt: int, summary: dict | None = None, start: int = 0) -> dict:
    """FLOPs to prefill one prompt's tokens start..prompt-1 (after a prefix cache hit of `start` tokens):
    2 x (activated parameters - embedding - head) per token, the head once (logits for the last token
    only), attention 2x2xHxD per key attended, the lightning indexer 2xHixDi per entry scored."""
    s = summary or model_summary(config)
    per_token = 2.0 * (s["activated_params"] - s["embed_params"] - s["head_params"])
    attn, index = _attn_flops(config, attention_keys(config, start, prompt))
    weights = per_token * (prompt - start) + 2.0 * s["head_params"]
    return {"weights": weights, "attention": attn, "indexer": index, "total": weights + attn + index,
            "per_token": (weights + attn + index) / max(prompt - start, 1)}


def decode_flops(config: ModelConfig, position: int, summary: dict | None = None) -> float:
    """FLOPs of one decode token at `position` (logits included)."""
    s = summary or model_summary(config)
    attn, index = _attn_flops(config, attention_keys(config, position, position + 1))
    return 2.0 * (s["activated_params"] - s["embed_params"]) + attn + index


def distinct_experts(n_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts a layer reads for `batch` tokens under uniform routing."""
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** batch)


def read_bytes_per_step(summary: dict, batch: int, position: int, state_bytes_per_value: int | None = None,
                        state_dtype: str = "bf16", hit_rate: float = 1.0) -> dict:
    """Bytes one decode step of `batch` sequences at `position` reads (dense, experts by hit / miss, state)."""
    c = summary["config"]
    if state_bytes_per_value is not None:
        state_dtype = {2: "bf16", 4: "fp32"}[state_bytes_per_value]
    d = distinct_experts(c.n_routed_experts, c.num_experts_per_tok, batch)
    experts = c.num_hidden_layers * d * summary["expert_bytes"]
    dense = summary["dense_read_bytes"] + batch * summary["embed_row_bytes"]
    state = batch * state_read_bytes(c, position, state_dtype)
    return {"dense": dense, "experts_hit": experts * hit_rate, "experts_miss": experts * (1 - hit_rate),
            "state": state, "total": dense + experts + state, "distinct_experts_per_layer": d}


# ---------------------------------------------------------------------------------------------------
# inputs


@dataclass
class PlanInputs:
    model: str = "v4-flash"
    context: int = 65536
    batch: int = 1
    weights_dtype: str | None = None      # None: the model's native format (official: fp4-experts; presets: bf16)
    dense_dtype: str | None = None        # override the dense part of weights_dtype
    expert_dtype: str | None = None       # override the expert part
    state_dtype: str = "bf16"
    expert_memory_gib: float | None = None  # routed-expert budget in fast memory (None: whatever fits)
    hit_rate: float | None = None         # None: resident / total experts (uniform routing, steady state)
    prompt_len: int | None = None         # prefill length for prefill tokens/s and input cost (None: context)
    price_per_hour: float | None = None   # None: the profile's
    utilization: float = 0.5
    tokens_per_day: float = 10e6
    output_share: float = 0.0             # fraction of the daily tokens that are output tokens
    mtp: bool = False                     # hold the MTP module too (speculative decoding)
    decode_efficiency: float | None = None
    prefill_efficiency: float | None = None
    overhead: bool = True                 # add moeflash's measured CPU per-step overhead
    compute_dtype: str | None = None      # bf16 / fp32 for an fp8 model's other tensors (None: as the loader's auto)
    layer_ms: float | None = None         # measured batch-1 decode time of one layer (bench/flash_layers.py)
    head_ms: float | None = None          # measured time of the rest of a step (head, final norm; same at any depth)
    target_tokens_per_s: float | None = None  # with layer_ms: the hit rate a batch-1 stream needs to reach it
    layer_ms_store: float | None = None   # the layer time when an expert store serves the experts (its steps
    #                                       are eager: no CUDA graphs); used instead of layer_ms then
    documents: int = 1                    # documents whose states the prefix cache keeps (disk needed)
    document_tokens: int | None = None    # tokens per document (None: the prompt less the question)
    question_tokens: int = 256            # a question after the document (prefilled on a hit)
    answer_tokens: int = 256              # its answer (decoded)


def resolve_model(spec: str) -> tuple[str, ModelConfig, str]:
    """(name, config, native --weights-dtype) for a preset name or a checkpoint directory."""
    if spec in PRESETS:
        return spec, ModelConfig.preset(spec), ("fp4-experts" if spec in ("v4-flash", "v4-pro") else "bf16")
    p = Path(spec)
    if p.is_dir() or p.name == "config.json":
        cfg = ModelConfig.from_json(p)
        q = cfg.quantization_config or {}
        native = ("fp4-experts" if (cfg.expert_dtype or q.get("expert_dtype")) == "fp4"
                  else "fp8" if q.get("quant_method") == "fp8" else "bf16")
        return p.name or str(p), cfg, native
    raise PlanError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory "
                    "with a config.json")


def held_in_compute_params(config: ModelConfig, expert_fmt: str = "fp4", mtp: bool = False) -> int:
    """Parameters an fp8-dense model holds in its compute dtype (neither FP8 linears nor FP4 experts):
    what the loader's `--dtype auto` weighs (weights.build.resolve_dtype)."""
    n = 0
    for name, shape, is_float, _, is_param in _tensors(_config_key(config)):
        if not is_param or not is_float or (name.startswith("mtp.") and not mtp) or FP8_LINEAR.search(name):
            continue
        if ".ffn.experts." in name and expert_fmt in ("fp4", "fp8"):
            continue
        n += math.prod(shape)
    return n


def _check_inputs(inp: PlanInputs, config: ModelConfig, hw: Hardware) -> None:
    def bad(msg):
        raise PlanError(msg)

    if inp.layer_ms is not None and not inp.layer_ms > 0:
        bad(f"--layer-ms must be > 0 (milliseconds per layer per decode step), got {inp.layer_ms}")
    if inp.head_ms is not None and (inp.layer_ms is None or not inp.head_ms >= 0):
        bad(f"--head-ms needs --layer-ms and must be >= 0, got {inp.head_ms}")
    if not isinstance(inp.context, int) or inp.context < 1:
        bad(f"--context must be a positive number of tokens, got {inp.context}")
    if inp.context > config.max_position_embeddings:
        bad(f"--context {inp.context:,} exceeds the model's maximum context of {config.max_position_embeddings:,} "
            "tokens (max_position_embeddings)")
    if inp.prompt_len is not None and not 1 <= inp.prompt_len <= inp.context:
        bad(f"--prompt-len must be between 1 and --context ({inp.context}), got {inp.prompt_len}")
    if not isinstance(inp.batch, int) or inp.batch < 1:
        bad(f"--batch must be >= 1, got {inp.batch}")
    if inp.expert_memory_gib is not None and not inp.expert_memory_gib >= 0:
        bad(f"--expert-memory must be >= 0 GiB, got {inp.expert_memory_gib}")
    if inp.hit_rate is not None and not 0 <= inp.hit_rate <= 1:
        bad(f"--hit-rate must be in [0, 1], got {inp.hit_rate}")
    if not 0 < inp.utilization <= 1:
        bad(f"--utilization must be in (0, 1] (the fraction of the hours the machine is busy), got {inp.utilization}")
    if inp.price_per_hour is not None and inp.price_per_hour < 0:
        bad(f"--price-per-hour must be >= 0, got {inp.price_per_hour}")
    if inp.tokens_per_day < 0:
        bad(f"--tokens-per-day must be >= 0, got {inp.tokens_per_day}")
    if not 0 <= inp.output_share <= 1:
        bad(f"--output-share must be in [0, 1], got {inp.output_share}")
    for name in ("decode_efficiency", "prefill_efficiency"):
        v = getattr(inp, name)
        if v is not None and not 0 < v <= 1:
            bad(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
    for name, low in (("documents", 1), ("question_tokens", 1), ("answer_tokens", 0)):
        v = getattr(inp, name)
        if not isinstance(v, int) or v < low:
            bad(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v}")
    doc = document_tokens(inp)
    if not isinstance(doc, int) or doc < 1:
        bad(f"--document-tokens must be a positive number of tokens, got {doc}")
    if doc + inp.question_tokens > config.max_position_embeddings:
        bad(f"--document-tokens + --question-tokens ({doc + inp.question_tokens:,}) exceed the model's maximum "
            f"context of {config.max_position_embeddings:,} tokens")
    if inp.state_dtype not in STATE_DTYPES:
        bad(f"unknown --state-dtype {inp.state_dtype!r}; choose {', '.join(STATE_DTYPES)}")
    if inp.weights_dtype is not None and inp.weights_dtype not in WEIGHT_DTYPES:
        bad(f"unknown --weights-dtype {inp.weights_dtype!r}; choose {', '.join(WEIGHT_DTYPES)}")


def _peak_flops(hw: Hardware, dense_fmt: str) -> float:
    if dense_fmt == "fp8" and hw.tflops_fp8:
        return hw.tflops_fp8 * 1e12
    if dense_fmt == "fp32" and hw.kind == "cpu":
        return hw.tflops * 1e12 * 0.45  # this box: fp32 181 vs bf16 406 GFLOP/s (BENCHMARKS.md prefill)
    return hw.tflops * 1e12


# ---------------------------------------------------------------------------------------------------
# the plan


def expected_max_load(n_experts: int, used: float, devices: int) -> float:
    """Expected number of used experts on the busiest device, when `used` distinct experts of a
    layer's `n_experts` (spread evenly over `devices`) are drawn uniformly: a step of an
    expert-parallel layer waits for that device. `used` for one device."""
    if devices <= 1:
        return used
    return _max_load(n_experts, int(round(used)), devices)


@functools.lru_cache(maxsize=4096)
def _max_load(n_experts: int, used: int, devices: int) -> float:
    import numpy as np

    if used <= 0:
        return 0.0
    rng = np.random.default_rng(0)
    per = -(-n_experts // devices)
    picks = np.argpartition(rng.random((2000, n_experts)), used - 1, axis=1)[:, :used] // per
    counts = np.stack([np.bincount(r, minlength=devices) for r in picks])
    return float(counts.max(axis=1).mean())


def plan(inp: PlanInputs, hw: Hardware) -> dict:
    """Everything the planner reports, as one JSON-ready dict (see the module docstring)."""
    name, config, native = resolve_model(inp.model)
    _check_inputs(inp, config, hw)
    wd = inp.weights_dtype or native
    dense_fmt, expert_fmt = WEIGHT_DTYPES[wd]
    dense_fmt = inp.dense_dtype or dense_fmt
    expert_fmt = inp.expert_dtype or expert_fmt
    engine = hw.engine if inp.overhead else None
    notes = []
    force_store = False
    compute = inp.compute_dtype or "bf16"
    if dense_fmt == "fp8" and inp.compute_dtype is None:  # the loader's `--dtype auto`, on this profile's RAM
        held = held_in_compute_params(config, expert_fmt, inp.mtp)
        compute = "fp32" if 4 * held <= 0.4 * hw.memory_gib * GIB else "bf16"
        notes.append(f"FP8 linears and FP4 experts are held at storage precision; the other tensors in {compute} "
                     "(`--dtype auto`: fp32 when they fit in 40% of RAM)")
    if engine is not None and expert_fmt == "fp8":
        notes.append("moeflash holds FP8 routed experts per expert (no grouped kernel): timed as expert calls")
    s = model_summary(config, dense_fmt, expert_fmt, inp.mtp, compute)
    c = config
    ctx, batch = inp.context, inp.batch
    prompt = inp.prompt_len or ctx
    dec_eff = inp.decode_efficiency or hw.decode_efficiency
    pre_eff = inp.prefill_efficiency or hw.prefill_efficiency
    G = max(1, hw.devices)

    # ---- memory and tiers -------------------------------------------------------------------------
    capacity = hw.memory_gib * GIB * (1 - hw.reserve_fraction) - hw.runtime_gib * GIB
    st_seq = state_components(c, ctx, inp.state_dtype, inp.mtp)
    st_total = batch * st_seq["total"]
    eb, n_exp = s["expert_bytes"], s["n_experts"]
    free_for_experts = capacity - s["dense_bytes"] - st_total
    if inp.expert_memory_gib is not None:
        budget = inp.expert_memory_gib * GIB
        if budget > max(free_for_experts, 0):
            notes.append(f"--expert-memory {inp.expert_memory_gib:g} GiB is more than the "
                         f"{max(free_for_experts, 0) / GIB:.1f} GiB of fast memory left after dense weights and state")
    else:
        budget = max(0.0, min(s["routed_bytes"], free_for_experts))
    resident = int(min(n_exp, budget // eb)) if eb else n_exp
    rest = n_exp - resident
    host_cap = hw.host_memory_gib * GIB * 0.9
    host_experts = int(min(rest, host_cap // eb)) if hw.host_memory_gib and eb else 0
    disk_experts = rest - host_experts
    store = inp.expert_memory_gib is not None or rest > 0 or force_store
    fast_used = s["dense_bytes"] + resident * eb + st_total
    fits = fast_used <= capacity and (disk_experts == 0 or bool(hw.disk_gbps))
    if s["dense_bytes"] + st_total > capacity:
        notes.append("dense weights and sequence state alone exceed the fast memory: lower --batch or --context, "
                     "or use bigger hardware")
    if disk_experts and not hw.disk_gbps:
        notes.append("experts do not fit in memory and the profile has no disk tier (give --disk-bandwidth)")
    free_for_state = capacity - s["dense_bytes"] - resident * eb
    max_batch = int(max(0, free_for_state) // st_seq["total"]) if st_seq["total"] else None
    hit = inp.hit_rate if inp.hit_rate is not None else (resident / n_exp if n_exp else 1.0)
    hit_src = ("given (--hit-rate)" if inp.hit_rate is not None else
               "resident / total experts: uniform routing in steady state (conservative: real routing is skewed "
               "and LFU does better; measure with `moeflash trace` + `moeflash bench experts`)")
    host_share = host_experts / rest if rest else 0.0

    comps = []
    for cname in COMPONENTS:
        v = s["components"][cname]
        if cname == "mtp" and not inp.mtp:
            continue
        if cname == "routed experts":
            tier = {"fast": resident * eb, "host": host_experts * eb, "disk": disk_experts * eb}
        else:
            tier = {"fast": v["bytes"], "host": 0, "disk": 0}
        comps.append({"name": cname, "params": v["params"], "bytes": v["bytes"], "tiers": tier})
    by_tier = {k: sum(x["tiers"][k] for x in comps) for k in ("fast", "host", "disk")}

    # ---- decode -----------------------------------------------------------------------------------
    # One device's share of a step (the step waits for the slowest): dense weights / G (tensor
    # parallel), the busiest device's routed experts (expert parallel), ceil(B / G) sequences' state.
    peak = _peak_flops(hw, dense_fmt)
    dev_bw = hw.bandwidth_gbps * 1e9 / G
    dev_link = hw.host_link_gbps * 1e9 / G if hw.host_link_gbps else None
    disk_bw = hw.disk_gbps * 1e9 if hw.disk_gbps else None
    if engine is not None and engine.miss_gbps and disk_bw:  # moeflash's store: measured miss path
        disk_bw = min(disk_bw, engine.miss_gbps * 1e9)
    fp4_rate = None
    if engine is not None and expert_fmt == "fp4":
        ref = 0.420  # the bf16 matmul peak (TFLOP/s) of the box where fp4_gweights_per_s was measured
        fp4_rate = engine.fp4_gweights_per_s * 1e9 * max(1.0, hw.tflops / ref)

    def lower_time(miss_dev: float, miss_total: float) -> tuple[float, float, float]:
        """(host bytes per device, disk bytes in all, seconds) for the misses of a step."""
        host_b, disk_b = miss_dev * host_share, miss_total * (1 - host_share)
        th = host_b / dev_link if host_b and dev_link else 0.0
        td = disk_b / disk_bw if disk_b and disk_bw else (math.inf if disk_b else 0.0)
        return host_b, disk_b, th + td

    def overhead_s(b: int, distinct: float) -> float:
        t = c.num_hidden_layers * hw.layer_sync_us / 1e6
        if engine is None:
            return t
        per = engine.layer_ms / 1e3 + b * engine.seq_layer_ms / 1e3
        if store or expert_fmt not in ("bf16", "fp4"):  # one call chain per expert used (expert store, fp8)
            per += distinct * engine.expert_call_us / 1e6 + (engine.store_layer_ms / 1e3 if store else 0.0)
        elif expert_fmt == "fp4":  # resident FP4: one fused kernel call for all (token, expert) pairs
            pass
        else:  # grouped matmuls over every expert of the layer
            per += c.n_routed_experts * engine.group_us / 1e6
        if fp4_rate:
            per += distinct * s["expert_params"] / fp4_rate
        return t + c.num_hidden_layers * per

    def decode(b: int) -> dict:
        r = read_bytes_per_step(s, b, ctx, state_dtype=inp.state_dtype, hit_rate=hit)
        d = r["distinct_experts_per_layer"]
        dev_experts = c.num_hidden_layers * expected_max_load(c.n_routed_experts, d, G) * eb
        dense_dev = s["dense_read_bytes"] / G + math.ceil(b / G) * s["embed_row_bytes"]
        state_dev = math.ceil(b / G) * state_read_bytes(c, ctx, inp.state_dtype)
        host_b, disk_b, t_low = lower_time(dev_experts * (1 - hit), r["experts_miss"])
        t_fast = (dense_dev + dev_experts * hit + state_dev) / dev_bw
        flops = b * decode_flops(c, ctx, s)
        t_comp = flops / peak
        roof = max(t_fast, host_b / dev_link if host_b and dev_link else 0.0,
                   disk_b / disk_bw if disk_b and disk_bw else (math.inf if disk_b else 0.0), t_comp)
        t_mem = t_fast / dec_eff + t_low
        t_cmp = t_comp / pre_eff
        t_ovh = overhead_s(b, d)
        step = max(t_mem, t_cmp) + t_ovh
        return {
            "batch": b, "distinct_experts_per_layer": d,
            "bytes_per_step": {"dense": r["dense"], "experts_fast": r["experts_hit"],
                               "experts_host": r["experts_miss"] * host_share,
                               "experts_disk": r["experts_miss"] * (1 - host_share), "state": r["state"],
                               "total": r["total"]},
            "bytes_per_step_busiest_device": {"dense": dense_dev, "experts": dev_experts, "state": state_dev}
            if G > 1 else None,
            "bytes_per_token": r["total"] / b, "flops_per_token": flops / b,
            "time_ms": {"fast_memory": 1e3 * t_fast / dec_eff, "lower_tiers": 1e3 * t_low, "compute": 1e3 * t_cmp,
                        "overhead": 1e3 * t_ovh, "step": 1e3 * step},
            "bound": ("overhead" if t_ovh > max(t_mem, t_cmp) else "compute" if t_cmp > t_mem
                      else "lower tiers" if t_low > t_fast / dec_eff else "memory bandwidth"),
            "roofline_tokens_per_s": b / roof if roof > 0 else math.inf,
            "expected_tokens_per_s": b / step if step > 0 else math.inf,
        }

    dec1 = decode(1)
    decb = decode(batch) if batch > 1 else dec1
    if inp.layer_ms is not None:
        # A measured layer (at real layer sizes, all experts resident) replaces the per-layer model; the
        # head, final norm and hyper head are still modelled (their bytes at the decode efficiency) unless
        # measured too. Experts outside fast memory add their copies: at batch 1 each layer uses top_k
        # experts, (1 - hit) of them missing, each brought over the host link (or read from disk) at the
        # profile's speed (measured, with `--measured`), without overlap with compute (an upper bound on
        # the copy time: prefetch hides part of it).
        head_b = s["components"]["head (+ final norm, hyper head)"]["bytes"] + s["embed_row_bytes"]
        head_ms = inp.head_ms if inp.head_ms is not None else 1e3 * head_b / (dev_bw * dec_eff)
        layer_ms = inp.layer_ms_store if rest and inp.layer_ms_store else inp.layer_ms
        layers_ms = c.num_hidden_layers * layer_ms
        per_miss_ms = 0.0
        if rest:
            host_ms = 1e3 * eb / dev_link if dev_link else math.inf
            disk_ms = 1e3 * eb / disk_bw if disk_bw else math.inf
            per_miss_ms = host_share * host_ms + (1 - host_share) * disk_ms
        misses = c.num_hidden_layers * c.num_experts_per_tok * (1 - hit) if rest else 0.0
        copy_ms = misses * per_miss_ms if misses else 0.0
        step_ms = layers_ms + head_ms + copy_ms
        ml = {"layer_ms": layer_ms, "layer_steps": "eager (expert store)" if layer_ms is not inp.layer_ms
              else "as measured", "layers": c.num_hidden_layers, "head_ms": head_ms,
              "head_measured": inp.head_ms is not None, "experts_resident": resident, "experts_total": n_exp,
              "hit_rate": hit, "expert_misses_per_token": misses, "ms_per_miss": per_miss_ms,
              "copy_ms": copy_ms, "step_ms": step_ms, "tokens_per_s": 1e3 / step_ms if step_ms else math.inf}
        if inp.target_tokens_per_s:
            spare = 1e3 / inp.target_tokens_per_s - layers_ms - head_ms
            per_token_all = c.num_hidden_layers * c.num_experts_per_tok * per_miss_ms
            if spare < 0:
                need = None  # not reachable even with every expert hitting
            elif not rest or per_token_all == 0:
                need = 0.0
            else:
                need = min(1.0, max(0.0, 1 - spare / per_token_all))
            ml["target_tokens_per_s"] = inp.target_tokens_per_s
            ml["hit_rate_needed"] = need
        dec1["from_measured_layer"] = ml

    # ---- prefill ----------------------------------------------------------------------------------
    def prefill_time(end: int, start: int = 0) -> dict:
        """Prefilling tokens start..end-1: compute at peak x efficiency, the weights each chunk re-reads,
        the per-chunk overhead."""
        pf = prefill_flops(c, end, s, start)
        n = end - start
        chunk = max(1, min(hw.prefill_chunk, n))
        chunks = math.ceil(n / chunk)
        d_chunk = distinct_experts(c.n_routed_experts, c.num_experts_per_tok, chunk)
        w_chunk = s["dense_read_bytes"] + c.num_hidden_layers * d_chunk * eb
        miss_chunk = c.num_hidden_layers * d_chunk * eb * (1 - hit)
        _, _, t_low_chunk = lower_time(miss_chunk / G, miss_chunk)
        t_comp = pf["total"] / (peak * pre_eff)
        t_w = chunks * ((w_chunk - miss_chunk) / G / (dev_bw * dec_eff) + t_low_chunk)
        t_ovh = chunks * overhead_s(1, d_chunk)
        roof = max(pf["total"] / peak, chunks * w_chunk / G / dev_bw)
        return {"prompt_tokens": n, "chunk": chunk, "flops": pf, "weights_read_per_chunk": w_chunk,
                "time_s": {"compute": t_comp, "weights": t_w, "overhead": t_ovh, "total": t_comp + t_w + t_ovh},
                "roofline_tokens_per_s": n / roof, "expected_tokens_per_s": n / (t_comp + t_w + t_ovh)}

    prefill = prefill_time(prompt)

    # ---- dollars ----------------------------------------------------------------------------------
    price = inp.price_per_hour if inp.price_per_hour is not None else hw.price_per_hour
    u = inp.utilization
    cached_tps = hw.bandwidth_gbps * 1e9 * dec_eff / max(state_per_token(c, inp.state_dtype)["total"], 1.0)

    def per_million(tps):
        return per_million_usd(price, tps, u)
    cost = {
        "price_per_hour": price, "price_source": (hw.sources.get("price_per_hour") if inp.price_per_hour is None
                                                  else "given (--price-per-hour)"),
        "utilization": u,
        "usd_per_million": {"input": per_million(prefill["expected_tokens_per_s"]),
                            "cached_input": per_million(cached_tps),
                            "output": per_million(decb["expected_tokens_per_s"]),
                            "output_batch1": per_million(dec1["expected_tokens_per_s"])},
        "api_prices": API_PRICES,
        "monthly": monthly_cost(inp.tokens_per_day, inp.output_share, price, prefill["expected_tokens_per_s"],
                                decb["expected_tokens_per_s"], u),
    }
    prefix = prefix_cache_plan(inp, c, hw, prompt, prefill_time, decb, dev_bw * G * dec_eff, disk_bw, price, u)

    if engine is not None:
        notes.append("expected tokens/s include moeflash's measured CPU step overhead (per layer, per sequence, per "
                     "expert group or call); --no-overhead shows an engine without it, reading native formats")
    if hw.kind == "gpu":
        notes.append("moeflash has no GPU path yet: GPU efficiencies are other engines' published measurements "
                     "(see hardware sources)")
    if batch > 1 and max_batch is not None and batch > max_batch:
        notes.append(f"batch {batch} at context {ctx:,} does not fit next to the resident experts: at most "
                     f"{max_batch} sequences")

    return {
        "model": {"name": name, "source": inp.model, "layers": c.num_hidden_layers,
                  "routed_experts_per_layer": c.n_routed_experts, "top_k": c.num_experts_per_tok,
                  "total_params": s["total_params"], "activated_params": s["activated_params"],
                  "mtp_params": s["mtp_params"], "expert_params": s["expert_params"],
                  "max_context": c.max_position_embeddings},
        "hardware": hw.to_dict(),
        "inputs": {"context": ctx, "batch": batch, "weights_dtype": wd, "dense_format": dense_fmt,
                   "compute_dtype": compute,
                   "expert_format": expert_fmt, "state_dtype": inp.state_dtype,
                   "expert_memory_gib": inp.expert_memory_gib, "hit_rate": hit, "hit_rate_source": hit_src,
                   "prompt_len": prompt, "utilization": u, "tokens_per_day": inp.tokens_per_day,
                   "output_share": inp.output_share, "mtp": inp.mtp, "decode_efficiency": dec_eff,
                   "prefill_efficiency": pre_eff, "overhead_modelled": engine is not None},
        "weights": {"components": comps, "total_params": s["total_params"], "total_bytes": s["total_bytes"],
                    "dense_bytes": s["dense_bytes"], "routed_bytes": s["routed_bytes"], "expert_bytes": eb,
                    "experts_total": n_exp, "experts_resident": resident, "experts_host": host_experts,
                    "experts_disk": disk_experts, "by_tier": by_tier, "expert_store": store},
        "state": {"dtype": inp.state_dtype, "per_token": state_per_token(c, inp.state_dtype),
                  "per_sequence_at_context": st_seq, "batch_total": st_total},
        "memory": {"fast_capacity": capacity, "reserve_fraction": hw.reserve_fraction, "runtime": hw.runtime_gib * GIB,
                   "dense": s["dense_bytes"], "experts_resident": resident * eb, "state": st_total,
                   "fast_used": fast_used, "fits": fits, "max_batch_at_context": max_batch,
                   "host_used": host_experts * eb, "disk_used": disk_experts * eb},
        "decode": {"batch_1": dec1, "batch_n": decb},
        "prefill": prefill,
        "prefix_cache": prefix,
        "cost": cost,
        "notes": notes,
    }


def per_million_usd(price_per_hour: float | None, tokens_per_s: float, utilization: float) -> float | None:
    """Dollars per million tokens from a machine's price per hour, its tokens/s and the fraction of
    the hours it is busy; None without a price or when it does not run."""
    if price_per_hour is None or not tokens_per_s > 0:
        return None
    return price_per_hour / (tokens_per_s * 3600 * utilization) * 1e6


def document_tokens(inp: PlanInputs) -> int:
    """The prefix cache's document: --document-tokens, or the prompt less the question."""
    if inp.document_tokens is not None:
        return inp.document_tokens
    return max(1, (inp.prompt_len or inp.context) - inp.question_tokens)


def prefix_cache_plan(inp: PlanInputs, c: ModelConfig, hw: Hardware, prompt: int, prefill_time, dec: dict,
                      copy_bw: float, disk_bw: float | None, price: float | None, utilization: float) -> dict:
    """The prefix cache for `documents` documents of `document_tokens` tokens, each then asked a
    question of `question_tokens` tokens answered in `answer_tokens`: the saved state (moeflash saves
    the whole state at the document's last block boundary), the RAM or disk it takes, and one question's
    time and dollars without a hit (the whole prompt prefilled) and with one (the state restored from
    RAM: read and written once; or from disk: read once; then the question prefilled from there)."""
    doc = document_tokens(inp)
    block = prefix_block_tokens(c)
    saved = doc // block * block
    snap = state_components(c, saved, inp.state_dtype, inp.mtp)["total"] if saved else 0.0
    q, a = inp.question_tokens, inp.answer_tokens
    tps = dec["expected_tokens_per_s"]
    t_decode = (a / tps if tps > 0 else math.inf) if a else 0.0  # 0 tokens/s: the model does not run here
    miss = prefill_time(doc + q)["time_s"]["total"]
    hit_prefill = prefill_time(doc + q, saved)["time_s"]["total"] if saved else miss
    t_ram = 2 * snap / copy_bw  # a copy: read and write
    t_disk = snap / disk_bw if disk_bw else None

    def usd(seconds):
        ok = price is not None and seconds is not None and math.isfinite(seconds)
        return price * seconds / 3600 / utilization if ok else None

    def vs_miss(seconds):
        return seconds / miss if math.isfinite(miss) and miss > 0 and seconds is not None else None

    question = {
        "miss": {"prefill_s": miss, "decode_s": t_decode, "total_s": miss + t_decode,
                 "usd": usd(miss + t_decode)},
        "hit_from_ram": {"restore_s": t_ram, "prefill_s": hit_prefill, "decode_s": t_decode,
                         "total_s": t_ram + hit_prefill + t_decode, "usd": usd(t_ram + hit_prefill + t_decode),
                         "time_to_first_token_vs_miss": vs_miss(t_ram + hit_prefill)},
        "hit_from_disk": None if t_disk is None else {
            "restore_s": t_disk, "prefill_s": hit_prefill, "decode_s": t_decode,
            "total_s": t_disk + hit_prefill + t_decode, "usd": usd(t_disk + hit_prefill + t_decode),
            "time_to_first_token_vs_miss": vs_miss(t_disk + hit_prefill)},
    }
    return {
        "block_tokens": block, "documents": inp.documents, "document_tokens": doc, "saved_at_tokens": saved,
        "question_tokens": q, "answer_tokens": a, "state_dtype": inp.state_dtype,
        "snapshot_bytes": snap, "snapshot_bytes_per_token": snap / saved if saved else None,
        "disk_bytes": inp.documents * snap,
        "arithmetic": (f"{inp.documents:,} x state({saved:,} tokens) = {inp.documents:,} x {snap / 1e6:,.1f} MB "
                       f"= {inp.documents * snap / 1e9:,.2f} GB"),
        "question": question,
    }


def monthly_cost(tokens_per_day: float, output_share: float, price_per_hour: float | None,
                 input_tps: float, output_tps: float, utilization: float = 1.0) -> dict:
    """A month (30 days) of `tokens_per_day` through the API and self-hosted, with the arithmetic.

    API: tokens x $ per million / 1e6 per price row. Self-hosted: a dedicated machine costs
    price/h x 720 h whatever it does; the machine-hours the volume needs = input tokens / input tok/s
    + output tokens / output tok/s (/ utilisation), and whether one machine can do it."""
    month = tokens_per_day * DAYS_PER_MONTH
    t_in, t_out = month * (1 - output_share), month * output_share
    api = []
    for row in API_PRICES:
        usd = t_in / 1e6 * row["input"] + t_out / 1e6 * row["output"]
        api.append({"model": row["model"], "date": row["date"], "usd": usd,
                    "arithmetic": (f"{t_in / 1e6:,.0f}M input x ${row['input']}/M"
                                   + (f" + {t_out / 1e6:,.0f}M output x ${row['output']}/M" if t_out else "")
                                   + f" = ${usd:,.2f}")})
    out = {"tokens_per_day": tokens_per_day, "days": DAYS_PER_MONTH, "tokens_per_month": month,
           "input_tokens": t_in, "output_tokens": t_out,
           "arithmetic": f"{tokens_per_day:,.0f} tokens/day x {DAYS_PER_MONTH} days = {month:,.0f} tokens",
           "api": api}
    if price_per_hour is not None and ((t_in and not input_tps > 0) or (t_out and not output_tps > 0)):
        out["self_hosted"] = {"cannot_serve": True,
                              "reason": "the model does not run on this hardware as planned (0 tokens/s; "
                                        "see the memory section)"}
    elif price_per_hour is not None:
        hours = (t_in / input_tps if t_in else 0.0) / 3600 + (t_out / output_tps if t_out else 0.0) / 3600
        hours /= utilization
        dedicated = price_per_hour * HOURS_PER_MONTH
        out["self_hosted"] = {
            "dedicated_usd": dedicated,
            "dedicated_arithmetic": f"${price_per_hour:,.2f}/h x {HOURS_PER_MONTH} h = ${dedicated:,.2f}",
            "machine_hours_needed": hours, "machines_needed": math.ceil(hours / HOURS_PER_MONTH) if hours else 0,
            "busy_fraction_of_one_machine": hours / HOURS_PER_MONTH,
            "pay_per_hour_used_usd": hours * price_per_hour,
            "hours_arithmetic": (f"({t_in:,.0f} / {input_tps:,.1f} tok/s + {t_out:,.0f} / {output_tps:,.1f} tok/s)"
                                 f" / 3600 / {utilization:g} = {hours:,.1f} h"),
        }
        per_token_s = ((1 - output_share) / input_tps if output_share < 1 else 0.0) \
            + (output_share / output_tps if output_share > 0 else 0.0)
        capacity = 86400 / per_token_s if per_token_s > 0 else math.inf
        out["self_hosted"]["capacity_tokens_per_day"] = capacity
        flash = API_PRICES[1]
        api_per_token = ((1 - output_share) * flash["input"] + output_share * flash["output"]) / 1e6
        if api_per_token > 0:
            be = dedicated / DAYS_PER_MONTH / api_per_token
            out["self_hosted"]["break_even_tokens_per_day"] = be
            out["self_hosted"]["break_even_reachable"] = be <= capacity
    return out
