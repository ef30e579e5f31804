"""GGUF import: metadata, tensors dequantized into torch, and the llama models such files hold.

GGUF is llama.cpp's single-file format: typed metadata (`general.*`, `<arch>.*`, `tokenizer.ggml.*`)
followed by tensors in ggml's block-quantized types. The file is memory-mapped by the `gguf`
package's reader; each tensor is decoded on request with the package's reference (NumPy) decoders,
so a model costs its dequantized size once and the file nothing. `requantize` rewrites a GGUF with
its matrices in another type (e.g. Q4_1 -> Q8_0 or F16), as llama.cpp's `llama-quantize` does, so
both engines can be measured on identical weights.

Shapes: GGUF lists dimensions fastest-first (ne0 = row length); `GGUFFile.get` returns torch order,
[rows, row length], which for a weight matrix is nn.Linear's [out, in].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import LlamaConfig
from ..model.layers import rope_inv_freq

# Types this module decodes, by name (a subset of what the gguf package implements, and every type
# a llama.cpp quantizer writes for a dense model).
DECODABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
             "Q5_K", "Q6_K", "MXFP4")
# Types `requantize` can write (the gguf package encodes these).
ENCODABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
_MISSING = object()


class GGUFError(ValueError):
    """A file that is not GGUF, lacks a key or tensor the model needs, or uses an unsupported type."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'moeflash[gguf]' "
                          "(or pip install gguf)") from None
    return gguf


class GGUFFile:
    """A memory-mapped GGUF file: `meta(key)`, `names()`, `tensor_type(name)`, `shape(name)`, `get(name)`."""

    def __init__(self, path: str | Path):
        gguf = _gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError / struct errors on foreign files
            raise GGUFError(f"{self.path} is not a readable GGUF file ({e})") from None
        self._tensors = {t.name: t for t in self.reader.tensors}

    @property
    def arch(self) -> str:
        return self.meta("general.architecture")

    def keys(self) -> list[str]:
        return list(self.reader.fields)

    def meta(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value as a Python scalar, str or list; `default` (or an error) when absent."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise GGUFError(f"{self.path.name} has no metadata key {key!r}")
            return default
        value = field.contents()
        return value.tolist() if isinstance(value, np.ndarray) else value

    def names(self) -> list[str]:
        return list(self._tensors)

    def _tensor(self, name: str):
        t = self._tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path.name} has no tensor {name!r}")
        return t

    def tensor_type(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def blocks(self, name: str) -> torch.Tensor:
        """The raw bytes of a block-quantized matrix as uint8 [rows, row bytes] (a copy), undecoded."""
        t = self._tensor(name)
        arr = np.array(t.data, dtype=np.uint8).reshape(self.shape(name)[0], -1)
        return torch.from_numpy(arr)

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch order: slowest dimension first."""
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def span(self, name: str) -> tuple[int, int]:
        """(absolute byte offset in the file, bytes) of a tensor's data."""
        t = self._tensor(name)
        return int(t.data_offset), int(t.n_bytes)

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode one tensor to `dtype` in torch order (exact for float types; quantized blocks are
        expanded as ggml defines them)."""
        t = self._tensor(name)
        qtype = t.tensor_type
        if qtype.name not in DECODABLE:
            raise GGUFError(f"tensor {name!r} of {self.path.name} has type {qtype.name}; moeflash decodes "
                            f"{', '.join(DECODABLE)}")
        values = _gguf().quants.dequantize(t.data, qtype)
        arr = np.array(values, dtype=np.float32).reshape(self.shape(name))  # a copy: the map is read-only
        return torch.from_numpy(arr).to(dtype)


# -- llama -----------------------------------------------------------------------------------------
# A MoE-fied llama (`moeflash moefy`) keeps arch "llama" and adds these keys (moeflash's own)
MOE_KEYS = {"moe_experts": "moeflash.moe.expert_count", "moe_top_k": "moeflash.moe.expert_used_count",
            "moe_router_hidden": "moeflash.moe.router_hidden"}


def llama_config(f: GGUFFile) -> LlamaConfig:
    """LlamaConfig from `llama.*` metadata; refuses RoPE variants the model does not implement."""
    if f.arch != "llama":
        raise GGUFError(f"{f.path.name} holds a {f.arch!r} model; moeflash's GGUF import supports 'llama' "
                        "(dense) models; V4 models load from safetensors checkpoints")
    a = "llama."
    heads = int(f.meta(a + "attention.head_count"))
    dim = int(f.meta(a + "embedding_length"))
    head_dim = int(f.meta(a + "attention.key_length", dim // heads))
    rope_dims = int(f.meta(a + "rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(f"{f.path.name}: rope.dimension_count {rope_dims} != head_dim {head_dim}; partial "
                        "rotary embeddings are not supported for llama models")
    scaling = f.meta(a + "rope.scaling.type", "none")
    if scaling not in ("none", "") or "rope_freqs.weight" in f.names():
        raise GGUFError(f"{f.path.name} uses RoPE scaling ({scaling!r}, or a rope_freqs tensor); moeflash's "
                        "llama supports plain RoPE only")
    tokens = f.meta("tokenizer.ggml.tokens", None)
    vocab = int(f.meta(a + "vocab_size", len(tokens) if tokens is not None else f.shape("token_embd.weight")[0]))
    return LlamaConfig(
        vocab_size=vocab, hidden_size=dim,
        intermediate_size=int(f.meta(a + "feed_forward_length")),
        num_hidden_layers=int(f.meta(a + "block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(f.meta(a + "attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(f.meta(a + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(f.meta(a + "attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(f.meta(a + "context_length", 2048)),
        tie_word_embeddings="output.weight" not in f.names(),
        moe_experts=int(f.meta(MOE_KEYS["moe_experts"], 0)),
        moe_top_k=int(f.meta(MOE_KEYS["moe_top_k"], 0)),
        moe_router_hidden=int(f.meta(MOE_KEYS["moe_router_hidden"], 0)),
        bos_token_id=f.meta("tokenizer.ggml.bos_token_id", None),
        eos_token_id=f.meta("tokenizer.ggml.eos_token_id", None),
    )


def llama_tensor_names(config: LlamaConfig) -> dict[str, str]:
    """moeflash parameter name -> GGUF tensor name for a llama model."""
    names = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not config.tie_word_embeddings:
        names["head.weight"] = "output.weight"
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers.{i}.", f"blk.{i}."
        names.update({
            ours + "attn_norm.weight": theirs + "attn_norm.weight",
            ours + "attn.wq.weight": theirs + "attn_q.weight",
            ours + "attn.wk.weight": theirs + "attn_k.weight",
            ours + "attn.wv.weight": theirs + "attn_v.weight",
            ours + "attn.wo.weight": theirs + "attn_output.weight",
            ours + "ffn_norm.weight": theirs + "ffn_norm.weight",
        })
        if config.moe_experts:  # MoE-fied (`moeflash moefy`): experts stacked, llama.cpp's *_exps names
            names.update({ours + "ffn.gate": theirs + "ffn_gate_exps.weight",
                          ours + "ffn.up": theirs + "ffn_up_exps.weight",
                          ours + "ffn.down": theirs + "ffn_down_exps.weight"})
            for j in range(2 if config.moe_router_hidden else 1):
                for kind in ("weight", "bias"):
                    names[f"{ours}ffn.router.{2 * j}.{kind}"] = f"{theirs}ffn_router.{j}.{kind}"
        else:
            names.update({ours + "ffn.w1.weight": theirs + "ffn_gate.weight",
                          ours + "ffn.w3.weight": theirs + "ffn_up.weight",
                          ours + "ffn.w2.weight": theirs + "ffn_down.weight"})
    return names


def load_llama_gguf(path: str | Path | GGUFFile, dtype: torch.dtype = torch.float32, packed: bool = False,
                    skip_experts: bool = False):
    """(Llama model, its GGUF tokenizer): every tensor decoded once into `dtype` (norms stay fp32).

    `packed`: matrices in Q4_0 / Q4_1 / Q8_0 stay in their blocks (kernels.linear.GgufLinear, fp32
    products on the exact values), the LM head included (a packed copy of a tied embedding; the
    embedding itself is decoded for row lookups). `skip_experts` (a MoE-fied model): the experts are
    not read (empty tensors), for an expert store to serve them from the file."""
    from ..kernels.linear import GgufLinear
    from ..kernels.reference import GGUF_TYPES
    from ..model.llama import Llama
    from ..tokenizer import GGUFTokenizer

    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    cfg = llama_config(f)
    with torch.device("meta"):
        model = Llama(cfg)
    expected = dict(model.named_parameters())
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    state, held = {}, {}
    for ours, theirs in llama_tensor_names(cfg).items():
        if skip_experts and ours.endswith(("ffn.gate", "ffn.up", "ffn.down")):
            held[ours] = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            continue
        want = tuple(expected[ours].shape)
        if f.shape(theirs) != want:
            raise GGUFError(f"{f.path.name}: tensor {theirs} has shape {f.shape(theirs)}, the config "
                            f"implies {want}")
        qtype = f.tensor_type(theirs)
        if packed and qtype in GGUF_TYPES and ours[:-len(".weight")] in linears:
            held[ours[:-len(".weight")]] = GgufLinear(f.blocks(theirs), GGUF_TYPES[qtype])
            continue
        state[ours] = f.get(theirs, torch.float32 if ours.endswith("norm.weight") else dtype)
    model.load_state_dict(state, strict=False, assign=True)
    for name, mod in held.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, mod)
    emb_type = f.tensor_type("token_embd.weight")
    if cfg.tie_word_embeddings and packed and emb_type in GGUF_TYPES:
        model.head = GgufLinear(f.blocks("token_embd.weight"), GGUF_TYPES[emb_type])
    elif cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta)  # the meta buffer, rebuilt
    return model.eval(), GGUFTokenizer(f.reader)


# -- rewriting -------------------------------------------------------------------------------------
def requantize(src: str | Path, dst: str | Path, qtype: str = "Q8_0") -> Path:
    """Copy a GGUF with every 2-D matrix re-encoded as `qtype` (1-D tensors: F32). Matrices whose
    rows do not fit qtype's block size keep their type. The metadata is copied as is, except
    `general.file_type`, which llama.cpp only uses for display."""
    gguf = _gguf()
    if qtype not in ENCODABLE:
        raise GGUFError(f"cannot write {qtype}; choose one of {', '.join(ENCODABLE)}")
    f = GGUFFile(src)
    target = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[target][0]
    dst = Path(dst)
    writer = gguf.GGUFWriter(str(dst), arch=f.arch)
    for key, field in f.reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.meta(key), vtype, sub_type=sub)
    for t in f.reader.tensors:
        values = f.get(t.name).numpy()
        if values.ndim == 2 and values.shape[-1] % block == 0:
            data, out_type = gguf.quants.quantize(values, target), target
        else:
            data, out_type = values, gguf.GGMLQuantizationType.F32
        writer.add_tensor(t.name, data, raw_dtype=out_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
