"""llama.cpp (llama-cpp-python) as a test oracle that cannot take the suite down with it.

A llama.cpp build can die in native code (SIGILL where it was compiled for an instruction set the CPU
faults on, as 0.3.36's AMX path does). That would end the whole pytest process. So before a test first
touches llama.cpp, one probe subprocess per session loads the SmolLM2 GGUF and decodes a few tokens. If
the probe dies, every test that uses the oracle fails with the cause named, and the rest of the suite
runs. Tests use `llama_cpp` from here exactly like the module: attribute access runs the probe once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

PROBE = r"""
import sys
import llama_cpp
from moeflash.weights.build import smollm2_path
llm = llama_cpp.Llama(str(smollm2_path()), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
ids = llm.tokenize(b"The capital of France is", add_bos=False)
llm.eval(ids)
llm.eval([int(llm.scores[len(ids) - 1].argmax())])
print("probe ok", llama_cpp.llama_print_system_info().decode(errors="replace"))
"""

_verdict: tuple[str, str] | None = None  # ("ok" | "missing" | "dead", detail)


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


def probe() -> tuple[str, str]:
    """Runs the probe subprocess once per session; returns (verdict, detail)."""
    global _verdict
    if _verdict is not None:
        return _verdict
    try:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            _verdict = ("missing", "llama-cpp-python==0.3.36 (the test extra) is not installed: make install-test")
            return _verdict
    except (ImportError, ValueError) as e:
        _verdict = ("missing", f"llama-cpp-python cannot be found: {e}")
        return _verdict
    _verdict = run_probe(PROBE)
    return _verdict


def run_probe(code: str, timeout: float = 300) -> tuple[str, str]:
    """Runs `code` in a fresh interpreter: ("ok", its output) or ("dead", the cause, named)."""
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ("dead", f"the llama.cpp oracle probe (load SmolLM2, decode 2 tokens) did not finish in {timeout} s")
    if r.returncode == 0 and "probe ok" in r.stdout:
        return ("ok", r.stdout.strip())
    cause = _describe(r.returncode)
    hint = ""
    if r.returncode == -signal.SIGILL:
        hint = (" An illegal instruction means llama.cpp was compiled for an instruction set this CPU faults"
                " on (llama.cpp 0.3.36's AMX path, upstream PR 26954). Rebuild it without AMX:"
                " `make install-test` runs scripts/install_llama_cpp.sh, which builds with -mno-amx-*.")
    tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
    return ("dead", f"the llama.cpp oracle died in a probe subprocess (load SmolLM2, decode 2 tokens):"
                    f" {cause}.{hint}\n--- probe output (tail) ---\n{tail}")


def require() -> object:
    """The llama_cpp module if the oracle works; otherwise skip (not installed, outside CI) or fail."""
    verdict, detail = probe()
    if verdict == "missing":
        if os.environ.get("CI"):
            pytest.fail(detail, pytrace=False)
        pytest.skip(detail)
    if verdict == "dead":
        pytest.fail(detail, pytrace=False)
    import llama_cpp

    return llama_cpp


class _Oracle:
    """Stands in for the llama_cpp module; the first attribute access runs the probe."""

    def __getattr__(self, name: str):
        return getattr(require(), name)


llama_cpp = _Oracle()
