"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis): valid and
invalid bodies for every operation, against a real server on the tiny model. Nothing may answer 5xx,
and every answer must be a status, content type and body the document lists.

A small example count runs in the suite; a longer run (documented in README.md):

    MOEFLASH_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/test_fuzz_api.py
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (test extra) fuzzes the API")

from hypothesis import HealthCheck, given, settings  # noqa: E402  (schemathesis brings hypothesis)
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance)

from moeflash.engine.async_engine import AdmissionLimits  # noqa: E402
from moeflash.tokenizer import ByteTokenizer  # noqa: E402
from moeflash.weights.build import build_tiny  # noqa: E402

from .server_util import RunningServer  # noqa: E402

EXAMPLES = int(os.environ.get("MOEFLASH_FUZZ_EXAMPLES", "12"))


@pytest.fixture(scope="module")
def fuzz_server():
    # short limits keep each generated request cheap: at most 4 new tokens, a 96-token context
    with RunningServer(build_tiny("float32"), ByteTokenizer(), "tiny", "deepseek_v4", max_model_len=96,
                       max_tokens_limit=4, limits=AdmissionLimits(max_waiting=64, request_timeout=30)) as s:
        yield s


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_api_never_fails_and_keeps_its_contract(fuzz_server):
    """Each operation: EXAMPLES generated cases (positive and negative data), every check on each.
    (Driven through hypothesis directly: schemathesis's pytest plugin does not run under pytest 9.)"""
    api = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/health", "/metrics"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(checks=CHECKS, timeout=60)

        run()


def test_fuzzing_leaves_nothing_running(fuzz_server):
    import time

    engine = fuzz_server.engine

    def idle():
        return (not engine.engine.has_unfinished() and engine.engine.num_states() == 0
                and engine.stats()["queued"] == 0 and not engine._streams)

    deadline = time.monotonic() + 30
    while not idle() and time.monotonic() < deadline:  # all at once: the loop thread moves meanwhile
        time.sleep(0.05)
    assert idle()


def test_fuzzing_reached_the_model(fuzz_server):
    """The fuzz run above generated requests the engine served, not only ones it refused."""
    assert fuzz_server.engine.engine.stats["generated_tokens"] > 0
