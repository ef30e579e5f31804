"""Expert store: every routed expert stays addressable on disk; a cache under a byte budget keeps as many
resident as fit; the next layer's experts are predicted and loaded on a background thread.

- **Disk tier**: the checkpoint itself. Each expert's tensors (official names, one tensor per expert
  weight) are read with `os.pread` at their offsets, not through a memory map, and the kernel is told
  to drop those pages afterwards (`posix_fadvise(DONTNEED)`), so a miss is a real disk read, not a
  page-cache hit, and the page cache never holds the model behind the budget's back.
- **Resident tier**: at most `capacity = budget // expert_bytes` experts over all layers, chosen by a
  cache policy (`expert_policy.py`: LRU, LFU with decay, frequency-pinned). Official FP4 experts stay
  FP4 in memory (4.25 bits per weight), in slots of one preallocated slab (`FP4Slab`): a layer's
  (token, expert) pairs then run in one fused kernel call over the slots (kernels.moe_fp4), as when
  every expert is resident. Other experts are held in the model dtype and run one by one.
- **Prefetch**: when layer i routes, layer i+1's router is applied to layer i's input (for hash layers
  the token ids give the answer exactly) and the predicted experts that are not resident are loaded on
  a background thread while layer i computes. Accuracy = predicted and used / used.
- **Counters** per layer: hits, misses, evictions, bytes read from disk, prefetch loads and accuracy.

The model never knows: the store plugs into each MoE layer's `provider` (expert weights on demand) or
`slots` (expert ids -> slab slots, FP4) and `on_route` (routing decisions) hooks. Outputs do not depend on the budget or the policy, only speed.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.layers import clamped_swiglu
from ..kernels import fp4_linear
from ..weights.loader import TORCH_DTYPES, pread_exact
from ..weights.quant import dequant_fp8
from .expert_policy import make_policy
from .forward import run_tokens

def _unmap_large_frees() -> None:
    """Make glibc serve allocations of 128 KiB and more with their own mappings, returned to the OS
    when freed. By default glibc raises that threshold after the first large frees, after which an
    evicted expert's buffers stay in the heap: measured on flash-shaped with a 384 MiB budget, the
    process then grew by 700 MiB instead of 540 MiB (dense 106 + cache 384 + working memory)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD (fixed, no longer dynamic)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


_PARTS = ("w1", "w2", "w3")


@dataclass
class _Span:
    """One stored tensor: absolute byte range in its file."""

    fd: int
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class DiskExperts:
    """Byte locations of every routed expert in a safetensors checkpoint, read without mmap."""

    def __init__(self, ckpt, config, drop_page_cache: bool = True):
        self.config, self.drop_page_cache = config, drop_page_cache
        self._ckpt = ckpt  # its file descriptors serve the reads; closed with the store
        self.spans: dict[tuple[int, int], dict[str, tuple[_Span, _Span | None, str | None]]] = {}
        for i in range(config.num_hidden_layers):
            for j in range(config.n_routed_experts):
                parts = {}
                for w in _PARTS:
                    info = ckpt.info(f"layers.{i}.ffn.experts.{j}.{w}.weight")
                    if info.expert is not None or info.half is not None:
                        raise ValueError("the expert store reads checkpoints with one tensor per expert weight "
                                         "(official DeepSeek names, or `moeflash convert`); this one merges "
                                         "experts (Hugging Face layout)")
                    parts[w] = (self._span(info.source), self._span(info.scale) if info.scale else None, info.fmt)
                self.spans[(i, j)] = parts
        self.expert_disk_bytes = sum(s.nbytes + (c.nbytes if c else 0) for s, c, _ in self.spans[(0, 0)].values())

    def _span(self, t) -> _Span:
        if t.dtype not in TORCH_DTYPES:
            raise ValueError(f"expert tensor {t.name} has dtype {t.dtype}, which the expert store cannot read")
        fd, base = self._ckpt.fd(t.file)
        return _Span(fd, base + t.start, t.end - t.start, TORCH_DTYPES[t.dtype], t.shape)

    def _read(self, s: _Span) -> torch.Tensor:
        buf = pread_exact(s.fd, s.offset, s.nbytes)
        if self.drop_page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(s.fd, s.offset, s.nbytes, os.POSIX_FADV_DONTNEED)
        return torch.frombuffer(buf, dtype=s.dtype).view(s.shape) if s.nbytes else torch.empty(s.shape, dtype=s.dtype)

    def read(self, key: tuple[int, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, str | None]]:
        return {w: (self._read(s), self._read(c) if c else None, fmt) for w, (s, c, fmt) in self.spans[key].items()}

    def close(self) -> None:
        self._ckpt.close()


class GGUFExperts:
    """The experts of a MoE-fied llama GGUF (`moeflash moefy`), read without mmap: expert j of layer i
    is one contiguous slice of each of the layer's stacked `ffn_{gate,up,down}_exps` tensors."""

    def __init__(self, path: str | Path, config, drop_page_cache: bool = True):
        from ..weights.gguf import GGUFFile

        f = GGUFFile(path)
        self.config, self.drop_page_cache = config, drop_page_cache
        self._fd = os.open(str(path), os.O_RDONLY)
        e = config.moe_experts
        self.spans: dict[tuple[int, int], dict[str, tuple[_Span, None, None]]] = {}
        for i in range(config.num_hidden_layers):
            for part, kind in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                name = f"blk.{i}.ffn_{kind}_exps.weight"
                if f.tensor_type(name) != "F32":
                    raise ValueError(f"{name} is {f.tensor_type(name)}; the expert store reads F32 experts")
                offset, nbytes = f.span(name)
                shape = f.shape(name)[1:]
                for j in range(e):
                    span = _Span(self._fd, offset + j * nbytes // e, nbytes // e, torch.float32, shape)
                    self.spans.setdefault((i, j), {})[part] = (span, None, None)
        self.expert_disk_bytes = sum(s.nbytes for s, _, _ in self.spans[(0, 0)].values())

    _read = DiskExperts._read
    read = DiskExperts.read

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class StoreShape:
    """What an expert store needs of a model's config (a MoE-fied llama's, in V4's names)."""

    num_hidden_layers: int
    n_routed_experts: int
    swiglu_limit: float = 0.0


class ResidentExpert:
    """A routed expert held by the store, callable like the model's SwiGLU. FP4 weights stay packed
    and the products run on the codes (kernels.fp4_linear)."""

    __slots__ = ("parts", "w13", "limit", "dtype", "nbytes")

    def __init__(self, parts: dict, limit: float, dtype: torch.dtype, pin: bool = False):
        self.limit, self.dtype = limit, dtype
        self.parts = {}
        for w, (t, scale, fmt) in parts.items():
            if fmt == "fp8":
                t, scale, fmt = dequant_fp8(t, scale).to(dtype), None, None
            elif fmt is None and t.dtype != dtype:
                t = t.to(dtype)
            self.parts[w] = (t, scale, fmt)
        self.w13 = None
        if self.parts["w1"][2] is None:  # plain weights: gate and up as one matmul (one call fewer)
            self.w13 = torch.cat((self.parts.pop("w1")[0], self.parts.pop("w3")[0]))
        self.nbytes = sum(t.numel() * t.element_size() + (s.numel() * s.element_size() if s is not None else 0)
                          for t, s, _ in self.parts.values())
        if self.w13 is not None:
            self.nbytes += self.w13.numel() * self.w13.element_size()
        if pin:  # page-locked, so that a GPU tier's copies run asynchronously
            self.parts = {w: (t.pin_memory(), None if sc is None else sc.pin_memory(), fmt)
                          for w, (t, sc, fmt) in self.parts.items()}
            self.w13 = None if self.w13 is None else self.w13.pin_memory()

    def tensors(self) -> list[torch.Tensor]:
        out = [self.w13] if self.w13 is not None else []
        for t, sc, _ in self.parts.values():
            out += [t] + ([sc] if sc is not None else [])
        return out

    def empty_like_on(self, device: torch.device) -> "ResidentExpert":
        """A copy of this expert's layout on `device`, its tensors allocated but not yet filled
        (a GPU tier fills them with `copy_` on its copy stream)."""
        new = object.__new__(ResidentExpert)
        new.limit, new.dtype, new.nbytes = self.limit, self.dtype, self.nbytes
        like = (lambda t: None if t is None else torch.empty_like(t, device=device))
        new.parts = {w: (like(t), like(sc), fmt) for w, (t, sc, fmt) in self.parts.items()}
        new.w13 = like(self.w13)
        return new

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        t, scale, fmt = self.parts[name]
        if fmt == "fp4":  # computed on the packed codes (kernels.fp4_linear), never decoded to a full matrix
            return fp4_linear(x, t, scale).to(x.dtype)
        return F.linear(x, t)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
        else:
            gate, up = self._linear(x, "w1"), self._linear(x, "w3")
        return self._linear(clamped_swiglu(gate, up, self.limit), "w2")


class FP4Slab:
    """Packed FP4 experts in `capacity` slots of four stacked buffers, laid out as a resident MoE holds
    them (MoE.hold_fp4_: w1 and w3 codes stacked), so one fused kernel call runs any mix of slots.
    Slots are assigned when an expert is installed and freed when it is evicted (under the store's lock)."""

    def __init__(self, capacity: int, parts: dict, device: torch.device | str = "cpu", pin: bool = False):
        (q1, s1, _), (q2, s2, _) = parts["w1"], parts["w2"]
        inter = q1.shape[0]
        n = capacity + 1  # the last slot is scratch: an expert the cache could not keep runs from there
        # pinned (page-locked) host memory lets a GPU tier copy from the slab asynchronously
        z = dict(dtype=torch.uint8, device=device, pin_memory=pin)
        self.q13 = torch.zeros(n, 2 * inter, q1.shape[1], **z)
        self.s13 = torch.zeros(n, 2 * inter, s1.shape[1], **z)
        self.q2 = torch.zeros(n, *q2.shape, **z)
        self.s2 = torch.zeros(n, *s2.shape, **z)
        self.free = list(range(capacity - 1, -1, -1))
        self.scratch = capacity
        self.inter = inter

    @staticmethod
    def holds(parts: dict) -> bool:
        return all(fmt == "fp4" and s is not None and s.element_size() == 1 for _, s, fmt in parts.values())

    def install(self, parts: dict, slot: int | None = None) -> int:
        """Copy an expert's packed parts into a free slot (or `slot`); returns the slot."""
        slot = self.free.pop() if slot is None else slot
        # plain memory copies through NumPy views: a torch copy of this size would start ATen's thread
        # pool from the prefetch thread and compete with the step's own threads (measured 2x slower)
        inter = self.inter
        for w, rows in (("w1", slice(0, inter)), ("w3", slice(inter, 2 * inter))):
            q, sc, _ = parts[w]
            self.q13[slot].numpy()[rows] = q.view(torch.uint8).numpy()
            self.s13[slot].numpy()[rows] = sc.view(torch.uint8).numpy()
        self.q2[slot].numpy()[:] = parts["w2"][0].view(torch.uint8).numpy()
        self.s2[slot].numpy()[:] = parts["w2"][1].view(torch.uint8).numpy()
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def buffers(self, slot: int) -> tuple[torch.Tensor, ...]:
        """The slot's (q13, s13, q2, s2): what a GPU tier copies from (views, no copy)."""
        return self.q13[slot], self.s13[slot], self.q2[slot], self.s2[slot]

    @staticmethod
    def stack(parts: dict) -> tuple[torch.Tensor, ...]:
        """An expert's read parts as one slot's (q13, s13, q2, s2) (for an expert the host tier did not keep)."""
        cat = (lambda i: torch.cat((parts["w1"][i].view(torch.uint8), parts["w3"][i].view(torch.uint8))))
        return cat(0), cat(1), parts["w2"][0].view(torch.uint8), parts["w2"][1].view(torch.uint8)


@dataclass
class LayerCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    prefetch_loads: int = 0
    predicted: int = 0          # experts predicted for this layer
    predicted_used: int = 0     # ... that the layer then used
    used: int = 0               # distinct experts the layer used in steps that had a prediction


@dataclass
class ExpertStore:
    disk: DiskExperts
    config: object
    budget_bytes: int
    policy_name: str = "lfu"
    dtype: torch.dtype = torch.bfloat16
    prefetch: bool = False
    policy_kw: dict = field(default_factory=dict)
    pin_memory: bool = False  # page-locked host memory (under a GPU tier: engine/expert_tier.py)

    def __post_init__(self):
        c = self.config
        self.n_layers, self.n_experts = c.num_hidden_layers, c.n_routed_experts
        _unmap_large_frees()
        first = self.disk.read((0, 0))
        self.expert_bytes = ResidentExpert(first, c.swiglu_limit, self.dtype).nbytes
        capacity = self.budget_bytes // self.expert_bytes
        if capacity < 1:
            raise ValueError(f"an expert budget of {self.budget_bytes / 2**20:.1f} MiB holds no expert: one "
                             f"expert takes {self.expert_bytes / 2**20:.2f} MiB")
        self.capacity = min(capacity, self.n_layers * self.n_experts)
        self.policy = make_policy(self.policy_name, self.capacity, **self.policy_kw)
        self.slab = FP4Slab(self.capacity, first, pin=self.pin_memory) if FP4Slab.holds(first) else None
        # key -> ResidentExpert, or its slab slot (int) when the experts are FP4
        self.cache: dict[tuple[int, int], ResidentExpert | int] = {}
        self.pending: dict[tuple[int, int], Future] = {}
        self.layers = [LayerCounters() for _ in range(self.n_layers)]
        self.tokens = 0
        self._predicted: dict[int, set[int]] = {}
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moeflash-prefetch") if self.prefetch else None
        self._gates = None

    # -- wiring -----------------------------------------------------------------------------------
    def attach(self, model, server=None) -> None:
        """Serve `model`'s routed experts from this store (its own expert weights are never read), or from
        `server`, a tier above it with the same `slots` / `get` / `route` (engine/expert_tier.py)."""
        server = server or self
        self._gates = [getattr(layer.ffn, "predict", None) or layer.ffn.gate for layer in model.layers]
        for i, layer in enumerate(model.layers):
            if self.slab is not None:
                layer.ffn.slots = (lambda idx, i=i: server.slots(i, idx))
            else:
                layer.ffn.provider = (lambda experts, e, i=i: server.get(i, e))
            layer.ffn.on_route = (lambda x, ids, idx, i=i: server.route(i, x, ids, idx))
        model.expert_store = server

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.disk.close()

    # -- demand path ------------------------------------------------------------------------------
    def slots(self, layer: int, idx: torch.Tensor):
        """For a layer's routed ids idx [N, k]: rounds of (slot ids [N, k], pair mask [N, k] or None,
        slab buffers (q13, s13, q2, s2)) whose kernels.moe_fp4 results sum to the layer's output.

        Normally one round: every used expert resident in its slot. When the budget is smaller than
        one call's experts, a later miss can evict an expert fetched earlier in the same call; each
        such expert then gets a round of its own from the scratch slot, written just before it runs."""
        used = idx.unique().tolist()
        got = {e: self.get(layer, e) for e in used}
        with self._lock:
            stale = [e for e in used if not isinstance(got[e], int) or self.cache.get((layer, e)) != got[e]]
        s = self.slab
        bufs = (s.q13, s.s13, s.q2, s.s2)
        lut = torch.full((self.n_experts,), s.scratch, dtype=idx.dtype)
        for e in used:
            if e not in stale:
                lut[e] = got[e]
        slot_idx = lut[idx]
        if not stale:
            yield slot_idx, None, bufs
            return
        yield slot_idx, ~torch.isin(idx, torch.tensor(stale, dtype=idx.dtype)), bufs
        for e in stale:
            parts = got[e] if isinstance(got[e], dict) else self._read((layer, e))
            s.install(parts, s.scratch)
            yield torch.full_like(idx, s.scratch), idx == e, bufs

    def get(self, layer: int, e: int) -> ResidentExpert | int:
        """The resident expert (or its slab slot), loading it on a miss."""
        key = (layer, e)
        c = self.layers[layer]
        with self._lock:
            hit, evicted = self.policy.access(key)
            self._drop(evicted)
            expert = self.cache.get(key)
            future = self.pending.get(key)
        if hit:
            c.hits += 1
            if expert is not None:
                return expert
            if future is not None:  # a prefetch still in flight: wait for it
                expert = future.result()
                if expert is not None:
                    return expert
        else:
            c.misses += 1
        parts = self._read(key)
        with self._lock:
            return self._install(key, parts)

    def _read(self, key: tuple[int, int]) -> dict:
        parts = self.disk.read(key)
        self.layers[key[0]].bytes_read += self.disk.expert_disk_bytes
        return parts

    def _install(self, key: tuple[int, int], parts: dict) -> ResidentExpert | int:
        """Make a read expert resident (called under the lock); kept only while the policy holds it.
        Out of the policy (evicted while it was read) it is used once: a per-expert module as it is,
        a slab expert as its parts (`slots` runs it from the scratch slot). A kept slab expert always
        finds a free slot: the cache holds only keys of the policy, at most `capacity`, and not this one."""
        if key in self.cache:
            return self.cache[key]
        if self.slab is not None and key not in self.policy:
            return parts  # not kept: `slots` runs it from the scratch slot
        expert = ResidentExpert(parts, self.config.swiglu_limit, self.dtype, self.pin_memory) \
            if self.slab is None else self.slab.install(parts)
        if key in self.policy:
            self.cache[key] = expert
        return expert

    def _drop(self, key) -> None:
        if key is None:
            return
        held = self.cache.pop(key, None)
        if self.slab is not None and held is not None:
            self.slab.release(held)
        self.pending.pop(key, None)
        self.layers[key[0]].evictions += 1

    # -- routing hook: accuracy bookkeeping and prefetch ------------------------------------------
    def route(self, layer: int, x: torch.Tensor, ids: torch.Tensor, idx: torch.Tensor) -> None:
        used = set(idx.unique().tolist())
        c = self.layers[layer]
        if layer == 0:
            self.tokens += x.shape[0]
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            c.predicted += len(predicted)
            c.predicted_used += len(predicted & used)
            c.used += len(used)
        keep = {(layer, e) for e in used}
        nxt = layer + 1
        if self.prefetch and nxt < self.n_layers:
            with torch.no_grad():
                _, pidx = self._gates[nxt](x, ids)
            guess = set(pidx.unique().tolist())
            self._predicted[nxt] = guess
            keep |= {(nxt, e) for e in guess}
            with self._lock:
                self.policy.unprotect()
                self.policy.protect(keep)
                for e in guess:
                    key = (nxt, e)
                    if key in self.policy:
                        continue
                    self._drop(self.policy.insert(key))
                    self.layers[nxt].prefetch_loads += 1
                    self.pending[key] = self._pool.submit(self._prefetched, key)
        else:
            with self._lock:
                self.policy.unprotect()
                self.policy.protect(keep)

    def _prefetched(self, key) -> ResidentExpert | int | None:
        parts = self._read(key)
        with self._lock:
            self.pending.pop(key, None)
            if key in self.policy:
                return self._install(key, parts)
        return None

    # -- observability ----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Plain numbers (no tensors): totals, per-layer counters, and derived rates."""
        per_layer = [dict(vars(c)) for c in self.layers]
        tot = {k: sum(d[k] for d in per_layer) for k in per_layer[0]}
        acc = tot["hits"] + tot["misses"]
        return {"policy": self.policy_name, "capacity_experts": self.capacity, "expert_bytes": self.expert_bytes,
                "budget_bytes": self.budget_bytes, "resident": len(self.cache), "tokens": self.tokens,
                **tot, "hit_rate": tot["hits"] / acc if acc else 0.0,
                "bytes_read_per_token": tot["bytes_read"] / self.tokens if self.tokens else 0.0,
                "prefetch_accuracy": tot["predicted_used"] / tot["used"] if tot["used"] else None,
                "per_layer": per_layer}


class RoutingRecorder:
    """Which experts each token used, layer by layer: attach to a model, run tokens of one sequence
    at a time, and call `take()` after each forward call to get its tokens' rows (sorted ids)."""

    def __init__(self, model):
        self.n_layers = len(model.layers)
        self._rows: list[list[list[int]] | None] = [None] * self.n_layers
        self._prev = [(layer.ffn, layer.ffn.on_route) for layer in model.layers]
        for i, (ffn, prev) in enumerate(self._prev):
            ffn.on_route = (lambda x, ids, idx, i=i, prev=prev: self._hook(i, prev, x, ids, idx))

    def detach(self) -> None:
        """Give the layers their previous hooks back."""
        for ffn, prev in self._prev:
            ffn.on_route = prev

    def _hook(self, i, prev, x, ids, idx) -> None:
        if prev is not None:
            prev(x, ids, idx)
        self._rows[i] = [sorted(r) for r in idx.tolist()]

    def take(self) -> list[list[list[int]]]:
        """Per token of the last forward call: per layer, the expert ids it used."""
        if any(r is None for r in self._rows):
            raise RuntimeError("no complete forward call recorded since the last take()")
        n = len(self._rows[0])
        tokens = [[self._rows[layer][t] for layer in range(self.n_layers)] for t in range(n)]
        self._rows = [None] * self.n_layers
        return tokens


@torch.inference_mode()
def record_trace(model, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Run each prompt alone (prefill, then `max_new_tokens` greedy steps) and record which experts
    every token used. Returns the trace (`tokens`, one per-layer list of ids per token), its
    `seqs` / `positions` / `token_ids`, and the decode time (`decode_seconds` over `decode_steps`)."""
    import time

    rec = RoutingRecorder(model)
    out = {"tokens": [], "seqs": [], "positions": [], "token_ids": [], "decode_seconds": 0.0, "decode_steps": 0}
    for s, ids in enumerate(prompts):
        state = model.new_seq_state()
        x = run_tokens(model, torch.tensor(ids), [state], [len(ids)])
        rows = rec.take()
        nxt = int(model.logits(x[-1:]).argmax(-1))
        fed = list(ids)
        for _ in range(max_new_tokens):
            t0 = time.perf_counter()
            x = run_tokens(model, torch.tensor([nxt]), [state], [1])
            new = int(model.logits(x).argmax(-1))
            out["decode_seconds"] += time.perf_counter() - t0
            out["decode_steps"] += 1
            rows += rec.take()
            fed.append(nxt)
            nxt = new
        out["tokens"] += rows
        out["seqs"] += [s] * len(rows)
        out["positions"] += list(range(len(rows)))
        out["token_ids"] += fed
    return out


def disk_read_gbps(path: str | Path, nbytes: int = 256 << 20, block: int = 8 << 20) -> float:
    """Cold read bandwidth of a checkpoint's files (GB/s): pages dropped from the page cache first
    (posix_fadvise DONTNEED; effective for files this process has not memory-mapped), then read."""
    import time

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
    if not files:
        raise FileNotFoundError(f"no .safetensors files at {path}")
    done, t0 = 0, None
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
            if t0 is None:
                t0 = time.perf_counter()
            off = 0
            while off < size and done < nbytes:
                n = len(os.pread(fd, block, off))
                if n == 0:
                    break
                off += n
                done += n
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if done >= nbytes:
            break
    return done / (time.perf_counter() - t0) / 1e9
