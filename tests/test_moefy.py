"""`moeflash moefy`: a dense llama's MLPs split into experts with trained routers, saved as a GGUF that
loads like any model; with every expert used it computes what the dense model does."""

from __future__ import annotations

import json

import pytest
import torch

from moeflash.cli import main
from moeflash.engine.load import load_model
from moeflash.evaluate.corpora import builtin_text
from moeflash.model.llama import MoefiedMLP
from moeflash.moefy import balanced_kmeans, moefy, save_gguf
from moeflash.weights.build import load_gguf_model

from .test_gguf_llama import TINY, write_tiny_llama


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("moefy") / "tiny.gguf"
    write_tiny_llama(path, "F32")
    return path


def calibration(tokenizer, n=600):
    return tokenizer.encode(builtin_text("prose", 4 * n), special=False)[:n]


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def test_every_expert_used_equals_the_dense_model(tiny_gguf):
    dense, tok = load_gguf_model(tiny_gguf, "float32")
    ids = tok.encode("The quick brown fox jumps over the lazy dog.", special=False)
    ref = logits(dense, ids)
    model, _ = load_gguf_model(tiny_gguf, "float32")
    e = 4
    assert TINY.intermediate_size % e == 0
    stats = moefy(model, calibration(tok), e, e, router_hidden=0, steps=20)
    assert all(isinstance(layer.ffn, MoefiedMLP) for layer in model.layers)
    assert stats["mean_oracle_need_share"] == pytest.approx(1.0)
    got = logits(model, ids)  # prefill: experts computed for their tokens, then summed
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    # decode steps (one row: the chosen experts' weights only) agree too
    from moeflash.engine.forward import run_tokens

    steps = {}
    for name, m in (("dense", dense), ("moe", model)):
        st = m.new_seq_state()
        steps[name] = torch.stack([m.logits(run_tokens(m, torch.tensor([t]), [st], [1]))[0] for t in ids])
    assert torch.allclose(steps["moe"], steps["dense"], atol=1e-5, rtol=1e-5)


def test_saved_gguf_loads_and_routes_as_built(tiny_gguf, tmp_path):
    model, tok = load_gguf_model(tiny_gguf, "float32")
    moefy(model, calibration(tok), 4, 1, router_hidden=16, steps=30)
    out = save_gguf(model, tiny_gguf, tmp_path / "moe.gguf")
    assert not (tmp_path / "moe.gguf.part").exists()
    loaded, tok2 = load_model(str(out), dtype="float32")
    c = loaded.config
    assert (c.moe_experts, c.moe_top_k, c.moe_router_hidden) == (4, 1, 16)
    assert c.activated_parameters() < c.num_parameters()
    ids = tok2.encode("Routing is learned from calibration text.", special=False)
    assert torch.equal(logits(loaded, ids), logits(model, ids))  # the same weights, the same routes
    routes = []
    loaded.layers[0].ffn.on_route = lambda x, flat, idx: routes.append(idx.clone())
    logits(loaded, ids)
    assert routes[0].shape == (len(ids), 1) and int(routes[0].max()) < 4
    # the dense model's tensors besides the MLPs are copied untouched
    dense, _ = load_gguf_model(tiny_gguf, "float32")
    assert torch.equal(loaded.layers[1].attn.wq.weight, dense.layers[1].attn.wq.weight)


def test_balanced_kmeans_gives_equal_clusters_and_finds_structure():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    points = torch.cat([c + 0.1 * torch.randn(8, 16, generator=g) for c in centres])
    assign = balanced_kmeans(points, 4, seed=1)
    assert torch.bincount(assign, minlength=4).tolist() == [8, 8, 8, 8]
    for block in assign.view(4, 8):  # each true group lands in one cluster
        assert len(set(block.tolist())) == 1
    with pytest.raises(ValueError, match="equal clusters"):
        balanced_kmeans(points[:30], 4)


@pytest.mark.parametrize("args,msg", [
    (["--experts", "5", "--top-k", "1"], "must divide"),
    (["--experts", "4", "--top-k", "5"], "--top-k must be in"),
    (["--experts", "4", "--top-k", "1", "--model", "nope.gguf"], "must be a dense llama .gguf"),
])
def test_moefy_cli_errors(tiny_gguf, tmp_path, capsys, args, msg):
    argv = ["moefy", "--model", str(tiny_gguf), "--out", str(tmp_path / "x.gguf"), *args]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_moefy_cli_and_compare(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "moe.gguf"
    assert main(["moefy", "--model", str(tiny_gguf), "--experts", "4", "--top-k", "2", "--out", str(out),
                 "--calibration-bytes", "4096", "--router-hidden", "0"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["experts"] == 4 and 0 <= info["mean_router_recall"] <= 1
    assert main(["compare", "--models", str(tiny_gguf), str(out), "--text", "prose", "--max-bytes", "400",
                 "--rounds", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    dense, moe = res["models"]
    assert dense["architecture"] == "dense" and moe["architecture"] == "moe"
    router = TINY.hidden_size * 4 + 4  # one linear router per layer
    assert moe["params"] == dense["params"] + TINY.num_hidden_layers * router
    assert moe["activated_params"] == moe["params"] - TINY.num_hidden_layers * 3 * TINY.hidden_size * TINY.intermediate_size // 2
    rep = res["routing_report"][str(out)]
    assert rep["uniform_entropy_bits"] == 2.0 and "prose" in rep["texts"]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_expert_store_serves_a_moefied_model_exactly(tiny_gguf, tmp_path, policy):
    """Experts streamed from the GGUF through a cache that holds a quarter of them: the same tokens and
    logits as with every expert in memory, and the store counts its hits and misses."""
    model, tok = load_gguf_model(tiny_gguf, "float32")
    moefy(model, calibration(tok), 4, 2, router_hidden=0, steps=30)
    path = save_gguf(model, tiny_gguf, tmp_path / "moe.gguf")
    resident, _ = load_model(str(path), dtype="float32")
    one_expert = 3 * (TINY.intermediate_size // 4) * TINY.hidden_size * 4
    streamed, _ = load_model(str(path), dtype="float32", expert_memory=2.5 * one_expert / 2**30, expert_policy=policy)
    store = streamed.expert_store
    assert store.capacity == 2 and streamed.layers[0].ffn.gate.numel() == 0  # experts not in memory
    ids = tok.encode("Experts come from the file when the cache misses.", special=False)
    # the store's experts run gate and up as one matmul: the same values, summed in another order
    assert torch.allclose(logits(streamed, ids), logits(resident, ids), atol=1e-5, rtol=1e-5)  # prefill
    from moeflash.engine.forward import run_tokens

    steps = {}
    for name, m in (("resident", resident), ("streamed", streamed)):  # decode steps, one token each
        st = m.new_seq_state()
        steps[name] = torch.stack([m.logits(run_tokens(m, torch.tensor([t]), [st], [1]))[0] for t in ids])
    assert torch.allclose(steps["streamed"], steps["resident"], atol=1e-5, rtol=1e-5)
    st = store.stats()
    assert st["misses"] > 0 and st["hits"] + st["misses"] > 0 and st["bytes_read"] >= st["misses"] * one_expert
