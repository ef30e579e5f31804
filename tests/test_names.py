"""Official (= internal) <-> Hugging Face names, checked against a tiny transformers DeepseekV4ForCausalLM."""

import pytest
import torch
from safetensors import safe_open

from moeflash.weights import names as N

transformers = pytest.importorskip("transformers")

# V4-SPEC 6.2 tiny config
TINY = dict(
    vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=1, head_dim=32, qk_rope_head_dim=8,
    q_lora_rank=32, o_groups=2, o_lora_rank=16,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, num_hash_layers=1,
    scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, norm_topk_prob=True, swiglu_limit=10.0,
    layer_types=["sliding_attention", "compressed_sparse_attention",
                 "heavily_compressed_attention", "compressed_sparse_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    sliding_window=8, index_n_heads=2, index_head_dim=16, index_topk=64,
    hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
    rope_theta=10000.0, compress_rope_theta=160000.0,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 64,
                  "beta_fast": 32, "beta_slow": 1},
    max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)


def official_table(c):
    """Internal name -> shape, written from the official table (V4-SPEC 5.2) for config dict c."""
    d, n, H, D = c["hidden_size"], c["hc_mult"], c["num_attention_heads"], c["head_dim"]
    q, g, ro, E, I = c["q_lora_rank"], c["o_groups"], c["o_lora_rank"], c["n_routed_experts"], c["moe_intermediate_size"]
    HI, DI, V, k = c["index_n_heads"], c["index_head_dim"], c["vocab_size"], c["num_experts_per_tok"]
    S = I * c["n_shared_experts"]
    hc = {"fn": (n * (2 + n), n * d), "base": (n * (2 + n),), "scale": (3,)}
    t = {"embed.weight": (V, d), "head.weight": (V, d), "norm.weight": (d,),
         "hc_head_fn": (n, n * d), "hc_head_base": (n,), "hc_head_scale": (1,)}
    for i, kind in enumerate(c["layer_types"]):
        p = f"layers.{i}."
        t |= {p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,)}
        t |= {f"{p}hc_{site}_{x}": s for site in ("attn", "ffn") for x, s in hc.items()}
        t |= {p + "attn.attn_sink": (H,), p + "attn.wq_a.weight": (q, d), p + "attn.q_norm.weight": (q,),
              p + "attn.wq_b.weight": (H * D, q), p + "attn.wkv.weight": (D, d), p + "attn.kv_norm.weight": (D,),
              p + "attn.wo_a.weight": (g * ro, H * D // g), p + "attn.wo_b.weight": (d, g * ro)}
        if kind != "sliding_attention":
            csa = kind == "compressed_sparse_attention"
            m = c["compress_rates"][kind]
            w = 2 * D if csa else D
            t |= {p + "attn.compressor.wkv.weight": (w, d), p + "attn.compressor.wgate.weight": (w, d),
                  p + "attn.compressor.ape": (m, w), p + "attn.compressor.norm.weight": (D,)}
            if csa:
                t |= {p + "attn.indexer.wq_b.weight": (HI * DI, q), p + "attn.indexer.weights_proj.weight": (HI, d),
                      p + "attn.indexer.compressor.wkv.weight": (2 * DI, d),
                      p + "attn.indexer.compressor.wgate.weight": (2 * DI, d),
                      p + "attn.indexer.compressor.ape": (m, 2 * DI),
                      p + "attn.indexer.compressor.norm.weight": (DI,)}
        t[p + "ffn.gate.weight"] = (E, d)
        if i < c["num_hash_layers"]:
            t[p + "ffn.gate.tid2eid"] = (V, k)
        else:
            t[p + "ffn.gate.bias"] = (E,)
        for j in range(E):
            t |= {f"{p}ffn.experts.{j}.w1.weight": (I, d), f"{p}ffn.experts.{j}.w3.weight": (I, d),
                  f"{p}ffn.experts.{j}.w2.weight": (d, I)}
        t |= {p + "ffn.shared_experts.w1.weight": (S, d), p + "ffn.shared_experts.w3.weight": (S, d),
              p + "ffn.shared_experts.w2.weight": (d, S)}
    return t


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.DeepseekV4Config(**TINY)
    return transformers.DeepseekV4ForCausalLM(cfg).eval().float()


def test_every_hf_tensor_maps_to_the_official_table(hf_model):
    sd = hf_model.state_dict()
    internal = N.hf_to_internal(sd)
    assert all(N.is_internal_name(k) for k in internal)
    assert {k: tuple(v.shape) for k, v in internal.items()} == official_table(TINY)
    assert N.detect_scheme(sd) == N.HF and N.detect_scheme(internal) == N.OFFICIAL


def test_round_trip_reproduces_the_hf_state_dict_exactly(hf_model):
    sd = hf_model.state_dict()
    back = N.internal_to_hf(N.hf_to_internal(sd))
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_experts_split_as_cat_w1_w3(hf_model):
    sd = hf_model.state_dict()
    internal = N.hf_to_internal(sd)
    I = TINY["moe_intermediate_size"]
    gate_up, down = sd["model.layers.2.mlp.experts.gate_up_proj"], sd["model.layers.2.mlp.experts.down_proj"]
    assert torch.equal(internal["layers.2.ffn.experts.5.w1.weight"], gate_up[5, :I])
    assert torch.equal(internal["layers.2.ffn.experts.5.w3.weight"], gate_up[5, I:])
    assert torch.equal(internal["layers.2.ffn.experts.5.w2.weight"], down[5])
    assert N.hf_expert_location("layers.2.ffn.experts.5.w3.weight") == ("model.layers.2.mlp.experts.gate_up_proj", 5, 1)


def test_save_pretrained_spelling_reads_back(hf_model, tmp_path):
    # transformers 5.23 save_pretrained writes official leaf names with a `model.` prefix and a few quirks
    hf_model.save_pretrained(tmp_path)
    internal = N.hf_to_internal(hf_model.state_dict())
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        saved = {N.hf_to_internal_name(k): f.get_tensor(k) for k in f.keys()}
        keys = set(f.keys())
    assert {"head.weight", "model.embed_tokens.weight", "model.layers.0.attn.norm.weight"} <= keys
    assert N.detect_scheme(keys) == N.HF
    assert saved.keys() == internal.keys()
    assert all(torch.equal(saved[k], internal[k]) for k in internal)


@pytest.mark.parametrize("internal, hf", [
    ("embed.weight", "model.embed_tokens.weight"),
    ("head.weight", "lm_head.weight"),
    ("hc_head_scale", "model.hc_head.hc_scale"),
    ("layers.7.hc_attn_fn", "model.layers.7.attn_hc.fn"),
    ("layers.7.attn.attn_sink", "model.layers.7.self_attn.sinks"),
    ("layers.7.attn.kv_norm.weight", "model.layers.7.self_attn.kv_norm.weight"),
    ("layers.7.attn.compressor.norm.weight", "model.layers.7.self_attn.compressor.kv_norm.weight"),
    ("layers.7.attn.indexer.compressor.ape", "model.layers.7.self_attn.compressor.indexer.position_bias"),
    ("layers.7.attn.indexer.weights_proj.weight", "model.layers.7.self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("layers.7.ffn.gate.bias", "model.layers.7.mlp.gate.e_score_correction_bias"),
    ("layers.7.ffn.shared_experts.w3.weight", "model.layers.7.mlp.shared_experts.up_proj.weight"),
    ("layers.7.attn.wq_a.scale", "model.layers.7.self_attn.q_a_proj.weight_scale_inv"),
])
def test_per_name_mapping_both_ways(internal, hf):
    assert N.internal_to_hf_name(internal) == hf
    assert N.hf_to_internal_name(hf) == internal


def test_internal_names_include_mtp_and_scales():
    for name in ("mtp.0.e_proj.weight", "mtp.0.hnorm.weight", "mtp.0.hc_head_fn", "mtp.0.attn.wq_a.scale",
                 "mtp.0.ffn.experts.255.w2.scale", "layers.42.ffn.experts.0.w1.weight"):
        assert N.is_internal_name(name), name
    for name in ("layers.0.e_proj.weight", "layers.0.attn.wq_a.bias", "model.norm.weight", "hc_attn_fn"):
        assert not N.is_internal_name(name), name


def test_quantized_hf_experts_split_scales():
    E, I, d = 2, 128, 256
    w = torch.zeros(E, 2 * I, d, dtype=torch.float8_e4m3fn)
    s = torch.arange(E * 2 * 2, dtype=torch.float32).view(E, 2, 2)  # [E, 2I/128, d/128]
    internal = N.hf_to_internal({"model.layers.0.mlp.experts.gate_up_proj": w,
                                 "model.layers.0.mlp.experts.gate_up_proj_scale_inv": s})
    assert torch.equal(internal["layers.0.ffn.experts.1.w3.scale"], s[1, 1:])
    back = N.internal_to_hf(internal)
    assert torch.equal(back["model.layers.0.mlp.experts.gate_up_proj_scale_inv"], s)


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="no MTP"):
        N.internal_to_hf_name("mtp.0.e_proj.weight")
    with pytest.raises(ValueError, match="hf_expert_location"):
        N.internal_to_hf_name("layers.0.ffn.experts.1.w1.weight")
    with pytest.raises(ValueError, match="not a DeepSeek-V4 tensor name"):
        N.hf_to_internal_name("model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(ValueError, match="mix"):
        N.detect_scheme(["model.norm.weight", "layers.0.attn_norm.weight"])
    parts = {f"layers.1.ffn.experts.{j}.{w}.weight": torch.zeros(2, 2) for j in (0, 1) for w in ("w1", "w3")}
    del parts["layers.1.ffn.experts.1.w3.weight"]
    with pytest.raises(ValueError, match=r"layers\.1\.ffn\.experts\.1\.w3 is missing"):
        N.internal_to_hf(parts)
