"""GGUF export for llama.cpp's `deepseek4` architecture, cross-checked against llama.cpp itself.

The model is the tiny preset made loadable by llama.cpp (CSA 4 / HCA 128, indexer heads of 64,
hc_mult 4): sliding, CSA and HCA layers, a hash-routed first layer, YaRN on the compressed layers,
and an MTP module (which the export skips). Its routed experts are rounded to FP4 first, so both
engines hold identical weights. Prompts are 160 tokens, so HCA entries (one per 128 tokens) exist and
the CSA indexer (top-16 of up to 48 entries) really selects. llama.cpp runs with F32 KV caches and
no flash attention, so the only arithmetic it does differently is the quantization its kernels apply.

Measured here (fp32, 2 threads):
- experts zeroed, dense F32: llama.cpp's logits equal ours to ~5e-6 max-abs (rel 2e-6); greedy tokens
  are identical.
- live MXFP4 experts: llama.cpp quantizes each expert's input activations to Q8_0 (32-value blocks,
  scale amax/127 in fp16) before the MXFP4 dot products. Against our forward with that rounding
  emulated, the median per-position relative error is ~3e-5 and the worst ~7e-3: fp32 noise of 1e-7
  (other matmul blocking) now and then moves an activation across a rounding step, and the change
  reaches later positions through the compressed entries. Against our plain fp32 forward the median
  is ~1.8e-2, and a few positions (router near-ties that the activation rounding flips) reach ~0.5.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

from moeflash.config import CSA, HASH_MOE, HCA, MOE, ModelConfig
from moeflash.model.init import randomize_
from moeflash.model.v4 import Transformer
from moeflash.tokenizer import ByteTokenizer
from moeflash.weights.gguf_export import (
    check_llama_cpp_compatible,
    export_gguf,
    fp4_to_mxfp4,
    gguf_name,
    mxfp4_blocks,
)
from moeflash.weights.quant import dequant_fp4, pack_fp4, quant_fp4

gguf = pytest.importorskip("gguf", reason="the `gguf` package (GGUF writer) is not installed")

CONFIG = ModelConfig.preset("tiny").replace(
    compress_rates={CSA: 4, HCA: 128}, index_head_dim=64, index_n_heads=16, index_topk=16)
PROMPT_LEN = 160
DECODE = 32
N_CTX = 256
TEXT = ("DeepSeek-V4 mixes four residual streams, compresses keys 4x and 128x, and routes tokens to "
        "experts: sliding windows, sparse and heavy compression, all checked token by token. ") * 3

# bounds, each a few times what was measured (module docstring)
ZERO_EXPERT_TOL = 1e-4          # max-abs logit difference, experts zeroed
EMULATED_MEDIAN_REL = 1e-3      # live MXFP4 vs our forward with Q8_0-rounded expert inputs
EMULATED_MAX_REL = 5e-2
EMULATED_ABS_TOL = 0.05         # measured max-abs 0.017; argmax must agree where the margin > 2x this
PLAIN_MEDIAN_REL = 6e-2         # live MXFP4 vs our plain fp32 forward (measured 1.8e-2)
PLAIN_ARGMAX_AGREEMENT = 0.85   # share of positions with the same argmax (measured 93.8%)


# ------------------------------------------------------------------------------------------------
# models and helpers


def fp4_exact_(model: Transformer) -> Transformer:
    """Round every routed expert to FP4 (e2m1 x per-32 power of two), as the official checkpoint is."""
    with torch.no_grad():
        for layer in model.layers:
            for e in layer.ffn.experts:
                for lin in (e.w1, e.w2, e.w3):
                    lin.weight.copy_(dequant_fp4(*quant_fp4(lin.weight)))
    return model


@pytest.fixture(scope="module")
def model() -> Transformer:
    return fp4_exact_(randomize_(Transformer(CONFIG).float().eval(), seed=1))


@pytest.fixture(scope="module")
def zero_model(model) -> Transformer:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.layers:
            for e in layer.ffn.experts:
                for lin in (e.w1, e.w2, e.w3):
                    lin.weight.zero_()
    return m


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    ids = ByteTokenizer().encode(TEXT, add_bos=True)[:PROMPT_LEN]
    assert len(ids) == PROMPT_LEN
    return ids


@pytest.fixture(scope="module")
def llama_cpp():
    from .llama_oracle import require

    return require()


@contextlib.contextmanager
def llama(llama_cpp, path):
    """An fp32 llama.cpp context: F32 KV caches, no flash attention, every position's logits."""
    llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_batch=N_CTX, n_threads=2, logits_all=True,
                          verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          flash_attn=False)
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


@torch.no_grad()
def ours_logits(model: Transformer, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids]))[0].numpy()


@torch.no_grad()
def ours_greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    state = model.new_state(1)
    logits = model(torch.tensor([ids]), state)[0, -1]
    out = []
    for _ in range(n):
        tok = int(logits.argmax())
        out.append(tok)
        logits = model(torch.tensor([[tok]]), state)[0, -1]
    return out


def q8_0_round(x: torch.Tensor) -> torch.Tensor:
    """What ggml's CPU kernels do to an activation row before an MXFP4 / Q8_0 dot product: blocks of
    32, scale amax/127 stored as fp16, values rounded to int8 with 127/amax."""
    b = x.reshape(-1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(b * inv) * (amax / 127).half().float()).reshape(x.shape)


@contextlib.contextmanager
def q8_0_expert_inputs(model: Transformer):
    """Round every routed expert's matmul inputs as llama.cpp's MXFP4 kernels do."""
    hooks = [lin.register_forward_pre_hook(lambda mod, args: (q8_0_round(args[0]),))
             for layer in model.layers for e in layer.ffn.experts for lin in (e.w1, e.w2, e.w3)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def rel_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per position: ||got - ref|| / ||ref|| over the vocabulary."""
    return np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


def top2_margin(logits: np.ndarray) -> np.ndarray:
    s = np.sort(logits, axis=-1)
    return s[:, -1] - s[:, -2]


# ------------------------------------------------------------------------------------------------
# cross-checks against llama.cpp


def test_zero_experts_greedy_and_logits_match_llama_cpp(llama_cpp, zero_model, prompt, tmp_path):
    path = export_gguf(zero_model, tmp_path / "zero.gguf", tokenizer=ByteTokenizer())
    with llama(llama_cpp, path) as llm:
        got = llama_logits(llm, prompt)
        theirs = llama_greedy(llm, prompt, DECODE)
    ref = ours_logits(zero_model, prompt)
    diff = float(np.abs(got - ref).max())
    print(f"\nzero experts: prompt logits max-abs diff {diff:.2e}, max rel {rel_errors(got, ref).max():.2e}")
    assert diff < ZERO_EXPERT_TOL
    ours = ours_greedy(zero_model, prompt, DECODE)
    print(f"greedy ours   {ours}\ngreedy llama  {theirs}")
    assert theirs == ours


def test_live_mxfp4_experts_match_llama_cpp(llama_cpp, model, prompt, tmp_path):
    ids = prompt + ours_greedy(model, prompt, DECODE)  # the prompt and what we would generate
    path = export_gguf(model, tmp_path / "live.gguf", expert_type="mxfp4", tokenizer=ByteTokenizer())
    with llama(llama_cpp, path) as llm:
        got = llama_logits(llm, ids)
    plain = ours_logits(model, ids)
    with q8_0_expert_inputs(model):
        emulated = ours_logits(model, ids)

    rel_e, rel_p = rel_errors(got, emulated), rel_errors(got, plain)
    abs_e = np.abs(got - emulated).max(axis=-1)
    print(f"\nlive MXFP4 vs ours with Q8_0 expert inputs: max-abs {abs_e.max():.3e}, "
          f"rel median {np.median(rel_e):.2e} max {rel_e.max():.2e}")
    print(f"live MXFP4 vs plain fp32 ours: max-abs {np.abs(got - plain).max():.3e}, rel median "
          f"{np.median(rel_p):.2e} p90 {np.percentile(rel_p, 90):.2e} max {rel_p.max():.2e}, argmax agrees "
          f"at {np.mean(got.argmax(-1) == plain.argmax(-1)):.1%} of {len(ids)} positions")
    assert np.median(rel_e) < EMULATED_MEDIAN_REL
    assert rel_e.max() < EMULATED_MAX_REL
    clear = top2_margin(emulated) > 2 * EMULATED_ABS_TOL
    assert clear.sum() > len(ids) // 2
    assert np.array_equal(got.argmax(-1)[clear], emulated.argmax(-1)[clear])
    assert np.median(rel_p) < PLAIN_MEDIAN_REL
    assert np.mean(got.argmax(-1) == plain.argmax(-1)) > PLAIN_ARGMAX_AGREEMENT


# (expert_type, dense_type) -> bound on the median relative error vs our plain fp32 forward. Measured:
# experts f32 9e-7, f16 4e-4, bf16 3e-3, q8_0 3e-2 (dense f32); MXFP4 experts with dense f16 2.3e-2,
# bf16 2.8e-2, q8_0 6.2e-2. llama.cpp's CPU runtime accepts every one of these types.
TYPE_CASES = {
    ("f32", "f32"): 1e-4, ("f16", "f32"): 3e-3, ("bf16", "f32"): 2e-2, ("q8_0", "f32"): 8e-2,
    ("mxfp4", "f16"): 8e-2, ("mxfp4", "bf16"): 1e-1, ("mxfp4", "q8_0"): 2e-1,
}


@pytest.mark.parametrize("expert_type,dense_type", sorted(TYPE_CASES))
def test_llama_cpp_runs_every_tensor_type(llama_cpp, model, prompt, tmp_path, expert_type, dense_type):
    path = export_gguf(model, tmp_path / "t.gguf", expert_type=expert_type, dense_type=dense_type)
    with llama(llama_cpp, path) as llm:
        got = llama_logits(llm, prompt)
    rel = rel_errors(got, ours_logits(model, prompt))
    print(f"\nexperts {expert_type}, dense {dense_type}: rel median {np.median(rel):.2e} max {rel.max():.2e}")
    assert np.median(rel) < TYPE_CASES[(expert_type, dense_type)]


def test_llama_cpp_tokenizes_like_byte_tokenizer(llama_cpp, zero_model, tmp_path):
    path = export_gguf(zero_model, tmp_path / "tok.gguf", tokenizer=ByteTokenizer())
    tok = ByteTokenizer()
    text = "Héllo, wörld! 日本語 <｜User｜>hi<｜Assistant｜><think>\n\t x  y</think>\x00\x7f end"
    llm = llama_cpp.Llama(str(path), vocab_only=True, n_ctx=N_CTX, verbose=False)
    try:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == tok.encode(text)
        assert llm.detokenize(ids, special=True).decode() == text
        assert (llm.token_bos(), llm.token_eos(), llm.n_vocab()) == (256, 257, CONFIG.vocab_size)
    finally:
        llm.close()


def hf_pre_tokenizer(kind: str):
    """GPT-2's byte-level splitting, or DeepSeek-V3/V4's Split rules followed by byte-level mapping."""
    from tokenizers import Regex, pre_tokenizers

    from moeflash.weights.gguf_export import DEEPSEEK_V3_SPLITS

    if kind == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(p), behavior="isolated") for p in DEEPSEEK_V3_SPLITS]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.mark.parametrize("kind", ["gpt-2", "deepseek-v3"])
def test_llama_cpp_tokenizes_like_an_hf_byte_level_bpe(llama_cpp, tmp_path, kind):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moeflash.tokenizer import HFTokenizer

    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = hf_pre_tokenizer(kind)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([TEXT, "hello world, hello there, 12345 héllo 日本語テキスト\r\n next!!"], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path)
    cfg = CONFIG.replace(vocab_size=tok.vocab_size, bos_token_id=0, eos_token_id=1)
    path = export_gguf(Transformer(cfg), tmp_path / "hf.gguf", tokenizer=tok)
    llm = llama_cpp.Llama(str(path), vocab_only=True, n_ctx=N_CTX, verbose=False)
    try:
        for text in ("hello world, hello there 1234567 日本語テキスト\r\n next line!!  x = f(y)+1", TEXT[:120],
                     " spaces  and\ttabs 42 héllo <｜end▁of▁sentence｜>"):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
    finally:
        llm.close()


# ------------------------------------------------------------------------------------------------
# the file and the constraints (no llama.cpp needed)


def test_file_layout(zero_model, tmp_path):
    path = export_gguf(zero_model, tmp_path / "f.gguf")
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    q = gguf.GGMLQuantizationType
    assert r.fields["general.architecture"].contents() == "deepseek4"
    assert r.fields["deepseek4.attention.compress_ratios"].contents() == [0, 4, 128, 4]
    assert r.fields["deepseek4.hash_layer_count"].contents() == 1
    assert tensors["blk.1.ffn_gate_exps.weight"].tensor_type == q.MXFP4
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [CONFIG.moe_intermediate_size,
                                                                 CONFIG.hidden_size, CONFIG.n_routed_experts]
    assert tensors["blk.0.ffn_gate_tid2eid.weight"].tensor_type == q.I32
    assert "blk.0.exp_probs_b.bias" not in tensors and "blk.1.exp_probs_b.bias" in tensors
    assert tensors["blk.2.hc_attn_fn.weight"].tensor_type == q.F32
    assert "blk.1.indexer.attn_q_b.weight" in tensors and "blk.2.indexer.attn_q_b.weight" not in tensors
    assert not any("nextn" in n or n.startswith("blk.4.") for n in tensors)  # MTP is not exported
    n_dense = sum(1 for n in zero_model.state_dict() if not n.startswith("mtp.") and ".ffn.experts." not in n)
    assert len(tensors) == n_dense + 3 * CONFIG.num_hidden_layers
    assert gguf_name("layers.1.attn.kv_norm.weight") == "blk.1.attn_kv_a_norm.weight"


BAD = {
    "hc_mult": {"hc_mult": 2},
    "compress_rates": {"compress_rates": {CSA: 4, HCA: 8}},
    "index_head_dim": {"index_head_dim": 96},
    "scoring_func": {"scoring_func": "sigmoid"},
    "mlp_layer_types": {"mlp_layer_types": [MOE, HASH_MOE, MOE, MOE]},
    "rope_scaling": {"rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 64,
                                      "beta_fast": 16, "beta_slow": 1}},
    "n_shared_experts": {"n_shared_experts": 0},
}


@pytest.mark.parametrize("field", sorted(BAD))
def test_export_rejects_what_llama_cpp_cannot_run(field, tmp_path):
    bad = Transformer(CONFIG.replace(**BAD[field]))
    out = tmp_path / "bad.gguf"
    with pytest.raises(ValueError, match=f"ModelConfig.{field} "):
        export_gguf(bad, out)
    assert not out.exists()


def test_export_rejects_an_unknown_tokenizer(zero_model, tmp_path):
    out = tmp_path / "tok.gguf"
    with pytest.raises(ValueError, match="tokenizer of type dict"):
        export_gguf(zero_model, out, tokenizer={})
    assert not out.exists()


def test_export_rejects_unknown_types():
    with pytest.raises(ValueError, match="expert_type"):
        check_llama_cpp_compatible(CONFIG, expert_type="q4_0")
    with pytest.raises(ValueError, match="dense_type"):
        check_llama_cpp_compatible(CONFIG, dense_type="mxfp4")
    with pytest.raises(ValueError, match="ModelConfig.index_head_dim"):
        check_llama_cpp_compatible(ModelConfig.preset("tiny").replace(compress_rates={CSA: 4, HCA: 128}))


# ------------------------------------------------------------------------------------------------
# MXFP4 packing


def ggml_mxfp4_reference(blocks: np.ndarray) -> np.ndarray:
    """Decode block_mxfp4 rows as ggml's spec says, independently of gguf.quants: per 17 bytes an
    E8M0 byte e, then 16 bytes whose low nibble is element j and high nibble element j + 16; value =
    kvalues[code] * 2**(e - 128) with kvalues the e2m1 values doubled."""
    kvalues = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float64)
    b = blocks.reshape(*blocks.shape[:-1], -1, 17)
    scale = np.exp2(b[..., 0].astype(np.float64) - 128)[..., None]
    qs = b[..., 1:]
    codes = np.concatenate((qs & 0x0F, qs >> 4), axis=-1)
    vals = kvalues[codes] * scale
    return vals.reshape(*blocks.shape[:-1], -1)


def random_fp4(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols), generator=g)
    scale = torch.randint(100, 140, (rows, cols // 32), generator=g).to(torch.uint8).view(torch.float8_e8m0fnu)
    return pack_fp4(codes), scale


def test_mxfp4_packing_is_lossless_for_fp4_weights():
    packed, scale = random_fp4(24, 96, seed=3)
    w = dequant_fp4(packed, scale)  # exactly FP4-representable by construction
    direct = fp4_to_mxfp4(packed, scale)  # bit-level repack of the official format
    assert direct.shape == (24, 3 * 17) and direct.dtype == np.uint8
    for blocks in (direct, mxfp4_blocks(w)):
        assert np.array_equal(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.MXFP4), w.numpy())
        assert np.array_equal(ggml_mxfp4_reference(blocks), w.double().numpy())
    # stacked experts keep their leading dimension
    stacked = mxfp4_blocks(torch.stack([w, -w]))
    assert stacked.shape == (2, 24, 51)
    assert np.array_equal(ggml_mxfp4_reference(stacked[1]), -w.double().numpy())


def test_mxfp4_nibble_order_by_hand():
    codes = torch.arange(32) % 16  # element j holds code j mod 16
    packed, scale = pack_fp4(codes[None]), torch.tensor([[127]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    block = fp4_to_mxfp4(packed, scale)[0]
    assert block[0] == 127  # the scale byte carries over
    assert list(block[1:]) == [j | (j << 4) for j in range(16)]  # byte j: element j low, j + 16 high


def test_mxfp4_quantizes_other_weights_with_quant_fp4():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    got = gguf.quants.dequantize(mxfp4_blocks(w), gguf.GGMLQuantizationType.MXFP4)
    assert np.array_equal(got, dequant_fp4(*quant_fp4(w)).numpy())
