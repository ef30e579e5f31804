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

    def encode(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """Special-token strings in `text` become their ids (with `special`; else they stay text);
        everything else becomes its UTF-8 bytes."""
        ids = [self.bos_token_id] if add_bos else []
        if not special:
            return ids + list(_utf8(text))
        pos = 0
        for m in self._special_re.finditer(text):
            ids.extend(_utf8(text[pos:m.start()]))
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        ids.extend(_utf8(text[pos:]))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a byte, or a special token's text)."""
        i = int(token_id)
        if 0 <= i < 256:
            return bytes([i])
        if i in self._id_to_special:
            return self._id_to_special[i].encode()
        raise ValueError(f"token id {i} is outside the tiny model's vocabulary (0..{self.vocab_size - 1})")

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


def _plain_copy(tok):
    """`tok._tok` copied with special-token matching off (`encode_special_tokens`), made once: the
    flag is per object, and the shared one may be encoding on another thread."""
    if tok._plain is None:
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(tok._tok.to_str())
        plain.encode_special_tokens = True
        tok._plain = plain
    return tok._plain


def _byte_unmap() -> dict[str, int]:
    """Byte-level BPE's printable stand-in characters -> the bytes they stand for."""
    return {c: b for b, c in byte_level_alphabet().items()}


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
        self._plain = None         # a copy that reads special-token strings as text (`_plain_copy`)
        self._byte_level = None    # whether pieces are byte-level BPE (known on first `token_bytes`)

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

    def encode(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """No implicit special tokens (no template, no BOS) unless `add_bos`. Special-token strings
        written in `text` become their ids only with `special` (else they are tokenized as text)."""
        ids = (self._tok if special else _plain_copy(self)).encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("this tokenizer has no BOS token; set bos_token in tokenizer_config.json "
                                 "or bos_token_id in config.json, or encode without add_bos")
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for: byte-level BPE pieces mapped back to bytes, `<0xNN>` byte
        tokens as that byte, SentencePiece's '▁' as a space; special tokens as their text."""
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            raise ValueError(f"token id {token_id} is outside this vocabulary (0..{self.vocab_size - 1})")
        if piece in self.special_tokens:
            return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        if self._byte_level is None:
            self._byte_level = '"ByteLevel"' in self._tok.to_str()
        if self._byte_level:
            unmap = _byte_unmap()
            if all(c in unmap for c in piece):
                return bytes(unmap[c] for c in piece)
        return piece.replace("▁", " ").encode()


def _read_tokenizer_config(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); fix or delete it") from None


# ---- GGUF: a tokenizer rebuilt from a .gguf file's `tokenizer.ggml.*` metadata ----
#
# The aim is llama.cpp's tokenization, id for id: the same pre-tokenizer regexes per `tokenizer.ggml.pre`,
# the same rule for special-token strings written in the text, the same text for each id.

# `tokenizer.ggml.token_type` values (llama.cpp's LLAMA_TOKEN_TYPE_*).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, applied one after another as isolating splits (each regex splits every piece the
# previous ones left; matches and the gaps between them both become pieces), then GPT-2 byte-level mapping.
# They are written so that Oniguruma (what `tokenizers` runs) splits as llama.cpp does: its hand-written
# splitters for the GPT-2, Llama-3 and Qwen-2 patterns follow the original regexes, and for the others it
# runs std::regex over text where each non-ASCII character stands for its Unicode category.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
# "upper-case run then lower-case run" with llama.cpp's lookahead trick: a non-ASCII letter counts as both.
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
          rf"{_CONTRACTIONS}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Character classes with explicit non-ASCII ranges, written as escapes (normalizing this file must not
# change them). llama.cpp matches them against text where every non-ASCII whitespace character was
# replaced by U+000B, so such characters never fall in these ranges: hence `&&[^\s]`, Oniguruma's class
# intersection.
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff&&[^\\s]]+"
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
    "\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
    "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?[" + _DEEPSEEK_LLM_LETTERS + "]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002&&[^\\s]]+",
    r"\s+\z",  # std::regex's `$` is the end of the piece; Oniguruma's would also match before a newline
    _CJK_HANGUL,
    r"\p{N}+",
)
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}")
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
     r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
)
_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

# (regexes, ignore_merges, add_bos default) for each group of `tokenizer.ggml.pre` names llama.cpp treats
# alike. ignore_merges: a piece that is itself a vocabulary token is taken whole, before any merge.
_BPE_PRE_GROUPS = [
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"), False, False),
    (("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4", "gigachat",
      "a.x-4.0", "mellum"), (_GPT2,), False, False),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
     (r"\p{N}", _GPT2), False, False),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
     (_LLAMA3,), True, True),
    (("dbrx", "smaug-bpe", "chatglm-bpe"), (_LLAMA3,), False, False),
    (("glm4", "glm5"), (_LLAMA3,), True, False),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
     (_QWEN2,), False, False),
    (("qwen35",), (_QWEN35,), False, False),
    (("deepseek-llm",), _DEEPSEEK_LLM, False, False),
    (("deepseek-coder",), _DEEPSEEK_CODER, False, False),
    (("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), _DEEPSEEK_V3, False, False),
    (("falcon",), (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"), False, False),
    (("tekken",), (_TEKKEN,), True, True),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), (_GPT4O,), False, False),
    (("poro-chat", "bloom", "gpt3-finnish"), (_BLOOM,), False, False),
    (("viking",), (_BLOOM, r"\p{N}"), False, False),
]
BPE_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    name: (regexes, ignore_merges, add_bos)
    for names, regexes, ignore_merges, add_bos in _BPE_PRE_GROUPS for name in names
}
GGUF_TOKENIZER_MODELS = ("gpt2", "llama")

# Tokens llama.cpp treats as control tokens by their text even when the file types them otherwise.
_CONTROL_BY_NAME = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
})
# Fill-in-the-middle tokens, promoted the same way unless the file names that role's id.
_FIM_BY_NAME = {
    ("fim_pre_token_id", "prefix_token_id"): ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>",
                                              "<PRE>", "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    ("fim_suf_token_id", "suffix_token_id"): ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>",
                                              "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    ("fim_mid_token_id", "middle_token_id"): ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>",
                                              "<MID>", "▁<MID>", "<|code_middle|>", "<|middle|>"),
    ("fim_pad_token_id",): ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    ("fim_rep_token_id",): ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    ("fim_sep_token_id",): ("<|file_sep|>",),
}
_ASCII_SPACE = " \t\n\v\f\r"  # C isspace(), which llama.cpp's lstrip / rstrip use


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes that print as themselves keep their character)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(moved)}}


def _gguf_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


class GGUFTokenizer:
    """The tokenizer stored in a GGUF file, behind the same interface as `HFTokenizer`.

    Built from `tokenizer.ggml.*` metadata as a `tokenizers.Tokenizer` that splits and merges as llama.cpp
    does: `tokenizer.ggml.model` "gpt2" (byte-level BPE; the pre-tokenizer comes from `tokenizer.ggml.pre`,
    see `BPE_PRE_TOKENIZERS`) or "llama" (SentencePiece-style BPE over scores, ▁ for spaces, <0xNN> byte
    fallback). `encode` gives llama.cpp's `llama_tokenize(text, add_special=False, parse_special=True)`:
    control, user-defined and unknown-type tokens written in the text become their ids, longest token first.
    `decode` gives the pieces of `llama_token_to_piece`, joined, with control tokens dropped when
    `skip_special_tokens`; for "llama" models the space that `encode` puts before each text run is removed
    again, so `decode(encode(s)) == s`.
    """

    def __init__(self, path_or_reader, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 overrides: dict | None = None) -> None:
        """`path_or_reader`: a .gguf path or an open `gguf.GGUFReader`. bos / eos ids: used when the file
        names none. `overrides`: metadata values that replace the file's, by key (like llama.cpp's
        --override-kv), e.g. {"tokenizer.ggml.pre": "llama-bpe"} for a file converted without one."""
        try:
            import gguf
        except ImportError:
            raise ImportError("reading a tokenizer from a .gguf file needs the `gguf` package "
                              "(pip install gguf)") from None
        if isinstance(path_or_reader, gguf.GGUFReader):
            reader, where = path_or_reader, "this GGUF file"
        else:
            path = Path(path_or_reader)
            if not path.is_file():
                raise FileNotFoundError(f"no GGUF file at {path}")
            try:
                reader = gguf.GGUFReader(path)
            except (ValueError, OSError) as e:
                raise ValueError(f"{path} is not a readable GGUF file ({e})") from None
            where = str(path)
        overrides = dict(overrides or {})

        def meta(key: str, default=None):
            return overrides[key] if key in overrides else _gguf_value(reader, key, default)

        model = meta("tokenizer.ggml.model")
        if model is None:
            raise ValueError(f"{where} has no tokenizer metadata (tokenizer.ggml.model); "
                             "pass --prompt-ids to give token ids directly")
        if model in ("none", "no_vocab"):
            raise ValueError(f"{where} carries no vocabulary (tokenizer.ggml.model = {model!r}); "
                             "pass --prompt-ids to give token ids directly")
        if model not in GGUF_TOKENIZER_MODELS:
            raise ValueError(f"{where} has tokenizer.ggml.model = {model!r}, which moeflash cannot rebuild; "
                             f"supported: {', '.join(map(repr, GGUF_TOKENIZER_MODELS))}")
        self.tokenizer_model: str = model
        self.pre: str | None = None

        tokens = list(meta("tokenizer.ggml.tokens", []))
        if not tokens:
            raise ValueError(f"{where} has no tokenizer.ggml.tokens")
        n = len(tokens)
        types = list(meta("tokenizer.ggml.token_type", [TOKEN_NORMAL] * n))
        if len(types) < n:
            raise ValueError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        for i, t in enumerate(tokens):
            t = t.split("\x00", 1)[0]  # llama.cpp reads token texts as C strings
            tokens[i] = t or f"[EMPTY_{i}]"  # and this is its name for an empty one
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != n:
            raise ValueError(f"{where}: tokenizer.ggml.tokens has duplicate entries; the file is corrupt")
        self._tokens, self._types = tokens, types[:n]

        def meta_id(key: str, default: int | None) -> int | None:
            value = meta(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < n else default

        add_bos_default = model == "llama"
        self.add_space_prefix = model == "llama"
        if model == "gpt2":
            self.pre = meta("tokenizer.ggml.pre") or "default"
            if self.pre not in BPE_PRE_TOKENIZERS:
                raise ValueError(
                    f"{where} has tokenizer.ggml.pre = {self.pre!r}, a pre-tokenizer moeflash does not know; "
                    f"supported: {', '.join(sorted(BPE_PRE_TOKENIZERS))}")
            add_bos_default = BPE_PRE_TOKENIZERS[self.pre][2]
            self.add_space_prefix = False
        self.add_space_prefix = bool(meta("tokenizer.ggml.add_space_prefix", self.add_space_prefix))
        self.add_bos_token: bool = bool(meta("tokenizer.ggml.add_bos_token", add_bos_default))
        self.add_eos_token: bool = bool(meta("tokenizer.ggml.add_eos_token", False))
        self.chat_template: str | None = meta("tokenizer.chat_template")
        # When the file names no BOS / EOS: the caller's ids, else llama.cpp's defaults for "llama" (1 / 2).
        # (For "gpt2" llama.cpp falls back to id 11, a GPT-2 leftover that is no BOS in any other vocabulary.)
        if model == "llama":
            bos_token_id = 1 if bos_token_id is None and n > 1 else bos_token_id
            eos_token_id = 2 if eos_token_id is None and n > 2 else eos_token_id
        self.bos_token_id = meta_id("bos_token_id", bos_token_id)
        self.eos_token_id = meta_id("eos_token_id", eos_token_id)
        self.vocab_size = n

        # Which tokens are matched in the text before tokenizing, as llama.cpp does (and renders how).
        attr = list(self._types)
        promote = set(_CONTROL_BY_NAME)
        for keys, names in _FIM_BY_NAME.items():
            if all(meta_id(k, None) is None for k in keys):
                promote.update(names)
        for name in promote:
            i = vocab.get(name)
            if i is not None:
                attr[i] = TOKEN_CONTROL
        has = vocab.__contains__
        if has("<|end|>") and (has("<|call|>") or has("<|calls|>")) and (has("<|return|>") or has("<|flush|>")):
            attr[vocab["<|end|>"]] = TOKEN_USER_DEFINED  # gpt-oss, solar-open: "<|end|>" is text, not an end
        for name in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            if name in vocab:
                attr[vocab[name]] = TOKEN_USER_DEFINED
        self._attr = attr
        added = [i for i, a in enumerate(attr) if a in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)]
        self.special_tokens: dict[str, int] = {
            tokens[i]: i for i in added if attr[i] in (TOKEN_CONTROL, TOKEN_UNKNOWN)}
        # llama.cpp looks for the longest special tokens first, each everywhere, then the next.
        self._specials = sorted(((tokens[i], i) for i in added), key=lambda p: (-len(p[0]), p[1]))
        # Phi-3 GGUFs: llama.cpp strips the whitespace after most special tokens.
        name = str(meta("general.name", "")).lower()
        self._rstrip: set[int] = set()
        if "phi-3" in name or "phi3" in name:
            self._rstrip = {i for _, i in self._specials} | ({vocab["</s>"]} if "</s>" in vocab else set())
            self._rstrip -= {vocab[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in vocab}

        self._drop_id: int | None = None  # see _build_bpe
        self._extra_chars: list[str] = []  # see _build_spm
        if model == "gpt2":
            merges = meta("tokenizer.ggml.merges")
            if not merges:
                raise ValueError(f"{where} has a gpt2 tokenizer without tokenizer.ggml.merges")
            self._tok = self._build_bpe(vocab, merges)
        else:
            scores = meta("tokenizer.ggml.scores")
            if scores is None or len(scores) < n:
                raise ValueError(f"{where} has a llama tokenizer without a score per token (tokenizer.ggml.scores)")
            self._tok = self._build_spm(vocab, [float(s) for s in scores[:n]])

        from tokenizers import AddedToken

        self._tok.add_tokens([AddedToken(tokens[i], special=attr[i] != TOKEN_USER_DEFINED, normalized=False)
                              for i in added])
        self._pieces: list[bytes] | None = None
        self._plain = None  # a copy that reads special-token strings as text (`_plain_copy`)

    # -- building the tokenizers.Tokenizer --------------------------------------------------------------

    def _build_bpe(self, vocab: dict[str, int], merges: list[str]):
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        regexes, ignore_merges, _ = BPE_PRE_TOKENIZERS[self.pre]
        pairs, seen = [], set()
        for m in merges:
            cut = m.find(" ", 1)  # as llama.cpp: the first space after the first character
            if cut < 0:
                continue
            a, b = m[:cut], m[cut + 1:]
            # `tokenizers` insists every merge make a vocabulary token; llama.cpp would drop such a
            # result into single bytes, which no well-formed file needs.
            if (a, b) in seen or a not in vocab or b not in vocab or a + b not in vocab:
                continue
            seen.add((a, b))
            pairs.append((a, b))
        # A character missing from the vocabulary (vocabularies often lack a few bytes, e.g. 0xF5..0xFF) stays
        # a symbol in llama.cpp: nothing merges across it, and it is dropped at the end. `tokenizers` drops it
        # before merging instead, unless it has an unknown token to put there. So it gets a stand-in that no
        # merge uses, an extra id (vocab_size) named "\x00" (token texts never hold NUL: llama.cpp reads
        # them as C strings), which `encode` removes afterwards.
        self._drop_id = len(vocab)
        full = {**vocab, "\x00": self._drop_id}
        tok = Tokenizer(models.BPE(vocab=full, merges=pairs, ignore_merges=ignore_merges, unk_token="\x00"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        return tok

    def _build_spm(self, vocab: dict[str, int], scores: list[float]):
        from tokenizers import Tokenizer, decoders, models, normalizers

        # llama.cpp starts from single characters and merges the adjacent pair whose concatenation is the
        # highest-scoring token (leftmost on a tie). As BPE merges: every split of every token in two, best
        # merged score first. Its starting characters need not be tokens: a character found inside tokens
        # but not one itself still merges, so such characters join this model as extra ids (vocab_size and
        # up), which `encode` turns into byte tokens when they are left over, as llama.cpp does.
        n = len(vocab)
        full = dict(vocab)
        for t in vocab:
            for c in t:
                if c not in full:
                    full[c] = n + len(self._extra_chars)
                    self._extra_chars.append(c)
        merges = []
        for t, i in vocab.items():
            for k in range(1, len(t)):
                if t[:k] in full and t[k:] in full:
                    merges.append((-scores[i], i, k, (t[:k], t[k:])))
        merges.sort()
        # Other unknown characters fall back to byte tokens too; `tokenizers` drops those it has no
        # byte token for (llama.cpp fails on them).
        tok = Tokenizer(models.BPE(vocab=full, merges=[m[-1] for m in merges], byte_fallback=True))
        steps = [normalizers.Prepend("▁")] if self.add_space_prefix else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
        decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if self.add_space_prefix:
            decode_steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(decode_steps)
        return tok

    # -- encode / decode --------------------------------------------------------------------------------

    def _split_specials(self, text: str) -> list[str | int]:
        """`text` as runs of plain text and special-token ids, llama.cpp's way: for each special token,
        longest first, every occurrence in the text not yet claimed becomes that token."""
        parts: list[str | int] = [text]
        for s, tid in self._specials:
            if s not in text:
                continue
            rstrip = tid in self._rstrip
            out: list[str | int] = []
            for part in parts:
                if isinstance(part, int) or s not in part:
                    out.append(part)
                    continue
                start = 0
                while (hit := part.find(s, start)) >= 0:
                    if hit > start:
                        out.append(part[start:hit])
                    out.append(tid)
                    start = hit + len(s)
                    if rstrip:
                        while start < len(part) and part[start] in _ASCII_SPACE:
                            start += 1
                if start < len(part):
                    out.append(part[start:])
            parts = out
        return parts

    def encode(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """No implicit special tokens (no BOS, no EOS) unless `add_bos`. Special-token strings written
        in `text` become their ids only with `special` (llama.cpp's `parse_special`)."""
        _utf8(text)  # a clear error for lone surrogates
        if not special:
            ids = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
            if add_bos and self.bos_token_id is None:
                raise ValueError("this GGUF tokenizer has no BOS token (tokenizer.ggml.bos_token_id); "
                                 "encode without add_bos")
            return ids + self._fix(_plain_copy(self).encode(text, add_special_tokens=False).ids)
        parts = self._split_specials(text) if self._specials else [text]
        ids = []
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("this GGUF tokenizer has no BOS token (tokenizer.ggml.bos_token_id); "
                                 "encode without add_bos")
            ids.append(self.bos_token_id)
        if len(parts) == 1 and isinstance(parts[0], str):
            ids.extend(self._fix(self._tok.encode(parts[0], add_special_tokens=False).ids))
            return ids
        runs = [p for p in parts if isinstance(p, str)]
        encoded = iter(self._tok.encode_batch(runs, add_special_tokens=False)) if runs else iter(())
        for p in parts:
            ids.extend(self._fix(next(encoded).ids) if isinstance(p, str) else (p,))
        return ids

    def _fix(self, run: list[int]) -> list[int]:
        """Undo the stand-ins of `_build_bpe` / `_build_spm` in a run of text's ids."""
        n, drop = self.vocab_size, self._drop_id
        if drop is None and not any(i >= n for i in run):
            return run
        out = []
        for i in run:
            if i == drop:
                continue
            if i < n:
                out.append(i)
                continue
            for b in self._extra_chars[i - n].encode():  # a character left over: its bytes
                byte = self._tok.token_to_id(f"<0x{b:02X}>")
                if byte is None and b < 0x80:
                    byte = self._tok.token_to_id(chr(b))
                if byte is None or byte >= n:
                    raise ValueError(f"the vocabulary has no token for byte 0x{b:02X} of "
                                     f"{self._extra_chars[i - n]!r}; llama.cpp cannot tokenize this text either")
                out.append(byte)
        return out

    def _piece_table(self) -> list[bytes]:
        """Each id's bytes, as llama.cpp's `llama_token_to_piece(special=True)` gives them."""
        if self._pieces is None:
            pieces: list[bytes] = []
            unmap = {c: b for b, c in byte_level_alphabet().items()} if self.tokenizer_model == "gpt2" else None
            for t, a in zip(self._tokens, self._attr):
                if a in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
                    pieces.append(t.encode())
                elif a == TOKEN_BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                    pieces.append(bytes([int(t[3:5], 16)]))
                elif a != TOKEN_NORMAL:
                    pieces.append(b"")  # unused / undefined tokens render as nothing
                elif unmap is not None:
                    if all(c in unmap for c in t):
                        pieces.append(bytes(unmap[c] for c in t))
                    else:
                        pieces.append(t.encode())
                else:
                    pieces.append(t.replace("▁", " ").encode())
            self._pieces = pieces
        return self._pieces

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (llama.cpp's piece; special tokens as their text)."""
        i = int(token_id)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside this GGUF vocabulary (0..{self.vocab_size - 1})")
        return self._piece_table()[i]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Invalid UTF-8 byte sequences become U+FFFD, as Hugging Face tokenizers do."""
        pieces, attr, n = self._piece_table(), self._attr, self.vocab_size
        out = bytearray()
        strip = self.add_space_prefix  # undo the space encode puts at the start and after each added token
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside this GGUF vocabulary (0..{n - 1}); "
                                 "were these ids produced by another model's tokenizer?")
            a = attr[i]
            if a in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
                if not (skip_special_tokens and a != TOKEN_USER_DEFINED):
                    out += pieces[i]
                strip = self.add_space_prefix
                continue
            piece = pieces[i]
            if strip and piece:
                if piece[:1] == b" ":
                    piece = piece[1:]
                strip = False
            out += piece
        return out.decode("utf-8", errors="replace")


def load_tokenizer(path_or_name: str | Path, bos_token_id: int | None = None, eos_token_id: int | None = None
                   ) -> ByteTokenizer | HFTokenizer | GGUFTokenizer | None:
    """The tokenizer for a model name, checkpoint directory or .gguf file; None when there is none
    (use --prompt-ids). For a .gguf file, bos / eos ids in the file win over the ones passed here."""
    if str(path_or_name) == "tiny":
        return ByteTokenizer()
    path = Path(path_or_name)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return GGUFTokenizer(path, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if (path / "tokenizer.json").is_file() or (path.is_file() and path.name == "tokenizer.json"):
        return HFTokenizer(path, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    return None


class IdTokenizer:
    """For checkpoints without a vocabulary (e.g. `moeflash convert --preset`): token ids written as
    text, `<|17|>`, both ways. The server uses it so such models can still be served: prompts are
    token ids (or `<|id|>` text) and completions come back as `<|id|>` text that encodes to the same
    ids. Anything else in a prompt is an error that says so."""

    chat_template = None
    add_bos_token = False
    _PIECE = re.compile(r"<\|(\d+)\|>")

    def __init__(self, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None):
        self.vocab_size, self.bos_token_id, self.eos_token_id = vocab_size, bos_token_id, eos_token_id
        self.special_tokens: dict[str, int] = {}

    def encode(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """`<|id|>` pieces -> ids (`special` changes nothing: every id is written this way)."""
        ids, pos = [], 0
        for m in self._PIECE.finditer(text):
            if text[pos:m.start()].strip():
                raise ValueError("this model has no tokenizer: give prompts as token ids, or as text made of "
                                 f"<|id|> tokens; got {text[pos:m.start()][:40]!r}")
            ids.append(int(m.group(1)))
            pos = m.end()
        if text[pos:].strip():
            raise ValueError("this model has no tokenizer: give prompts as token ids, or as text made of "
                             f"<|id|> tokens; got {text[pos:][:40]!r}")
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return "".join(f"<|{int(i)}|>" for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode([token_id]).encode()
