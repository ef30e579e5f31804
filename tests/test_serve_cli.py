"""`moeflash serve` as a process (start, answer, Ctrl-C / SIGTERM finish cleanly) and SmolLM2 over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from moeflash.cli import main

from .server_util import RunningServer, free_port

openai = pytest.importorskip("openai", reason="the openai client (test extra) talks to the server")


def start(*args):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moeflash.cli", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.communicate()[1]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_process_answers_and_stops_cleanly(sig):
    proc, url = start("--model", "tiny", "--served-model-name", "v4-tiny", "--dtype", "float32")
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="v4-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")
        # a long stream in flight when the signal arrives is ended (error event, [DONE]), not waited for
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"model": "v4-tiny", "prompt": "x", "max_tokens": 1000, "stream": True,
                                "ignore_eos": True}) as s:
            lines = s.iter_lines()
            next(lines)
            t0 = time.monotonic()
            proc.send_signal(sig)
            rest = []
            try:
                rest = [ln for ln in lines if ln]
            except httpx.HTTPError:
                pass
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 15
        assert len(rest) < 990 and (not rest or rest[-1] == "data: [DONE]")
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.communicate()[1]
    assert "Traceback" not in err, err


def test_serve_bad_flags(capsys):
    assert main(["serve", "--model", "tiny", "--max-model-len", "99999999"]) == 2
    assert "exceeds the model's context length" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--price-input", "-1"]) == 2
    assert "--price-input" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--default-temperature", "3"]) == 2
    assert "--default-temperature" in capsys.readouterr().err
    assert main(["serve", "--model", "/no/such/model"]) == 2
    assert "neither a built-in model" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_chat_over_http_answers_in_english():
    from moeflash.weights.build import load_model

    model, tok = load_model("smollm2")
    from moeflash.cli import SMOLLM2_SAMPLING

    with RunningServer(model, tok, "smollm2", "template", max_model_len=2048,
                       default_temperature=SMOLLM2_SAMPLING["temperature"],
                       default_top_p=SMOLLM2_SAMPLING["top_p"]) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        # no sampling fields: the server's SmolLM2 defaults (the model card's 0.2 / 0.9) keep it on topic
        sampled = [c.chat.completions.create(model="smollm2", max_tokens=24, seed=i, messages=[
            {"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content
            for i in range(3)]
        assert sum("Paris" in t for t in sampled) >= 2, sampled
        r = c.chat.completions.create(model="smollm2", temperature=0, max_tokens=24,
                                      messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
        bad = httpx.post(s.url + "/v1/chat/completions", json={
            "model": "smollm2", "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "thinking"
