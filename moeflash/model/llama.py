"""The dense llama architecture (SmolLM2 and kin): the baseline that MoE models are compared with.

Pre-norm blocks of grouped-query attention with RoPE and a SwiGLU MLP, built from `layers.py`. It
speaks the same interface as the V4 `Transformer` (`forward_tokens` over a flat batch of several
sequences, `logits`, `new_seq_state`, `state_bytes`), so the engine batches, samples and streams it
unchanged. RoPE rotates adjacent pairs (2i, 2i+1): the layout of GGUF files, whose converter
permutes Hugging Face's rotate-half q/k weights into it.

The residual stream is kept in fp32 whatever the weight dtype, as llama.cpp keeps its activations:
small models grow outlier channels (SmolLM2-135M's reach ~25,000, where bf16's spacing is 128), and
a bf16 residual there drops most layers' updates and changes greedy answers. Matmuls still run in
the weight dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlamaConfig
from ..kernels import gqa_decode
from .layers import FusedLinears, Rederived, RMSNorm, SwiGLU, apply_rope, rope_cos_sin, rope_inv_freq


@dataclass
class LlamaSeqState:
    """One sequence's KV cache: per layer, keys and values [capacity, kv_heads, head_dim] for
    positions 0..pos-1; the buffers grow geometrically when full, so appends are amortised O(1)."""

    pos: int = 0
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    rewindable = True  # a KV cache can be cut back to any earlier position (`rewind`)

    def rewind(self, pos: int) -> None:
        """Forget positions pos.. (their keys and values are overwritten by later appends)."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot rewind a state at {self.pos} to {pos}")
        self.pos = pos

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Flat named tensors (keys and values up to `pos`) and the position."""
        tensors = {f"{i}.k": k[: self.pos].contiguous() for i, k in enumerate(self.keys)}
        tensors.update({f"{i}.v": v[: self.pos].contiguous() for i, v in enumerate(self.values)})
        return tensors, {"pos": self.pos, "layers": len(self.keys)}

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> "LlamaSeqState":
        n = int(meta["layers"])
        return LlamaSeqState(int(meta["pos"]), [tensors[f"{i}.k"] for i in range(n)],
                             [tensors[f"{i}.v"] for i in range(n)])

    def clone(self, headroom: int = 256) -> "LlamaSeqState":
        """An independent copy at the same position, with room for `headroom` more tokens (a question
        after a cached document appends without copying the whole cache again)."""
        def copy(t):
            out = t.new_empty((self.pos + headroom, *t.shape[1:]))
            out[: self.pos] = t[: self.pos]
            return out
        return LlamaSeqState(self.pos, [copy(k) for k in self.keys], [copy(v) for v in self.values])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [n, kv_heads, head_dim] at positions pos..pos+n-1 of `layer`; return the
        layer's keys and values for positions 0..pos+n-1."""
        n, end = k.shape[0], self.pos + k.shape[0]
        cap = self.keys[layer].shape[0]
        if end > cap:  # geometric growth (1.25x): amortised O(1) appends without doubling a long cache
            new_cap = max(end, cap + cap // 4, 64)
            for buf in (self.keys, self.values):
                grown = buf[layer].new_empty((new_cap, *buf[layer].shape[1:]))
                grown[: self.pos] = buf[layer][: self.pos]
                buf[layer] = grown
        self.keys[layer][self.pos: end] = k
        self.values[layer][self.pos: end] = v
        return self.keys[layer][:end], self.values[layer][:end]

    def used_bytes(self) -> int:
        """Bytes of live keys and values (positions 0..pos-1)."""
        return sum(2 * self.pos * k.shape[1] * k.shape[2] * k.element_size() for k in self.keys)


class LlamaAttention(Rederived, nn.Module):
    _derived = ("_qkv",)  # the fused q/k/v, redone after a move (layers.Rederived)

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.wq = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self._qkv: FusedLinears | None = None

    @torch.no_grad()
    def fuse_projections_(self) -> None:
        """q, k and v read the same input: one matmul instead of three (see FusedLinears)."""
        if self._qkv is None:
            self._qkv = FusedLinears([self.wq, self.wk, self.wv])

    def forward(self, x: torch.Tensor, layer: int, seqs: list[LlamaSeqState], lengths: list[int],
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self._qkv is not None:
            q, k, v = self._qkv(x)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        n = x.shape[0]
        q = apply_rope(q.view(n, self.heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(n, self.kv_heads, self.head_dim), cos, sin)
        v = v.view(n, self.kv_heads, self.head_dim)
        out = torch.empty_like(q)
        off = 0
        for seq, m in zip(seqs, lengths):
            keys, values = seq.append(layer, k[off: off + m], v[off: off + m])
            out[off: off + m] = _attend(q[off: off + m], keys, values, seq.pos)
            off += m
        return self.wo(out.view(n, -1))


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of queries at positions start.. over keys 0..start+len(q)-1.
    q [m, H, d], keys/values [T, KV, d] -> [m, H, d]."""
    m, t = q.shape[0], keys.shape[0]
    if m == 1 and q.dtype == torch.float32:  # a decode step: one native call (kernels.gqa_decode)
        return gqa_decode(q[0], keys, values, q.shape[-1] ** -0.5)[None]
    if m == 1:
        mask, causal = None, False
    elif start == 0:
        mask, causal = None, True
    else:  # a prompt chunk after earlier chunks: query i sees keys up to start + i
        mask = torch.arange(t, device=q.device) <= (start + torch.arange(m, device=q.device))[:, None]
        causal = False
    o = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                       attn_mask=mask, is_causal=causal, enable_gqa=True)
    return o.transpose(0, 1)


class LlamaMLP(SwiGLU):
    """SwiGLU without a clamp; w1 = gate, w3 = up, w2 = down (the official DeepSeek names). Gate and up
    run as one product once fused (SwiGLU.fuse_projections_)."""

    def __init__(self, dim: int, inter: int):
        super().__init__(dim, inter, limit=0.0)


class MoefiedMLP(nn.Module):
    """A dense SwiGLU MLP whose neurons were split into experts (`moeflash moefy`, after MoEfication,
    Zhang et al. 2022): expert e holds `inter / experts` neurons, its rows of the gate and up
    projections and its columns of the down projection, stored expert-major ([E, m, d], [E, m, d],
    [E, d, m]). A router (one linear layer, or two with a ReLU between) scores the experts for each
    token; the top `top_k` are computed and their outputs summed, unweighted, so with every expert
    picked this is the dense MLP (its neurons in another order). `on_route(x, ids, idx)` sees each
    call's choices, as the V4 MoE's does (routing traces, `moeflash compare`)."""

    def __init__(self, dim: int, inter: int, experts: int, top_k: int, router_hidden: int = 0):
        super().__init__()
        m = inter // experts
        self.experts, self.top_k = experts, top_k
        self.gate = nn.Parameter(torch.empty(experts, m, dim))
        self.up = nn.Parameter(torch.empty(experts, m, dim))
        self.down = nn.Parameter(torch.empty(experts, dim, m))
        if router_hidden:
            self.router = nn.Sequential(nn.Linear(dim, router_hidden), nn.ReLU(), nn.Linear(router_hidden, experts))
        else:
            self.router = nn.Sequential(nn.Linear(dim, experts))
        self.on_route = None
        self.provider = None  # optional (None, e) -> callable expert; an expert store serves them then
        # expert parallelism: experts owned..owned+len held here (the stacked tensors hold only those);
        # `combine` adds the other processes' partial sums (engine/parallel.py)
        self.owned: range | None = None
        self.combine = None

    def predict(self, x: torch.Tensor, ids=None):
        """(None, the experts x would use): what an expert store's prefetch asks of a layer's gate."""
        return None, self.route(x)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.provider is not None:
            return self.provider(None, e)(x)
        if self.owned is not None:
            if e not in self.owned:
                return torch.zeros_like(x)  # another process's expert
            e -= self.owned.start
        return (F.silu(x @ self.gate[e].T) * (x @ self.up[e].T)) @ self.down[e].T

    def fuse_projections_(self) -> None:
        pass

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The experts each row of x uses: [n, top_k] ids, best first."""
        scores = self.router(x.to(self.router[0].weight.dtype))
        return scores.topk(self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.route(x)
        if self.on_route is not None:
            self.on_route(x, idx.reshape(-1), idx)
        out = torch.zeros_like(x)
        if x.shape[0] == 1 and self.provider is None and self.owned is None:  # a decode step: chosen experts only
            for e in idx[0].tolist():
                h = F.silu(self.gate[e] @ x[0]) * (self.up[e] @ x[0])
                out[0] += self.down[e] @ h
            return out
        for e in idx.unique().tolist():
            if self.owned is not None and self.provider is None and e not in self.owned:
                continue
            rows = (idx == e).any(dim=-1).nonzero().squeeze(1)
            out.index_add_(0, rows, self._expert(e, x[rows]).to(out.dtype))
        return self.combine(out) if self.combine is not None else out


class LlamaBlock(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = LlamaAttention(c)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.moe_experts:
            self.ffn = MoefiedMLP(c.hidden_size, c.intermediate_size, c.moe_experts, c.moe_top_k,
                                  c.moe_router_hidden)
        else:
            self.ffn = LlamaMLP(c.hidden_size, c.intermediate_size)


class Llama(nn.Module):
    """Embedding -> blocks -> norm -> head (tied to the embedding when the config says so)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(c.head_dim, c.rope_theta), persistent=False)

    @torch.no_grad()
    def fuse_projections_(self) -> "Llama":
        for layer in self.layers:
            layer.attn.fuse_projections_()
            layer.ffn.fuse_projections_()
        return self

    # -- state ------------------------------------------------------------------------------------
    def new_seq_state(self, max_len: int = 0, dtype=None) -> LlamaSeqState:
        """An empty KV cache; `max_len` preallocates room for that many tokens (else it grows)."""
        c = self.config
        dtype = dtype or self.embed.weight.dtype
        shape = (max_len, c.num_key_value_heads, c.head_dim)
        dev = self.embed.weight.device
        n = c.num_hidden_layers
        return LlamaSeqState(0, [torch.empty(shape, dtype=dtype, device=dev) for _ in range(n)],
                             [torch.empty(shape, dtype=dtype, device=dev) for _ in range(n)])

    prefix_block_tokens = 16  # a prefix cache saves states at multiples of this (any position is exact)
    state_from_tensors = staticmethod(LlamaSeqState.from_tensors)

    def state_bytes(self, tokens: int, dtype=None) -> int:
        """Bytes of KV cache a sequence of `tokens` tokens holds."""
        c = self.config
        size = (dtype or self.embed.weight.dtype).itemsize
        return 2 * c.num_hidden_layers * tokens * c.num_key_value_heads * c.head_dim * size

    # -- forward ----------------------------------------------------------------------------------
    def forward_tokens(self, tokens: torch.Tensor, seqs: list[LlamaSeqState], lengths: list[int]) -> torch.Tensor:
        """tokens [N] = the new tokens of seqs back to back (lengths[i] for seqs[i]) -> hidden [N, dim]
        (fp32). Caches are written at positions pos..pos+n-1 and `pos` is left to the caller to
        advance (the engine does; `engine.forward.run_tokens`)."""
        if tokens.dim() != 1 or tokens.shape[0] != sum(lengths):
            raise ValueError(f"tokens must be a flat [sum(lengths)={sum(lengths)}] tensor, got {tuple(tokens.shape)}")
        if len(seqs) != len(lengths):
            raise ValueError(f"{len(seqs)} sequence states but {len(lengths)} lengths")
        if any(n < 1 for n in lengths):
            raise ValueError(f"every sequence needs at least one new token, got lengths {lengths}")
        vocab = self.config.vocab_size
        # checked on the CPU only: on a GPU it would be a host round trip per step (the engine checks
        # prompts on arrival, and sampled ids are in range)
        if tokens.device.type == "cpu" and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}); got {int(tokens.min())}..{int(tokens.max())}")
        positions = torch.tensor([p for s, n in zip(seqs, lengths) for p in range(s.pos, s.pos + n)],
                                 dtype=torch.long, device="cpu")
        cos, sin = rope_cos_sin(self.inv_freq, positions.to(tokens.device))
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        dtype = self.embed.weight.dtype
        x = self.embed(tokens).float()  # the residual stream stays fp32 (see the module docstring)
        for i, layer in enumerate(self.layers):
            x = x + layer.attn(layer.attn_norm(x).to(dtype), i, seqs, lengths, cos, sin).float()
            x = x + layer.ffn(layer.ffn_norm(x).to(dtype)).float()
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x).to(self.embed.weight.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, S] -> logits [B, S, V], a stateless full forward (fresh caches)."""
        b, s = ids.shape
        x = self.forward_tokens(ids.reshape(-1), [self.new_seq_state(s) for _ in range(b)], [s] * b)
        return self.logits(x).view(b, s, -1)
