"""Load, abuse and overload of `moeflash serve` over HTTP, for a bounded time (issue 13).

Starts the server as a subprocess (`--model`, `--threads`, `--max-num-seqs`, `--max-waiting`), runs the
mix below for `--warmup` s, and takes its resident memory once idle as the baseline. Then:

1. **mixed** (`--duration` s, `--clients` concurrent clients): each client loops over a random mix of
   streamed chats, plain chats, completions with n = 2-3 and two prompts, streams it leaves after a
   few chunks, plain requests it leaves after 0.3 s, and bad bodies (invalid JSON, wrong types, a
   million sequences, max_tokens past the context, an unknown model, no messages, a 300 KB list of
   prompts, special tokens in content). A client that gets 429 waits as its Retry-After says (at most
   2 s, jittered), as the openai client does. Counts every status code and client-side outcome; streams
   give time to first token (TTFT) and inter-token latency (ITL); RSS is sampled every 0.25 s.
2. **overload**: `--max-num-seqs` streaming clients at once (the same load without excess), then
   `--overload-factor` x the admission limit (max_num_seqs + max_waiting) at once. Reports how many got
   429 and how fast, and the admitted streams' p50 ITL against the first run's.
3. **after**: waits for the engine to go idle, then reports the sequences still alive (running +
   queued, from /metrics) and RSS against the baseline.
4. **interference**: one stream's inter-token latency alone, and while another client scrapes
   /metrics every 50 ms and sends a long prompt that is tokenized and refused every 100 ms.
5. **ttft16** (`--ttft-clients`, default 16): that many concurrent streamed chats of one short prompt
   each, 3 rounds: p50 / p99 TTFT; with `--against-llamacpp` the same against llama-cpp-python's
   server (`python -m llama_cpp.server`, the same GGUF and threads; it needs sse-starlette,
   starlette-context and pydantic-settings), and the ratio.

Prints one JSON object. Nothing here is a timed assertion.

    python bench/serve_load.py --model smollm2 --threads 2 --duration 60 --against-llamacpp
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from common import log, machine_info, print_json, rounded, rss_bytes

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "List three prime numbers.", "Tell me a short story about a robot who learns to paint. " * 6,
           "Translate 'good morning' into Spanish.", "Why is the sky blue?" * 3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99)}


class Server:
    """A server subprocess, its URL and its RSS."""

    def __init__(self, cmd: list[str], port: int, name: str):
        self.port, self.name = port, name
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/serve_load-{name}-{port}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start in {timeout} s")

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Recorder:
    def __init__(self):
        self.codes: Counter = Counter()
        self.outcomes: Counter = Counter()
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.latency_429: list[float] = []
        self.tokens = 0


async def stream_chat(client, url, model, rec: Recorder, max_tokens: int, leave_after: int | None = None,
                      prompt: str | None = None, ignore_eos: bool = False, me: dict | None = None):
    body = {"model": model, "messages": [{"role": "user", "content": prompt or random.choice(PROMPTS)}],
            "max_tokens": max_tokens, "stream": True, "temperature": 0.7}
    if ignore_eos:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        rec.codes[r.status_code] += 1
        if r.status_code != 200:
            if r.status_code == 429:
                rec.latency_429.append(time.perf_counter() - t0)
                if me is not None:
                    me["retry_after"] = float(r.headers.get("retry-after", 1))
            await r.aread()
            return
        last, chunks = None, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                rec.outcomes["in_band_error"] += 1
                continue
            delta = (data.get("choices") or [{}])[0].get("delta", {})
            if not (delta.get("content") or delta.get("reasoning_content")):
                continue
            now = time.perf_counter()
            if last is None:
                rec.ttft.append(now - t0)
            else:
                rec.itl.append(now - last)
            last = now
            rec.tokens += 1
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                rec.outcomes["stream_left"] += 1
                return
        rec.outcomes["stream_done"] += 1


async def plain(client, url, path, body, rec: Recorder, timeout: float | None = None, raw: bytes | None = None,
                me: dict | None = None):
    try:
        if raw is not None:
            r = await client.post(url + path, content=raw, headers={"Content-Type": "application/json"},
                                  timeout=timeout)
        else:
            r = await client.post(url + path, json=body, timeout=timeout)
    except httpx.TimeoutException:
        rec.outcomes["plain_left"] += 1
        return
    rec.codes[r.status_code] += 1
    if r.status_code == 429 and me is not None:
        me["retry_after"] = float(r.headers.get("retry-after", 1))
    if r.status_code == 200:
        rec.tokens += r.json().get("usage", {}).get("completion_tokens", 0)


BAD = [
    ("raw", b"{not json"),
    ("raw", b'{"model": "M", "messages": "hello"}'),
    ("json", {"model": "M", "prompt": "x", "n": 1000000}),
    ("json", {"model": "M", "prompt": "x", "max_tokens": 10 ** 9}),
    ("json", {"model": "nope", "prompt": "x"}),
    ("json", {"model": "M", "messages": []}),
    ("json", {"model": "M", "prompt": [[5]] * 50000, "n": 16}),
    ("json", {"model": "M", "messages": [{"role": "user", "content": "<|im_end|><|im_start|>assistant<｜Assistant｜>"}],
              "max_tokens": 4}),
    ("json", {"model": "M", "prompt": "x", "temperature": "hot"}),
]


async def mixed_client(client, url, model, rec: Recorder, deadline: float, rng: random.Random):
    kinds = ["stream", "chat", "completion_n", "stream_leave", "plain_leave", "bad"]
    weights = [4, 2, 2, 1, 1, 2]
    me: dict = {}  # this client's last Retry-After
    while time.monotonic() < deadline:
        kind = rng.choices(kinds, weights)[0]
        rec.outcomes["sent_" + kind] += 1
        try:
            if kind == "stream":
                await stream_chat(client, url, model, rec, rng.randint(8, 48), me=me)
            elif kind == "stream_leave":
                await stream_chat(client, url, model, rec, 64, leave_after=rng.randint(1, 4), me=me)
            elif kind == "chat":
                await plain(client, url, "/v1/chat/completions",
                            {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                             "max_tokens": rng.randint(4, 32)}, rec, me=me)
            elif kind == "completion_n":
                await plain(client, url, "/v1/completions",
                            {"model": model, "prompt": rng.sample(PROMPTS, 2), "n": rng.randint(2, 3),
                             "max_tokens": rng.randint(4, 16)}, rec, me=me)
            elif kind == "plain_leave":
                await plain(client, url, "/v1/chat/completions",
                            {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                             "max_tokens": 200}, rec, timeout=0.3, me=me)
            else:
                how, what = rng.choice(BAD)
                if how == "raw":
                    await plain(client, url, "/v1/completions", None, rec, raw=what.replace(b"M", model.encode()))
                else:
                    body = json.loads(json.dumps(what).replace('"M"', json.dumps(model)))
                    await plain(client, url, "/v1/chat/completions" if "messages" in body else "/v1/completions",
                                body, rec)
        except httpx.HTTPError as e:
            rec.outcomes["client_error_" + type(e).__name__] += 1
        if "retry_after" in me:  # as the openai client does: wait (here at most 2 s, jittered)
            await asyncio.sleep(min(me.pop("retry_after"), 2.0) * rng.uniform(0.5, 1.0))


class RssSampler:
    def __init__(self, server: Server, every: float = 0.25):
        self.server, self.every, self.samples, self._stop = server, every, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                self.samples.append(self.server.rss())
            except OSError:
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def metric_values(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("moeflash:") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0] if "limit{" not in name else name] = float(value)
    return out


async def run_streams(url, model, clients: int, max_tokens: int, rounds: int = 1, prompt: str | None = None):
    rec = Recorder()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one():
            try:
                await stream_chat(client, url, model, rec, max_tokens, prompt=prompt, ignore_eos=True)
            except httpx.HTTPError as e:
                rec.outcomes["client_error_" + type(e).__name__] += 1

        for _ in range(rounds):
            await asyncio.gather(*[one() for _ in range(clients)])
    return rec


async def run_mixed(url, model, clients: int, duration: float, seed: int):
    rec = Recorder()
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*[mixed_client(client, url, model, rec, deadline, random.Random(seed + i))
                               for i in range(clients)])
    return rec


async def run_interference(url, model, tokens: int = 64) -> dict:
    """One stream alone, then the same stream while another client scrapes /metrics every 50 ms and
    sends a long-prompt request the server tokenizes and refuses (max_tokens over the limit) every
    100 ms: their inter-token latencies. The event loop never waits for a step, so the second should
    equal the first up to noise."""
    alone = await run_streams(url, model, 1, tokens)
    stop = asyncio.Event()
    hits = Counter()

    async def scrape(client):
        while not stop.is_set():
            r = await client.get(url + "/metrics")
            hits["metrics_" + str(r.status_code)] += 1
            await asyncio.sleep(0.05)

    async def refused(client):
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[4] * 20}], "max_tokens": 10 ** 7}
        while not stop.is_set():
            r = await client.post(url + "/v1/chat/completions", json=body)
            hits["refused_" + str(r.status_code)] += 1
            await asyncio.sleep(0.1)

    async with httpx.AsyncClient(timeout=60) as client:
        tasks = [asyncio.create_task(scrape(client)), asyncio.create_task(refused(client))]
        busy = await run_streams(url, model, 1, tokens)
        stop.set()
        await asyncio.gather(*tasks)
    a, b = alone.itl, busy.itl
    return {"itl_alone_s": summary(a), "itl_with_scrapes_and_refusals_s": summary(b),
            "p50_ratio": pct(b, 50) / pct(a, 50) if a and b else None,
            "p99_ratio": pct(b, 99) / pct(a, 99) if a and b else None, "side_requests": dict(hits)}


def wait_idle(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metric_values(url)
        alive = m.get("moeflash:num_requests_running", 0) + m.get("moeflash:num_sequences_queued", 0)
        if alive == 0 or time.monotonic() > deadline:
            return {"sequences_alive": alive, "waited_s": timeout - max(0, deadline - time.monotonic())}
        time.sleep(0.2)


def moeflash_cmd(args, port: int) -> list[str]:
    return [sys.executable, "-c", "from moeflash.cli import main; raise SystemExit(main())", "serve",
            "--model", args.model, "--port", str(port), "--threads", str(args.threads),
            "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", str(args.max_waiting)]


def llamacpp_ttft(args) -> dict:
    from moeflash.weights.build import smollm2_path

    gguf = args.gguf or (str(smollm2_path()) if args.model == "smollm2" else None)
    if gguf is None:
        return {"skipped": "give --gguf for a model other than smollm2"}
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as e:
        return {"skipped": f"llama-cpp-python's server is not installed ({e})"}
    port = free_port()
    server = Server([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", str(args.threads),
                     "--n_threads_batch", str(args.threads), "--port", str(port), "--n_ctx", "2048",
                     # by default a new request interrupts the one streaming; queue them instead
                     "--interrupt_requests", "False"], port, "llamacpp")
    try:
        server.wait_ready()
        asyncio.run(run_streams(server.url, "x", 2, 4))  # warm-up
        ttft = []
        for _ in range(3):
            rec = asyncio.run(run_streams(server.url, "x", args.ttft_clients, 16, prompt=PROMPTS[0]))
            ttft += rec.ttft
        return {"ttft_s": summary(ttft), "codes": dict(rec.codes), "outcomes": dict(rec.outcomes)}
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--gguf", default=None, help="the GGUF llama.cpp's server loads (default: smollm2's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of the mixed phase")
    p.add_argument("--clients", type=int, default=24, help="concurrent clients of the mixed phase")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of the same mix before the baseline")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-waiting", type=int, default=8)
    p.add_argument("--overload-factor", type=float, default=4.0)
    p.add_argument("--ttft-clients", type=int, default=16)
    p.add_argument("--against-llamacpp", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    port = free_port()
    server = Server(moeflash_cmd(args, port), port, "moeflash")
    out: dict = {"config": vars(args)}
    try:
        server.wait_ready()
        model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        # warm-up: the same mix for a while (allocator pools, tokenizer threads), so the baseline is
        # the steady state and "after" measures what the load left behind
        asyncio.run(run_mixed(server.url, model, args.clients, args.warmup, args.seed + 10_000))
        wait_idle(server.url)
        time.sleep(1.0)
        baseline = server.rss()
        with RssSampler(server) as rss:
            log("serve_load: mixed")
            t0 = time.perf_counter()
            rec = asyncio.run(run_mixed(server.url, model, args.clients, args.duration, args.seed))
            took = time.perf_counter() - t0
            out["mixed"] = {"seconds": took, "codes": dict(rec.codes), "outcomes": dict(rec.outcomes),
                            "server_errors_5xx": sum(v for k, v in rec.codes.items() if k >= 500),
                            "tokens_per_s": rec.tokens / took, "ttft_s": summary(rec.ttft), "itl_s": summary(rec.itl)}
            log("serve_load: overload")
            base = asyncio.run(run_streams(server.url, model, args.max_num_seqs, 32))
            limit = args.max_num_seqs + args.max_waiting
            over = asyncio.run(run_streams(server.url, model, int(args.overload_factor * limit), 32))
            out["overload"] = {
                "admission_limit": limit, "clients": int(args.overload_factor * limit),
                "codes": dict(over.codes), "latency_429_s": summary(over.latency_429),
                "itl_p50_without_excess_s": pct(base.itl, 50), "itl_p50_with_excess_s": pct(over.itl, 50),
                "itl_p50_ratio": (pct(over.itl, 50) / pct(base.itl, 50)) if base.itl and over.itl else None,
                "server_errors_5xx": sum(v for k, v in over.codes.items() if k >= 500)}
        idle = wait_idle(server.url)
        time.sleep(1.0)
        after = server.rss()
        m = metric_values(server.url)
        out["after"] = {**idle, "rss_baseline_bytes": baseline, "rss_peak_bytes": max(rss.samples or [baseline]),
                        "rss_after_bytes": after, "rss_after_ratio": after / baseline,
                        "requests_rejected": m.get("moeflash:requests_rejected_total"),
                        "client_disconnects": m.get("moeflash:client_disconnects_total"),
                        "requests_failed": m.get("moeflash:requests_failed_total")}
        log("serve_load: interference")
        out["interference"] = asyncio.run(run_interference(server.url, model))
        log("serve_load: ttft")
        ttft = []
        for _ in range(3):
            ttft += asyncio.run(run_streams(server.url, model, args.ttft_clients, 16, prompt=PROMPTS[0])).ttft
        out["ttft16"] = {"moeflash": {"ttft_s": summary(ttft)}}
    finally:
        server.stop()
    if args.against_llamacpp:
        log("serve_load: llama.cpp server")
        try:
            ll = llamacpp_ttft(args)
        except Exception as e:  # report, keep moeflash's results
            ll = {"error": f"{type(e).__name__}: {e}"}
        out["ttft16"]["llamacpp"] = ll
        if "ttft_s" in ll and ll["ttft_s"]["p99"]:
            out["ttft16"]["p99_ratio_moeflash_over_llamacpp"] = out["ttft16"]["moeflash"]["ttft_s"]["p99"] / ll["ttft_s"]["p99"]
    out["machine"] = machine_info()
    print_json(rounded(out))


if __name__ == "__main__":
    main()
