"""Decode steps replayed as CUDA graphs, over sequence states held in static slots.

Why: a V4 decode step is thousands of small kernels (43 layers of projections, mHC, attention, routing);
launched one by one from Python, their launch cost exceeds their run time at small batches. A CUDA
graph records the step once and replays it with one launch. A graph fixes every shape and address, so:

- **Static slots.** `batched_layer_states` holds `max_batch` sequences of up to `max_len` tokens in
  fixed buffers. A sequence that decodes here is *bound* to a slot: its `SeqState` tensors become views
  of its slot's rows (`slot_view`), so everything else (prefill chunks, forks, the prefix cache, byte
  counts) keeps working on the same memory, and nothing is copied per step. Entering a slot copies the
  state in once; a sequence whose slot is needed elsewhere is copied out (or moved) once.
- **Buckets.** One graph per batch size in BUCKETS up to `max_batch`; a step of B sequences replays the
  smallest bucket >= B with the B sequences in slots 0..B-1 and free slots as padding (their rows
  compute on scratch state that nobody reads).
- **What the graph holds.** `Transformer.forward_static`: fixed shapes, masks instead of branches on
  positions, and no host synchronisation (MoE routing, FP8 / FP4 kernels and the attention all stay on
  the device). Sampling stays outside, in the engine.
- **Piecewise**, when an expert store serves the experts: the store must see each layer's routing on the
  host to copy the missing experts, so the step is cut at the routed experts (`static_piece`): one graph
  from each layer's routing to the next, the routed experts eager in between (for the real rows only),
  `L + 1` graph launches plus the experts' kernels per step instead of thousands of launches.

On the CPU (tests) the same slots and the same static forward run without capture: what is checked
there is everything but the recording. Steps that do not fit (a prefill chunk in the batch, more
sequences than slots, a position past `max_len`) run the ordinary forward on the same, bound states.
"""

from __future__ import annotations

import weakref

import torch

from ..model.state import SeqState, batched_layer_states, copy_into, slot_view

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class GraphDecoder:
    def __init__(self, model, max_batch: int, max_len: int, capture: bool | None = None, compile: bool = False,
                 piecewise: bool | None = None):
        if not hasattr(model, "forward_static"):
            raise ValueError("static decode needs a V4 model (Transformer.forward_static)")
        self.model = model
        self.device = model.embed.weight.device
        self.max_batch = max_batch
        self.max_len = max_len
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        cfg = model.config
        dtype = model.compute_dtype
        self.layers = batched_layer_states(cfg, max_batch, max_len, dtype, self.device, model.state_dtype)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.owner: list[weakref.ref | None] = [None] * max_batch
        self.graphs: dict[int, tuple] = {}
        # piecewise (default when an expert store serves the experts): one graph per stretch between two
        # layers' routed experts, which run eagerly in between (the store decides on the host what to copy)
        self.piecewise = getattr(model, "expert_store", None) is not None if piecewise is None else piecewise
        self.routed = [torch.zeros(max_batch, cfg.hidden_size, dtype=dtype, device=self.device)
                       for _ in model.layers] if self.piecewise else []
        self.stats = {"graph_steps": 0, "eager_steps": 0, "slot_loads": 0, "slot_moves": 0, "slot_evictions": 0}
        # opt-in: torch.compile the static step before recording (Inductor fuses the step's chains of
        # small elementwise kernels: casts, norms, RoPE, mHC; measured by bench/gpu_check.py)
        self._forward = torch.compile(model.forward_static, dynamic=False) if compile else model.forward_static
        if self.capture:
            self._pool = torch.cuda.graph_pool_handle()
            for b in self.buckets:  # before any sequence is bound: warm-up runs write every slot
                self.graphs[b] = self._record_pieces(b) if self.piecewise else self._record(b)

    # -- the static step --------------------------------------------------------------------------
    def _step(self, b: int) -> torch.Tensor:
        layers = [_rows(layer, b) for layer in self.layers]
        return self._forward(self.tokens[:b], self.positions[:b], layers)

    def _io(self, b: int) -> dict:
        return {"tokens": self.tokens[:b], "positions": self.positions[:b],
                "layers": [_rows(layer, b) for layer in self.layers], "routed": [r[:b] for r in self.routed]}

    def _routed_between(self, i: int, io: dict, n: int) -> None:
        """Layer i's routed experts for the n real rows (not the padding), eagerly, into its static buffer."""
        real = {k: io[k][:n] for k in ("h", "tokens", "weights", "idx")}
        self.routed[i][:n].copy_(self.model.static_routed(i, real))

    def _pieces(self, b: int, n: int) -> torch.Tensor:
        """The piecewise step without recording (the CPU, and the warm-up before recording)."""
        io = self._io(b)
        for i in range(len(self.model.layers) + 1):
            self.model.static_piece(i, io)
            if i < len(self.model.layers):
                self._routed_between(i, io, n)
        return io["x"]

    def _record_pieces(self, b: int) -> tuple:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._pieces(b, b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        io, graphs, snaps = self._io(b), [], []
        with torch.inference_mode():
            for i in range(len(self.model.layers) + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    self.model.static_piece(i, io)
                graphs.append(graph)
                snaps.append(dict(io))  # this piece's outputs: fixed addresses the next piece reads
        return graphs, snaps

    def _record(self, b: int) -> tuple:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # compile Triton kernels and settle the allocator before recording
                self._step(b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            out = self._step(b)
        return graph, out, self._routed_ids()

    def _routed_ids(self) -> list:
        """Each MoE layer's routed ids of the step just run or recorded (a replay refills them in place)."""
        return [layer.ffn._last_idx for layer in self.model.layers]

    # -- slots ------------------------------------------------------------------------------------
    def _slot_of(self, state: SeqState) -> int | None:
        """The slot `state` is bound to, or None (never bound, or no longer)."""
        slot = getattr(state, "graph_slot", None)
        if slot is None or self._owner(slot) is not state or not self._views(state, slot):
            return None
        return slot

    def _views(self, state: SeqState, slot: int) -> bool:
        """Whether `state`'s buffers are still views of `slot` (an entry buffer that grew past the slot's
        capacity in an ordinary forward call was reallocated, and left it)."""
        if state.layers[0].window.data_ptr() != self.layers[0].window[slot].data_ptr():
            return False
        return all(mine.compressor.entries.data_ptr() == theirs.compressor.entries[slot].data_ptr()
                   for mine, theirs in zip(state.layers, self.layers) if mine.compressor is not None)

    def _owner(self, slot: int) -> SeqState | None:
        ref = self.owner[slot]
        return ref() if ref is not None else None

    def _bind(self, state: SeqState, slot: int) -> None:
        state.layers = [slot_view(layer, slot, state.pos) for layer in self.layers]
        state.graph_slot = slot
        self.owner[slot] = weakref.ref(state)

    def _free(self, slot: int, keep_from: int) -> None:
        """Make `slot` free: a live owner still bound to it moves to a free slot >= keep_from, or, when
        there is none, is copied out into memory of its own."""
        owner = self._owner(slot)
        bound = owner is not None and self._slot_of(owner) == slot
        self.owner[slot] = None
        if not bound:
            return
        spare = next((j for j in range(keep_from, self.max_batch) if self._owner(j) is None), None)
        if spare is not None:
            self._move(owner, slot, spare)
        else:
            owner.layers = [layer.clone() for layer in owner.layers]
            owner.graph_slot = None
            self.stats["slot_evictions"] += 1

    def _move(self, state: SeqState, src: int, dst: int) -> None:
        for layer in self.layers:
            copy_into(slot_view(layer, dst, state.pos), slot_view(layer, src, state.pos), state.pos)
        self._bind(state, dst)
        self.stats["slot_moves"] += 1

    def _place(self, states: list[SeqState], b: int) -> None:
        """Sequence i in slot i for every i < len(states), and slots len(states)..b-1 free."""
        n = len(states)
        for i, st in enumerate(states):
            cur = self._slot_of(st)
            if cur == i:
                continue
            other = self._owner(i)
            if other is not None and other is not st:
                self._free(i, keep_from=b)
            if cur is not None:
                self.owner[cur] = None
                self._move(st, cur, i)
            else:
                for mine, theirs in zip(st.layers, self.layers):
                    copy_into(slot_view(theirs, i, st.pos), mine, st.pos)
                self._bind(st, i)
                self.stats["slot_loads"] += 1
        for j in range(n, b):
            self._free(j, keep_from=b)

    # -- the engine's entry point -----------------------------------------------------------------
    def decode(self, states: list[SeqState], tokens: torch.Tensor) -> torch.Tensor | None:
        """One decode token per state (tokens [B] on the model's device) -> final streams [B, n, dim],
        or None when this step does not fit (the caller runs the ordinary forward). The states are
        written at their positions; the caller advances them. The result is the graph's output buffer:
        use it before the next call."""
        n = len(states)
        if n == 0 or n > self.max_batch or any(s.pos >= self.max_len for s in states) or \
                any(s.mtp for s in states):
            self.stats["eager_steps"] += 1
            return None
        b = next(x for x in self.buckets if x >= n)
        self._place(states, b)
        pos = [s.pos for s in states]
        self.tokens[:n].copy_(tokens, non_blocking=True)
        self.positions[:n].copy_(torch.tensor(pos, dtype=torch.long), non_blocking=True)
        if b > n:
            self.tokens[n:b].zero_()
            self.positions[n:b].zero_()
        if self.piecewise:  # the routed experts run eagerly between pieces (and record their own ids)
            if self.capture:
                graphs, snaps = self.graphs[b]
                for i, graph in enumerate(graphs):
                    graph.replay()
                    if i < len(self.model.layers):
                        self._routed_between(i, snaps[i], n)
                out = snaps[-1]["x"]
            else:
                out = self._pieces(b, n)
        else:
            if self.capture:
                graph, out, routed = self.graphs[b]
                graph.replay()
            else:
                out = self._step(b)
                routed = self._routed_ids()
            for layer, idx in zip(self.model.layers, routed):  # what `experts_read` counts: the real rows
                layer.ffn._last_idx = None if idx is None else idx[:n]
        for st, p in zip(states, pos):  # the entry counts the step's windows closed (host side)
            for layer in st.layers:
                for part in layer.parts():
                    part.count = (p + 1) // part.ratio
        self.stats["graph_steps"] += 1
        return out[:n]


def _rows(layer, b: int):
    """The first b rows of a batched LayerState (views; the step never reads the entry counts)."""
    return slot_view(layer, slice(0, b), 0)
