"""A model's own chat template (the Jinja `tokenizer.chat_template` of GGUF and HF tokenizers),
rendered the way transformers renders it: a sandboxed environment, trimmed blocks, `raise_exception`
and `tojson` available, the messages plus `add_generation_prompt`, `bos_token` and `eos_token`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any


class ChatTemplateError(ValueError):
    """The template failed to render, or it refused the conversation (raise_exception)."""


def _raise(message: str):
    raise ChatTemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"the model's chat template does not parse: {e}") from None


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
    from jinja2 import TemplateError

    if not messages:
        raise ChatTemplateError("messages is empty: give at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"messages[{i}] must be an object with 'role' and 'content'")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **extra)
    except ChatTemplateError:
        raise
    except TemplateError as e:
        raise ChatTemplateError(f"the model's chat template failed on these messages: {e}") from None
