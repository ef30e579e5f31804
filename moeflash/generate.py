"""Plain autoregressive generation for one prompt: prefill, then one token per step.

The engine (continuous batching, full sampling parameters) supersedes this for serving; this
function is the simplest correct loop and what `moeflash generate` uses.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .model.v4 import Transformer


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy when temperature == 0, else a draw from softmax(logits / temperature)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def stream(model: Transformer, prompt_ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0,
           seed: int | None = None, eos_token_id: int | None = None,
           prefill_chunk: int = 512) -> Iterator[int]:
    """Yield new token ids one at a time; stops at `eos_token_id` (yielded) or the limit."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab = model.config.vocab_size
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    device = model.embed.weight.device
    state = model.new_state(1, max_len=len(prompt_ids) + max_new_tokens)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    logits = None
    for i in range(0, ids.shape[1], prefill_chunk):
        logits = model(ids[:, i: i + prefill_chunk], state, last_only=True)
    for _ in range(max_new_tokens):
        tok = sample(logits[0, -1], temperature, gen)
        yield tok
        if tok == eos:
            return
        logits = model(torch.tensor([[tok]], device=device), state)


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0,
             seed: int | None = None, eos_token_id: int | None = None) -> list[int]:
    """The generated ids (without the prompt)."""
    return list(stream(model, prompt_ids, max_new_tokens, temperature, seed, eos_token_id))
