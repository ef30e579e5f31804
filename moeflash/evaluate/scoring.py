"""Scoring a model on text: bits per byte, the log-likelihood of a continuation, a greedy answer.

Bits per byte (total negative log2-likelihood of a text's tokens / its UTF-8 bytes) compares models
whose tokenizers differ: the text is the same bytes whatever cuts it into tokens. A long text is scored
in windows of `window` tokens, as lm-evaluation-harness scores rolling log-likelihood: the first window
is predicted from the beginning-of-sequence token, each later one from the last token before it, so
every token of the text is predicted exactly once.
"""

from __future__ import annotations

import math

import torch

from ..engine.forward import run_tokens

LN2 = math.log(2.0)


def _prefix_id(tokenizer) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to predict the first token from")


@torch.inference_mode()
def token_logprobs(model, context: list[int], targets: list[int], on_rows=None) -> torch.Tensor:
    """log p(targets[i] | context + targets[:i]) for each target, from one forward over
    context + targets[:-1] (a fresh state). `on_rows(n)` is told how many tokens the forward ran
    (a routing recorder takes its rows then)."""
    if not context or not targets:
        raise ValueError("scoring needs at least one context token and one target")
    ids = context + targets[:-1]
    state = model.new_seq_state()
    x = run_tokens(model, torch.tensor(ids, dtype=torch.long), [state], [len(ids)])
    if on_rows is not None:
        on_rows(len(ids))
    logits = model.logits(x[len(context) - 1:]).float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(targets).unsqueeze(1)).squeeze(1)


def bits_per_byte(model, tokenizer, text: str, window: int = 512, progress=None, on_rows=None) -> dict:
    """{"bits", "bytes", "tokens", "bits_per_byte", "bits_per_token"} for `text`."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    ids = tokenizer.encode(text, special=False)
    nbytes = len(text.encode("utf-8"))
    if not ids or not nbytes:
        raise ValueError("the text is empty")
    bits = 0.0
    prev = _prefix_id(tokenizer)
    for start in range(0, len(ids), window):
        piece = ids[start:start + window]
        lp = token_logprobs(model, [prev], piece, on_rows)
        bits += float(-lp.double().sum()) / LN2
        prev = piece[-1]
        if progress is not None:
            progress(len(piece))
    return {"bits": bits, "bytes": nbytes, "tokens": len(ids), "bits_per_byte": bits / nbytes,
            "bits_per_token": bits / len(ids)}


def split_context(prompt: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the prompt moves to the continuation (as lm-evaluation-harness does), so
    "Answer: " + "Paris" is scored as "Answer:" + " Paris", the way a tokenizer joins them."""
    stripped = prompt.rstrip(" ")
    return stripped, prompt[len(stripped):] + continuation


def continuation_logprob(model, tokenizer, prompt: str, continuation: str, on_rows=None) -> tuple[float, int]:
    """(sum of log p over the continuation's tokens given the prompt, the continuation's bytes)."""
    ctx, cont = split_context(prompt, continuation)
    ctx_ids = tokenizer.encode(ctx, special=False) if ctx else []
    cont_ids = tokenizer.encode(cont, special=False)
    if not cont_ids:
        raise ValueError(f"the choice {continuation!r} has no tokens")
    lp = token_logprobs(model, [_prefix_id(tokenizer)] + ctx_ids, cont_ids, on_rows)
    return float(lp.double().sum()), len(cont.encode("utf-8"))


@torch.inference_mode()
def greedy_answer(model, tokenizer, prompt: str, max_tokens: int = 32, stop: str = "\n", on_rows=None) -> str:
    """The greedy continuation of `prompt`, up to `stop` (default: the end of the line), EOS or
    `max_tokens` tokens. `on_rows(n)` is told after each forward call how many tokens it ran."""
    ids = [_prefix_id(tokenizer)] + tokenizer.encode(prompt, special=False)
    state = model.new_seq_state()
    x = run_tokens(model, torch.tensor(ids, dtype=torch.long), [state], [len(ids)])
    if on_rows is not None:
        on_rows(len(ids))
    out: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for _ in range(max_tokens):
        nxt = int(model.logits(x[-1:]).argmax(-1))
        if nxt == eos:
            break
        out.append(nxt)
        text = tokenizer.decode(out)
        if stop and stop in text:
            return text[: text.index(stop)]
        x = run_tokens(model, torch.tensor([nxt]), [state], [1])
        if on_rows is not None:
            on_rows(1)
    return tokenizer.decode(out)
