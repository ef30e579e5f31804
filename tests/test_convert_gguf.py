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


@pytest.mark.parametrize("dense_type", ["bf16", "q8_0"])
def test_streamed_conversion_equals_the_in_memory_export(tmp_path, dense_type):
    """`convert --model DIR --to gguf` reads tensor by tensor. Its dense tensors are byte for byte the
    ones exported from the whole model loaded (decoded) in memory; its MXFP4 experts carry the
    checkpoint's own FP4 codes and E8M0 scales (repacked, never decoded), which decode to the same
    values as the in-memory export's re-quantization."""
    import gguf
    from gguf.quants import dequantize

    from moeflash.weights.gguf_export import export_checkpoint_gguf, export_gguf, fp4_to_mxfp4
    from moeflash.weights.loader import Checkpoint

    ckpt = save_checkpoint(randomize_(Transformer(CONFIG), seed=5), tmp_path / "ckpt", torch.bfloat16,
                           official=True)
    seen = []
    streamed = export_checkpoint_gguf(ckpt, tmp_path / "streamed.gguf", dense_type=dense_type,
                                      progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] == len(seen) and not list(tmp_path.glob("*.part"))
    model, _ = load_model(ckpt, dtype="float32", dequantize=True)
    whole = export_gguf(model, tmp_path / "whole.gguf", dense_type=dense_type)
    a, b = gguf.GGUFReader(streamed), gguf.GGUFReader(whole)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert len(a.fields) == len(b.fields)
    experts = 0
    with Checkpoint.open(ckpt) as ck:
        for ta, tb in zip(a.tensors, b.tensors):
            assert ta.tensor_type == tb.tensor_type and list(ta.shape) == list(tb.shape), ta.name
            raw_a, raw_b = np.asarray(ta.data), np.asarray(tb.data)
            if "_exps." not in ta.name:
                assert raw_a.tobytes() == raw_b.tobytes(), ta.name
                continue
            experts += 1
            np.testing.assert_array_equal(dequantize(raw_a, ta.tensor_type), dequantize(raw_b, tb.tensor_type))
            layer, proj = int(ta.name.split(".")[1]), {"gate": "w1", "up": "w3", "down": "w2"}[ta.name.split("_")[1]]
            packed, scale, fmt = ck.get_quantized(f"layers.{layer}.ffn.experts.1.{proj}.weight")
            assert fmt == "fp4" and raw_a[1].tobytes() == fp4_to_mxfp4(packed, scale).tobytes()
    assert experts == 3 * CONFIG.num_hidden_layers


def test_streamed_conversion_peak_memory_is_about_one_tensor(tmp_path):
    """Converting a checkpoint whose experts are most of its 280 MB raises the converting process's
    peak anonymous memory by a fraction of the file size (the whole model in bf16 would be several
    times it: FP4 experts grow 4x when decoded)."""
    import subprocess
    import sys

    cfg = CONFIG.replace(n_routed_experts=64, moe_intermediate_size=1024, hidden_size=512)
    ckpt = save_checkpoint(randomize_(Transformer(cfg), seed=1), tmp_path / "big", torch.bfloat16, official=True)
    file_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    script = (
        "import threading, time\n"
        "from moeflash.weights.gguf_export import export_checkpoint_gguf\n"
        "def anon():\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('RssAnon'))\n"
        "peak, done = [0], []\n"
        "def watch():\n"
        "    while not done:\n"
        "        peak[0] = max(peak[0], anon()); time.sleep(0.002)\n"
        "base = anon(); t = threading.Thread(target=watch); t.start()\n"
        f"export_checkpoint_gguf({str(ckpt)!r}, {str(tmp_path / 'big.gguf')!r}, dense_type='q8_0')\n"
        "done.append(1); t.join(); print(base, peak[0])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    base, peak = (int(v) for v in out.stdout.split())
    grown = peak - base  # anonymous memory: the file's mapped pages are page cache, not the process's
    print(f"\n[streamed convert] file {file_bytes / 1e6:.0f} MB, peak anonymous RSS grew {grown / 1e6:.0f} MB")
    assert file_bytes > 100e6
    assert grown < 0.5 * file_bytes  # decoding the FP4 experts alone would be 4x the file
