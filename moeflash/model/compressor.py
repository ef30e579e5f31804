"""KV compressors (CSA overlapping, HCA plain) and the lightning indexer (V4-SPEC §2.5-2.7).

A compressor turns every `m` tokens into one entry: a per-channel softmax over the window's gate
logits (plus a learned position bias) weights the projected rows; the pooled row is normalised and
rotated at the window's first position. CSA windows overlap: entry w pools the previous window's
"A" halves and its own "B" halves (8 slots for m = 4). The indexer owns a narrow CSA compressor of
its own and scores every available entry against the query to keep only the top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, apply_rope, rope_cos_sin
from .state import CompressorState


class Compressor(nn.Module):
    """Pools each window of `ratio` tokens into one `width`-dim entry (official names: wkv, wgate,
    ape, norm)."""

    def __init__(self, dim: int, width: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.width, self.ratio, self.overlap = width, ratio, overlap
        c = 2 * width if overlap else width
        self.wkv = nn.Linear(dim, c, bias=False)
        self.wgate = nn.Linear(dim, c, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, c))
        self.norm = RMSNorm(width, eps)

    def forward(self, h: torch.Tensor, st: CompressorState, start_pos: int,
                inv_freq: torch.Tensor) -> torch.Tensor:
        """Consume h [B, S, dim] at positions start_pos.., update `st`, return new entries [B, k, width]."""
        m, w = self.ratio, self.width
        kv, gate = self.wkv(h), self.wgate(h)
        r = start_pos % m
        if r:
            kv = torch.cat((st.pending_kv[:, :r].to(kv.dtype), kv), dim=1)
            gate = torch.cat((st.pending_gate[:, :r].to(gate.dtype), gate), dim=1)
        b, total = kv.shape[0], kv.shape[1]
        nw = total // m
        used = nw * m
        rest = total - used
        if rest:
            st.pending_kv[:, :rest] = kv[:, used:]
            st.pending_gate[:, :rest] = gate[:, used:]
        if nw == 0:
            return kv.new_zeros((b, 0, w))
        first = start_pos // m  # index of the first window closed now
        ckv = kv[:, :used].view(b, nw, m, -1)
        cgate = gate[:, :used].view(b, nw, m, -1) + self.ape.to(gate.dtype)
        if self.overlap:
            slots_kv = ckv.new_zeros((b, nw, 2 * m, w))
            slots_gate = cgate.new_full((b, nw, 2 * m, w), float("-inf"))
            slots_kv[:, :, m:] = ckv[..., w:]
            slots_gate[:, :, m:] = cgate[..., w:]
            if nw > 1:
                slots_kv[:, 1:, :m] = ckv[:, :-1, :, :w]
                slots_gate[:, 1:, :m] = cgate[:, :-1, :, :w]
            if first > 0:
                slots_kv[:, 0, :m] = st.prev_kv.to(ckv.dtype)
                slots_gate[:, 0, :m] = st.prev_gate.to(cgate.dtype)
            st.prev_kv.copy_(ckv[:, -1, :, :w])
            st.prev_gate.copy_(cgate[:, -1, :, :w])
        else:
            slots_kv, slots_gate = ckv, cgate
        weights = torch.softmax(slots_gate, dim=2, dtype=torch.float32).to(slots_kv.dtype)
        pooled = self.norm((slots_kv * weights).sum(dim=2))
        positions = (torch.arange(nw, device=h.device) + first) * m
        cos, sin = rope_cos_sin(inv_freq, positions)
        return apply_rope(pooled, cos, sin)


class Indexer(nn.Module):
    """Lightning indexer: picks, per query, the top-k compressed entries a CSA layer attends to."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, topk: int,
                 ratio: int, eps: float):
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.ratio = n_heads, head_dim, topk, ratio
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)
        self.compressor = Compressor(dim, head_dim, ratio, overlap=True, eps=eps)

    def forward(self, h: torch.Tensor, qr: torch.Tensor, st: CompressorState, start_pos: int,
                positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                inv_freq: torch.Tensor) -> torch.Tensor:
        """Update the indexer keys and return a bool mask [B, S, T] of the entries each query keeps."""
        st.append(self.compressor(h, st, start_pos, inv_freq))
        keys = st.view()  # [B, T, Di]
        b, s = h.shape[:2]
        t = keys.shape[1]
        available = torch.arange(t, device=h.device)[None, :] < ((positions + 1) // self.ratio)[:, None]
        if t == 0:
            return available.expand(b, s, t)
        if self.topk >= t:  # every available entry is kept; no scoring needed
            return available.expand(b, s, t)
        q = self.wq_b(qr).view(b, s, self.n_heads, self.head_dim)
        q = apply_rope(q, cos[:, None, :], sin[:, None, :])
        scores = torch.einsum("bshd,btd->bsht", q.float(), keys.float())
        weights = self.weights_proj(h).float() * self.n_heads ** -0.5
        scores = (F.relu(scores) * self.head_dim ** -0.5 * weights.unsqueeze(-1)).sum(dim=2)
        scores = scores.masked_fill(~available, float("-inf"))
        idx = scores.topk(self.topk, dim=-1).indices
        keep = torch.zeros(b, s, t, dtype=torch.bool, device=h.device)
        keep.scatter_(-1, idx, True)
        return keep & available
