"""Prefix cache (RAM tier): a prompt that starts like an earlier one reuses its saved state, and its
output is exactly what it is without the cache, for V4 (window ring, compressors, indexer) and llama."""

from __future__ import annotations

import pytest
import torch

from moeflash.engine import LLMEngine, SamplingParams
from moeflash.engine.prefix_cache import PrefixCache
from moeflash.tokenizer import ByteTokenizer
from moeflash.weights.build import build_tiny

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("float32")


def run(model, prompts, cache=None, budget=512, hints=None, params=GREEDY):
    eng = LLMEngine(model, max_num_batched_tokens=budget, prefix_cache=cache)
    outs = []
    for i, p in enumerate(prompts):  # one after the other: each finds what the earlier ones saved
        eng.add_request(p, params, f"r{i}", cache_hints=(hints or {}).get(i, ()))
        while eng.has_unfinished():
            for out in eng.step():
                if out.finished:
                    outs.append(out)
    return outs, eng


def misses(model, prompts, budget=512, hints=None):
    """Each prompt through an engine whose cache is empty: the same prefill chunks as with the cache
    (a saved boundary ends a chunk), so a hit must give exactly these tokens. (Against an engine with no
    cache at all the logits agree within fp32 noise; on the tiny random model's near-ties a greedy token
    can then flip.)"""
    out = []
    for i, p in enumerate(prompts):
        cache = PrefixCache(model.prefix_block_tokens, 1 << 30)
        out += run(model, [p], cache, budget, {0: (hints or {}).get(i, ())})[0]
    return out


def prompts_sharing(vocab, shared: int, seed=0):
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(0, vocab - 8, (shared,), generator=g).tolist()
    return [doc + torch.randint(0, vocab - 8, (n,), generator=g).tolist() for n in (9, 14, 5)]


@pytest.mark.parametrize("budget", [512, 5])
@pytest.mark.parametrize("shared", [40, 43])  # ends on a block boundary (8) / mid-block
def test_v4_hits_are_exact(tiny, budget, shared):
    block = tiny.prefix_block_tokens
    assert block == 8
    prompts = prompts_sharing(tiny.config.vocab_size, shared)
    hints = {i: [shared] for i in range(3)}  # e.g. where the question after a document starts
    ref = misses(tiny, prompts, budget, hints)
    cache = PrefixCache(block, 1 << 30)
    got, eng = run(tiny, prompts, cache, budget, hints)
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.new_logprobs or [], b.new_logprobs or []):
            assert abs(la.logprob - lb.logprob) < 1e-5
    hit = shared // block * block
    assert [o.cached_tokens for o in got] == [0, hit, hit]
    assert eng.stats["prompt_tokens_cached"] == 2 * hit
    assert cache.stats["hits"] == 2 and len(cache) >= 2


def test_v4_chat_turns_extend_the_whole_previous_prompt(tiny):
    """Turn 2's prompt starts with all of turn 1's: the save at turn 1's last boundary hits."""
    vocab = tiny.config.vocab_size
    p1 = prompts_sharing(vocab, 30)[0]
    p2 = p1 + [7, 8, 9, 10, 11, 12]
    cache = PrefixCache(tiny.prefix_block_tokens, 1 << 30)
    ref = misses(tiny, [p1, p2])
    got, _ = run(tiny, [p1, p2], cache)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert got[1].cached_tokens == (len(p1) - 1) // 8 * 8


def test_llama_hits_are_exact():
    from tests.test_llama import CONFIGS, build

    cfg = CONFIGS[sorted(CONFIGS)[0]]
    _, model = build(cfg)
    prompts = prompts_sharing(cfg.vocab_size, 37)
    ref = misses(model, prompts, 7, {i: [37] for i in range(3)})
    cache = PrefixCache(model.prefix_block_tokens, 1 << 30)
    got, _ = run(model, prompts, cache, 7, {i: [37] for i in range(3)})
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert [o.cached_tokens for o in got] == [0, 32, 32]


@pytest.mark.parametrize("arch", ["v4", "llama"])
def test_a_finished_reply_leaves_its_state_for_the_next_turn(tiny, arch):
    """Turn 2 = turn 1's prompt + its reply + a new message: it starts from the state turn 1 left at its
    reply's last block boundary (V4: a copy taken on the way; llama: the KV cache rewound and handed
    over), and its output is what it is without any cache (the reply's state was built by decode steps,
    the cache-less run prefills it: the same within fp32 noise)."""
    if arch == "v4":
        model = tiny
    else:
        from tests.test_llama import CONFIGS, build

        model = build(CONFIGS[sorted(CONFIGS)[0]])[1]
    block, vocab = model.prefix_block_tokens, model.config.vocab_size
    reply = SamplingParams(max_tokens=3 * block + 3, temperature=0, ignore_eos=True)
    p1 = prompts_sharing(vocab, 2 * block + 5)[0]
    cache = PrefixCache(block, 1 << 30)
    (first,), _ = run(model, [p1], cache, params=reply)
    p2 = p1 + first.token_ids + [5, 6, 7]
    (got,), _ = run(model, [p2], cache)
    (ref,), _ = run(model, [p2], None)
    left = (len(p1) + len(first.token_ids) - 1) // block * block  # the last token generated is not fed
    assert left > len(p1) and got.cached_tokens == left
    assert got.token_ids == ref.token_ids
    for a, b in zip(got.new_logprobs, ref.new_logprobs):
        assert abs(a.logprob - b.logprob) < 1e-4
    # a reply too short to add an eighth to what the sequence started from leaves nothing
    small = PrefixCache(block, 1 << 30)
    run(model, [p1], small, params=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert small.stats["stored"] == len(small) and all(e.tokens <= len(p1) for e in small._entries.values())


def test_budget_evicts_least_recently_used(tiny):
    cache = PrefixCache(tiny.prefix_block_tokens, 1 << 30)
    vocab = tiny.config.vocab_size
    a, b = prompts_sharing(vocab, 24, seed=1)[0], prompts_sharing(vocab, 24, seed=2)[0]
    run(tiny, [a, b], cache)
    one = cache.bytes // len(cache)
    small = PrefixCache(tiny.prefix_block_tokens, one + one // 2)  # room for one saved state
    outs, _ = run(tiny, [a, b], small)
    assert len(small) == 1 and small.stats["evictions"] >= 1
    b_reply = b + outs[1].token_ids  # b's reply left the last state saved
    assert small.lookup(a + outs[0].token_ids + [1]) is None and small.lookup(b + [1]) is None
    assert small.lookup(b_reply + [1]) is not None
    assert small.bytes <= small.budget_bytes


def test_bad_inputs():
    with pytest.raises(ValueError):
        PrefixCache(0, 10)
    with pytest.raises(ValueError):
        PrefixCache(8, -1)


def test_server_bills_what_the_cache_served(tiny):
    """Two chat requests about one document: the second's usage reports the reused tokens as cache
    hits, priced at --price-cached, with the same answer as without the cache; /metrics counts them."""
    import httpx

    from tests.server_util import RunningServer

    tok = ByteTokenizer()
    doc = "the quick brown fox jumps over the lazy dog; " * 3
    def ask(server, q):
        body = {"model": "tiny", "messages": [{"role": "system", "content": doc}, {"role": "user", "content": q}],
                "max_tokens": 6, "temperature": 0}
        return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()

    with RunningServer(tiny, tok, "tiny", "deepseek_v4") as plain:
        ref = [ask(plain, q)["choices"][0]["message"]["content"] for q in ("who jumps?", "who is lazy?")]
    cache = PrefixCache(tiny.prefix_block_tokens, 1 << 30)
    with RunningServer(tiny, tok, "tiny", "deepseek_v4", prefix_cache=cache, price_input=1.0,
                       price_cached=0.1) as s:
        first, second = ask(s, "who jumps?"), ask(s, "who is lazy?")
        metrics = httpx.get(s.url + "/metrics").text
    assert [first["choices"][0]["message"]["content"], second["choices"][0]["message"]["content"]] == ref
    assert first["usage"]["prompt_cache_hit_tokens"] == 0
    u = second["usage"]
    start = 1 + len(doc.encode()) + 1  # BOS, the system text, <｜User｜>: where the question starts
    assert u["prompt_cache_hit_tokens"] == u["prompt_tokens_details"]["cached_tokens"] == start // 8 * 8
    assert u["prompt_cache_miss_tokens"] == u["prompt_tokens"] - u["prompt_cache_hit_tokens"]
    hit, miss = u["prompt_cache_hit_tokens"], u["prompt_cache_miss_tokens"]
    assert u["cost"] == pytest.approx((miss * 1.0 + hit * 0.1) / 1e6, abs=1e-9)
    assert f'moeflash:prefix_cache_hit_tokens_total{{model_name="tiny",tier="ram"}} {float(hit)}' in metrics


# -- the disk tier ----------------------------------------------------------------------------------
def disk_cache(model, path, budget=1 << 30):
    return PrefixCache.for_model(model, 1 << 30, path, budget)


def saved_at(directory, tokens: int):
    """The state file saved after `tokens` tokens."""
    from safetensors import safe_open

    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            if st.metadata()["tokens"] == str(tokens):
                return f
    raise AssertionError(f"no state saved at {tokens} tokens in {directory}")


@pytest.mark.parametrize("arch", ["v4", "llama"])
def test_disk_tier_survives_a_restart_and_is_exact(tiny, tmp_path, arch):
    if arch == "v4":
        model = tiny
    else:
        from tests.test_llama import CONFIGS, build

        model = build(CONFIGS[sorted(CONFIGS)[0]])[1]
    prompts = prompts_sharing(model.config.vocab_size, 40)
    hints = {i: [40] for i in range(3)}
    ref = misses(model, prompts, hints=hints)
    first = disk_cache(model, tmp_path)
    run(model, prompts[:1], first, hints=hints)
    first.disk.flush()
    assert len(list(tmp_path.glob("*.safetensors"))) >= 1 and not list(tmp_path.glob("*.part"))
    restarted = disk_cache(model, tmp_path)  # a new process: empty RAM, the same directory
    got, _ = run(model, prompts[1:], restarted, hints={0: [40], 1: [40]})
    assert [o.token_ids for o in got] == [o.token_ids for o in ref[1:]]
    assert got[0].cached_tokens == 40 // model.prefix_block_tokens * model.prefix_block_tokens
    assert restarted.stats["disk_hits"] == 1 and restarted.disk.stats["read"] == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "garbage", "part"])
def test_bad_files_are_misses_and_removed(tiny, tmp_path, damage):
    prompts = prompts_sharing(tiny.config.vocab_size, 40)
    ref = misses(tiny, prompts, hints={i: [40] for i in range(3)})
    first = disk_cache(tiny, tmp_path)
    run(tiny, prompts[:1], first, hints={0: [40]})
    first.disk.flush()
    victim = saved_at(tmp_path, 40)  # the document's state, which the next prompts look up
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF  # inside the tensor bytes: the checksum catches it
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "garbage":
        victim.write_bytes(b"not a safetensors file at all")
    elif damage == "part":  # a crash mid-write leaves a .part: never trusted, removed at start
        (tmp_path / (victim.name + ".part")).write_bytes(bytes(data[:100]))
    damaged = victim.read_bytes()
    model = tiny
    if damage == "foreign":  # intact files, read by a model with other weights
        model = build_tiny("float32")
        with torch.no_grad():
            model.embed.weight.add_(1.0)
        restarted = disk_cache(model, tmp_path)
        assert restarted.lookup(prompts[1]) is None
        assert restarted.disk.stats["bad_files"] >= 1 and not victim.exists()
        return
    restarted = disk_cache(model, tmp_path)
    got, _ = run(model, prompts[1:], restarted, hints={0: [40], 1: [40]})
    assert [o.token_ids for o in got] == [o.token_ids for o in ref[1:]]  # never wrong output
    if damage == "part":
        restarted.disk.flush()  # the new saves are written in the background under .part names too
        assert not list(tmp_path.glob("*.part")) and got[0].cached_tokens > 0
    else:
        restarted.disk.flush()  # the prefill saved the same prefix again: a good file replaced the bad one
        assert restarted.disk.stats["bad_files"] >= 1 and got[0].cached_tokens == 0
        assert not victim.exists() or victim.read_bytes() != damaged


def test_disk_budget_evicts_oldest_files(tiny, tmp_path):
    vocab = tiny.config.vocab_size
    cache = disk_cache(tiny, tmp_path)
    run(tiny, [prompts_sharing(vocab, 24, seed=1)[0]], cache, params=SamplingParams(max_tokens=1))
    cache.disk.flush()
    one = cache.disk.bytes
    small = disk_cache(tiny, tmp_path / "small", budget=one + one // 2)
    for seed in (1, 2, 3):  # one token each: no reply long enough to leave a second state
        run(tiny, [prompts_sharing(vocab, 24, seed=seed)[0]], small, params=SamplingParams(max_tokens=1))
    small.disk.flush()
    assert len(list((tmp_path / "small").glob("*.safetensors"))) == 1 and small.disk.stats["evictions"] == 2


def test_marks_close_to_the_reused_prefix_are_not_saved_again():
    cache = PrefixCache(16, 1 << 30)
    assert cache.worth_saving([8000, 8016], 0) == [8000]          # 16 tokens past 8000: not worth a copy
    assert cache.worth_saving([8016], 8000) == []                  # a question after a cached document
    assert cache.worth_saving([496, 608], 0) == [496, 608]         # chat turns: each adds enough
    assert cache.worth_saving([32, 48], 0) == [32, 48]
