"""ModelConfig: presets, the three config spellings, and error messages for invalid configs."""

from __future__ import annotations

import json

import pytest

from moeflash.config import CSA, HASH_MOE, HCA, MOE, SLIDING, ModelConfig
from moeflash.model.v4 import count_parameters

FLASH_HUB = {  # DeepSeek-V4-Flash config.json as published on the hub (V4-SPEC §1.1)
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
    "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
    "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
    "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "compress_rope_theta": 160000, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 6, "moe_intermediate_size": 2048, "num_hash_layers": 3,
    "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1, "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "attention_bias": False,
    "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": "bfloat16", "use_cache": True,
    "transformers_version": "4.57.1"}

FLASH_OFFICIAL = {  # DeepSeek's inference/config.json key names
    "vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3,
    "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 6,
    "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024,
    "head_dim": 512, "rope_head_dim": 64, "o_groups": 8, "o_lora_rank": 1024, "window_size": 128,
    "original_seq_len": 65536, "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4", "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0]}


def _same_model(a: ModelConfig, b: ModelConfig) -> None:
    for f in ("hidden_size", "layer_types", "mlp_layer_types", "compress_rates", "rope_theta",
              "compress_rope_theta", "qk_rope_head_dim", "sliding_window", "num_experts_per_tok",
              "routed_scaling_factor", "mtp_layer_type", "index_topk", "scoring_func"):
        assert getattr(a, f) == getattr(b, f), f
    assert a.yarn["factor"] == b.yarn["factor"] == 16
    assert a.yarn["original_max_position_embeddings"] == b.yarn["original_max_position_embeddings"]


def test_flash_preset_matches_hub_and_official_configs():
    preset = ModelConfig.preset("v4-flash")
    _same_model(preset, ModelConfig.from_dict(FLASH_HUB))
    _same_model(preset, ModelConfig.from_dict(FLASH_OFFICIAL))
    assert preset.layer_types[:4] == [SLIDING, SLIDING, CSA, HCA]
    assert preset.layer_types.count(CSA) == 21 and preset.layer_types.count(HCA) == 20
    assert preset.mlp_layer_types[:4] == [HASH_MOE] * 3 + [MOE]
    assert preset.compress_ratios == FLASH_HUB["compress_ratios"]


def test_transformers_serialisation_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    hcfg = transformers.DeepseekV4Config(**ModelConfig.preset("tiny").to_hf_kwargs())
    hcfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw and "layer_types" in raw
    back = ModelConfig.from_json(tmp_path)
    _same_model(back, ModelConfig.preset("tiny"))
    # and the moeflash -> HF direction reproduces HF's own derived fields
    assert hcfg.layer_types == ModelConfig.preset("tiny").layer_types
    assert hcfg.qk_rope_head_dim == 8


def test_parameter_counts_match_spec():
    flash = count_parameters(ModelConfig.preset("v4-flash"))
    assert flash["total"] == 284_332_230_231
    assert flash["activated"] == 13_799_622_231
    assert flash["mtp"] == 6_610_048_635


def test_pro_preset_counts():
    pro = count_parameters(ModelConfig.preset("v4-pro"))
    assert pro["total"] == 1_572_997_179_491
    assert pro["activated"] == 49_779_058_787  # 49.78B incl. embedding (V4-SPEC §3)


BAD = [
    (dict(o_groups=3), "o_groups"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(layer_types=[SLIDING, CSA]), "layer_types"),
    (dict(layer_types=[SLIDING, CSA, "global_attention", HCA]), "unknown entries"),
    (dict(mlp_layer_types=[MOE] * 3), "mlp_layer_types"),
    (dict(scoring_func="softplus"), "scoring_func"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(qk_rope_head_dim=64), "exceeds head_dim"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(index_head_dim=4), "index_head_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(compress_rates={CSA: 4}), "compress_rates"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
    (dict(eos_token_id=999), "eos_token_id"),
]


@pytest.mark.parametrize("change,needle", BAD, ids=[b[1] for b in BAD])
def test_invalid_configs_name_the_field(change, needle):
    with pytest.raises(ValueError) as e:
        ModelConfig.preset("tiny").replace(**change)
    msg = str(e.value)
    assert needle in msg
    assert "ModelConfig." in msg


def test_bad_compress_ratio_and_unknown_keys():
    d = dict(FLASH_OFFICIAL, compress_ratios=[0, 0, 3] + [4] * 41)
    with pytest.raises(ValueError, match="compress_ratios entries \\[3\\]"):
        ModelConfig.from_dict(d)
    with pytest.raises(ValueError, match="unknown config keys \\['hiden_size'\\]"):
        ModelConfig.from_dict(dict(FLASH_HUB, hiden_size=5))
    with pytest.raises(ValueError, match="neither 'layer_types' nor 'compress_ratios'"):
        ModelConfig.from_dict({k: v for k, v in FLASH_HUB.items() if k != "compress_ratios"})


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
