"""The llama.cpp oracle guard: a native crash is reported as a named failure, not a dead suite."""

import signal

from .llama_oracle import run_probe


def test_a_sigill_in_the_oracle_is_named_with_its_fix():
    verdict, detail = run_probe("import os, signal; print('loading'); os.kill(os.getpid(), signal.SIGILL)")
    assert verdict == "dead"
    assert "SIGILL" in detail and "-mno-amx" in detail and "make install-test" in detail


def test_other_deaths_name_their_status_and_output():
    verdict, detail = run_probe("import sys; print('no such model', file=sys.stderr); sys.exit(3)")
    assert verdict == "dead"
    assert "exited with status 3" in detail and "no such model" in detail
    verdict, detail = run_probe(f"import os, signal; os.kill(os.getpid(), {int(signal.SIGSEGV)})")
    assert "SIGSEGV" in detail and "-mno-amx" not in detail


def test_a_working_probe_is_ok():
    assert run_probe("print('probe ok')") == ("ok", "probe ok")
