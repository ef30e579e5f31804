"""V4 attention (V4-SPEC §2.3-2.9): low-rank queries with a per-head norm, one shared K=V head,
partial interleaved RoPE, a sliding window plus compressed entries (all of them for HCA, the
indexer's top-k for CSA), a learned per-head sink, inverse RoPE on the output, and a grouped
low-rank output projection.

Tokens of many sequences arrive flattened ([N, dim]) with one `Segment` per sequence; projections
run once over all N rows, the attention core runs per sequence on its own window and entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import CSA, SLIDING, ModelConfig
from .compressor import Compressor, Indexer
from ..kernels import attn_decode_batch, fp8_grouped_linear, norm_rope, rope_rows
from ..kernels.linear import FP8_BLOCK, Fp8Linear
from .layers import FusedLinears, Rederived, RMSNorm
from .state import LayerState

# Upper bound on the elements of one attention-score block (fp32): long prefill chunks are split
# into query blocks so memory stays bounded whatever the chunk and context length.
SCORE_BUDGET = 1 << 24


_EMPTY: dict = {}  # (device, dtype, width) -> (no entries [0, width], no mask [0]): shared, never written


def _no_entries(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty entry set of a decode row that attends to its window alone (made once per device and dtype)."""
    key = (kv.device, kv.dtype, kv.shape[-1])
    if key not in _EMPTY:
        _EMPTY[key] = (kv.new_zeros(0, kv.shape[-1]), torch.zeros(0, dtype=torch.bool, device=kv.device))
    return _EMPTY[key]


@dataclass
class Segment:
    """Rows offset..offset+length of the flat batch belong to one sequence starting at `start`."""

    offset: int
    length: int
    start: int


class Attention(Rederived, nn.Module):
    _derived = ("_h_proj", "_q_proj")  # fused projections, redone after a move (layers.Rederived)

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
        self._h_proj: FusedLinears | None = None  # see fuse_projections_
        self._q_proj: FusedLinears | None = None

    @torch.no_grad()
    def fuse_projections_(self) -> None:
        """Run every projection of h (wq_a, wkv, compressor and indexer projections) as one matmul,
        and both projections of the q residual (wq_b, indexer wq_b) as another."""
        if self._h_proj is not None:
            return
        h_mods = [self.wq_a, self.wkv]
        if self.compressor is not None:
            h_mods += [self.compressor.wkv, self.compressor.wgate]
        if self.indexer is not None:
            ic = self.indexer.compressor
            h_mods += [self.indexer.weights_proj, ic.wkv, ic.wgate]
            self._q_proj = FusedLinears([self.wq_b, self.indexer.wq_b])
        self._h_proj = FusedLinears(h_mods)

    def forward(self, h: torch.Tensor, segs: list[Segment], states: list[LayerState],
                positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                inv_freq: torch.Tensor) -> torch.Tensor:
        """h [N, dim] (rows of all segments) -> [N, dim]; advances each segment's LayerState."""
        n = h.shape[0]
        if self._h_proj is not None:
            qa, kv_raw, *rest = self._h_proj(h)
        else:
            qa, kv_raw, rest = self.wq_a(h), self.wkv(h), None
        qr = self.q_norm(qa)
        if self._q_proj is not None:
            q_raw, iq_raw = self._q_proj(qr)
        else:
            q_raw, iq_raw = self.wq_b(qr), None
        # per-head query norm (unweighted) and rotation; the key's norm (kv_norm) and rotation: one call each
        q = norm_rope(q_raw.view(n, self.n_heads, self.head_dim), None, cos, sin, self.eps)
        kv = norm_rope(kv_raw.view(n, 1, self.head_dim), self.kv_norm.weight, cos, sin, self.kv_norm.eps).view(n, -1)
        rows = {"q": q, "kv": kv, "pos": positions}
        if self.compressor is not None:
            rows["ckv"], rows["cgate"] = (rest[0], rest[1]) if rest else self.compressor.project(h)
        if self.indexer is not None:
            pre = (iq_raw, *rest[2:5]) if rest else None
            rows["iq"], rows["iw"], rows["ikv"], rows["igate"] = self.indexer.project(h, qr, cos, sin, pre)
        if isinstance(states, LayerState):  # one decode row per sequence of a batched state
            out = self._attend_static(rows, states, inv_freq)
        elif len(segs) == n:  # a decode step: one row for each sequence
            out = self._attend_rows(rows, segs, states, inv_freq)
        elif len(segs) == 1 and segs[0].length == n and self._block_size(segs[0]) >= n:
            out = self._attend(rows, states[0], segs[0].start, inv_freq)  # one sequence, one block: no slicing
        else:
            out = torch.empty_like(q)
            for seg, st in zip(segs, states):
                step = self._block_size(seg)
                for a in range(0, seg.length, step):
                    b = min(a + step, seg.length)
                    sl = slice(seg.offset + a, seg.offset + b)
                    out[sl] = self._attend({k: v[sl] for k, v in rows.items()}, st, seg.start + a, inv_freq)
        out = rope_rows(out, cos, sin, inverse=True)
        grouped = out.reshape(n, self.o_groups, -1)
        if isinstance(self.wo_a, Fp8Linear) and self.o_lora_rank % FP8_BLOCK == 0:
            # each group's rows are whole scale blocks: all groups in one grouped FP8 product
            low = fp8_grouped_linear(grouped, self.wo_a.qweight, self.wo_a.scale)
            low = low if low.dtype == out.dtype else low.to(out.dtype)
        else:
            wo_a = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)
            low = torch.einsum("sgi,gri->sgr", grouped, wo_a.to(out.dtype)).flatten(1)
        return self.wo_b(low)

    def _block_size(self, seg: Segment) -> int:
        """Query rows per block so that scores and gathered keys stay within SCORE_BUDGET."""
        total = (seg.start + seg.length) // self.ratio if self.ratio else 0  # entries at the end
        per_row = self.n_heads * (self.window + 512)
        if self.indexer is not None:  # indexer scores [S, Hi, T] + gathered keys [S, k, D]
            k = self.indexer.topk
            per_row += self.indexer.n_heads * total + k * (self.head_dim + self.n_heads)
        elif self.compressor is not None:
            per_row += self.n_heads * total
        return max(1, min(512, SCORE_BUDGET // per_row))

    def _attend(self, r: dict, st: LayerState, start: int, inv_freq: torch.Tensor) -> torch.Tensor:
        """Attention for one sequence's consecutive query rows; returns [S, H, D]."""
        q, kv, pos = r["q"], r["kv"], r["pos"]
        if q.shape[0] == 1:  # a single row: the decode path
            return self._attend_rows(r, [Segment(0, 1, start)], [st], inv_freq)
        w = self.window
        slot = torch.arange(w, device=q.device)
        ring_pos = start - 1 - ((start - 1 - slot) % w)  # newest position held by each ring slot
        ring_pos = torch.where(ring_pos >= 0, ring_pos, torch.full_like(ring_pos, -(1 << 40)))
        keys = torch.cat((st.window.to(kv.dtype), kv))
        key_pos = torch.cat((ring_pos, pos))
        visible = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - w)
        keep = min(kv.shape[0], w)
        st.window[pos[-keep:] % w] = kv[-keep:].to(st.window.dtype)
        logits = [torch.einsum("shd,kd->hsk", q, keys).masked_fill(~visible[None], float("-inf"))]
        values = [(keys, "dense")]

        if self.compressor is not None:
            st.compressor.append(self.compressor.consume(r["ckv"], r["cgate"], st.compressor, start, inv_freq))
            entries = st.compressor.view().to(kv.dtype)  # [T, D]
            t = entries.shape[0]
            limit = (pos + 1) // self.ratio
            if self.indexer is not None:
                ist = st.indexer
                ist.append(self.indexer.compressor.consume(r["ikv"], r["igate"], ist, start, inv_freq))
            if self.indexer is not None and t > self.indexer.topk:
                idx, valid = self.indexer.select(r["iq"], r["iw"], ist.view(), pos)
                chosen = entries[idx]  # [S, k, D]: only the selected entries are read
                logits.append(torch.einsum("shd,skd->hsk", q, chosen).masked_fill(~valid[None], float("-inf")))
                values.append((chosen, "gathered"))
            elif t:
                avail = torch.arange(t, device=q.device)[None, :] < limit[:, None]
                logits.append(torch.einsum("shd,kd->hsk", q, entries).masked_fill(~avail[None], float("-inf")))
                values.append((entries, "dense"))

        h, s = q.shape[1], q.shape[0]
        sink = self.attn_sink.float().view(h, 1, 1).expand(h, s, 1)
        full = torch.cat([(x * self.scale).float() for x in logits] + [sink], dim=-1)
        probs = torch.softmax(full - full.amax(dim=-1, keepdim=True), dim=-1).to(q.dtype)
        out = None
        start_col = 0
        for (vals, kind), lg in zip(values, logits):
            p = probs[..., start_col: start_col + lg.shape[-1]]
            start_col += lg.shape[-1]
            part = (torch.einsum("hsk,kd->shd", p, vals) if kind == "dense"
                    else torch.einsum("hsk,skd->shd", p, vals))
            out = part if out is None else out + part
        return out

    def _attend_static(self, r: dict, st: LayerState, inv_freq: torch.Tensor) -> torch.Tensor:
        """`_attend_rows` over a batched state (state.batched_layer_states): row b
        is sequence b at position pos[b]. Fixed shapes, no branch on the positions and no host
        synchronisation, so a CUDA graph can replay it (engine/graphs.py): visibility is masks, entry
        buffers are read to their capacity with the rows past a sequence's count masked. Returns [B, H, D]."""
        q, kv, pos = r["q"], r["kv"], r["pos"]
        bsz, w = q.shape[0], self.window
        slot = torch.arange(w, device=q.device)
        ring_pos = pos[:, None] - 1 - torch.remainder(pos[:, None] - 1 - slot[None, :], w)
        keys = [st.window.float(), kv[:, None].float()]
        ok = [(ring_pos >= 0) & (ring_pos > pos[:, None] - w), torch.ones(bsz, 1, dtype=torch.bool, device=q.device)]
        if self.compressor is not None:
            self.compressor.consume_static(r["ckv"], r["cgate"], st.compressor, pos, inv_freq)
            entries = st.compressor.entries  # [B, T, D]
            if self.indexer is not None:
                self.indexer.compressor.consume_static(r["ikv"], r["igate"], st.indexer, pos, inv_freq)
            if self.indexer is not None and entries.shape[1] > self.indexer.topk:
                idx, valid = self.indexer.select_static(r["iq"], r["iw"], st.indexer.entries, pos)
                chosen = torch.gather(entries, 1, idx[..., None].expand(-1, -1, entries.shape[-1]))
                keys.append(chosen.float())
                ok.append(valid)
            else:
                keys.append(entries.float())
                ok.append(torch.arange(entries.shape[1], device=q.device)[None, :] < ((pos + 1) // self.ratio)[:, None])
        keys = torch.cat(keys, dim=1)  # [B, K, D]: window ring, the new key, entries
        visible = torch.cat(ok, dim=1)
        logits = torch.einsum("bhd,bkd->bhk", q.float(), keys) * self.scale
        logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
        sink = self.attn_sink.float()[None, :, None].expand(bsz, -1, 1)
        probs = torch.softmax(torch.cat((logits, sink), dim=-1), dim=-1)[..., :-1]
        out = torch.einsum("bhk,bkd->bhd", probs, keys)
        st.window[torch.arange(bsz, device=q.device), pos % w] = kv.to(st.window.dtype)
        return out if out.dtype == q.dtype else out.to(q.dtype)

    def _entries_one(self, r: dict, st: LayerState, start: int, inv_freq: torch.Tensor):
        """A single query row's compressed side (a decode step): feed the compressors (and the indexer's) this
        row, then (entries [T, D] the row attends to, valid [T]): all of them (HCA), the indexer's top-k
        (CSA past `topk` entries), or none (sliding layers)."""
        q, kv = r["q"], r["kv"]
        ent, valid = _no_entries(kv)
        if self.compressor is not None:
            st.compressor.append(self.compressor.consume(r["ckv"], r["cgate"], st.compressor, start, inv_freq))
            entries = st.compressor.view()
            t = entries.shape[0]
            if self.indexer is not None:
                ist = st.indexer
                ist.append(self.indexer.compressor.consume(r["ikv"], r["igate"], ist, start, inv_freq))
            if self.indexer is not None and t > self.indexer.topk:
                idx, ok = self.indexer.select(r["iq"], r["iw"], ist.view(), r["pos"])
                ent, valid = entries[idx[0]], ok[0]
            elif t:
                ent, valid = entries, torch.arange(t, device=q.device) < (start + 1) // self.ratio
        return ent, valid

    def _attend_rows(self, rows: dict, segs: list[Segment], states: list[LayerState],
                     inv_freq: torch.Tensor) -> torch.Tensor:
        """One decode row per sequence (every segment of length 1, rows in segment order): each sequence's
        compressed side (`_entries_one`), then every sequence's attention and ring write in one call
        (kernels.attn_decode_batch) instead of a call, a ring write and row slicing per sequence. [B, H, D]."""
        q = rows["q"]
        if self.compressor is None:  # sliding layers: the rings alone, nothing to slice
            empty, none = _no_entries(rows["kv"])
            ents, valids = [empty] * len(segs), [none] * len(segs)
        else:
            ents, valids = [], []
            for b, (seg, st) in enumerate(zip(segs, states)):
                r = rows if len(segs) == 1 else {k: v[b:b + 1] for k, v in rows.items()}
                ent, valid = self._entries_one(r, st, seg.start, inv_freq)
                ents.append(ent)
                valids.append(valid)
        out = attn_decode_batch(q, [st.window for st in states], [seg.start for seg in segs], rows["kv"], ents,
                                valids, self.attn_sink, self.scale)
        return out if out.dtype == q.dtype else out.to(q.dtype)
