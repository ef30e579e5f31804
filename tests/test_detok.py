"""Incremental detokenizer tests: streamed text equals the full decode, never shows half a character,
and never shows a stop string or any text after it."""

import random

import pytest

from moeflash.engine.detok import IncrementalDetokenizer
from moeflash.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id
THINK = TOK.special_tokens["<think>"]


def stream(ids, stop=(), skip_special_tokens=True):
    """(pieces returned by each push, flush text, the detokenizer)."""
    d = IncrementalDetokenizer(TOK, stop=stop, skip_special_tokens=skip_special_tokens)
    pieces = []
    for i in ids:
        if d.stopped:
            break
        pieces.append(d.push(i))
    return pieces, d.flush(), d


def test_multibyte_characters_arrive_whole():
    ids = TOK.encode("a日🚀é")  # 1 + 3 + 4 + 2 bytes
    pieces, tail, d = stream(ids)
    assert pieces == ["a", "", "", "日", "", "", "", "🚀", "", "é"]
    assert tail == "" and d.text == "a日🚀é"
    assert all("\ufffd" not in p for p in pieces)


def test_pushes_and_flush_equal_the_full_decode():
    ids = TOK.encode("Hello, 世界! ") + [THINK] + TOK.encode("👨‍👩‍👧 done")
    pieces, tail, d = stream(ids, skip_special_tokens=False)
    assert "".join(pieces) + tail == TOK.decode(ids) == d.text


def test_incomplete_character_at_the_end_is_flushed_as_replacement():
    ids = TOK.encode("ok日")[:-1]
    pieces, tail, d = stream(ids)
    assert "".join(pieces) == "ok" and tail == "\ufffd" == TOK.decode(ids)[2:]


def test_invalid_bytes_round_trip_with_a_bounded_window():
    ids = [0xFF] * 300 + TOK.encode("日") + [0x80, 0xE6, 0x97] + TOK.encode("x")
    d = IncrementalDetokenizer(TOK)
    out = []
    for i in ids:
        out.append(d.push(i))
        assert len(d._ids) <= 20  # a long run of U+FFFD never makes every push decode everything
    out.append(d.flush())
    assert "".join(out) == TOK.decode(ids)


def test_special_tokens_are_skipped_and_join_the_bytes_around_them():
    ids = [BOS] + TOK.encode("hi ")[:] + [THINK] + list("日".encode())[:1] + [EOS] + list("日".encode())[1:]
    pieces, tail, d = stream(ids)
    assert d.text == "hi 日" == TOK.decode(ids, skip_special_tokens=True)
    pieces, tail, d = stream(TOK.encode("a") + [THINK, EOS], skip_special_tokens=False)
    assert d.text == "a<think><｜end▁of▁sentence｜>"


def test_many_skipped_specials_keep_the_window_small():
    d = IncrementalDetokenizer(TOK)
    for _ in range(200):
        d.push(THINK)
        assert len(d._ids) <= 20  # bounded, however many arrive
    d.push(ord("z"))
    assert d.flush() == "" and d.text == "z"


def test_stop_string_across_tokens_is_never_emitted():
    ids = TOK.encode("Answer: 42\n###\nmore text")
    pieces, tail, d = stream(ids, stop=["###"])
    assert d.stopped and d.stop_reason == "###"
    assert d.text == "Answer: 42\n" == "".join(pieces) + tail
    assert all("#" not in p for p in pieces)


def test_text_before_the_stop_in_the_same_push_is_emitted():
    # "a" is held (it may start "ab"); the push completing "日" releases it and stops on "日"
    d = IncrementalDetokenizer(TOK, stop=["ab", "日"])
    out = [d.push(i) for i in TOK.encode("a日")]
    assert out == ["", "", "", "a"] and d.stopped and d.stop_reason == "日" and d.text == "a"


def test_a_stop_prefix_that_diverges_is_emitted_later():
    d = IncrementalDetokenizer(TOK, stop=["</end>"])
    out = [d.push(i) for i in TOK.encode("x </en")]
    assert "".join(out) == "x "  # "</en" may still become the stop string
    out = [d.push(i) for i in TOK.encode("try>")]
    assert "".join(out) == "</entry>" and not d.stopped
    assert d.flush() == "" and d.text == "x </entry>"


def test_flush_emits_a_partial_stop_prefix():
    pieces, tail, d = stream(TOK.encode("done ##"), stop=["###"])
    assert "".join(pieces) == "done " and tail == "##" and not d.stopped and d.text == "done ##"


def test_several_stop_strings_the_first_to_complete_wins():
    pieces, tail, d = stream(TOK.encode("one STOP two END three"), stop=["END", "STOP"])
    assert d.stop_reason == "STOP" and d.text == "one "
    # "bc" completes before "abcd" even though "abcd" starts earlier
    pieces, tail, d = stream(TOK.encode("xabcd"), stop=["abcd", "bc"])
    assert d.stop_reason == "bc" and d.text == "xa"


def test_stop_string_in_one_push_with_text_after_it():
    # skip_special_tokens=False: a special token decodes to a whole string in one push
    d = IncrementalDetokenizer(TOK, stop=["think>"], skip_special_tokens=False)
    assert d.push(ord("A")) == "A"
    assert d.push(THINK) == "<" and d.stopped and d.text == "A<"


def test_after_the_end_push_is_an_error_and_flush_is_empty():
    pieces, tail, d = stream(TOK.encode("a#b"), stop="#")
    assert d.text == "a" and d.flush() == ""
    with pytest.raises(RuntimeError, match="stop string '#'"):
        d.push(ord("c"))
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(TOK, stop=[""])


POOL = "abc xyz.\n#<>日本語éü🚀👍🏽\u200d"


@pytest.mark.parametrize("seed", range(5))
def test_random_strings_round_trip(seed):
    rng = random.Random(seed)
    for _ in range(60):
        text = "".join(rng.choice(POOL) for _ in range(rng.randint(0, 40)))
        ids = TOK.encode(text)
        pieces, tail, d = stream(ids)
        assert "".join(pieces) + tail == text == d.text
        assert all(not p.endswith("\ufffd") for p in pieces)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_and_stops_match_a_plain_search(seed):
    """Arbitrary ids (invalid UTF-8, specials): the output is the full decode cut before the first
    stop string to complete."""
    rng = random.Random(100 + seed)
    byte_pool = list("ab#日🚀".encode()) + [0xFF, 0x80, THINK, EOS]
    stops = ["#a", "日b", "ba#", "\ufffd\ufffd"]
    for _ in range(100):
        ids = [rng.choice(byte_pool) for _ in range(rng.randint(0, 30))]
        full = TOK.decode(ids, skip_special_tokens=True)
        ends = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
        pieces, tail, d = stream(ids, stop=stops)
        if ends:
            _, start, s = min(ends)
            assert d.stopped and d.text == full[:start], (ids, s)
        else:
            assert not d.stopped and d.text == full
        assert "".join(pieces) + tail == d.text
