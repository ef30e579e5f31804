"""Structured output: a grammar that every generated token must keep the text inside of.

`GrammarCompiler(tokenizer, vocab_size, eos_token_id)` builds, once per tokenizer, llguidance's view of
the vocabulary (each id's bytes). `compile(kind, spec)` turns a request's wish into a `Grammar`:
- "json_object": any JSON object (OpenAI's `response_format: {"type": "json_object"}`);
- "json_schema": a JSON Schema (OpenAI's `json_schema`, vLLM's `guided_json`);
- "regex": a regular expression (vLLM's `guided_regex`);
- "choice": one of a list of strings (vLLM's `guided_choice`).
A schema or pattern llguidance cannot honour raises `GrammarError` naming what it refused.

The engine knows nothing of grammars: a `Grammar` is a factory whose `new()` gives each sequence a
`Constraint` with `mask_(logits_row)` (disallowed tokens to -inf, in place) and `accept(token)`. The
end-of-sequence token is allowed exactly when the text so far is complete.

llguidance was picked by measurement (BENCHMARKS.md, "Structured output"; `bench/structured.py`): on
SmolLM2's 49,152-token vocabulary and a three-field schema it compiles in 1 ms and gives a token's mask
in 118 us (median), against outlines-core's 210 ms index build and 7.6 ms per mask; in the engine the
mask costs 2.4% of SmolLM2's 12.8 ms decode step.
"""

from __future__ import annotations

import json

import torch

KINDS = ("json_object", "json_schema", "regex", "choice", "lark")
_BITS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """A schema, pattern or choice list that cannot be enforced; the message names the reason."""


def _llg():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401  (bitmask helpers)
    except ImportError:
        raise GrammarError("structured output needs the `llguidance` package: pip install llguidance") from None
    return llguidance


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: each id's bytes, the special ids, an encoder."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None):
        self.tokens = []
        for i in range(vocab_size):
            try:
                self.tokens.append(tokenizer.token_bytes(i))
            except (KeyError, ValueError, IndexError):
                self.tokens.append(b"")  # an id the tokenizer does not define (padding rows)
        self.eos_token_id = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        specials = getattr(tokenizer, "special_tokens", None) or {}
        self.special_token_ids = sorted(i for i in specials.values() if i < vocab_size)
        self._tok = tokenizer

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, special=False)


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None = None):
        llg = _llg()
        self.vocab_size = vocab_size
        self._llt = llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary(tokenizer, vocab_size, eos_token_id)))

    def compile(self, kind: str, spec=None) -> "Grammar":
        try:
            return self._compile(kind, spec)
        except GrammarError:
            raise
        except Exception as e:  # llguidance's own errors on a pattern or schema it cannot read
            raise GrammarError(str(e) or type(e).__name__) from None

    def _compile(self, kind: str, spec) -> "Grammar":
        llg = _llg()
        M = llg.LLMatcher
        if kind == "json_object":
            grammar = M.grammar_from_json_schema(json.dumps({"type": "object"}))
        elif kind == "json_schema":
            if not isinstance(spec, dict):
                raise GrammarError("a JSON schema must be an object")
            grammar = M.grammar_from_json_schema(json.dumps(spec))
        elif kind == "regex":
            if not isinstance(spec, str) or not spec:
                raise GrammarError("a regular expression must be a non-empty string")
            grammar = M.grammar_from_regex(spec)
        elif kind == "lark":  # a grammar the server wrote (tool calls), in llguidance's Lark dialect
            grammar = M.grammar_from_lark(spec)
        elif kind == "choice":
            if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
                raise GrammarError("choices must be a non-empty list of non-empty strings")
            grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
        else:
            raise GrammarError(f"unknown grammar kind {kind!r}; choose {', '.join(KINDS)}")
        is_error, messages = M.validate_grammar_with_warnings(grammar, self._llt)
        if is_error:
            raise GrammarError("; ".join(messages) or "the grammar is not valid")
        return Grammar(self, grammar, kind)


class Grammar:
    """A compiled grammar; `new()` starts a sequence's constraint."""

    def __init__(self, compiler: GrammarCompiler, grammar: str, kind: str):
        self.compiler, self.grammar, self.kind = compiler, grammar, kind

    def new(self) -> "Constraint":
        return Constraint(self)


class Constraint:
    def __init__(self, grammar: Grammar):
        llg = _llg()
        self._llg = llg
        self.matcher = llg.LLMatcher(grammar.compiler._llt, grammar.grammar)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.vocab_size = grammar.compiler.vocab_size
        self._bitmask = llg.torch.allocate_token_bitmask(1, self.vocab_size)

    def mask_(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of every token the grammar forbids here to -inf. The bitmask (32 tokens
        per int32) is unpacked here: llguidance's own apply function is TorchScript, whose first call
        compiles for over a second."""
        self._llg.torch.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        allowed = ((self._bitmask[0].unsqueeze(1) >> _BITS) & 1).reshape(-1)[: logits.shape[0]].bool()
        logits.masked_fill_(~allowed.to(logits.device, non_blocking=True), float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} breaks the grammar: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Nothing more may follow (the engine stops the sequence)."""
        return self.matcher.is_stopped()
