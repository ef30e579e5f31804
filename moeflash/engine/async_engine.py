"""One engine loop shared by many concurrent callers (the server's HTTP requests).

`LLMEngine` is synchronous: whoever calls `step` advances every running request. Here one background
thread owns that loop; callers on an asyncio event loop add requests and await their outputs
through per-request queues, so requests arriving at any time join the same batched steps
(continuous batching across HTTP requests). A caller that stops listening (a client that
disconnects) aborts its request, which frees its state at once. An exception inside a step fails
the requests of that step with the error and the loop carries on: the engine never dies with one
bad request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from .engine import LLMEngine
from .sampler import SamplingParams
from .sequence import RequestOutput

log = logging.getLogger("moeflash.engine")


class EngineDeadError(RuntimeError):
    """The engine loop is not running (shut down, or never started)."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[list[RequestOutput], float], None] | None = None):
        """`on_step(outputs, seconds)` is called on the loop thread after every step (for metrics)."""
        self.engine = engine
        self.on_step = on_step
        self._lock = threading.Lock()      # every call into `engine` holds it
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
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
        with self._lock:
            for rid in list(self._streams):
                self.engine.abort(rid)
        for rid, (loop, queue) in list(self._streams.items()):
            _put(loop, queue, EngineDeadError("the server is shutting down"))
        self._streams.clear()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> asyncio.Queue:
        """Queue a request (validated now: ValueError for bad input) and return its output queue.
        Call from a coroutine: outputs are delivered on the calling event loop."""
        if not self.running:
            raise EngineDeadError("the engine loop is not running")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.add_request(prompt_token_ids, params, request_id)
            self._streams[request_id] = (loop, queue)
        self._wake.set()
        return queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs as steps produce them; leaving early (an exception, a
        cancelled task, a closed generator) aborts the request."""
        queue = self.add_request(prompt_token_ids, params, request_id)
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def stats(self) -> dict:
        """A consistent snapshot of the engine's gauges and counters."""
        with self._lock:
            e = self.engine
            out = {"running": e.num_running(), "waiting": e.num_waiting(), "state_bytes": e.state_bytes(),
                   **e.stats}
            store = getattr(e.model, "expert_store", None)
            if store is not None:
                out["experts"] = store.stats()
            return out

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                busy = self.engine.has_unfinished()
                outputs, error, seconds = [], None, 0.0
                if busy:
                    t0 = time.perf_counter()
                    try:
                        outputs = self.engine.step()
                    except Exception as e:  # fail this step's requests, keep serving the others
                        log.exception("engine step failed")
                        error = e
                    seconds = time.perf_counter() - t0
                    if error is not None:
                        self._fail_running(error)
                    else:
                        self._deliver(outputs)
            if not busy:
                self._wake.wait(0.1)
                self._wake.clear()
            elif error is None and self.on_step is not None:
                try:
                    self.on_step(outputs, seconds)
                except Exception:
                    log.exception("on_step callback failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is None:
                continue
            _put(*target, out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_running(self, error: Exception) -> None:
        for seq in list(self.engine.scheduler.running):
            rid = seq.request_id
            self.engine.abort(rid)
            target = self._streams.pop(rid, None)
            if target is not None:
                _put(*target, RuntimeError(f"the engine failed on this request: {error}"))


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
        pass
