"""Chat encodings of the server: message validation, DeepSeek-V4's prompt encoding, Jinja templates
(SmolLM2's ChatML), and the reasoning / content split of generated text."""

from __future__ import annotations

import subprocess
import sys
from typing import ClassVar

import pytest

from moeflash.server.chat import (
    ChatError,
    DeepSeekV4Encoder,
    NoTemplateEncoder,
    ReasoningParser,
    TemplateEncoder,
    make_chat_encoder,
    normalize_messages,
)
from moeflash.tokenizer import ByteTokenizer

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID, THINK_ID, THINK_END_ID = 256, 257, 258, 259, 260, 261


def user(text):
    return {"role": "user", "content": text}


def assistant(text, reasoning=None):
    m = {"role": "assistant", "content": text}
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    return m


def system(text):
    return {"role": "system", "content": text}


@pytest.fixture(scope="module")
def byte_tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def v4(byte_tok):
    return make_chat_encoder(byte_tok, "deepseek_v4")


# ---- messages ----

@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ("hello", "messages"),
    (None, "messages"),
    (["hello"], "messages[0]"),
    ([{"content": "hi"}], "messages[0].role"),
    ([user("hi"), {"role": "robot", "content": "x"}], "messages[1].role"),
    ([{"role": None, "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": {"text": "x"}}], "messages[0].content"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "assistant", "content": None}], "messages[0].content"),
    ([user("a"), {"role": "user", "content": [{"type": "text", "text": "x"},
                                              {"type": "image_url", "image_url": {"url": "u"}}]}],
     "messages[1].content[1].type"),
    ([{"role": "user", "content": [{"text": "x"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": ["x"]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ([user("hi"), {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}],
     "messages[1].tool_calls[0].function.arguments"),
    ([user("hi"), {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}],
     "messages[1].tool_calls[0].function"),
    ([user("hi"), {"role": "assistant", "content": None, "function_call": {"name": "f"}}],
     "messages[1].function_call"),
    ([user("hi"), {"role": "assistant", "content": "x", "reasoning_content": 1}], "messages[1].reasoning_content"),
])
def test_normalize_errors(messages, param):
    with pytest.raises(ChatError) as e:
        normalize_messages(messages)
    assert e.value.param == param
    assert e.value.message == str(e.value) and e.value.message
    assert isinstance(e.value, ValueError)


def test_normalize_messages_content():
    got = normalize_messages([
        {"role": "developer", "content": "Be brief.", "name": "ops"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
        {"role": "assistant", "content": "c", "reasoning_content": "r", "tool_calls": None},
        {"role": "user", "content": [], "reasoning_content": "ignored"},
        {"role": "assistant", "content": "d", "tool_calls": [], "reasoning_content": None},
        {"role": "tool", "content": "t", "tool_call_id": "c1"},
    ])
    assert got == [system("Be brief."), user("a\nb"), assistant("c", "r"), user(""), assistant("d"),
                   {"role": "tool", "content": "t", "tool_call_id": "c1"}]
    assert normalize_messages(got) == got  # idempotent


def test_error_message_names_the_part_type():
    with pytest.raises(ChatError, match="image_url"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}])
    with pytest.raises(ChatError, match="must be"):
        normalize_messages([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}])
    got = normalize_messages([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}])
    assert got == [{"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "f", "arguments": {"a": 1}}]}]
    assert normalize_messages(got) == got


# ---- DeepSeek-V4 (V4-SPEC section 7) ----

def test_v4_single_turn(v4, byte_tok):
    assert v4.supports_thinking
    chat = v4.encode([user("Hi")])
    assert chat == f"{BOS}{USER}Hi{ASSISTANT}</think>"
    assert v4.encode([user("Hi")], thinking=False) == chat
    assert byte_tok.encode(chat) == [BOS_ID, USER_ID, *b"Hi", ASSISTANT_ID, THINK_END_ID]
    think = v4.encode([user("Hi")], thinking=True)
    assert think == f"{BOS}{USER}Hi{ASSISTANT}<think>"
    assert byte_tok.encode(think) == [BOS_ID, USER_ID, *b"Hi", ASSISTANT_ID, THINK_ID]


def test_v4_system_and_history(v4, byte_tok):
    messages = [system("S"), user("A"), assistant("B", reasoning="R"), user("C")]
    history = f"{BOS}S{USER}A{ASSISTANT}</think>B{EOS}{USER}C{ASSISTANT}"
    assert v4.encode(messages) == history + "</think>"
    assert v4.encode(messages, thinking=True) == history + "<think>"  # earlier reasoning dropped
    ids = byte_tok.encode(history + "<think>")
    assert ids == [BOS_ID, ord("S"), USER_ID, ord("A"), ASSISTANT_ID, THINK_END_ID, ord("B"), EOS_ID,
                   USER_ID, ord("C"), ASSISTANT_ID, THINK_ID]


def test_v4_message_order_as_deepseek_renders_it(v4):
    # system messages in place, nothing between them; developer is a system message here
    msgs = [system("S1"), {"role": "developer", "content": "S2"}, user("A"), assistant("B"),
            system("S3"), user("C")]
    assert v4.encode(msgs) == f"{BOS}S1S2{USER}A{ASSISTANT}</think>B{EOS}S3{USER}C{ASSISTANT}</think>"
    # consecutive user messages are one turn, joined with a blank line
    assert v4.encode([user("A"), user("B")], thinking=True) == f"{BOS}{USER}A\n\nB{ASSISTANT}<think>"
    # text parts are joined first
    parts = {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}
    assert v4.encode([parts]) == f"{BOS}{USER}x\ny{ASSISTANT}</think>"


@pytest.mark.parametrize("messages, param", [
    ([user("a"), assistant("b")], "messages[1].role"),
    ([system("s")], "messages[0].role"),
    ([user("a"), system("s")], "messages[1].role"),
    ([user("a"), {"role": "tool", "content": "r"}], "messages[1].role"),
    ([{"role": "tool", "content": "r"}, user("a")], "messages[0].role"),
    ([], "messages"),
])
def test_v4_refuses(v4, messages, param):
    with pytest.raises(ChatError) as e:
        v4.encode(messages)
    assert e.value.param == param


def test_v4_parser(v4, byte_tok):
    assert v4.think_end_id == THINK_END_ID
    p = v4.reasoning_parser(True)
    assert p.push("abc</think>def") == ("abc", "def")
    p = v4.reasoning_parser(False)
    assert p.push("abc</think>def") == ("", "abc</think>def")
    assert DeepSeekV4Encoder().think_end_id is None


# ---- templates ----

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class FakeTokenizer:
    bos_token_id, eos_token_id = 1, 2
    special_tokens: ClassVar[dict[str, int]] = {"<s>": 1, "</s>": 2}

    def __init__(self, chat_template):
        self.chat_template = chat_template


def test_template_encoder():
    enc = TemplateEncoder(CHATML)
    assert not enc.supports_thinking
    got = enc.encode([{"role": "developer", "content": "S"}, user("A"), assistant("B", "R"), user("C")])
    assert got == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nA<|im_end|>\n"
                   "<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nC<|im_end|>\n<|im_start|>assistant\n")
    assert enc.encode([user("A")], thinking=False) == enc.encode([user("A")])
    for call in (lambda: enc.encode([user("A")], thinking=True), lambda: enc.reasoning_parser(True)):
        with pytest.raises(ChatError, match="no thinking mode") as e:
            call()
        assert e.value.param == "thinking"
    assert enc.reasoning_parser(False).push("a</think>b") == ("", "a</think>b")


def test_template_errors_become_chat_errors():
    refuse = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}x"
    with pytest.raises(ChatError, match="first must be user") as e:
        TemplateEncoder(refuse).encode([system("s"), user("a")])
    assert e.value.param == "messages"
    with pytest.raises(ChatError):
        TemplateEncoder("{% for %}").encode([user("a")])


def test_make_chat_encoder():
    enc = make_chat_encoder(FakeTokenizer("{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"), "llama")
    assert isinstance(enc, TemplateEncoder)
    assert enc.encode([user("hi")]) == "<s>hi</s>"
    for tok in (FakeTokenizer(None), FakeTokenizer(""), object(), None):
        enc = make_chat_encoder(tok, "template")
        assert isinstance(enc, NoTemplateEncoder) and not enc.supports_thinking
        with pytest.raises(ChatError, match="no chat template; use /v1/completions"):
            enc.encode([user("hi")])
        assert enc.reasoning_parser(False).push("x") == ("", "x")
    # the V4 family needs no template
    assert isinstance(make_chat_encoder(FakeTokenizer(None), "deepseek_v4"), DeepSeekV4Encoder)


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf", reason="reading a GGUF needs the `gguf` package")
    from moeflash.tokenizer import GGUFTokenizer
    from moeflash.weights.build import smollm2_path

    return GGUFTokenizer(smollm2_path())


def test_smollm2_chatml(smollm2):
    enc = make_chat_encoder(smollm2, "llama")
    assert isinstance(enc, TemplateEncoder) and (enc.bos_token, enc.eos_token) == ("<|im_start|>", "<|im_end|>")
    text = enc.encode([user("What is the capital of France?")])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = smollm2.encode(text)
    assert ids[0] == smollm2.special_tokens["<|im_start|>"] and ids.count(smollm2.special_tokens["<|im_end|>"]) == 2
    assert enc.encode([system("Be brief."), user("Hi")]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


# ---- reasoning parser ----

def run(parser, deltas):
    reasoning, content = [], []
    for d in deltas:
        r, c = parser.push(d)
        reasoning.append(r)
        content.append(c)
    r, c = parser.flush()
    return "".join(reasoning) + r, "".join(content) + c, reasoning


@pytest.mark.parametrize("text, want", [
    ("abc</think>def", ("abc", "def")),
    ("</think>def", ("", "def")),            # marker at the very start
    ("abc</think>", ("abc", "")),            # marker at the very end
    ("</think>", ("", "")),
    ("a<b </th </think> x </think>", ("a<b </th ", " x </think>")),  # only the first marker splits
    ("abc</thin", ("abc</thin", "")),        # no marker: all reasoning, held part released by flush
    ("plain", ("plain", "")),
    ("", ("", "")),
])
def test_reasoning_split_anywhere(text, want):
    assert run(ReasoningParser(), [text])[:2] == want
    assert run(ReasoningParser(), list(text))[:2] == want  # one character at a time
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            deltas = [text[:i], text[i:j], text[j:]]
            r, c, parts = run(ReasoningParser(), deltas)
            assert (r, c) == want, deltas
            assert all("</think>" not in p for p in parts)


def test_reasoning_holds_back_only_a_possible_marker():
    p = ReasoningParser()
    assert p.push("abc<") == ("abc", "")
    assert p.push("/t") == ("", "")
    assert p.push("x") == ("</tx", "")  # not the marker after all
    assert p.push("</think") == ("", "")
    assert p.push(">") == ("", "")
    assert not p.in_reasoning
    assert p.push("A") == ("", "A")
    assert p.flush() == ("", "")


def test_passthrough_parser():
    p = ReasoningParser(thinking=False)
    assert [p.push(d) for d in ("a</th", "ink>b")] == [("", "a</th"), ("", "ink>b")]
    assert p.flush() == ("", "")


def test_push_token_by_id():
    p = ReasoningParser(marker_id=THINK_END_ID)
    assert p.push_token(ord("a"), "a<") == ("a", "")
    assert p.push_token(THINK_END_ID, "") == ("<", "")  # the special token's text was skipped
    assert p.push_token([ord("b")], "b") == ("", "b")
    assert p.push_token(None, "") == ("", "")
    q = ReasoningParser(marker_id=THINK_END_ID)  # the marker text present too: the text decides
    assert q.push_token(THINK_END_ID, "x</think>") == ("x", "")
    assert q.push_token(ord("y"), "y") == ("", "y")


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_parser_on_engine_detokenizer(byte_tok, v4, skip_special_tokens):
    """What the engine streams: IncrementalDetokenizer deltas, "</think>" kept (skip_special_tokens=False,
    as the server asks in thinking mode) or dropped (the default; then the id ends the reasoning)."""
    from moeflash.engine.detok import IncrementalDetokenizer

    reasoning, answer = "Denk é ≥ 😀 <b>", "Antwort 😀."
    ids = byte_tok.encode(reasoning) + [THINK_END_ID] + byte_tok.encode(answer)
    detok = IncrementalDetokenizer(byte_tok, stop=["<x"], skip_special_tokens=skip_special_tokens)
    parser = v4.reasoning_parser(True)
    r, c = [], []
    for t in ids:
        out = parser.push_token(t, detok.push(t)) if skip_special_tokens else parser.push(detok.push(t))
        r.append(out[0])
        c.append(out[1])
    tail = parser.push(detok.flush())
    end = parser.flush()
    assert "".join(r) + tail[0] + end[0] == reasoning
    assert "".join(c) + tail[1] + end[1] == answer


def test_server_chat_module_does_not_import_torch():
    code = "import sys, moeflash.server.chat; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
