"""DeepSeek-V4 assembled from ModelConfig: Block (mHC around attention and MoE), Transformer
(embedding -> n streams -> blocks -> hyper head -> norm -> logits) and the MTP module.

Module and parameter names equal the official checkpoint names (V4-SPEC §5.2), so a state dict
loads without renaming. Every forward call writes new tokens into the sequences' states (their
owner advances the positions); a full forward, a chunked prefill and token-by-token decode produce
the same logits. Tokens of many
sequences (each at its own position, any number of new tokens each) run through one call as a flat
batch: `forward_tokens(tokens, seqs, lengths)`; this is what continuous batching uses.
"""

from __future__ import annotations


import torch
from torch import nn

from ..config import SLIDING, ModelConfig, prefix_block_tokens
from .attention import Attention, Segment
from .hyper import hc_expand, hc_head, hc_pre
from .layers import RMSNorm, rope_cos_sin, rope_inv_freq
from .moe import MoE
from .state import LayerState, ModelState, SeqState, new_seq_state, new_state, state_bytes


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str, layer_idx: int | None):
        super().__init__()
        c = config
        self.layer_type = layer_type
        self.attn = Attention(c, layer_type)
        self.ffn = MoE(c, layer_idx)
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        mix = (2 + c.hc_mult) * c.hc_mult
        for site in ("attn", "ffn"):
            self.register_parameter(f"hc_{site}_fn", nn.Parameter(torch.zeros(mix, c.hc_mult * c.hidden_size)))
            self.register_parameter(f"hc_{site}_base", nn.Parameter(torch.zeros(mix)))
            self.register_parameter(f"hc_{site}_scale", nn.Parameter(torch.ones(3)))
        self.hc = (c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, segs: list[Segment], states: list[LayerState],
                positions: torch.Tensor, rope: tuple) -> torch.Tensor:
        """x [N, n, dim] streams of the flat batch -> same shape."""
        x, h, post, comb = self.pre_ffn(x, segs, states, positions, rope)
        return hc_expand(x, self.ffn(h, ids), post, comb)

    def pre_ffn(self, x: torch.Tensor, segs, states, positions: torch.Tensor, rope: tuple):
        """Everything before the MoE: (streams after attention, the MoE's input h, the FFN site's post and
        comb). A piecewise CUDA graph ends here (the routed experts run between graphs)."""
        iters, hc_eps, _ = self.hc
        h, post, comb = hc_pre(x, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale, self.attn_norm, iters, hc_eps)
        x = hc_expand(x, self.attn(h, segs, states, positions, *rope), post, comb)
        h, post, comb = hc_pre(x, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale, self.ffn_norm, iters, hc_eps)
        return x, h, post, comb


class MTPBlock(Block):
    """Multi-token prediction: combines the next token's embedding with the main model's final
    streams, runs one more block and predicts the token after it (shares embed and head)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, config.mtp_layer_type, None)
        d = config.hidden_size
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.zeros(config.hc_mult, config.hc_mult * d))
        self.hc_head_base = nn.Parameter(torch.zeros(config.hc_mult))
        self.hc_head_scale = nn.Parameter(torch.ones(1))


class Transformer(nn.Module):
    """The whole model. `forward(ids, state)` -> logits for the new tokens."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, t, i) for i, t in enumerate(c.layer_types))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.hc_head_fn = nn.Parameter(torch.zeros(c.hc_mult, c.hc_mult * c.hidden_size))
        self.hc_head_base = nn.Parameter(torch.zeros(c.hc_mult))
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.mtp = nn.ModuleList(MTPBlock(c) for _ in range(c.num_nextn_predict_layers))
        rope_dim = c.qk_rope_head_dim
        self.register_buffer("inv_freq_main", rope_inv_freq(rope_dim, c.rope_theta), persistent=False)
        self.register_buffer("inv_freq_compress", rope_inv_freq(rope_dim, c.compress_rope_theta, c.yarn),
                             persistent=False)

    # ------------------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations and the state compute in: the final norm's (norms are always held in it;
        the embedding may stay bf16 under fp32 compute, as stored: weights/storage.keep_bf16)."""
        return self.norm.weight.dtype

    def embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding rows of `tokens` in the compute dtype (one row a token: the only bytes of the
        table a step reads)."""
        e, dtype = self.embed(tokens), self.compute_dtype
        return e if e.dtype == dtype else e.to(dtype)

    # The dtype of the state's records (window ring, compressed entries, indexer keys); None: the compute
    # dtype. engine/load.load_model(state_dtype=...) sets it (model/state.new_seq_state).
    state_dtype: torch.dtype | None = None

    def new_state(self, batch: int = 1, max_len: int = 0, dtype=None, mtp: bool = False) -> ModelState:
        dtype = dtype or self.compute_dtype
        return new_state(self.config, batch, dtype, self.embed.weight.device, max_len, mtp, self.state_dtype)

    def new_seq_state(self, max_len: int = 0, dtype=None, mtp: bool = False) -> SeqState:
        dtype = dtype or self.compute_dtype
        return new_seq_state(self.config, dtype, self.embed.weight.device, max_len, mtp, self.state_dtype)

    def experts_read(self) -> int:
        """Distinct routed experts the last forward call read, summed over layers (each is read once
        per call however many tokens chose it): the MoE part of that call's bytes."""
        e = self.config.n_routed_experts
        used = [torch.zeros(e, dtype=torch.bool, device=idx.device).index_fill_(0, idx.reshape(-1), True).sum()
                for idx in (layer.ffn._last_idx for layer in self.layers) if idx is not None]
        return int(torch.stack(used).sum()) if used else 0  # one read-back for all layers

    state_from_tensors = staticmethod(SeqState.from_tensors)  # a prefix cache's files back to states

    @property
    def prefix_block_tokens(self) -> int:
        """Where a prefix cache saves states (`config.prefix_block_tokens`)."""
        return prefix_block_tokens(self.config)

    def state_bytes(self, tokens: int, dtype=None) -> int:
        """Bytes of state a sequence of `tokens` tokens holds (model/state.py)."""
        compute = dtype or self.compute_dtype
        return state_bytes(self.config, tokens, (self.state_dtype or compute).itemsize, compute.itemsize)

    def _ropes(self, positions: torch.Tensor) -> dict[str, tuple]:
        out = {}
        for name, inv in (("main", self.inv_freq_main), ("compress", self.inv_freq_compress)):
            cos, sin = rope_cos_sin(inv, positions)
            out[name] = (cos, sin, inv)
        return out

    def _layout(self, seqs: list[SeqState], lengths: list[int], device) -> tuple[list[Segment], torch.Tensor]:
        if len(seqs) != len(lengths):
            raise ValueError(f"{len(seqs)} sequence states but {len(lengths)} lengths")
        segs, pos, off = [], [], 0
        for seq, n in zip(seqs, lengths):
            if n < 1:
                raise ValueError(f"every sequence needs at least one new token, got length {n}")
            segs.append(Segment(off, n, seq.pos))
            pos.extend(range(seq.pos, seq.pos + n))
            off += n
        # built on the host and copied once (one transfer per call, not a kernel per sequence)
        return segs, torch.tensor(pos, dtype=torch.long, device="cpu").to(device)

    def forward_tokens(self, tokens: torch.Tensor, seqs: list[SeqState], lengths: list[int]) -> torch.Tensor:
        """Run new tokens of several sequences: tokens [N] = the sequences' new tokens back to back,
        lengths[i] of them for seqs[i]. Returns the final streams [N, n, dim].

        Each seq's state is written at positions pos..pos+n-1, and `pos` is left alone: the caller
        owns the sequence and advances it (the engine does; `engine.forward.run_tokens`)."""
        if tokens.dim() != 1 or tokens.shape[0] != sum(lengths):
            raise ValueError(f"tokens must be a flat [sum(lengths)={sum(lengths)}] tensor, got {tuple(tokens.shape)}")
        vocab = self.config.vocab_size
        # checked on the CPU only: on a GPU it would be a host round trip per step (the engine checks
        # prompts on arrival, and sampled ids are in range)
        if (tokens.device.type == "cpu" and tokens.numel()
                and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab)):
            raise ValueError(f"token ids must lie in [0, {vocab}); got {int(tokens.min())}..{int(tokens.max())}")
        segs, positions = self._layout(seqs, lengths, tokens.device)
        ropes = self._ropes(positions)
        x = self.embed_rows(tokens).unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.layers):
            rope = ropes["main" if layer.layer_type == SLIDING else "compress"]
            x = layer(x, tokens, segs, [s.layers[i] for s in seqs], positions, rope)
        return x

    def forward_static(self, tokens: torch.Tensor, positions: torch.Tensor, layers: list[LayerState]) -> torch.Tensor:
        """One decode token for each of B sequences held in batched static buffers
        (state.batched_layer_states): tokens, positions [B] on the model's device -> final streams
        [B, n, dim]. The same modules as `forward_tokens`, with shapes and addresses fixed and no host
        synchronisation, which is what a CUDA graph captures (engine/graphs.py). The states are written
        at `positions`; the caller advances them."""
        ropes = self._ropes(positions)
        x = self.embed_rows(tokens).unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()
        for i, layer in enumerate(self.layers):
            rope = ropes["main" if layer.layer_type == SLIDING else "compress"]
            x = layer(x, tokens, None, layers[i], positions, rope)
        return x

    def static_piece(self, i: int, io: dict) -> None:
        """Piece i of `forward_static` cut at the routed experts (piecewise CUDA graphs, for steps whose
        experts an expert store decides on the host; engine/graphs.py). Piece 0 embeds and runs layer 0 up
        to its routing; piece i finishes layer i-1's FFN with `io["routed"][i-1]` (the routed experts'
        output, computed between pieces by `static_routed`) and runs layer i up to its routing; piece L
        finishes the last layer. `io` carries tokens, positions, layers, routed in, and the piece's
        outputs (x, h, post, comb, weights, idx, shared) out."""
        n_layers = len(self.layers)
        if i == 0:
            io["ropes"] = self._ropes(io["positions"])
            x = self.embed_rows(io["tokens"]).unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()
        else:
            y = io["routed"][i - 1] + io["shared"]
            x = hc_expand(io["x"], y, io["post"], io["comb"])
        if i == n_layers:
            io["x"] = x
            return
        layer = self.layers[i]
        rope = io["ropes"]["main" if layer.layer_type == SLIDING else "compress"]
        x, h, post, comb = layer.pre_ffn(x, None, io["layers"][i], io["positions"], rope)
        weights, idx = layer.ffn.gate(h, io["tokens"])
        io.update(x=x, h=h, post=post, comb=comb, weights=weights, idx=idx, shared=layer.ffn.shared(h))

    def static_routed(self, i: int, io: dict) -> torch.Tensor:
        """Layer i's routed experts for piece i's outputs, run eagerly between pieces (hooks, expert store)."""
        return self.layers[i].ffn.routed(io["h"], io["tokens"], io["weights"], io["idx"])

    def forward_streams(self, ids: torch.Tensor, state: ModelState) -> torch.Tensor:
        """ids [B, S] for a ModelState of B sequences at one position -> streams [B, S, n, dim].

        The stand-alone API (as transformers' models update their cache): it advances `state`."""
        b, s = ids.shape
        if state.batch_size != b:
            raise ValueError(f"state holds {state.batch_size} sequences but ids has batch size {b}")
        x = self.forward_tokens(ids.reshape(-1), state.seqs, [s] * b)
        for seq in state.seqs:
            seq.pos += s
        return x.view(b, s, *x.shape[1:])

    def logits(self, x: torch.Tensor, fn=None, base=None, scale=None, norm=None) -> torch.Tensor:
        c = self.config
        z = hc_head(x, self.hc_head_fn if fn is None else fn, self.hc_head_base if base is None else base,
                    self.hc_head_scale if scale is None else scale, c.hc_eps, c.rms_norm_eps)
        return self.head((norm or self.norm)(z))

    def forward(self, ids: torch.Tensor, state: ModelState | None = None,
                last_only: bool = False) -> torch.Tensor:
        """ids [B, S] -> logits [B, S, V] (or [B, 1, V] with last_only). A fresh state is made when
        none is given (a stateless full forward)."""
        if state is None:
            state = self.new_state(ids.shape[0])
        x = self.forward_streams(ids, state)
        if last_only:
            x = x[:, -1:]
        return self.logits(x)

    def mtp_forward(self, streams: torch.Tensor, next_ids: torch.Tensor, state: ModelState) -> torch.Tensor:
        """Draft logits for position t+2 from the main streams at t and token t+1 (ids [B, S]).

        Uses each sequence's `mtp[0]` state (made with `new_state(..., mtp=True)`) at the positions
        of the main tokens just consumed (state.pos - S ..)."""
        if not self.mtp or not state.mtp:
            raise ValueError("this model/state has no MTP module; build the state with mtp=True")
        blk: MTPBlock = self.mtp[0]
        b, s = next_ids.shape
        mtp_seqs = [SeqState(pos=q.pos - s, layers=q.mtp) for q in state.seqs]
        segs, positions = self._layout(mtp_seqs, [s] * b, next_ids.device)
        rope = self._ropes(positions)["main" if blk.layer_type == SLIDING else "compress"]
        flat = next_ids.reshape(-1)
        e = blk.enorm(self.embed_rows(flat))
        x = blk.e_proj(e).unsqueeze(1) + blk.h_proj(blk.hnorm(streams.reshape(b * s, *streams.shape[2:])))
        x = blk(x, flat, segs, [q.layers[0] for q in mtp_seqs], positions, rope)
        x = x.view(b, s, *x.shape[1:])
        return self.logits(x, blk.hc_head_fn, blk.hc_head_base, blk.hc_head_scale, blk.norm)


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Total and per-token activated parameters (V4-SPEC §3), counted on the meta device one block per
    kind of layer (a whole V4-Pro on meta is 70,000 modules and takes seconds).

    `total` excludes MTP and buffers (router bias, tid2eid), as DeepSeek's 284B does; `activated`
    counts everything a token touches: dense weights, embedding and head, top-k routed experts."""
    c = config
    d, n = c.hidden_size, c.hc_mult
    total = 2 * c.vocab_size * d + d + n * n * d + n + 1  # embed, head, norm, hc_head fn / base / scale
    routed = mtp = 0
    per_kind: dict[tuple, tuple[int, int]] = {}  # one block per (attention, routing) kind, counted on meta
    with torch.device("meta"):
        for i, kind in enumerate(zip(c.layer_types, c.mlp_layer_types)):
            if kind not in per_kind:
                named = list(Block(c, kind[0], i).named_parameters())
                per_kind[kind] = (sum(p.numel() for _, p in named),
                                  sum(p.numel() for nm, p in named if nm.startswith("ffn.experts.")))
            total += per_kind[kind][0]
            routed += per_kind[kind][1]
        if c.num_nextn_predict_layers:
            mtp = c.num_nextn_predict_layers * sum(p.numel() for p in MTPBlock(c).parameters())
    per_expert = routed // (config.num_hidden_layers * config.n_routed_experts)
    activated = total - routed + config.num_hidden_layers * config.num_experts_per_tok * per_expert
    return {"total": total, "activated": activated, "mtp": mtp, "routed": routed,
            "expert": per_expert}
