"""One request's life in the engine: its tokens, sampling parameters, model state and output."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ..model.state import SeqState
from .sampler import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"      # queued, holds no state
    RUNNING = "running"      # has a state; prefilling or decoding
    FINISHED = "finished"    # state freed


@dataclass
class Logprob:
    """Log-probability of a generated token and the top alternatives at that step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None = None


@dataclass
class RequestOutput:
    """What one `step` produced for one request. `new_*` hold the delta; `token_ids` / `text` hold
    everything generated so far (prompt excluded)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "timeout" | "error" | None
    prompt_tokens: int
    new_logprobs: list[Logprob] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    error: str | None = None  # with finish_reason "error": what failed (for the log, not for clients)
    cached_tokens: int = 0  # prompt tokens this request took from the prefix cache
    # with SamplingParams.return_experts: per new token, per MoE layer, the expert ids of the forward
    # row that produced it
    new_experts: list | None = None


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    detok: object | None = None
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    state: SeqState | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    suspect: bool = False  # in a forward call that failed: runs alone until one step succeeds
    # one prefill for identical prompts: a follower waits for its leader to reach the prompt's last
    # token, then starts from a copy of the leader's state (`LLMEngine._admit`)
    leader: "Sequence | None" = None
    followers: int = 0
    cache_marks: list[int] = field(default_factory=list)  # positions where prefill saves its state
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache at admission (billing)
    cache_base: int = 0  # where the state was last saved to or restored from the prefix cache
    # (tokens, copy of the state) at the last block boundary of the reply, for a state that cannot be
    # rewound: left in the prefix cache when the sequence finishes (`LLMEngine._leave_state`)
    cache_tail: tuple | None = None
    constraint: object | None = None  # structured output: masks each step's logits, follows each token
    experts: list | None = None  # return_experts: the routing of the row the next token is sampled from

    @property
    def consumed(self) -> int:
        """Tokens the model has already seen (the state's position)."""
        return self.state.pos if self.state is not None else 0

    def tokens(self, start: int, n: int) -> list[int]:
        """Tokens start..start+n of prompt + output, without joining the two lists."""
        p = len(self.prompt)
        if start + n <= p:
            return self.prompt[start:start + n]
        if start >= p:
            return self.output[start - p:start - p + n]
        return self.prompt[start:] + self.output[: start + n - p]

    @property
    def prefilling(self) -> bool:
        """Feeding known tokens: the prompt, or prompt + output again after a preemption (a decoder
        has exactly one token pending, the one it sampled last)."""
        return self.consumed < len(self.prompt) or self.pending_tokens() > 1

    def pending_tokens(self) -> int:
        """Tokens known but not yet fed to the model (prompt rest, or the last sampled token)."""
        return len(self.prompt) + len(self.output) - self.consumed
