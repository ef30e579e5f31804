"""One engine loop shared by many concurrent callers (the server's HTTP requests).

`LLMEngine` is synchronous: whoever calls `step` advances every running request. Here one background
thread owns it, and nothing else touches it: callers on an asyncio event loop hand requests and
aborts to the loop through an inbox (a thread-safe queue) and receive outputs through per-request
asyncio queues, so a new request or a metrics scrape never waits for a step to end. Requests
arriving at any time join the same batched steps (continuous batching across HTTP requests).

Admission is bounded (`AdmissionLimits`): beyond max_num_seqs + `max_waiting` sequences `add_request` raises
`Overloaded` with a suggested retry delay, and every request carries a deadline, after which the loop
aborts it with finish_reason "timeout". A caller that stops listening (a client that disconnects)
aborts its request, which the loop applies before its next step. A failing sequence fails alone
(`LLMEngine`'s isolation); if a step fails outside any sequence, the loop fails that step's
requests and carries on: the engine never dies with one bad request.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .engine import LLMEngine
from .sampler import SamplingParams
from .sequence import RequestOutput

log = logging.getLogger("moeflash.engine")


class EngineDeadError(RuntimeError):
    """The engine loop is not running (shut down, or never started)."""


class Overloaded(RuntimeError):
    """The waiting queue is full; try again after `retry_after` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class AdmissionLimits:
    """What one server admits. `max_waiting`: sequences (one per prompt and choice) queued beyond the
    engine's max_num_seqs running ones; `request_timeout`: seconds from arrival after which a request
    is aborted (None: never)."""

    max_waiting: int = 64
    request_timeout: float | None = 1800.0

    def __post_init__(self):
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[list[RequestOutput], float], None] | None = None,
                 limits: AdmissionLimits | None = None):
        """`on_step(outputs, seconds)` is called on the loop thread after every step (for metrics)."""
        self.engine = engine
        self.on_step = on_step
        self.limits = limits or AdmissionLimits()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        # rid -> (event loop, output queue, deadline, queued at); the loop thread owns it
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, float | None, float]] = {}
        self._count = threading.Lock()     # guards the two counters below (never held across a step)
        self._outstanding = 0              # sequences added and not yet finished
        self._running = 0                  # sequences running after the last step (published by the loop)
        self._rejected = 0
        self._service_seconds = 0.0        # moving average of a request's time from queueing to finish
        self._snapshot = self._stats_now()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> "AsyncLLMEngine":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="moeflash-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is still running, stop the loop and wait for it."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._drain()  # requests that arrived after the last iteration
        for rid, (loop, q, _, _) in list(self._streams.items()):
            self.engine.abort(rid)
            _put(loop, q, EngineDeadError("the server is shutting down"))
        self._streams.clear()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests (any thread; never touches the engine) ------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> list[int]:
        """Validate without queueing (ValueError for bad input)."""
        return self.engine.check_request(prompt_token_ids, params)

    def reserve(self, sequences: int) -> None:
        """Count `sequences` about to be added: the engine holds at most max_num_seqs running plus
        `max_waiting` queued. Raises `Overloaded` (and counts a rejection) when they do not fit; each
        reserved sequence is released when it finishes."""
        width = self.engine.scheduler.max_num_seqs
        with self._count:
            if self._outstanding + sequences > width + self.limits.max_waiting:
                self._rejected += 1
                waiting = max(0, self._outstanding - width)
                raise Overloaded(f"the server is busy: {self._outstanding} sequences are in the engine "
                                 f"({waiting} waiting) and this request adds {sequences}; it holds "
                                 f"{width} running + {self.limits.max_waiting} waiting", self._retry_after(waiting))
            self._outstanding += sequences

    def release(self, sequences: int = 1) -> None:
        with self._count:
            self._outstanding = max(0, self._outstanding - sequences)

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                    reserved: bool = False, sink: asyncio.Queue | None = None,
                    cache_hints: list[int] = ()) -> asyncio.Queue:
        """Queue a request (validated now: ValueError for bad input; `Overloaded` when the queue is
        full, unless the caller `reserve`d it) and return its output queue. Call from a coroutine:
        outputs are delivered on the calling event loop. With `sink`, outputs (or the exception that
        ends the request) go there as (request_id, item) pairs, so one queue serves many requests."""
        if not self.running:
            raise EngineDeadError("the engine loop is not running")
        prompt = self.check_request(prompt_token_ids, params)
        if not reserved:
            self.reserve(1)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue() if sink is None else _Tagged(sink, request_id)
        timeout = self.limits.request_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        self._inbox.put(("add", request_id, prompt, params, loop, q, deadline, list(cache_hints)))
        self._wake.set()
        return q

    def abort(self, request_id: str) -> None:
        """Ask the loop to abort a request before its next step (a no-op once it has finished)."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, reserved: bool = False) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs as steps produce them; leaving early (an exception, a
        cancelled task, a closed generator) aborts the request."""
        q = self.add_request(prompt_token_ids, params, request_id, reserved)
        finished = False
        try:
            while not finished:
                out = await q.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def stats(self) -> dict:
        """The engine's gauges and counters as of the last step (published by the loop thread; reading
        them takes no lock the loop holds). `queued`: sequences accepted and not yet running."""
        with self._count:
            waiting = max(0, self._outstanding - self._running)
            rejected = self._rejected
        return {**self._snapshot, "queued": waiting, "rejected": rejected}

    def _retry_after(self, waiting: int) -> int:
        """Seconds until the queue has likely moved on: rounds of `max_num_seqs` waiting sequences at
        the measured mean time a request takes (1 s before any has finished; at most 10 minutes)."""
        width = max(1, self.engine.scheduler.max_num_seqs)
        rounds = max(1, math.ceil(waiting / width))
        return int(min(600, max(1, math.ceil(self._service_seconds * rounds))))

    # -- the loop (the only thread that touches `engine`) -----------------------------------------
    def _run(self) -> None:
        busy_since_trim = False
        while not self._stop:
            self._drain()
            self._expire()
            e = self.engine
            if not e.has_unfinished():
                self._publish()
                if busy_since_trim:  # idle after work: give freed heap pages back to the OS
                    busy_since_trim = False
                    _trim_heap()
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            busy_since_trim = True
            t0 = time.perf_counter()
            try:
                outputs = e.step()
            except Exception as err:  # outside any one sequence: fail what the step held
                log.exception("engine step failed")
                outputs = self._fail_running(err)
            seconds = time.perf_counter() - t0
            self._deliver(outputs)
            self._publish()
            if self.on_step is not None:
                try:
                    self.on_step(outputs, seconds)
                except Exception:
                    log.exception("on_step callback failed")

    def _drain(self) -> None:
        """Apply the inbox: register and add new requests, abort those asked for."""
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params, loop, q, deadline, hints = cmd
                try:
                    self.engine.add_request(prompt, params, rid, cache_hints=hints)
                except Exception as err:
                    self.release()
                    _put(loop, q, err if isinstance(err, ValueError) else RuntimeError(str(err)))
                    continue
                self._streams[rid] = (loop, q, deadline, time.monotonic())
            else:
                _, rid = cmd
                if self._streams.pop(rid, None) is not None:
                    self.release()
                self.engine.abort(rid)

    def _expire(self) -> None:
        now = time.monotonic()
        late = [rid for rid, (_, _, deadline, _) in self._streams.items()
                if deadline is not None and now > deadline]
        for rid in late:
            out = self.engine.abort(rid, "timeout")
            if out is not None:
                self._deliver([out])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is None:
                continue
            _put(target[0], target[1], out)
            if out.finished:
                took = time.monotonic() - target[3]
                self._service_seconds = (took if not self._service_seconds
                                         else 0.8 * self._service_seconds + 0.2 * took)
                del self._streams[out.request_id]
                self.release()

    def _fail_running(self, error: Exception) -> list[RequestOutput]:
        return self.engine.fail_running(error)

    def _stats_now(self) -> dict:
        e = self.engine
        out = {"running": e.num_running(), "waiting": e.num_waiting(), "state_bytes": e.state_bytes(),
               **e.stats}
        store = getattr(e.model, "expert_store", None)
        if store is not None:
            out["experts"] = store.stats()
        cache = e.prefix_cache
        if cache is not None:
            out["prefix_cache"] = {**cache.stats, "bytes": cache.bytes, "entries": len(cache),
                                   "budget_bytes": cache.budget_bytes}
            if cache.disk is not None:
                out["prefix_cache"]["disk"] = {**cache.disk.stats, "bytes": cache.disk.bytes}
        return out

    def _publish(self) -> None:
        snap = self._stats_now()
        with self._count:
            self._running = snap["running"]
        self._snapshot = snap


def _trim_heap() -> None:
    """glibc's malloc_trim(0): after a burst of requests glibc keeps the freed pages of its arenas, so
    the resident memory of an idle server stayed 4-6% above its baseline (measured with
    bench/serve_load.py; a trim brought it below). A no-op where the C library has no malloc_trim."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


class _Tagged:
    """Puts into a shared queue as (request_id, item)."""

    def __init__(self, sink: asyncio.Queue, request_id: str):
        self.sink, self.request_id = sink, request_id

    def put_nowait(self, item) -> None:
        self.sink.put_nowait((self.request_id, item))


def _put(loop: asyncio.AbstractEventLoop, q: asyncio.Queue, item) -> None:
    try:
        loop.call_soon_threadsafe(q.put_nowait, item)
    except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
        pass
