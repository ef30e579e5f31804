"""The expert store: outputs identical to the all-in-memory model for every budget (1 expert to all),
policy and prefetch setting; FP4 experts kept packed; memory limits honoured (measured RSS) and
refused with the needed size; counters consistent; metrics exported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from moeflash.config import ModelConfig
from moeflash.engine import LLMEngine, SamplingParams
from moeflash.engine.expert_policy import POLICIES
from moeflash.model.init import randomize_
from moeflash.model.v4 import Transformer
from moeflash.engine.load import load_model
from moeflash.weights.quant import dequant_fp4, quant_fp4
from moeflash.weights.save import save_checkpoint
from moeflash.engine.forward import run_tokens

CFG = ModelConfig.preset("tiny").replace(n_routed_experts=16, num_experts_per_tok=3)
PROMPTS = [[256, 72, 101, 108, 108, 111], [256] + list(range(40, 70)), [256, 1, 2, 3]]


def generate(model, n=20):
    engine = LLMEngine(model, max_num_batched_tokens=16)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("experts") / "tiny16"
    return save_checkpoint(randomize_(Transformer(CFG), seed=5), path, torch.float32)


@pytest.fixture(scope="module")
def reference(ckpt):
    model, _ = load_model(ckpt, dtype="float32")
    return generate(model)


def expert_mib(ckpt) -> float:
    c = CFG
    return 3 * c.hidden_size * c.moe_intermediate_size * 4 / 2**20


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("experts", [1, 5, 24, 64])  # of 64 routed experts in all
def test_outputs_identical_for_any_budget_and_policy(ckpt, reference, policy, experts):
    for prefetch in (True, False):
        model, _ = load_model(ckpt, dtype="float32", expert_memory=experts * expert_mib(ckpt) / 1024,
                              expert_policy=policy, prefetch=prefetch)
        store = model.expert_store
        assert store.capacity == experts
        assert generate(model) == reference
        st = store.stats()
        assert st["hits"] + st["misses"] > 0 and st["resident"] <= experts
        if not prefetch:  # every byte read is a demand miss
            assert st["bytes_read"] == st["misses"] * store.disk.expert_disk_bytes
        if experts == 64:
            assert st["evictions"] == 0
        if prefetch:
            assert 0.0 <= st["prefetch_accuracy"] <= 1.0
        store.close()


@pytest.fixture(scope="module")
def fp4_ckpt(tmp_path_factory):
    """The tiny 16-expert model with its routed experts in the official FP4 format (packed codes + UE8M0
    scales), other tensors fp32."""
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(randomize_(Transformer(CFG), seed=6), tmp_path_factory.mktemp("fp4") / "fp4",
                           torch.float32)
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in [n for n in tensors if ".ffn.experts." in n and n.endswith(".weight")]:
            q, scale = quant_fp4(tensors[name])
            tensors[name] = q
            tensors[name[: -len(".weight")] + ".scale"] = scale
        save_file(tensors, shard)
    index = path / "model.safetensors.index.json"
    if index.exists():
        idx = json.loads(index.read_text())
        wm = idx["weight_map"]
        for name in [n for n in wm if ".ffn.experts." in n and n.endswith(".weight")]:
            wm[name[: -len(".weight")] + ".scale"] = wm[name]
        index.write_text(json.dumps(idx))
    return path


def test_fp4_experts_stay_packed(fp4_ckpt):
    """An official-format checkpoint with FP4 experts: the cache holds them packed (4.25 bits) in the
    slots of one slab that the fused kernel runs, and the outputs equal the all-in-memory model's."""
    path = fp4_ckpt
    full, _ = load_model(path, dtype="float32")
    model, _ = load_model(path, dtype="float32", expert_memory=0.01)
    store = model.expert_store
    assert store.expert_bytes < 3 * CFG.hidden_size * CFG.moe_intermediate_size  # < 1 byte per weight
    assert store.slab is not None and model.layers[1].ffn.slots is not None and model.layers[1].ffn.provider is None
    assert generate(model) == generate(full)
    assert full.layers[1].ffn.fp4  # all in memory: held packed too, as stored
    decoded, _ = load_model(path, dtype="float32", dequantize=True)
    assert generate(decoded) == generate(full)
    w = decoded.layers[1].ffn.experts[3].w1.weight
    assert torch.equal(dequant_fp4(*quant_fp4(w)), w)  # the loaded weights are FP4-exact
    store.close()


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("experts", [1, 2, 7])
def test_fp4_slab_smaller_than_one_call(fp4_ckpt, experts, prefetch):
    """Budgets of 1, 2 and 7 FP4 experts while a 31-token prefill chunk uses up to 16 of one layer's
    experts: experts evicted within a call run from the scratch slot, and logits equal the all-resident
    model's to fp32 noise (only the order of each token's expert sum differs)."""
    full, _ = load_model(fp4_ckpt, dtype="float32")
    probe, _ = load_model(fp4_ckpt, dtype="float32", expert_memory=0.01)
    one = probe.expert_store.expert_bytes
    probe.expert_store.close()
    model, _ = load_model(fp4_ckpt, dtype="float32", prefetch=prefetch, expert_memory=(experts + 0.5) * one / 2**30)
    store = model.expert_store
    assert store.capacity == experts and store.slab is not None
    ids = torch.tensor(PROMPTS[1])
    with torch.no_grad():
        a = run_tokens(full, ids, [full.new_seq_state()], [len(ids)])
        b = run_tokens(model, ids, [model.new_seq_state()], [len(ids)])
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert generate(model, 8) == generate(full, 8)
    st = store.stats()
    assert st["evictions"] > 0 and st["resident"] <= experts
    store.close()


def test_budget_and_limit_errors(ckpt):
    with pytest.raises(ValueError, match="holds no expert"):
        load_model(ckpt, dtype="float32", expert_memory=1e-6)
    with pytest.raises(ValueError, match=r"--memory-limit .* too small: the dense weights need"):
        load_model(ckpt, dtype="float32", expert_memory=0.001, memory_limit=1e-5)
    with pytest.raises(ValueError, match="all experts resident"):
        load_model(ckpt, dtype="float32", memory_limit=1e-5)
    with pytest.raises(ValueError, match="checkpoint directory"):
        load_model("tiny", expert_memory=1)
    with pytest.raises(ValueError, match="expert-memory must be > 0"):
        load_model(ckpt, expert_memory=0)
    model, _ = load_model(ckpt, dtype="float32", expert_memory=0.001, memory_limit=1)
    assert 0 < model.state_budget_bytes < 1 << 30
    model.expert_store.close()


RSS_SCRIPT = r"""
import json, sys, torch
from moeflash.engine.load import load_model
from moeflash.engine import LLMEngine, SamplingParams
torch.set_num_threads(1)
def rss():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
before = rss()
kw = json.loads(sys.argv[2])
model, _ = load_model(sys.argv[1], dtype="float32", **kw)
LLMEngine(model).generate([[256, 5, 6, 7]], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
print(json.dumps({"growth_kib": rss() - before}))
"""


@pytest.mark.slow
def test_resident_memory_honours_the_budget(tmp_path):
    """Routed experts of 384 MiB (fp32) served through a 32 MiB cache: the process's resident memory
    (VmRSS after loading and generating, minus before) grows by the dense weights + the cache +
    working memory, not by the experts (measured in fresh processes)."""
    cfg = CFG.replace(hidden_size=256, moe_intermediate_size=512, n_routed_experts=64, num_experts_per_tok=4,
                      num_hidden_layers=4)
    path = save_checkpoint(randomize_(Transformer(cfg), seed=1), tmp_path / "big", torch.float32)
    routed = 4 * 64 * 3 * 256 * 512 * 4

    def peak(**kw):
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), json.dumps(kw)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["growth_kib"] * 1024

    full = peak()
    streamed = peak(expert_memory=32 / 1024, memory_limit=0.5)
    print(f"\n[expert store RSS] routed experts {routed / 2**20:.0f} MiB; RSS growth all-in-memory "
          f"{full / 2**20:.0f} MiB, with a 32 MiB expert cache {streamed / 2**20:.0f} MiB")
    assert full > routed
    assert streamed < full - 0.6 * routed
    assert streamed < 0.5 * 2**30  # the --memory-limit given
