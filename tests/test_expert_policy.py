"""Expert cache policies: hand-worked sequences, protection, the Belady ceiling (against brute force),
hit rates on synthetic skewed and uniform routing, and the JSONL trace format."""

import itertools
import json
import random
from functools import cache

import pytest

from moeflash.engine.expert_policy import (
    POLICIES,
    LFUPolicy,
    LRUPolicy,
    PinnedPolicy,
    accesses,
    belady_hit_rate,
    belady_hits,
    format_replay,
    make_policy,
    read_trace,
    replay,
    synthetic_trace,
    uniform_trace,
    write_trace,
)

A, B, C, D, E, P = "A", "B", "C", "D", "E", "P"


def run(policy, seq):
    """Feed demand accesses; return the list of (hit, evicted) answers."""
    return [policy.access(k) for k in seq]


def fresh(name, capacity):
    """A policy of each kind; pinned starts in its learning phase (plain LRU) unless told otherwise."""
    return make_policy(name, capacity)


# ---------------------------------------------------------------------------------------------------------
# Hand-worked sequences


def test_lru_hand_worked():
    p = LRUPolicy(2)
    out = run(p, [A, B, A, C, B, A])
    # [A] [A B] hit->[B A] C evicts B ->[A C] B evicts A ->[C B] A evicts C ->[B A]
    assert out == [(False, None), (False, None), (True, None), (False, B), (False, A), (False, C)]
    assert (p.hits, p.misses, p.evictions, p.inserts) == (1, 5, 3, 0)
    assert p.resident() == {A, B} and len(p) == 2 and A in p and C not in p
    assert p.hit_rate == pytest.approx(1 / 6)


def test_lfu_hand_worked_without_decay():
    p = LFUPolicy(2, decay=1.0)
    out = run(p, [A, A, B, C, B, A])
    # A=2, B=1: C evicts B (lower count). B misses again: residents A=2, C=1 -> C goes. A hits.
    assert out == [(False, None), (True, None), (False, None), (False, B), (False, C), (True, None)]
    assert (p.hits, p.misses, p.evictions) == (2, 4, 2)
    assert p.count(A) == 3 and p.count(B) == 2 and p.count(C) == 1


def test_lfu_ties_go_to_recency():
    p = LFUPolicy(2, decay=1.0)
    run(p, [A, B])
    assert p.access(C) == (False, A)  # A and B both counted once: the older one leaves


def test_lfu_keeps_history_of_evicted_keys():
    p = LFUPolicy(2, decay=1.0)
    run(p, [A, A, A, B])
    p.protect([B])
    assert p.access(C) == (False, A)  # forced out: the only unprotected key
    p.unprotect()
    assert p.access(D) == (False, B)  # B=1, C=1: older goes
    assert p.access(A) == (False, C)  # A comes back ...
    assert p.count(A) == 4            # ... with its history
    assert p.access(E) == (False, D)  # so a one-off key, not A, is evicted


def test_lfu_decay_lets_new_hot_key_beat_old_one():
    # period 2, decay 0.5: accesses 1-2 weigh 1, 3-4 weigh 2, 5-6 weigh 4, 7 weighs 8
    seq = [A, A, A, A, B, B, B]
    decayed = LFUPolicy(2, decay=0.5, period=2)
    run(decayed, seq)
    assert decayed.count(A) == pytest.approx(6 / 8) and decayed.count(B) == pytest.approx(16 / 8)
    assert decayed.access(C) == (False, A)  # the old hot key lost to the recent one
    plain = LFUPolicy(2, decay=1.0)
    run(plain, seq)
    assert plain.access(C) == (False, B)    # without decay A's 4 beat B's 3


def test_lfu_decay_rescaling_keeps_order():
    p = LFUPolicy(4, decay=0.5, period=1)   # the weight doubles every access: rescales often
    for i in range(2000):
        p.access(("hot", 0) if i % 2 else (i % 7, 1))
    assert ("hot", 0) in p
    assert p._unit <= LFUPolicy._RESCALE_AT
    # hot was used at every other step; counts are in units of the next access, which weighs 2x the last:
    # (1 + 1/4 + 1/16 + ...) / 2 = 2/3
    assert p.count(("hot", 0)) == pytest.approx(2 / 3, rel=1e-9)


def test_pinned_hand_worked():
    p = PinnedPolicy(3, pinned=[P], pin_fraction=0.34)  # int(1.02) = 1 pinned slot
    assert p.pinned == {P} and p.frozen
    out = run(p, [P, B, C, D, P, B])
    # [P B C] full; D evicts B (LRU among unpinned); P hits; B evicts C. LRU would have hit nothing.
    assert out == [(False, None), (False, None), (False, None), (False, B), (True, None), (False, C)]
    assert (p.hits, p.evictions) == (1, 2)
    lru = LRUPolicy(3)
    run(lru, [P, B, C, D, P, B])
    assert lru.hits == 0


def test_pinned_learns_from_warmup_then_freezes():
    p = PinnedPolicy(2, pin_fraction=0.5, warmup=4)  # one pinned slot
    assert not p.frozen and p.pinned == frozenset()
    out = run(p, [A, B, A, C])  # plain LRU while learning: C evicts B
    assert out[-1] == (False, B)
    assert p.frozen and p.pinned == {A}
    assert run(p, [B, C, A]) == [(False, C), (False, B), (True, None)]  # A never leaves


def test_pinned_from_counts_and_limits():
    p = PinnedPolicy.from_counts(4, {C: 1, A: 10, B: 5}, pin_fraction=0.5)
    assert p.pinned == {A, B}
    full = PinnedPolicy(3, pinned=[A, B, C, D], pin_fraction=1.0)
    assert full.pinned == {A, B}  # one slot always stays LRU so a miss can be admitted
    assert PinnedPolicy(1, pinned=[A]).pinned == frozenset()  # capacity 1: nothing to pin


def test_make_policy_and_validation():
    assert POLICIES == ("lru", "lfu", "pinned")
    for name in POLICIES:
        p = make_policy(name, 3)
        assert p.name == name and p.capacity == 3
    assert make_policy("lfu", 4, decay=0.9, period=10).period == 10
    with pytest.raises(ValueError, match="lru, lfu, pinned"):
        make_policy("arc", 3)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="capacity"):
            LRUPolicy(bad)
    with pytest.raises(ValueError, match="decay"):
        LFUPolicy(4, decay=0.0)
    with pytest.raises(ValueError, match="pin_fraction"):
        PinnedPolicy(4, pin_fraction=1.5)


# ---------------------------------------------------------------------------------------------------------
# Protection, insert, capacity 1


@pytest.mark.parametrize("name", POLICIES)
def test_protect_prevents_eviction(name):
    p = fresh(name, 2)
    run(p, [A, B])
    p.protect([A])
    assert p.access(C) == (False, B)   # A would be the victim (oldest) were it not protected
    p.unprotect()
    assert p.access(D) == (False, A)


@pytest.mark.parametrize("name", POLICIES)
def test_all_protected_still_evicts_least_valuable(name):
    p = fresh(name, 2)
    run(p, [A, B])
    p.protect([A, B])
    assert p.access(C) == (False, A)
    assert len(p) == 2


def test_pinned_protect_order():
    p = PinnedPolicy(3, pinned=[P], pin_fraction=0.34)
    run(p, [P, A, B])
    p.protect([A, B])
    assert p.access(C) == (False, P)  # an unprotected pinned key goes before protected ones


@pytest.mark.parametrize("name", POLICIES)
def test_insert_semantics(name):
    p = fresh(name, 2)
    assert p.insert(A) is None
    assert A in p and (p.inserts, p.hits, p.misses) == (1, 0, 0)
    assert p.insert(A) is None and p.inserts == 1   # already resident: no-op
    assert p.access(A) == (True, None)
    assert p.insert(B) is None
    p.protect([A])
    assert p.insert(C) == B                          # full: evicts, but not the protected key
    assert (p.inserts, p.evictions, p.hits, p.misses) == (3, 1, 1, 0)
    assert p.resident() == {A, C}


def test_lfu_insert_is_not_a_use():
    p = LFUPolicy(2, decay=1.0)
    p.access(A)
    p.insert(B)
    assert p.count(B) == 0
    assert p.access(C) == (False, B)  # B was never used: it goes before A


@pytest.mark.parametrize("name", POLICIES)
def test_capacity_one(name):
    p = fresh(name, 1)
    out = run(p, [A, A, B, A])
    assert out == [(False, None), (True, None), (False, A), (False, B)]
    assert (p.hits, p.misses, p.evictions) == (1, 3, 2)
    p.protect([A])
    assert p.access(C) == (False, A)  # the only slot: protection cannot hold it


# ---------------------------------------------------------------------------------------------------------
# Belady


def brute_best(seq, capacity, start=()):
    """Most hits over every choice of eviction (admitting every miss), from the resident set `start`."""
    @cache
    def best(i, state):
        if i == len(seq):
            return 0
        k = seq[i]
        if k in state:
            return 1 + best(i + 1, state)
        if len(state) < capacity:
            return best(i + 1, state | {k})
        return max(best(i + 1, (state - {v}) | {k}) for v in state)
    return best(0, frozenset(start))


def test_belady_matches_brute_force():
    rng = random.Random(0)
    for _ in range(150):
        n, capacity, alphabet = rng.randint(1, 12), rng.randint(1, 3), rng.randint(2, 5)
        seq = [rng.randrange(alphabet) for _ in range(n)]
        assert belady_hits(seq, capacity) == brute_best(seq, capacity), (seq, capacity)


def test_belady_warm_start_is_the_best_initial_state():
    """score_from: the hits on the suffix from the best possible warm cache, whatever the prefix was."""
    rng = random.Random(1)
    for _ in range(60):
        capacity, alphabet = rng.randint(1, 3), rng.randint(2, 5)
        prefix = [rng.randrange(alphabet) for _ in range(rng.randint(1, 5))]
        seq = [rng.randrange(alphabet) for _ in range(rng.randint(1, 10))]
        keys = range(alphabet)
        best = max(brute_best(seq, capacity, s) for s in itertools.combinations(keys, min(capacity, alphabet)))
        assert belady_hits(prefix + seq, capacity, score_from=len(prefix)) == best, (prefix, seq, capacity)


def test_belady_hit_rate_and_edges():
    assert belady_hits([], 3) == 0 and belady_hit_rate([], 3) == 0.0
    assert belady_hits([A, B, A, B], 2) == 2
    assert belady_hit_rate([A, B, C, A], 1) == 0.0
    with pytest.raises(ValueError, match="capacity"):
        belady_hits([A], 0)


def test_belady_bounds_every_policy():
    for seed in range(3):
        trace = synthetic_trace(150, 3, 16, 2, domains=2, switch_every=40, seed=seed)
        seq = accesses(trace)
        for capacity in (4, 12, 30):
            opt = belady_hits(seq, capacity)
            for name in POLICIES:
                p = make_policy(name, capacity)
                run(p, seq)
                assert p.hits <= opt, (name, capacity, seed)
            for warmup_fraction in (0.0, 0.2):
                r = replay(trace, capacity, warmup_fraction=warmup_fraction)["results"]
                assert all(r[name]["hits"] <= r["belady"]["hits"] for name in POLICIES)


# ---------------------------------------------------------------------------------------------------------
# Synthetic traces and replay


def test_synthetic_trace_shape_and_determinism():
    t = synthetic_trace(50, 3, 16, 4, seed=7)
    assert len(t) == 50 and all(len(tok) == 3 for tok in t)
    assert all(len(set(layer)) == 4 and all(0 <= e < 16 for e in layer) for tok in t for layer in tok)
    assert t == synthetic_trace(50, 3, 16, 4, seed=7) and t != synthetic_trace(50, 3, 16, 4, seed=8)
    assert accesses(t)[:4] == [(0, e) for e in t[0][0]]
    assert len(accesses(t)) == 50 * 3 * 4
    assert synthetic_trace(0, 2, 4, 1) == []
    with pytest.raises(ValueError, match="top_k"):
        synthetic_trace(5, 2, 4, 5)
    with pytest.raises(ValueError, match="zipf_s"):
        synthetic_trace(5, 2, 4, 2, zipf_s=-1)


def test_skewed_trace_lfu_beats_lru():
    """8 layers x 64 experts, top-6, Zipf(1) over 4 domains; scored after a 10% warm-up.

    Measured (this seed, 3000 tokens): 25%: lru 0.49, lfu 0.61 (1.24x, 0.81 of Belady 0.75), pinned 0.32;
    50%: lru 0.75, lfu 0.78, pinned 0.68, belady 0.90. LRU already does well when the cache holds a
    quarter of all experts of a trace this concentrated; the gap opens as the cache gets smaller.
    """
    trace = synthetic_trace(3000, 8, 64, 6, seed=0)
    total = 8 * 64
    for frac, min_vs_lru in ((0.25, 1.15), (0.5, 1.0)):
        result = replay(trace, int(total * frac))
        print(f"\nskewed 8x64 top-6 at {frac:.0%}:\n" + format_replay(result))
        r = result["results"]
        assert r["lfu"]["vs_lru"] >= min_vs_lru
        assert r["lfu"]["vs_belady"] >= 0.75
        assert r["belady"]["hit_rate"] >= max(r[name]["hit_rate"] for name in POLICIES)


def test_small_cache_lfu_gap_grows():
    """8 layers x 256 experts (V4-Flash's expert count), cache 5% of experts: measured lru 0.27,
    lfu 0.41 (1.5x), belady 0.54."""
    trace = synthetic_trace(1500, 8, 256, 6, seed=0)
    result = replay(trace, int(8 * 256 * 0.05), policies=("lru", "lfu"))
    print("\nskewed 8x256 top-6 at 5%:\n" + format_replay(result))
    assert result["results"]["lfu"]["vs_lru"] >= 1.35


def test_uniform_trace_no_policy_wins():
    """Uniform routing has nothing to learn: every online policy sits near capacity / total (a bit
    under for LRU: a token's k experts in a layer are distinct, so the most recent keys are the least
    likely next). Belady's foresight still wins."""
    trace = uniform_trace(1000, 8, 64, 6, seed=0)
    for frac in (0.25, 0.5):
        result = replay(trace, int(512 * frac))
        print(f"\nuniform 8x64 top-6 at {frac:.0%}:\n" + format_replay(result))
        for name in POLICIES:
            assert abs(result["results"][name]["hit_rate"] - frac) < 0.07, name


def test_replay_bookkeeping():
    trace = synthetic_trace(100, 2, 8, 2, seed=3)
    result = replay(trace, 5, warmup_fraction=0.2)
    assert result["warmup_accesses"] == 20 * 2 * 2 and result["accesses"] == 80 * 2 * 2
    assert result["keys"] == len(set(accesses(trace)))
    for name, r in result["results"].items():
        assert r["hits"] + r["misses"] == result["accesses"], name
        assert r["hit_rate"] == pytest.approx(r["hits"] / result["accesses"])
    assert result["results"]["lru"]["vs_lru"] == pytest.approx(1.0)
    assert result["results"]["belady"]["vs_belady"] == pytest.approx(1.0)
    only = replay(trace, 5, policies=("lfu",), pinned_counts={(0, 1): 3})
    assert set(only["results"]) == {"lfu", "belady"} and only["results"]["lfu"]["vs_lru"] is None
    with pytest.raises(ValueError, match="unknown cache policy"):
        replay(trace, 5, policies=("mru",))


def test_replay_pinned_counts_are_used():
    trace = [[[0, 1]], [[2, 3]], [[0, 4]], [[0, 5]]]
    result = replay(trace, 2, policies=("pinned",), pinned_counts={(0, 0): 9}, warmup_fraction=0.0,
                    policy_kw={"pinned": {"pin_fraction": 0.5}})
    assert result["results"]["pinned"]["hits"] == 2  # (0, 0) stays pinned through (0, 2) .. (0, 5)


# ---------------------------------------------------------------------------------------------------------
# JSONL traces


def test_trace_round_trip(tmp_path):
    trace = synthetic_trace(20, 3, 8, 2, seed=1)
    path = tmp_path / "trace.jsonl"
    write_trace(path, trace)
    assert read_trace(path) == trace
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"seq": 0, "pos": 0, "token": -1, "experts": trace[0]}
    write_trace(str(path), trace[:2], seqs=[4, 4], positions=[10, 11], token_ids=[7, 9])
    assert json.loads(path.read_text().splitlines()[1])["token"] == 9
    assert read_trace(str(path)) == trace[:2]
    with pytest.raises(ValueError, match="positions has 1 entries but there are 2 tokens"):
        write_trace(path, trace[:2], positions=[0])


@pytest.mark.parametrize("line, message", [
    ('{"seq": 0, "experts": [[1, 2], [3', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"seq": 0, "pos": 1}', "'experts' must be a list"),
    ('{"experts": [1, 2]}', "'experts' must be a list"),
    ('{"experts": [[1], [2, -1]]}', "layer 1 has expert ids"),
    ('{"experts": [[1], [true]]}', "layer 1 has expert ids"),
    ('{"experts": [[1.5], [2]]}', "layer 0 has expert ids"),
    ('{"seq": "a", "experts": [[1], [2]]}', "'seq' must be an int"),
    ('{"experts": [[1]]}', "token has 1 layers, earlier tokens have 2"),
])
def test_read_trace_malformed(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"seq": 0, "pos": 0, "token": 5, "experts": [[0, 1], [2, 3]]}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        read_trace(path)
    assert "bad.jsonl:3:" in str(info.value)
