"""The device-independent half of the GPU path, checked on the CPU: `--device` resolution, a model that
moves whole (fused and packed weights included), forward calls that create no tensor off their device,
the GPU expert tier's bookkeeping, the Triton kernels under Triton's CPU interpreter, and the import
closure of what the GPU machine runs. The GPU half is bench/gpu_check.py (run by bench/gpu_check.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moeflash.kernels as K
from moeflash.cli import main
from moeflash.devices import move_model, resolve_device, tensors_elsewhere
from moeflash.engine.forward import run_tokens
from moeflash.engine.load import load_model
from moeflash.weights.build import build_tiny

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]


@pytest.fixture
def native_off():
    """The plain-torch reference kernels (what a CUDA tensor gets where Triton has no kernel)."""
    K.native(torch.zeros(1))
    saved = list(K._NATIVE)
    K._NATIVE[:] = [False]
    yield
    K._NATIVE[:] = saved


def greedy(model, steps: int = 6) -> tuple[list[int], torch.Tensor]:
    """Prefill PROMPT, then greedy decode: (tokens, the logits of every step)."""
    st = model.new_seq_state()
    ids = torch.tensor(PROMPT, device="cpu")  # (explicit: see _run_with_default_device_meta)
    x = run_tokens(model, ids, [st], [len(PROMPT)])
    out, logits = [], []
    for _ in range(steps):
        lg = model.logits(x[-1:]).float()
        logits.append(lg[0])
        t = int(lg.argmax(-1))
        out.append(t)
        x = run_tokens(model, torch.tensor([t], device="cpu"), [st], [1])
    return out, torch.stack(logits)


# -- --device ------------------------------------------------------------------------------------
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None).type == resolve_device("auto").type
    with pytest.raises(ValueError, match="expected cpu, cuda"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="runs on cpu or cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_cli_device_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert main(["generate", "--model", "tiny", "--prompt-ids", "1,2", "--device", "cuda"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_cli_device_expert_memory_needs_a_gpu(checkpoints, capsys):
    assert main(["generate", "--model", checkpoints["official"], "--prompt-ids", "1,2", "--expert-memory", "0.01",
                 "--device-expert-memory", "0.001", "--device", "cpu"]) == 2
    assert "needs --device cuda" in capsys.readouterr().err


def test_generate_on_device_cpu_equals_the_default(capsys):
    base = ["generate", "--model", "tiny", "--prompt-ids", "5,6,7", "--json", "--max-new-tokens", "6"]
    assert main(base) == 0
    a = json.loads(capsys.readouterr().out)
    assert main(base + ["--device", "auto" if not torch.cuda.is_available() else "cpu"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 6


# -- moving a model whole ------------------------------------------------------------------------
def test_a_plain_tensor_attribute_left_behind_is_found():
    class Holder:
        def __init__(self):
            self.weight = torch.zeros(3)

    m = nn.Linear(2, 2)
    m.extra = Holder()
    assert tensors_elsewhere(m, "meta") == ["weight", "bias", "model.extra.weight"]
    with pytest.raises(RuntimeError, match="left 1 tensors behind: model.extra.weight"):
        move_model(m, "meta")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_moves_whole_with_fused_and_packed_weights(dtype):
    model = build_tiny(dtype)
    attn, ffn = model.layers[1].attn, model.layers[1].ffn
    assert attn._h_proj is not None  # fused projections exist, and (bf16) packed experts
    assert (ffn.w13 is not None) == (dtype == "bfloat16")
    move_model(model, "meta")
    assert tensors_elsewhere(model, "meta") == []
    assert attn._h_proj is not None and all(fn.weight.device.type == "meta" for fn, _ in attn._h_proj.calls)
    if dtype == "bfloat16":
        assert ffn.w13.device.type == "meta"
        # the experts' parameters are views of the packed tensor again, not separate copies
        assert ffn.experts[0].w1.weight.untyped_storage().data_ptr() == ffn.w13.untyped_storage().data_ptr()


def test_official_checkpoint_moves_whole(checkpoints):
    model, _ = load_model(checkpoints["official"], "float32")
    move_model(model, "meta")
    assert tensors_elsewhere(model, "meta") == []
    assert model.layers[1].ffn.q13.device.type == "meta"


def test_a_dtype_cast_refuses_the_projections():
    """`.to(dtype)` goes through the same `_apply`: fused matrices follow the cast and the result equals
    a model cast before fusing."""
    a = build_tiny("float32")
    a.to(torch.float64)
    assert a.layers[1].attn._h_proj.calls[0][0].weight.dtype == torch.float64
    _, la = greedy(a, 3)
    b = build_tiny("float32")
    _, lb = greedy(b, 3)
    assert (la.float() - lb).abs().max() < 1e-3


# -- no tensor created off its device ------------------------------------------------------------
def _run_with_default_device_meta(model) -> torch.Tensor:
    """Run greedy() with torch's default device set to meta: any tensor the forward call creates without
    saying where lands on meta and meets a CPU tensor, which is an error; a clean run equals the plain one."""
    _, plain = greedy(model, 4)
    torch.set_default_device("meta")
    try:
        _, meta = greedy(model, 4)
    finally:
        torch.set_default_device(None)
    return (plain - meta).abs().max()


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_creates_no_tensor_off_its_device(native, dtype):
    K.native(torch.zeros(1))
    saved = list(K._NATIVE)
    K._NATIVE[:] = [saved[0] and native]
    try:
        with torch.no_grad():
            assert _run_with_default_device_meta(build_tiny(dtype)) == 0
    finally:
        K._NATIVE[:] = saved


@pytest.mark.parametrize("kind", ["official", "plain"])
def test_checkpoint_forward_creates_no_tensor_off_its_device(checkpoints, kind, native_off):
    with torch.no_grad():
        model, _ = load_model(checkpoints[kind], "bfloat16")
        assert _run_with_default_device_meta(model) == 0


# -- the GPU expert tier (on the CPU: the same bookkeeping) ----------------------------------------
@pytest.mark.parametrize("kind", ["official", "plain"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["demand", "prefetch"])
def test_device_tier_tokens_equal_all_resident(checkpoints, kind, prefetch):
    path = checkpoints[kind]
    ref, _ = load_model(path, "float32")
    want, _ = greedy(ref, 10)
    probe, _ = load_model(path, "float32", expert_memory=1.0)
    eb = probe.expert_store.expert_bytes
    probe.expert_store.close()
    model, _ = load_model(path, "float32", expert_memory=12 * eb / 2**30, prefetch=prefetch, device="cpu",
                          device_expert_memory=5 * eb / 2**30)
    try:
        got, _ = greedy(model, 10)
        st = model.expert_store.stats()
    finally:
        model.expert_store.close()
    assert got == want
    dev = st["device"]
    assert (dev["capacity_experts"], st["capacity_experts"]) == (5, 12)
    assert dev["misses"] > 0 and dev["hits"] > 0
    # every device miss is one access of the host tier, and every copy moves one expert's bytes
    assert st["hits"] + st["misses"] == dev["misses"]
    assert dev["bytes_read"] == (dev["misses"] + dev["prefetch_loads"]) * eb
    assert (dev["prefetch_loads"] > 0) == prefetch
    assert dev["resident"] <= 5 and len(dev["per_layer"]) == model.config.num_hidden_layers
    prometheus = pytest.importorskip("prometheus_client")
    from moeflash.server.metrics import _EngineCollector

    families = {f.name: f for f in _EngineCollector(None, "m")._experts(st)}
    assert isinstance(families["moeflash:expert_device_misses"], prometheus.core.CounterMetricFamily)
    assert sum(x.value for x in families["moeflash:expert_device_misses"].samples) == dev["misses"]
    assert families["moeflash:expert_device_capacity"].samples[0].value == 5


def test_device_tier_budget_errors(checkpoints):
    with pytest.raises(ValueError, match="holds no expert"):
        load_model(checkpoints["official"], "float32", expert_memory=0.01, device="cpu", device_expert_memory=1e-9)
    with pytest.raises(ValueError, match="give --expert-memory"):
        load_model(checkpoints["official"], "float32", device="cpu", device_expert_memory=0.01)


# -- Triton kernels (interpreted on the CPU) -------------------------------------------------------
def test_triton_kernels_equal_the_references_under_the_interpreter():
    pytest.importorskip("triton", reason="Triton (test extra) runs the GPU kernels in its CPU interpreter")
    r = subprocess.run([sys.executable, "-m", "tests.triton_interpret"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    err = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"[triton interpreter] max relative error vs reference: {err}")
    assert err["fp8_fp32"] < 1e-5 and err["fp4"] < 1e-5 and err["sinkhorn"] < 1e-5
    assert err["rms_norm_fp32"] < 1e-5 and err["rope_fp32"] < 1e-5
    assert err["rms_norm_bf16"] < 1e-2 and err["rope_bf16"] < 1e-2  # one bf16 rounding step
    assert err["fp4_by_expert_fp32"] < 1e-5 and err["fp4_by_expert_bf16"] < 3e-2  # bf16 GEMMs in prefill
    assert max(err["hc_fp32"].values()) < 1e-5 and max(err["hc_bf16"].values()) < 1e-2
    assert err["fp8_bf16"] < 1e-2  # bf16 activations: TF32 products on a GPU


# -- what the GPU machine can import -------------------------------------------------------------
def test_model_weights_kernels_engine_import_without_server_packages(tmp_path):
    """The GPU machine has torch, safetensors, numpy, tokenizers and Triton, and no fastapi, gguf,
    pydantic, jinja2, llguidance...: the model, the weights, the engine and the GPU check import there."""
    code = (
        "import sys, importlib.abc\n"
        "BANNED = {'fastapi','gguf','llguidance','jinja2','pydantic','prometheus_client','uvicorn',"
        "'matplotlib','tqdm','transformers','starlette','httpx','yaml'}\n"
        "import importlib.machinery\n"
        "class Refuse:\n"  # absent packages: probes (find_spec) see no file, imports fail
        "    def create_module(self, spec): raise ImportError('blocked ' + spec.name)\n"
        "    def exec_module(self, module): pass\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BANNED: return importlib.machinery.ModuleSpec(name, Refuse())\n"
        "sys.meta_path.insert(0, Block())\n"
        "import moeflash.engine, moeflash.engine.load, moeflash.engine.expert_tier, moeflash.weights.build\n"
        "import moeflash.devices, moeflash.model.v4, moeflash.engine.graphs\n"
        "sys.path.insert(0, 'bench'); import gpu_check\n"
        "from moeflash.cli import main\n"  # what gpu_check runs to make its checkpoints
        "assert main(['convert', '--preset', 'tiny', '--official', '--out', sys.argv[1]]) == 0\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "ok", r.stderr[-2000:]


# -- static decode slots (what a CUDA graph replays; run uncaptured on the CPU) ---------------------
def _prefilled(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = []
    with torch.no_grad():
        for n in lengths:
            st = model.new_seq_state()
            run_tokens(model, torch.randint(0, 200, (n,), generator=g), [st], [n])
            states.append(st)
    return states


@pytest.mark.parametrize("kind", ["tiny", "official"])
def test_forward_static_equals_the_ordinary_decode(checkpoints, kind):
    """Three sequences at different positions, 40 steps: across window wraps, compressor window closes
    (CSA overlap, HCA) and the indexer's top-k; a fourth, padding row computes on scratch."""
    from moeflash.model.state import batched_layer_states, copy_into, slot_view

    model = build_tiny("float32") if kind == "tiny" else load_model(checkpoints["official"], "float32")[0]
    states = _prefilled(model, [5, 37, 70])
    eager = [s.clone() for s in states]
    layers = batched_layer_states(model.config, 4, 200, torch.float32, "cpu")
    for b, s in enumerate(states):
        for i, layer in enumerate(s.layers):
            copy_into(slot_view(layers[i], b, s.pos), layer, s.pos)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    with torch.no_grad():
        for _ in range(40):
            toks = torch.randint(0, 200, (3,), generator=g)
            pos = torch.tensor([s.pos for s in eager] + [0])
            want = model.logits(run_tokens(model, toks, eager, [1, 1, 1]))
            got = model.logits(model.forward_static(torch.cat((toks, torch.zeros(1, dtype=torch.long))), pos,
                                                    layers)[:3])
            worst = max(worst, float((want - got).abs().max()))
    print(f"[static decode, {kind}] max |dlogit| over 40 steps = {worst:.2e}")
    assert worst < 1e-4


def test_indexer_ties_go_to_the_earlier_entry():
    from moeflash.model.compressor import top_entries

    scores = torch.tensor([[0.5, 0.0, 0.0, 0.9, 0.0, 0.0, -1.0]])
    assert top_entries(scores, 4).tolist() == [[3, 0, 1, 2]]


@pytest.mark.parametrize("t,k", [(7, 7), (300, 64), (5000, 512), (3000, 1)])
def test_indexer_top_k_is_the_stable_sorts_first_k(t, k):
    """The O(T) keyed top-k picks exactly what a stable descending sort of every score picks, in its order:
    heavy ties (a few distinct values), signed zeros, -inf (entries not yet visible), negatives. (Past
    SORT_MAX_ENTRIES entries the keyed top-k runs; below, the sort itself.)"""
    from moeflash.model.compressor import top_entries

    g = torch.Generator().manual_seed(t)
    values = torch.tensor([0.0, -0.0, 1.5, -2.25, 3e-39, -3e-39, float("-inf"), 7.0, -7.0, 1e30])
    scores = values[torch.randint(len(values), (3, t), generator=g)]
    scores[1] = torch.randn(t, generator=g)  # a row without ties
    scores[2, : t // 2] = float("-inf")
    want = torch.sort(scores + 0.0, dim=-1, descending=True, stable=True).indices[..., :k]
    assert torch.equal(top_entries(scores, k), want)


@pytest.mark.parametrize("max_seqs,graph_len", [(3, 128), (5, 128), (4, 60)])
def test_engine_with_static_decode_equals_eager(checkpoints, max_seqs, graph_len):
    from moeflash.engine import LLMEngine
    from moeflash.engine.sampler import SamplingParams

    model, _ = load_model(checkpoints["official"], "float32")
    prompts = [[256] + list(range(40, 40 + n)) for n in (3, 17, 40, 9, 60, 5, 33)]
    maxt = [30, 12, 45, 20, 8, 50, 25]

    def run(graphs: bool, seqs: int):
        e = LLMEngine(model, max_num_seqs=seqs, max_num_batched_tokens=64, decode_graphs=graphs,
                      graph_max_len=graph_len)
        ids = [e.add_request(p, SamplingParams(max_tokens=m, temperature=0.0)) for p, m in zip(prompts, maxt)]
        out = {}
        while e.has_unfinished():
            for o in e.step():
                if o.finished:
                    out[o.request_id] = o.token_ids
        return [out[i] for i in ids], e

    want, _ = run(False, 4)
    got, e = run(True, max_seqs)
    assert got == want and [len(t) for t in got] == maxt
    st = e.graphs.stats
    assert st["graph_steps"] > 10 and st["slot_loads"] >= 5
    assert (st["eager_steps"] > 0) == (graph_len < 100)  # sequences past graph_max_len decode eagerly


def test_graph_decoder_slots_move_and_evict(checkpoints):
    """Bound states are views of their slots; a state whose slot is needed and has no spare slot is
    copied out; every state keeps decoding exactly as it would alone."""
    from moeflash.engine.forward import advance
    from moeflash.engine.graphs import GraphDecoder

    model, _ = load_model(checkpoints["official"], "float32")
    dec = GraphDecoder(model, max_batch=4, max_len=160)
    states = _prefilled(model, [4, 21, 50, 9], seed=3)
    eager = [s.clone() for s in states]
    g = torch.Generator().manual_seed(5)
    plan = [[0, 1, 2, 3]] * 3 + [[0, 1, 2]] * 3 + [[3, 0]] * 3 + [[2, 3, 1, 0]] * 3 + [[1]] * 2
    with torch.no_grad():
        for rows in plan:
            toks = torch.randint(0, 200, (len(rows),), generator=g)
            sel = [states[i] for i in rows]
            got = model.logits(dec.decode(sel, toks))
            advance(sel, [1] * len(rows))
            want = model.logits(run_tokens(model, toks, [eager[i] for i in rows], [1] * len(rows)))
            assert (got - want).abs().max() < 1e-4, rows
    assert dec.stats["slot_evictions"] >= 1 and dec.stats["slot_moves"] >= 1
    # a state copied out holds its own memory; the bound ones are views of the slots
    for s in states:
        slot = getattr(s, "graph_slot", None)
        if slot is not None and dec._slot_of(s) is not None:
            assert s.layers[0].window.data_ptr() == dec.layers[0].window[slot].data_ptr()
    assert [s.used_bytes() for s in states] == [s.used_bytes() for s in eager]


# -- the GPU check, dry-run on the CPU, and the planner reading it ----------------------------------
def test_gpu_check_runs_every_section_on_the_cpu_and_the_planner_reads_it(tmp_path):
    """bench/gpu_check.py --quick --device cpu: every section's code path with tiny shapes (the GPU
    machine runs the same file at full size); then `moeflash plan --measured` plans from its numbers."""
    out = tmp_path / "gc.json"
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out),
                        "--dir", str(tmp_path / "ckpt"), "--only", "probes", "kernel_checks", "parity", "tiers", "decode",
                        "prefill", "planner"],  # not `compiled`: Inductor on the CPU takes a minute
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    data = json.loads(out.read_text())
    assert r.returncode == 0 and data["errors"] == {}, r.stderr[-3000:]
    s = data["sections"]
    assert s["parity"]["all_ok"] and s["tiers"]["all_ok"]
    assert s["parity"]["official_float32_graph"]["max_abs_dlogit"] < 1e-4
    dec = s["decode"]["tiny-official"]
    assert dec["batch1_graph"]["bytes_per_step"] > dec["dense_weight_bytes"] > 0
    assert 0 < dec["batch4_graph"]["frac_hbm"] and s["planner"]["layer_ms"]["1"] > 0
    plan = subprocess.run([sys.executable, "-m", "moeflash.cli", "plan", "--model", "v4-flash", "--hardware", "h200",
                           "--measured", str(out), "--json"], capture_output=True, text=True, cwd=ROOT)
    assert plan.returncode == 0, plan.stderr
    p = json.loads(plan.stdout)
    ml = p["decode"]["batch_1"]["from_measured_layer"]
    # one H200 cannot hold V4-Flash's experts: the store's steps are eager, so the eager layer time is used
    assert p["weights"]["experts_host"] > 0 and ml["layer_steps"] == "eager (expert store)"
    assert ml["layer_ms"] == pytest.approx(s["planner"]["layer_ms_store_b1"])
    assert s["planner"]["store_hit_rate_while_timed"] > 0.5
    assert ml["head_ms"] == pytest.approx(s["planner"]["head_ms"])
    assert str(out) in p["hardware"]["sources"]["bandwidth_gbps"]
    assert p["hardware"]["bandwidth_gbps"] == pytest.approx(s["probes"]["hbm_read_gbps"])


def test_gathered_experts_equal_the_per_expert_loop():
    """The GPU's sync-free path for non-bf16 packed experts (a batched product per (token, expert) pair)."""
    model = build_tiny("float32")
    ffn = model.layers[1].ffn
    ffn.pack_experts_()
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w, idx = ffn.gate(x, torch.zeros(5, dtype=torch.long))
        got = torch.zeros_like(x)
        ffn._gathered(x, w, idx, got)
        ffn.w13 = ffn.w2 = None  # the per-expert loop
        want = ffn._routed(x, w, idx)
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("store", [False, True], ids=["resident", "expert-store"])
def test_piecewise_static_decode_equals_eager(checkpoints, store):
    """Piecewise steps (graphs between the routed experts, which run eagerly: what an expert store needs)
    give the ordinary decode's logits, with all experts resident and through the store's two tiers."""
    from moeflash.engine.graphs import GraphDecoder

    path = checkpoints["official"]
    ref, _ = load_model(path, "float32")
    if store:
        probe, _ = load_model(path, "float32", expert_memory=1.0)
        eb = probe.expert_store.expert_bytes
        probe.expert_store.close()
        model, _ = load_model(path, "float32", expert_memory=12 * eb / 2**30, device="cpu",
                              device_expert_memory=5 * eb / 2**30)
    else:
        model = ref
    dec = GraphDecoder(model, max_batch=4, max_len=160)
    assert dec.piecewise == store
    if not store:
        dec = GraphDecoder(model, max_batch=4, max_len=160, piecewise=True)
    states, eager = _prefilled(model, [4, 21, 50], seed=9), _prefilled(ref, [4, 21, 50], seed=9)
    g = torch.Generator().manual_seed(2)
    from moeflash.engine.forward import advance

    with torch.no_grad():
        for _ in range(12):
            toks = torch.randint(0, 200, (3,), generator=g)
            got = model.logits(dec.decode(states, toks))
            advance(states, [1, 1, 1])
            want = ref.logits(run_tokens(ref, toks, eager, [1, 1, 1]))
            assert (got - want).abs().max() < 1e-4
    if store:
        st = model.expert_store.stats()
        assert st["device"]["misses"] > 0 and st["tokens"] > 0
        model.expert_store.close()


def test_engine_with_an_expert_store_decodes_piecewise(checkpoints):
    from moeflash.engine import LLMEngine
    from moeflash.engine.sampler import SamplingParams

    path = checkpoints["official"]
    prompts = [[256] + list(range(40, 40 + n)) for n in (3, 17, 9)]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    ref, _ = load_model(path, "float32")
    want = [o.token_ids for o in LLMEngine(ref).generate(prompts, params)]
    model, _ = load_model(path, "float32", expert_memory=0.001, device="cpu", device_expert_memory=0.0002)
    try:
        e = LLMEngine(model, max_num_seqs=4, decode_graphs=True, graph_max_len=64)
        got = [o.token_ids for o in e.generate(prompts, params)]
    finally:
        model.expert_store.close()
    assert e.graphs.piecewise and e.graphs.stats["graph_steps"] > 5
    assert got == want


def test_a_failing_static_step_falls_back_to_eager_and_loses_nothing(checkpoints, monkeypatch):
    """If a recorded step raises, its sequences are recomputed (the engine's failure isolation) and decode
    continues eagerly: the tokens are those of an engine that never tried."""
    from moeflash.engine import LLMEngine
    from moeflash.engine.graphs import GraphDecoder
    from moeflash.engine.sampler import SamplingParams

    model, _ = load_model(checkpoints["official"], "float32")
    prompts = [[256] + list(range(40, 40 + n)) for n in (3, 17)]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    want = [o.token_ids for o in LLMEngine(model).generate(prompts, params)]
    engine = LLMEngine(model, max_num_seqs=4, decode_graphs=True, graph_max_len=64)
    calls, original = [], GraphDecoder.decode

    def broken(self, states, tokens):
        calls.append(len(states))
        if len(calls) == 3:
            raise RuntimeError("replay failed")
        return original(self, states, tokens)
    monkeypatch.setattr(GraphDecoder, "decode", broken)
    got = [o.token_ids for o in engine.generate(prompts, params)]
    assert got == want and engine.graphs is None and len(calls) == 3
    assert engine.stats["preemptions"] == 2 and engine.stats["failed_requests"] == 0
