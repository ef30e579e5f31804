"""Streaming token ids to text, and stopping at stop strings.

A token's text can depend on its neighbours (a UTF-8 character split over byte tokens, tokenizers that
merge spaces), so text is never decoded token by token. As vLLM and Hugging Face do, we decode a short
window of recent ids twice — with and without the new ones — and emit the difference; the window then
slides, so each token costs a bounded decode however long the generation gets.

On top of that, text that could still be the start of a stop string is held back: a client must never
see a stop string, nor half of one.
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

REPLACEMENT = "\ufffd"  # what decode gives for an incomplete UTF-8 character
# A character spans at most 4 byte tokens, so once this many ids are pending behind a trailing U+FFFD
# the window is split a few tokens back (see `_force_split`), which keeps every decode bounded.
_MAX_PENDING = 8
_CHAR_TOKENS = 4


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Per-request text state: feed ids with `push`, finish with `flush`.

    `text` is everything emitted so far; after a stop string is found, `stopped` is True, `stop_reason`
    holds that string, and the text ends right before it.
    """

    def __init__(self, tokenizer: Decoder, stop: Iterable[str] | str = (),
                 skip_special_tokens: bool = True) -> None:
        if isinstance(stop, str):
            stop = [stop]
        self.stop: list[str] = list(stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stopped = False
        self.stop_reason: str | None = None

        # Every proper prefix of a stop string: a text suffix in this set might become a stop string.
        self._stop_prefixes = {s[:n] for s in self.stop for n in range(1, len(s))}
        self._max_held = max((len(s) - 1 for s in self.stop), default=0)

        # The window: ids[:read] decode to `_prefix_text`, already emitted; ids[read:] are pending.
        self._ids: list[int] = []
        self._read = 0
        self._prefix_text = ""
        self._held = ""  # decoded text not emitted yet because it may start a stop string
        self._parts: list[str] = []
        self._flushed = False

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def push(self, token_id: int) -> str:
        """The text that became final with this token (often "", e.g. mid-character)."""
        if self.stopped or self._flushed:
            why = f"stop string {self.stop_reason!r} was found" if self.stopped else "flush() was called"
            raise RuntimeError(f"push after the end of the text ({why}); start a new IncrementalDetokenizer")
        self._ids.append(int(token_id))
        return self._emit(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """All held-back text at the end of generation; an incomplete last character becomes U+FFFD."""
        if self.stopped or self._flushed:
            return ""
        text = self._emit(self._decode_new(final=True), final=True)
        self._flushed = True
        return text

    # -- ids -> text ------------------------------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        """Text that the pending ids add to the window, once it cannot change any more."""
        full = self._decode(self._ids)
        settled = not full.endswith(REPLACEMENT)
        # Like vLLM, wait for visible text before sliding, in case a token's text shows only with the next.
        if final or (settled and len(full) > len(self._prefix_text)):
            return self._take(full, len(self._ids))
        if len(self._ids) - self._read > _MAX_PENDING:
            if settled:  # many ids without text (skipped special tokens): nothing is unfinished
                return self._take(full, len(self._ids))
            return self._force_split(full)
        return ""

    def _take(self, text: str, read: int) -> str:
        new = text[len(self._prefix_text):]
        self._slide(read)
        return new

    def _slide(self, read: int) -> None:
        """Make ids[read_old:read] the new window prefix and forget everything before it."""
        self._ids = self._ids[self._read:]
        self._read = read - self._read
        self._prefix_text = self._decode(self._ids[:self._read])

    def _force_split(self, full: str) -> str:
        """Emit the part of a long pending run (e.g. many invalid bytes) that no later id can change.

        Only the last few ids can belong to an unfinished character, so split before them, at a point
        where decoding the two halves apart gives the same text as decoding them together, and where the
        ids after the split do show text (ids that show none cannot prove the character before them
        finished). An unfinished character followed only by text-less ids keeps the window growing until
        text arrives; no real model emits that for long.
        """
        for split in range(len(self._ids) - _CHAR_TOKENS, self._read, -1):
            head = self._decode(self._ids[:split])
            tail = self._decode(self._ids[split:])
            if tail and len(head) >= len(self._prefix_text) and head + tail == full:
                return self._take(head, split)
        return ""

    # -- stop strings -----------------------------------------------------------------------------------

    def _emit(self, new: str, final: bool) -> str:
        text = self._held + new
        self._held = ""
        match = self._find_stop(text)
        if match is not None:
            start, s = match
            self.stopped, self.stop_reason = True, s
            text = text[:start]
        elif not final:
            keep = self._stop_prefix_len(text)
            if keep:
                text, self._held = text[:-keep], text[-keep:]
        if text:
            self._parts.append(text)
        return text

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string that completes first in `text` (on a tie, the one that starts first).

        Ending first is what a reader going character by character would see, so the result does not
        depend on how the text was split into pushes.
        """
        best = None
        for s in self.stop:
            start = text.find(s)
            if start >= 0:
                key = (start + len(s), start)
                if best is None or key < best[0]:
                    best = (key, start, s)
        return None if best is None else (best[1], best[2])

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is the beginning of some stop string."""
        for n in range(min(len(text), self._max_held), 0, -1):
            if text[-n:] in self._stop_prefixes:
                return n
        return 0
