"""Tool calls in the Hermes format, which many chat templates use (Qwen 2.5 and 3, Hermes, SmolLM3):
the template lists the tools in its system part, and the model writes each call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`HermesCallParser` splits streamed text into content and calls (a marker split over deltas is held back
until it is known); `hermes_grammar` is the Lark grammar that forces such calls (tool_choice "required"
or a named function), each call's JSON valid for its function's schema. Text only, no tensors.
"""

from __future__ import annotations

import json
import re

from .dsml import BlockCallParser, DSMLError, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def parse_call(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise DSMLError(f"a tool call is not JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise DSMLError("a tool call needs a \"name\"")
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise DSMLError("a tool call's arguments are not JSON") from None
    if not isinstance(args, dict):
        raise DSMLError("a tool call's arguments must be an object")
    return ToolCall(obj["name"], args)


class HermesCallParser(BlockCallParser):
    """Hermes calls: each `<tool_call>...</tool_call>` block is one call (`dsml.BlockCallParser`)."""

    def __init__(self):
        super().__init__(OPEN, _BLOCK, lambda m: [parse_call(m.group(1))])


def hermes_grammar(functions: list[dict], parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect) for one or more Hermes calls of `functions`."""
    alts = []
    for f in functions:
        params = f.get("parameters") if isinstance(f.get("parameters"), dict) else {"type": "object"}
        schema = {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                  "required": ["name", "arguments"], "additionalProperties": False,
                  "x-guidance": {"whitespace_flexible": False}}
        alts.append("%json " + json.dumps(schema))
    call = '"<tool_call>\\n" (' + " | ".join(alts) + ') "\\n</tool_call>"'
    more = ' ("\\n" call)*' if parallel else ""
    return f"start: call{more}\ncall: {call}\n"
