"""The engine's side of a forward call: positions move here, not in the model.

The model writes a sequence's state at positions pos..pos+n-1 and leaves `pos` alone; whoever owns
the sequence (the engine, a benchmark loop, the planner's probes) advances it once the call has
returned. `run_tokens` is that pair of steps for code that drives the model directly."""

from __future__ import annotations

import torch


def advance(states: list, lengths: list[int]) -> None:
    """Move each state past the tokens a forward call just wrote into it."""
    for state, n in zip(states, lengths):
        state.pos += n


def run_tokens(model, tokens: torch.Tensor, states: list, lengths: list[int]) -> torch.Tensor:
    """`model.forward_tokens(tokens, states, lengths)`, then advance the states; returns its output."""
    out = model.forward_tokens(tokens, states, lengths)
    advance(states, lengths)
    return out
