"""The dense llama model against transformers 5.23's LlamaForCausalLM (fp32, random weights).

HF stores q/k rows for rotate-half RoPE; moeflash (like GGUF) rotates adjacent pairs, so the test
permutes HF's q/k rows the way llama.cpp's converter does. Full forward, ragged chunked prefill,
token-by-token decode and batched engine generation must all match HF.
"""

from __future__ import annotations

import pytest
import torch

from moeflash.config import LlamaConfig
from moeflash.engine import LLMEngine, SamplingParams
from moeflash.model.llama import Llama
from moeflash.engine.forward import run_tokens

transformers = pytest.importorskip("transformers", reason="transformers==5.23.0 (the test extra) is the oracle")

TOL = 1e-4
CONFIGS = {
    "tied-gqa": LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                            max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
    "untied-mha": LlamaConfig(vocab_size=257, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                              num_attention_heads=3, num_key_value_heads=3, head_dim=16, rope_theta=500.0,
                              tie_word_embeddings=False, max_position_embeddings=256, rms_norm_eps=1e-6,
                              bos_token_id=0, eos_token_id=None),
}


def to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate-half row order -> adjacent-pair order (llama.cpp's converter permutation)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)


def build(cfg: LlamaConfig, seed: int = 0):
    hcfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=None)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hcfg).eval().float()
    with torch.no_grad():
        for p in hf.parameters():  # HF's init is too small to make attention matter
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.2) + (1.0 if p.dim() == 1 else 0.0))
    sd = hf.state_dict()
    ours = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        ours["head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        h, o = f"model.layers.{i}.", f"layers.{i}."
        ours.update({
            o + "attn_norm.weight": sd[h + "input_layernorm.weight"],
            o + "ffn_norm.weight": sd[h + "post_attention_layernorm.weight"],
            o + "attn.wq.weight": to_pairs(sd[h + "self_attn.q_proj.weight"], cfg.num_attention_heads),
            o + "attn.wk.weight": to_pairs(sd[h + "self_attn.k_proj.weight"], cfg.num_key_value_heads),
            o + "attn.wv.weight": sd[h + "self_attn.v_proj.weight"],
            o + "attn.wo.weight": sd[h + "self_attn.o_proj.weight"],
            o + "ffn.w1.weight": sd[h + "mlp.gate_proj.weight"],
            o + "ffn.w3.weight": sd[h + "mlp.up_proj.weight"],
            o + "ffn.w2.weight": sd[h + "mlp.down_proj.weight"],
        })
    model = Llama(cfg).eval()
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and all(m == "head.weight" for m in missing), (missing, unexpected)
    return hf, model


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def pair(request):
    cfg = CONFIGS[request.param]
    hf, ours = build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    return cfg, hf, ours, ids, ref


@torch.no_grad()
def test_full_forward_matches_transformers(pair):
    cfg, _, ours, ids, ref = pair
    got = ours(ids)
    err = (got - ref).abs().max().item()
    print(f"\n[llama full {cfg.hidden_size}] max|dlogit| {err:.2e}")
    assert err < TOL


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_chunked_and_decode_match_transformers(pair, fused):
    cfg, _, ours, ids, ref = pair
    if fused:
        ours.fuse_projections_()
    state = ours.new_seq_state()
    assert state.used_bytes() == 0  # an empty state (zero-capacity buffers) counts nothing
    out, pos = [], 0
    for n in (7, 1, 13, 3, 16):  # ragged prompt chunks, then single tokens
        x = run_tokens(ours, ids[0, pos:pos + n], [state], [n])
        out.append(ours.logits(x))
        pos += n
    err = (torch.cat(out) - ref[0]).abs().max().item()
    assert state.pos == 40 and state.used_bytes() == ours.state_bytes(40)
    assert err < TOL


@torch.no_grad()
def test_two_sequences_in_one_flat_batch(pair):
    cfg, _, ours, ids, ref = pair
    s0, s1 = ours.new_seq_state(), ours.new_seq_state()
    run_tokens(ours, ids[0, :10], [s0], [10])
    x = run_tokens(ours, torch.cat([ids[0, 10:11], ids[1, :25]]), [s0, s1], [1, 25])
    assert (ours.logits(x[:1]) - ref[0, 10]).abs().max() < TOL
    assert (ours.logits(x[1:]) - ref[1, :25]).abs().max() < TOL


def test_engine_greedy_matches_transformers_generate(pair):
    cfg, hf, ours, ids, _ = pair
    prompts = [ids[0, :5].tolist(), ids[1, :12].tolist(), ids[0, 3:30].tolist()]
    engine = LLMEngine(ours, max_num_batched_tokens=16)  # forces chunked prefill beside decode
    outs = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert out.token_ids == ref[0, len(p):].tolist()
    assert engine.num_states() == 0


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="LlamaConfig.num_key_value_heads"):
        LlamaConfig(num_attention_heads=9, num_key_value_heads=2)
    with pytest.raises(ValueError, match="LlamaConfig.head_dim"):
        LlamaConfig(head_dim=15)
    with pytest.raises(ValueError, match="LlamaConfig.eos_token_id"):
        LlamaConfig(vocab_size=10, bos_token_id=1, eos_token_id=10)


def test_identical_prompts_share_one_prefill(pair):
    """The KV cache copied from the first of three identical prompts gives each the tokens it gets alone."""
    cfg, _, ours, ids, _ = pair
    prompt = ids[0, :21].tolist()
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=1.0, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)]
    solo = [LLMEngine(ours).generate([prompt], p)[0].token_ids for p in params]
    engine = LLMEngine(ours, max_num_batched_tokens=8)
    assert [o.token_ids for o in engine.generate([prompt] * 3, params)] == solo
    assert engine.stats["prompt_tokens_shared"] == 2 * 20
