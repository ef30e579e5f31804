"""The GPU tier of the expert store: GPU cache <- pinned host RAM <- disk.

V4-Flash's experts do not fit in one GPU, so the dense part and the hottest experts live on the GPU and
the rest in host RAM (an `ExpertStore`, experts.py, its memory page-locked), which reads from disk what
it does not hold. This tier keeps `capacity = budget // expert_bytes` experts on the device under its own
cache policy (the same policies, LRU / LFU / pinned) and counters (hits, misses, evictions, bytes copied
per layer); a device miss asks the host tier, which counts its own hits and misses, and the bytes come
up with one host-to-device copy.

Copies run on a side stream. A demand copy is waited for by the compute stream (not by the host); with
`prefetch`, when layer i routes, the experts the host tier predicts for layer i+1 that host RAM already
holds are copied up while layer i computes. Two orderings keep this correct without host waits on the
hot path: (1) a copy into a device slot first waits for the work already queued on the compute stream
(the slot's previous expert may still be read by it), and (2) before the host tier may evict anything
(its `get` and `route`), the host waits for the copies still reading host memory.

Official FP4 experts sit in a device `FP4Slab` and run in the fused kernel over slots (kernels.moe_fp4,
Triton on CUDA); other experts are device copies of the host's `ResidentExpert`s. On the CPU (tests)
the device is the CPU and the copies are plain copies: the same bookkeeping, checked there.
"""

from __future__ import annotations

import contextlib

import torch

from .expert_policy import make_policy
from .experts import ExpertStore, FP4Slab, LayerCounters, ResidentExpert


class DeviceTier:
    def __init__(self, host: ExpertStore, device: torch.device | str, budget_bytes: int,
                 policy_name: str | None = None, prefetch: bool | None = None, policy_kw: dict | None = None):
        self.host = host
        self.device = torch.device(device)
        self.n_layers, self.n_experts = host.n_layers, host.n_experts
        self.expert_bytes = host.expert_bytes
        self.budget_bytes = int(budget_bytes)
        capacity = self.budget_bytes // self.expert_bytes
        if capacity < 1:
            raise ValueError(f"a device expert budget of {budget_bytes / 2**20:.1f} MiB holds no expert: one "
                             f"expert takes {self.expert_bytes / 2**20:.2f} MiB")
        self.capacity = min(capacity, self.n_layers * self.n_experts)
        self.policy_name = policy_name or host.policy_name
        self.policy = make_policy(self.policy_name, self.capacity,
                                  **(host.policy_kw if policy_kw is None else policy_kw))
        self.prefetch = host.prefetch if prefetch is None else prefetch
        first = host.disk.read((0, 0))
        self.slab = FP4Slab(self.capacity, first, device=self.device) if host.slab is not None else None
        self.cache: dict[tuple[int, int], int | ResidentExpert] = {}  # key -> device slot or expert
        self.layers = [LayerCounters() for _ in range(self.n_layers)]
        self.tokens = 0
        self._ready: dict[tuple[int, int], object] = {}  # key -> event of its copy, until waited for
        self._reading_host: list = []  # events of copies that still read host memory
        self._cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self._cuda else None

    # -- wiring -----------------------------------------------------------------------------------
    def attach(self, model) -> None:
        """Serve `model`'s routed experts from this tier (the host store is wired underneath it)."""
        self.host.attach(model, server=self)

    def close(self) -> None:
        self._host_may_change()
        self.host.close()

    # -- copies -----------------------------------------------------------------------------------
    def _copying(self):
        """Context for a copy into device memory: on the side stream, after the queued compute."""
        if not self._cuda:
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)

    def _copied(self, key) -> None:
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self._ready[key] = ev
            self._reading_host.append(ev)

    def _wait(self, key) -> None:
        """The compute stream waits for `key`'s copy (the host does not)."""
        ev = self._ready.pop(key, None)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def _host_may_change(self) -> None:
        """Copies still reading host memory finish before the host tier may evict (and reuse) it."""
        for ev in self._reading_host:
            ev.synchronize()
        self._reading_host.clear()

    def _source(self, key):
        """The expert's host copy (a slab slot's buffers or a ResidentExpert), read from disk if needed."""
        self._host_may_change()
        got = self.host.get(*key)
        if self.slab is not None:
            return self.host.slab.buffers(got) if isinstance(got, int) else FP4Slab.stack(got)
        return got

    def _install(self, key, src) -> int | ResidentExpert:
        """Copy an expert up into a free slot (or new device tensors); returns what the cache holds."""
        if self.slab is not None:
            slot = self.slab.free.pop()
            with self._copying():
                for dst, s in zip(self.slab.buffers(slot), src):
                    dst.copy_(s, non_blocking=True)
            held = slot
        else:
            held = src.empty_like_on(self.device)  # allocated for the compute stream
            with self._copying():
                for dst, s in zip(held.tensors(), src.tensors()):
                    dst.copy_(s, non_blocking=True)
        self._copied(key)
        self.cache[key] = held
        self.layers[key[0]].bytes_read += self.expert_bytes
        return held

    def _drop(self, key) -> None:
        if key is None:
            return
        held = self.cache.pop(key, None)
        self._ready.pop(key, None)
        if self.slab is not None and held is not None:
            self.slab.release(held)
        self.layers[key[0]].evictions += 1

    # -- demand path ------------------------------------------------------------------------------
    def get(self, layer: int, e: int) -> int | ResidentExpert:
        """The expert on the device (its slot, or a device ResidentExpert), copied up on a miss."""
        key = (layer, e)
        hit, evicted = self.policy.access(key)
        self._drop(evicted)
        held = self.cache.get(key)
        if hit and held is not None:
            self.layers[layer].hits += 1
        else:
            self.layers[layer].misses += 1
            held = self._install(key, self._source(key))
        self._wait(key)
        return held

    def slots(self, layer: int, idx: torch.Tensor):
        """Rounds of (slot ids [N, k], pair mask or None, device slab buffers) for MoE.slots: one round
        when the call's experts fit the tier; else rounds of at most `capacity` experts each (each round's
        experts protected, so none evicts another of its own round)."""
        used = idx.unique().tolist()
        cap = self.capacity
        bufs = (self.slab.q13, self.slab.s13, self.slab.q2, self.slab.s2)
        for r in range(0, len(used), cap):
            chunk = used[r:r + cap]
            self.policy.unprotect()
            self.policy.protect({(layer, e) for e in chunk})
            lut = torch.zeros(self.n_experts, dtype=idx.dtype)
            lut[chunk] = torch.tensor([self.get(layer, e) for e in chunk], dtype=idx.dtype)
            slot_idx = lut.to(idx.device, non_blocking=True)[idx]
            if len(chunk) == len(used):
                yield slot_idx, None, bufs
            else:
                yield slot_idx, torch.isin(idx, torch.tensor(chunk, dtype=idx.dtype, device=idx.device)), bufs
        self.policy.unprotect()

    # -- routing hook -----------------------------------------------------------------------------
    def route(self, layer: int, x: torch.Tensor, ids: torch.Tensor, idx: torch.Tensor) -> None:
        """The host tier's bookkeeping and disk prefetch, then: protect this layer's experts here, and
        (with prefetch) copy up the host-resident experts predicted for the next layer."""
        if layer == 0:
            self.tokens += x.shape[0]
        self._host_may_change()
        self.host.route(layer, x, ids, idx)
        keep = {(layer, e) for e in idx.unique().tolist()}
        self.policy.unprotect()
        self.policy.protect(keep)
        guess = self.host._predicted.get(layer + 1) if self.prefetch else None
        for e in sorted(guess or ()):
            key = (layer + 1, e)
            if key in self.policy:
                continue
            with self.host._lock:
                src = self.host.cache.get(key)
                if src is None or key in self.host.pending:
                    continue  # not in host RAM yet: a demand miss will bring it
                src = self.host.slab.buffers(src) if self.slab is not None else src
                self.policy.protect({key})
                self._drop(self.policy.insert(key))
                self._install(key, src)
            self.layers[layer + 1].prefetch_loads += 1

    # -- observability ----------------------------------------------------------------------------
    def stats(self) -> dict:
        """The host tier's numbers (as a plain store reports them) plus this tier's under "device";
        device misses are the host tier's accesses."""
        per_layer = [dict(vars(c)) for c in self.layers]
        tot = {k: sum(d[k] for d in per_layer) for k in ("hits", "misses", "evictions", "bytes_read",
                                                          "prefetch_loads")}
        acc = tot["hits"] + tot["misses"]
        device = {"device": str(self.device), "policy": self.policy_name, "capacity_experts": self.capacity,
                  "expert_bytes": self.expert_bytes, "budget_bytes": self.budget_bytes,
                  "resident": len(self.cache), "tokens": self.tokens, **tot,
                  "hit_rate": tot["hits"] / acc if acc else 0.0,
                  "bytes_copied_per_token": tot["bytes_read"] / self.tokens if self.tokens else 0.0,
                  "per_layer": per_layer}
        return {**self.host.stats(), "device": device}
