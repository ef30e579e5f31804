"""Tokenizer tests: the tiny model's byte tokenizer round-trips any text; HFTokenizer wraps tokenizer.json."""

import json
import random

import pytest

from moeflash.tokenizer import BYTE_SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, load_tokenizer

SPECIALS = list(BYTE_SPECIAL_TOKENS)

FIXED = [
    "",
    "Hello, moeflash",
    "日本語のテキストと中文",
    "한국어 텍스트",
    "emoji 🚀🔥 family 👨‍👩‍👧‍👦 flag 🇯🇵",
    "combining: e\u0301 a\u0308 \u0915\u094d\u0937",
    "control \x00\x01\x07\t\n\r\x1b\x7f",
    "\ufeffBOM and \u200b zero width",
    "\U0010ffff \U00010000 \ufffd",
    "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>hmm</think>ok<｜end▁of▁sentence｜>",
    "<think><think></think>",
    "<｜User｜",  # incomplete special: plain bytes
    "<thin k>",
    "</think",
    "<<think>>",
    "｜▁",
]

POOLS = [
    "abcxyz ABC 0123 .,!?",
    "日本語中文한국어",
    "🚀🔥👍🏽\u200d♀️",
    "e\u0301\u0308\u0327",
    "\x00\x01\x1f\x7f\x80\x9f\n\t",
    "<>/｜▁think",
]


def random_texts(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 8)):
            r = rng.random()
            if r < 0.25:
                parts.append(rng.choice(SPECIALS))
            elif r < 0.35:
                parts.append(chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])))
            else:
                parts.append("".join(rng.choice(rng.choice(POOLS)) for _ in range(rng.randint(0, 6))))
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.mark.parametrize("text", FIXED + random_texts(300))
def test_byte_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_special_ids(tok):
    assert tok.vocab_size == 262
    assert tok.bos_token_id == 256 and tok.eos_token_id == 257
    assert tok.special_tokens == {
        "<｜begin▁of▁sentence｜>": 256, "<｜end▁of▁sentence｜>": 257, "<｜User｜>": 258,
        "<｜Assistant｜>": 259, "<think>": 260, "</think>": 261,
    }
    for text, i in tok.special_tokens.items():
        assert tok.encode(text) == [i]
        assert tok.decode([i]) == text


def test_byte_encode_layout(tok):
    assert tok.encode("Hi") == [72, 105]
    assert tok.encode("Hi", add_bos=True) == [256, 72, 105]
    assert tok.encode("") == [] and tok.encode("", add_bos=True) == [256]
    assert tok.encode("a<think>b") == [97, 260, 98]
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.encode("<｜User｜") == list("<｜User｜".encode())


def test_byte_skip_special(tok):
    ids = tok.encode("<｜User｜>hi<｜Assistant｜>yo", add_bos=True)
    assert tok.decode(ids, skip_special_tokens=True) == "hiyo"
    # a multi-byte character split by a skipped special token still decodes as one character
    a, b, c = "中".encode()
    assert tok.decode([a, 260, b, c], skip_special_tokens=True) == "中"
    assert tok.decode([a, 260, b, c]) == "\ufffd<think>\ufffd\ufffd"  # one U+FFFD per stray continuation byte


@pytest.mark.parametrize("ids, text", [
    ([0xFF], "\ufffd"),
    ([0x80], "\ufffd"),
    ([0xE4, 0xB8], "\ufffd"),  # truncated 3-byte sequence
    ([0x61, 0xC3, 0x28, 0x62], "a\ufffd(b"),
    ([0xED, 0xA0, 0x80], "\ufffd\ufffd\ufffd"),  # encoded surrogate
    ([0xF0, 0x9F, 0x9A], "\ufffd"),  # emoji cut short
])
def test_byte_decode_invalid(tok, ids, text):
    assert tok.decode(ids) == text
    assert tok.decode(ids) == bytes(ids).decode("utf-8", errors="replace")


def test_byte_errors(tok):
    with pytest.raises(ValueError, match="outside the tiny model's vocabulary"):
        tok.decode([262])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("a\ud800b")


def test_load_tokenizer_tiny_and_missing(tmp_path):
    assert isinstance(load_tokenizer("tiny"), ByteTokenizer)
    assert load_tokenizer(tmp_path) is None
    assert load_tokenizer(tmp_path / "does-not-exist") is None


# ---- HFTokenizer on a small byte-level BPE built here ----

HF_SPECIALS = ["<s>", "</s>", "<|user|>"]


def build_hf_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=HF_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["hello world", "the quick brown fox jumps over the lazy dog", "moeflash runs experts"] * 20
    t.train_from_iterator(corpus, trainer)
    t.save(str(directory / "tokenizer.json"))
    return t


@pytest.fixture()
def hf_dir(tmp_path):
    build_hf_tokenizer(tmp_path)
    return tmp_path


def test_hf_round_trip_and_no_implicit_specials(hf_dir):
    tok = HFTokenizer(hf_dir)
    assert tok.special_tokens == {"<s>": 0, "</s>": 1, "<|user|>": 2}
    for text in ["hello world", "日本語 🚀 e\u0301", "", "<|user|>hello</s>"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode("<|user|>hello")[0] == 2
    assert 0 not in tok.encode("hello")  # no BOS unless asked
    assert tok.decode(tok.encode("<|user|>hello</s>"), skip_special_tokens=True) == "hello"
    assert tok.vocab_size == len(json.loads((hf_dir / "tokenizer.json").read_text())["model"]["vocab"])


def test_hf_bos_eos_from_config(hf_dir):
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}))
    tok = load_tokenizer(hf_dir, bos_token_id=7, eos_token_id=8)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.encode("hello", add_bos=True)[0] == 0


def test_hf_bos_eos_fallback_and_errors(hf_dir):
    tok = HFTokenizer(hf_dir, bos_token_id=2, eos_token_id=1)
    assert (tok.bos_token_id, tok.eos_token_id) == (2, 1)
    assert tok.encode("hello", add_bos=True)[0] == 2
    with pytest.raises(ValueError, match="no BOS token"):
        HFTokenizer(hf_dir).encode("hi", add_bos=True)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(ValueError, match="no such token"):
        HFTokenizer(hf_dir)


def _byte_level_chars():
    """GPT-2's byte -> printable-character map that HF's ByteLevel model uses as its base vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(moved)}}


@pytest.mark.parametrize("seq", [[0xE4, 0xB8], [0xB8, 0xAD], [0xED, 0xA0, 0x80], [0x61, 0xC3, 0x28], [0xFF, 0x41]])
def test_byte_decode_matches_hf_byte_level(hf_dir, seq):
    hf = HFTokenizer(hf_dir)
    chars = _byte_level_chars()
    ids = [hf._tok.token_to_id(chars[b]) for b in seq]
    assert hf.decode(ids) == ByteTokenizer().decode(seq)
