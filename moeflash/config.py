"""ModelConfig: one dataclass whose fields are the Hugging Face `config.json` keys of DeepSeek-V4.

It reads three spellings of the same model (V4-SPEC §1): the HF hub `config.json` (legacy keys
`compress_ratios`, `num_hash_layers`, `rope_scaling`), transformers' own serialisation (`layer_types`,
`mlp_layer_types`, `compress_rates`, `rope_parameters`) and DeepSeek's `inference/config.json`
(`dim`, `n_layers`, `window_size`, ...). Whatever the source, `validate()` checks the shapes fit
together and names the field and the fix when they do not.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE = "hash_moe"
MOE = "moe"
MLP_LAYER_TYPES = (HASH_MOE, MOE)
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")

# How DeepSeek's official V4 checkpoints store each tensor (V4-SPEC 5.2-5.3), by internal name: linear
# weights FP8 (e4m3 + UE8M0 128x128 block scales), routed experts FP4 (e2m1 + UE8M0 per 32 inputs), the
# tensors kept in FP32 (mHC mixing weights, sinks, compressor position biases, router biases), and
# everything else floating in BF16. The loader, the writer and the planner all read these.
OFFICIAL_FP8_LINEAR = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|shared_experts\.w[123]|"
                                 r"e_proj|h_proj)\.weight$")
OFFICIAL_FP4_EXPERT = re.compile(r"ffn\.experts\.\d+\.w[123]\.weight$")
FP32_KEPT_SUFFIXES = ("_fn", "_base", "_scale", "attn_sink", ".ape", "gate.bias")

# DeepSeek's `inference/config.json` key -> HF key.
OFFICIAL_KEYS = {
    "dim": "hidden_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_activated_experts": "num_experts_per_tok",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "rope_head_dim": "qk_rope_head_dim",
    "window_size": "sliding_window",
    "norm_eps": "rms_norm_eps",
    "n_hash_layers": "num_hash_layers",
}
# Keys we accept and deliberately ignore (training-only, runtime hints, or unused by V4 inference).
IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "attention_bias", "attention_dropout", "mlp_bias", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "pad_token_id", "scale_fmt", "max_batch_size", "max_seq_len",
    "n_routed_experts_score", "auto_map", "partial_rotary_factor", "num_local_experts",
    "intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "n_group", "topk_group",
    "first_k_dense_replace", "ep_size", "_name_or_path", "id2label", "label2id", "rope_type",
}


@dataclass
class ModelConfig:
    """DeepSeek-V4 hyper-parameters; defaults are DeepSeek-V4-Flash's (V4-SPEC §1.1)."""

    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)
    mlp_layer_types: list[str] = field(default_factory=list)
    compress_rates: dict[str, int] = field(default_factory=lambda: {CSA: 4, HCA: 128})
    mtp_layer_type: str = SLIDING  # attention type of the MTP block (last entry of `compress_ratios`)
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=lambda: {
        "type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
        "beta_fast": 32, "beta_slow": 1})
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    expert_dtype: str | None = None
    quantization_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = flash_layer_types(self.num_hidden_layers)
        if not self.mlp_layer_types:
            self.mlp_layer_types = hash_layer_types(self.num_hidden_layers, 3)
        self.layer_types = list(self.layer_types)
        self.mlp_layer_types = list(self.mlp_layer_types)
        self.compress_rates = dict(self.compress_rates)
        self.validate()

    # ----------------------------------------------------------------------------------------
    # derived quantities
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def num_hash_layers(self) -> int:
        return sum(t == HASH_MOE for t in self.mlp_layer_types)

    def compress_ratio(self, layer_type: str) -> int:
        """Tokens per compressed entry for a layer type (0 for sliding-window-only layers)."""
        return 0 if layer_type == SLIDING else int(self.compress_rates[layer_type])

    @property
    def compress_ratios(self) -> list[int]:
        """The official per-layer list: main layers then the MTP block."""
        types = self.layer_types + [self.mtp_layer_type] * self.num_nextn_predict_layers
        return [self.compress_ratio(t) for t in types]

    @property
    def yarn(self) -> dict[str, float] | None:
        """YaRN parameters for compressed layers, or None for plain RoPE."""
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type", "default")) in ("default", None):
            return None
        return rs

    # ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the field and the fix; transformers would crash with shape errors."""
        def bad(field_name: str, msg: str) -> None:
            raise ValueError(f"invalid ModelConfig.{field_name}: {msg}")

        positive = ["vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                    "sliding_window", "hc_mult", "hc_sinkhorn_iters", "n_routed_experts",
                    "num_experts_per_tok", "max_position_embeddings"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive integer, got {v!r}")
        if self.num_key_value_heads != 1:
            bad("num_key_value_heads", f"DeepSeek-V4 uses one shared K=V head; got "
                f"{self.num_key_value_heads}, set it to 1")
        if self.n_shared_experts not in (0, 1):
            bad("n_shared_experts", f"V4 has one shared expert (or none); got {self.n_shared_experts}")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", f"RoPE rotates pairs of dims, so it must be a positive even "
                f"number; got {self.qk_rope_head_dim}")
        if self.qk_rope_head_dim > self.head_dim:
            bad("qk_rope_head_dim", f"{self.qk_rope_head_dim} exceeds head_dim {self.head_dim}; "
                "the rope dims are the trailing part of each head")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            bad("o_groups", f"{self.o_groups} groups must divide num_attention_heads*head_dim = "
                f"{self.num_attention_heads * self.head_dim}; pick a divisor of num_attention_heads")
        if self.num_attention_heads % self.o_groups:
            bad("o_groups", f"{self.o_groups} must divide num_attention_heads "
                f"{self.num_attention_heads} so each group holds whole heads")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", f"top-k {self.num_experts_per_tok} is larger than "
                f"n_routed_experts {self.n_routed_experts}; lower it or add experts")
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"unknown scoring function {self.scoring_func!r}; use one of "
                f"{', '.join(SCORING_FUNCS)} (V4 uses 'sqrtsoftplus')")
        if self.hidden_act != "silu":
            bad("hidden_act", f"only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}")
        for name, types, allowed in (("layer_types", self.layer_types, LAYER_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, MLP_LAYER_TYPES)):
            if len(types) != self.num_hidden_layers:
                bad(name, f"has {len(types)} entries but num_hidden_layers is "
                    f"{self.num_hidden_layers}; give exactly one entry per layer")
            unknown = sorted({t for t in types if t not in allowed})
            if unknown:
                bad(name, f"unknown entries {unknown}; allowed: {', '.join(allowed)}")
        if self.mtp_layer_type not in LAYER_TYPES:
            bad("mtp_layer_type", f"unknown {self.mtp_layer_type!r}; allowed: {', '.join(LAYER_TYPES)}")
        used = set(self.layer_types) | ({self.mtp_layer_type} if self.num_nextn_predict_layers else set())
        for lt in (CSA, HCA):
            if lt in used:
                r = self.compress_rates.get(lt)
                if not isinstance(r, int) or r <= 0:
                    bad("compress_rates", f"needs a positive integer rate for {lt!r}, got {r!r}")
        if CSA in used:
            if self.index_n_heads <= 0 or self.index_head_dim <= 0 or self.index_topk <= 0:
                bad("index_topk", "CSA layers need positive index_n_heads, index_head_dim and index_topk")
            if self.index_head_dim < self.qk_rope_head_dim:
                bad("index_head_dim", f"{self.index_head_dim} is smaller than qk_rope_head_dim "
                    f"{self.qk_rope_head_dim}; the indexer rotates its trailing rope dims")
        y = self.yarn
        if y is not None:
            kind = y.get("type", y.get("rope_type"))
            if kind != "yarn":
                bad("rope_scaling", f"only YaRN scaling is supported, got type {kind!r}")
            for key in ("factor", "original_max_position_embeddings"):
                if key not in y or not y[key] or y[key] <= 0:
                    bad("rope_scaling", f"YaRN needs a positive {key!r}")
        if self.num_nextn_predict_layers not in (0, 1):
            bad("num_nextn_predict_layers", f"moeflash builds at most one MTP module, got "
                f"{self.num_nextn_predict_layers}")
        if not 0 <= self.bos_token_id < self.vocab_size:
            bad("bos_token_id", f"{self.bos_token_id} is outside the vocabulary (size {self.vocab_size})")
        if not 0 <= self.eos_token_id < self.vocab_size:
            bad("eos_token_id", f"{self.eos_token_id} is outside the vocabulary (size {self.vocab_size})")
        if self.hc_eps < 0 or self.rms_norm_eps <= 0:
            bad("rms_norm_eps", "eps values must be positive")

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Build from any of the three spellings (HF hub, transformers, DeepSeek inference)."""
        d = dict(raw)
        for old, new in OFFICIAL_KEYS.items():
            if old in d:
                if new in d and d[new] != d[old]:
                    raise ValueError(f"config gives both {old!r}={d[old]!r} and {new!r}={d[new]!r}")
                d[new] = d.pop(old)
        if "eos_token_id" in d and isinstance(d["eos_token_id"], list):
            d["eos_token_id"] = d["eos_token_id"][0]
        # DeepSeek's YaRN keys
        if "rope_factor" in d or "original_seq_len" in d:
            d["rope_scaling"] = {"type": "yarn", "factor": d.pop("rope_factor", 1),
                                 "original_max_position_embeddings": d.pop("original_seq_len", 65536),
                                 "beta_fast": d.pop("beta_fast", 32), "beta_slow": d.pop("beta_slow", 1)}
        d.pop("beta_fast", None), d.pop("beta_slow", None)
        # transformers' rope_parameters {"main": ..., "compress": ...}
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict):
            main, comp = rp.get("main"), rp.get("compress")
            if isinstance(main, dict) and isinstance(comp, dict):
                d.setdefault("rope_theta", main.get("rope_theta", 10000.0))
                d["compress_rope_theta"] = comp.get("rope_theta", d.get("compress_rope_theta", 160000.0))
                kind = comp.get("rope_type", comp.get("type", "default"))
                d["rope_scaling"] = None if kind == "default" else {
                    "type": kind, **{k: v for k, v in comp.items()
                                     if k in ("factor", "original_max_position_embeddings",
                                              "beta_fast", "beta_slow")}}
                if "partial_rotary_factor" in comp and "qk_rope_head_dim" not in d:
                    d["qk_rope_head_dim"] = int(d.get("head_dim", 512) * comp["partial_rotary_factor"])
            elif rp.get("rope_type", rp.get("type")) == "yarn":
                d["rope_scaling"] = rp
        if "partial_rotary_factor" in d and "qk_rope_head_dim" not in d and d["partial_rotary_factor"]:
            d["qk_rope_head_dim"] = int(d.get("head_dim", 512) * d["partial_rotary_factor"])
        # aliases
        if "num_local_experts" in d:
            d.setdefault("n_routed_experts", d["num_local_experts"])
        if "intermediate_size" in d:
            d.setdefault("moe_intermediate_size", d["intermediate_size"])
        if "compress_rate_csa" in d or "compress_rate_hca" in d:
            rates = dict(d.get("compress_rates") or {CSA: 4, HCA: 128})
            if "compress_rate_csa" in d:
                rates[CSA] = d.pop("compress_rate_csa")
            if "compress_rate_hca" in d:
                rates[HCA] = d.pop("compress_rate_hca")
            d["compress_rates"] = rates
        n = d.get("num_hidden_layers", 43)
        ratios = d.pop("compress_ratios", None)
        if ratios is not None and not d.get("layer_types"):
            d["layer_types"], mtp = _types_from_ratios(ratios, n, d.get("compress_rates"))
            if mtp is not None:
                d["mtp_layer_type"] = mtp
        nh = d.pop("num_hash_layers", None)
        if not d.get("mlp_layer_types"):
            d["mlp_layer_types"] = hash_layer_types(n, 3 if nh is None else int(nh))
        if not d.get("layer_types"):
            raise ValueError("config has neither 'layer_types' nor 'compress_ratios'; transformers would "
                             "silently assume V4-Pro's pattern, moeflash asks you to say which layers are "
                             "sliding / CSA / HCA")
        if isinstance(d.get("quantization_config"), dict):
            d.setdefault("expert_dtype", d["quantization_config"].get("expert_dtype"))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in IGNORED_KEYS)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; check the spelling against the HF "
                             "config.json keys (moeflash.config.ModelConfig fields)")
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - wrong value types
            raise ValueError(f"invalid config: {e}") from e

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            raw = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {p}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """HF-hub style dict (what `config.json` of DeepSeek-V4 holds, plus the HF layer lists)."""
        d = dataclasses.asdict(self)
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        d["model_type"] = "deepseek_v4"
        d["num_hash_layers"] = self.num_hash_layers
        d["compress_ratios"] = self.compress_ratios
        d.pop("mtp_layer_type")
        for k in ("expert_dtype", "quantization_config"):
            if d[k] is None:
                d.pop(k)
        return d

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' DeepseekV4Config (used by the parity tests)."""
        d = self.to_dict()
        for k in ("architectures", "model_type", "compress_ratios", "num_hash_layers", "topk_method",
                  "mtp_layer_type", "expert_dtype", "quantization_config"):
            d.pop(k, None)
        return d

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        return PRESETS[name]()

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def prefix_block_tokens(config: "ModelConfig") -> int:
    """Where a prefix cache saves a V4 state: multiples of every compression ratio, where no compressor
    holds pending rows (any position would be exact; these are the smallest that keep the saved state
    free of partial windows)."""
    import math

    ratios = [r for r in config.compress_ratios if r > 0]
    return math.lcm(*ratios) if ratios else 16


def flash_layer_types(n: int) -> list[str]:
    """V4-Flash's schedule: two sliding-window layers, then CSA / HCA alternating."""
    return [SLIDING if i < 2 else (CSA if i % 2 == 0 else HCA) for i in range(n)]


def hash_layer_types(n: int, n_hash: int) -> list[str]:
    return [HASH_MOE if i < n_hash else MOE for i in range(n)]


def _types_from_ratios(ratios: list[int], n: int, rates: dict | None) -> tuple[list[str], str | None]:
    rates = rates or {CSA: 4, HCA: 128}
    by_rate = {0: SLIDING, rates.get(CSA, 4): CSA, rates.get(HCA, 128): HCA}
    unknown = sorted({r for r in ratios if r not in by_rate})
    if unknown:
        raise ValueError(f"invalid compress_ratios entries {unknown}: each must be 0 (sliding window), "
                         f"{rates.get(CSA, 4)} (CSA) or {rates.get(HCA, 128)} (HCA)")
    if len(ratios) < n:
        raise ValueError(f"compress_ratios has {len(ratios)} entries but num_hidden_layers is {n}; "
                         "give one per layer (plus one for the MTP block)")
    types = [by_rate[r] for r in ratios]
    return types[:n], (types[n] if len(types) > n else None)


def _flash() -> ModelConfig:
    return ModelConfig()


def _pro() -> ModelConfig:
    n = 61
    return ModelConfig(
        hidden_size=7168, moe_intermediate_size=3072, num_hidden_layers=n, num_attention_heads=128,
        q_lora_rank=1536, o_groups=16, n_routed_experts=384, index_topk=1024,
        routed_scaling_factor=2.5,
        layer_types=[HCA, HCA] + [CSA if i % 2 == 0 else HCA for i in range(2, n)],
        mlp_layer_types=hash_layer_types(n, 3))


def _tiny() -> ModelConfig:
    """A few layers of every kind; a forward pass takes milliseconds. Byte-level vocabulary."""
    return ModelConfig(
        vocab_size=262, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, o_groups=2,
        o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2,
        layer_types=[SLIDING, CSA, HCA, CSA], mlp_layer_types=[HASH_MOE, MOE, MOE, MOE],
        compress_rates={CSA: 4, HCA: 8}, sliding_window=8, index_n_heads=4, index_head_dim=16,
        index_topk=16, rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 64,
                                     "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=1024, bos_token_id=256, eos_token_id=257)


def _bench(n: int, d: int, inter: int, experts: int, top_k: int, vocab: int, heads: int, head_dim: int,
           rope: int, q_rank: int, groups: int, o_rank: int, index_heads: int, index_dim: int,
           index_topk: int) -> ModelConfig:
    """V4-Flash's layout (2 sliding-window layers, then CSA / HCA alternating, rates 4 / 128,
    window 128, YaRN) at a benchmarkable size; one hash-routed layer; no MTP."""
    return ModelConfig(
        vocab_size=vocab, hidden_size=d, moe_intermediate_size=inter, num_hidden_layers=n,
        num_attention_heads=heads, head_dim=head_dim, qk_rope_head_dim=rope, q_lora_rank=q_rank,
        o_groups=groups, o_lora_rank=o_rank, layer_types=flash_layer_types(n),
        mlp_layer_types=hash_layer_types(n, 1), n_routed_experts=experts, num_experts_per_tok=top_k,
        index_n_heads=index_heads, index_head_dim=index_dim, index_topk=index_topk,
        num_nextn_predict_layers=0)


def _mini() -> ModelConfig:
    """~986M total / ~155M activated parameters (16% active): the engine benchmark model."""
    return _bench(8, 768, 512, 96, 8, 32768, 8, 128, 32, 384, 4, 256, 16, 64, 128)


def _flash_shaped() -> ModelConfig:
    """256 routed experts, top-6, ~4.9% activated like V4-Flash (4.85%); ~827M parameters."""
    return _bench(8, 512, 256, 256, 6, 4096, 8, 128, 32, 256, 4, 256, 16, 64, 128)


def _mini_overhead() -> ModelConfig:
    """`mini`'s depth, experts and routing at near-zero width: its step time is Python overhead."""
    return _bench(8, 16, 8, 96, 8, 262, 2, 16, 8, 8, 2, 8, 2, 16, 128)


PRESETS = {"v4-flash": _flash, "v4-pro": _pro, "tiny": _tiny, "mini": _mini,
           "flash-shaped": _flash_shaped, "mini-overhead": _mini_overhead}


@dataclass
class LlamaConfig:
    """The dense llama architecture (GQA attention, RoPE, RMSNorm, SwiGLU MLP), e.g. SmolLM2; field
    names are transformers' LlamaConfig keys. Built from GGUF metadata by `weights/gguf.py`."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    model_type: str = "llama"
    # MoE-fied MLPs (`moeflash moefy`): each MLP's neurons split into `moe_experts` experts of equal size,
    # `moe_top_k` of them used per token as a router picks them (0 = the dense MLP)
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_router_hidden: int = 0  # the router's hidden width (0: one linear layer)

    def __post_init__(self) -> None:
        self.validate()

    def num_parameters(self) -> int:
        """Parameters of the architecture (whatever precision the weights are held in): embedding,
        per layer the q/k/v/o projections, the gate/up/down MLP and two norms, the final norm, and the
        head unless tied."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * self.num_attention_heads * hd * 2 + d * self.num_key_value_heads * hd * 2
        layer = attn + 3 * d * self.intermediate_size + 2 * d + self.router_parameters()
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_hidden_layers * layer + d + head

    def router_parameters(self) -> int:
        """One layer's router (MoE-fied models; 0 for dense ones)."""
        if not self.moe_experts:
            return 0
        d, h, e = self.hidden_size, self.moe_router_hidden, self.moe_experts
        return (d * h + h + h * e + e) if h else d * e + e

    def activated_parameters(self) -> int:
        """Parameters a token uses: all but the experts its router did not pick."""
        if not self.moe_experts:
            return self.num_parameters()
        unused = 3 * self.hidden_size * self.intermediate_size * (self.moe_experts - self.moe_top_k) // self.moe_experts
        return self.num_parameters() - self.num_hidden_layers * unused

    def validate(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise ValueError(f"invalid LlamaConfig.{name}: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, f"must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"{self.num_key_value_heads} must divide num_attention_heads "
                f"({self.num_attention_heads}) for grouped-query attention")
        if self.head_dim % 2:
            bad("head_dim", f"{self.head_dim} must be even for rotary embeddings")
        if not self.rope_theta > 0:
            bad("rope_theta", f"must be > 0, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            bad("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                bad(name, f"{v} is outside the vocabulary [0, {self.vocab_size})")
        if self.moe_experts:
            if self.moe_experts < 1 or self.intermediate_size % self.moe_experts:
                bad("moe_experts", f"{self.moe_experts} must divide intermediate_size ({self.intermediate_size})")
            if not 1 <= self.moe_top_k <= self.moe_experts:
                bad("moe_top_k", f"must be in [1, moe_experts={self.moe_experts}], got {self.moe_top_k}")
            if self.moe_router_hidden < 0:
                bad("moe_router_hidden", f"must be >= 0, got {self.moe_router_hidden}")
        elif self.moe_top_k:
            bad("moe_top_k", "needs moe_experts")

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)
