"""`moeflash trace`, `moeflash bench experts`, `generate --expert-memory` and the store's metrics."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from moeflash.cli import main
from moeflash.config import ModelConfig
from moeflash.model.init import randomize_
from moeflash.model.v4 import Transformer
from moeflash.engine.load import load_model
from moeflash.weights.save import save_checkpoint

CFG = ModelConfig.preset("tiny").replace(n_routed_experts=16, num_experts_per_tok=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(randomize_(Transformer(CFG), seed=2), tmp_path_factory.mktemp("cli") / "m", torch.float32)


def test_trace_then_bench_experts(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("256,10,11,12\n\n256,40,41\n")
    out = tmp_path / "trace.jsonl"
    assert main(["trace", "--model", str(ckpt), "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "5", "--dtype", "float32"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == info["tokens"] == (4 + 5) + (3 + 5)
    assert [r["seq"] for r in rows] == [0] * 9 + [1] * 8 and rows[9]["pos"] == 0
    assert all(len(r["experts"]) == CFG.num_hidden_layers and all(len(e) == 3 for e in r["experts"]) for r in rows)
    assert rows[0]["experts"][0] == sorted(rows[0]["experts"][0])
    meta = json.loads((tmp_path / "trace.jsonl.meta.json").read_text())
    assert meta["experts"] == 16 and meta["expert_bytes"] == 3 * CFG.hidden_size * CFG.moe_intermediate_size * 4

    assert main(["bench", "experts", "--trace", str(out), "--budget", "0.25", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    for row in report["budgets"]:
        hr = row["hit_rate"]
        assert set(hr) == {"lru", "lfu", "pinned", "belady"}
        assert all(hr["belady"] >= hr[p] - 1e-12 for p in ("lru", "lfu", "pinned"))
        assert set(row["est_tokens_per_s"]) == set(hr)
    assert report["budgets"][1]["capacity_experts"] == CFG.num_hidden_layers * 16


def test_trace_with_text_prompts_on_tiny(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\nWorld!\n")
    assert main(["trace", "--model", "tiny", "--prompts", str(prompts), "--out", str(tmp_path / "t.jsonl"),
                 "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == (6 + 2) + (7 + 2)  # BOS + bytes, + 2 each


def test_bench_experts_synthetic_and_errors(tmp_path, capsys):
    assert main(["bench", "experts", "--synthetic", "--synthetic-tokens", "400", "--synthetic-shape", "4", "32", "4",
                 "--budget", "0.25"]) == 0
    hr = json.loads(capsys.readouterr().out)["budgets"][0]["hit_rate"]
    assert hr["belady"] >= hr["lfu"] and hr["lfu"] > 0
    assert main(["bench", "experts", "--synthetic", "--budget", "0"]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main(["trace", "--model", "tiny", "--prompts", str(tmp_path / "none.txt"), "--out", "x"]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["trace", "--model", "tiny", "--prompts", str(empty), "--out", "x"]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_generate_with_expert_memory_prints_counters(ckpt, capsys):
    assert main(["generate", "--model", str(ckpt), "--prompt-ids", "256,5,6", "--max-new-tokens", "6",
                 "--dtype", "float32", "--expert-memory", "0.0005", "--expert-policy", "lru"]) == 0
    err = capsys.readouterr().err
    assert "[experts: lru," in err and "hit rate" in err
    assert main(["generate", "--model", str(ckpt), "--prompt-ids", "256", "--expert-memory", "0.001",
                 "--memory-limit", "0.00001"]) == 2
    assert "too small" in capsys.readouterr().err


def test_server_exports_expert_metrics(ckpt):
    """A checkpoint without a tokenizer served with its experts streamed: token-id prompts (or <|id|>
    text) in, <|id|> text out, the store's counters on /metrics."""
    from moeflash.tokenizer import IdTokenizer

    from .server_util import RunningServer

    model, tok = load_model(ckpt, dtype="float32", expert_memory=0.001)
    assert tok is None
    with RunningServer(model, IdTokenizer(CFG.vocab_size, 256, 257), "m", "none") as s:
        r = httpx.post(s.url + "/v1/completions", json={"model": "m", "prompt": [256, 7, 8], "max_tokens": 4,
                                                         "temperature": 0})
        assert r.status_code == 200
        text_out = r.json()["choices"][0]["text"]
        again = httpx.post(s.url + "/v1/completions", json={"model": "m", "prompt": "<|256|><|7|><|8|>",
                                                             "max_tokens": 4, "temperature": 0})
        assert again.json()["choices"][0]["text"] == text_out and text_out.startswith("<|")
        bad = httpx.post(s.url + "/v1/completions", json={"model": "m", "prompt": "plain words"})
        assert bad.status_code == 400 and "no tokenizer" in bad.json()["error"]["message"]
        chat = httpx.post(s.url + "/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "no chat template" in chat.json()["error"]["message"]
        text = httpx.get(s.url + "/metrics").text
    for name in ("moeflash:expert_cache_hits_total", "moeflash:expert_cache_misses_total",
                 "moeflash:expert_cache_evictions_total", "moeflash:expert_bytes_read_total",
                 "moeflash:expert_prefetch_correct_total", "moeflash:expert_cache_resident"):
        assert name in text, name
    misses = sum(float(ln.split()[-1]) for ln in text.splitlines()
                 if ln.startswith("moeflash:expert_cache_misses_total"))
    assert misses > 0
    model.expert_store.close()
