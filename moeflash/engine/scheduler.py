"""Continuous batching: which sequences run in the next step, and how many tokens each feeds.

Every step first gives each decoding sequence its one token, then spends what is left of the
per-step token budget on prompt chunks (sequences already prefilling first, then new admissions,
oldest first). A long prompt therefore never stalls the decoders: it is spread over several steps.
A sequence whose prompt others share (n > 1) pauses one token before its prompt's end, where they
copy its state.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_num_seqs: int = 16, max_num_batched_tokens: int = 512):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def preempt(self, seq: Sequence) -> None:
        """Back to the head of the queue (its state already dropped): it is admitted first and feeds
        prompt + output again."""
        if seq in self.running:
            self.running.remove(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, admit) -> list[tuple[Sequence, int]]:
        """[(sequence, tokens to feed)] for the next step. `admit(seq)` gives a waiting sequence its
        state (and may refuse, e.g. for memory, by returning False)."""
        budget = self.max_num_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        for seq in self.running:  # decoders: exactly one token each
            if not seq.prefilling and budget > 0:
                plan.append((seq, 1))
                budget -= 1
        for seq in self.running:  # unfinished prompts continue
            if seq.prefilling and budget > 0:
                n = min(_chunk(seq), budget)
                plan.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not admit(seq):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(_chunk(seq), budget)
            plan.append((seq, n))
            budget -= n
        return plan


def _chunk(seq: Sequence) -> int:
    """Tokens a prefilling sequence may feed now: all pending, except that a leader with followers
    stops one token short of its prompt's end once, so they can copy its state there, and a chunk ends
    at the next position where the prefix cache saves the state."""
    n = seq.pending_tokens()
    if seq.followers and seq.consumed < len(seq.prompt) - 1:
        n = min(n, len(seq.prompt) - 1 - seq.consumed)
    for mark in seq.cache_marks:  # end the chunk where the prefix cache saves the state
        if mark > seq.consumed:
            n = min(n, mark - seq.consumed)
            break
    return n
