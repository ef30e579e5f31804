"""Hardware profiles for the planner, each number with where it comes from, and probes that measure
the current machine (`moeflash plan --probe`).

A profile is: fast memory (GPU HBM, or RAM on a CPU box) with its size and read bandwidth; dense
matmul peak; a slower tier for experts that do not fit (host RAM over PCIe on GPU boxes, and disk);
the efficiency an engine reaches against those rooflines; and a price per hour.

Efficiencies are measurements, never guesses:

- `cpu-2c` (this 2-vCPU box) and `--probe`: moeflash's own CPU decode and prefill, measured by
  `probe_engine` (the same code `bench/plan_vs_measured.py --calibrate` runs): per-layer and
  per-sequence step overhead from `mini-overhead` (mini's depth and routing at near-zero width), the
  per-group cost of torch's CPU grouped matmul, the per-expert cost of the expert store's path, the
  rate at which FP4 experts are decoded, the fraction of the read-bandwidth probe a decode step's
  weight streaming reaches, and the fraction of the bf16 matmul probe prefill reaches, on a 4-layer
  model of width 640 (between the two checked presets' 512 and 768). `bench/plan_vs_measured.py`
  then checks the planner against `mini` and `flash-shaped` (BENCHMARKS.md "Planner vs measurement").
- GPU profiles: moeflash has no GPU path, so their efficiencies are other engines' published
  measurements, named in `sources` (gpt-fast for batch-1 MoE decode, SGLang's DeepSeek deployment for
  prefill). They describe a well-built GPU engine, not moeflash.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from ..engine.forward import run_tokens


@dataclass(frozen=True)
class EngineCosts:
    """What a decode step of moeflash's CPU engine costs beyond streaming its bytes (measured).

    step time = layers x (layer_ms + batch x seq_layer_ms)
              + layers x experts x group_us          (all experts resident: grouped matmuls loop over every expert)
              + layers x (store_layer_ms + distinct experts x expert_call_us)   (expert store path)
              + missed expert bytes / miss_gbps                (expert store: cold reads, prefetch included)
              + FP4 expert weights used / fp4_gweights_per_s   (FP4 experts stay packed: the kernel's compute rate)
              + bytes / (bandwidth x decode_efficiency)
    On another CPU the FP4 decode rate is scaled by its matmul peak against this box's (more cores)."""

    layer_ms: float
    seq_layer_ms: float
    group_us: float
    expert_call_us: float
    fp4_gweights_per_s: float  # the FP4 kernel's rate at one row (kernels.fp4_linear): G weights/s here
    store_layer_ms: float  # expert store: routing hook, next-layer prediction, cache bookkeeping per layer
    miss_gbps: float       # expert store: effective GB/s of misses (cold reads, unpacking, prefetch included)
    runtime_gib: float  # resident memory of a process that imported torch and moeflash
    source: str


@dataclass(frozen=True)
class Hardware:
    name: str
    kind: str                      # "cpu" or "gpu"
    description: str
    devices: int
    memory_gib: float              # fast memory, all devices together (HBM; RAM on CPU boxes)
    bandwidth_gbps: float          # its read bandwidth, GB/s (1e9 bytes/s), all devices together
    tflops: float                  # dense bf16 matmul peak, TFLOP/s, all devices together
    tflops_fp8: float | None       # FP8 tensor-core peak (None: FP8 weights compute at the bf16 rate)
    disk_gbps: float | None        # cold read bandwidth of the disk tier (None: no disk tier planned)
    host_memory_gib: float = 0.0   # RAM behind the accelerators (GPU boxes only)
    host_link_gbps: float = 0.0    # host -> accelerators bandwidth, all devices together
    reserve_fraction: float = 0.10  # fast memory kept free: activations, allocator, OS
    runtime_gib: float = 0.0       # process / CUDA context baseline
    decode_efficiency: float = 1.0  # achieved / roofline bandwidth when streaming weights and state
    prefill_efficiency: float = 1.0  # achieved / peak FLOP/s in prefill
    prefill_chunk: int = 512       # prompt tokens per forward call (weights are re-read per chunk)
    layer_sync_us: float = 0.0     # multi-device: fixed cost per layer per step (collectives, launches)
    engine: EngineCosts | None = None  # moeflash CPU step overhead; None: no per-step overhead modelled
    price_per_hour: float | None = None
    sources: dict = field(default_factory=dict)

    def replace(self, **kw) -> Hardware:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources"] = dict(self.sources)
        return d


# ---------------------------------------------------------------------------------------------------
# Measured on this machine (2 vCPUs of an AMD EPYC with AVX-512 BF16, 24 GiB, torch 2.13 CPU, 2
# threads) by `.venv/bin/python bench/plan_vs_measured.py --threads 2 --calibrate --presets mini` on
# 2026-11-30, after the native decode-attention, RoPE and FP4 changes (its calibration step is
# `probe_hardware`, the code of `moeflash plan --probe`): see BENCHMARKS.md "Planner vs measurement".
CPU_2C_MEASURED = dict(
    read_gbps=34.7,           # torch.sum over 1 GiB fp32, median of 3 allocations (this VM: 30-55 between runs)
    bf16_tflops=0.4202,       # 2048^3 bf16 matmul
    disk_gbps=2.45,           # cold sequential read of a 256 MiB file after posix_fadvise(DONTNEED)
    decode_efficiency=0.2675,  # a decode step's bytes / time beyond overhead, over read_gbps (width-640 model)
    prefill_efficiency=0.4005,  # prefill FLOP/s over bf16_tflops (width-640 model, 512 tokens)
    engine=EngineCosts(layer_ms=0.777, seq_layer_ms=0.113, group_us=2.02, expert_call_us=18.7,
                       fp4_gweights_per_s=32.9, store_layer_ms=0.085, miss_gbps=1.61, runtime_gib=0.217,
                       source="bench/plan_vs_measured.py --calibrate, 2026-11-30, this 2-vCPU box"),
)

_GPU_DECODE_SRC = ("0.35 = gpt-fast's Mixtral-8x7B int8 on one A100-80GB (github.com/pytorch-labs/gpt-fast, "
                   "mixtral-moe/README.md): 56.0 tok/s x ~12.9 GB activated = 0.72 TB/s of the A100's 2.04 "
                   "TB/s; batch-1 MoE decode in plain PyTorch. Not measured with moeflash (no GPU path).")
_GPU_PREFILL_SRC = ("0.245 of the FP8 peak = SGLang serving DeepSeek-V3 on 12 nodes of 8xH100 (lmsys.org/blog/"
                    "2025-05-05-large-scale-ep): 52.3k input tok/s per node at 2,000-token prompts x 2 x 37B "
                    "activated = 484 TFLOP/s per GPU of 1,979 (FP8). Not measured with moeflash.")
_PRICE_SRC_GPU = ("assumption: mid-range specialty-cloud on-demand rates quoted for May 2026 (H100 SXM "
                  "$2.50-3.50/h, H200 SXM $3.50-4.50/h; mercatus-ai.com/blog/cloud-gpu-pricing); hyperscalers "
                  "charge more, reservations less. Pass --price-per-hour for a real quote.")


def _cpu_2c() -> Hardware:
    m = CPU_2C_MEASURED
    return Hardware(
        name="cpu-2c", kind="cpu", description="this machine: 2 vCPUs of an AMD EPYC (AVX-512 BF16), 24 GiB RAM",
        devices=1, memory_gib=24.0, bandwidth_gbps=m["read_gbps"], tflops=m["bf16_tflops"], tflops_fp8=None,
        disk_gbps=m["disk_gbps"], reserve_fraction=0.10, runtime_gib=m["engine"].runtime_gib,
        decode_efficiency=m["decode_efficiency"], prefill_efficiency=m["prefill_efficiency"],
        prefill_chunk=512, engine=m["engine"], price_per_hour=0.10,
        sources={
            "memory_gib": "/proc/meminfo of this VM",
            "bandwidth_gbps": "measured: torch.sum over 1 GiB fp32 (moeflash plan --probe; BENCHMARKS.md decode probe 31.0-32.6 GB/s)",
            "tflops": "measured: 2048^3 bf16 matmul (BENCHMARKS.md prefill: 406.1 GFLOP/s)",
            "disk_gbps": ("measured: cold 256 MiB sequential read after posix_fadvise(DONTNEED); the expert store's "
                          "misses are timed separately (EngineCosts.miss_gbps)"),
            "efficiency": m["engine"].source,
            "price_per_hour": "assumption: roughly what a 2-vCPU / 16-32 GB cloud VM costs on demand",
        })


def _cpu_server() -> Hardware:
    m = CPU_2C_MEASURED
    return Hardware(
        name="cpu-server", kind="cpu",
        description="2-socket AMD EPYC 9004-class server, 256 GB DDR5-4800, NVMe SSD",
        devices=1, memory_gib=256.0 * 1e9 / 2**30, bandwidth_gbps=460.8, tflops=10.0, tflops_fp8=None,
        disk_gbps=7.0, reserve_fraction=0.10, runtime_gib=m["engine"].runtime_gib,
        # measured on cpu-2c against its probe (torch.sum reaches ~100% of what that VM gets); a big DDR5
        # server's STREAM-like bandwidth is ~80% of theoretical, so 0.8 x the measured fraction.
        decode_efficiency=round(0.8 * m["decode_efficiency"], 3), prefill_efficiency=m["prefill_efficiency"],
        prefill_chunk=512, engine=m["engine"], price_per_hour=3.70,
        sources={
            "bandwidth_gbps": ("assumption: 12 channels x DDR5-4800 x 8 bytes = 460.8 GB/s theoretical, i.e. one "
                               "socket's channels; a process whose weights sit on one NUMA node streams at most that"),
            "tflops": ("assumption: 64 Zen 4 cores x 2.5 GHz x 64 bf16 FLOP/cycle (AVX-512 BF16) = 10.2 TFLOP/s; "
                       "this box's bf16 probe reaches ~96% of the same per-core arithmetic"),
            "disk_gbps": "assumption: one PCIe 4.0 x4 NVMe SSD, ~7 GB/s sequential read (spec sheets)",
            "efficiency": ("moeflash's measured cpu-2c factors (" + m["engine"].source + "); decode x0.8 for "
                           "theoretical vs achievable DRAM bandwidth; per-step overhead assumed to carry over"),
            "price_per_hour": ("assumption: on the order of a 64-core / 256 GiB on-demand cloud instance; a rented "
                               "dedicated server of this class costs a fraction of that per month"),
        })


_SYNC_SRC = ("57 us per layer per decode step, from gpt-fast's tensor-parallel table (A100, NVLink): "
             "Llama-2-7B (32 layers, 13.5 GB bf16) decodes in 9.5 ms on 1 GPU and 3.04 ms on 8, where 1/8 of "
             "the bytes take 1.21 ms at the 1-GPU rate, leaving 1.83 ms / 32 layers; the same constant "
             "predicts Llama-2-70B on 8 GPUs within 7% (58.5 vs 62.5 tok/s)")


def _gpu(name: str, n: int, mem_gb: float, bw: float, desc: str, host_gib: float, disk: float,
         price: float, decode_eff: float, extra: dict) -> Hardware:
    return Hardware(
        name=name, kind="gpu", description=desc, devices=n, memory_gib=n * mem_gb * 1e9 / 2**30,
        bandwidth_gbps=n * bw, tflops=n * 989.0, tflops_fp8=n * 1979.0, disk_gbps=disk,
        host_memory_gib=host_gib, host_link_gbps=n * 50.0, reserve_fraction=0.10, runtime_gib=n * 0.5,
        decode_efficiency=decode_eff, prefill_efficiency=0.245, prefill_chunk=8192, engine=None,
        layer_sync_us=57.0 if n > 1 else 0.0,
        price_per_hour=price,
        sources={
            "memory_gib": "NVIDIA H100 / H200 data sheets (H100 SXM: 80 GB HBM3, 3.35 TB/s; H200 SXM: 141 GB HBM3e, 4.8 TB/s)",
            "tflops": "NVIDIA Hopper data sheet: 989 dense BF16 / 1,979 dense FP8 TFLOP/s per SXM GPU (the 1,979 / 3,958 figures quoted elsewhere include sparsity)",
            "host_link_gbps": "assumption: PCIe Gen5 x16 per GPU, 64 GB/s theoretical, ~50 GB/s achieved",
            "reserve_fraction": "assumption: vLLM's default gpu_memory_utilization of 0.9 leaves 10% free",
            "decode_efficiency": _GPU_DECODE_SRC, "prefill_efficiency": _GPU_PREFILL_SRC,
            "price_per_hour": _PRICE_SRC_GPU, **extra,
        })


PROFILES = {
    "cpu-2c": _cpu_2c,
    "cpu-server": _cpu_server,
    "h100": lambda: _gpu("h100", 1, 80.0, 3350.0, "one NVIDIA H100 SXM5 80 GB (single-GPU cloud instance)",
                         host_gib=224.0, disk=5.0, price=3.00, decode_eff=0.35,
                         extra={"host_memory_gib": "assumption: ~225 GiB host RAM per GPU on single-GPU cloud instances",
                                "disk_gbps": "assumption: local NVMe, ~5 GB/s"}),
    "h200": lambda: _gpu("h200", 1, 141.0, 4800.0, "one NVIDIA H200 SXM 141 GB (single-GPU cloud instance)",
                         host_gib=224.0, disk=5.0, price=4.00, decode_eff=0.35,
                         extra={"host_memory_gib": "assumption: ~225 GiB host RAM per GPU on single-GPU cloud instances",
                                "disk_gbps": "assumption: local NVMe, ~5 GB/s"}),
    "8xh200": lambda: _gpu("8xh200", 8, 141.0, 4800.0, "an 8x NVIDIA H200 SXM node (HGX / DGX H200, 1,128 GB HBM3e)",
                           host_gib=2048.0, disk=25.0, price=32.00, decode_eff=0.35,
                           extra={"host_memory_gib": "NVIDIA DGX H200 data sheet: 2 TB system memory",
                                  "disk_gbps": "assumption: DGX H200's 8 NVMe data drives, ~25 GB/s together",
                                  "layer_sync_us": _SYNC_SRC,
                                  "parallelism": ("dense weights split 8 ways (tensor parallel), routed experts "
                                                  "spread over the GPUs (expert parallel: a step waits for the GPU "
                                                  "with the most experts used), each sequence's state on one GPU")}),
}


def get_profile(name: str) -> Hardware:
    if name not in PROFILES:
        raise ValueError(f"unknown hardware profile {name!r}; choose one of {', '.join(PROFILES)}, or --probe, "
                         "or give --bandwidth GB/s --flops TFLOP/s --memory GiB [--disk-bandwidth GB/s]")
    return PROFILES[name]()


def custom_hardware(bandwidth: float, flops: float, memory: float, disk: float | None = None,
                    kind: str = "cpu") -> Hardware:
    """Hardware from explicit numbers; efficiencies default to moeflash's measured CPU ones
    (kind "cpu") or the published GPU-engine ones (kind "gpu")."""
    for name, v in (("--bandwidth", bandwidth), ("--flops", flops), ("--memory", memory)):
        if v is None or not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    if disk is not None and not disk > 0:
        raise ValueError(f"--disk-bandwidth must be > 0, got {disk}")
    base = get_profile("cpu-2c" if kind == "cpu" else "h200")
    return base.replace(name="custom", description=f"custom {kind}: {bandwidth:g} GB/s, {flops:g} TFLOP/s, {memory:g} GiB",
                        memory_gib=memory, bandwidth_gbps=bandwidth, tflops=flops,
                        tflops_fp8=None if kind == "cpu" else flops * 2, disk_gbps=disk,
                        host_memory_gib=0.0, host_link_gbps=0.0, price_per_hour=None,
                        sources={**base.sources, "bandwidth_gbps": "given", "tflops": "given", "memory_gib": "given",
                                 "disk_gbps": "given" if disk else "none", "price_per_hour": "give --price-per-hour"})


# ---------------------------------------------------------------------------------------------------
# probes


def _best(fn, iters: int) -> float:
    fn()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def probe_read_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """GB/s of torch.sum over a ~gib GiB fp32 tensor: best of 4 runs per allocation, median over
    `repeats` fresh allocations (the same method as bench/common.read_bandwidth_probe)."""
    import torch

    n = int(gib * (1 << 30)) // 4
    runs = []
    for _ in range(repeats):
        x = torch.ones(n, dtype=torch.float32)
        runs.append(n * 4 / _best(lambda x=x: torch.sum(x), 4) / 1e9)
        del x
        gc.collect()
    return sorted(runs)[len(runs) // 2]


def probe_matmul_tflops(dtype: str = "bfloat16", n: int = 2048, iters: int = 5) -> float:
    """TFLOP/s of an n^3 matmul (2 n^3 FLOPs), best of `iters` after a warm-up."""
    import torch

    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    out = torch.empty(n, n, dtype=dt)
    return 2 * n ** 3 / _best(lambda: torch.matmul(a, b, out=out), iters) / 1e12


def probe_disk(path: str | Path | None = None, mib: int = 256) -> float:
    """Cold read GB/s. A checkpoint directory is read as the expert store reads it
    (`engine.experts.disk_read_gbps`); otherwise a `mib` MiB file is written in `path` (default: the
    temp directory), its pages dropped from the page cache (posix_fadvise DONTNEED), and read back."""
    from ..engine.experts import disk_read_gbps

    if path is not None and Path(path).is_dir() and any(Path(path).glob("*.safetensors")):
        return disk_read_gbps(path, nbytes=mib << 20)
    block = 8 << 20
    chunk = os.urandom(block)
    fd, name = tempfile.mkstemp(prefix="moeflash-probe-", dir=str(path) if path else None)
    try:
        for _ in range(max(1, (mib << 20) // block)):
            os.write(fd, chunk)
        os.fsync(fd)  # written back, so dropping the pages leaves nothing cached
    finally:
        os.close(fd)
    try:
        return disk_read_gbps(name, nbytes=mib << 20, block=block)
    finally:
        os.unlink(name)


def _write_probe_checkpoint(path, experts: int):
    """A bf16 checkpoint of the calibration width (4 layers x `experts` experts, ~0.4 GB) in a temp
    directory under `path`, its pages dropped from the page cache. Returns (directory, config)."""
    import torch

    from ..model.init import randomize_
    from ..model.v4 import Transformer
    from ..weights.save import save_checkpoint

    _, wide = _calibration_configs()
    cfg = wide.replace(n_routed_experts=experts, vocab_size=4096)
    tmp = Path(tempfile.mkdtemp(prefix="moeflash-probe-", dir=str(path) if path else None))
    save_checkpoint(randomize_(Transformer(cfg), seed=0), tmp, torch.bfloat16)
    for f in tmp.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, os.fstat(fd).st_size, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return tmp, cfg


def _store_decode(model, steps: int = 12, warm: int = 256) -> tuple[float, float]:
    """(median decode step seconds at batch 1, expert bytes the store read per step) after a
    `warm`-token prompt filled the cache."""
    import torch

    g = torch.Generator().manual_seed(3)
    store = model.expert_store
    with torch.inference_mode():
        st = [model.new_seq_state()]
        x = run_tokens(model, torch.randint(0, model.config.vocab_size, (warm,), generator=g), st, [warm])
        nxt = model.logits(x[-1:]).argmax(-1)
        for _ in range(3):
            nxt = model.logits(run_tokens(model, nxt, st, [1])).argmax(-1)
        before = store.stats()["bytes_read"]
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            nxt = model.logits(run_tokens(model, nxt, st, [1])).argmax(-1)
            times.append(time.perf_counter() - t0)
        read = (store.stats()["bytes_read"] - before) / steps
    return sorted(times)[len(times) // 2], read


def probe_store(costs: EngineCosts, path: str | Path | None = None, experts: int = 48, log=None) -> dict:
    """The expert store's own costs, on a checkpoint of the calibration width written to the temp
    directory (`path`): decode at batch 1 with every expert in RAM, then through the store holding
    all experts (-> store_layer_ms: the per-layer cost of its routing hook, prediction and
    bookkeeping, beyond `expert_call_us` per expert) and holding half (-> miss_gbps: expert bytes
    read per step / the extra step time; cold reads with pages dropped, unpacking and the prefetch
    thread's competition included)."""
    import shutil

    from ..engine.load import load_model

    say = log or (lambda *a: None)
    tmp, cfg = _write_probe_checkpoint(path, experts)
    try:
        n, e, k = cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok
        eb = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
        ram, _ = load_model(tmp, dtype="bfloat16")
        t_ram = min(decode_step_seconds(ram, 1) for _ in range(3))
        del ram
        gc.collect()
        full, _ = load_model(tmp, dtype="bfloat16", expert_memory=(n * e * eb + 4096) / 2**30)
        t_full = min(_store_decode(full)[0] for _ in range(2))
        full.expert_store.close()
        del full
        half, _ = load_model(tmp, dtype="bfloat16", expert_memory=(n * e * eb // 2 + 4096) / 2**30)
        runs = [_store_decode(half) for _ in range(2)]
        half.expert_store.close()
        del half
        gc.collect()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t_half, read = min(runs)
    store_layer_ms = max(0.0, ((t_full - t_ram) * 1e3 - n * k * costs.expert_call_us / 1e3
                               + n * e * costs.group_us / 1e3) / n)
    miss_gbps = read / max(t_half - t_full, 1e-6) / 1e9
    say(f"[probe] expert store: decode {t_ram * 1e3:.1f} ms all in RAM, {t_full * 1e3:.1f} ms through the store "
        f"(all resident), {t_half * 1e3:.1f} ms at half ({read / 1e6:.1f} MB read per step) -> "
        f"{store_layer_ms:.3f} ms per layer, misses at {miss_gbps:.2f} GB/s")
    return {"store_layer_ms": store_layer_ms, "miss_gbps": miss_gbps,
            "raw": {"ram_ms": t_ram * 1e3, "store_full_ms": t_full * 1e3, "store_half_ms": t_half * 1e3,
                    "store_half_bytes_per_step": read}}


def _rss_gib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    return 0.0


def _calibration_configs():
    """`mini-overhead` (mini's depth, 96 experts, top-8, near-zero width), and a 4-layer model of its
    own width (hidden 640, experts 384 wide, 16 experts, top-8; between `flash-shaped`'s 512 and
    `mini`'s 768 so that neither checked preset is the calibration): small enough to build in
    seconds, big enough (~95 MB read per token) that decode streams from DRAM, not cache."""
    from ..config import ModelConfig, flash_layer_types, hash_layer_types

    wide = ModelConfig(
        vocab_size=16384, hidden_size=640, moe_intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
        head_dim=128, qk_rope_head_dim=32, q_lora_rank=320, o_groups=4, o_lora_rank=256,
        layer_types=flash_layer_types(4), mlp_layer_types=hash_layer_types(4, 1), n_routed_experts=16,
        num_experts_per_tok=8, index_n_heads=16, index_head_dim=64, index_topk=128, num_nextn_predict_layers=0)
    return ModelConfig.preset("mini-overhead"), wide


def _build(cfg, dtype):
    from ..model.init import randomize_
    from ..model.layout import cast_
    from ..model.v4 import Transformer
    from ..weights.build import _fast_layout

    return _fast_layout(cast_(randomize_(Transformer(cfg), seed=0).eval(), dtype)).requires_grad_(False)


def decode_step_seconds(model, batch: int, prompt: int = 64, steps: int = 12, warmup: int = 3) -> float:
    """Median seconds of a batched decode step (forward_tokens + logits + argmax) after a prefill."""
    import torch

    g = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        states = [model.new_seq_state() for _ in range(batch)]
        x = run_tokens(model, torch.randint(0, vocab, (batch * prompt,), generator=g), states, [prompt] * batch)
        nxt = model.logits(x[torch.arange(1, batch + 1) * prompt - 1]).argmax(-1)
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            nxt = model.logits(run_tokens(model, nxt, states, [1] * batch)).argmax(-1)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def prefill_seconds(model, tokens: int, chunk: int = 512) -> float:
    """Seconds to prefill one sequence of `tokens` random tokens in `chunk`-token calls, after an
    untimed warm-up chunk on a throwaway state."""
    import torch

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=g)
    with torch.inference_mode():
        run_tokens(model, ids[:min(chunk, tokens)], [model.new_seq_state()], [min(chunk, tokens)])
        st = model.new_seq_state()
        t0 = time.perf_counter()
        x = None
        for a in range(0, tokens, chunk):
            b = min(a + chunk, tokens)
            x = run_tokens(model, ids[a:b], [st], [b - a])
        model.logits(x[-1:]).argmax(-1)
        return time.perf_counter() - t0


def probe_group_us(experts: int = 256, d: int = 640, inter: int = 384, iters: int = 20) -> float:
    """Microseconds per routed expert per MoE layer in the grouped path when the expert is unused:
    torch's CPU grouped matmul loops over every group, empty or not (two calls per layer). Measured
    at the calibration model's width (the cost grows a little with the weight size: ~3 us per group
    at width 64, ~5.5 at mini's and flash-shaped's widths, here)."""
    import torch
    import torch.nn.functional as F

    if getattr(F, "grouped_mm", None) is None:
        return 0.0
    k = 8

    def layer_time(e: int) -> float:
        w13 = torch.zeros(e, 2 * inter, d, dtype=torch.bfloat16)
        w2 = torch.zeros(e, d, inter, dtype=torch.bfloat16)
        idx = torch.randperm(e, generator=torch.Generator().manual_seed(0))[:k]
        counts = torch.bincount(idx, minlength=e)
        offs = counts.cumsum(0).to(torch.int32)
        rows = torch.randn(k, d).bfloat16()

        def run():
            h = F.grouped_mm(rows, w13.transpose(-2, -1), offs=offs)
            F.grouped_mm(h[:, :inter].contiguous(), w2.transpose(-2, -1), offs=offs)
        return _best(run, iters)
    small = 16
    return max(0.0, (layer_time(experts) - layer_time(small)) / (experts - small) * 1e6)


def probe_expert_call_us(iters: int = 200) -> float:
    """Microseconds per routed expert used, on the expert store's path: a cache-policy lookup plus
    one resident expert's call chain (gate/up matmul, clamped SwiGLU, down matmul, weighted add),
    at near-zero width so that only the fixed cost remains."""
    import torch

    from ..engine.expert_policy import make_policy
    from ..engine.experts import ResidentExpert

    d, inter = 16, 8
    parts = {w: (torch.randn(*shape).bfloat16(), None, None)
             for w, shape in (("w1", (inter, d)), ("w3", (inter, d)), ("w2", (d, inter)))}
    expert = ResidentExpert(parts, 10.0, torch.bfloat16)
    policy = make_policy("lfu", 64)
    x = torch.randn(1, d).bfloat16()
    out = torch.zeros(1, d).bfloat16()

    def run():
        for e in range(8):
            policy.access((0, e))
            out.add_(expert(x) * 0.5)
    with torch.inference_mode():
        return _best(lambda: [run() for _ in range(iters // 8)], 7) / (iters // 8 * 8) * 1e6


def probe_fp4_decode(out: int = 1024, inp: int = 2048, iters: int = 20) -> float:
    """G weights/s of the FP4 kernel (`kernels.fp4_linear`, one row) on cache-resident packed weights:
    its compute rate, which a decode step pays per FP4 expert weight used beside the bytes it reads."""
    import torch

    from .. import kernels

    packed = torch.randint(0, 256, (out, inp // 2), dtype=torch.uint8)
    scale = torch.full((out, inp // 32), 127, dtype=torch.uint8)
    x = torch.randn(1, inp)
    return out * inp / _best(lambda: [kernels.fp4_linear(x, packed, scale) for _ in range(iters)], 5) * iters / 1e9


def probe_engine(read_gbps: float, bf16_tflops: float, log=None, store_path: str | Path | None = None) -> dict:
    """Measure moeflash's CPU decode / prefill cost model (EngineCosts + efficiencies) here.

    1. group_us and expert_call_us: micro-benchmarks (above).
    2. layer_ms, seq_layer_ms: `mini-overhead` in bf16 decoding at batch 1 and 4; its bytes are
       negligible, so step(B) = L (layer_ms + B seq_layer_ms) + L E group_us.
    3. decode_efficiency: a 4-layer model of width 640 (16 experts): decode at batch 1, minus the
       overhead of (2), is its bytes read / (bandwidth x efficiency).
    4. prefill_efficiency: the same model prefilling 512 tokens: FLOPs / (peak x efficiency) plus the
       weights it reads (every expert, once) at the decode efficiency.
    5. store_layer_ms and miss_gbps: `probe_store` (a checkpoint of the same width written to disk).
    """
    import torch

    from .planner import model_summary, prefill_flops, read_bytes_per_step

    say = log or (lambda *a: None)
    group_us = probe_group_us()
    call_us = probe_expert_call_us()
    fp4 = probe_fp4_decode()
    say(f"[probe] grouped-matmul group {group_us:.2f} us, expert-store call {call_us:.1f} us, FP4 decode "
        f"{fp4:.3f} G weights/s")
    small_cfg, wide_cfg = _calibration_configs()
    small = _build(small_cfg, torch.bfloat16)
    # each timing: the lowest of 3 medians (a busy neighbour on a shared machine only ever slows a run)
    t1 = min(decode_step_seconds(small, 1) for _ in range(3))
    t4 = min(decode_step_seconds(small, 4) for _ in range(3))
    n, e = small_cfg.num_hidden_layers, small_cfg.n_routed_experts
    seq_ms = max(0.0, (t4 - t1) * 1e3 / (3 * n))
    layer_ms = max(0.0, t1 * 1e3 / n - seq_ms - e * group_us / 1e3)
    say(f"[probe] mini-overhead decode {t1 * 1e3:.1f} / {t4 * 1e3:.1f} ms at batch 1 / 4 -> layer {layer_ms:.3f} ms, "
        f"per sequence {seq_ms:.3f} ms")
    del small
    gc.collect()
    wide = _build(wide_cfg, torch.bfloat16)
    costs = EngineCosts(layer_ms, seq_ms, group_us, call_us, fp4, 0.0, 0.0, 0.0, "probe")
    ms = model_summary(wide_cfg, "bf16", "bf16")
    td = min(decode_step_seconds(wide, 1) for _ in range(3))
    ovh = wide_cfg.num_hidden_layers * (layer_ms + seq_ms + wide_cfg.n_routed_experts * group_us / 1e3) / 1e3
    step = read_bytes_per_step(ms, batch=1, position=64 + 8, state_bytes_per_value=2)
    dec_eff = step["total"] / max(td - ovh, 1e-6) / (read_gbps * 1e9)
    say(f"[probe] {wide_cfg.num_hidden_layers}-layer width-{wide_cfg.hidden_size} decode {td * 1e3:.1f} ms for "
        f"{step['total'] / 1e6:.0f} MB -> decode efficiency {dec_eff:.3f}")
    tp = min(prefill_seconds(wide, 512) for _ in range(3))
    fl = prefill_flops(wide_cfg, 512)["total"]
    weights = ms["dense_read_bytes"] + ms["routed_bytes"]  # one chunk touches every expert
    t_weights = weights / (read_gbps * 1e9 * dec_eff)
    t_ovh = wide_cfg.num_hidden_layers * (layer_ms + seq_ms + wide_cfg.n_routed_experts * group_us / 1e3) / 1e3
    pre_eff = fl / max(tp - t_weights - t_ovh, 1e-6) / (bf16_tflops * 1e12)
    say(f"[probe] prefill 512 tokens {tp:.2f} s ({fl / 1e9:.0f} GFLOP) -> prefill efficiency {pre_eff:.3f}")
    del wide
    gc.collect()
    st = probe_store(costs, store_path, log=log)
    costs = dataclasses.replace(costs, store_layer_ms=st["store_layer_ms"], miss_gbps=st["miss_gbps"])
    return {"engine": costs, "decode_efficiency": dec_eff, "prefill_efficiency": pre_eff, "store": st["raw"],
            "raw": {"mini_overhead_step_ms": [t1 * 1e3, t4 * 1e3], "wide_decode_ms": td * 1e3,
                    "wide_decode_bytes": step["total"], "wide_prefill_s": tp, "wide_prefill_flops": fl}}


def probe_hardware(disk_path: str | Path | None = None, engine: bool = True, log=None) -> Hardware:
    """This machine, measured: RAM size, read bandwidth, bf16 matmul peak, cold disk reads, and (with
    engine=True) moeflash's CPU engine costs and efficiencies (`probe_engine`, ~1 minute)."""
    import torch

    say = log or (lambda *a: None)
    runtime = _rss_gib()
    bw = probe_read_bandwidth()
    say(f"[probe] read bandwidth {bw:.1f} GB/s")
    fl = probe_matmul_tflops("bfloat16")
    say(f"[probe] bf16 matmul {fl * 1e3:.0f} GFLOP/s")
    disk = probe_disk(disk_path)
    say(f"[probe] disk: cold sequential read {disk:.2f} GB/s")
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = 0.0
    base = get_profile("cpu-2c")
    hw = base.replace(name="probe", description=f"this machine, measured ({os.cpu_count()} CPUs, "
                      f"{torch.get_num_threads()} torch threads)", memory_gib=round(mem, 2), bandwidth_gbps=round(bw, 2),
                      tflops=round(fl, 4), disk_gbps=round(disk, 3), price_per_hour=None,
                      sources={**base.sources, "memory_gib": "sysconf", "bandwidth_gbps": "measured now",
                               "tflops": "measured now",
                               "disk_gbps": "measured now (cold sequential read)",
                               "price_per_hour": "give --price-per-hour"})
    if engine:
        e = probe_engine(bw, fl, log, store_path=disk_path)
        costs = dataclasses.replace(e["engine"], runtime_gib=round(runtime, 3), source="measured now (moeflash plan --probe)")
        hw = hw.replace(engine=costs, runtime_gib=costs.runtime_gib, decode_efficiency=round(e["decode_efficiency"], 4),
                        prefill_efficiency=round(e["prefill_efficiency"], 4),
                        sources={**hw.sources, "efficiency": "measured now (moeflash plan --probe)"})
    return hw
