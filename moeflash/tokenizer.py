"""Tokenizers: text <-> token ids, with one small interface for the engine and the CLI.

`ByteTokenizer` belongs to the built-in `tiny` model, which ships without a vocabulary file: raw UTF-8
bytes plus DeepSeek's special tokens, so any text round-trips and tests need no downloads.
`HFTokenizer` wraps a checkpoint's `tokenizer.json` with the same interface. Both recognise
special-token strings written inside the text and never add tokens the caller did not ask for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

# DeepSeek's special tokens, in the order the tiny model assigns them ids 256, 257, ...
BYTE_SPECIAL_TOKENS = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
)


class ByteTokenizer:
    """Ids 0..255 are UTF-8 bytes; ids 256.. are `BYTE_SPECIAL_TOKENS`; vocab_size is 262."""

    def __init__(self) -> None:
        self.special_tokens: dict[str, int] = {t: 256 + i for i, t in enumerate(BYTE_SPECIAL_TOKENS)}
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        self.vocab_size = 256 + len(self.special_tokens)
        self.bos_token_id = self.special_tokens["<｜begin▁of▁sentence｜>"]
        self.eos_token_id = self.special_tokens["<｜end▁of▁sentence｜>"]
        # Longest first, so a token that is a prefix of another can never win early.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in alternatives))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Special-token strings in `text` become their ids; everything else becomes its UTF-8 bytes."""
        ids = [self.bos_token_id] if add_bos else []
        pos = 0
        for m in self._special_re.finditer(text):
            ids.extend(_utf8(text[pos:m.start()]))
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        ids.extend(_utf8(text[pos:]))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Invalid UTF-8 byte sequences become U+FFFD, as Hugging Face tokenizers do."""
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
            elif i in self._id_to_special:
                if skip_special_tokens:
                    continue  # dropped before decoding, so the bytes either side join up
                parts.append(run.decode("utf-8", errors="replace"))
                run.clear()
                parts.append(self._id_to_special[i])
            else:
                raise ValueError(
                    f"token id {i} is outside the tiny model's vocabulary (0..{self.vocab_size - 1}); "
                    "were these ids produced by another model's tokenizer?"
                )
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text contains {text[e.start:e.end]!r} at position {e.start}, a lone surrogate that UTF-8 "
            "cannot encode; pass well-formed Unicode (e.g. decode JSON with surrogate pairs intact)"
        ) from None


class HFTokenizer:
    """A checkpoint's `tokenizer.json`, behind the same interface as `ByteTokenizer`.

    bos / eos ids come from `tokenizer_config.json` (`bos_token` / `eos_token`) when it names them,
    else from the ids the caller passes (typically `config.json`'s `bos_token_id` / `eos_token_id`).
    """

    def __init__(self, path: str | Path, bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        file = path if path.is_file() else path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}; pass --prompt-ids to give token ids directly")
        self._tok = Tokenizer.from_file(str(file))
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        config = _read_tokenizer_config(file.parent / "tokenizer_config.json")
        self.bos_token_id = self._token_id(config.get("bos_token"), "bos_token", bos_token_id)
        self.eos_token_id = self._token_id(config.get("eos_token"), "eos_token", eos_token_id)

    def _token_id(self, token, key: str, fallback: int | None) -> int | None:
        if isinstance(token, dict):  # older configs store an AddedToken as {"content": ...}
            token = token.get("content")
        if not token:
            return fallback
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer_config.json names {key} {token!r}, but tokenizer.json has no such token; "
                             "fix the config or remove the key to use the model config's id")
        return tid

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """No implicit special tokens (no template, no BOS) unless `add_bos`."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("this tokenizer has no BOS token; set bos_token in tokenizer_config.json "
                                 "or bos_token_id in config.json, or encode without add_bos")
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _read_tokenizer_config(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); fix or delete it") from None


def load_tokenizer(path_or_name: str | Path, bos_token_id: int | None = None,
                   eos_token_id: int | None = None) -> ByteTokenizer | HFTokenizer | None:
    """The tokenizer for a model name or checkpoint directory; None when there is none (use --prompt-ids)."""
    if str(path_or_name) == "tiny":
        return ByteTokenizer()
    path = Path(path_or_name)
    if (path / "tokenizer.json").is_file() or (path.is_file() and path.name == "tokenizer.json"):
        return HFTokenizer(path, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    return None
