"""One-call generation for one prompt, through the engine (what the README's first example uses)."""

from __future__ import annotations

from .engine import LLMEngine, SamplingParams
from .model.v4 import Transformer


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0,
             seed: int | None = None, ignore_eos: bool = False) -> list[int]:
    """The generated ids (prompt excluded); greedy by default, ending at the config's
    end-of-sentence id (included) unless `ignore_eos`, or after `max_new_tokens`."""
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            ignore_eos=ignore_eos)
    return LLMEngine(model).generate([prompt_ids], params)[0].token_ids
