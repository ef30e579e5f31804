"""Mixture of experts (V4-SPEC §2.10-2.11): routers (sqrt-softplus with a selection-only bias, or
hash routing through `tid2eid`), routed experts, the shared expert, and the token dispatch.

The routed experts are reached through an *expert provider* (DESIGN.md): anything with
`expert(layer_experts, e) -> module` semantics; the default is the in-memory ModuleList, and the
engine's expert store can stand in for it without the model knowing where weights live.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HASH_MOE, ModelConfig
from ..kernels import bf16_linear, moe_fp4, moe_gate
from ..kernels.numerics import EXACT
from .layers import Rederived, SwiGLU, clamped_swiglu

# torch >= 2.10 has a grouped matmul with a CPU kernel: all of a layer's routed experts in one call
# over rows sorted by expert. Measured here (bf16, mini): 1.3x faster than a per-expert loop for one
# token, 1.8x for 16; in fp32 it is no faster, so fp32 keeps the loop (see `pack_experts_`).
GROUPED_MM = getattr(F, "grouped_mm", None)


class Gate(nn.Module):
    """Router: `weight` [E, dim]; `bias` [E] (score layers, selection only) or `tid2eid` [V, k]."""

    def __init__(self, config: ModelConfig, is_hash: bool):
        super().__init__()
        self.is_hash = is_hash
        self.top_k = config.num_experts_per_tok
        self.func = config.scoring_func
        self.scale = config.routed_scaling_factor
        self.normalize = config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))
        if is_hash:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))
        else:
            self.register_buffer("bias", torch.zeros(config.n_routed_experts))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim], ids [N] -> (weights [N, k] in x's dtype, expert indices [N, k]). Scores, the fp32
        selection bias and the normalisation stay in fp32 whatever the compute dtype (as in DeepSeek's
        reference), so a bf16 model routes as its fp32 scores say."""
        f32, w = torch.float32, self.weight
        xf = x if x.dtype == f32 else x.float()
        # a router the checkpoint stores in bf16 may stay bf16 under fp32 compute (weights/storage.keep_bf16):
        # the native kernel reads it at half the bytes and multiplies the same values in fp32
        logits = bf16_linear(xf, w) if w.dtype == torch.bfloat16 else F.linear(xf, w if w.dtype == f32 else w.float())
        # scores, the biased top-k (or the hash ids), normalisation and scale: one native call on the CPU
        w, idx = moe_gate(logits, None if self.is_hash else self.bias, self.tid2eid[ids] if self.is_hash else None,
                          self.top_k, self.func, self.normalize, self.scale)
        return (w if w.dtype == x.dtype else w.to(x.dtype)), idx


class AbsentExpert(nn.Module):
    """A routed expert held by another process (expert parallelism): contributes nothing here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class MoE(Rederived, nn.Module):
    _derived = ("w13", "w2")  # the packed experts, whose views the experts' parameters are
    numerics = EXACT  # of the FP4-held experts' kernel (kernels/numerics.py)

    def __init__(self, config: ModelConfig, layer_idx: int | None):
        super().__init__()
        is_hash = layer_idx is not None and config.mlp_layer_types[layer_idx] == HASH_MOE
        self.gate = Gate(config, is_hash)
        self.experts = nn.ModuleList(
            SwiGLU(config.hidden_size, config.moe_intermediate_size, config.swiglu_limit)
            for _ in range(config.n_routed_experts))
        self.shared_experts = (SwiGLU(config.hidden_size, config.moe_intermediate_size, config.swiglu_limit)
                               if config.n_shared_experts else None)
        self.provider = None  # optional callable (experts, e) -> module; see module docstring
        # optional callable idx [N, k] -> rounds of (slot ids, pair mask or None, (q13, s13, q2, s2)): FP4
        # experts served from slots of an expert store's slab, run by the same fused kernel
        self.slots = None
        # optional callable (x [N, dim], ids [N], idx [N, k]) called after routing, before the experts
        # run: the expert store uses it to prefetch the next layer's experts and to record traces
        self.on_route = None
        # optional callable out [N, dim] -> out: the routed experts' partial sum combined with other
        # processes' (expert parallelism: each holds a share of the experts; engine/parallel.py)
        self.combine = None
        self.owned: range | None = None  # FP4-held experts under expert parallelism: the ids held here
        self._last_idx: torch.Tensor | None = None  # the last call's routed ids (see last_experts)
        self.w13: torch.Tensor | None = None  # [E, 2I, dim] packed w1|w3 (see pack_experts_)
        self.w2: torch.Tensor | None = None   # [E, dim, I]
        self.limit = config.swiglu_limit
        self.fp4 = False  # routed experts held as FP4 codes (see hold_fp4_)

    @property
    def last_experts(self) -> torch.Tensor | None:
        """Distinct experts the last call used; computed when asked, so that the forward call itself
        never waits for the device (a unique on a GPU is a host synchronisation)."""
        return None if self._last_idx is None else torch.unique(self._last_idx)

    @torch.no_grad()
    def hold_fp4_(self, q13: torch.Tensor, s13: torch.Tensor, q2: torch.Tensor, s2: torch.Tensor) -> None:
        """Hold the routed experts as the official checkpoint stores them: e2m1 codes two a byte with
        UE8M0 scales per 32 inputs, w1 and w3 stacked (q13 [E, 2I, dim/2], s13 [E, 2I, dim/32]; q2
        [E, dim, I/2], s2 [E, dim, I/32]). All (token, expert) pairs of a call then run in one fused
        kernel (kernels.moe_fp4), and the per-expert modules are dropped: the buffers are the experts."""
        self.register_buffer("q13", q13.view(torch.uint8))
        self.register_buffer("s13", s13.view(torch.uint8))
        self.register_buffer("q2", q2.view(torch.uint8))
        self.register_buffer("s2", s2.view(torch.uint8))
        self.experts = nn.ModuleList()
        self.fp4 = True

    def keep_experts_(self, owned: range) -> None:
        """Hold only the routed experts `owned` (expert parallelism): the others become `AbsentExpert`
        (their weights are never read), and FP4-held experts are expected as that slice."""
        self.owned = owned
        if not self.fp4:
            for e in range(len(self.experts)):
                if e not in owned:
                    self.experts[e] = AbsentExpert()

    def _rederive(self, packed: bool) -> None:
        """After a move or cast (layers.Rederived): pack again, and on a GPU pack every dtype (the packed
        paths need no host synchronisation)."""
        if packed or self.gate.weight.device.type == "cuda":
            self.pack_experts_()

    @torch.no_grad()
    def pack_experts_(self) -> None:
        """Store all routed experts in two stacked tensors (the per-expert parameters become views
        of them, so names, state dicts and memory stay the same) and use grouped matmuls."""
        if GROUPED_MM is None or self.w13 is not None or self.fp4 or self.owned is not None:
            return
        inter = self.experts[0].w1.weight.shape[0]
        w13 = torch.stack([torch.cat((e.w1.weight, e.w3.weight)) for e in self.experts])
        w2 = torch.stack([e.w2.weight for e in self.experts])
        for j, e in enumerate(self.experts):
            e.w1.weight = nn.Parameter(w13[j, :inter], requires_grad=False)
            e.w3.weight = nn.Parameter(w13[j, inter:], requires_grad=False)
            e.w2.weight = nn.Parameter(w2[j], requires_grad=False)
        self.w13, self.w2 = w13, w2

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, dim] (or [B, S, dim]), ids matching (token ids, for hash routing) -> same shape."""
        shape = x.shape
        flat = x if x.dim() == 2 else x.reshape(-1, shape[-1])
        weights, idx = self.gate(flat, ids if ids.dim() == 1 else ids.reshape(-1))
        out = self.routed(flat, ids, weights, idx)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out if x.dim() == 2 else out.view(shape)

    def routed(self, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The routed part for rows flat [N, dim] already routed: the `on_route` hook, the experts' weighted
        sum, other processes' partial sums (`combine`)."""
        if self.on_route is not None:
            self.on_route(flat, ids.reshape(-1), idx)
        out = self._routed(flat, weights, idx)
        return self.combine(out) if self.combine is not None else out

    def shared(self, flat: torch.Tensor) -> torch.Tensor:
        """The shared expert's output for flat [N, dim] (zeros without one)."""
        return self.shared_experts(flat) if self.shared_experts is not None else torch.zeros_like(flat)

    def _routed(self, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for each row of flat [N, dim]; records `last_experts`."""
        if self.fp4 and self.provider is None and self.slots is None:  # every (token, expert) pair, one call
            self._last_idx = idx
            if self.owned is not None:  # only experts owned..: the others' pairs weigh nothing here
                mine = (idx >= self.owned.start) & (idx < self.owned.stop)
                idx = (idx - self.owned.start).clamp(0, len(self.owned) - 1)
                weights = weights * mine
            out = moe_fp4(flat, idx, weights, self.q13, self.s13, self.q2, self.s2, self.limit, self.numerics)
            return out if out.dtype == flat.dtype else out.to(flat.dtype)
        if self.slots is not None:  # the same kernel over an expert store's slots
            self._last_idx = idx
            out = None
            for slot_idx, mask, bufs in self.slots(idx):
                y = moe_fp4(flat, slot_idx, weights if mask is None else weights * mask, *bufs, self.limit,
                            self.numerics)
                out = y if out is None else out + y
            return out.to(flat.dtype)
        out = torch.zeros_like(flat)
        self._last_idx = idx
        if self.w13 is not None and self.provider is None:
            self._grouped(flat, weights, idx, out)
        elif flat.shape[0] == 1:  # one token (batch-1 decode): no grouping needed
            order = torch.argsort(idx[0])
            used = idx[0, order]
            for e, w in zip(used.tolist(), weights[0, order].tolist()):
                expert = self.provider(self.experts, e) if self.provider else self.experts[e]
                out += expert(flat) * w
        else:
            # group (token, slot) pairs by expert: one sort, then one matmul chain per *used* expert
            flat_idx = idx.reshape(-1)
            order = torch.argsort(flat_idx, stable=True)
            used, counts = torch.unique_consecutive(flat_idx[order], return_counts=True)
            tokens = order // idx.shape[1]
            wsorted = weights.reshape(-1)[order].to(flat.dtype)
            start = 0
            for e, n in zip(used.tolist(), counts.tolist()):
                sel = tokens[start:start + n]
                expert = self.provider(self.experts, e) if self.provider else self.experts[e]
                out.index_add_(0, sel, expert(flat[sel]) * wsorted[start:start + n, None])
                start += n
        return out

    def _grouped(self, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
        """All routed experts in two grouped matmuls over the (token, slot) rows sorted by expert."""
        if flat.is_cuda and self.w13.dtype != torch.bfloat16:  # torch's grouped GEMM on a GPU takes bf16
            return self._gathered(flat, weights, idx, out)
        flat_idx = idx.reshape(-1)
        order = torch.argsort(flat_idx, stable=True)
        # (not bincount: on a GPU it reads the largest id back to the host first)
        counts = torch.zeros(self.w13.shape[0], dtype=torch.long, device=flat_idx.device)
        counts.scatter_add_(0, flat_idx, torch.ones_like(flat_idx))
        offs = counts.cumsum(0).to(torch.int32)
        tokens = order // idx.shape[1]
        rows = flat[tokens].to(self.w13.dtype)
        h = GROUPED_MM(rows, self.w13.transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        act = clamped_swiglu(gate, up, self.limit)
        y = GROUPED_MM(act, self.w2.transpose(-2, -1), offs=offs)
        out.index_add_(0, tokens, (y * weights.reshape(-1)[order, None].to(y.dtype)).to(out.dtype))

    def _gathered(self, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
        """Every (token, slot) pair with its expert's packed weights gathered: batched matrix-vector
        products, no host synchronisation (the fp32 GPU path: parity checks, small models)."""
        t, k = idx.shape
        e = idx.reshape(-1)
        rows = flat.repeat_interleave(k, dim=0).to(self.w13.dtype)
        h = torch.bmm(self.w13[e], rows.unsqueeze(-1)).squeeze(-1)
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(self.w2[e], clamped_swiglu(gate, up, self.limit).unsqueeze(-1)).squeeze(-1)
        out += (y * weights.reshape(-1, 1).to(y.dtype)).view(t, k, -1).sum(dim=1).to(out.dtype)
