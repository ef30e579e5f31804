"""Export a DeepSeek-V4 model as a GGUF file for llama.cpp's `deepseek4` architecture.

What llama.cpp (as bundled in llama-cpp-python 0.3.36) reads, and how our tensors map onto it:
- Metadata under the `deepseek4.` prefix (`arch_metadata` lists every key and its GGUF type; the
  loader checks the types strictly, so integers are UINT32 and reals FLOAT32), and a `gpt2` (byte-level
  BPE) tokenizer.
- Tensors under llama.cpp's names (`_TOP_NAMES`, `_BLOCK_NAMES`). Linear weights keep our [out, in]
  layout (GGUF lists dims innermost first, so the file says {in, out}); nothing is transposed or
  permuted: llama.cpp rotates interleaved pairs of the trailing rope dims like we do, reads `wo_a` as
  [groups * rank, group_in] and splits it per group, and the mHC mixing rows come in our order.
- Routed experts stacked per layer: `ffn_gate_exps` / `ffn_up_exps` [E, I, dim] (w1 / w3) and
  `ffn_down_exps` [E, dim, I] (w2). Hash-routed layers carry `ffn_gate_tid2eid` (I32 [vocab, k]) and
  must be the first layers; the others carry the selection bias `exp_probs_b.bias`.
- MTP is not exported: llama.cpp's own converter skips it for the main file (it loads MTP only from a
  separate MTP-only GGUF, on request, and then mixes the main model's `hc_head` into it).

Tensor types: routed experts as `expert_type` (MXFP4 by default, lossless for FP4 weights, see
`mxfp4_blocks`); other matrices as `dense_type`; 1-D tensors, mHC mixing matrices, compressor position
biases, the router and the indexer's head weights stay F32 (they steer Sinkhorn, routing and top-k).

llama.cpp's deepseek4 runtime has hard limits that our model does not; `check_llama_cpp_compatible`
turns each into a ValueError naming the field before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import CSA, HASH_MOE, HCA, ModelConfig
from ..model.v4 import Transformer
from .quant import FP4_GROUP, quant_fp4, unpack_fp4

ARCH = "deepseek4"
EXPERT_TYPES = ("mxfp4", "q8_0", "bf16", "f16", "f32")
DENSE_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp hard-codes these (DSV4_CSA_RATIO / DSV4_HCA_RATIO, `GGML_ASSERT(hc == 4)`).
LLAMA_CSA_RATIO, LLAMA_HCA_RATIO, LLAMA_HC_MULT = 4, 128, 4
# The lightning indexer always applies a 64-wide (or wider) Hadamard rotation per indexer head.
LLAMA_INDEX_HEAD_MULTIPLE = 64
# llama.cpp's deepseek4 loader does not read YaRN betas; its context uses these defaults.
LLAMA_YARN_BETAS = (32.0, 1.0)
GATING_SQRT_SOFTPLUS = 4  # llama_expert_gating_func_type
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

# internal (official) name -> GGUF name; blocks are `layers.{i}.` -> `blk.{i}.`
_TOP_NAMES = {
    "embed.weight": "token_embd.weight",
    "head.weight": "output.weight",
    "norm.weight": "output_norm.weight",
    "hc_head_fn": "output_hc_fn.weight",
    "hc_head_base": "output_hc_base.weight",
    "hc_head_scale": "output_hc_scale.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "hc_attn_fn": "hc_attn_fn.weight",
    "hc_attn_base": "hc_attn_base.weight",
    "hc_attn_scale": "hc_attn_scale.weight",
    "hc_ffn_fn": "hc_ffn_fn.weight",
    "hc_ffn_base": "hc_ffn_base.weight",
    "hc_ffn_scale": "hc_ffn_scale.weight",
    "attn.attn_sink": "attn_sinks.weight",
    "attn.wq_a.weight": "attn_q_a.weight",
    "attn.q_norm.weight": "attn_q_a_norm.weight",
    "attn.wq_b.weight": "attn_q_b.weight",
    "attn.wkv.weight": "attn_kv.weight",
    "attn.kv_norm.weight": "attn_kv_a_norm.weight",
    "attn.wo_a.weight": "attn_output_a.weight",
    "attn.wo_b.weight": "attn_output_b.weight",
    "attn.compressor.wkv.weight": "attn_compressor_kv.weight",
    "attn.compressor.wgate.weight": "attn_compressor_gate.weight",
    "attn.compressor.ape": "attn_compressor_ape.weight",
    "attn.compressor.norm.weight": "attn_compressor_norm.weight",
    "attn.indexer.wq_b.weight": "indexer.attn_q_b.weight",
    "attn.indexer.weights_proj.weight": "indexer.proj.weight",
    "attn.indexer.compressor.wkv.weight": "indexer_compressor_kv.weight",
    "attn.indexer.compressor.wgate.weight": "indexer_compressor_gate.weight",
    "attn.indexer.compressor.ape": "indexer_compressor_ape.weight",
    "attn.indexer.compressor.norm.weight": "indexer_compressor_norm.weight",
    "ffn.gate.weight": "ffn_gate_inp.weight",
    "ffn.gate.bias": "exp_probs_b.bias",
    "ffn.gate.tid2eid": "ffn_gate_tid2eid.weight",
    "ffn.shared_experts.w1.weight": "ffn_gate_shexp.weight",
    "ffn.shared_experts.w2.weight": "ffn_down_shexp.weight",
    "ffn.shared_experts.w3.weight": "ffn_up_shexp.weight",
}
# routed expert projection -> stacked GGUF tensor
_EXPERT_NAMES = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}
# 2-D tensors kept in F32 whatever dense_type says (small, and they decide mixing / routing / top-k).
_F32_MATRICES = ("hc_attn_fn", "hc_ffn_fn", "hc_head_fn", ".ape", "ffn.gate.weight",
                 "indexer.weights_proj.weight")


def gguf_name(name: str) -> str:
    """llama.cpp's name for one of our (official) tensor names; routed experts and `mtp.*` have none
    (experts are stacked per layer, MTP is not exported)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"blk.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    raise KeyError(f"no llama.cpp deepseek4 tensor for {name!r}")


# ------------------------------------------------------------------------------------------------
# constraints


def check_llama_cpp_compatible(config: ModelConfig, expert_type: str = "mxfp4",
                               dense_type: str = "f32") -> None:
    """Raise ValueError (naming the field) for anything llama.cpp's deepseek4 cannot run as we do."""
    def bad(field: str, msg: str) -> None:
        raise ValueError(f"cannot export to llama.cpp deepseek4: ModelConfig.{field} {msg}")

    if expert_type not in EXPERT_TYPES:
        raise ValueError(f"expert_type must be one of {', '.join(EXPERT_TYPES)}, got {expert_type!r}")
    if dense_type not in DENSE_TYPES:
        raise ValueError(f"dense_type must be one of {', '.join(DENSE_TYPES)}, got {dense_type!r}")
    c = config
    if c.hc_mult != LLAMA_HC_MULT:
        bad("hc_mult", f"is {c.hc_mult}; llama.cpp only implements {LLAMA_HC_MULT} mHC streams")
    if c.scoring_func != "sqrtsoftplus":
        bad("scoring_func", f"is {c.scoring_func!r}; llama.cpp's deepseek4 loader only accepts 'sqrtsoftplus'")
    used = set(c.layer_types)
    for lt, want in ((CSA, LLAMA_CSA_RATIO), (HCA, LLAMA_HCA_RATIO)):
        if lt in used and c.compress_rates.get(lt) != want:
            bad("compress_rates", f"gives {lt!r} rate {c.compress_rates.get(lt)}; llama.cpp hard-codes "
                f"{want} (CSA 4, HCA 128)")
    if CSA in used and c.index_head_dim % LLAMA_INDEX_HEAD_MULTIPLE:
        bad("index_head_dim", f"is {c.index_head_dim}; llama.cpp's lightning indexer rotates each head with "
            f"a Hadamard matrix of size >= 64, so it must be a multiple of {LLAMA_INDEX_HEAD_MULTIPLE}")
    if c.n_shared_experts != 1:
        bad("n_shared_experts", f"is {c.n_shared_experts}; llama.cpp's deepseek4 always runs one shared expert")
    hashed = [i for i, t in enumerate(c.mlp_layer_types) if t == HASH_MOE]
    if hashed != list(range(len(hashed))):
        bad("mlp_layer_types", f"has hash-routed layers at {hashed}; llama.cpp hash-routes exactly the "
            "first `hash_layer_count` layers")
    y = c.yarn
    if y is not None:
        betas = (float(y.get("beta_fast") or 32), float(y.get("beta_slow") or 1))
        if betas != LLAMA_YARN_BETAS:
            bad("rope_scaling", f"has YaRN beta_fast/beta_slow {betas}; llama.cpp's deepseek4 ignores the "
                f"file's values and uses {LLAMA_YARN_BETAS}")
    if expert_type in ("mxfp4", "q8_0"):
        for field in ("hidden_size", "moe_intermediate_size"):
            if getattr(c, field) % 32:
                bad(field, f"is {getattr(c, field)}; expert_type {expert_type!r} packs rows in blocks of 32 "
                    "values, so it must be a multiple of 32 (or export with expert_type='f32')")


# ------------------------------------------------------------------------------------------------
# tensor encodings


def mxfp4_blocks(w: torch.Tensor) -> np.ndarray:
    """Encode w [..., rows, in] as ggml `block_mxfp4` bytes [..., rows, in/32 * 17].

    The weights go through our `quant_fp4` (nearest e2m1 value, smallest power-of-two scale per 32
    inputs) and are then repacked bit for bit. FP4 checkpoint weights (e2m1 values times a per-32
    power of two) come out unchanged, so for them the export is lossless; any other weights are
    quantized to FP4 here."""
    shape = w.shape
    packed, scale = quant_fp4(w.reshape(-1, shape[-1]).float())
    out = fp4_to_mxfp4(packed, scale)
    return out.reshape(*shape[:-1], out.shape[-1])


def fp4_to_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Repack official FP4 (packed [rows, in/2], element 2k low nibble; UE8M0 scale [rows, in/32])
    into ggml block_mxfp4 rows [rows, in/32 * 17]: per block the scale byte, then 16 bytes whose low
    nibble is element j and high nibble element j + 16.

    Lossless: ggml's e2m1 table is ours doubled and its E8M0 decode halves the scale, so code and
    exponent bytes carry over unchanged."""
    codes = unpack_fp4(packed)  # [rows, in] uint8
    rows, n = codes.shape
    if n % FP4_GROUP:
        raise ValueError(f"MXFP4 needs rows of a multiple of {FP4_GROUP} values, got {n}")
    nb = n // FP4_GROUP
    s = scale.contiguous().view(torch.uint8)
    if tuple(s.shape) != (rows, nb):
        raise ValueError(f"FP4 scale has shape {list(s.shape)}, expected {[rows, nb]}")
    blocks = codes.view(rows, nb, FP4_GROUP)
    qs = blocks[..., :16] | (blocks[..., 16:] << 4)
    return torch.cat((s.unsqueeze(-1), qs), dim=-1).reshape(rows, nb * 17).numpy()


def _encode(t: torch.Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) for a float tensor stored as `kind`."""
    import gguf

    x = t.detach().to(torch.float32).cpu().contiguous()
    if kind == "f32":
        return x.numpy(), None
    if kind == "f16":
        return x.numpy().astype(np.float16), None
    if kind == "bf16":
        return gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if kind == "q8_0":
        return gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if kind == "mxfp4":
        return mxfp4_blocks(x), gguf.GGMLQuantizationType.MXFP4
    raise ValueError(f"unknown tensor type {kind!r}")


def _dense_kind(name: str, t: torch.Tensor, dense_type: str) -> str:
    """F32 for vectors and the steering matrices; dense_type otherwise (F32 where a Q8_0 row does not
    split into 32-value blocks)."""
    if t.dim() < 2 or any(name.endswith(s) for s in _F32_MATRICES):
        return "f32"
    if dense_type == "q8_0" and t.shape[-1] % 32:
        return "f32"
    return dense_type


# ------------------------------------------------------------------------------------------------
# tokenizer


def byte_vocab(vocab_size: int, specials: dict[str, int] | None = None) -> tuple[list[str], list[int]]:
    """Tokens and token types of a byte-level vocabulary: ids 0..255 are the bytes (as GPT-2 byte
    characters), special tokens sit at their ids (CONTROL), other ids are unused padding."""
    from ..tokenizer import BYTE_SPECIAL_TOKENS, byte_level_alphabet

    if specials is None:
        specials = {t: 256 + i for i, t in enumerate(BYTE_SPECIAL_TOKENS)}
    specials = {t: i for t, i in specials.items() if i < vocab_size}
    if vocab_size < 256:
        raise ValueError(f"a byte-level vocabulary needs at least 256 ids, the model has {vocab_size}; "
                         "pass the model's tokenizer")
    b2u = byte_level_alphabet()
    tokens = [b2u[b] for b in range(256)] + [f"<｜pad_{i}｜>" for i in range(256, vocab_size)]
    types = [TOKEN_NORMAL] * 256 + [TOKEN_UNUSED] * (vocab_size - 256)
    for text, i in specials.items():
        tokens[i], types[i] = text, TOKEN_CONTROL
    return tokens, types


# The Split regexes of DeepSeek-V3/V4's tokenizer.json, i.e. llama.cpp's `deepseek-v3` pre-tokenizer.
DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)


def _hf_pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: a bare ByteLevel one splits with GPT-2's
    regex (`gpt-2`); DeepSeek-V3/V4's Split rules followed by ByteLevel are `deepseek-v3`."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        splits = tuple(st.get("pattern", {}).get("Regex", "").replace("\r", "\\r").replace("\n", "\\n")
                       for st in steps if st.get("type") == "Split")
        if splits == DEEPSEEK_V3_SPLITS and steps[-1].get("type") == "ByteLevel":
            return "deepseek-v3"
    raise ValueError("cannot map the tokenizer's pre-tokenizer to llama.cpp; only byte-level BPE with "
                     "GPT-2's or DeepSeek-V3/V4's splitting rules is supported")


def _hf_vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """Tokens, types, merges and pre-tokenizer name from an HFTokenizer's tokenizer.json."""
    spec = json.loads(tokenizer._tok.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers can be exported, this one is {model.get('type')!r}")
    pre = _hf_pre_tokenizer(spec)
    tokens: list[str | None] = [None] * vocab_size
    types = [TOKEN_UNUSED] * vocab_size
    entries = [(text, i, TOKEN_NORMAL) for text, i in model["vocab"].items()]
    entries += [(a["content"], a["id"], TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED)
                for a in spec.get("added_tokens", [])]
    for text, i, kind in entries:
        if i >= vocab_size:
            raise ValueError(f"tokenizer token {text!r} has id {i}, outside the model's vocab_size "
                             f"{vocab_size}; export with the tokenizer that belongs to this model")
        tokens[i], types[i] = text, kind
    filled = [t if t is not None else f"<｜pad_{i}｜>" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return filled, types, merges, pre


def _inert_merge() -> list[str]:
    """A merge that can never apply (both sides are multi-character strings no merge produces).

    The gguf writer refuses empty arrays while llama.cpp requires the merges key; with this single
    rule byte-level BPE still splits text into one token per byte, exactly like ByteTokenizer."""
    return ["<｜inert｜> <｜merge｜>"]


def _write_tokenizer(w: Any, config: ModelConfig, tokenizer: Any) -> None:
    import gguf

    from ..tokenizer import ByteTokenizer, HFTokenizer

    if tokenizer is None or isinstance(tokenizer, ByteTokenizer):
        specials = tokenizer.special_tokens if tokenizer is not None else None
        tokens, types = byte_vocab(config.vocab_size, specials)
        merges, pre = _inert_merge(), "default"
    elif isinstance(tokenizer, HFTokenizer):
        tokens, types, merges, pre = _hf_vocab(tokenizer, config.vocab_size)
        merges = merges or _inert_merge()
    else:
        raise ValueError(f"cannot export a tokenizer of type {type(tokenizer).__name__}; pass a "
                         "ByteTokenizer, an HFTokenizer or None (byte-level vocabulary)")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_key_value("tokenizer.ggml.tokens", tokens, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    w.add_key_value("tokenizer.ggml.token_type", types, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    w.add_key_value("tokenizer.ggml.merges", merges, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    w.add_uint32("tokenizer.ggml.bos_token_id", config.bos_token_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", config.eos_token_id)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_bool("tokenizer.ggml.add_eos_token", False)


# ------------------------------------------------------------------------------------------------
# metadata


def arch_metadata(config: ModelConfig) -> list[tuple[str, Any, str]]:
    """(key without the `deepseek4.` prefix, value, GGUF type) for every hparam llama.cpp reads."""
    c = config
    n = c.num_hidden_layers
    ratios = [c.compress_ratio(t) for t in c.layer_types]
    y = c.yarn
    kv: list[tuple[str, Any, str]] = [
        ("context_length", c.max_position_embeddings, "u32"),
        ("embedding_length", c.hidden_size, "u32"),
        ("embedding_length_out", c.hidden_size * c.hc_mult, "u32"),
        ("block_count", n, "u32"),
        ("attention.head_count", c.num_attention_heads, "u32"),
        ("attention.head_count_kv", c.num_key_value_heads, "u32"),
        ("attention.key_length", c.head_dim, "u32"),
        ("attention.value_length", c.head_dim, "u32"),
        ("attention.layer_norm_rms_epsilon", c.rms_norm_eps, "f32"),
        ("attention.q_lora_rank", c.q_lora_rank, "u32"),
        ("attention.sliding_window", c.sliding_window, "u32"),
        ("attention.output_group_count", c.o_groups, "u32"),
        ("attention.output_lora_rank", c.o_lora_rank, "u32"),
        ("attention.compress_ratios", ratios, "u32[]"),
        ("attention.compress_rope_freq_base", c.compress_rope_theta, "f32"),
        ("attention.indexer.head_count", c.index_n_heads, "u32"),
        ("attention.indexer.key_length", c.index_head_dim, "u32"),
        ("attention.indexer.top_k", c.index_topk, "u32"),
        ("rope.dimension_count", c.qk_rope_head_dim, "u32"),
        ("rope.freq_base", c.rope_theta, "f32"),
        ("expert_count", c.n_routed_experts, "u32"),
        ("expert_used_count", c.num_experts_per_tok, "u32"),
        ("expert_shared_count", c.n_shared_experts, "u32"),
        ("expert_feed_forward_length", c.moe_intermediate_size, "u32"),
        ("expert_weights_scale", c.routed_scaling_factor, "f32"),
        ("expert_weights_norm", bool(c.norm_topk_prob), "bool"),
        ("expert_gating_func", GATING_SQRT_SOFTPLUS, "u32"),
        ("swiglu_clamp_exp", [float(c.swiglu_limit)] * n, "f32[]"),
        ("swiglu_clamp_shexp", [float(c.swiglu_limit)] * n, "f32[]"),
        ("hyper_connection.count", c.hc_mult, "u32"),
        ("hyper_connection.sinkhorn_iterations", c.hc_sinkhorn_iters, "u32"),
        ("hyper_connection.epsilon", c.hc_eps, "f32"),
        ("hash_layer_count", c.num_hash_layers, "u32"),
    ]
    if y is None:
        kv.append(("rope.scaling.type", "none", "str"))
    else:
        kv += [("rope.scaling.type", "yarn", "str"),
               ("rope.scaling.factor", float(y["factor"]), "f32"),
               ("rope.scaling.original_context_length", int(y["original_max_position_embeddings"]), "u32"),
               ("rope.scaling.yarn_beta_fast", float(y.get("beta_fast") or 32), "f32"),
               ("rope.scaling.yarn_beta_slow", float(y.get("beta_slow") or 1), "f32")]
    return kv


def _write_metadata(w: Any, config: ModelConfig) -> None:
    import gguf

    arrays = {"u32[]": gguf.GGUFValueType.UINT32, "f32[]": gguf.GGUFValueType.FLOAT32}
    for key, value, kind in arch_metadata(config):
        full = f"{ARCH}.{key}"
        if kind == "u32":
            w.add_uint32(full, int(value))
        elif kind == "f32":
            w.add_float32(full, float(value))
        elif kind == "bool":
            w.add_bool(full, bool(value))
        elif kind == "str":
            w.add_string(full, value)
        else:
            w.add_key_value(full, list(value), gguf.GGUFValueType.ARRAY, sub_type=arrays[kind])


# ------------------------------------------------------------------------------------------------
# tensors: planned from shapes first (the header lists every tensor), then encoded and written one at
# a time (routed experts one expert at a time), so a conversion never holds more than one tensor.


_SLAB_VALUES = 1 << 22  # dense tensors are encoded 4M values at a time: fp32 temporaries stay ~16 MB
_GGML = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "mxfp4": "MXFP4", "i32": "I32"}


def _ggml_type(kind: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, _GGML[kind])


def _encoded_bytes(shape: tuple[int, ...], kind: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[_ggml_type(kind)]
    numel = int(np.prod(shape)) if shape else 1
    return numel // block * size


class _Stream:
    """What `GGUFWriter.write_tensor_data` needs of an array (`nbytes`, `tofile`), produced chunk by
    chunk: a stacked expert tensor is written one expert at a time."""

    def __init__(self, name: str, nbytes: int, chunks):
        self.name, self.nbytes, self._chunks = name, nbytes, chunks

    def tofile(self, f) -> None:
        written = 0
        for arr in self._chunks():
            arr = np.ascontiguousarray(arr)
            arr.tofile(f)
            written += arr.nbytes
        if written != self.nbytes:
            raise RuntimeError(f"{self.name}: wrote {written} bytes, planned {self.nbytes}")


class _ModelSource:
    """Tensors of a model in memory (a seeded preset)."""

    def __init__(self, model: Transformer):
        self.config = model.config
        self._model = model
        self._state = model.state_dict()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self._state.items()}

    def tensor(self, name: str) -> torch.Tensor:
        return self._state[name]

    def expert(self, layer: int, j: int, proj: str, kind: str):
        return _encode(getattr(self._model.layers[layer].ffn.experts[j], proj).weight, kind)[0]


class _CheckpointSource:
    """Tensors of a checkpoint on disk, read one at a time. FP4 experts exported as MXFP4 are repacked
    from their stored codes and scales without being decoded."""

    def __init__(self, ckpt: Any, config: ModelConfig):
        self.config, self._ckpt = config, ckpt
        with torch.device("meta"):
            self.meta = Transformer(config.replace(num_nextn_predict_layers=0)).state_dict()
        self._shapes = {n: tuple(t.shape) for n, t in self.meta.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def tensor(self, name: str) -> torch.Tensor:
        return self._ckpt.get(name, expected_shape=self._shapes[name])

    def expert(self, layer: int, j: int, proj: str, kind: str):
        name = f"layers.{layer}.ffn.experts.{j}.{proj}.weight"
        if kind == "mxfp4" and self._ckpt.info(name).fmt == "fp4":
            packed, scale, _ = self._ckpt.get_quantized(name)
            return fp4_to_mxfp4(packed, scale)
        return _encode(self._ckpt.get(name, expected_shape=self._shapes[name]), kind)[0]


def _plan(source, expert_type: str, dense_type: str) -> list[tuple[str, tuple[int, ...], str, Any]]:
    """(GGUF name, numpy-order element shape, kind, chunk producer) of every tensor, in file order."""
    shapes = source.shapes()
    entries = []
    for name, shape in shapes.items():
        if name.startswith("mtp.") or ".ffn.experts." in name:
            continue
        if name.endswith("tid2eid"):
            kind = "i32"

            def chunks(name=name):
                yield source.tensor(name).detach().to(torch.int32).cpu().contiguous().numpy()
        else:
            kind = _dense_kind(name, torch.empty(shape, device="meta"), dense_type)

            def chunks(name=name, kind=kind):
                t = source.tensor(name)  # as stored (FP8 decoded); encoded a slab of rows at a time
                step = max(1, _SLAB_VALUES // max(1, t[0].numel())) if t.dim() >= 2 else max(1, len(t))
                for r in range(0, max(1, len(t)), step):
                    yield _encode(t[r:r + step] if t.dim() else t, kind)[0]
        entries.append((gguf_name(name), shape, kind, chunks))
    config = source.config
    for i in range(config.num_hidden_layers):
        for proj, gname in _EXPERT_NAMES.items():
            shape = (config.n_routed_experts, *shapes[f"layers.{i}.ffn.experts.0.{proj}.weight"])

            def chunks(i=i, proj=proj):
                for j in range(config.n_routed_experts):
                    yield source.expert(i, j, proj, expert_type)
            entries.append((f"blk.{i}.{gname}", shape, expert_type, chunks))
    return entries


def _write(source, out_path: str | Path, expert_type: str, dense_type: str, tokenizer: Any,
           progress=None) -> Path:
    config = source.config
    check_llama_cpp_compatible(config, expert_type, dense_type)
    import gguf

    out = Path(out_path)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"directory {out.parent} does not exist; create it first")
    entries = _plan(source, expert_type, dense_type)
    tmp = out.with_name(out.name + ".part")  # a crash leaves no file that looks complete
    w = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        w.add_name("moeflash DeepSeek-V4")
        _write_metadata(w, config)
        _write_tokenizer(w, config, tokenizer)
        for gname, shape, kind, _ in entries:
            w.add_tensor_info(gname, shape, np.dtype(np.float32), _encoded_bytes(shape, kind),
                              raw_dtype=_ggml_type(kind))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with torch.no_grad():
            for n, (gname, shape, kind, chunks) in enumerate(entries, 1):
                w.write_tensor_data(_Stream(gname, _encoded_bytes(shape, kind), chunks))
                if progress is not None:
                    progress(n, len(entries))
        w.close()
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out


def export_gguf(model: Transformer, out_path: str | Path, *, expert_type: str = "mxfp4",
                dense_type: str = "f32", tokenizer: Any = None, progress=None) -> Path:
    """Write `model` as a llama.cpp `deepseek4` GGUF file at `out_path`; returns the path.

    expert_type: "mxfp4" (default; lossless for FP4 expert weights, others are quantized to FP4 with
    `quant_fp4`), "q8_0", "bf16", "f16" or "f32". dense_type: "f32", "f16", "bf16" or "q8_0" for the
    other matrices. tokenizer: None or a ByteTokenizer (byte-level vocabulary: ids 0..255 are bytes,
    DeepSeek's special tokens after them) or an HFTokenizer (its BPE vocabulary and merges).
    `progress(done, total)` is called after each tensor is written.
    Raises ValueError before writing anything when llama.cpp cannot run the model as moeflash does.
    """
    return _write(_ModelSource(model), out_path, expert_type, dense_type, tokenizer, progress)


def export_checkpoint_gguf(path: str | Path, out_path: str | Path, *, expert_type: str = "mxfp4",
                           dense_type: str = "f32", tokenizer: Any = None, progress=None) -> Path:
    """Convert a V4 checkpoint directory (official or Hugging Face names) to GGUF, tensor by tensor.

    Nothing is loaded as a model: each tensor is read, encoded and written before the next one is
    read, and stacked routed experts one expert at a time, so peak memory is about one expert matrix
    (plus the largest dense tensor), not the model. Official FP4 experts go to MXFP4 by the lossless
    repack (`fp4_to_mxfp4`), without decoding. Same arguments and file as `export_gguf`."""
    from .loader import Checkpoint, check

    path = Path(path)
    config = ModelConfig.from_json(path)
    with Checkpoint.open(path) as ckpt:
        source = _CheckpointSource(ckpt, config)
        check(ckpt, dict(source.meta), ["mtp."])  # every tensor present with its shape before a byte is written
        return _write(source, out_path, expert_type, dense_type, tokenizer, progress)


__all__ = [
    "ARCH", "DEEPSEEK_V3_SPLITS", "DENSE_TYPES", "EXPERT_TYPES", "arch_metadata", "byte_vocab",
    "check_llama_cpp_compatible", "export_checkpoint_gguf", "export_gguf", "fp4_to_mxfp4", "gguf_name",
    "mxfp4_blocks",
]
