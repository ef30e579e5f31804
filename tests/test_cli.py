"""`moeflash generate` on the embedded tiny model: text and ids, JSON output, seeds, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

from moeflash.cli import main
from moeflash.tokenizer import ByteTokenizer


def run_json(capsys, *args):
    assert main(["generate", "--model", "tiny", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_tiny_json(capsys):
    out = run_json(capsys, "--prompt", "Hello, moeflash", "--max-new-tokens", "12")
    assert 1 <= len(out["token_ids"]) <= 12
    assert all(0 <= t < 262 for t in out["token_ids"])
    assert isinstance(out["text"], str)
    assert out["prompt_tokens"] == len(ByteTokenizer().encode("Hello, moeflash")) + 1  # + BOS
    again = run_json(capsys, "--prompt", "Hello, moeflash", "--max-new-tokens", "12")
    assert again["token_ids"] == out["token_ids"]  # greedy is deterministic


def test_seeded_sampling_is_reproducible(capsys):
    a = run_json(capsys, "--prompt-ids", "256,72,105", "--temperature", "1.0", "--seed", "3",
                 "--max-new-tokens", "16")
    b = run_json(capsys, "--prompt-ids", "256,72,105", "--temperature", "1.0", "--seed", "3",
                 "--max-new-tokens", "16")
    c = run_json(capsys, "--prompt-ids", "256,72,105", "--temperature", "1.0", "--seed", "4",
                 "--max-new-tokens", "16")
    assert a["token_ids"] == b["token_ids"] and a["token_ids"] != c["token_ids"]


def test_float32_and_bfloat16(capsys):
    f32 = run_json(capsys, "--prompt-ids", "256,65", "--max-new-tokens", "4", "--dtype", "float32")
    bf16 = run_json(capsys, "--prompt-ids", "256,65", "--max-new-tokens", "4", "--dtype", "bfloat16")
    assert len(f32["token_ids"]) == len(bf16["token_ids"]) == 4 or 257 in f32["token_ids"]


def test_bad_input_gives_clear_errors(capsys):
    assert main(["generate", "--model", "tiny", "--prompt-ids", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny", "--prompt-ids", "1,999"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny"]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--model", "/no/such/dir", "--prompt", "x"]) == 2
    assert "neither a built-in model" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--max-new-tokens", "-1"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err


def test_console_script_text_mode():
    r = subprocess.run([sys.executable, "-m", "moeflash.cli", "generate", "--model", "tiny", "--prompt",
                        "Hi", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tokens in" in r.stderr


def test_prompt_file_reuses_the_document_across_runs(capsys, tmp_path):
    """`generate --prompt-file DOC --prompt Q --prefix-cache-dir DIR`: a second run with the same
    document reads its state from disk and answers as a run without the cache does."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    cache = str(tmp_path / "cache")
    first = run_json(capsys, "--prompt-file", str(doc), "--prompt", "Who jumps?", "--prefix-cache-dir", cache)
    second = run_json(capsys, "--prompt-file", str(doc), "--prompt", "Who is lazy?", "--prefix-cache-dir", cache)
    # a miss on an empty cache prefills in the same chunks (the saved boundary ends one), so a hit
    # must give exactly its tokens
    plain = run_json(capsys, "--prompt-file", str(doc), "--prompt", "Who is lazy?", "--prefix-cache-dir",
                     str(tmp_path / "empty"))
    assert first["cached_tokens"] == 0 and plain["cached_tokens"] == 0
    block = 8  # the tiny model's compression ratios 4 and 8
    doc_tokens = 1 + len(doc.read_bytes())  # BOS + bytes
    assert second["cached_tokens"] == doc_tokens // block * block
    assert second["token_ids"] == plain["token_ids"]
    assert main(["generate", "--model", "tiny", "--prompt-file", str(tmp_path / "missing.txt")]) == 2
