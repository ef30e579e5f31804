"""Which routed experts stay resident: cache policies, the Belady ceiling, routing traces and their replay.

The expert store (`experts.py`) keeps at most `capacity` experts in RAM, keyed by `(layer, expert)` over
all MoE layers together; every expert has the same byte size, so capacity is a count. Each token routes
to top-k experts per layer, and each of those is a demand `access` here. A policy only decides *which*
keys stay resident; outputs never depend on it, only speed (a miss costs a read from disk).

Why not plain LRU: routed experts are reused by popularity, not by recency. A layer's k experts for one
token are mostly not the ones the previous token used in that layer, so between two uses of a hot expert
the cache sees ~capacity other keys and LRU forgets it (public measurements on V4-Flash routing: LRU
8-18% hits, a frequency policy ~46% at the same size). `LFUPolicy` keeps decayed counts, also for keys
that are not resident, so a returning hot expert is recognised; decay lets the resident set follow a
shift of domain. `PinnedPolicy` freezes the hottest keys of a recorded profile. `belady_hits` is the
offline optimum, reported as the ceiling.

Traces: a trace is a list of tokens, each a list (per MoE layer) of lists of expert ids; on disk it is
JSONL, one `{"seq", "pos", "token", "experts"}` object per token. `synthetic_trace` makes skewed routing
(Zipf popularity per domain and layer, the domain shifting over time); `uniform_trace` is what a
random-weight model routes like. `replay` scores policies on a trace.

Pure Python (+ numpy for trace generation): policies are O(1) (LRU, pinned) or O(log n) (LFU) per access.
"""

from __future__ import annotations

import heapq
import json
import math
import numbers
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

Key = Hashable
Trace = list[list[list[int]]]

POLICIES = ("lru", "lfu", "pinned")

__all__ = [
    "POLICIES",
    "CachePolicy",
    "LFUPolicy",
    "LRUPolicy",
    "PinnedPolicy",
    "accesses",
    "belady_hit_rate",
    "belady_hits",
    "format_replay",
    "make_policy",
    "read_trace",
    "replay",
    "synthetic_trace",
    "uniform_trace",
    "write_trace",
]


def _check_int(name: str, value, minimum: int) -> int:
    """An int >= minimum (numpy ints welcome, bools rejected: `capacity=True` is always a mistake)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_fraction(name: str, value, low_open: bool = False) -> float:
    """A float in [0, 1] ((0, 1] when low_open); NaN fails both comparisons and is rejected too."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return value


# ---------------------------------------------------------------------------------------------------------
# Policies


class CachePolicy:
    """A resident set of at most `capacity` keys and the rule for which key leaves when a new one arrives.

    The policy holds no weights: the store loads on a miss and drops what `access` / `insert` return as
    evicted. Subclasses implement five hooks: `_has`, `_size`, `_touch` (a demand hit), `_add` (admit),
    `_remove`, and `_victim` (the key to evict; it must avoid `self._protected` when it can).

    `protect(keys)` marks keys the current layer step still uses (and prefetched keys about to be used):
    evicting them would only force a reload, so victims come from elsewhere when possible. If every
    resident key is protected the least valuable protected one goes anyway: the cache is a speed
    matter, never a correctness one.
    """

    name = "base"

    def __init__(self, capacity: int):
        self.capacity = _check_int("capacity", capacity, 1)
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.inserts = 0
        self._protected: set = set()

    # -- public interface -------------------------------------------------------------------------
    def access(self, key: Key) -> tuple[bool, Key | None]:
        """A demand access: (True, None) on a hit; on a miss the key is admitted -> (False, evicted|None)."""
        if self._has(key):
            self.hits += 1
            self._touch(key)
            return True, None
        self.misses += 1
        return False, self._admit(key, demand=True)

    def insert(self, key: Key) -> Key | None:
        """Admit `key` without counting an access (prefetch); returns the evicted key, None if none.

        Already resident -> no-op (None). Counted in `inserts` only when it admits.
        """
        if self._has(key):
            return None
        self.inserts += 1
        return self._admit(key, demand=False)

    def protect(self, keys: Iterable[Key]) -> None:
        """Add `keys` to the protected set (cumulative until `unprotect`); they need not be resident."""
        self._protected.update(keys)

    def unprotect(self) -> None:
        """Clear the protected set (the store calls it when a layer step is done with its experts)."""
        self._protected.clear()

    def resident(self) -> set:
        """A copy of the resident keys (a copy so callers may mutate it freely)."""
        raise NotImplementedError

    def __contains__(self, key: Key) -> bool:
        return self._has(key)

    def __len__(self) -> int:
        return self._size()

    @property
    def hit_rate(self) -> float:
        """hits / demand accesses (0.0 before any); prefetch inserts are not accesses."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def reset_counters(self) -> None:
        """Zero hits / misses / evictions / inserts but keep the state (score after a warm-up)."""
        self.hits = self.misses = self.evictions = self.inserts = 0

    def stats(self) -> dict:
        """Plain numbers for logs and benchmarks."""
        return {"policy": self.name, "capacity": self.capacity, "resident": len(self), "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions, "inserts": self.inserts,
                "hit_rate": self.hit_rate}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(capacity={self.capacity}, resident={len(self)}, "
                f"hit_rate={self.hit_rate:.3f})")

    # -- shared machinery -------------------------------------------------------------------------
    def _admit(self, key: Key, demand: bool) -> Key | None:
        """Make room if full (one eviction: every key has the same size), then add `key`."""
        evicted = None
        if self._size() >= self.capacity:
            evicted = self._victim()
            self._remove(evicted)
            self.evictions += 1
        self._add(key, demand)
        return evicted

    # -- hooks ------------------------------------------------------------------------------------
    def _has(self, key: Key) -> bool:
        raise NotImplementedError

    def _size(self) -> int:
        raise NotImplementedError

    def _touch(self, key: Key) -> None:
        raise NotImplementedError

    def _add(self, key: Key, demand: bool) -> None:
        raise NotImplementedError

    def _remove(self, key: Key) -> None:
        raise NotImplementedError

    def _victim(self) -> Key:
        raise NotImplementedError


def _oldest_unprotected(order: OrderedDict, protected: set) -> Key | None:
    """The first key of `order` (oldest first) not in `protected`; None if all are protected.

    The protected set is one layer step's experts (tens of keys), so the scan is short.
    """
    if not protected:
        return next(iter(order), None)
    for key in order:
        if key not in protected:
            return key
    return None


class LRUPolicy(CachePolicy):
    """Least recently used: the baseline. An OrderedDict, oldest first: O(1) per access."""

    name = "lru"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._order: OrderedDict = OrderedDict()

    def resident(self) -> set:
        return set(self._order)

    def _has(self, key):
        return key in self._order

    def _size(self):
        return len(self._order)

    def _touch(self, key):
        self._order.move_to_end(key)

    def _add(self, key, demand):
        self._order[key] = None

    def _remove(self, key):
        del self._order[key]

    def _victim(self):
        key = _oldest_unprotected(self._order, self._protected)
        return key if key is not None else next(iter(self._order))


class LFUPolicy(CachePolicy):
    """Least frequently used, with exponentially decayed counts kept for resident and evicted keys alike.

    Every `period` demand accesses each count is multiplied by `decay`. Done literally that is O(n); here
    the *weight of one new access* grows by 1/decay instead ("inflation"), which orders keys exactly as
    decayed counts would. When the weight gets huge all scores are rescaled once (amortised O(1)), and
    keys whose history has decayed to nothing are forgotten then.

    Counts survive eviction (history), so an expert that was hot, was pushed out, and comes back is
    recognised at once and pushes out a one-off key instead: that is what beats LRU on routing. A miss is
    still always admitted (the store has just loaded the weights), so a cold key occupies the cheapest
    slot until the next miss replaces it. Ties on count go to recency (older leaves first).

    Victims come from a min-heap of (score, tick, key) with lazy invalidation: a hit pushes a fresh entry
    and the stale one is skipped when popped; the heap is rebuilt when stale entries outnumber live ones.
    O(log n) per access.

    `insert` (prefetch) does not count as a use: a prefetched key keeps its history score, and the store
    protects it until the layer that wanted it has run.
    """

    name = "lfu"
    _RESCALE_AT = 1e100   # inflation weight at which scores are renormalised (float range is 1e308)
    _FORGET_BELOW = 1e-9  # decayed counts below this (in units of one fresh access) are dropped

    def __init__(self, capacity: int, decay: float = 0.5, period: int | None = None):
        super().__init__(capacity)
        self.decay = _check_fraction("decay", decay, low_open=True)
        self.period = 8 * self.capacity if period is None else _check_int("period", period, 1)
        self._score: dict = {}      # key -> decayed count in inflated units (history, resident or not)
        self._live: dict = {}       # resident key -> (score, tick) of its current heap entry
        self._heap: list = []
        self._tick = 0
        self._unit = 1.0            # what one access adds now; x 1/decay every period
        self._since_decay = 0

    def resident(self) -> set:
        return set(self._live)

    def count(self, key: Key) -> float:
        """The key's decayed access count, in accesses of the current period (0.0 if never seen)."""
        return self._score.get(key, 0.0) / self._unit

    # -- hooks ------------------------------------------------------------------------------------
    def _has(self, key):
        return key in self._live

    def _size(self):
        return len(self._live)

    def _touch(self, key):
        self._count(key)
        self._push(key)

    def _add(self, key, demand):
        if demand:
            self._count(key)
        self._push(key)

    def _remove(self, key):
        del self._live[key]  # its heap entries go stale and are skipped

    def _victim(self):
        """Pop to the lowest-(score, tick) live unprotected key; protected ones are pushed back."""
        heap, live, protected = self._heap, self._live, self._protected
        held = []
        victim = None
        while heap:
            entry = heapq.heappop(heap)
            score, tick, key = entry
            if live.get(key) != (score, tick):
                continue  # stale
            if key in protected:
                held.append(entry)
                continue
            victim = key
            break
        if victim is None:  # everything resident is protected: the least valuable one goes anyway
            victim = held.pop(0)[2]
        for entry in held:
            heapq.heappush(heap, entry)
        return victim

    # -- internals --------------------------------------------------------------------------------
    def _count(self, key):
        """One demand use of `key`; advances the decay clock."""
        self._score[key] = self._score.get(key, 0.0) + self._unit
        self._since_decay += 1
        if self._since_decay >= self.period:
            self._since_decay = 0
            self._unit /= self.decay
            if self._unit > self._RESCALE_AT:
                self._rescale()

    def _push(self, key):
        self._tick += 1
        stamp = (self._score.get(key, 0.0), self._tick)
        self._live[key] = stamp
        heapq.heappush(self._heap, (stamp[0], stamp[1], key))
        if len(self._heap) > 2 * len(self._live) + 64:
            self._rebuild_heap()

    def _rebuild_heap(self):
        self._heap = [(s, t, k) for k, (s, t) in self._live.items()]
        heapq.heapify(self._heap)

    def _rescale(self):
        """Divide every score by the current unit (so one access weighs 1 again); forget dead history."""
        f = 1.0 / self._unit
        self._score = {k: s * f for k, s in self._score.items() if s * f >= self._FORGET_BELOW or k in self._live}
        self._live = {k: (self._score[k], t) for k, (_, t) in self._live.items()}
        self._unit = 1.0
        self._rebuild_heap()


class PinnedPolicy(CachePolicy):
    """The hottest keys of a profile stay resident for good; the remaining slots are LRU.

    `pinned` lists keys most valuable first (e.g. from a recorded trace, see `from_counts`); at most
    `int(pin_fraction * capacity)` of them are used, and at least one slot is always left to the LRU part
    so a miss can be admitted. Pinned keys are not preloaded by the policy (it holds no weights): each
    becomes resident on its first access or `insert`, and from then on only the LRU part evicts. The
    store may `insert` every key in `.pinned` up front to warm it.

    With no `pinned` keys given, the policy is plain LRU for the first `warmup` demand accesses
    (default 16 x capacity) while it counts them, then pins the most used and freezes the choice.
    Static pinning cannot follow a change of domain; it is the right choice when a profile of the real
    workload exists and routing is stable.

    Eviction order: unprotected LRU keys (oldest first), unprotected pinned keys (least valuable first),
    then protected ones in the same order.
    """

    name = "pinned"

    def __init__(self, capacity: int, pinned: Iterable[Key] = (), pin_fraction: float = 0.75,
                 warmup: int | None = None):
        super().__init__(capacity)
        self.pin_fraction = _check_fraction("pin_fraction", pin_fraction)
        self.n_pin = min(int(self.pin_fraction * self.capacity), self.capacity - 1)
        chosen = list(dict.fromkeys(pinned))[: self.n_pin]
        self.warmup = 16 * self.capacity if warmup is None else _check_int("warmup", warmup, 0)
        self._lru: OrderedDict = OrderedDict()   # resident, not pinned, oldest first
        self._pins: set = set()                  # resident and pinned
        self._rank: dict = {}                    # pinned key -> 0 (most valuable), 1, ...
        self._counts: Counter | None = None      # while learning the pinned set
        self._seen = 0
        if chosen or self.n_pin == 0 or self.warmup == 0:
            self._freeze(chosen)
        else:
            self._counts = Counter()

    @classmethod
    def from_counts(cls, capacity: int, counts: dict, pin_fraction: float = 0.75, **kw) -> PinnedPolicy:
        """Pin the most counted keys (ties: first seen in `counts` first)."""
        order = sorted(counts, key=lambda k: -counts[k])
        return cls(capacity, pinned=order, pin_fraction=pin_fraction, **kw)

    @property
    def pinned(self) -> frozenset:
        """The pinned keys (empty while still learning)."""
        return frozenset(self._rank)

    @property
    def frozen(self) -> bool:
        """Whether the pinned set is decided."""
        return self._counts is None

    def resident(self) -> set:
        return set(self._lru) | self._pins

    def access(self, key):
        result = super().access(key)
        if self._counts is not None:
            self._counts[key] += 1
            self._seen += 1
            if self._seen >= self.warmup:
                self._freeze([k for k, _ in self._counts.most_common(self.n_pin)])
        return result

    def _freeze(self, chosen: list) -> None:
        """Fix the pinned set; resident keys in it move out of the LRU part."""
        self._rank = {k: i for i, k in enumerate(chosen)}
        self._counts = None
        for key in [k for k in self._lru if k in self._rank]:
            del self._lru[key]
            self._pins.add(key)

    # -- hooks ------------------------------------------------------------------------------------
    def _has(self, key):
        return key in self._lru or key in self._pins

    def _size(self):
        return len(self._lru) + len(self._pins)

    def _touch(self, key):
        if key in self._lru:
            self._lru.move_to_end(key)

    def _add(self, key, demand):
        if key in self._rank:
            self._pins.add(key)
        else:
            self._lru[key] = None

    def _remove(self, key):
        if key in self._pins:
            self._pins.remove(key)
        else:
            del self._lru[key]

    def _victim(self):
        key = _oldest_unprotected(self._lru, self._protected)
        if key is not None:
            return key
        by_value = sorted(self._pins, key=self._rank.__getitem__, reverse=True)  # least valuable first
        for key in by_value:
            if key not in self._protected:
                return key
        return next(iter(self._lru)) if self._lru else by_value[0]


_CLASSES = {cls.name: cls for cls in (LRUPolicy, LFUPolicy, PinnedPolicy)}


def make_policy(name: str, capacity: int, **kw) -> CachePolicy:
    """Build a policy by name: "lru", "lfu" (kw: decay, period) or "pinned" (kw: pinned, pin_fraction,
    warmup)."""
    cls = _CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown cache policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return cls(capacity, **kw)


# ---------------------------------------------------------------------------------------------------------
# The offline optimum


def _next_uses(seq: Sequence[Key]) -> list[int]:
    """For each position, the index of the next access to the same key (len(seq) if none)."""
    n = len(seq)
    nxt = [n] * n
    last: dict = {}
    for i in range(n - 1, -1, -1):
        key = seq[i]
        nxt[i] = last.get(key, n)
        last[key] = i
    return nxt


def belady_hits(accesses: Sequence[Key], capacity: int, score_from: int = 0) -> int:
    """The most hits any cache of `capacity` that admits every miss can get (Belady's MIN).

    On a miss with a full cache, evict the resident key whose next use is farthest away. Next uses are
    precomputed; a max-heap with lazy invalidation finds the victim: O(n log capacity).

    `score_from` > 0 counts only hits in `accesses[score_from:]` and starts that part with the best
    possible warm cache (the `capacity` keys used soonest), so it bounds any policy scored on that part
    whatever state its warm-up left it in. That best warm start is worth exactly one hit per distinct
    key among the first `capacity` distinct keys: a cold MIN run only loses those first misses.
    """
    capacity = _check_int("capacity", capacity, 1)
    score_from = _check_int("score_from", score_from, 0)
    seq = list(accesses[score_from:])
    nxt = _next_uses(seq)
    live: dict = {}   # resident key -> its next use
    heap: list = []   # (-next_use, position, key); stale when live[key] != next_use
    hits = 0
    for i, key in enumerate(seq):
        if key in live:
            hits += 1
        elif len(live) >= capacity:
            while True:
                neg, _, victim = heapq.heappop(heap)
                if live.get(victim) == -neg:
                    del live[victim]
                    break
        live[key] = nxt[i]
        heapq.heappush(heap, (-nxt[i], i, key))  # the position breaks ties: keys are never compared
        if len(heap) > 2 * capacity + 64:  # drop stale entries; tiebreaks below any future position
            heap = [(-u, -1 - j, k) for j, (k, u) in enumerate(live.items())]
            heapq.heapify(heap)
    if score_from > 0:
        hits += min(capacity, len(set(seq)))
    return hits


def belady_hit_rate(accesses: Sequence[Key], capacity: int, score_from: int = 0) -> float:
    """`belady_hits` as a fraction of the scored accesses (0.0 if there are none)."""
    n = len(accesses) - score_from
    return belady_hits(accesses, capacity, score_from) / n if n > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------
# Routing traces


def accesses(trace: Trace) -> list[tuple[int, int]]:
    """The demand sequence a trace makes: token by token, layer by layer, in routing order."""
    return [(layer, e) for token in trace for layer, experts in enumerate(token) for e in experts]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_token(obj, where: str, n_layers: int | None) -> list[list[int]]:
    """Validate one JSONL record and return its experts; `where` is "path:line" for the message."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for field in ("seq", "pos", "token"):
        if field in obj and not _is_int(obj[field]):
            raise ValueError(f"{where}: {field!r} must be an int, got {obj[field]!r}")
    experts = obj.get("experts")
    if not isinstance(experts, list) or not all(isinstance(layer, list) for layer in experts):
        raise ValueError(f"{where}: 'experts' must be a list (one per MoE layer) of lists of expert ids, "
                         f"got {experts!r}")
    for layer, ids in enumerate(experts):
        bad = [e for e in ids if not _is_int(e) or e < 0]
        if bad:
            raise ValueError(f"{where}: layer {layer} has expert ids that are not ints >= 0: {bad!r}")
    if n_layers is not None and len(experts) != n_layers:
        raise ValueError(f"{where}: token has {len(experts)} layers, earlier tokens have {n_layers}")
    return experts


def read_trace(path) -> Trace:
    """Read a JSONL routing trace (blank lines skipped); a malformed line fails with its line number."""
    path = os.fspath(path)
    tokens: Trace = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            tokens.append(_parse_token(obj, where, len(tokens[0]) if tokens else None))
    return tokens


def write_trace(path, tokens: Trace, seqs: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                token_ids: Sequence[int] | None = None) -> None:
    """Write a JSONL routing trace. Defaults: seq 0, pos = index in `tokens`, token -1 (unknown)."""
    n = len(tokens)
    for name, values in (("seqs", seqs), ("positions", positions), ("token_ids", token_ids)):
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries but there are {n} tokens")
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        for i, token in enumerate(tokens):
            record = {"seq": int(seqs[i]) if seqs is not None else 0,
                      "pos": int(positions[i]) if positions is not None else i,
                      "token": int(token_ids[i]) if token_ids is not None else -1,
                      "experts": [[int(e) for e in layer] for layer in token]}
            f.write(json.dumps(record, separators=(",", ":")) + "\n")


def _check_shape(n_tokens, n_layers, n_experts, top_k) -> None:
    _check_int("n_tokens", n_tokens, 0)
    _check_int("n_layers", n_layers, 1)
    _check_int("n_experts", n_experts, 1)
    _check_int("top_k", top_k, 1)
    if top_k > n_experts:
        raise ValueError(f"top_k ({top_k}) must not exceed n_experts ({n_experts})")


def _sample_block(rng: np.random.Generator, logp: np.ndarray, n: int, top_k: int) -> Trace:
    """`n` tokens; per layer, top_k distinct experts drawn without replacement with probabilities exp(logp).

    Gumbel top-k: the k largest of logp + Gumbel noise are a draw without replacement proportional to
    p (Plackett-Luce), vectorised over tokens and layers. Each token lists its experts best first, the
    order a router's top-k returns them in.
    """
    scores = logp[None] + rng.gumbel(size=(n,) + logp.shape)
    top = np.argpartition(-scores, top_k - 1, axis=-1)[..., :top_k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=-1), axis=-1)
    return np.take_along_axis(top, order, axis=-1).tolist()


def synthetic_trace(n_tokens: int, n_layers: int, n_experts: int, top_k: int, zipf_s: float = 1.0,
                    domains: int = 4, switch_every: int = 256, seed: int = 0) -> Trace:
    """Skewed routing, the shape real MoE routing has: a few experts per layer take most tokens.

    Each (domain, layer) has its own random permutation of experts with Zipf(`zipf_s`) popularity
    (rank r has weight 1 / (r + 1)^s). Every `switch_every` tokens the active domain changes to another
    one drawn at random (a new request or topic), so the hot set shifts and returns. Each token draws
    `top_k` distinct experts per layer from the active domain's popularity.
    """
    _check_shape(n_tokens, n_layers, n_experts, top_k)
    _check_int("domains", domains, 1)
    _check_int("switch_every", switch_every, 1)
    if isinstance(zipf_s, bool) or not isinstance(zipf_s, numbers.Real) or not 0 <= zipf_s < math.inf:
        raise ValueError(f"zipf_s must be a finite number >= 0, got {zipf_s!r}")
    rng = np.random.default_rng(seed)
    by_rank = -float(zipf_s) * np.log(np.arange(1, n_experts + 1))
    by_rank -= np.log(np.exp(by_rank).sum())
    logp = np.empty((domains, n_layers, n_experts))
    for d in range(domains):
        for layer in range(n_layers):
            logp[d, layer, rng.permutation(n_experts)] = by_rank
    trace: Trace = []
    domain = int(rng.integers(domains))
    while len(trace) < n_tokens:
        trace += _sample_block(rng, logp[domain], min(switch_every, n_tokens - len(trace)), top_k)
        if domains > 1:  # another domain, never the same one twice in a row
            domain = (domain + 1 + int(rng.integers(domains - 1))) % domains
    return trace


def uniform_trace(n_tokens: int, n_layers: int, n_experts: int, top_k: int, seed: int = 0) -> Trace:
    """Every expert equally likely: how a random-weight model routes. No policy can beat
    capacity / (n_layers * n_experts) here by more than noise; only Belady (foresight) can."""
    _check_shape(n_tokens, n_layers, n_experts, top_k)
    rng = np.random.default_rng(seed)
    logp = np.zeros((n_layers, n_experts))
    trace: Trace = []
    while len(trace) < n_tokens:
        trace += _sample_block(rng, logp, min(4096, n_tokens - len(trace)), top_k)
    return trace


# ---------------------------------------------------------------------------------------------------------
# Replay


def _run(policy: CachePolicy, warm: list, scored: list) -> dict:
    """Feed the warm-up part, zero the counters, feed the scored part; report the scored part."""
    access = policy.access
    for key in warm:
        access(key)
    policy.reset_counters()
    t0 = time.perf_counter()
    for key in scored:
        access(key)
    seconds = time.perf_counter() - t0
    return {"hit_rate": policy.hit_rate, "hits": policy.hits, "misses": policy.misses,
            "evictions": policy.evictions, "accesses_per_s": len(scored) / seconds if seconds > 0 else None}


def replay(trace: Trace, capacity: int, policies: Sequence[str] = POLICIES, pinned_counts: dict | None = None,
           warmup_fraction: float = 0.1, policy_kw: dict | None = None) -> dict:
    """Score policies (and the Belady ceiling) on a routing trace.

    Fairness: the first `warmup_fraction` of the tokens is a warm-up that no one is scored on. Every
    policy replays it (so LRU and LFU start the scored part warm too), and "pinned" takes its counts from
    it when `pinned_counts` is None (a recorded profile, never the scored part itself). Hit rates cover
    only the remaining tokens. Belady is scored on the same part starting from the best possible warm
    cache, so it bounds every policy whatever its warm-up left behind. With warmup_fraction 0 all are
    scored on the whole trace from cold, and "pinned" learns online unless `pinned_counts` is given.

    `policy_kw` maps a policy name to extra keyword arguments for `make_policy`. Returns
    {"capacity", "keys" (distinct experts in the trace), "warmup_accesses", "accesses" (scored),
    "results": {name: {"hit_rate", "hits", "misses", "evictions", "accesses_per_s", "vs_lru",
    "vs_belady"}}} with "belady" among the results; vs_lru is None when LRU was not run or got no hits.
    """
    capacity = _check_int("capacity", capacity, 1)
    warmup_fraction = _check_fraction("warmup_fraction", warmup_fraction)
    for name in policies:
        if name not in _CLASSES:
            raise ValueError(f"unknown cache policy {name!r}; choose one of: {', '.join(POLICIES)}")
    n_warm_tokens = int(len(trace) * warmup_fraction)
    warm, scored = accesses(trace[:n_warm_tokens]), accesses(trace[n_warm_tokens:])
    results = {}
    for name in policies:
        kw = dict((policy_kw or {}).get(name, {}))
        if name == "pinned" and "pinned" not in kw:
            counts = pinned_counts if pinned_counts is not None else Counter(warm)
            if counts:
                kw["pinned"] = sorted(counts, key=lambda k: -counts[k])
        results[name] = _run(make_policy(name, capacity, **kw), warm, scored)
    results["belady"] = _belady_result(warm + scored, capacity, len(warm))
    lru = results.get("lru", {}).get("hit_rate")
    best = results["belady"]["hit_rate"]
    for r in results.values():
        r["vs_lru"] = r["hit_rate"] / lru if lru else None
        r["vs_belady"] = r["hit_rate"] / best if best else None
    return {"capacity": capacity, "keys": len(set(warm) | set(scored)), "warmup_accesses": len(warm),
            "accesses": len(scored), "results": results}


def _belady_result(seq: list, capacity: int, score_from: int) -> dict:
    """Belady's counts in `replay`'s format; after a warm start every miss evicts, from cold the first
    min(capacity, distinct keys) misses only fill."""
    t0 = time.perf_counter()
    hits = belady_hits(seq, capacity, score_from)
    seconds = time.perf_counter() - t0
    n = len(seq) - score_from
    misses = n - hits
    fills = 0 if score_from > 0 else min(capacity, len(set(seq)))
    return {"hit_rate": hits / n if n else 0.0, "hits": hits, "misses": misses,
            "evictions": max(0, misses - fills), "accesses_per_s": n / seconds if seconds > 0 else None}


def format_replay(result: dict) -> str:
    """A small text table of `replay`'s result, for logs and benchmark output."""
    head = (f"capacity {result['capacity']} of {result['keys']} experts, {result['accesses']} scored "
            f"accesses (+{result['warmup_accesses']} warm-up)")
    lines = [head,
             f"{'policy':<8} {'hit rate':>8} {'x lru':>6} {'/belady':>7} {'evictions':>10} {'acc/s':>10}"]
    for name, r in result["results"].items():
        ratio = lambda v: f"{v:.2f}" if v is not None else "-"
        speed = f"{r['accesses_per_s']:.3g}" if r["accesses_per_s"] else "-"
        lines.append(f"{name:<8} {r['hit_rate']:>8.3f} {ratio(r['vs_lru']):>6} {ratio(r['vs_belady']):>7} "
                     f"{r['evictions']:>10} {speed:>10}")
    return "\n".join(lines)
