"""OpenAI tool calls through the official client, streaming and not: tool_choice "required" and a
named function force a DSML call by constrained decoding (so even the random tiny model calls, with
arguments valid for the schema), the reply comes back as message.tool_calls with finish_reason
"tool_calls", and the conversation goes on with the call and its result in the history."""

from __future__ import annotations

import json

import jsonschema
import pytest

from moeflash.tokenizer import ByteTokenizer

from .server_util import RunningServer

openai = pytest.importorskip("openai", reason="the openai client (test extra) talks to the server")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["C", "F"]}}, "required": ["city", "days", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 16}},
                                                        "required": ["zone"]}}}
MSGS = [{"role": "user", "content": "Weather in Paris?"}]


def long_tiny():
    """The tiny model with room for the tools section (its byte tokenizer spends a token per byte)."""
    from moeflash.config import ModelConfig
    from moeflash.model.init import randomize_
    from moeflash.model.v4 import Transformer

    cfg = ModelConfig.preset("tiny").replace(max_position_embeddings=4096)
    return randomize_(Transformer(cfg), seed=0).eval()


@pytest.fixture(scope="module")
def client():
    with RunningServer(long_tiny(), ByteTokenizer(), "tiny", "deepseek_v4", max_model_len=4096) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def check_call(call, tool):
    assert call.type == "function" and call.function.name == tool["function"]["name"] and call.id
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_calls_non_streaming(client, choice):
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER, TIME], tool_choice=choice,
                                           max_tokens=600, seed=seed, temperature=1.0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        for call in c.message.tool_calls:
            check_call(call, WEATHER if call.function.name == "get_weather" else TIME)
        if isinstance(choice, dict):
            assert {call.function.name for call in c.message.tool_calls} == {"get_time"}


def test_forced_call_streaming_assembles_like_openai(client):
    stream = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=600, seed=5, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = tc.id or slot["id"]
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_the_conversation_goes_on_with_the_result(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], tool_choice="required",
                                       max_tokens=600, seed=1)
    call = r.choices[0].message.tool_calls[0]
    history = MSGS + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": "18C, sunny"}]
    r2 = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=8, seed=1)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt
    # tool_choice "none": the tools are not shown and nothing is parsed as a call
    r3 = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], tool_choice="none",
                                        max_tokens=8, seed=1)
    assert r3.choices[0].message.tool_calls is None and r3.usage.prompt_tokens < r2.usage.prompt_tokens


def test_errors(client):
    with pytest.raises(openai.BadRequestError, match="tool message must follow"):
        client.chat.completions.create(model="tiny", messages=MSGS + [{"role": "tool", "tool_call_id": "x",
                                                                       "content": "r"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="cannot be combined"):
        client.chat.completions.create(model="tiny", messages=MSGS, tools=[WEATHER], tool_choice="required",
                                       response_format={"type": "json_object"}, max_tokens=2)


# -- Hermes-style templates (Qwen 2.5 / 3, Hermes, SmolLM3): <tool_call> JSON blocks -----------------
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' or (m.role == 'assistant' and not m.tool_calls) %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{% if m.content %}{{ m.content }}
{% endif %}{%- for tc in m.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


class HermesTokenizer(ByteTokenizer):
    chat_template = HERMES_TEMPLATE


def test_hermes_encoding_and_parsing():
    from moeflash.server.chat import make_chat_encoder
    from moeflash.server.hermes import HermesCallParser

    enc = make_chat_encoder(HermesTokenizer(), "template")
    assert enc.supports_tools and enc.tool_format == "hermes"
    msgs = MSGS + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "18C"}]
    text = enc.encode(msgs, tools=[WEATHER["function"]])
    assert '{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18C\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    out = 'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    for size in (1, 4, 1000):
        p, content, calls = HermesCallParser(), "", []
        for i in range(0, len(out), size):
            c, new = p.push(out[i:i + size])
            content, calls = content + c, calls + new
        content += p.flush()
        assert content == "Sure." and [(c.name, c.arguments) for c in calls] == [("get_time", {"zone": "UTC"})]


def test_hermes_forced_call_through_the_openai_client():
    from moeflash.model.init import randomize_
    from moeflash.model.llama import Llama
    from tests.test_llama import CONFIGS

    model = randomize_(Llama(CONFIGS["tied-gqa"].replace(max_position_embeddings=2048)), seed=0, std=0.02).eval()
    with RunningServer(model, HermesTokenizer(), "llama", "template", max_model_len=2048) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        tool = {"type": "function", "function": {"name": "pick", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}}}
        r = c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "n?"}], tools=[tool],
                                      tool_choice="required", parallel_tool_calls=False, max_tokens=120, seed=0)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
        check_call(ch.message.tool_calls[0], tool)
