"""Shared helpers for the benchmark scripts in bench/ (each script prints ONE JSON object on stdout).

- `read_bandwidth_probe(gib)`: the machine's read bandwidth in GB/s, measured as `torch.sum` over a
  ~1 GiB fp32 tensor (best of a few runs after a warm-up): the decode roofline of DESIGN.md.
- `matmul_probe(n, dtype)`: square matmul GFLOP/s (best of several): the prefill roofline.
- `bytes_per_token(model, seqs)`: the bytes one decode step really reads at storage precision, from
  what the step actually touched (distinct routed experts per layer, `MoE.last_experts`) and from the
  sequences' positions (state read). Call it right after the decode step it describes.
- `make_or_load(preset, dtype)`: `tiny` is built in code; other presets are converted once into
  /tmp/moeflash-bench/<preset> (seed 0, deterministic) with `moeflash convert`, then loaded and
  every weight read once (`touch_weights`: bf16 weights stay memory-mapped and would page-fault
  inside the timed steps otherwise).
- `timed(fn, warmup, iters)` and `print_json(obj)`.

Run any script with `--threads N` to pin torch's CPU threads (default: torch's choice).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

from moeflash.config import CSA, HCA, SLIDING  # noqa: E402
from moeflash.engine.forward import run_tokens  # noqa: E402

BENCH_DIR = Path(os.environ.get("MOEFLASH_BENCH_DIR", "/tmp/moeflash-bench"))
DEVICE = torch.device("cpu")  # `--device` (apply_common_args): where models, probes and tokens live


def sync() -> None:
    """Wait for the device (a GPU runs asynchronously: a timer must not stop before its work does)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident memory now (bytes; this one by default), from /proc/<pid>/statm."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str), flush=True)


def rounded(x, nd: int = 4):
    """Round floats (recursively) for readable JSON: |x| >= 1e4 (bytes, FLOPs) to an int, others to
    `nd` significant digits."""
    if isinstance(x, float):
        if x != x or abs(x) == float("inf"):
            return x
        return int(round(x)) if abs(x) >= 1e4 else float(f"{x:.{nd}g}")
    if isinstance(x, dict):
        return {k: rounded(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v, nd) for v in x]
    return x


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def machine_info() -> dict:
    """Versions and threads, plus the load average at the end of the run: other processes on this
    small machine (tests running in parallel) skew timings, so read numbers with this in mind."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    from moeflash import kernels

    native = kernels.status()
    return {"commit": COMMIT_AT_START, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "kernels": {"isa": native.get("isa", native.get("kernels")), "dot": kernels.dot_path()},
            "simd_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                                "amx_int8", "amx_bf16"}),
            "python": platform.python_version(), "loadavg_1m_5m": list(os.getloadavg()[:2])}


def git_commit() -> str:
    """The commit the numbers come from (short hash, '+dirty' when the work tree differs from it); taken
    when the script starts (COMMIT_AT_START), since edits made while a long run goes on do not change it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def timed(fn, warmup: int = 1, iters: int = 5) -> dict:
    """Run fn warmup + iters times; seconds per call: best, mean, median, and all samples."""
    for _ in range(warmup):
        fn()
    samples = []
    sync()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    s = sorted(samples)
    return {"best": s[0], "mean": sum(s) / len(s), "median": s[len(s) // 2], "samples": samples}


# ---------------------------------------------------------------------------------------------------
# probes

def read_bandwidth_probe(gib: float = 1.0, iters: int = 4, repeats: int = 3, details: bool = False):
    """GB/s (1e9 bytes/s) of `torch.sum` over a ~gib GiB fp32 tensor: for each of `repeats` fresh
    allocations the best of `iters` runs after a warm-up; the median over allocations is returned
    (this VM occasionally reads one allocation ~1.6x faster than usual; the median ignores that).
    details=True returns {"median", "max", "runs"} instead."""
    n = int(gib * (1 << 30)) // 4
    runs = []
    for _ in range(repeats):
        x = torch.ones(n, dtype=torch.float32, device=DEVICE)
        r = timed(lambda: torch.sum(x), warmup=1, iters=iters)
        runs.append(n * 4 / r["best"] / 1e9)
        del x
        gc.collect()
    med = sorted(runs)[len(runs) // 2]
    return {"median": med, "max": max(runs), "runs": runs} if details else med


def matmul_probe(n: int = 2048, dtype: torch.dtype | str = torch.float32, iters: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) in `dtype`; best of `iters` after a warm-up."""
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    a = torch.randn(n, n, device=DEVICE).to(dtype)
    b = torch.randn(n, n, device=DEVICE).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=DEVICE)
    r = timed(lambda: torch.matmul(a, b, out=out), warmup=1, iters=iters)
    return 2 * n ** 3 / r["best"] / 1e9


# ---------------------------------------------------------------------------------------------------
# bytes a decode step reads

QUANT_BUFFERS = (".qweight", ".scale", ".q13", ".s13", ".q2", ".s2", ".qblocks", ".weight")  # weights held as buffers


def is_routed_expert_param(name: str) -> bool:
    return ".ffn.experts." in name or name.endswith((".ffn.q13", ".ffn.s13", ".ffn.q2", ".ffn.s2"))


def weight_tensors(model):
    """(name, tensor) of every weight as stored: parameters, plus FP8 / FP4 weights kept as buffers."""
    yield from model.named_parameters()
    yield from ((n, b) for n, b in model.named_buffers() if n.endswith(QUANT_BUFFERS))


def param_bytes(model) -> dict:
    """Storage bytes of the main model's weights (MTP excluded): dense (no routed experts, no
    embedding), embedding table, head, one routed expert (mean), and the embedding row size."""
    dense = routed = embed = head = 0
    n_routed = 0
    for name, p in weight_tensors(model):
        if name.startswith("mtp."):
            continue
        b = p.numel() * p.element_size()
        if is_routed_expert_param(name):
            routed += b
        elif name.startswith("embed."):
            embed += b
        else:
            dense += b  # includes the LM head
            if name.startswith("head."):
                head += b
    c = model.config
    n_routed = c.num_hidden_layers * c.n_routed_experts
    return {"dense": dense, "head": head, "embed_table": embed, "routed_total": routed,
            "per_expert": routed / n_routed, "embed_row": embed / c.vocab_size}


def state_read_bytes(config, pos: int, element_size: int) -> int:
    """Bytes of state one decode query at position `pos` (pos tokens already held) reads: every
    layer's whole window ring (W x head_dim); HCA layers all T = pos // m entries; CSA layers
    min(T, index_topk) entries plus all T indexer keys (index_head_dim wide). (While T <= index_topk
    the attention code reads all entries and skips the indexer scoring, so up to index_topk indexer
    keys per CSA layer are counted that are not read; negligible.)"""
    total = 0
    for t in config.layer_types:
        total += config.sliding_window * config.head_dim
        if t == SLIDING:
            continue
        n = pos // config.compress_ratio(t)
        if t == HCA:
            total += n * config.head_dim
        elif t == CSA:
            total += min(n, config.index_topk) * config.head_dim + n * config.index_head_dim
    return total * element_size


def state_element_size(seq_state) -> int:
    return seq_state.layers[0].window.element_size()


def bytes_per_token(model, batch_seqs) -> dict:
    """Bytes the decode step just run really read, at storage precision.

    batch_seqs: the SeqStates of the step (one new token each); their `pos` is read *after* the step
    (the query at position pos-1 saw pos-1 earlier tokens plus itself). Dense = every parameter except
    routed experts and the embedding table (the LM head counts fully); embedding = one row per token;
    experts = distinct experts used by the last call in each layer x bytes per expert."""
    pb = param_bytes(model)
    b = len(batch_seqs)
    distinct = []
    for layer in model.layers:
        used = layer.ffn.last_experts
        distinct.append(int(used.numel()) if used is not None else 0)
    experts = sum(distinct) * pb["per_expert"]
    state = sum(state_read_bytes(model.config, s.pos - 1, state_element_size(s)) for s in batch_seqs)
    dense = pb["dense"] + b * pb["embed_row"]
    total = dense + experts + state
    return {"dense": dense, "experts": experts, "state": state, "total": total,
            "per_token": total / max(b, 1), "distinct_experts_per_layer": distinct}


# ---------------------------------------------------------------------------------------------------
# models

def make_or_load(preset: str, dtype: str | torch.dtype = "float32"):
    """The model for a preset: `tiny` built in code (seed 0); others converted once into
    BENCH_DIR/<preset> (bf16 safetensors, seed 0) and loaded with load_model(dir, dtype)."""
    from moeflash.weights.build import build_tiny, load_model

    if preset == "tiny":
        return _on_device(build_tiny(dtype))
    path = BENCH_DIR / preset
    if not (path / "config.json").exists():
        log(f"[make_or_load] converting preset {preset} -> {path} (one time)")
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "moeflash.cli", "convert", "--preset", preset,
                        "--out", str(path), "--seed", "0"], check=True, cwd=str(ROOT),
                       stdout=sys.stderr)
    t0 = time.perf_counter()
    model, _ = load_model(path, dtype=dtype)
    log(f"[make_or_load] loaded {preset} ({dtype}) in {time.perf_counter() - t0:.1f}s")
    touch_weights(model)
    return _on_device(model)


def official_files(preset: str = "mini", layers: str | None = None, codes: bool = False):
    """(checkpoint dir, GGUF path) for a preset in DeepSeek's official format (FP8 dense, FP4 experts,
    `moeflash convert --official`, seed 0; `codes`: drawn as codes, `--codes`) and the GGUF converted from
    it tensor by tensor (MXFP4 experts, lossless from FP4; Q8_0 dense): made once under BENCH_DIR, the
    pair every llama.cpp comparison uses."""
    from moeflash.weights.gguf_export import export_checkpoint_gguf

    name = (preset if layers is None else f"{preset}-layers{layers.replace(':', '-')}") + ("-codes" if codes else "")
    ckpt = BENCH_DIR / f"{name}-official"
    if not (ckpt / "config.json").exists():
        log(f"[official_files] converting preset {preset} -> {ckpt} (one time)")
        cmd = [sys.executable, "-m", "moeflash.cli", "convert", "--preset", preset, "--official",
               "--out", str(ckpt), "--seed", "0"] + (["--layers", layers] if layers else []) + \
            (["--codes"] if codes else [])
        subprocess.run(cmd, check=True, cwd=str(ROOT), stdout=sys.stderr)
    gguf_path = BENCH_DIR / f"{name}-official-mxfp4-q8_0.gguf"
    if not gguf_path.exists():
        log(f"[official_files] exporting {gguf_path}")
        export_checkpoint_gguf(ckpt, gguf_path, expert_type="mxfp4", dense_type="q8_0")
    return ckpt, gguf_path


def _on_device(model):
    if DEVICE.type == "cpu":
        return model
    from moeflash.devices import move_model

    return move_model(model, DEVICE)


@torch.inference_mode()
def touch_weights(model) -> float:
    """Read every parameter once; returns seconds. When the storage dtype equals the checkpoint's
    (bf16), the loader hands back tensors memory-mapped from the safetensors file, so each page is
    faulted in on first use; without this pass those faults land inside the first timed decode steps
    (measured on mini bf16: ~88 -> ~74 ms/step over the first 20 steps)."""
    t0 = time.perf_counter()
    for p in model.parameters():
        p.sum()
    return time.perf_counter() - t0


def random_tokens(vocab: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # avoid the special ids (bos/eos) only by chance; uniform over the vocabulary is fine here
    return torch.randint(0, vocab, (n,), generator=g).to(DEVICE)


def add_common_args(p) -> None:
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (scripts that take it: decode.py, "
                                                   "prefill.py; the rest measure the CPU)")


def apply_common_args(args) -> None:
    global DEVICE
    if args.threads:
        torch.set_num_threads(args.threads)
    from moeflash.devices import resolve_device

    DEVICE = resolve_device(getattr(args, "device", "cpu"))


# ---------------------------------------------------------------------------------------------------
# FLOPs

def activated_flops_per_token(config, head: bool = True) -> float:
    """2 x activated parameters per token, excluding the embedding table (a row lookup, no FLOPs);
    the LM head counts unless `head` is False (a prefill computes logits for its last token only: count
    the head once per prompt, `head_flops`). `count_parameters` gives the activated count (MTP excluded)."""
    from moeflash.model.v4 import count_parameters

    act = count_parameters(config)["activated"] - config.vocab_size * config.hidden_size
    return 2.0 * act - (0.0 if head else head_flops(config))


def head_flops(config) -> float:
    """The LM head's FLOPs for one row of logits."""
    return 2.0 * config.vocab_size * config.hidden_size


def attention_flops(config, start: int, end: int) -> dict:
    """Attention-core FLOPs for the tokens at positions start..end-1 of one sequence:
    2 (QK^T and PV) x 2 x H x D per key attended; keys = visible window (min(p+1, W)) + compressed
    entries visible (HCA: all (p+1)//m; CSA: min((p+1)//m, index_topk)). Also returns the lightning
    indexer's scoring FLOPs (2 x Hi x Di per visible indexer key, CSA layers) separately."""
    c = config
    p = torch.arange(start, end, dtype=torch.float64)
    keys = torch.zeros_like(p)
    index_keys = torch.zeros_like(p)
    for t in c.layer_types:
        keys += torch.clamp(p + 1, max=c.sliding_window)
        if t == SLIDING:
            continue
        visible = torch.div(p + 1, c.compress_ratio(t), rounding_mode="floor")
        if t == HCA:
            keys += visible
        else:
            keys += torch.clamp(visible, max=c.index_topk)
            index_keys += visible
    attn = 2 * 2 * c.num_attention_heads * c.head_dim * float(keys.sum())
    index = 2 * c.index_n_heads * c.index_head_dim * float(index_keys.sum())
    return {"attention": attn, "indexer": index, "keys_attended": float(keys.sum())}


# ---------------------------------------------------------------------------------------------------
# transformers reference

def build_hf(model, dtype: torch.dtype | str = torch.float32, experts: str | None = None):
    """transformers' DeepseekV4ForCausalLM with `model`'s weights (internal_to_hf of its state dict,
    MTP dropped) stored in `dtype`. For bf16, parameters of the modules HF's from_pretrained keeps in
    fp32 (`_keep_in_fp32_modules_strict`: mHC, sinks, position biases, norms, router bias) stay fp32,
    as a user loading the checkpoint with transformers gets; RoPE buffers stay fp32. The model is
    built with `no_init_weights` and the tensors are assigned, so no fp32 copy of the model is made
    (tensors may share storage with `model`'s). `experts`: HF's experts implementation (None =
    transformers' default choice, e.g. grouped_mm; "eager" = the reference loop).
    Returns (hf_model, hf_config)."""
    import transformers
    from transformers.initialization import no_init_weights

    from moeflash.weights.names import internal_to_hf

    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    kw = model.config.to_hf_kwargs()
    if experts:
        kw["experts_implementation"] = experts
    hcfg = transformers.DeepseekV4Config(**kw)
    with no_init_weights():
        hf = transformers.DeepseekV4ForCausalLM(hcfg)
    keep = set(getattr(hf, "_keep_in_fp32_modules_strict", None) or []) if dtype != torch.float32 else set()
    sd = internal_to_hf({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    for k, v in sd.items():
        if v.is_floating_point():
            sd[k] = v.to(torch.float32 if keep & set(k.split(".")) else dtype)
    expected = hf.state_dict()
    bad = [k for k, v in sd.items() if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if "rotary" not in m and "inv_freq" not in m]
    if missing or unexpected or bad:
        raise RuntimeError(f"HF weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                           f"shape mismatch {bad[:5]}")
    del sd, expected
    return hf.eval(), hcfg


def hf_experts_impl(hf) -> str | None:
    return getattr(hf.config, "_experts_implementation", None)


@torch.inference_mode()
def hf_greedy_steps(hf, out, warmup: int, tokens: int):
    """Greedy-decode transformers from the output of its prefill: (seconds of each timed step, every
    token id produced, the last next-token tensor, the cache). One step = model(next token, cache) +
    argmax, as moeflash's loop."""
    cache = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)
    times, ids = [], []
    for i in range(warmup + tokens):
        t0 = time.perf_counter()
        out = hf(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        ids.append(int(nxt))
    return times, ids, nxt, cache


@torch.inference_mode()
def moeflash_greedy_steps(model, prompt: torch.Tensor, warmup: int, tokens: int, head_times: list | None = None):
    """Prefill `prompt` in one sequence, then greedy-decode: (seconds of each timed step, every token
    id produced, the last next-token tensor, the sequence states). One step = forward_tokens of one
    token + logits + argmax, what the engine's step does for one sequence. `head_times`, when given,
    receives the logits + argmax part of each timed step."""
    st = [model.new_seq_state()]
    x = run_tokens(model, prompt, st, [prompt.numel()])
    nxt = model.logits(x[-1:]).argmax(-1)
    times, ids = [], []
    for i in range(warmup + tokens):
        t0 = time.perf_counter()
        x = run_tokens(model, nxt, st, [1])
        t1 = time.perf_counter()
        nxt = model.logits(x).argmax(-1)
        if i >= warmup:
            t2 = time.perf_counter()
            times.append(t2 - t0)
            if head_times is not None:
                head_times.append(t2 - t1)
        ids.append(int(nxt))
    return times, ids, nxt, st


@torch.inference_mode()
def moeflash_decode_and_prefill(model, prompt: torch.Tensor, long_prompt: torch.Tensor, warmup: int,
                                tokens: int) -> dict:
    """Batch-1 greedy decode after `prompt` (`moeflash_greedy_steps`) and a one-call prefill of
    `long_prompt` in a fresh sequence: what the peer comparisons (transformers, llama.cpp) measure."""
    run_tokens(model, long_prompt[:32], [model.new_seq_state()], [32])  # warm-up
    times, ids, _, _ = moeflash_greedy_steps(model, prompt, warmup, tokens)
    dec = sum(times)
    t0 = time.perf_counter()
    x = run_tokens(model, long_prompt, [model.new_seq_state()], [long_prompt.numel()])
    model.logits(x[-1:]).argmax(-1)
    pre = time.perf_counter() - t0
    return {"decode_tokens_per_s": len(times) / dec, "decode_ms_per_token": 1e3 * dec / len(times),
            "prefill_s": pre, "prefill_tokens_per_s": long_prompt.numel() / pre, "greedy_ids": ids}


COMMIT_AT_START = git_commit()
