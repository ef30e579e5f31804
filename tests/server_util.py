"""Start a moeflash server inside the test process on a free loopback port (uvicorn in a thread)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import uvicorn

from moeflash.engine import LLMEngine
from moeflash.engine.async_engine import AsyncLLMEngine
from moeflash.server.app import ServerConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, model, tokenizer, name: str, family: str, **config):
        self.engine = AsyncLLMEngine(LLMEngine(model, tokenizer, max_num_seqs=config.pop("max_num_seqs", 16),
                                               max_num_batched_tokens=64,
                                               max_state_bytes=config.pop("max_state_bytes", None),
                                               prefix_cache=config.pop("prefix_cache", None)),
                                     limits=config.pop("limits", None)).start()
        self.config = ServerConfig(served_model_name=name, max_model_len=config.pop("max_model_len", 512),
                                   chat_family=family, **config)
        self.app = create_app(self.engine, tokenizer, self.config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.shutdown()
