"""Request bodies of the OpenAI / DeepSeek APIs as pydantic models, and the error they map to.

Types are checked strictly (a string where OpenAI wants a number is an error, as OpenAI makes it),
ranges are OpenAI's (temperature 0-2, top_p 0-1, penalties -2..2, n >= 1, max_tokens >= 1), and
fields the API defines but moeflash does not implement are refused with a message instead of
silently ignored. Unknown extra fields are ignored, as vLLM does, so newer clients keep working.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 16
MAX_STOP = 4


class APIError(Exception):
    """An error response: HTTP status plus OpenAI's {"error": {message, type, param, code}} body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class Thinking(BaseModel):
    """DeepSeek's switch between thinking and non-thinking (chat) mode."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["enabled", "disabled"]


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    # None: the server's default (--default-temperature / --default-top-p; OpenAI's 1.0 unless set)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)  # 0 keeps only the most likely token
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None  # accepted and ignored, as the issue and OpenAI's own docs allow
    # vLLM's extensions
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's guided decoding (structured output); at most one, and not with response_format
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    # moeflash's extension: each generated token's routed experts, per MoE layer ("experts" in choices)
    return_experts: bool = False

    def grammar(self) -> tuple[str, Any, str] | None:
        """(kind, spec, param) of the structured output asked for, or None; APIError for a bad one."""
        asked = []
        rf = getattr(self, "response_format", None)
        if rf:
            kind = rf.get("type", "text")
            if kind == "json_object":
                asked.append(("json_object", None, "response_format"))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
                    raise APIError(400, "response_format.json_schema must be an object with a 'schema' object",
                                   param="response_format.json_schema")
                asked.append(("json_schema", js.get("schema", {}), "response_format.json_schema"))
            elif kind != "text":
                raise APIError(400, f"response_format type {kind!r} is not supported; choose text, json_object "
                               "or json_schema", param="response_format.type")
        if self.guided_json is not None:
            spec = self.guided_json
            if isinstance(spec, str):
                try:
                    spec = json.loads(spec)
                except json.JSONDecodeError as e:
                    raise APIError(400, f"guided_json is not valid JSON ({e.msg})", param="guided_json") from None
            if not isinstance(spec, dict):
                raise APIError(400, "guided_json must be a JSON schema object", param="guided_json")
            asked.append(("json_schema", spec, "guided_json"))
        if self.guided_regex is not None:
            asked.append(("regex", self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            asked.append(("choice", self.guided_choice, "guided_choice"))
        if len(asked) > 1:
            raise APIError(400, f"give one of {', '.join(a[2] for a in asked)}, not several", param=asked[1][2])
        return asked[0] if asked else None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(v)}")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty strings")
        elif v == "":
            raise ValueError("stop must be a non-empty string")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by moeflash")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, str) or (isinstance(v, list) and v and isinstance(v[0], int)):
            v = [v]
        if not v:
            raise ValueError("prompt is empty")
        for p in v:
            if (isinstance(p, str) and not p) or (isinstance(p, list) and not p):
                raise ValueError("prompt is empty")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v):
        if v:
            raise ValueError("echo is not supported by moeflash")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise ValueError("suffix (fill-in-the-middle) is not supported by moeflash")
        return v


class ChatCompletionRequest(_Sampling):
    messages: list[Any] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    thinking: Thinking | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None

    def functions(self) -> tuple[list[dict] | None, str]:
        """(the OpenAI function objects offered, or None; the choice: "none", "auto", "required" or a
        function's name), checked; APIError names the field at fault."""
        tools = self.tools or []
        fns = []
        for j, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
                raise APIError(400, f'tools[{j}] must be {{"type": "function", "function": {{"name", "description", '
                               '"parameters"}}', param=f"tools[{j}]")
            name = fn.get("name")
            if not isinstance(name, str) or not name or any(ch in name for ch in '"<>\n'):
                raise APIError(400, f"tools[{j}].function.name must be a non-empty name", param=f"tools[{j}].function.name")
            params = fn.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, dict):
                raise APIError(400, f"tools[{j}].function.parameters must be a JSON schema object",
                               param=f"tools[{j}].function.parameters")
            fns.append({k: v for k, v in {"name": name, "description": fn.get("description"),
                                          "parameters": params}.items() if v is not None})
        if len({f["name"] for f in fns}) != len(fns):
            raise APIError(400, "two tools share a name", param="tools")
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if fns else "none")
        if isinstance(choice, dict):
            fn = choice.get("function") if choice.get("type") == "function" else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if name not in {f["name"] for f in fns}:
                raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
            choice = name
        elif choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice {choice!r} must be none, auto, required or "
                           '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        elif choice == "required" and not fns:
            raise APIError(400, "tool_choice is required but no tools are given", param="tool_choice")
        return (fns or None) if choice != "none" else None, choice



def parse(model: type[BaseModel], body: Any) -> BaseModel:
    """Validate a decoded JSON body, turning the first problem into an OpenAI 400 error."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"]
        if err["type"] == "missing":
            msg = f"'{param}' is a required property"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        else:
            got = err.get("input")
            msg = f"invalid value for '{param}': {msg}" + (f" (got {got!r})" if not isinstance(got, (dict, list)) else "")
        raise APIError(400, msg, param=param, code="invalid_value" if err["type"] != "missing" else None) from None
