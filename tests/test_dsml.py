"""DSML, V4's tool-call markup: tools, calls and results rendered as V4-SPEC §7 shows them, and calls
parsed back, whole or streamed in pieces of any size."""

from __future__ import annotations

import json

import pytest

from moeflash.server.dsml import (CALLS_OPEN, DSML, DSMLError, ToolCall, ToolCallParser, parse_calls, render_calls,
                                  render_results, render_tools, split_output)

CALLS = [ToolCall("get_weather", {"city": "Paris", "days": 3, "units": {"temp": "C"}, "alerts": False}),
         ToolCall("search", {"query": "DSML \"markup\"\nnew line", "tags": ["a", "b"]})]


def test_render_calls_matches_the_spec_layout():
    text = render_calls(CALLS[:1])
    assert text == (f"\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"get_weather\">\n"
                    f"<{DSML}parameter name=\"city\" string=\"true\">Paris</{DSML}parameter>\n"
                    f"<{DSML}parameter name=\"days\" string=\"false\">3</{DSML}parameter>\n"
                    f"<{DSML}parameter name=\"units\" string=\"false\">{{\"temp\": \"C\"}}</{DSML}parameter>\n"
                    f"<{DSML}parameter name=\"alerts\" string=\"false\">false</{DSML}parameter>\n"
                    f"</{DSML}invoke>\n</{DSML}tool_calls>")


def test_round_trip():
    content, calls = split_output("Let me check." + render_calls(CALLS))
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in CALLS]
    assert json.loads(calls[1].arguments_json()) == CALLS[1].arguments


def test_the_third_party_example_parses():
    """The shape public V4 clients send (a JSON argument with string=\"false\")."""
    text = (f'<{DSML}tool_calls>\n<{DSML}invoke name="grep_search">\n'
            f'<{DSML}parameter name="arguments" string="false">{{"pattern":"@app\\\\.(get|post)"}}</{DSML}parameter>\n'
            f'</{DSML}invoke>\n</{DSML}tool_calls>')
    content, calls = split_output(text)
    assert content == "" and calls[0].name == "grep_search"
    assert calls[0].arguments == {"arguments": {"pattern": "@app\\.(get|post)"}}


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 64, 10_000])
def test_streamed_in_pieces_of_any_size(size):
    text = "Checking the weather.\n\nFirst, " + "x" * 3 + render_calls(CALLS)
    p = ToolCallParser()
    content, calls = "", []
    for i in range(0, len(text), size):
        c, new = p.push(text[i:i + size])
        content += c
        calls += new
    content += p.flush()
    assert content == "Checking the weather.\n\nFirst, xxx"
    assert [c.arguments for c in calls] == [c.arguments for c in CALLS]


def test_text_that_only_looks_like_a_marker_is_content():
    p = ToolCallParser()
    out = p.push("a <｜DS") [0] + p.push("xy and\n\n")[0] + p.flush()
    assert out == "a <｜DSxy and\n\n" and not p.calls


def test_bad_values_and_results():
    with pytest.raises(DSMLError):
        parse_calls(f'<{DSML}invoke name="f"><{DSML}parameter name="n" string="false">not json</{DSML}parameter></{DSML}invoke>')
    assert render_results(["22C", "sunny"]) == "<tool_result>22C</tool_result>\n\n<tool_result>sunny</tool_result>"
    tools = render_tools([{"name": "f", "description": "d", "parameters": {"type": "object"}}])
    assert tools.startswith("## Tools\n") and '{"name": "f", "description": "d"' in tools and CALLS_OPEN in tools
