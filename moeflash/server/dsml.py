"""DeepSeek's DSML: how V4 is shown tools, writes tool calls and reads their results (V4-SPEC §7).

- **Tools** are described in the system message: `render_tools(tools)` is the "## Tools" section
  appended after the system text (two newlines between), listing each function's schema as JSON, one
  per line.
- **Calls** are a block the model writes after its content:

      <｜DSML｜tool_calls>
      <｜DSML｜invoke name="get_weather">
      <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
      <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
      </｜DSML｜invoke>
      </｜DSML｜tool_calls>

  A string argument is written as is (`string="true"`); any other value as JSON (`string="false"`).
  `render_calls` writes a past assistant turn's calls this way; `parse_calls` and the incremental
  `ToolCallParser` read them back out of generated text.
- **Results** come back inside a user turn, each as `<tool_result>...</tool_result>`, several joined
  with a blank line (`render_results`).

This module is text only (no tokens, no tensors). The layout follows DeepSeek's published encoder as
far as the spec and public ports of `encoding_dsv4.py` show it; the tool-section wording is theirs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

DSML = "｜DSML｜"
CALLS_OPEN, CALLS_CLOSE = f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"
INVOKE_CLOSE, PARAM_CLOSE = f"</{DSML}invoke>", f"</{DSML}parameter>"

TOOLS_SECTION = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{dsml}tool_calls>" block like the following:

<{dsml}tool_calls>
<{dsml}invoke name="$TOOL_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$TOOL_NAME2">
...
</{dsml}invoke>
</{dsml}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

_INVOKE = re.compile(rf'<{DSML}invoke\s+name="([^"]*)"\s*>(.*?){re.escape(INVOKE_CLOSE)}', re.S)
_PARAM = re.compile(rf'<{DSML}parameter\s+name="([^"]*)"(?:\s+string="(true|false)")?\s*>(.*?){re.escape(PARAM_CLOSE)}',
                    re.S)


class DSMLError(ValueError):
    pass


@dataclass
class ToolCall:
    name: str
    arguments: dict  # decoded values

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_tools(functions: list[dict]) -> str:
    """The tools section for OpenAI `function` objects ({"name", "description", "parameters"})."""
    return TOOLS_SECTION.replace("{dsml}", DSML).replace("{schemas}", "\n".join(_json(f) for f in functions))


def render_calls(calls: list[ToolCall]) -> str:
    """A past assistant turn's calls, as written after its content (two newlines before the block)."""
    return "".join(text for text, _ in render_calls_parts(calls))


def render_calls_parts(calls: list[ToolCall]) -> list[tuple[str, bool]]:
    """`render_calls` as (text, markup) pieces: the markers are markup; names, keys and values came from
    a client and are content (tokenized as plain text, so they cannot forge a marker)."""
    parts: list[tuple[str, bool]] = [(f"\n\n{CALLS_OPEN}\n", True)]
    for n, c in enumerate(calls):
        if n:
            parts.append(("\n", True))
        parts += [(f'<{DSML}invoke name="', True), (c.name, False), ('">\n', True)]
        for k, (key, value) in enumerate(c.arguments.items()):
            is_str = isinstance(value, str)
            parts += [(("\n" if k else "") + f'<{DSML}parameter name="', True), (key, False),
                      (f'" string="{"true" if is_str else "false"}">', True),
                      (value if is_str else _json(value), False), (PARAM_CLOSE, True)]
        parts.append((f"\n{INVOKE_CLOSE}", True))
    parts.append((f"\n{CALLS_CLOSE}", True))
    return [(t, m) for t, m in parts if t]


def render_tools_parts(functions: list[dict]) -> list[tuple[str, bool]]:
    """`render_tools` as (text, markup) pieces: the section is markup, the schemas content."""
    head, tail = TOOLS_SECTION.replace("{dsml}", DSML).split("{schemas}")
    return [(head, True), ("\n".join(_json(f) for f in functions), False), (tail, True)]


def render_results(results: list[str]) -> str:
    return "\n\n".join(f"<tool_result>{r}</tool_result>" for r in results)


def _value(raw: str, is_string: str | None):
    if is_string == "true":
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        if is_string is None:  # no attribute: text as it is
            return raw
        raise DSMLError(f"a string=\"false\" parameter is not JSON: {raw[:80]!r}") from None


def parse_calls(block: str) -> list[ToolCall]:
    """The calls inside a tool_calls block's body (between its open and close markers)."""
    calls = []
    for name, body in _INVOKE.findall(block):
        if not name:
            raise DSMLError("an invoke without a name")
        args = {}
        for key, is_string, raw in _PARAM.findall(body):
            args[key] = _value(raw, is_string or None)
        calls.append(ToolCall(name, args))
    return calls


def split_output(text: str) -> tuple[str, list[ToolCall]]:
    """(content before the block, the calls) of a finished generation; ([text], []) without a block.
    A block that is opened but never closed is read as far as its complete invokes go."""
    at = text.find(CALLS_OPEN)
    if at < 0:
        return text, []
    end = text.find(CALLS_CLOSE, at)
    body = text[at + len(CALLS_OPEN): end if end >= 0 else len(text)]
    return text[:at].rstrip("\n"), parse_calls(body)


class BlockCallParser:
    """Splits streamed text into content and tool calls, delta by delta, for a format whose calls sit
    in a block opening with `opener`: text that may be the start of the opener (split over deltas, even
    mid-character) is held back until it is known, and so are newlines that may separate it; once the
    block opens nothing more is content, and each call is returned when `pattern` matches it in the
    block (from the opener on), read by `read(match) -> [ToolCall]`. A malformed call is counted, not
    returned."""

    def __init__(self, opener: str, pattern: re.Pattern, read):
        self.opener, self.pattern, self.read = opener, pattern, read
        self._held = ""
        self.in_block = False
        self._body = ""
        self._seen = 0  # calls already returned
        self.calls: list[ToolCall] = []
        self.malformed = 0

    def push(self, delta: str) -> tuple[str, list[ToolCall]]:
        """(content delta, calls completed by this delta)."""
        if self.in_block:
            return "", self._advance(delta)
        text = self._held + delta
        at = text.find(self.opener)
        if at < 0:
            cut = len(text) - partial_suffix(text, self.opener)
            while cut > 0 and text[cut - 1] == "\n":  # newlines may be the block's separator
                cut -= 1
            self._held = text[cut:]
            return text[:cut], []
        self.in_block, self._held = True, ""
        return text[:at].rstrip("\n"), self._advance(text[at:])

    def _advance(self, delta: str) -> list[ToolCall]:
        self._body += delta
        new = []
        for m in list(self.pattern.finditer(self._body))[self._seen:]:
            self._seen += 1
            try:
                new += self.read(m)
            except DSMLError:  # a malformed call is not a call (the rest of the block still counts)
                self.malformed += 1
        self.calls += new
        return new

    def flush(self) -> str:
        """At the end of generation: held text that turned out not to be the opener."""
        held, self._held = self._held, ""
        return "" if self.in_block else held


class ToolCallParser(BlockCallParser):
    """DSML calls: the block opens with `<｜DSML｜tool_calls>`; each invoke is a call."""

    def __init__(self):
        super().__init__(CALLS_OPEN, _INVOKE, lambda m: parse_calls(m.group(0)))


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0



def call_grammar(functions: list[dict], parallel: bool = True, dsml_token_id: int | None = None) -> str:
    """A Lark grammar (llguidance's dialect) for a tool_calls block that calls only `functions`, with
    their required parameters in schema order: string parameters as plain text (`string="true"`, one
    of the values when the schema lists an `enum`, at most `maxLength` characters), the others as JSON valid for their schema
    (`string="false"`). One invoke, or several when `parallel`. For tool_choice "required" or a named
    function: the output is a call that parses, with arguments valid for the schema. `dsml_token_id`:
    the id of "｜DSML｜" when the tokenizer has it as a special token (V4's does)."""
    d = f"<[{dsml_token_id}]>" if dsml_token_id is not None else json.dumps(DSML)
    nl = json.dumps("\n")

    def lit(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)

    rules, alts = [], []
    for k, f in enumerate(functions):
        params = f.get("parameters") if isinstance(f.get("parameters"), dict) else {}
        props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
        required = {r for r in params.get("required", []) if isinstance(r, str)} \
            if isinstance(params.get("required"), list) else set()
        items = []
        for key, schema in props.items():
            if key not in required:
                continue
            schema = schema if isinstance(schema, dict) else {}
            if schema.get("type") == "string":
                flag = "true"
                enum = schema.get("enum")
                if isinstance(enum, list) and enum:
                    value = "(" + " | ".join(lit(str(v)) for v in enum) + ")"
                elif isinstance(schema.get("maxLength"), int) and schema["maxLength"] >= 0:
                    value = f"/[^<]{{0,{schema['maxLength']}}}/"
                else:
                    value = "STR"
            else:
                flag, value = "false", "%json " + json.dumps(schema)
            opener = lit('parameter name="' + key + '" string="' + flag + '">')
            items.append(f'"<" {d} {opener} {value} "</" {d} "parameter>"')
        body = f" {nl} ".join(items + [""]) if items else nl
        head = lit('invoke name="' + f["name"] + '">\n')
        rules.append(f'inv{k}: "<" {d} {head} {body} "</" {d} "invoke>"')
        alts.append(f"inv{k}")
    more = f" ({nl} invoke)*" if parallel else ""
    start = f'start: "<" {d} {lit("tool_calls>" + chr(10))} invoke{more} {lit(chr(10) + "</")} {d} "tool_calls>"'
    return "\n".join([start, "invoke: " + " | ".join(alts), *rules, "STR: /[^<]*/"]) + "\n"
