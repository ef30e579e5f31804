"""moeflash vs transformers 5.23 DeepseekV4ForCausalLM on tiny random configs (fp32).

For each config: full forward over several windows, chunked prefill with ragged chunks, and
token-by-token decode must match HF's full forward to 1e-4 max-abs; greedy generation of 32 tokens
must match HF's `generate` token for token. Indexer ties (V4-SPEC §6.2) are avoided by giving the
indexer 16 heads, which makes an all-zero ReLU score (the source of exact ties) improbable.
"""

from __future__ import annotations

import pytest
import torch

from moeflash.config import CSA, HASH_MOE, HCA, MOE, SLIDING, ModelConfig
from moeflash.generate import generate

from .oracle import hf_model, ours_from_hf

TOL = 1e-4
SEQ = 72

CONFIGS = {
    # the built-in tiny preset: every layer kind, one hash layer, CSA 4 / HCA 8, window 8
    "tiny": ModelConfig.preset("tiny").replace(index_topk=6, index_n_heads=16),
    # two streams, wider heads, window 16, HCA 16, 4 output groups, 2 hash layers, 16 experts top-4
    "wide": ModelConfig.preset("tiny").replace(
        hidden_size=96, num_attention_heads=8, head_dim=64, qk_rope_head_dim=16, q_lora_rank=48,
        o_groups=4, o_lora_rank=24, hc_mult=2, hc_sinkhorn_iters=7, sliding_window=16,
        compress_rates={CSA: 4, HCA: 16}, num_hidden_layers=5,
        layer_types=[HCA, CSA, SLIDING, CSA, HCA],
        mlp_layer_types=[HASH_MOE, HASH_MOE, MOE, MOE, MOE], n_routed_experts=16,
        num_experts_per_tok=4, index_n_heads=16, index_head_dim=24, index_topk=5,
        routed_scaling_factor=2.5),
    # three streams, odd window 5, HCA 6, one output group, no hash layers, top-1, plain RoPE
    "odd": ModelConfig.preset("tiny").replace(
        hidden_size=48, num_attention_heads=2, head_dim=48, qk_rope_head_dim=8, q_lora_rank=16,
        o_groups=1, o_lora_rank=32, hc_mult=3, num_hidden_layers=3, sliding_window=5, compress_rates={CSA: 4, HCA: 6},
        layer_types=[CSA, HCA, CSA], mlp_layer_types=[MOE, MOE, MOE], n_routed_experts=4,
        num_experts_per_tok=1, index_n_heads=16, index_head_dim=8, index_topk=3, rope_scaling=None,
        swiglu_limit=0.5),
    # all-rope heads (no nope dims), all layers hash-routed, top-k = all experts, 5 Sinkhorn steps
    "allrope": ModelConfig.preset("tiny").replace(
        head_dim=16, qk_rope_head_dim=16, num_attention_heads=4, o_groups=4, o_lora_rank=8,
        hc_sinkhorn_iters=5, sliding_window=12, num_hidden_layers=3, compress_rates={CSA: 4, HCA: 32},
        layer_types=[SLIDING, HCA, CSA], mlp_layer_types=[HASH_MOE] * 3, n_routed_experts=6,
        num_experts_per_tok=6, index_n_heads=16, index_head_dim=16, index_topk=2),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    cfg = CONFIGS[request.param]
    hf = hf_model(cfg, seed=sorted(CONFIGS).index(request.param))
    ours = ours_from_hf(cfg, hf)
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
    return request.param, cfg, hf, ours, ids, ref


def _check(name, what, out, ref):
    diff = (out - ref).abs().max().item()
    print(f"[parity] {name:8s} {what:8s} max|dlogit| = {diff:.3e}")
    assert diff <= TOL


def _incremental(ours, ids, cuts):
    """Logits of ids fed as consecutive chunks ids[:, cuts[i]:cuts[i+1]] through one state."""
    state = ours.new_state(ids.shape[0])
    out = torch.cat([ours(ids[:, a:b], state) for a, b in zip(cuts, cuts[1:])], dim=1)
    assert state.pos == ids.shape[1]
    return out


@torch.no_grad()
def test_full_forward(pair):
    name, cfg, hf, ours, ids, ref = pair
    _check(name, "full", ours(ids), ref)


@torch.no_grad()
def test_chunked_prefill(pair):
    name, cfg, hf, ours, ids, ref = pair
    _check(name, "chunked", _incremental(ours, ids, [0, 13, 14, 43, 50, SEQ]), ref)


@torch.no_grad()
def test_decode_token_by_token(pair):
    name, cfg, hf, ours, ids, ref = pair
    _check(name, "decode", _incremental(ours, ids, list(range(SEQ + 1))), ref)


@torch.no_grad()
def test_greedy_generation_matches(pair):
    name, cfg, hf, ours, ids, ref = pair
    prompt = ids[0, :20]
    hf_out = hf.generate(prompt[None], max_new_tokens=32, do_sample=False, min_new_tokens=32,
                         eos_token_id=None, pad_token_id=0)[0, 20:].tolist()
    mine = generate(ours, prompt.tolist(), max_new_tokens=32, ignore_eos=True)
    assert mine == hf_out


@torch.no_grad()
def test_hf_save_pretrained_directory_loads(pair, tmp_path):
    """What transformers' save_pretrained writes (config with rope_parameters / layer_types, HF names)."""
    from moeflash.weights.build import load_model
    name, cfg, hf, ours, ids, ref = pair
    hf.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path, dtype="float32")
    assert model.config.layer_types == cfg.layer_types and model.config.yarn == cfg.yarn or cfg.yarn is None
    assert (model(ids) - ref).abs().max().item() <= TOL
