"""V4 attention (V4-SPEC §2.3-2.9): low-rank queries with a per-head norm, one shared K=V head,
partial interleaved RoPE, a sliding window plus compressed entries (all of them for HCA, the
indexer's top-k for CSA), a learned per-head sink, inverse RoPE on the output, and a grouped
low-rank output projection."""

from __future__ import annotations

import torch
from torch import nn

from ..config import CSA, SLIDING, ModelConfig
from .compressor import Compressor, Indexer
from .layers import RMSNorm, apply_rope, rms_unweighted
from .state import LayerState


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        c = config
        self.layer_type = layer_type
        self.n_heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.window = c.sliding_window
        self.o_groups, self.o_lora_rank = c.o_groups, c.o_lora_rank
        self.eps = c.rms_norm_eps
        self.scale = c.head_dim ** -0.5
        self.wq_a = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.wq_b = nn.Linear(c.q_lora_rank, c.num_attention_heads * c.head_dim, bias=False)
        self.wkv = nn.Linear(c.hidden_size, c.head_dim, bias=False)
        self.kv_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        group_in = c.num_attention_heads * c.head_dim // c.o_groups
        # wo_a holds the g per-group projections stacked on the output axis: [g * r_o, H*D/g]
        self.wo_a = nn.Linear(group_in, c.o_groups * c.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(c.o_groups * c.o_lora_rank, c.hidden_size, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(c.num_attention_heads))
        self.ratio = c.compress_ratio(layer_type)
        self.compressor = None
        self.indexer = None
        if layer_type != SLIDING:
            self.compressor = Compressor(c.hidden_size, c.head_dim, self.ratio, layer_type == CSA,
                                         c.rms_norm_eps)
        if layer_type == CSA:
            self.indexer = Indexer(c.hidden_size, c.q_lora_rank, c.index_n_heads, c.index_head_dim,
                                   c.index_topk, self.ratio, c.rms_norm_eps)

    def forward(self, h: torch.Tensor, st: LayerState, start_pos: int, positions: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """h [B, S, dim] at positions start_pos..start_pos+S-1 -> [B, S, dim]; updates `st`."""
        b, s, _ = h.shape
        qr = self.q_norm(self.wq_a(h))
        q = self.wq_b(qr).view(b, s, self.n_heads, self.head_dim)
        q = apply_rope(rms_unweighted(q, self.eps), cos[:, None, :], sin[:, None, :])
        kv = apply_rope(self.kv_norm(self.wkv(h)), cos, sin)  # [B, S, D]

        # sliding window: ring slots (positions before this chunk) + the new rows
        w = self.window
        slot = torch.arange(w, device=h.device)
        ring_pos = start_pos - 1 - ((start_pos - 1 - slot) % w)  # newest position stored in each slot
        ring_pos = torch.where(ring_pos >= 0, ring_pos, torch.full_like(ring_pos, -(1 << 40)))
        keys = torch.cat((st.window.to(kv.dtype), kv), dim=1)
        key_pos = torch.cat((ring_pos, positions))
        visible = (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] > positions[:, None] - w)
        visible = visible.expand(b, s, -1)
        keep = min(s, w)
        st.window[:, (positions[-keep:] % w)] = kv[:, -keep:].to(st.window.dtype)

        if self.compressor is not None:
            st.compressor.append(self.compressor(h, st.compressor, start_pos, inv_freq))
            entries = st.compressor.view().to(kv.dtype)  # [B, T, D]
            t = entries.shape[1]
            if self.indexer is not None:
                chosen = self.indexer(h, qr, st.indexer, start_pos, positions, cos, sin, inv_freq)
            else:
                chosen = (torch.arange(t, device=h.device)[None, :]
                          < ((positions + 1) // self.ratio)[:, None]).expand(b, s, t)
            keys = torch.cat((keys, entries), dim=1)
            visible = torch.cat((visible, chosen), dim=2)

        logits = torch.einsum("bshd,bkd->bhsk", q, keys) * self.scale
        logits = logits.masked_fill(~visible[:, None], float("-inf"))
        sink = self.attn_sink.to(logits.dtype).view(1, -1, 1, 1).expand(b, -1, s, 1)
        full = torch.cat((logits, sink), dim=-1).float()
        probs = torch.softmax(full - full.amax(dim=-1, keepdim=True), dim=-1)[..., :-1].to(keys.dtype)
        out = torch.einsum("bhsk,bkd->bshd", probs, keys)
        out = apply_rope(out, cos[:, None, :], sin[:, None, :], inverse=True)

        grouped = out.reshape(b, s, self.o_groups, -1)
        wo_a = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)
        low = torch.einsum("bsgi,gri->bsgr", grouped, wo_a.to(grouped.dtype))
        return self.wo_b(low.flatten(2))
