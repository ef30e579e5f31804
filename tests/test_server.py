"""The HTTP server on the tiny V4 model: the official `openai` client, streaming, concurrency,
disconnects, metrics and every bad-input case (status code and OpenAI error body)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from moeflash.engine import LLMEngine, SamplingParams
from moeflash.tokenizer import ByteTokenizer
from moeflash.weights.build import build_tiny

from .server_util import RunningServer

openai = pytest.importorskip("openai", reason="the openai client (test extra) talks to the server")

MODEL = "tiny"
KEY = "sk-test"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("float32"), ByteTokenizer()


@pytest.fixture(scope="module")
def server(tiny):
    with RunningServer(*tiny, MODEL, "deepseek_v4", price_input=0.14, price_output=0.28,
                       price_cached=0.028) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def alone(model, tok, prompt_ids, **kw):
    """The same request run by itself through a fresh engine: the reference output."""
    return LLMEngine(model, tok).generate([prompt_ids], SamplingParams(**kw))[0]


# -- the openai client ------------------------------------------------------------------------------
def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion(client, tiny):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
    ref = alone(*tiny, tiny[1].encode("Hello", add_bos=True), max_tokens=8, temperature=0.0)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (6, len(ref.token_ids), 6 + len(ref.token_ids))
    extra = u.model_extra
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == 0
    assert extra["cost"] == pytest.approx((6 * 0.14 + len(ref.token_ids) * 0.28) / 1e6)


def test_chat(client, tiny):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=12, temperature=0)
    prompt = tiny[1].encode("<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>")
    ref = alone(*tiny, prompt, max_tokens=12, temperature=0.0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(prompt)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"


def test_streaming_chat_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=12, temperature=0)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[0].choices[0].delta.role == "assistant"


def test_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


def test_n_and_seeds(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me"}], max_tokens=16, temperature=1.0)
    a = client.chat.completions.create(n=2, seed=7, **kw)
    b = client.chat.completions.create(n=2, seed=7, **kw)
    c = client.chat.completions.create(n=2, seed=8, **kw)
    assert [ch.index for ch in a.choices] == [0, 1]
    texts = [ch.message.content for ch in a.choices]
    assert texts == [ch.message.content for ch in b.choices]  # same seed, same choices
    assert texts[0] != texts[1]                                # choices differ from each other
    assert texts != [ch.message.content for ch in c.choices]
    assert a.usage.prompt_tokens == b.usage.prompt_tokens  # the prompt counts once, not once per choice
    assert a.usage.completion_tokens >= 2


def test_stop_strings(client):
    free = client.completions.create(model=MODEL, prompt="abc", max_tokens=24, temperature=0).choices[0].text
    stop = free[5:7]
    assert stop and stop in free
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == free[: free.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    c = client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == len(c.choices[0].logprobs.token_logprobs)


# -- concurrency and disconnects --------------------------------------------------------------------
def test_32_concurrent_streams_equal_running_alone(server, tiny):
    prompts = [f"request {i}: " + "x" * (i % 7) for i in range(32)]

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, p) for p in prompts))

    texts = asyncio.run(main())
    model, tok = tiny
    for p, text in zip(prompts, texts):
        assert text == alone(model, tok, tok.encode(p, add_bos=True), max_tokens=12, temperature=0.0).text


def wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = server.engine.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["state_bytes"] == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {server.engine.stats()}")


def test_disconnect_mid_stream_frees_state(server):
    wait_idle(server)
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        it = r.iter_lines()
        got = [next(it) for _ in range(6)]
        assert any(g.startswith("data: ") for g in got)
        assert server.engine.stats()["state_bytes"] > 0
    wait_idle(server)
    assert server.engine.engine.num_states() == 0


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="m", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("moeflash:num_requests_running", "moeflash:num_requests_waiting", "moeflash:prompt_tokens_total",
                 "moeflash:generation_tokens_total", "moeflash:time_to_first_token_seconds_bucket",
                 "moeflash:inter_token_latency_seconds_bucket", "moeflash:e2e_request_latency_seconds_count",
                 "moeflash:state_memory_bytes", "moeflash:routed_experts_per_token_bucket",
                 "moeflash:routed_experts_read_total"):
        assert name in text, name
    gen = [ln for ln in text.splitlines() if ln.startswith("moeflash:generation_tokens_total")]
    assert float(gen[0].split()[-1]) > 0


# -- bad input --------------------------------------------------------------------------------------
def post(server, path, body=None, raw=None, headers=None):
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    data = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + path, content=data, headers=h, timeout=30)


def assert_error(r, status, *words, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], (w, err)
    if param is not None:
        assert err["param"] == param, err


CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body,param,words", [
    ({"model": MODEL}, "messages", ["required"]),
    ({"model": MODEL, "messages": []}, "messages", []),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", ["wizard"]),
    ({"model": MODEL, "messages": [{"role": "user"}]}, None, []),
    ({"model": MODEL, "messages": "hi"}, "messages", []),
    ({"model": MODEL, "messages": MSG, "max_tokens": 0}, "max_tokens", []),
    ({"model": MODEL, "messages": MSG, "max_tokens": -5}, "max_tokens", []),
    ({"model": MODEL, "messages": MSG, "max_tokens": "10"}, "max_tokens", []),
    ({"model": MODEL, "messages": MSG, "n": 0}, "n", []),
    ({"model": MODEL, "messages": MSG, "temperature": 2.5}, "temperature", []),
    ({"model": MODEL, "messages": MSG, "temperature": "hot"}, "temperature", []),
    ({"model": MODEL, "messages": MSG, "top_p": 1.5}, "top_p", []),
    ({"model": MODEL, "messages": MSG, "presence_penalty": 3}, "presence_penalty", []),
    ({"model": MODEL, "messages": MSG, "frequency_penalty": -2.5}, "frequency_penalty", []),
    ({"model": MODEL, "messages": MSG, "stream": "yes"}, "stream", []),
    ({"model": MODEL, "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop", ["at most 4"]),
    ({"model": MODEL, "messages": MSG, "tools": [{"type": "function"}]}, "tools[0]", ["must be"]),
    ({"model": MODEL, "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", ["not among the tools"]),
    ({"model": MODEL, "messages": MSG, "tool_choice": "required"}, "tool_choice", ["no tools"]),
    ({"model": MODEL, "messages": MSG, "max_tokens": 100000}, "messages", ["maximum context length"]),
    ({"model": 5, "messages": MSG}, "model", []),
])
def test_bad_chat_bodies(server, body, param, words):
    r = post(server, CHAT, body)
    assert_error(r, 400, *words, param=param)


def test_bad_completion_bodies(server):
    assert_error(post(server, "/v1/completions", {"model": MODEL}), 400, param="prompt")
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": ""}), 400, "empty")
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": [1, 99999]}), 400, "outside")
    assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 600}), 400,
                 "maximum context length", param="prompt")


def test_unknown_model_is_404(server):
    r = post(server, CHAT, {"model": "gpt-9", "messages": MSG})
    assert_error(r, 404, "gpt-9", param="model")
    assert r.json()["error"]["code"] == "model_not_found"


def test_malformed_bodies(server):
    assert_error(post(server, CHAT, raw=b'{"model": "tiny", "messages": ['), 400, "not valid JSON")
    assert_error(post(server, CHAT, raw=b'\xff\xfe{"model": 1}'), 400, "UTF-8")
    assert_error(post(server, CHAT, raw=b"[1, 2]"), 400, "JSON object")
    assert_error(post(server, CHAT, body={"model": MODEL, "messages": MSG}, headers={"Content-Type": "text/plain"}),
                 415, "application/json")
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}).encode()
    assert_error(post(server, CHAT, raw=big), 413, "limit")
    assert_error(httpx.get(server.url + "/v1/nope"), 404, "unknown endpoint")
    assert_error(httpx.get(server.url + CHAT), 405)


def test_engine_survives_bad_requests(client):
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3, temperature=0)
    assert r.choices[0].message.content is not None


def test_api_key(tiny):
    with RunningServer(*tiny, MODEL, "deepseek_v4", api_key=KEY) as s:
        assert_error(httpx.get(s.url + "/v1/models"), 401, "missing API key")
        assert_error(httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "incorrect")
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        assert ok.models.list().data[0].id == MODEL
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()


# -- DeepSeek thinking mode -------------------------------------------------------------------------
def test_thinking_mode_splits_reasoning_content(tiny):
    """Thinking mode: the prompt ends with <think>, and what the model writes before </think> comes back
    as `reasoning_content`, the rest as `content` (streamed as delta.reasoning_content / delta.content).
    A random tiny model never writes </think> by itself, so this copy gets a head row for </think>
    that outscores one of the tokens it does write."""
    import copy

    import torch

    model, tok = tiny
    end_think = tok.special_tokens["</think>"]
    prompt_text = "<｜begin▁of▁sentence｜><｜User｜>Why?<｜Assistant｜><think>"
    prompt = tok.encode(prompt_text)
    free = alone(model, tok, prompt, max_tokens=24, temperature=0.0, ignore_eos=True)
    m2 = copy.deepcopy(model)
    with torch.no_grad():
        m2.head.weight[end_think] = m2.head.weight[free.token_ids[6]] * 2
    raw = alone(m2, tok, prompt, max_tokens=24, temperature=0.0, ignore_eos=True, skip_special_tokens=False)
    assert "</think>" in raw.text and not raw.text.startswith("</think>")
    reasoning, _, content = raw.text.partition("</think>")
    with RunningServer(m2, tok, MODEL, "deepseek_v4") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "Why?"}], max_tokens=24, temperature=0,
                  extra_body={"thinking": {"type": "enabled"}, "ignore_eos": True})
        r = c.chat.completions.create(**kw)
        assert r.usage.prompt_tokens == len(prompt)
        msg = r.choices[0].message
        assert msg.model_extra["reasoning_content"] == reasoning
        assert msg.content == content
        chunks = list(c.chat.completions.create(stream=True, **kw))
        streamed_r = "".join(ch.choices[0].delta.model_extra.get("reasoning_content") or "" for ch in chunks)
        streamed_c = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        assert (streamed_r, streamed_c) == (reasoning, content)
        # disabled (the default): the prompt ends with </think> and everything is content
        off = c.chat.completions.create(**dict(kw, extra_body={"thinking": {"type": "disabled"}}))
        assert off.usage.prompt_tokens == len(tok.encode("<｜begin▁of▁sentence｜><｜User｜>Why?<｜Assistant｜></think>"))
        assert "reasoning_content" not in (off.choices[0].message.model_extra or {})
        bad = httpx.post(s.url + CHAT, json={"model": MODEL, "messages": MSG, "thinking": {"type": "maybe"}})
        assert_error(bad, 400, param="thinking.type")


def test_server_default_sampling_applies_when_a_request_gives_none(tiny):
    with RunningServer(*tiny, MODEL, "deepseek_v4", default_temperature=0.0) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        implicit = c.completions.create(model=MODEL, prompt="Hello", max_tokens=8)
        greedy = c.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
        assert implicit.choices[0].text == greedy.choices[0].text
        hot = [c.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=1.5, seed=i)
               .choices[0].text for i in range(3)]
        assert len(set(hot)) > 1  # an explicit temperature still wins
