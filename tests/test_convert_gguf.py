"""`moeflash convert --to gguf`: a V4 checkpoint directory in, a GGUF that llama.cpp runs out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moeflash.cli import main
from moeflash.config import CSA, HCA, ModelConfig
from moeflash.model.init import randomize_
from moeflash.model.v4 import Transformer
from moeflash.tokenizer import ByteTokenizer
from moeflash.weights.build import load_model
from moeflash.weights.save import save_checkpoint

from .llama_oracle import llama_cpp
pytest.importorskip("gguf", reason="the gguf package writes GGUF files")

# the tiny preset within llama.cpp's deepseek4 limits (hc_mult 4, CSA 4 / HCA 128, indexer dim 64)
CONFIG = ModelConfig.preset("tiny").replace(compress_rates={CSA: 4, HCA: 128}, index_head_dim=64,
                                            index_n_heads=16, index_topk=16)


def test_convert_checkpoint_dir_to_gguf_runs_in_llama_cpp(tmp_path, capsys):
    ckpt = save_checkpoint(randomize_(Transformer(CONFIG), seed=3), tmp_path / "ckpt", torch.float32)
    out = tmp_path / "tiny.gguf"
    assert main(["convert", "--model", str(ckpt), "--to", "gguf", "--out", str(out), "--dtype", "float32",
                 "--expert-type", "f32", "--dense-type", "f32"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["to"] == "gguf" and out.stat().st_size > 0
    model, _ = load_model(ckpt, dtype="float32")  # no tokenizer.json: the GGUF gets the byte vocabulary
    tok = ByteTokenizer()
    ids = tok.encode("Hello from moeflash, exported to llama.cpp. " * 4, add_bos=True)[:150]
    llm = llama_cpp.Llama(str(out), n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False,
                          type_k=0, type_v=0, flash_attn=False)
    assert llm.tokenize(tok.decode(ids[1:]).encode(), add_bos=False, special=True) == ids[1:]
    llm.eval(ids)
    ref = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0].numpy()
    err = np.abs(got - ref).max()
    print(f"\n[convert --to gguf, f32] max|dlogit| vs llama.cpp over {len(ids)} tokens: {err:.2e}")
    assert err < 1e-3


def test_convert_errors(tmp_path, capsys):
    assert main(["convert", "--preset", "tiny", "--to", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "llama.cpp hard-codes 128" in capsys.readouterr().err
    assert main(["convert", "--out", str(tmp_path / "x")]) == 2
    assert "exactly one source" in capsys.readouterr().err
    assert main(["convert", "--model", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "--to gguf" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
