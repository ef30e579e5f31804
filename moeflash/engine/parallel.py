"""Expert parallelism: several processes each hold a share of every MoE layer's routed experts and run
the same steps in lockstep; after each layer's routed experts, their partial sums are added up across
the processes (an all-reduce), so every process continues with the whole layer's output.

The dense part (attention, norms, shared experts, embedding and head) is replicated. Routing is
computed on every process from identical inputs, so all agree on which experts each token uses; a
process computes only the (token, expert) pairs of the experts it owns (a contiguous range of ids) and
contributes zeros for the rest. The processes are a `torch.distributed` group (gloo on CPU, NCCL on
GPU); a collective that waits longer than the group's timeout raises instead of hanging.

What is here: `shard_experts_` (keep a share of an in-memory model's experts and free the rest; or,
with an expert store attached, ask the store only for this rank's experts, so a rank reads only its
own experts' bytes from the checkpoint), `ExpertParallel` (the process group, the all-reduce with a
timeout, a long-lived control group), `Leader` / `follow` (rank 0's engine announces each forward call;
the others run it on their own states). Launching under torchrun is in the CLI (`generate` and `serve
--expert-parallel`).
"""

from __future__ import annotations

import datetime
import os

import torch
from torch import nn

from ..model.moe import AbsentExpert


def owned_experts(n_experts: int, rank: int, world: int) -> range:
    """The contiguous ids rank `rank` of `world` owns: as equal as n_experts allows."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    if world > n_experts:
        raise ValueError(f"{world} processes for {n_experts} experts per layer: each needs at least one")
    base, extra = divmod(n_experts, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def moe_layers(model) -> list:
    return [layer.ffn for layer in model.layers if hasattr(layer.ffn, "combine")]


@torch.no_grad()
def shard_experts_(model, rank: int, world: int, combine) -> dict:
    """Keep only this rank's routed experts in every MoE layer and combine each layer's partial sum
    with `combine`. An in-memory V4 model loaded whole drops the others (`MoE.keep_experts_`; FP4-held
    experts keep their slice of the packed codes); one loaded with only its own
    (`load_model(experts=...)`) has nothing to drop; with an expert store, the store is asked only for
    this rank's experts. Returns {"owned": range, "expert_bytes": routed expert bytes held in memory}."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("expert parallelism needs a MoE model")
    cfg = model.config
    n = getattr(cfg, "moe_experts", 0) or cfg.n_routed_experts
    own = owned_experts(n, rank, world)
    store = getattr(model, "expert_store", None)
    if getattr(cfg, "moe_experts", 0) and store is None:  # a MoE-fied llama
        held = 0
        for ffn in layers:
            for name in ("gate", "up", "down"):
                t = getattr(ffn, name)
                setattr(ffn, name, nn.Parameter(t.data[own.start:own.stop].clone(), requires_grad=False))
                held += getattr(ffn, name).numel() * getattr(ffn, name).element_size()
            ffn.owned, ffn.combine = own, combine
        return {"owned": own, "expert_bytes": held}
    if store is not None and store.slab is not None:  # FP4 experts in the store's slab: route others' pairs
        for ffn in layers:                             # to an owned expert with weight 0 (never fetched)
            inner = ffn.slots

            def slots(idx, inner=inner):
                mine = (idx >= own.start) & (idx < own.stop)
                safe = torch.where(mine, idx, torch.full_like(idx, own.start))
                for slot_idx, mask, bufs in inner(safe):
                    yield slot_idx, (mine if mask is None else mask & mine), bufs
            ffn.slots = slots
            ffn.combine = combine
        return {"owned": own, "expert_bytes": 0, "store": True}
    if store is not None:  # experts served from the checkpoint: this rank asks only for its own
        absent = AbsentExpert()
        for ffn in layers:
            fetch = ffn.provider
            ffn.provider = (lambda experts, e, fetch=fetch: fetch(experts, e) if e in own else absent)
            ffn.combine = combine
        return {"owned": own, "expert_bytes": 0, "store": True}
    if len({ffn.fp4 for ffn in layers}) > 1:
        raise ValueError("a model with FP4-held experts in some layers only cannot be sharded")
    held = 0
    for ffn in layers:
        if ffn.owned != own:  # loaded whole: drop the other ranks' experts
            if ffn.fp4:
                for name in ("q13", "s13", "q2", "s2"):
                    setattr(ffn, name, getattr(ffn, name)[own.start:own.stop].clone())
            ffn.w13 = ffn.w2 = None  # the packed copies cover every expert: per-expert modules from here
            ffn.keep_experts_(own)
        ffn.combine = combine
        parts = [getattr(ffn, k) for k in ("q13", "s13", "q2", "s2")] if ffn.fp4 else \
            [p for e in own for p in ffn.experts[e].parameters()]
        held += sum(t.numel() * t.element_size() for t in parts)
    return {"owned": own, "expert_bytes": held}


class ExpertParallel:
    """The process group of an expert-parallel run and its all-reduce, with a timeout on every
    collective. `from_env()` joins the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...)."""

    def __init__(self, rank: int, world: int, init_method: str | None = None, timeout_s: float = 60.0,
                 backend: str | None = None):
        import torch.distributed as dist

        self.rank, self.world = rank, world
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        kw = {"init_method": init_method} if init_method else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
        self.dist = dist
        # the leader's step announcements: followers may wait for them as long as the server idles
        self.ctrl = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30))
        self.broken: Exception | None = None  # a collective that failed: the run cannot go on
        self.reduce_seconds, self.reduces, self.reduce_bytes = 0.0, 0, 0  # time spent in all-reduces

    @classmethod
    def from_env(cls, timeout_s: float = 60.0) -> "ExpertParallel":
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except KeyError:
            raise ValueError("--expert-parallel runs under torchrun (RANK and WORLD_SIZE are not set): "
                             "torchrun --nproc-per-node 2 -m moeflash.cli generate ... --expert-parallel") from None
        return cls(rank, world, timeout_s=timeout_s)

    def all_reduce(self, out: torch.Tensor) -> torch.Tensor:
        import time

        t0 = time.perf_counter()
        try:
            self.dist.all_reduce(out)
        except Exception as e:  # a rank died or hung past the timeout
            self.broken = e
            raise RuntimeError(f"expert parallelism: an all-reduce failed ({e}); another rank is gone") from e
        self.reduce_seconds += time.perf_counter() - t0
        self.reduces += 1
        self.reduce_bytes += out.numel() * out.element_size()
        return out

    def agree(self, value: str) -> None:
        """Every rank must hold the same `value` (e.g. a model fingerprint); ValueError otherwise."""
        got = [None] * self.world
        self.dist.all_gather_object(got, value)
        if len(set(got)) != 1:
            raise ValueError(f"the ranks disagree: {got}")

    def close(self) -> None:
        if not self.dist.is_initialized():
            return
        if self.broken is None:  # all ranks tear down together: gloo aborts a process whose peer left mid-teardown
            try:
                self.dist.barrier()
            except Exception:
                pass
        self.dist.destroy_process_group()


class Leader:
    """Rank 0's engine hook: before each forward call, tell the other ranks what it runs (request
    ids, start positions, tokens, lengths) and which requests are still alive (the rest are freed)."""

    def __init__(self, ep: ExpertParallel):
        self.ep = ep

    def __call__(self, keys, starts, tokens, lengths, live) -> None:
        self._send(("forward", keys, starts, tokens, lengths, live))

    def stop(self) -> None:
        try:
            self._send(("stop",))
        except Exception:
            pass

    def _send(self, msg) -> None:
        try:
            self.ep.dist.broadcast_object_list([msg], src=0, group=self.ep.ctrl)
        except Exception as e:
            self.ep.broken = e
            raise RuntimeError(f"expert parallelism: the other ranks cannot be reached ({e})") from e


@torch.inference_mode()
def follow(model, ep: ExpertParallel) -> None:
    """A rank other than 0: run every forward call the leader announces, on this rank's own copies of
    the sequences' states (a call starting at position 0 begins a new state), until told to stop."""
    from .forward import run_tokens

    states: dict[str, object] = {}
    while True:
        box = [None]
        ep.dist.broadcast_object_list(box, src=0, group=ep.ctrl)
        msg = box[0]
        if msg[0] == "stop":
            return
        _, keys, starts, tokens, lengths, live = msg
        for key in list(states):
            if key not in live and key not in keys:
                del states[key]
        seqs = []
        for key, start in zip(keys, starts):
            if start == 0:
                states[key] = model.new_seq_state()
            st = states.get(key)
            if st is None or st.pos != start:
                raise RuntimeError(f"expert parallelism: request {key} is at {getattr(st, 'pos', None)} here but "
                                   f"at {start} on the leader; the ranks are out of step")
            seqs.append(st)
        run_tokens(model, torch.tensor(tokens, dtype=torch.long), seqs, lengths)


def shared_fingerprint(model) -> str:
    """A digest of the configuration and of every tensor all ranks hold alike (not the routed experts,
    which differ per rank): ranks that loaded different models disagree on it."""
    import hashlib
    import json

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(getattr(model.config, "__dict__", str(model.config)), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        if ".experts." in name or name.split(".")[-1] in ("q13", "s13", "q2", "s2") or \
                (name.endswith(("ffn.gate", "ffn.up", "ffn.down"))):
            continue
        if t.device.type == "meta" or not t.numel():
            continue
        h.update(name.encode())
        h.update(t.reshape(-1)[:64].float().numpy().tobytes())
    return h.hexdigest()


def checkpoint_experts(spec: str, rank: int, world: int) -> range | None:
    """The routed experts rank `rank` should read from a V4 checkpoint directory (None for models
    loaded another way, which are sharded after loading)."""
    from pathlib import Path

    from ..config import ModelConfig

    if not (Path(spec).is_dir() and (Path(spec) / "config.json").is_file()):
        return None
    return owned_experts(ModelConfig.from_json(Path(spec)).n_routed_experts, rank, world)
