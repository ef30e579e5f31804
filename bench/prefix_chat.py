"""A 6-turn chat through the prefix cache: the fraction of each turn's prompt served from the cache.

Each turn's prompt is what the server builds: the chat encoding of the whole conversation so far
(`make_chat_encoder`, content tokenized as text), with the server's cache hint at the start of the last
message. The engine has a `PrefixCache` (RAM). After each turn the reply goes back into the history, as
a client sends it, and the next user message follows. Reports per turn: prompt tokens, tokens taken
from the cache, their fraction, and the time to first token with and without the cache.

- `mini` (V4 architecture, random weights) with DeepSeek's V4 encoding, in chat mode and in thinking
  mode (which drops each earlier reply's reasoning from the history). Its tokenizer is moeflash's byte
  tokenizer (one token per byte plus DeepSeek's special tokens). A random model's reply tokens are not
  text, so the history carries the reply as the token ids it was (what a tokenizer does for its own
  model's output); in thinking mode that reply is reasoning, and the history drops it.
- SmolLM2-135M-Instruct (real weights) with its own ChatML template; its replies are real text, decoded
  and tokenized again as a client's next request would be.

The conversation is real text from the Python standard library's docstrings (nothing is downloaded).

    python bench/prefix_chat.py --threads 2
"""

from __future__ import annotations

import argparse
import inspect

import torch

from common import add_common_args, apply_common_args, log, machine_info, make_or_load, print_json, rounded

from moeflash.engine import LLMEngine, SamplingParams  # noqa: E402
from moeflash.engine.prefix_cache import PrefixCache  # noqa: E402
from moeflash.server.chat import DeepSeekV4Encoder, make_chat_encoder  # noqa: E402
from prefix_cache import run_request  # noqa: E402

TURNS = 6


def conversation_text() -> tuple[str, list[str]]:
    """A system prompt (a library's documentation) and six questions about it, from the standard library."""
    import argparse as ap
    import collections
    import json
    import pathlib
    import textwrap

    system = "You answer questions about this Python module.\n\n" + inspect.getdoc(json)[:1500]
    sources = [ap.ArgumentParser.add_argument, collections.OrderedDict, json.dumps, pathlib.Path.glob,
               textwrap.dedent, collections.Counter.most_common]
    questions = [f"Explain this, briefly:\n{(inspect.getdoc(f) or f.__name__)[:300]}" for f in sources]
    return system, questions


class IdsAsContent:
    """A tokenizer wrapper for the V4 runs: a message whose content is a placeholder from `ids_for`
    comes back as the token ids recorded for it (a random model's reply is ids, not text)."""

    def __init__(self, tokenizer):
        self.tok, self.replies = tokenizer, {}

    def encode(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        if text in self.replies:
            return list(self.replies[text])
        return self.tok.encode(text, add_bos=add_bos, special=special)

    def ids_for(self, turn: int, ids: list[int]) -> str:
        key = f"\ue002reply {turn}\ue002"
        self.replies[key] = ids
        return key


def run_chat(name: str, model, tokenizer, encoder, thinking: bool | None, reply_tokens: int,
             ids_replies: bool) -> dict:
    system, questions = conversation_text()
    tok = IdsAsContent(tokenizer) if ids_replies else tokenizer
    eos_ok = not ids_replies  # a real model may end its reply; the random one writes reply_tokens
    params = SamplingParams(max_tokens=reply_tokens, temperature=0, ignore_eos=not eos_ok)
    cache = PrefixCache.for_model(model, 8 << 30)
    text_tok = None if ids_replies else tokenizer  # the reply's text goes back into the history
    engine = LLMEngine(model, text_tok, max_num_batched_tokens=512, prefix_cache=cache)
    plain = LLMEngine(model, text_tok, max_num_batched_tokens=512)
    messages = [{"role": "system", "content": system}]
    turns = []
    for k, q in enumerate(questions[:TURNS]):
        messages.append({"role": "user", "content": q})
        starts: list[int] = []
        prompt = encoder.encode_ids(tok, messages, thinking, content_starts=starts)
        t_cache, out = run_request(engine, prompt, params, starts[-1:])
        t_plain, ref = run_request(plain, prompt, params)
        turns.append({"turn": k + 1, "prompt_tokens": len(prompt), "cached_tokens": out.cached_tokens,
                      "cached_fraction": out.cached_tokens / len(prompt), "ttft_s": t_cache,
                      "ttft_without_cache_s": t_plain, "reply_tokens": len(out.token_ids),
                      "tokens_equal_without_cache": out.token_ids == ref.token_ids,
                      "finish_reason": out.finish_reason})
        log(f"{name}: turn {k + 1}: {out.cached_tokens}/{len(prompt)} cached, ttft {t_cache:.3f} s "
            f"(without cache {t_plain:.3f} s)")
        reply = tok.ids_for(k, out.token_ids) if ids_replies else out.text
        if not ids_replies and not reply.strip():
            raise RuntimeError(f"turn {k + 1}: the reply has no text")
        messages.append({"role": "assistant", "content": reply})
    later = turns[1:]
    return {"run": name, "block_tokens": model.prefix_block_tokens, "turns": turns,
            "turns_2_to_6_cached_fraction": sum(t["cached_tokens"] for t in later)
            / sum(t["prompt_tokens"] for t in later),
            "cache": {k: cache.stats[k] for k in ("hits", "hit_tokens", "stored", "evictions")},
            "cache_bytes": cache.bytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["mini-chat", "mini-thinking", "smollm2"],
                   choices=["mini-chat", "mini-thinking", "smollm2"])
    p.add_argument("--reply-tokens", type=int, default=160)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    results = []
    with torch.inference_mode():
        if any(r.startswith("mini") for r in args.runs):
            from moeflash.tokenizer import ByteTokenizer

            mini = make_or_load("mini", "float32")
            for run in [r for r in args.runs if r.startswith("mini")]:
                results.append(run_chat(run, mini, ByteTokenizer(), DeepSeekV4Encoder(),
                                        run == "mini-thinking", args.reply_tokens, ids_replies=True))
            del mini
        if "smollm2" in args.runs:
            from moeflash.engine.load import load_model

            model, tokenizer = load_model("smollm2", dtype="float32")
            results.append(run_chat("smollm2", model, tokenizer, make_chat_encoder(tokenizer, "llama"), None,
                                    args.reply_tokens, ids_replies=False))
    print_json(rounded({"results": results, "machine": machine_info()}))


if __name__ == "__main__":
    main()
