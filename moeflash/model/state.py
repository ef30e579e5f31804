"""Per-sequence, per-layer state that makes incremental inference exact (V4-SPEC §2.14).

Plain tensors in dataclasses, outside the nn.Modules: the engine owns them, one `SeqState` per
sequence, and frees a sequence's state by dropping it. The fill level of every buffer follows from
the sequence position `pos` (tokens consumed): the window ring holds positions pos-W..pos-1 at slot
p % W; a compressor has `pos % m` pending rows and `pos // m` emitted entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import CSA, HCA, SLIDING, ModelConfig


@dataclass
class CompressorState:
    """One compressor's memory: the open window's raw rows, the previous window's overlap halves
    (CSA only) and the compressed entries emitted so far (a buffer grown geometrically)."""

    ratio: int
    pending_kv: torch.Tensor      # [m, C] projected rows of the open window (first pos % m valid)
    pending_gate: torch.Tensor    # [m, C] their gate logits (position bias not yet added)
    prev_kv: torch.Tensor | None  # [m, Dc] A-halves of the last complete window (overlap only)
    prev_gate: torch.Tensor | None  # [m, Dc] with the position bias added
    entries: torch.Tensor         # [capacity, Dc]
    count: int = 0                # entries emitted

    def append(self, new: torch.Tensor | None) -> None:
        """Append [k, Dc] entries (None: none); the buffer doubles when full, so appends are amortised O(1)."""
        if new is None:
            return
        k = new.shape[0]
        if k == 0:
            return
        need = self.count + k
        cap = self.entries.shape[0]
        if need > cap:
            grown = self.entries.new_zeros((max(need, 2 * cap, 16), self.entries.shape[1]))
            grown[: self.count] = self.entries[: self.count]
            self.entries = grown
        self.entries[self.count: need] = new.to(self.entries.dtype)
        self.count = need

    def view(self) -> torch.Tensor:
        return self.entries[: self.count]

    def clone(self) -> "CompressorState":
        """An independent copy (entries trimmed to the emitted ones; appends grow it again)."""
        opt = (lambda t: None if t is None else t.clone())
        return CompressorState(self.ratio, self.pending_kv.clone(), self.pending_gate.clone(), opt(self.prev_kv),
                               opt(self.prev_gate), self.entries[: max(self.count, 1)].clone(), self.count)

    def used_bytes(self, pos: int) -> int:
        """Bytes holding live data at position `pos`: entries, the open window, overlap halves (the
        entries may be held in a narrower dtype than the open window's rows: `new_seq_state`)."""
        n = self.count * self.entries.shape[1] * self.entries.element_size()
        n += (pos % self.ratio) * self.pending_kv.shape[1] * 2 * self.pending_kv.element_size()
        if self.prev_kv is not None and self.count:
            n += self.prev_kv.numel() * 2 * self.prev_kv.element_size()
        return n

    def allocated_bytes(self) -> int:
        ts = [self.pending_kv, self.pending_gate, self.entries, self.prev_kv, self.prev_gate]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class LayerState:
    """Sliding-window ring of the shared K=V head, plus the layer's compressors."""

    window: torch.Tensor                   # [W, D]; slot p % W holds position p
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    def parts(self) -> list[CompressorState]:
        return [c for c in (self.compressor, self.indexer) if c is not None]

    def clone(self) -> "LayerState":
        return LayerState(self.window.clone(), self.compressor and self.compressor.clone(),
                          self.indexer and self.indexer.clone())


@dataclass
class SeqState:
    """Everything one sequence needs to continue from position `pos`."""

    pos: int
    layers: list[LayerState]
    mtp: list[LayerState] = field(default_factory=list)
    # the window ring and the compressors' partial windows overwrite what came before: a V4 state
    # cannot go back to an earlier position, so a prefix cache copies it on the way instead
    rewindable = False

    def clone(self) -> "SeqState":
        """An independent copy at the same position: a second sequence continues from here (the engine
        forks one prefill into the n choices of a request)."""
        return SeqState(self.pos, [layer.clone() for layer in self.layers], [layer.clone() for layer in self.mtp])

    def used_bytes(self) -> int:
        """Exact bytes of live state: filled window slots, pending rows, overlap halves, entries."""
        total = 0
        for layer in self.layers + self.mtp:
            w = layer.window
            total += min(self.pos, w.shape[0]) * w.shape[1] * w.element_size()
            total += sum(c.used_bytes(self.pos) for c in layer.parts())
        return total

    def allocated_bytes(self) -> int:
        total = 0
        for layer in self.layers + self.mtp:
            total += layer.window.numel() * layer.window.element_size()
            total += sum(c.allocated_bytes() for c in layer.parts())
        return total

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Flat named tensors and the integers beside them (a prefix cache writes them to disk)."""
        tensors: dict[str, torch.Tensor] = {}
        meta = {"pos": self.pos, "layers": len(self.layers), "mtp": len(self.mtp), "parts": {}}
        for i, layer in enumerate(self.layers + self.mtp):
            tensors[f"{i}.window"] = layer.window
            for name in ("compressor", "indexer"):
                c = getattr(layer, name)
                if c is None:
                    continue
                meta["parts"][f"{i}.{name}"] = {"ratio": c.ratio, "count": c.count}
                for field_name in ("pending_kv", "pending_gate", "prev_kv", "prev_gate"):
                    t = getattr(c, field_name)
                    if t is not None:
                        tensors[f"{i}.{name}.{field_name}"] = t
                tensors[f"{i}.{name}.entries"] = c.entries[: max(c.count, 1)]
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> "SeqState":
        """The inverse of `to_tensors` (KeyError / TypeError for a file that does not fit)."""
        layers = []
        for i in range(meta["layers"] + meta["mtp"]):
            parts = {}
            for name in ("compressor", "indexer"):
                info = meta["parts"].get(f"{i}.{name}")
                if info is not None:
                    t = lambda f: tensors.get(f"{i}.{name}.{f}")  # noqa: E731
                    parts[name] = CompressorState(int(info["ratio"]), t("pending_kv"), t("pending_gate"),
                                                  t("prev_kv"), t("prev_gate"), t("entries"), int(info["count"]))
                    if parts[name].pending_kv is None or parts[name].entries is None:
                        raise KeyError(f"{i}.{name}")
            layers.append(LayerState(tensors[f"{i}.window"], parts.get("compressor"), parts.get("indexer")))
        n = meta["layers"]
        return SeqState(int(meta["pos"]), layers[:n], layers[n:])


@dataclass
class ModelState:
    """A batch of sequences advanced together (same length each call): the simple API used by
    `Transformer.forward(ids[B, S], state)`. The engine works with `SeqState`s directly."""

    seqs: list[SeqState]

    @property
    def pos(self) -> int:
        return self.seqs[0].pos

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    @property
    def mtp(self) -> list[LayerState]:
        return self.seqs[0].mtp

    def used_bytes(self) -> int:
        return sum(s.used_bytes() for s in self.seqs)

    def allocated_bytes(self) -> int:
        return sum(s.allocated_bytes() for s in self.seqs)


def _compressor_state(ratio: int, width: int, overlap: bool, dtype, device, capacity: int,
                      record_dtype=None, batch: tuple = ()) -> CompressorState:
    """One compressor's buffers; `batch` (e.g. (B,)) prefixes every shape (batched_layer_states)."""
    c = 2 * width if overlap else width
    z = dict(dtype=dtype, device=device)
    return CompressorState(
        ratio=ratio,
        pending_kv=torch.zeros(*batch, ratio, c, **z),
        pending_gate=torch.zeros(*batch, ratio, c, **z),
        prev_kv=torch.zeros(*batch, ratio, width, **z) if overlap else None,
        prev_gate=torch.zeros(*batch, ratio, width, **z) if overlap else None,
        entries=torch.zeros(*batch, capacity, width, dtype=record_dtype or dtype, device=device),
    )


def layer_state(config: ModelConfig, layer_type: str, dtype, device, max_len: int = 0,
                record_dtype=None) -> LayerState:
    st = LayerState(window=torch.zeros(config.sliding_window, config.head_dim, dtype=record_dtype or dtype,
                                       device=device))
    if layer_type == SLIDING:
        return st
    m = config.compress_ratio(layer_type)
    cap = max(max_len // m, 0)
    st.compressor = _compressor_state(m, config.head_dim, layer_type == CSA, dtype, device, cap, record_dtype)
    if layer_type == CSA:
        st.indexer = _compressor_state(m, config.index_head_dim, True, dtype, device, cap, record_dtype)
    return st


def new_seq_state(config: ModelConfig, dtype=torch.float32, device="cpu", max_len: int = 0,
                  mtp: bool = False, record_dtype=None) -> SeqState:
    """Fresh state at position 0. `max_len` pre-sizes the entry buffers (they grow otherwise).

    `record_dtype` (default `dtype`): the dtype of the records that grow with the context, the window
    ring and the compressed entries / indexer keys (bf16 under fp32 compute halves them, as DeepSeek's
    reference keeps its KV cache in bf16). The open window's rows and gate logits, a few rows per layer,
    stay in the compute dtype `dtype`: they feed the pooling softmax."""
    layers = [layer_state(config, t, dtype, device, max_len, record_dtype) for t in config.layer_types]
    mtp_layers = ([layer_state(config, config.mtp_layer_type, dtype, device, max_len, record_dtype)]
                  if mtp and config.num_nextn_predict_layers else [])
    return SeqState(pos=0, layers=layers, mtp=mtp_layers)


def new_state(config: ModelConfig, batch: int = 1, dtype=torch.float32, device="cpu",
              max_len: int = 0, mtp: bool = False, record_dtype=None) -> ModelState:
    return ModelState([new_seq_state(config, dtype, device, max_len, mtp, record_dtype) for _ in range(batch)])


def batched_layer_states(config: ModelConfig, batch: int, max_len: int, dtype, device,
                         record_dtype=None) -> list[LayerState]:
    """Static buffers for `batch` sequences of up to `max_len` tokens: the per-sequence layout with a
    leading batch dimension (window [B, W, D], pending [B, m, C], entries [B, max_len // m + 1, Dc]).
    A decode step over them has fixed shapes and addresses (what a CUDA graph replays, engine/graphs.py);
    row b viewed alone (`slot_view`) is an ordinary per-sequence LayerState."""
    out = []
    for t in config.layer_types:
        st = LayerState(window=torch.zeros(batch, config.sliding_window, config.head_dim, dtype=record_dtype or dtype,
                                           device=device))
        if t != SLIDING:
            m = config.compress_ratio(t)
            cap = max_len // m + 1
            st.compressor = _compressor_state(m, config.head_dim, t == CSA, dtype, device, cap, record_dtype, (batch,))
            if t == CSA:
                st.indexer = _compressor_state(m, config.index_head_dim, True, dtype, device, cap, record_dtype, (batch,))
        out.append(st)
    return out


def slot_view(layer: LayerState, b: int | slice, pos: int) -> LayerState:
    """Row b of a batched LayerState as one sequence's state at position `pos` (views, no copies); a
    slice of rows gives a smaller batched state."""
    def comp(c: CompressorState | None) -> CompressorState | None:
        if c is None:
            return None
        opt = (lambda t: None if t is None else t[b])
        return CompressorState(c.ratio, c.pending_kv[b], c.pending_gate[b], opt(c.prev_kv), opt(c.prev_gate),
                               c.entries[b], pos // c.ratio)
    return LayerState(layer.window[b], comp(layer.compressor), comp(layer.indexer))


def copy_into(dst: LayerState, src: LayerState, pos: int) -> None:
    """Copy one sequence's layer state (at position `pos`) into another of the same layout whose entry
    buffer is large enough (a sequence entering or moving between static slots)."""
    dst.window.copy_(src.window)
    for d, s in zip(dst.parts(), src.parts()):
        d.pending_kv.copy_(s.pending_kv)
        d.pending_gate.copy_(s.pending_gate)
        if s.prev_kv is not None:
            d.prev_kv.copy_(s.prev_kv)
            d.prev_gate.copy_(s.prev_gate)
        n = pos // s.ratio
        d.entries[:n].copy_(s.entries[:n])
        d.count = n


def state_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2) -> float:
    """Asymptotic growth of the state per token (compressed entries + indexer keys), V4-SPEC §4."""
    total = 0.0
    for t in config.layer_types:
        if t == SLIDING:
            continue
        m = config.compress_ratio(t)
        total += config.head_dim * dtype_bytes / m
        if t == CSA:
            total += config.index_head_dim * dtype_bytes / m
    return total


def state_bytes(config: ModelConfig, tokens: int, dtype_bytes: int = 2, pending_bytes: int | None = None) -> int:
    """Exact live bytes for one sequence after `tokens` tokens (equals SeqState.used_bytes): records
    (window ring, entries) of `dtype_bytes`, the open windows' rows of `pending_bytes` (default the same)."""
    pb = dtype_bytes if pending_bytes is None else pending_bytes
    total = 0
    for t in config.layer_types:
        total += min(tokens, config.sliding_window) * config.head_dim * dtype_bytes
        if t == SLIDING:
            continue
        m = config.compress_ratio(t)
        overlap = t == CSA
        for w in [config.head_dim] + ([config.index_head_dim] if overlap else []):
            total += (tokens // m) * w * dtype_bytes
            total += (tokens % m) * (2 * w if overlap else w) * 2 * pb
            if overlap and tokens >= m:
                total += m * w * 2 * pb
    return total


__all__ = ["CompressorState", "LayerState", "SeqState", "ModelState", "new_state", "new_seq_state",
           "layer_state", "state_bytes", "state_bytes_per_token", "batched_layer_states", "slot_view", "copy_into",
           "HCA", "CSA", "SLIDING"]
