"""KV compressors (CSA overlapping, HCA plain) and the lightning indexer (V4-SPEC §2.5-2.7).

A compressor turns every `m` tokens into one entry: a per-channel softmax over the window's gate
logits (plus a learned position bias) weights the projected rows; the pooled row is normalised and
rotated at the window's first position. CSA windows overlap: entry w pools the previous window's
"A" halves and its own "B" halves (8 slots for m = 4). The indexer owns a narrow CSA compressor of
its own and scores every available entry against the query to keep only the top-k.

Projections run once over all tokens of a batch (`project`); the per-sequence state machine
(`consume`, `select`) then runs on each sequence's rows.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import indexer_scores, rope_rows
from .layers import RMSNorm, apply_rope, rope_cos_sin
from .state import CompressorState


SORT_MAX_ENTRIES = 2048  # measured: the sort 0.017 ms / the keyed top-k 0.037 ms at 1K entries, 0.18 / 0.07 at 8K


def top_entries(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores along the last axis, highest first, ties to the earlier entry.

    The ReLU makes exact ties common (every entry no head fires for scores 0), and topk breaks them as
    its kernel happens to: differently on the CPU and a GPU, and for a different number of entries (the
    static decode path scores its whole buffer). A stable sort of every score fixes the order but costs
    O(T log T) per query, per CSA layer, per token. Instead each fp32 score becomes a distinct int64 key:
    its bits mapped to an integer of the same order, above the entry's index reversed, so that one topk
    over the keys (O(T), no host synchronisation, so a CUDA graph can hold it) returns exactly the stable
    sort's first k. Up to SORT_MAX_ENTRIES the sort itself is cheaper (fewer ops; bench/long_context.py
    times both), and gives the same indices."""
    t = scores.shape[-1]
    if t <= SORT_MAX_ENTRIES:
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    s = scores.float() + 0.0  # -0.0 becomes +0.0: they tie, as in a sort
    bits = s.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # same order as the floats
    rank = torch.arange(t - 1, -1, -1, device=scores.device)  # earlier entries rank higher among ties
    return torch.topk(ordered * (1 << 32) + rank, k, dim=-1).indices


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

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.wkv(h), self.wgate(h)

    def consume(self, kv: torch.Tensor, gate: torch.Tensor, st: CompressorState, start_pos: int,
                inv_freq: torch.Tensor) -> torch.Tensor:
        """Feed one sequence's projected rows kv/gate [S, C] at positions start_pos..; update `st`
        and return the entries closed now [k, width] (already normalised and rotated), or None when no window
        closes (CompressorState.append takes both)."""
        m, w = self.ratio, self.width
        r = start_pos % m
        if r + kv.shape[0] < m:  # no window closes (most decode steps): only the pending rows grow
            st.pending_kv[r: r + kv.shape[0]] = kv
            st.pending_gate[r: r + kv.shape[0]] = gate
            return None
        if r:
            kv = torch.cat((st.pending_kv[:r].to(kv.dtype), kv))
            gate = torch.cat((st.pending_gate[:r].to(gate.dtype), gate))
        total = kv.shape[0]
        nw = total // m
        used = nw * m
        if total > used:
            st.pending_kv[: total - used] = kv[used:]
            st.pending_gate[: total - used] = gate[used:]
        if nw == 0:
            return kv.new_zeros((0, w))
        first = start_pos // m  # index of the first window closed now
        ckv = kv[:used].view(nw, m, -1)
        cgate = gate[:used].view(nw, m, -1) + self.ape  # fp32 bias: gate logits promote to fp32
        if self.overlap:
            slots_kv = ckv.new_zeros((nw, 2 * m, w))
            slots_gate = cgate.new_full((nw, 2 * m, w), float("-inf"))
            slots_kv[:, m:] = ckv[..., w:]
            slots_gate[:, m:] = cgate[..., w:]
            if nw > 1:
                slots_kv[1:, :m] = ckv[:-1, :, :w]
                slots_gate[1:, :m] = cgate[:-1, :, :w]
            if first > 0:
                slots_kv[0, :m] = st.prev_kv.to(ckv.dtype)
                slots_gate[0, :m] = st.prev_gate.to(cgate.dtype)
            st.prev_kv.copy_(ckv[-1, :, :w])
            st.prev_gate.copy_(cgate[-1, :, :w])
        else:
            slots_kv, slots_gate = ckv, cgate
        weights = torch.softmax(slots_gate, dim=1, dtype=torch.float32).to(slots_kv.dtype)
        pooled = self.norm((slots_kv * weights).sum(dim=1))
        positions = (torch.arange(nw, device=kv.device) + first) * m
        cos, sin = rope_cos_sin(inv_freq, positions)
        return apply_rope(pooled, cos, sin)


    def consume_static(self, kv: torch.Tensor, gate: torch.Tensor, st: CompressorState, pos: torch.Tensor,
                       inv_freq: torch.Tensor) -> None:
        """One decode row per sequence of a batched state (state.batched_layer_states): kv / gate [B, C] at
        positions pos [B]. The same arithmetic as `consume`, written without branches on the positions
        (a CUDA graph replays it at any positions): every row writes its pending slot, the window close
        is computed for every row, and only rows whose window closes now (pos % m == m - 1) keep it."""
        m, w = self.ratio, self.width
        b = torch.arange(kv.shape[0], device=kv.device)
        r = pos % m
        st.pending_kv[b, r] = kv.to(st.pending_kv.dtype)
        st.pending_gate[b, r] = gate.to(st.pending_gate.dtype)
        emit = r == m - 1
        first = pos // m  # the window this row belongs to
        ckv = st.pending_kv.to(kv.dtype)  # [B, m, C]
        cgate = st.pending_gate.to(gate.dtype) + self.ape
        if self.overlap:
            has_prev = (first > 0)[:, None, None]
            prev_kv = torch.where(has_prev, st.prev_kv.to(ckv.dtype), torch.zeros_like(ckv[..., :w]))
            prev_gate = torch.where(has_prev, st.prev_gate.to(cgate.dtype), torch.full_like(cgate[..., :w], float("-inf")))
            slots_kv = torch.cat((prev_kv, ckv[..., w:]), dim=1)  # [B, 2m, w]
            slots_gate = torch.cat((prev_gate, cgate[..., w:]), dim=1)
            keep = emit[:, None, None]
            st.prev_kv.copy_(torch.where(keep, ckv[..., :w].to(st.prev_kv.dtype), st.prev_kv))
            st.prev_gate.copy_(torch.where(keep, cgate[..., :w].to(st.prev_gate.dtype), st.prev_gate))
        else:
            slots_kv, slots_gate = ckv, cgate
        weights = torch.softmax(slots_gate, dim=1, dtype=torch.float32).to(slots_kv.dtype)
        pooled = self.norm((slots_kv * weights).sum(dim=1))
        cos, sin = rope_cos_sin(inv_freq, first * m)
        entry = apply_rope(pooled, cos, sin).to(st.entries.dtype)
        st.entries[b, first] = torch.where(emit[:, None], entry, st.entries[b, first])


class Indexer(nn.Module):
    """Lightning indexer: picks, per query, the top-k compressed entries a CSA layer attends to."""

    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, topk: int,
                 ratio: int, eps: float):
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.ratio = n_heads, head_dim, topk, ratio
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)
        self.compressor = Compressor(dim, head_dim, ratio, overlap=True, eps=eps)

    def project(self, h: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                pre: tuple | None = None):
        """(queries [N, Hi, Di] rotated, head weights [N, Hi] fp32, key rows kv/gate [N, 2 Di]).
        `pre` = (wq_b(qr), weights_proj(h), wkv(h), wgate(h)) when the caller fused those matmuls."""
        q_raw, w_raw, kv, gate = pre if pre is not None else (
            self.wq_b(qr), self.weights_proj(h), *self.compressor.project(h))
        q = rope_rows(q_raw.view(qr.shape[0], self.n_heads, self.head_dim), cos, sin)
        return q, w_raw.float() * self.n_heads ** -0.5, kv, gate

    def select(self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For one sequence's queries q [S, Hi, Di] and its keys [T, Di]: (indices [S, k] of the
        entries each query keeps, valid [S, k] bool). Entries a query cannot see yet are never valid."""
        t = keys.shape[0]
        limit = (positions + 1) // self.ratio  # entries visible to each query
        k = min(self.topk, t)
        # one native call on the CPU: keys read as stored (bf16 records too), no [S, Hi, T] intermediate
        scores = indexer_scores(q.float(), weights * self.head_dim ** -0.5, keys)
        ent = torch.arange(t, device=q.device)
        scores = scores.masked_fill(ent[None, :] >= limit[:, None], float("-inf"))
        idx = top_entries(scores, k)
        return idx, idx < limit[:, None]

    def select_static(self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
                      positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`select` for one decode row per sequence over a batched entry buffer: q [B, Hi, Di], keys
        [B, T, Di] (rows at or past a sequence's entry count are never valid) -> (indices, valid) [B, k]."""
        t = keys.shape[1]
        limit = (positions + 1) // self.ratio
        scores = torch.einsum("bhd,btd->bht", q.float(), keys.float()).relu_()
        scores = torch.bmm((weights * self.head_dim ** -0.5).unsqueeze(1), scores).squeeze(1)  # [B, T]
        ent = torch.arange(t, device=q.device)
        scores = scores.masked_fill(ent[None, :] >= limit[:, None], float("-inf"))
        idx = top_entries(scores, min(self.topk, t))
        return idx, idx < limit[:, None]
