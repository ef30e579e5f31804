"""The HTTP API: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (plain and streamed as
server-sent events), DeepSeek's usage and reasoning fields, /health and Prometheus /metrics.

HTTP only: requests become token ids and SamplingParams, the shared engine loop
(`AsyncLLMEngine`) produces outputs, and outputs become JSON. Every failure a client can cause is an
OpenAI-style error body with a 4xx status; a client that goes away has its requests aborted before
the next step.

Under load it stays bounded and responsive: a request is refused up front when it asks for more
sequences, prompt tokens or max_tokens than `ServerConfig` allows (400), and with 429 and
`Retry-After` when the waiting queue is full; tokenizing and chat rendering run on worker threads,
and nothing here waits for the engine's step. Message content is tokenized as plain text (special
tokens written in it stay text) unless `trust_special_tokens`. A 500 never carries internal text:
the details go to the log under the request id the body names.
"""

from __future__ import annotations

import asyncio
import codecs
import hmac
import json
import logging
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.async_engine import AsyncLLMEngine, EngineDeadError, Overloaded
from ..engine.sampler import SamplingParams
from .chat import ChatError, ReplyParser, make_chat_encoder, normalize_messages
from .metrics import CONTENT_TYPE, Metrics
from .protocol import MAX_N, APIError, ChatCompletionRequest, CompletionRequest, parse


@dataclass
class ServerConfig:
    served_model_name: str
    max_model_len: int
    api_key: str | None = None
    chat_family: str = "template"          # "deepseek_v4" selects DeepSeek's V4 chat encoding
    price_input: float = 0.0               # dollars per million prompt tokens (cache misses)
    price_output: float = 0.0              # dollars per million completion tokens
    price_cached: float = 0.0              # dollars per million prompt tokens served from cache
    max_body_bytes: int = 4 << 20
    default_temperature: float = 1.0      # used when a request gives none (OpenAI's default: 1.0)
    default_top_p: float = 1.0
    max_seqs_per_request: int = 16        # prompts x n of one request
    max_prompt_tokens: int | None = None   # summed over a request's prompts (None: max_model_len)
    max_tokens_limit: int | None = None    # a request's max_tokens at most; also its default (None: no cap)
    trust_special_tokens: bool = False     # parse special-token strings in chat message content
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        if self.max_prompt_tokens is None:
            self.max_prompt_tokens = self.max_model_len
        for name in ("max_seqs_per_request", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")

    def limits(self) -> dict[str, float]:
        """The request-shape limits, for /metrics."""
        return {"max_seqs_per_request": self.max_seqs_per_request, "max_prompt_tokens": self.max_prompt_tokens,
                "max_tokens": self.max_tokens_limit or self.max_model_len, "max_model_len": self.max_model_len,
                "max_body_bytes": self.max_body_bytes}


log = logging.getLogger("moeflash.server")


def create_app(engine: AsyncLLMEngine, tokenizer, config: ServerConfig, grammars=None) -> FastAPI:
    """`grammars`: something with `compile(kind, spec)` for structured output (default: a
    `moeflash.structured.GrammarCompiler` over the tokenizer, made on the first request that asks)."""
    app = FastAPI(title="moeflash", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: _openapi(app, config, engine.engine.config.vocab_size)
    limits = {**config.limits(), "max_waiting_sequences": engine.limits.max_waiting,
              "request_timeout_seconds": engine.limits.request_timeout or 0,
              "max_state_bytes": engine.engine.max_state_bytes or 0}
    metrics = Metrics(engine.stats, config.served_model_name, limits)
    engine.on_step = lambda outputs, seconds: metrics.on_step(engine.engine.stats)
    encoder = make_chat_encoder(tokenizer, config.chat_family)
    # tokenizing and chat rendering run here, off the event loop: two threads bound the CPU they take
    # from the engine on a small machine (and the malloc arenas a pool of many threads would keep)
    text_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="moeflash-text")
    app.router.on_shutdown.append(lambda: text_pool.shutdown(wait=False, cancel_futures=True))
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config

    def error(e: APIError, headers: dict | None = None) -> JSONResponse:
        metrics.errors.labels(config.served_model_name, str(e.status)).inc()
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error(e, getattr(e, "headers", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        msg = (f"unknown endpoint {request.method} {request.url.path}" if e.status_code == 404
               else f"{request.method} is not allowed on {request.url.path}" if e.status_code == 405
               else str(e.detail))
        return error(APIError(e.status_code, msg, kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # a bug: log it, say only that, keep serving
        ref = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", ref, request.method, request.url.path, exc_info=e)
        return error(_internal_error(ref))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            token = header[7:] if header[:7].lower() == "bearer " else ""
            if not token:
                return error(APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key"))
            if not hmac.compare_digest(token.encode(), config.api_key.encode()):
                return error(APIError(401, "incorrect API key provided", code="invalid_api_key"))
        return await call_next(request)

    # -- the chat page: static files, no build step (they call the /v1 API like any client) -------
    static = Path(__file__).parent / "static"
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(static / "index.html", media_type="text/html")

    # -- endpoints --------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.running:
            raise APIError(503, "the engine loop is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(config)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != config.served_model_name:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return _model_card(config)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = parse(CompletionRequest, await _json_body(request, config))
        _check_model(req.model, config)
        _check_shape(len(req.prompt) * req.n, config)
        lease = _admit(len(req.prompt) * req.n)  # before tokenizing: a full queue answers 429 at once

        def encode():  # the whole prompt is the caller's: special-token strings in it count
            return [p if isinstance(p, list) else tokenizer.encode(p, add_bos=_add_bos(tokenizer))
                    for p in req.prompt]

        try:
            loop = asyncio.get_running_loop()
            try:
                prompts = await loop.run_in_executor(text_pool, encode)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
            for p in prompts:
                _check_ids(p, tokenizer, engine)
            grammar = await loop.run_in_executor(text_pool, _grammar, req)
            return await _run(request, "text_completion", req, prompts, None, lease, grammar=grammar)
        except BaseException:
            lease.close()
            raise

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await _json_body(request, config))
        _check_model(req.model, config)
        thinking = None if req.thinking is None else req.thinking.type == "enabled"
        _check_shape(req.n, config)
        functions, tool_choice = req.functions()
        lease = _admit(req.n)

        def encode():
            messages = normalize_messages(req.messages)
            if thinking and not encoder.supports_thinking:
                raise ChatError("this model has no thinking mode", "thinking")
            ids = encoder.encode_ids(tokenizer, messages, thinking, config.trust_special_tokens, starts,
                                     tools=functions)
            return ids

        starts: list[int] = []  # where each message's content starts: the last one is a cache hint
        try:
            loop = asyncio.get_running_loop()
            try:
                ids = await loop.run_in_executor(text_pool, encode)
            except ChatError as e:
                raise APIError(400, e.message, param=e.param) from None
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
            if functions and tool_choice not in ("auto", "none"):  # required, or one named: a call is forced
                if req.grammar() is not None:
                    raise APIError(400, "tool_choice that forces a call cannot be combined with response_format or "
                                   "guided_* output", param="tool_choice")
                from .dsml import call_grammar
                from .hermes import hermes_grammar

                called = functions if tool_choice == "required" else [f for f in functions if f["name"] == tool_choice]
                dsml_id = (getattr(tokenizer, "special_tokens", None) or {}).get("｜DSML｜")
                lark = (hermes_grammar(called, req.parallel_tool_calls) if encoder.tool_format == "hermes"
                        else call_grammar(called, req.parallel_tool_calls, dsml_id))
                grammar = await loop.run_in_executor(text_pool, _compile, "lark", lark, "tool_choice")
            else:
                grammar = await loop.run_in_executor(text_pool, _grammar, req)
            return await _run(request, "chat.completion", req, [ids], bool(thinking), lease, starts[-1:],
                              grammar=grammar, tools=bool(functions))
        except BaseException:
            lease.close()
            raise

    # -- structured output ------------------------------------------------------------------------
    compiled: OrderedDict = OrderedDict()  # (kind, spec as JSON) -> grammar, the most recent 64
    holder = {"grammars": grammars}

    def _grammar(req):
        """The compiled grammar a request asks for (response_format / guided_*), or None. Runs on
        the text pool (compiling reads the schema); a schema that cannot be enforced is a 400."""
        asked = req.grammar()
        if asked is None:
            return None
        return _compile(*asked)

    def _compile(kind, spec, param):
        if tokenizer is None:
            raise APIError(400, "structured output needs a tokenizer; this model has none", param=param)
        if holder["grammars"] is None:
            try:
                from ..structured import GrammarCompiler

                holder["grammars"] = GrammarCompiler(tokenizer, engine.engine.config.vocab_size,
                                                     engine.engine.config.eos_token_id)
            except ValueError as e:  # llguidance missing
                raise APIError(400, str(e), param=param) from None
        key = (kind, json.dumps(spec, sort_keys=True))
        if key in compiled:
            compiled.move_to_end(key)
            return compiled[key]
        try:
            g = holder["grammars"].compile(kind, spec)
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None
        compiled[key] = g
        if len(compiled) > 64:
            compiled.popitem(last=False)
        return g

    # -- generation -------------------------------------------------------------------------------
    def _admit(sequences: int) -> "_Lease":
        """Reserve room for a request's sequences in the engine, or answer 429 with Retry-After."""
        try:
            engine.reserve(sequences)
        except Overloaded as e:
            err = APIError(429, str(e), "rate_limit_error", code="server_busy")
            err.headers = {"Retry-After": str(e.retry_after)}
            raise err from None
        return _Lease(engine, sequences)

    async def _run(request: Request, kind: str, req, prompts: list[list[int]], thinking: bool | None,
                   lease: "_Lease", cache_hints: list[int] = (), grammar=None, tools: bool = False):
        chat = kind == "chat.completion"
        total = sum(len(p) for p in prompts)
        if total > config.max_prompt_tokens:
            raise APIError(400, f"the prompts hold {total} tokens; this server accepts at most "
                           f"{config.max_prompt_tokens} prompt tokens per request",
                           param="messages" if chat else "prompt", code="prompt_too_long")
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        cap = config.max_tokens_limit
        if asked is not None and cap is not None and asked > cap:
            raise APIError(400, f"max_tokens is {asked}; this server generates at most {cap} tokens per request",
                           param="max_completion_tokens" if getattr(req, "max_completion_tokens", None)
                           else "max_tokens", code="max_tokens_exceeded")
        max_tokens = asked or max(1, min(cap or config.max_model_len,
                                         config.max_model_len - max(len(p) for p in prompts)))
        for p in prompts:
            if len(p) + max_tokens > config.max_model_len:
                raise APIError(400, f"this model's maximum context length is {config.max_model_len} tokens; "
                               f"the prompt has {len(p)} tokens and max_tokens is {max_tokens} ({len(p) + max_tokens} "
                               "in all); shorten the prompt or lower max_tokens",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
        # top alternatives per token (0: the chosen token's logprob only); None: no logprobs
        n_lp = ((req.top_logprobs or 0) if req.logprobs else None) if chat else req.logprobs
        params = []
        for i in range(len(prompts) * req.n):
            try:
                params.append(SamplingParams(
                    max_tokens=max_tokens,
                    temperature=config.default_temperature if req.temperature is None else req.temperature,
                    top_p=(config.default_top_p if req.top_p is None else req.top_p) or 1e-9,
                    top_k=req.top_k, min_p=req.min_p, seed=None if req.seed is None else req.seed + i,
                    stop=req.stop, stop_token_ids=req.stop_token_ids, presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                    logprobs=n_lp, ignore_eos=req.ignore_eos, skip_special_tokens=not (thinking or tools),
                    constraint=grammar, return_experts=req.return_experts))
            except ValueError as e:
                raise APIError(400, str(e)) from None
        for i, sp in enumerate(params[::req.n]):  # state memory and other engine checks, per prompt
            try:
                engine.check_request(prompts[i], sp)
            except ValueError as e:
                param = "return_experts" if "return_experts" in str(e) else "messages" if chat else "prompt"
                raise APIError(400, str(e), param=param) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        jobs = [(i, prompts[i // req.n], params[i]) for i in range(len(params))]
        parallel = getattr(req, "parallel_tool_calls", True)
        parsers = {i: ReplyParser(encoder.reasoning_parser(bool(thinking)), tools, parallel,
                                  encoder.tool_format or "dsml")
                   for i, _, _ in jobs} if chat else {}
        head = {"id": rid, "object": kind + (".chunk" if chat and req.stream else ""), "created": created,
                "model": config.served_model_name}
        if req.stream:
            stream = _merged(request, rid, jobs, lease, cache_hints, watch_disconnect=False)  # Starlette watches
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _sse(stream, head, chat, parsers, prompts, req.n, include_usage)

            async def cleanup():  # after the response, whether it ended or the client left
                await body.aclose()
                await stream.aclose()
                lease.close()

            return StreamingResponse(body, media_type="text/event-stream", background=BackgroundTask(cleanup),
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        stream = _merged(request, rid, jobs, lease, cache_hints, watch_disconnect=True)
        choices: dict[int, dict] = {i: {"text": "", "logprobs": [], "finish_reason": None, "tokens": 0,
                                        "cached": 0} for i, _, _ in jobs}
        try:
            async for i, out in stream:
                c = choices[i]
                c["text"] += out.new_text
                c["tokens"] = len(out.token_ids)
                c["cached"] = out.cached_tokens
                if out.new_logprobs:
                    c["logprobs"].extend(out.new_logprobs)
                if out.new_experts:
                    c.setdefault("experts", []).extend(out.new_experts)
                if out.finished:
                    c["finish_reason"] = out.finish_reason
        finally:
            await stream.aclose()
            lease.close()
        if all(c["finish_reason"] == "error" for c in choices.values()):
            raise _internal_error(rid)
        if any(c["finish_reason"] is None for c in choices.values()):  # the client left: nobody reads this
            return Response(status_code=499)
        body = dict(head)
        body["choices"] = [_final_choice(i, c, chat, parsers.get(i), n_lp, tokenizer, rid) for i, c in choices.items()]
        for choice, c in zip(body["choices"], choices.values()):
            if "experts" in c:
                choice["experts"] = c["experts"]
        body["usage"] = _usage(prompts, req.n, sum(c["tokens"] for c in choices.values()), config,
                               {i: c["cached"] for i, c in choices.items()})
        return body

    async def _merged(request: Request, rid: str, jobs, lease: "_Lease", cache_hints,
                      watch_disconnect: bool) -> AsyncIterator[tuple[int, Any]]:
        """Outputs of every choice as they come: (choice index, RequestOutput). Adds the jobs to the
        engine (their sequences reserved by `lease`), observes latency metrics, and aborts whatever is
        unfinished when it stops: the consumer closed it, or (`watch_disconnect`) the client left."""
        sink: asyncio.Queue = asyncio.Queue()
        t0 = time.monotonic()
        index, last = {}, {}
        try:
            for i, prompt, params in jobs:
                erid = f"{rid}-{i}"
                engine.add_request(prompt, params, erid, reserved=True, sink=sink, cache_hints=cache_hints)
                lease.transfer()
                index[erid] = i
        except EngineDeadError as e:
            for erid in index:
                engine.abort(erid)
            raise APIError(503, str(e), "server_error") from None
        open_ids = set(index)
        watcher = asyncio.ensure_future(_disconnected(request)) if watch_disconnect else None
        try:
            while open_ids:
                getter = asyncio.ensure_future(sink.get())
                if watcher is not None:
                    await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        metrics.disconnects.labels(config.served_model_name).inc()
                        return
                erid, item = await getter
                i = index[erid]
                if isinstance(item, BaseException):
                    open_ids.discard(erid)
                    if isinstance(item, EngineDeadError):
                        raise APIError(503, str(item), "server_error")
                    if isinstance(item, ValueError):
                        raise APIError(400, str(item))
                    log.error("request %s failed", erid, exc_info=item)
                    raise _internal_error(rid)
                now = time.monotonic()
                if item.new_token_ids:
                    if erid not in last:
                        metrics.ttft.labels(config.served_model_name).observe(now - t0)
                    else:
                        metrics.itl.labels(config.served_model_name).observe(now - last[erid])
                    last[erid] = now
                if item.finished:
                    open_ids.discard(erid)
                    metrics.e2e.labels(config.served_model_name).observe(now - t0)
                    metrics.requests.labels(config.served_model_name, item.finish_reason).inc()
                    if item.finish_reason == "error":
                        log.error("request %s failed in the engine: %s", erid, item.error)
                yield i, item
        except (GeneratorExit, asyncio.CancelledError):  # the stream's client left
            metrics.disconnects.labels(config.served_model_name).inc()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            for erid in open_ids:  # closed early: abort what is still running
                engine.abort(erid)

    async def _sse(stream, head, chat, parsers, prompts, n, include_usage) -> AsyncIterator[str]:
        tokens, cached = {}, {}
        first = set()
        try:
            async for i, out in stream:
                tokens[i] = len(out.token_ids)
                cached[i] = out.cached_tokens
                lp = _logprobs(out.new_logprobs, chat, tokenizer) if out.new_logprobs else None
                finish = out.finish_reason if out.finished else None
                if chat:
                    delta: dict[str, Any] = {}
                    if i not in first:
                        first.add(i)
                        delta["role"] = "assistant"
                    parser = parsers[i]
                    before = len(parser.calls)
                    reasoning, content, calls = parser.push(out.new_text)
                    if out.finished:
                        r2, c2, k2 = parser.flush()
                        reasoning, content, calls = reasoning + r2, content + c2, calls + k2
                    if reasoning:
                        delta["reasoning_content"] = reasoning
                    if content or "role" in delta:
                        delta["content"] = content
                    if calls:
                        delta["tool_calls"] = [_tool_call(c, before + j, head["id"], i) for j, c in enumerate(calls)]
                    if finish == "stop" and parser.calls:
                        finish = "tool_calls"
                    if not delta and finish is None and lp is None:
                        continue
                    choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
                else:
                    choice = {"index": i, "text": out.new_text, "logprobs": lp, "finish_reason": finish}
                if out.new_experts:  # return_experts: per token of this chunk, per MoE layer, the expert ids
                    choice["experts"] = out.new_experts
                chunk = dict(head, choices=[choice])
                if include_usage:
                    chunk["usage"] = None
                yield _event(chunk)
            if include_usage:
                yield _event(dict(head, choices=[], usage=_usage(prompts, n, sum(tokens.values()), config, cached)))
            yield "data: [DONE]\n\n"
        except APIError as e:  # the stream has started: report in-band, as OpenAI does
            yield _event(e.body())
            yield "data: [DONE]\n\n"

    return app


# -- helpers ---------------------------------------------------------------------------------------
_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _openapi(app: FastAPI, config: ServerConfig, vocab_size: int) -> dict:
    """The API's OpenAPI document (/openapi.json): the request bodies come from the pydantic models
    the endpoints parse with (they read the raw body themselves, to answer with OpenAI's errors),
    and every status an endpoint answers with is listed, so a schema fuzzer can check them."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title="moeflash", version="1", routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = _ERROR_SCHEMA
    error = {"description": "an OpenAI error body",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, model in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest)):
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        props = js["properties"]
        props["model"] = {"type": "string", "enum": [config.served_model_name]}  # the one model served
        for key in ("max_tokens", "max_completion_tokens"):  # this server's limits, as schema maxima
            if key in props and config.max_tokens_limit:
                props[key] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": config.max_tokens_limit},
                                        {"type": "null"}]}
        props["n"] = {"type": "integer", "minimum": 1, "maximum": min(MAX_N, config.max_seqs_per_request)}
        if "prompt" in props:
            ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}
            props["prompt"] = {"anyOf": [{"type": "string", "minLength": 1},
                                         {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                                         ids, {"type": "array", "minItems": 1, "items": ids}]}
        if "messages" in props:
            props["messages"] = {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["role", "content"],
                "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                               "content": {"type": "string"}}}}
        schemas.update(js.pop("$defs", {}))
        schemas[model.__name__] = js
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        op["responses"] = {"200": {"description": "the completion (JSON, or server-sent events when streamed)",
                                   "content": {"application/json": {"schema": {"type": "object"}},
                                               # each server-sent event: a data line (JSON, or [DONE])
                                               "text/event-stream": {"schema": {
                                                   "type": "object", "required": ["data"],
                                                   "properties": {"data": {"type": "string"}}}}}},
                           **{str(c): error for c in (400, 401, 404, 413, 415, 429, 499, 500, 503)}}
    doc["paths"]["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}
    for path, op in ((p, o) for p, item in doc["paths"].items() for o in item.values()):
        op.setdefault("responses", {}).update({str(c): error for c in (401, 404, 503) if str(c) not in op["responses"]})
    app.openapi_schema = doc
    return doc


class _Lease:
    """Sequences reserved against the waiting limit and not yet handed to the engine (which releases
    them as they finish). `close` gives back whatever was never handed over; it runs after every
    response, and on garbage collection as a last resort."""

    def __init__(self, engine: AsyncLLMEngine, sequences: int):
        self.engine, self.left = engine, sequences

    def transfer(self) -> None:
        self.left -= 1

    def close(self) -> None:
        if self.left > 0:
            self.engine.release(self.left)
        self.left = 0

    def __del__(self):
        self.close()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (its body has been read already, so the next ASGI message is
    the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _internal_error(ref: str) -> APIError:
    return APIError(500, f"the server failed on this request; its log has the details under {ref}",
                    "server_error")


def _check_shape(sequences: int, config: ServerConfig) -> None:
    if sequences > config.max_seqs_per_request:
        raise APIError(400, f"this request asks for {sequences} sequences (prompts x n); the server runs at most "
                       f"{config.max_seqs_per_request} per request", param="n", code="too_many_sequences")


_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _event(obj) -> str:
    """One server-sent event. U+0085, U+2028 and U+2029 (which JSON may leave raw, and which clients
    that split lines with str.splitlines take for line ends) are written as escapes, so an event is
    always one line whatever the model generated."""
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


def _model_card(config: ServerConfig) -> dict:
    return {"id": config.served_model_name, "object": "model", "created": config.created, "owned_by": "moeflash",
            "max_model_len": config.max_model_len}


def _check_model(name: str, config: ServerConfig) -> None:
    if name != config.served_model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves "
                       f"'{config.served_model_name}'", param="model", code="model_not_found")


def _add_bos(tokenizer) -> bool:
    return bool(getattr(tokenizer, "add_bos_token", True)) and tokenizer.bos_token_id is not None


def _check_ids(ids: list[int], tokenizer, engine: AsyncLLMEngine) -> None:
    vocab = engine.engine.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="prompt")


async def _json_body(request: Request, config: ServerConfig):
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {ctype or 'nothing'!r}",
                       code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
        raise APIError(413, f"the request body is {int(length)} bytes; the limit is {config.max_body_bytes}",
                       code="request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > config.max_body_bytes:
            raise APIError(413, f"the request body exceeds the limit of {config.max_body_bytes} bytes",
                           code="request_too_large")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def _usage(prompts: list[list[int]], n: int, completion: int, config: ServerConfig,
           cached_by_choice: dict[int, int] | None = None) -> dict:
    """Usage and cost. Each prompt counts once (its n choices share one prefill); its cached tokens are
    what its choices took from the prefix cache (the most any of them took)."""
    prompt = sum(len(p) for p in prompts)
    cached_by_choice = cached_by_choice or {}
    cached = sum(max((cached_by_choice.get(k * n + j, 0) for j in range(n)), default=0)
                 for k in range(len(prompts)))
    cost = ((prompt - cached) * config.price_input + cached * config.price_cached
            + completion * config.price_output) / 1e6
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt - cached,
            "cost": round(cost, 10)}


def _token_str(tokenizer, tid: int) -> tuple[str, bytes]:
    """(token, bytes) as OpenAI reports them: the token's text, or for a piece of a UTF-8 character
    (whose text alone is not valid) "bytes:" and its bytes escaped, e.g. "bytes:\\xe2\\x80"."""
    raw = tokenizer.token_bytes(tid)
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def _logprobs(lps, chat: bool, tokenizer):
    if chat:
        content = []
        for lp in lps:
            tok, raw = _token_str(tokenizer, lp.token_id)
            top = []
            for i, v in lp.top or []:
                t, r = _token_str(tokenizer, i)
                top.append({"token": t, "logprob": v, "bytes": list(r)})
            content.append({"token": tok, "logprob": lp.logprob, "bytes": list(raw), "top_logprobs": top})
        return {"content": content}
    tokens = [_token_str(tokenizer, lp.token_id) for lp in lps]
    offsets, pos = [], 0
    chars = codecs.getincrementaldecoder("utf-8")("replace")  # a character counts where it completes
    for _, raw in tokens:
        offsets.append(pos)
        pos += len(chars.decode(raw))
    tops = []
    for lp in lps:  # keyed by token text: two ids with one text keep the likelier (listed first)
        top: dict[str, float] = {}
        for i, v in lp.top or []:
            top.setdefault(_token_str(tokenizer, i)[0], v)
        tops.append(top)
    return {"tokens": [t for t, _ in tokens], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": tops, "text_offset": offsets}


def _final_choice(i: int, c: dict, chat: bool, parser, n_lp, tokenizer, rid: str = "") -> dict:
    lp = _logprobs(c["logprobs"], chat, tokenizer) if n_lp is not None else None
    if not chat:
        return {"index": i, "text": c["text"], "logprobs": lp, "finish_reason": c["finish_reason"]}
    reasoning, content, _ = parser.push(c["text"])
    r2, c2, _ = parser.flush()
    finish = c["finish_reason"]
    message = {"role": "assistant", "content": content + c2}
    if reasoning + r2:
        message["reasoning_content"] = reasoning + r2
    if parser.calls:
        message["tool_calls"] = [_tool_call(call, j, rid, i, stream=False) for j, call in enumerate(parser.calls)]
        message["content"] = message["content"] or None
        if finish == "stop":
            finish = "tool_calls"
    return {"index": i, "message": message, "logprobs": lp, "finish_reason": finish}


def _tool_call(call, j: int, rid: str, choice: int, stream: bool = True) -> dict:
    """An OpenAI tool call (a delta's, with its index, when streamed); ids are unique per response."""
    body = {"id": f"call_{rid[-12:]}_{choice}_{j}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments_json()}}
    return {"index": j, **body} if stream else body
