"""Official DeepSeek-format checkpoints (FP8 e4m3 linears, FP4 e2m1 experts, UE8M0 scales, sharded)
load into moeflash and give the logits transformers gives on the dequantized weights; broken
checkpoints fail with messages that name the tensor, the file and the expected shape."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from moeflash.config import CSA, HASH_MOE, HCA, MOE, OFFICIAL_FP4_EXPERT, OFFICIAL_FP8_LINEAR, SLIDING, ModelConfig
from moeflash.model.init import randomize_
from moeflash.model.v4 import Transformer
from moeflash.weights.build import load_model
from moeflash.weights.names import internal_to_hf
from moeflash.weights.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8

transformers = pytest.importorskip("transformers", reason="transformers==5.23.0 is the oracle")

# hidden 160 and q_lora 96 make FP8 blocks partial (160 = 128 + 32), as transformers cannot decode
# itself; here it receives the already dequantized weights.
CFG = ModelConfig.preset("tiny").replace(
    hidden_size=160, moe_intermediate_size=64, q_lora_rank=96, num_hidden_layers=4,
    layer_types=[SLIDING, CSA, HCA, CSA], mlp_layer_types=[HASH_MOE, MOE, MOE, MOE],
    compress_rates={CSA: 4, HCA: 8}, index_n_heads=16, index_topk=4, num_nextn_predict_layers=1,
    expert_dtype="fp4")

FP8, FP4 = OFFICIAL_FP8_LINEAR, OFFICIAL_FP4_EXPERT  # what the official checkpoints store quantized
F32 = re.compile(r"(hc_\w+|attn_sink|ape|gate\.bias)$")


def official_state(model: Transformer) -> tuple[dict, dict]:
    """(tensors to write under official names, the float32 values they decode to)."""
    stored, truth = {}, {}
    for name, t in model.state_dict().items():
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        if FP8.search(name):
            q, s = quant_fp8(t.float())
            stored[name], stored[base + ".scale"] = q, s
            truth[name] = dequant_fp8(q, s)
        elif FP4.search(name):
            q, s = quant_fp4(t.float())
            stored[name], stored[base + ".scale"] = q, s
            truth[name] = dequant_fp4(q, s)
        elif not t.dtype.is_floating_point or F32.search(name):
            stored[name] = truth[name] = t.clone()
        else:  # BF16 in the real checkpoint: embed, head, norms, compressor / indexer projections, gate
            stored[name] = t.to(torch.bfloat16)
            truth[name] = stored[name].float()
    return stored, truth


def write_sharded(stored: dict, path, n_shards: int = 3) -> None:
    names = sorted(stored)
    weight_map = {}
    for i in range(n_shards):
        part = names[i::n_shards]
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: stored[k].contiguous() for k in part}, str(path / fname))
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(CFG.to_dict()))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    path = tmp_path_factory.mktemp("official")
    src = randomize_(Transformer(CFG), seed=11)
    stored, truth = official_state(src)
    write_sharded(stored, path)
    return path, stored, truth


def test_official_fp8_fp4_checkpoint_matches_transformers(official):
    path, stored, truth = official
    assert stored["layers.1.ffn.experts.0.w1.weight"].dtype == torch.int8
    assert stored["layers.1.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert stored["layers.1.attn.wq_a.scale"].shape == (1, 2)  # partial 128-blocks
    reference, tok = load_model(path, dtype="float32", dequantize=True)  # decoded at load: the reference path
    assert tok is None and reference.config.num_nextn_predict_layers == 1
    for name, t in reference.state_dict().items():  # MTP included
        assert torch.equal(t, truth[name].to(t.dtype)), name
    model, _ = load_model(path, dtype="float32")  # storage precision
    held = decoded_state(model)
    assert set(held) == set(truth)
    for name, t in held.items():
        assert torch.equal(t, truth[name].to(t.dtype)), name
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Fp8Linear" in kinds and all(layer.ffn.fp4 for layer in model.layers)
    assert type(model.head).__name__ == "Bf16Linear" and model.head.weight.dtype == torch.bfloat16  # as stored
    assert all(layer.ffn.gate.weight.dtype == torch.bfloat16 for layer in model.layers)  # routers as stored
    assert model.embed.weight.dtype == torch.bfloat16 and model.compute_dtype == torch.float32  # the table too
    q = model.layers[1].attn.wq_a
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (96, 160)  # 1 byte a weight
    assert model.layers[1].ffn.q13.shape == (CFG.n_routed_experts, 128, 80)  # 2 codes a byte

    hcfg = transformers.DeepseekV4Config(**CFG.to_hf_kwargs())
    hf = transformers.DeepseekV4ForCausalLM(hcfg).eval().float()
    hf_sd = internal_to_hf({k: v for k, v in truth.items() if not k.startswith("mtp.")})
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not missing and not unexpected
    ids = torch.randint(0, CFG.vocab_size, (1, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        for label, m in (("decoded at load", reference), ("storage precision", model)):
            full = m(ids)
            state = m.new_state(1)
            chunked = torch.cat([m(ids[:, a:b], state) for a, b in ((0, 21), (21, 22), (22, 48))], 1)
            diff = max((full - ref).abs().max().item(), (chunked - ref).abs().max().item())
            print(f"[official, {label}] max|dlogit| vs transformers on dequantized weights = {diff:.3e}")
            assert diff <= 1e-4


def decoded_state(model) -> dict:
    """The model's weights under their internal names, FP8 / FP4 ones decoded (independently of the kernels)."""
    from moeflash.kernels.linear import Fp8Linear
    from moeflash.model.moe import MoE

    out, skip = {}, set()
    for name, mod in model.named_modules():
        if isinstance(mod, Fp8Linear):
            out[f"{name}.weight"] = dequant_fp8(mod.qweight.view(torch.float8_e4m3fn), mod.scale)
            skip.update({f"{name}.qweight", f"{name}.scale"})
        elif isinstance(mod, MoE) and mod.fp4:
            inter = mod.q13.shape[1] // 2
            for j in range(mod.q13.shape[0]):
                w13 = dequant_fp4(mod.q13[j].view(torch.int8), mod.s13[j].view(torch.float8_e8m0fnu))
                out[f"{name}.experts.{j}.w1.weight"] = w13[:inter]
                out[f"{name}.experts.{j}.w3.weight"] = w13[inter:]
                out[f"{name}.experts.{j}.w2.weight"] = dequant_fp4(mod.q2[j].view(torch.int8),
                                                                   mod.s2[j].view(torch.float8_e8m0fnu))
            skip.update(f"{name}.{b}" for b in ("q13", "s13", "q2", "s2"))
    out.update({n: t for n, t in model.state_dict().items() if n not in skip})
    return out


def test_cli_generate_from_official_checkpoint(official, capsys):
    from moeflash.cli import main
    path, _, _ = official
    assert main(["generate", "--model", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                 "--json", "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] is None and len(out["token_ids"]) <= 5
    assert main(["generate", "--model", str(path), "--prompt", "hi"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err


def _copy(official, tmp_path):
    path, stored, _ = official
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path, stored


def _shard_of(path, name):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def _rewrite(path, name, new_tensor=None):
    from safetensors.torch import load_file
    shard = _shard_of(path, name)
    tensors = load_file(str(path / shard))
    if new_tensor is None:
        del tensors[name]
        index = json.loads((path / "model.safetensors.index.json").read_text())
        del index["weight_map"][name]
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[name] = new_tensor
    save_file(tensors, str(path / shard))
    return shard


def test_missing_tensor_is_named(official, tmp_path):
    path, _ = _copy(official, tmp_path)
    _rewrite(path, "layers.2.attn.compressor.ape")
    with pytest.raises(ValueError) as e:
        load_model(path, dtype="float32")
    msg = str(e.value)
    assert "layers.2.attn.compressor.ape" in msg and "[8, 32]" in msg and "model-00001-of-00003" in msg


def test_misshaped_tensor_is_named(official, tmp_path):
    path, _ = _copy(official, tmp_path)
    shard = _rewrite(path, "layers.0.attn.attn_sink", torch.zeros(5))
    with pytest.raises(ValueError) as e:
        load_model(path, dtype="float32")
    msg = str(e.value)
    assert "layers.0.attn.attn_sink" in msg and shard in msg and "4" in msg


def test_extra_tensor_is_named(official, tmp_path):
    path, _ = _copy(official, tmp_path)
    shard = _shard_of(path, "norm.weight")
    from safetensors.torch import load_file
    tensors = load_file(str(path / shard))
    tensors["layers.9.attn.wq_a.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(path / shard))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["layers.9.attn.wq_a.weight"] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"layers\.9\.attn\.wq_a\.weight"):
        load_model(path, dtype="float32")


def test_truncated_shard_is_detected(official, tmp_path):
    path, _ = _copy(official, tmp_path)
    shard = path / _shard_of(path, "embed.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError) as e:
        load_model(path, dtype="float32")
    assert shard.name in str(e.value) and "truncat" in str(e.value).lower()


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in model"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="has no weights"):
        load_model("v4-flash")


def test_block_aligned_layers_take_the_fused_fp8_paths(tmp_path):
    """With o_lora_rank a multiple of 128, `wo_a` runs as one grouped FP8 product and the FP8 projections
    of h fuse: logits equal the decoded-at-load reference within fp32 rounding."""
    cfg = CFG.replace(o_lora_rank=128, q_lora_rank=128, hidden_size=256, o_groups=2)
    src = randomize_(Transformer(cfg), seed=3)
    stored, _ = official_state(src)
    save_file({k: v.contiguous() for k, v in stored.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    reference, _ = load_model(tmp_path, dtype="float32", dequantize=True)
    model, _ = load_model(tmp_path, dtype="float32")
    assert model.layers[0].attn._h_proj.calls[0][1] == [0, 1]  # wq_a and wkv: one fused FP8 call
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = reference(ids), model(ids)
        state = model.new_state(1)
        stepped = torch.cat([model(ids[:, i:i + 1], state) for i in range(40)], 1)
    err = max((got - ref).abs().max().item(), (stepped - ref).abs().max().item())
    print(f"[official, fused FP8 paths] max|dlogit| vs decoded at load = {err:.3e}")
    assert err <= 1e-4


def test_loading_reports_progress_tensor_by_tensor(official):
    path, stored, _ = official
    seen = []
    load_model(path, dtype="float32", progress=lambda done, total: seen.append((done, total)))
    total = seen[-1][1]
    assert [d for d, _ in seen] == list(range(1, total + 1)) and total > 100
