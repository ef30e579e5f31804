"""LLMEngine: continuous batching gives the same tokens as running alone, abort isolation, stop
conditions, streaming, seeded sampling, and no state left behind."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from moeflash.engine import LLMEngine, SamplingParams
from moeflash.tokenizer import ByteTokenizer
from moeflash.weights.build import build_tiny

GREEDY = dict(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_tiny("float32")


def engine(model, **kw):
    return LLMEngine(model, ByteTokenizer(), **kw)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def alone(model, prompt, **params):
    return engine(model).generate([prompt], SamplingParams(**params))[0]


def test_batched_with_late_joiners_equals_alone(model):
    ps = prompts(4)
    ref = [alone(model, p, **GREEDY).token_ids for p in ps]
    eng = engine(model, max_num_batched_tokens=7)  # forces chunked prefill interleaved with decode
    rids = [eng.add_request(ps[0], SamplingParams(**GREEDY))]
    done = {}
    joined = 1
    while eng.has_unfinished() or joined < len(ps):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        if joined < len(ps) and eng.stats["steps"] % 3 == 0:  # a new request every few steps
            rids.append(eng.add_request(ps[joined], SamplingParams(**GREEDY)))
            joined += 1
    assert [done[r].token_ids for r in rids] == ref
    assert all(done[r].finish_reason in ("length", "stop") for r in rids)


def test_generate_batch_equals_alone(model):
    ps = prompts(5, seed=1)
    ref = [alone(model, p, **GREEDY).token_ids for p in ps]
    outs = engine(model, max_num_seqs=3).generate(ps, SamplingParams(**GREEDY))
    assert [o.token_ids for o in outs] == ref


def test_abort_leaves_others_unchanged(model):
    ps = prompts(3, seed=2)
    ref = [alone(model, p, **GREEDY).token_ids for p in ps]
    eng = engine(model)
    rids = [eng.add_request(p, SamplingParams(**GREEDY)) for p in ps]
    done = {}
    for _ in range(5):
        for out in eng.step():
            done[out.request_id] = out
    assert eng.abort(rids[1]) and not eng.abort(rids[1])
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert done[rids[0]].token_ids == ref[0] and done[rids[2]].token_ids == ref[2]
    assert eng.num_states() == 0


def test_seeded_sampling_reproducible_in_any_batch(model):
    p = prompts(1, seed=3)[0]
    sp = dict(temperature=1.0, top_p=0.95, seed=1234, max_tokens=20)
    a = alone(model, p, **sp).token_ids
    eng = engine(model)
    outs = eng.generate([prompts(1, seed=9)[0], p, p],
                        [SamplingParams(temperature=1.0, max_tokens=20), SamplingParams(**sp),
                         SamplingParams(**dict(sp, seed=99))])
    assert outs[1].token_ids == a and outs[2].token_ids != a


def test_top_k_one_equals_greedy(model):
    p = prompts(1, seed=4)[0]
    greedy = alone(model, p, **GREEDY).token_ids
    assert alone(model, p, temperature=1.5, top_k=1, seed=5, max_tokens=24).token_ids == greedy


def test_stop_string_never_emitted(model):
    p = prompts(1, seed=5)[0]
    full = alone(model, p, temperature=0.0, max_tokens=40)
    text = full.text
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 2)
                if "\ufffd" not in text[i:i + 2])
    out = alone(model, p, temperature=0.0, max_tokens=40, stop=[stop])
    assert stop not in out.text
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert text.startswith(out.text) and text[len(out.text):].startswith(stop)


def test_stop_token_ids_and_max_tokens(model):
    p = prompts(1, seed=6)[0]
    full = alone(model, p, temperature=0.0, max_tokens=12).token_ids
    out = alone(model, p, temperature=0.0, max_tokens=12, stop_token_ids=[full[4]])
    first = full.index(full[4])
    assert out.token_ids == full[:first + 1] and out.finish_reason == "stop" and out.stop_reason == full[4]
    short = alone(model, p, temperature=0.0, max_tokens=3)
    assert short.token_ids == full[:3] and short.finish_reason == "length"


def test_eos_and_ignore_eos(model):
    p = prompts(1, seed=7)[0]
    full = alone(model, p, temperature=0.0, max_tokens=10).token_ids
    eng = engine(model)
    eng.config = model.config.replace(eos_token_id=full[2])  # pretend that token is end-of-sentence
    out = eng.generate([p], SamplingParams(temperature=0.0, max_tokens=10))[0]
    assert out.token_ids == full[: full.index(full[2]) + 1] and out.finish_reason == "stop"
    out = eng.generate([p], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    assert out.token_ids == full and out.finish_reason == "length"


def test_logprobs_returned(model):
    out = alone(model, prompts(1, seed=8)[0], temperature=0.0, max_tokens=5, logprobs=3)
    eng = engine(model)
    outs = list(eng.stream(prompts(1, seed=8)[0], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3)))
    lps = [lp for o in outs for lp in o.new_logprobs]
    assert len(lps) == 5 and all(len(lp.top) == 3 for lp in lps)
    assert [lp.token_id for lp in lps] == out.token_ids
    assert all(lp.top[0][0] == lp.token_id and abs(lp.top[0][1] - lp.logprob) < 1e-6 for lp in lps)


def test_stream_deltas_add_up_and_close_aborts(model):
    p = prompts(1, seed=10)[0]
    ref = alone(model, p, temperature=0.0, max_tokens=16)
    eng = engine(model)
    other = eng.add_request(prompts(1, seed=11)[0], SamplingParams(**GREEDY))
    deltas = list(eng.stream(p, SamplingParams(temperature=0.0, max_tokens=16)))
    assert "".join(d.new_text for d in deltas) == ref.text
    assert [t for d in deltas for t in d.new_token_ids] == ref.token_ids
    assert deltas[-1].finished and sum(d.finished for d in deltas) == 1
    it = eng.stream(p, SamplingParams(temperature=0.0, max_tokens=16))
    next(it)
    it.close()  # the consumer went away: the request is aborted and its state freed
    while eng.has_unfinished():
        eng.step()
    assert eng.num_states() == 0 and other not in eng.seqs


def test_no_state_leak_over_100_requests(model):
    eng = engine(model, max_num_seqs=8, max_num_batched_tokens=64)
    baseline = eng.state_bytes()
    refs = []
    ps = prompts(100, seed=12)
    for i, p in enumerate(ps):
        eng.add_request(p, SamplingParams(temperature=0.7, seed=i, max_tokens=1 + i % 7))
    peak = 0
    while eng.has_unfinished():
        eng.step()
        peak = max(peak, eng.state_bytes())
        refs += [weakref.ref(s.state) for s in eng.scheduler.running if s.state is not None]
    gc.collect()
    assert peak > 0 and eng.state_bytes() == baseline == 0
    assert eng.num_states() == 0 and not eng.seqs
    assert all(r() is None for r in refs)


def test_bad_requests(model):
    eng = engine(model, max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request([1, 5000], SamplingParams())
    with pytest.raises(ValueError, match="context length"):
        eng.add_request([1] * 60, SamplingParams(max_tokens=10))
    eng.add_request([1], SamplingParams(), request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1], SamplingParams(), request_id="a")
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="tokenizer"):
        LLMEngine(model).add_request([1], SamplingParams(stop=["x"]))


@pytest.mark.parametrize("budget", [512, 7])
def test_identical_prompts_prefill_once_and_keep_their_tokens(budget):
    """n choices of one prompt: the first prefills, the others copy its state one token before the end
    and feed only the last token; every choice's tokens equal its solo run (greedy and seeded)."""
    from moeflash.tokenizer import ByteTokenizer
    from moeflash.weights.build import build_tiny

    model, tok = build_tiny("float32"), ByteTokenizer()
    prompt = tok.encode("a prompt long enough to span several chunks")
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)] + [
        SamplingParams(max_tokens=10, temperature=0.9, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    solo = [LLMEngine(model, tok).generate([prompt], p)[0].token_ids for p in params]
    eng = LLMEngine(model, tok, max_num_batched_tokens=budget)
    outs = eng.generate([prompt] * 4, params)
    assert [o.token_ids for o in outs] == solo
    assert eng.stats["prompt_tokens_shared"] == 3 * (len(prompt) - 1)
    assert eng.stats["prompt_tokens"] == len(prompt) + 3  # the prompt once, then each follower's last token
    # a follower whose leader is aborted before it gets there prefills alone, with the same tokens
    eng = LLMEngine(model, tok, max_num_batched_tokens=7)
    a = eng.add_request(prompt, params[0])
    b = eng.add_request(prompt, params[1])
    eng.step()
    eng.abort(a)
    final = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
    assert final[b].token_ids == solo[1] and eng.stats["prompt_tokens_shared"] == 0
