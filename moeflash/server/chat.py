"""Chat messages -> prompt text, and generated text -> (reasoning, content).

`normalize_messages` validates OpenAI chat messages and reduces them to plain `{"role", "content"}`
dicts. A `ChatEncoder` turns them into the prompt text for one model family, generation prompt included:
`DeepSeekV4Encoder` writes DeepSeek's own V4 encoding (V4 has no Jinja template), `TemplateEncoder`
renders the model's Jinja chat template (SmolLM2's ChatML and the like); `make_chat_encoder` picks one.
A `ReasoningParser` splits the text the engine streams back into reasoning and answer, for DeepSeek's
`reasoning_content` field.

This module knows nothing of tensors (no torch); the server encodes the prompt text with the tokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from ..chat_template import ChatTemplateError, render_chat
from .dsml import partial_suffix

# DeepSeek-V4's special tokens (V4-SPEC section 7; DeepSeek's encoding/encoding_dsv4.py).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"

ROLES = ("system", "developer", "user", "assistant", "tool")

# Placeholders for message contents while a Jinja template renders (private-use characters).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")


class ChatError(ValueError):
    """A request the chat encoding cannot serve; the server answers it with an OpenAI 400 error.

    `param` names the offending request field, as OpenAI's error body does ("messages",
    "messages[2].role", "thinking").
    """

    def __init__(self, message: str, param: str | None = "messages") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# -- messages ---------------------------------------------------------------------------------------

def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Validate OpenAI chat messages; return them as `{"role", "content"}` dicts of strings.

    - roles: system, developer (becomes system, as OpenAI treats it), user, assistant, tool;
    - content: a string, or a list of `{"type": "text", "text": ...}` parts, joined with "\\n" (as vLLM
      does); other part types (image_url, input_audio, ...) are refused: the models here read text only;
    - `name` is accepted and ignored; an assistant message keeps DeepSeek's `reasoning_content` (a string)
      under that key;
    - an assistant message may carry OpenAI `tool_calls` (then its content may be null): kept as
      `tool_calls`, a list of {"id", "name", "arguments"} with the arguments decoded (a JSON object);
      a `tool` message keeps its `tool_call_id`; the legacy `function_call` is refused.

    Idempotent: normalizing its own output changes nothing. Raises `ChatError` naming the field.
    """
    if not isinstance(messages, list):
        raise ChatError(f"messages must be a list of message objects, got {_kind(messages)}", "messages")
    if not messages:
        raise ChatError("messages is empty: give at least one message", "messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatError(f"{where} must be an object with 'role' and 'content', got {_kind(m)}", where)
        if "role" not in m:
            raise ChatError(f"{where} has no 'role'; give one of {', '.join(ROLES)}", f"{where}.role")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise ChatError(f"{where}.role {role!r} is not a known role; use one of {', '.join(ROLES)}",
                            f"{where}.role")
        if m.get("function_call"):  # null (some clients send it) means "none"
            raise ChatError(f"{where}.function_call: the legacy function_call is not supported; use tool_calls",
                            f"{where}.function_call")
        calls = _tool_calls(m.get("tool_calls"), where) if role == "assistant" else None
        content = _content(m.get("content"), where)
        if content is None and calls:
            content = ""
        if content is None:
            raise ChatError(f"{where} has no content; give a string or a list of text parts",
                            f"{where}.content")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        if calls:
            msg["tool_calls"] = calls
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        reasoning = m.get("reasoning_content")
        if role == "assistant" and reasoning is not None:
            if not isinstance(reasoning, str):
                raise ChatError(f"{where}.reasoning_content must be a string, got {_kind(reasoning)}",
                                f"{where}.reasoning_content")
            msg["reasoning_content"] = reasoning
        out.append(msg)
    return out


def _tool_calls(calls: Any, where: str) -> list[dict] | None:
    """An assistant message's OpenAI tool_calls as [{"id", "name", "arguments": dict}] (None if none);
    already normalised ones pass through."""
    if not calls:
        return None
    if not isinstance(calls, list):
        raise ChatError(f"{where}.tool_calls must be a list, got {_kind(calls)}", f"{where}.tool_calls")
    out = []
    for j, c in enumerate(calls):
        cw = f"{where}.tool_calls[{j}]"
        if isinstance(c, dict) and "name" in c and isinstance(c.get("arguments"), dict):  # normalised
            out.append({"id": c.get("id", ""), "name": c["name"], "arguments": c["arguments"]})
            continue
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatError(f'{cw} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}',
                            f"{cw}.function")
        raw = fn.get("arguments", "{}")
        try:
            args = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as e:
            raise ChatError(f"{cw}.function.arguments is not JSON ({e.msg})", f"{cw}.function.arguments") from None
        if not isinstance(args, dict):
            raise ChatError(f"{cw}.function.arguments must be a JSON object", f"{cw}.function.arguments")
        out.append({"id": c.get("id", "") if isinstance(c.get("id", ""), str) else "", "name": fn["name"],
                    "arguments": args})
    return out


def _content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatError(f"{where}.content must be a string or a list of text parts, got {_kind(content)}",
                        f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise ChatError(f'{pw} must be an object like {{"type": "text", "text": "..."}}, got {_kind(part)}',
                            pw)
        if "type" not in part:
            raise ChatError(f"{pw} has no 'type'; only \"text\" parts are supported", f"{pw}.type")
        if part["type"] != "text":
            raise ChatError(f"{pw}: content part type {part['type']!r} is not supported; this model reads "
                            "text only (\"text\" parts)", f"{pw}.type")
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatError(f"{pw}.text must be a string, got {_kind(text)}", f"{pw}.text")
        texts.append(text)
    return "\n".join(texts)


def _kind(x: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(x), type(x).__name__)


# -- reasoning ------------------------------------------------------------------------------------

class ReasoningParser:
    """Splits generated text, delta by delta, into (reasoning, content).

    In thinking mode everything before the first `marker` ("</think>") is reasoning and everything after
    it is content; the marker itself appears in neither. A delta that ends in what may be the start of the
    marker ("</th") keeps that part back until the next delta settles it, so the marker may arrive split
    over any number of deltas. Generation that ends without the marker was all reasoning: `flush` returns
    the held-back rest as reasoning. Later markers are content like any other text. Nothing else is
    rewritten (a re-emitted "<think>" or newlines after the marker stay), as DeepSeek's own output parser
    (`parse_message_from_completion_text` in encoding_dsv4.py) reads it: reasoning up to "</think>".

    The marker must be in the text, so the engine detokenizes thinking-mode requests with
    `skip_special_tokens=False` (V4's "</think>" is a special token, which the default skips).
    When the text comes with special tokens skipped, give `marker_id` and call `push_token` with each
    output's token ids: that id then ends the reasoning as the marker text would.

    With `thinking=False` the parser passes everything through as content.
    """

    def __init__(self, thinking: bool = True, marker: str = THINK_END, marker_id: int | None = None) -> None:
        if not marker:
            raise ValueError("the reasoning end marker must be a non-empty string")
        self.in_reasoning = thinking
        self.marker = marker
        self.marker_id = marker_id
        self._held = ""  # a suffix of the reasoning that may be the start of the marker

    def push(self, text_delta: str) -> tuple[str, str]:
        """(reasoning_delta, content_delta) for the next piece of generated text."""
        if not self.in_reasoning:
            return "", text_delta
        text = self._held + text_delta
        k = text.find(self.marker)
        if k >= 0:
            self._held, self.in_reasoning = "", False
            return text[:k], text[k + len(self.marker):]
        keep = partial_suffix(text, self.marker)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], ""

    def push_token(self, token_ids: int | Sequence[int] | None, text_delta: str) -> tuple[str, str]:
        """`push` for one engine output: its new token id(s) and text delta. If `marker_id` is among the
        ids, the reasoning ends with this delta even though its text lacks the marker (special tokens
        skipped); an output carrying several ids counts as a whole (the engine emits one per step)."""
        reasoning, content = self.push(text_delta)
        if self.in_reasoning and self.marker_id is not None and token_ids is not None:
            ids = [token_ids] if isinstance(token_ids, int) else token_ids
            if self.marker_id in ids:
                reasoning += self._held
                self._held, self.in_reasoning = "", False
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """At the end of generation: the held-back rest (reasoning: the marker never completed)."""
        held, self._held = self._held, ""
        return held, ""


class ReplyParser:
    """A chat reply, delta by delta: reasoning (`ReasoningParser`), then content, from which tool calls
    are split out (`dsml.ToolCallParser`) when the request offered tools. `push` and `flush` give
    (reasoning, content, calls completed); with `parallel` False only the first call is kept."""

    def __init__(self, reasoning: ReasoningParser, tools: bool = False, parallel: bool = True,
                 tool_format: str = "dsml"):
        from .dsml import ToolCallParser
        from .hermes import HermesCallParser

        self.reasoning = reasoning
        self.tools = (HermesCallParser() if tool_format == "hermes" else ToolCallParser()) if tools else None
        self.parallel = parallel
        self.calls: list = []

    def _split(self, reasoning: str, content: str, final: bool) -> tuple[str, str, list]:
        if self.tools is None:
            return reasoning, content, []
        content, new = self.tools.push(content)
        if final:
            content += self.tools.flush()
        if not self.parallel:
            new = new[: max(0, 1 - len(self.calls))]
        self.calls += new
        return reasoning, content, new

    def push(self, text: str, token_ids=None) -> tuple[str, str, list]:
        r, c = self.reasoning.push(text) if token_ids is None else self.reasoning.push_token(token_ids, text)
        return self._split(r, c, False)

    def flush(self) -> tuple[str, str, list]:
        r, c = self.reasoning.flush()
        return self._split(r, c, True)


# -- encoders ---------------------------------------------------------------------------------------

class ChatEncoder:
    """One model family's chat encoding: messages -> prompt text with the generation prompt appended.

    `encode_parts` gives the prompt as (text, markup) pieces: markup is the encoding's own text (role
    markers, BOS, think tags), where special-token strings become special tokens; the rest is message
    content, which the server tokenizes as plain text unless the caller is trusted, so a user cannot
    forge a turn by writing `<｜Assistant｜>` or `<|im_start|>`. `encode` joins the pieces."""

    supports_thinking: bool = False

    supports_tools: bool = False
    tool_format: str | None = None  # how its model writes calls: "dsml" (V4) or "hermes" (<tool_call> JSON)

    def encode(self, messages: list[dict], thinking: bool | None = None, tools: list[dict] | None = None) -> str:
        return "".join(text for text, _ in self.encode_parts(messages, thinking, tools))

    def encode_parts(self, messages: list[dict], thinking: bool | None = None,
                     tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        raise NotImplementedError

    def encode_ids(self, tokenizer: Any, messages: list[dict], thinking: bool | None = None,
                   trust_content: bool = False, content_starts: list[int] | None = None,
                   tools: list[dict] | None = None) -> list[int]:
        """Token ids of the prompt: markup with special tokens parsed, content as text (parsed too when
        `trust_content`, for a trusted local caller). `content_starts`, when given, receives the
        position where each message content starts (the server saves the prefix cache there).
        `tools`: OpenAI function objects the model may call (encodings with `supports_tools`)."""
        ids: list[int] = []
        for text, markup in self.encode_parts(messages, thinking, tools):
            if not markup and content_starts is not None:
                content_starts.append(len(ids))
            if text:
                ids.extend(tokenizer.encode(text, special=markup or trust_content))
        return ids

    def reasoning_parser(self, thinking: bool) -> ReasoningParser:
        self._check_thinking(thinking)
        return ReasoningParser(thinking=False)

    def _check_thinking(self, thinking: bool | None) -> None:
        if thinking and not self.supports_thinking:
            raise ChatError("this model has no thinking mode", "thinking")

    def _check_tools(self, msgs: list[dict], tools) -> None:
        if self.supports_tools:
            return
        if tools:
            raise ChatError("this model's chat encoding has no tool support (tools work with DeepSeek-V4 "
                            "models, through DSML, and with chat templates that write Hermes-style <tool_call> "
                            "blocks)", "tools")
        for i, m in enumerate(msgs):
            if m.get("tool_calls"):
                raise ChatError(f"messages[{i}].tool_calls: this model's chat encoding has no tool support",
                                f"messages[{i}].tool_calls")


class DeepSeekV4Encoder(ChatEncoder):
    """DeepSeek-V4's prompt encoding (V4-SPEC section 7, "Prompt encoding", after DeepSeek's
    `encoding/encoding_dsv4.py`, `encode_messages` with its defaults: `drop_thinking=True`, no tools,
    reasoning effort unset), no newlines inserted:

        <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>   chat mode (the default)
        <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜><think>    thinking mode

    As DeepSeek's encoder renders each message in order:
    - the BOS token starts the prompt; a system message is its text, where it stands (several are
      simply concatenated, nothing between them);
    - a user message is `<｜User｜>{content}`; consecutive user messages are one turn, their contents joined
      with "\\n\\n" (DeepSeek's `merge_tool_messages`);
    - a user turn followed by an assistant message, or ending the conversation, gets `<｜Assistant｜>` and
      then `</think>` — or `<think>` for the last turn in thinking mode;
    - a past assistant message is `{content}<｜end▁of▁sentence｜>`: its reasoning is dropped (chat mode never
      renders reasoning; thinking mode drops it before the last user turn), so an earlier exchange reads
      `<｜User｜>{user}<｜Assistant｜></think>{content}<｜end▁of▁sentence｜>` in both modes.

    Tools (DSML, `dsml.py`): the tools section follows the first system message after a blank line (or
    stands alone after BOS when there is none); a past assistant turn's tool calls follow its content
    (`render_calls`); tool results are the user's turn, each `<tool_result>{content}</tool_result>`,
    consecutive ones and a following user message joined with "\n\n" (DeepSeek's `merge_tool_messages`).

    Limits of this server: the last message must be a user message or a tool result (no assistant
    prefill), and `developer` messages arrive as system messages (`normalize_messages`, OpenAI's
    meaning; DeepSeek's own encoder would render them as `<｜User｜>` turns).
    """

    supports_thinking = True
    supports_tools = True
    tool_format = "dsml"

    def __init__(self, think_end_id: int | None = None) -> None:
        self.think_end_id = think_end_id  # "</think>"'s id, for ReasoningParser.push_token

    def encode_parts(self, messages: list[dict], thinking: bool | None = None,
                     tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        from .dsml import ToolCall, render_calls_parts, render_tools_parts

        msgs = normalize_messages(messages)
        last = len(msgs) - 1
        if msgs[last]["role"] not in ("user", "tool"):
            raise ChatError(f"the last message must be from the user (or a tool result), not {msgs[last]['role']!r}: "
                            "the reply is generated after it", f"messages[{last}].role")
        for i, m in enumerate(msgs):
            if m["role"] == "tool" and not (i > 0 and (msgs[i - 1]["role"] == "tool" or msgs[i - 1].get("tool_calls"))):
                raise ChatError(f"messages[{i}]: a tool message must follow an assistant message with tool_calls "
                                "(or another tool message)", f"messages[{i}].role")
        tool_parts = render_tools_parts(tools) if tools else []
        parts = [(BOS, True)]
        if tool_parts and msgs[0]["role"] != "system":  # no system message: the tools section stands alone
            parts += tool_parts
            tool_parts = []
        for i, m in enumerate(msgs):
            role, content = m["role"], m["content"]
            if role == "system":
                parts.append((content, False))
                if tool_parts:  # after the first system message
                    parts += [("\n\n", True)] + tool_parts
                    tool_parts = []
            elif role == "assistant":
                parts.append((content, False))
                if m.get("tool_calls"):
                    parts += render_calls_parts([ToolCall(c["name"], c["arguments"]) for c in m["tool_calls"]])
                parts.append((EOS, True))
            else:  # user, or a tool result: both are the user's turn (DeepSeek merges them)
                joined = i > 0 and msgs[i - 1]["role"] in ("user", "tool")
                head = "\n\n" if joined else USER
                if role == "tool":
                    parts += [(head + "<tool_result>", True), (content, False), ("</tool_result>", True)]
                else:
                    parts += [(head, True), (content, False)]
                if i == last or msgs[i + 1]["role"] == "assistant":
                    parts.append((ASSISTANT + (THINK_START if thinking and i == last else THINK_END), True))
        return parts

    def reasoning_parser(self, thinking: bool) -> ReasoningParser:
        return ReasoningParser(thinking=bool(thinking), marker=THINK_END, marker_id=self.think_end_id)


class TemplateEncoder(ChatEncoder):
    """The model's own Jinja chat template (`tokenizer.chat_template`), rendered as transformers does
    with `add_generation_prompt=True`. Templates here have no thinking switch: thinking is refused."""

    supports_thinking = False

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "",
                 special_tokens: Sequence[str] = ()) -> None:
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.special_tokens = tuple(special_tokens)

    def encode_parts(self, messages: list[dict], thinking: bool | None = None,
                     tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        """The template rendered with a placeholder for each content, then split at the placeholders:
        what the template wrote is markup, the contents are content. A template that rewrites content
        (so the placeholders do not come back intact, once each, in order) is rendered as one piece of
        markup, and refused only when a content holds a special-token string."""
        self._check_thinking(thinking)
        norm = normalize_messages(messages)
        self._check_tools(norm, tools)
        msgs = []
        for m in norm:
            d = {"role": m["role"], "content": m["content"]}
            if m.get("tool_calls"):  # as transformers hands them to templates: arguments as an object
                d["tool_calls"] = [{"id": c["id"], "type": "function",
                                    "function": {"name": c["name"], "arguments": c["arguments"]}}
                                   for c in m["tool_calls"]]
            if m.get("tool_call_id"):
                d["tool_call_id"] = m["tool_call_id"]
            msgs.append(d)
        offered = [{"type": "function", "function": f} for f in tools] if tools else None
        if tools or any(m.get("tool_calls") for m in msgs):  # rendered by the template: no special tokens inside
            blob = json.dumps([offered, [m.get("tool_calls") for m in msgs]], ensure_ascii=False)
            hit = next((t for t in self.special_tokens if t and t in blob), None)
            if hit is not None:
                raise ChatError(f"a tool schema or call holds the special token {hit!r}; remove it", "tools")
        marked = [dict(m, content=f"{_MARK_OPEN}{i}{_MARK_CLOSE}") for i, m in enumerate(msgs)]
        pieces = _MARK.split(self._render(marked, offered))  # text, index, text, index, ..., text
        if [int(k) for k in pieces[1::2]] == list(range(len(msgs))) and not any(
                _MARK_OPEN in t or _MARK_CLOSE in t for t in pieces[0::2]):
            parts = []
            for j, text in enumerate(pieces):
                parts.append((text, True) if j % 2 == 0 else (msgs[int(text)]["content"], False))
            return parts
        for i, m in enumerate(msgs):
            hit = next((t for t in self.special_tokens if t and t in m["content"]), None)
            if hit is not None:
                raise ChatError(f"messages[{i}].content holds the special token {hit!r}, and this model's chat "
                                "template rewrites message content, so it cannot be kept as plain text; "
                                "remove it", f"messages[{i}].content")
        return [(self._render(msgs, offered), True)]

    @property
    def supports_tools(self) -> bool:  # a template that lists tools and has the model write <tool_call>
        return "tools" in self.template and "<tool_call>" in self.template

    @property
    def tool_format(self) -> str | None:
        return "hermes" if self.supports_tools else None

    def _render(self, msgs: list[dict], tools: list[dict] | None = None) -> str:
        try:
            extra = {"tools": tools} if tools else {}
            return render_chat(self.template, msgs, add_generation_prompt=True,
                               bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except ChatTemplateError as e:
            raise ChatError(str(e), "messages") from None


class NoTemplateEncoder(ChatEncoder):
    """A model without a chat template: chat requests are refused (there is no right default format)."""

    supports_thinking = False

    def encode_parts(self, messages: list[dict], thinking: bool | None = None,
                     tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        raise ChatError("this model has no chat template; use /v1/completions", "messages")


def make_chat_encoder(tokenizer: Any, family: str) -> ChatEncoder:
    """The chat encoding for a model: `family` "deepseek_v4" -> `DeepSeekV4Encoder`; otherwise the
    tokenizer's `chat_template` -> `TemplateEncoder` (with its BOS / EOS token strings); otherwise a
    `NoTemplateEncoder`, whose `encode` raises `ChatError`."""
    specials: dict[str, int] = dict(getattr(tokenizer, "special_tokens", None) or {})
    if family == "deepseek_v4":
        return DeepSeekV4Encoder(think_end_id=specials.get(THINK_END))
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return NoTemplateEncoder()
    return TemplateEncoder(template, _token_text(tokenizer, specials, "bos_token_id"),
                           _token_text(tokenizer, specials, "eos_token_id"), tuple(specials))


def _token_text(tokenizer: Any, specials: dict[str, int], attr: str) -> str:
    """The text of the tokenizer's BOS / EOS token, "" when it has none."""
    tid = getattr(tokenizer, attr, None)
    if tid is None:
        return ""
    for text, i in specials.items():
        if i == tid:
            return text
    try:
        return tokenizer.decode([tid], skip_special_tokens=False)
    except (ValueError, TypeError, AttributeError):
        return ""
