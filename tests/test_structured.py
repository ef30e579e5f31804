"""Structured output: every token is masked to keep the text inside a grammar (llguidance), so what a
model writes parses and validates, even from a random model; and the server's response_format and
vLLM's guided_* fields reach it."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from moeflash.engine import LLMEngine, SamplingParams
from moeflash.structured import GrammarCompiler, GrammarError
from moeflash.tokenizer import ByteTokenizer
from moeflash.weights.build import build_tiny

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny("float32")
    tok = ByteTokenizer()
    return model, tok, GrammarCompiler(tok, model.config.vocab_size, model.config.eos_token_id)


def test_a_random_model_writes_valid_json_for_100_seeds(tiny):
    model, tok, comp = tiny
    grammar = comp.compile("json_schema", SCHEMA)
    eng = LLMEngine(model, tok, max_num_seqs=32)
    prompt = tok.encode("Describe a user as JSON:", add_bos=True)
    outs = eng.generate([prompt] * 100, [SamplingParams(max_tokens=400, temperature=1.0, seed=s, constraint=grammar)
                                         for s in range(100)])
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len({o.text for o in outs}) > 90  # sampled, not one answer forced


def test_regex_and_choice(tiny):
    model, tok, comp = tiny
    eng = LLMEngine(model, tok)
    prompt = tok.encode("x", add_bos=True)
    for seed in range(5):
        rx = eng.generate([prompt], SamplingParams(max_tokens=40, temperature=1.0, seed=seed,
                                                   constraint=comp.compile("regex", r"[A-Z]{3}-[0-9]{2,4}")))[0]
        assert re.fullmatch(r"[A-Z]{3}-[0-9]{2,4}", rx.text), rx.text
        ch = eng.generate([prompt], SamplingParams(max_tokens=20, temperature=1.0, seed=seed,
                                                   constraint=comp.compile("choice", ["yes", "no", "maybe"])))[0]
        assert ch.text in ("yes", "no", "maybe") and ch.finish_reason == "stop"


def test_greedy_under_a_grammar_takes_the_best_allowed_token(tiny):
    """The mask removes tokens; among those left the choice is the model's own."""
    model, tok, comp = tiny
    eng = LLMEngine(model, tok)
    prompt = tok.encode("pick", add_bos=True)
    free = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=20))[0]
    ranked = [t for t, _ in free.new_logprobs[0].top] if free.new_logprobs else []
    letters = [t for t in ranked if 97 <= t <= 99]  # bytes 'a', 'b', 'c'
    got = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0,
                                                constraint=comp.compile("regex", "[abc]")))[0]
    if letters:  # the best of a, b, c among the top 20
        assert got.token_ids[0] == letters[0]
    assert got.text in ("a", "b", "c")


@pytest.mark.parametrize("kind,spec,msg", [
    ("json_schema", {"type": "object", "if": {"type": "object"}}, "if"),
    ("json_schema", "not a schema", "must be an object"),
    ("regex", "", "non-empty"),
    ("regex", "a(b", ""),
    ("choice", [], "non-empty list"),
    ("nope", None, "unknown grammar kind"),
])
def test_unsupported_grammars_are_named(tiny, kind, spec, msg):
    with pytest.raises(GrammarError, match=re.escape(msg)):
        tiny[2].compile(kind, spec)


def test_smollm2_fills_a_schema(tmp_path):
    from moeflash.engine.load import load_model

    model, tok = load_model("smollm2", dtype="float32")
    comp = GrammarCompiler(tok, model.config.vocab_size, model.config.eos_token_id)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False,
              "x-guidance": {"whitespace_flexible": False}}
    eng = LLMEngine(model, tok)
    prompt = tok.encode("The capital of France as JSON with keys city and country: ", special=False)
    out = eng.generate([prompt], SamplingParams(max_tokens=40, temperature=0,
                                                constraint=comp.compile("json_schema", schema)))[0]
    value = json.loads(out.text)
    jsonschema.validate(value, schema)
    assert value["city"] == "Paris"
    # any JSON object (response_format json_object): a real model closes it
    obj = eng.generate([tok.encode("A JSON object describing a cat: ", special=False)],
                       SamplingParams(max_tokens=120, temperature=0, constraint=comp.compile("json_object")))[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)


# -- the server -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    from .server_util import RunningServer

    with RunningServer(build_tiny("float32"), ByteTokenizer(), "tiny", "deepseek_v4", max_model_len=1024) as s:
        yield s


def test_server_response_format_json_schema_through_the_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    schema = {k: v for k, v in SCHEMA.items() if k != "x-guidance"}
    for stream in (False, True):
        kw = dict(model="tiny", messages=[{"role": "user", "content": "a user, as JSON"}], max_tokens=400, seed=3,
                  response_format={"type": "json_schema", "json_schema": {"name": "user", "schema": schema,
                                                                          "strict": True}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        else:
            r = client.chat.completions.create(**kw)
            assert r.choices[0].finish_reason == "stop"
            text = r.choices[0].message.content
        jsonschema.validate(json.loads(text), schema)


def test_server_guided_choice_and_regex(server):
    import httpx

    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "Is it?", "max_tokens": 10, "n": 3, "temperature": 1.0, "seed": 1,
        "guided_choice": ["yes", "no"]}).json()
    assert {c["text"] for c in r["choices"]} <= {"yes", "no"} and len(r["choices"]) == 3
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "code?"}], "max_tokens": 12,
        "guided_regex": "[0-9]{4}"}).json()
    assert re.fullmatch("[0-9]{4}", r["choices"][0]["message"]["content"])


@pytest.mark.parametrize("body,param,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                         "if": {}}}}},
     "response_format.json_schema", ["if"]),
    ({"response_format": {"type": "yaml"}}, "response_format.type", ["yaml"]),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", ["not several"]),
    ({"guided_json": "{not json"}, "guided_json", ["not valid JSON"]),
    ({"guided_regex": "a(b"}, "guided_regex", []),
])
def test_server_refuses_grammars_it_cannot_enforce(server, body, param, words):
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    for w in words:
        assert w in err["message"]


def test_return_experts_reports_each_tokens_routing(server):
    """moeflash's return_experts: per generated token, per MoE layer, the experts of the forward row
    that produced it; the first equals a routing recorder's last prompt row for the same prompt."""
    import httpx

    import torch

    from moeflash.engine.experts import RoutingRecorder
    from moeflash.engine.forward import run_tokens

    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": [256, 72, 105], "max_tokens": 3, "temperature": 0, "return_experts": True}).json()
    experts = r["choices"][0]["experts"]
    assert len(experts) == 3 and all(len(tok) == 4 and all(len(ids) == 2 for ids in tok) for tok in experts)
    model = build_tiny("float32")
    rec = RoutingRecorder(model)
    run_tokens(model, torch.tensor([256, 72, 105]), [model.new_seq_state()], [3])
    assert experts[0] == rec.take()[-1]


def test_return_experts_on_a_dense_model_is_refused():
    from moeflash.engine import LLMEngine
    from tests.test_llama import CONFIGS, build

    model = build(CONFIGS["tied-gqa"])[1]
    with pytest.raises(ValueError, match="needs a MoE model"):
        LLMEngine(model).add_request([1, 2, 3], SamplingParams(max_tokens=2, return_experts=True))
