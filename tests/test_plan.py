"""The planner: V4-SPEC §3-§5 arithmetic as exact integers, memory predictions against what the engine
really allocates, tokens/s and cost arithmetic, the CLI (table, JSON, plot) and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moeflash.cli import main
from moeflash.config import ModelConfig
from moeflash.model.state import state_bytes
from moeflash.plan.hardware import PROFILES, get_profile, probe_disk
from moeflash.plan.planner import (
    GIB,
    PlanInputs,
    distinct_experts,
    model_summary,
    monthly_cost,
    plan,
    prefill_flops,
    state_components,
    state_per_token,
    tensor_bytes,
)
from moeflash.engine.forward import run_tokens

FLASH = ModelConfig.preset("v4-flash")


# ---- V4-SPEC arithmetic, exact --------------------------------------------------------------------

def test_v4_flash_parameters_exact():
    s = model_summary(FLASH, "fp8", "fp4")
    assert s["total_params"] == 284_332_230_231          # V4-SPEC §3, MTP excluded
    assert s["activated_params"] == 13_799_622_231
    assert s["routed_params"] == 43 * 256 * 25_165_824 == 277_025_390_592
    assert s["expert_params"] == 25_165_824
    assert s["mtp_params"] == model_summary(FLASH, "fp8", "fp4", mtp=True)["mtp_params"] == 6_610_048_635
    comps = s["components"]
    assert comps["embedding"]["params"] == 529_530_880
    assert comps["head (+ final norm, hyper head)"]["params"] == 529_530_880 + 4_096 + 65_541
    pro = model_summary(ModelConfig.preset("v4-pro"), "fp8", "fp4")
    assert (pro["total_params"], pro["activated_params"]) == (1_572_997_179_491, 49_779_058_787)


def test_v4_flash_checkpoint_bytes_exact():
    """FP8 dense + FP4 experts + BF16/F32/I64 elsewhere, MTP included, equals the hub's total_size
    (V4-SPEC §5.1); the rope tables are the engine's, not the checkpoint's."""
    s = model_summary(FLASH, "fp8", "fp4", mtp=True)
    assert s["total_bytes"] - s["components"]["rope tables"]["bytes"] == 159_609_485_896
    # one FP4 expert matrix [2048, 4096]: 2 codes per byte + one UE8M0 scale per 32 inputs
    assert tensor_bytes("layers.5.ffn.experts.7.w1.weight", (2048, 4096), True, 4, "fp8", "fp4") == 2048 * 2048 + 2048 * 128
    # FP8 [32768, 1024] with 128x128 block scales
    assert tensor_bytes("layers.5.attn.wq_b.weight", (32768, 1024), True, 4, "fp8", "fp4") == 32768 * 1024 + 256 * 8
    assert tensor_bytes("layers.5.hc_attn_fn", (24, 16384), True, 4, "bf16", "bf16") == 24 * 16384 * 4  # kept fp32


def test_v4_flash_state_exact():
    per = state_per_token(FLASH, "bf16")
    assert per["total"] == 6880                          # V4-SPEC §4: 21 x 320 + 20 x 8
    assert (per["csa_entries"], per["indexer_keys"], per["hca_entries"]) == (21 * 256, 21 * 64, 20 * 8)
    n = 2 ** 20
    st = state_components(FLASH, n, "bf16")
    assert st["csa_entries"] + st["indexer_keys"] + st["hca_entries"] == 7_214_202_880
    assert st["window"] == 43 * 128 * 512 * 2 == 5_636_096
    assert st["csa_entries"] + st["indexer_keys"] + st["hca_entries"] + st["window"] == 7_219_838_976
    assert round(7_219_838_976 / GIB, 2) == 6.72
    assert st["total"] == state_bytes(FLASH, n, 2)       # + the CSA overlap halves, as the engine holds
    fp8 = state_components(FLASH, n, "fp8")
    assert fp8["csa_entries"] + fp8["indexer_keys"] + fp8["hca_entries"] + fp8["window"] == 4_040_494_080  # ~4.04e9
    assert round(4_040_494_080 / GIB, 2) == 3.76


@pytest.mark.parametrize("preset", ["tiny", "mini", "v4-flash", "v4-pro"])
def test_state_components_equal_engine_formula(preset):
    cfg = ModelConfig.preset(preset)
    for n in (0, 1, 3, 4, 5, 127, 128, 129, 131, 1000, 4099, 65_537):
        for dt, b in (("bf16", 2), ("fp32", 4)):
            assert state_components(cfg, n, dt)["total"] == state_bytes(cfg, n, b), (preset, n, dt)


# ---- predictions against the engine ----------------------------------------------------------------

def distinct_tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("dtype,fmt", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_memory_prediction_equals_engine_allocation(dtype, fmt):
    """tiny, built as `load_model("tiny")` builds it (fused projections, packed experts, fp32 layout):
    the weight bytes it holds equal the prediction exactly, and after prefilling 37 tokens and decoding
    11 the state's live bytes equal the prediction exactly; the allocated buffers (grown by doubling)
    stay within 2x live + the fixed compressor buffers."""
    from moeflash.weights.build import build_tiny

    model = build_tiny(dtype)
    cfg = model.config
    s = model_summary(cfg, fmt, fmt, mtp=True)
    assert distinct_tensor_bytes(model) == s["total_bytes"]
    st = model.new_seq_state()
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = run_tokens(model, torch.randint(0, cfg.vocab_size, (37,), generator=g), [st], [37])
        nxt = model.logits(x[-1:]).argmax(-1)
        for _ in range(11):
            nxt = model.logits(run_tokens(model, nxt, [st], [1])).argmax(-1)
    assert st.pos == 48
    predicted = state_components(cfg, 48, fmt)["total"]
    assert st.used_bytes() == predicted
    assert predicted <= st.allocated_bytes() <= 2 * predicted + 64 * 1024
    # the planner's fast-memory total for that model at that context
    hw = get_profile("cpu-2c")
    p = plan(PlanInputs(model="tiny", context=48, weights_dtype=fmt, state_dtype=fmt, mtp=True), hw)
    assert p["memory"]["dense"] + p["memory"]["experts_resident"] == s["total_bytes"]
    assert p["memory"]["state"] == state_components(cfg, 48, fmt, mtp=True)["total"]  # + the MTP block's window


@pytest.mark.parametrize("preset", ["mini", "flash-shaped"])
def test_dense_bytes_match_loader(preset):
    """The loader's `dense_bytes` (what load_checkpoint_model keeps besides the experts, integer
    buffers such as `tid2eid` at their int64 size) equals the planner's dense bytes for the benchmark
    presets in bf16 and fp32."""
    from moeflash.model.v4 import Transformer
    from moeflash.weights.build import dense_bytes

    cfg = ModelConfig.preset(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    for dt, fmt in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        s = model_summary(cfg, fmt, fmt)
        assert dense_bytes(model, dt) == s["dense_bytes"]
        routed = sum(p.numel() for n, p in model.named_parameters() if ".ffn.experts." in n) * dt.itemsize
        assert s["routed_bytes"] == routed
        assert s["expert_bytes"] * cfg.num_hidden_layers * cfg.n_routed_experts == routed


def test_distinct_experts_and_flops():
    # measured on mini (BENCHMARKS.md): 27.9 and 70.6 distinct of 96 at batch 4 and 16
    assert distinct_experts(96, 8, 1) == pytest.approx(8)
    assert distinct_experts(96, 8, 4) == pytest.approx(28.2, abs=0.1)
    assert distinct_experts(96, 8, 16) == pytest.approx(72.1, abs=0.1)
    mini = ModelConfig.preset("mini")
    s = model_summary(mini)
    f = prefill_flops(mini, 512, s)
    # weights: 2 x (activated - embedding - head) per token, the head once
    assert f["weights"] == 2.0 * (s["activated_params"] - 2 * 32768 * 768) * 512 + 2.0 * 32768 * 768
    # a 100-token prompt: query p sees p+1 window rows in each of the 8 layers, floor((p+1)/4) CSA
    # entries in each of the 3 CSA layers (never more than index_topk 128, so no indexer scoring), no
    # HCA entry yet (rate 128)
    small = prefill_flops(mini, 100, s)
    keys = 8 * (100 * 101 // 2) + 3 * sum((p + 1) // 4 for p in range(100))
    assert keys == 8 * 5050 + 3 * 1225
    assert small["attention"] == 4 * 8 * 128 * keys and small["indexer"] == 0
    long = prefill_flops(mini, 4096, s)  # past 4 x 129 tokens the indexer scores every CSA entry
    scored = 3 * sum((p + 1) // 4 for p in range(4096) if (p + 1) // 4 > 128)
    assert long["indexer"] == 2 * 16 * 64 * scored


# ---- plans --------------------------------------------------------------------------------------

def test_h200_plan_at_1m_context():
    p = plan(PlanInputs(model="v4-flash", context=1_048_576), get_profile("h200"))
    assert p["inputs"]["weights_dtype"] == "fp4-experts"
    assert p["state"]["per_sequence_at_context"]["total"] == state_bytes(FLASH, 1_048_576, 2)
    w = p["weights"]
    assert w["experts_resident"] + w["experts_host"] + w["experts_disk"] == 11_008
    assert 0 < w["experts_resident"] < 11_008 and w["experts_host"] > 0  # 147 GB of experts > one H200
    assert p["memory"]["fits"]
    assert p["memory"]["fast_used"] <= p["memory"]["fast_capacity"]
    d = p["decode"]["batch_1"]
    assert 0 < d["expected_tokens_per_s"] < d["roofline_tokens_per_s"]
    assert d["bytes_per_step"]["experts_host"] > 0
    p8 = plan(PlanInputs(model="v4-flash", context=1_048_576), get_profile("8xh200"))
    assert p8["weights"]["experts_resident"] == 11_008 and p8["weights"]["experts_host"] == 0


def test_batch_shares_weights_and_budget_sets_hit_rate():
    hw = get_profile("cpu-server")
    p1 = plan(PlanInputs(model="v4-flash", context=8192, batch=1), hw)
    p8 = plan(PlanInputs(model="v4-flash", context=8192, batch=8), hw)
    assert p8["decode"]["batch_n"]["bytes_per_token"] < p1["decode"]["batch_1"]["bytes_per_token"]
    assert p8["decode"]["batch_n"]["expected_tokens_per_s"] > p1["decode"]["batch_1"]["expected_tokens_per_s"]
    half = plan(PlanInputs(model="flash-shaped", context=256, expert_memory_gib=0.375), get_profile("cpu-2c"))
    w = half["weights"]
    assert half["inputs"]["hit_rate"] == pytest.approx(w["experts_resident"] / w["experts_total"])
    assert w["expert_store"]


def test_monthly_cost_arithmetic():
    m = monthly_cost(10_000_000, 0.0, None, 1.0, 1.0)
    assert m["tokens_per_month"] == 300_000_000
    flash = m["api"][1]
    assert flash["usd"] == pytest.approx(42.0)                     # not thousands of dollars
    assert flash["arithmetic"] == "300M input x $0.14/M = $42.00"
    mixed = monthly_cost(10_000_000, 0.25, 4.0, 1000.0, 100.0, utilization=1.0)
    assert mixed["api"][1]["usd"] == pytest.approx(225 * 0.14 + 75 * 0.28)
    sh = mixed["self_hosted"]
    assert sh["dedicated_usd"] == pytest.approx(4.0 * 720)
    assert sh["machine_hours_needed"] == pytest.approx((225e6 / 1000 + 75e6 / 100) / 3600)


def test_cost_per_million_tokens():
    hw = get_profile("h200")
    p = plan(PlanInputs(model="v4-flash", context=32768, price_per_hour=4.0, utilization=0.5), hw)
    tps = p["decode"]["batch_n"]["expected_tokens_per_s"]
    assert p["cost"]["usd_per_million"]["output"] == pytest.approx(4.0 / (tps * 3600 * 0.5) * 1e6)


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_table(capsys):
    assert main(["plan", "--model", "v4-flash", "--hardware", "h200", "--context", "1048576"]) == 0
    out = capsys.readouterr().out
    for text in ("284,332,230,231", "13,799,622,231", "6,880.0", "7,220,054,016", "6.72 GiB", "FITS",
                 "roofline tok/s", "expected tok/s", "$0.0028", "300M input x $0.14/M = $42.00"):
        assert text in out, text


def test_cli_json(capsys):
    assert main(["plan", "--model", "v4-flash", "--hardware", "8xh200", "--context", "131072", "--batch", "32",
                 "--json", "--output-share", "0.2"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["model"]["total_params"] == 284_332_230_231
    assert p["inputs"]["batch"] == 32 and p["decode"]["batch_n"]["batch"] == 32
    assert p["state"]["per_token"]["total"] == 6880
    assert p["cost"]["monthly"]["api"][1]["usd"] == pytest.approx(240 * 0.14 + 60 * 0.28)
    assert math.isfinite(p["prefill"]["expected_tokens_per_s"])


def test_cli_plot_and_custom_hardware(tmp_path, capsys):
    out = tmp_path / "plan.png"
    assert main(["plan", "--model", "flash-shaped", "--bandwidth", "30", "--flops", "0.4", "--memory", "8",
                 "--disk-bandwidth", "1", "--price-per-hour", "0.1", "--context", "4096", "--batch", "4",
                 "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "custom" in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [
    (["--hardware", "tpu-v9"], "unknown hardware profile"),
    (["--hardware", "h200", "--expert-memory", "-1"], "--expert-memory must be >= 0"),
    (["--hardware", "h200", "--context", "2000000"], "exceeds the model's maximum context of 1,048,576"),
    (["--hardware", "h200", "--utilization", "0"], "--utilization must be in (0, 1]"),
    (["--hardware", "h200", "--utilization", "1.5"], "--utilization must be in (0, 1]"),
    (["--hardware", "h200", "--batch", "0"], "--batch must be >= 1"),
    (["--hardware", "h200", "--hit-rate", "2"], "--hit-rate must be in [0, 1]"),
    (["--hardware", "h200", "--efficiency", "0"], "must be in (0, 1]"),
    (["--hardware", "h200", "--model", "nope"], "neither a preset"),
    ([], "give --hardware NAME"),
    (["--bandwidth", "10", "--flops", "1", "--memory", "-4"], "--memory must be > 0"),
    (["--hardware", "h200", "--probe"], "not both"),
    (["--hardware", "h200", "--documents", "0"], "--documents must be an integer >= 1"),
    (["--hardware", "h200", "--document-tokens", "1048576"], "exceed the model's maximum context"),
])
def test_cli_errors(capsys, args, msg):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err, err


def test_profiles_have_sources():
    for name in PROFILES:
        hw = get_profile(name)
        assert hw.name == name and hw.bandwidth_gbps > 0 and hw.tflops > 0 and hw.memory_gib > 0
        assert 0 < hw.decode_efficiency <= 1 and 0 < hw.prefill_efficiency <= 1
        assert "efficiency" in hw.sources or "decode_efficiency" in hw.sources
        assert "price_per_hour" in hw.sources
    assert get_profile("h200").memory_gib == pytest.approx(141e9 / GIB)


def test_probe_disk(tmp_path):
    assert probe_disk(tmp_path, mib=8) > 0


def test_cost_when_the_model_cannot_run(capsys):
    """A model that does not fit and has no lower tier runs at 0 tokens/s: the cost section says so
    instead of dividing by zero."""
    from moeflash.cli import main

    assert main(["plan", "--model", "v4-pro", "--bandwidth", "3350", "--flops", "989", "--memory", "80",
                 "--kind", "gpu", "--price-per-hour", "3"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "does not run on this hardware" in out


@pytest.mark.parametrize("dtype,compute", [("float32", "fp32"), ("bfloat16", "bf16")])
def test_memory_prediction_for_the_official_format_at_storage_precision(tmp_path, dtype, compute):
    """An official-format checkpoint (FP8 linears, FP4 experts) loaded at storage precision: the bytes
    the model holds are the planner's prediction for that directory (within the FP8 scales, which the
    engine holds as fp32 and the planner counts as the checkpoint's one-byte UE8M0), and `--dtype
    auto`'s choice is the planner's default compute dtype on a profile with this machine's free RAM."""
    from moeflash.model.init import randomize_
    from moeflash.model.v4 import Transformer
    from moeflash.weights.build import available_ram, load_model
    from moeflash.weights.save import save_checkpoint

    cfg = ModelConfig.preset("tiny").replace(hidden_size=128, moe_intermediate_size=128, q_lora_rank=128,
                                             o_lora_rank=128)
    ckpt = save_checkpoint(randomize_(Transformer(cfg), seed=2), tmp_path / "c", torch.bfloat16, official=True)
    model, _ = load_model(ckpt, dtype=dtype)
    held = distinct_tensor_bytes(model)
    hw = get_profile("cpu-2c")
    p = plan(PlanInputs(model=str(ckpt), context=16, compute_dtype=compute, mtp=True), hw)
    predicted = p["memory"]["dense"] + p["memory"]["experts_resident"]
    assert p["inputs"]["dense_format"] == "fp8" and p["inputs"]["expert_format"] == "fp4"
    assert not p["weights"]["expert_store"]
    print(f"\n[plan] official tiny in {dtype}: held {held} B, predicted {predicted} B")
    assert abs(predicted - held) <= 0.01 * held
    auto, _ = load_model(ckpt, dtype="auto")
    ram = hw.replace(memory_gib=available_ram() / 2**30)
    want = plan(PlanInputs(model=str(ckpt), context=16, mtp=True), ram)["inputs"]["compute_dtype"]
    assert {"fp32": torch.float32, "bf16": torch.bfloat16}[want] == auto.compute_dtype


# ---- the prefix cache -----------------------------------------------------------------------------

def test_prefix_cache_plan_sizes_the_saved_state_as_the_engine_saves_it():
    """The planner's snapshot is the state the engine saves at the document's last block boundary:
    its live bytes, measured on a tiny model through a real PrefixCache."""
    from moeflash.engine import LLMEngine, SamplingParams
    from moeflash.engine.prefix_cache import PrefixCache
    from moeflash.weights.build import build_tiny

    model = build_tiny("float32")
    doc = 70  # saved at 64 (tiny's block is 8)
    cache = PrefixCache(model.prefix_block_tokens, 1 << 30)
    eng = LLMEngine(model, prefix_cache=cache)
    eng.add_request(list(range(1, doc + 1)) + [3, 4], SamplingParams(max_tokens=1), cache_hints=[doc])
    while eng.has_unfinished():
        eng.step()
    (saved,) = [e for e in cache._entries.values() if e.tokens == 64]
    p = plan(PlanInputs(model="tiny", context=256, document_tokens=doc, state_dtype="fp32", documents=3),
             get_profile("cpu-2c"))["prefix_cache"]
    assert p["block_tokens"] == 8 and p["saved_at_tokens"] == 64
    assert p["snapshot_bytes"] == saved.state.used_bytes() == state_bytes(model.config, 64, 4)
    assert p["disk_bytes"] == 3 * p["snapshot_bytes"]


def test_prefix_cache_plan_for_v4_flash():
    p = plan(PlanInputs(model="v4-flash", context=131072, document_tokens=100_000, documents=100),
             get_profile("h200"))["prefix_cache"]
    assert p["saved_at_tokens"] == 100_000 // 128 * 128
    assert p["snapshot_bytes"] == state_components(FLASH, p["saved_at_tokens"], "bf16")["total"]
    assert 6_880 <= p["snapshot_bytes_per_token"] < 7_000  # V4-SPEC: 6,880 bytes per token, plus the window
    q = p["question"]
    # a hit prefills only the question: the document's prefill is what it saves
    assert q["hit_from_ram"]["prefill_s"] < q["miss"]["prefill_s"] / 10
    assert q["hit_from_ram"]["total_s"] < q["hit_from_disk"]["total_s"] < q["miss"]["total_s"]
    assert q["hit_from_ram"]["usd"] < q["miss"]["usd"]
    assert q["hit_from_disk"]["restore_s"] == pytest.approx(p["snapshot_bytes"] / (get_profile("h200").disk_gbps * 1e9))


# ---- clusters (expert parallelism across machines) --------------------------------------------------

def test_cluster_plan_arithmetic():
    from moeflash.plan.cluster import ClusterInputs, allreduce_seconds, cluster_plan

    assert allreduce_seconds(8192, 1, 1.25, 50) == 0.0
    # ring of 4: 6 steps of a latency and a quarter of the buffer
    assert allreduce_seconds(8192, 4, 1.25, 50) == pytest.approx(6 * (50e-6 + 2048 / 1.25e9))
    hw = get_profile("cpu-server")
    one = cluster_plan(ClusterInputs(nodes=1, context=8192), hw)
    three = cluster_plan(ClusterInputs(nodes=3, context=8192, link_gbps=1.25, link_latency_us=50), hw)
    s = model_summary(FLASH, "fp8", "fp4")
    m = three["memory_per_node"]
    assert m["dense"] == s["dense_bytes"] and m["experts"] == math.ceil(s["routed_bytes"] / 3)
    assert one["time_ms"]["network"] == 0 and three["per_step"]["allreduces"] == FLASH.num_hidden_layers
    assert three["per_step"]["allreduce_bytes"] == FLASH.hidden_size * 2
    assert three["time_ms"]["network"] == pytest.approx(
        1e3 * FLASH.num_hidden_layers * allreduce_seconds(FLASH.hidden_size * 2, 3, 1.25, 50))
    # each node reads the whole dense part but only the busiest node's share of the experts
    assert three["per_step"]["experts_busiest_node"] < one["per_step"]["experts_busiest_node"]
    assert three["per_step"]["dense"] == one["per_step"]["dense"]


def test_cluster_plan_cli(capsys):
    assert main(["plan", "--model", "v4-flash", "--bandwidth", "80", "--flops", "2", "--memory", "64", "--nodes", "3",
                 "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "3 x custom" in out and "fits" in out and "all-reduces" in out
    assert main(["plan", "--hardware", "h200", "--nodes", "2", "--link-gbps", "0"]) == 2


def test_measured_layer_adds_the_expert_copies_and_the_hit_rate_a_target_needs():
    """With a measured layer and experts outside fast memory, a batch-1 step is layers x layer_ms + head
    + (layers x top_k x (1 - hit)) expert copies over the host link; the hit rate a target needs solves
    the same sum for that target."""
    from moeflash.plan.planner import PlanInputs, plan

    hw = get_profile("h200")
    base = dict(model="v4-flash", context=4096, layer_ms=0.3, head_ms=0.4, hit_rate=0.9, target_tokens_per_s=40.0)
    p = plan(PlanInputs(**base), hw)
    ml = p["decode"]["batch_1"]["from_measured_layer"]
    c = ModelConfig.preset("v4-flash")
    eb = p["weights"]["expert_bytes"]
    assert p["weights"]["experts_disk"] == 0  # 224 GiB of host RAM holds every expert the GPU does not
    misses = c.num_hidden_layers * c.num_experts_per_tok * (1 - 0.9)
    assert ml["expert_misses_per_token"] == pytest.approx(misses)
    assert ml["step_ms"] == pytest.approx(43 * 0.3 + 0.4 + misses * ml["ms_per_miss"])
    assert ml["ms_per_miss"] == pytest.approx(1e3 * eb / (hw.host_link_gbps * 1e9))
    need = ml["hit_rate_needed"]
    assert 0 < need < 1
    again = plan(PlanInputs(**{**base, "hit_rate": need}), hw)["decode"]["batch_1"]["from_measured_layer"]
    assert again["tokens_per_s"] == pytest.approx(40.0, rel=1e-6)
    slow = plan(PlanInputs(**{**base, "layer_ms": 1.0}), hw)["decode"]["batch_1"]["from_measured_layer"]
    assert slow["hit_rate_needed"] is None  # 43 ms of layers alone: 40 tok/s cannot be reached


def test_plan_measured_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sections": {"probes": {"hbm_read_gbps": 1.0, "bf16_gemm_tflops": 1.0}},
                               "errors": {"planner": "Traceback ...\nRuntimeError: out of memory"}}))
    assert main(["plan", "--hardware", "h200", "--measured", str(bad)]) == 2
    assert "no planner section (planner: RuntimeError: out of memory)" in capsys.readouterr().err
    assert main(["plan", "--hardware", "h200", "--measured", str(tmp_path / "none.json")]) == 2
    assert "not a readable JSON file" in capsys.readouterr().err
