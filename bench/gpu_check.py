"""The GPU check (issue 18): everything the GPU path promises, measured in one run, written to one JSON file.

Sections, each timed and written as soon as it finishes (a failure is recorded, not fatal, and a run cut
short keeps what it had):
- `probes`: HBM read bandwidth (a sum over 4 GiB), a bf16 GEMM (8192^3), host-to-device copies from
  pinned and pageable memory: the rooflines the rest is a fraction of.
- `kernels`: the Triton FP8 linear and FP4 MoE kernels against the plain-torch references on the GPU, at
  V4-Flash's real shapes, and the bandwidth each reaches on its stored bytes.
- `parity`: the parity configs (the `tiny` preset in fp32 and bf16, and an official FP8 / FP4 checkpoint)
  run on the CPU and on the GPU: logits of a prefill and of decode steps, eager and as CUDA graphs, and
  greedy tokens through the engine.
- `tiers`: the expert store's GPU tier (GPU <- pinned host RAM <- disk), demand and prefetch: greedy
  tokens against all experts resident, and its counters.
- `decode`: batch 1 / 16 / 64 on `mini` and on two V4-Flash layers at real size (both in the official
  FP8 / FP4 format): step time with CUDA graphs (and eager at batch 1), bytes read per step at storage
  precision, and the fraction of the HBM probe.
- `prefill`: a 2,048-token prompt on the same models: FLOP/s against the bf16 GEMM probe.
- `planner`: the measured parts the planner needs (`moeflash plan --measured FILE`): per-layer decode
  time of a real-size layer (graphs, eager, and with the expert store), the head's time, host-to-device
  GB/s, expert bytes.
- `compiled`: batch-1 decode with the static step compiled by torch.compile before recording (opt-in in
  the engine, `decode_compile=True`), against the plain graph.

    bash bench/gpu_check.sh                  # on the GPU machine: python bench/gpu_check.py --out ...
    python bench/gpu_check.py --device cpu --quick --out /tmp/gc.json   # the same code paths on a CPU

The checkpoints are made here with `moeflash convert --device` (seeded random weights drawn and quantized on
the device under test, in seconds; nothing is downloaded).
Imports only torch, safetensors, numpy (and Triton on a GPU): what the GPU machine has.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import common
from common import ROOT, activated_flops_per_token, attention_flops, bytes_per_token, param_bytes, timed

from moeflash import kernels
from moeflash.devices import move_model, resolve_device
from moeflash.engine.forward import advance, run_tokens

R: dict = {"sections": {}, "errors": {}}
ARGS = None
T0 = time.perf_counter()


def save() -> None:
    Path(ARGS.out).write_text(json.dumps(R, indent=1, default=str))


def section(fn):
    """A section: run it, record its result (or its error) and its seconds, and write the file."""
    name = fn.__name__

    def run():
        if ARGS.only and name not in ARGS.only:
            return
        if time.perf_counter() - T0 > ARGS.budget_s:
            R["errors"][name] = f"skipped: the {ARGS.budget_s:.0f} s budget was spent"
            save()
            return
        t = time.perf_counter()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            R["sections"][name] = fn()
        except Exception:
            R["errors"][name] = traceback.format_exc()[-4000:]
            print(R["errors"][name], file=sys.stderr)
        R.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 2)
        save()
    run.__name__ = name
    return run


def clock(fn, warmup: int = 2, iters: int = 10) -> float:
    """Median seconds of fn(), each run waited for on the device (common.timed)."""
    return timed(fn, warmup, iters)["median"]


def convert(preset: str, extra: list[str]) -> str:
    """A seeded random checkpoint in ARGS.dir (made once)."""
    out = Path(ARGS.dir) / (preset + "".join(extra).replace("-", "").replace(":", "_"))
    if not (out / "config.json").exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "moeflash.cli", "convert", "--preset", preset, "--out", str(out),
                        "--seed", "0", "--device", str(DEV), *extra], check=True, cwd=ROOT, stdout=sys.stderr)
        R.setdefault("convert_seconds", {})[out.name] = round(time.perf_counter() - t, 1)
    return str(out)


def load(spec: str, dtype: str, device=None, **kw):
    from moeflash.engine.load import load_model

    return load_model(spec, dtype, device=device or DEV, **kw)[0]


# ------------------------------------------------------------------------------------------------------
@section
def probes() -> dict:
    gib = 0.25 if ARGS.quick else 4.0
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=DEV)
    read = x.numel() * 4 / clock(lambda: x.sum(), 2, 10) / 1e9
    y = torch.empty_like(x)
    copy = 2 * x.numel() * 4 / clock(lambda: y.copy_(x), 2, 10) / 1e9
    del x, y
    n = 1024 if ARGS.quick else 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    gemm = 2 * n ** 3 / clock(lambda: a @ b, 2, 10) / 1e12
    out = {"hbm_read_gbps": read, "hbm_copy_gbps": copy, "bf16_gemm_tflops": gemm, "gemm_n": n, "probe_gib": gib}
    if DEV.type == "cuda":
        size = int((0.25 if ARGS.quick else 1.0) * 2**30)
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        pageable = torch.empty(size, dtype=torch.uint8)
        dst = torch.empty(size, dtype=torch.uint8, device=DEV)
        out["h2d_pinned_gbps"] = size / clock(lambda: dst.copy_(pinned, non_blocking=True), 1, 5) / 1e9
        out["h2d_pageable_gbps"] = size / clock(lambda: dst.copy_(pageable), 1, 3) / 1e9
        out["device_name"] = torch.cuda.get_device_name(DEV)
        out["device_memory_gib"] = torch.cuda.get_device_properties(DEV).total_memory / 2**30
    R["probes"] = out
    return out


# ------------------------------------------------------------------------------------------------------
@section
def kernel_checks() -> dict:
    """Triton kernels against the references (on the same device), and the bandwidth they reach."""
    from moeflash.kernels import reference
    from moeflash.weights.quant import quant_fp4, quant_fp8

    g = torch.Generator().manual_seed(0)
    probe_t = torch.empty(0, device=DEV)
    out = {"path": "triton" if kernels.gpu_kernels(probe_t) is not None else "native" if kernels.native(probe_t) else "reference"}
    d, inter, e, k = (256, 128, 16, 6) if ARGS.quick else (4096, 2048, 64, 6)
    # FP8: V4-Flash's wq_b shape (1024 -> 32768 is too big for a GEMV probe; 4096 x 4096 is typical)
    w = torch.randn(4096 if not ARGS.quick else 512, d, generator=g) * 0.02
    q, s = quant_fp8(w)
    q, s = q.view(torch.uint8).to(DEV), s.to(DEV)
    for rows in (1, 16, 64):
        x = torch.randn(rows, d, generator=g).to(DEV)
        for dt in (torch.float32, torch.bfloat16):
            got = kernels.fp8_linear(x.to(dt), q, s)
            want = reference.fp8_linear(x.to(dt).float(), q, s)
            out[f"fp8_rel_err_{rows}_{str(dt)[6:]}"] = float((got - want).abs().max() / want.abs().max())
        t = clock(lambda: kernels.fp8_linear(x.to(torch.bfloat16), q, s))
        out[f"fp8_gbps_rows{rows}"] = (q.numel() + s.numel() * 4) / t / 1e9
    # FP4 experts at V4-Flash's expert shape (64 of them: the kernels read only the routed ones)
    def fp4_stack(rows: int, cols: int):
        qs, ss = [], []
        for _ in range(e):  # one expert at a time, on the device: bounded scratch memory
            qi, si = quant_fp4(torch.randn(rows, cols, device=DEV) * 0.02)
            qs.append(qi.view(torch.uint8))
            ss.append(si.view(torch.uint8))
        return torch.stack(qs), torch.stack(ss)
    q13, s13 = fp4_stack(2 * inter, d)
    q2, s2 = fp4_stack(d, inter)
    per_expert = (q13[0].numel() + s13[0].numel() + q2[0].numel() + s2[0].numel())
    for tokens in (1, 16, 64):
        x = torch.randn(tokens, d, generator=g).to(DEV)
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)]).to(DEV)
        wts = torch.rand(tokens, k, generator=g).to(DEV)
        got = kernels.moe_fp4(x, idx, wts, q13, s13, q2, s2, 10.0)
        want = reference.moe_fp4(x, idx, wts, q13, s13, q2, s2, 10.0)
        out[f"fp4_moe_rel_err_{tokens}"] = float((got - want).abs().max() / want.abs().max())
        t = clock(lambda: kernels.moe_fp4(x, idx, wts, q13, s13, q2, s2, 10.0))
        distinct = int(idx.unique().numel())
        out[f"fp4_moe_ms_{tokens}"] = 1e3 * t
        # bytes read: every (token, expert) pair reads its expert once (no sharing across a batch)
        out[f"fp4_moe_gbps_pairs_{tokens}"] = tokens * k * per_expert / t / 1e9
        out[f"fp4_moe_gbps_distinct_{tokens}"] = distinct * per_expert / t / 1e9
    if "probes" in R:
        out["fp8_frac_hbm_rows1"] = out["fp8_gbps_rows1"] / R["probes"]["hbm_read_gbps"]
        out["fp4_moe_frac_hbm_1"] = out["fp4_moe_gbps_pairs_1"] / R["probes"]["hbm_read_gbps"]
    return out


# ------------------------------------------------------------------------------------------------------
def _logits_run(model, prompt: list[int], steps: int, graphs: bool):
    """Prefill, then `steps` greedy decode steps (through a GraphDecoder when graphs): (tokens, logits)."""
    from moeflash.engine.graphs import GraphDecoder

    dev = model.embed.weight.device
    dec = GraphDecoder(model, 1, len(prompt) + steps + 8) if graphs else None
    st = model.new_seq_state()
    with torch.inference_mode():
        x = run_tokens(model, torch.tensor(prompt, device=dev), [st], [len(prompt)])
        rows, toks = [], []
        for _ in range(steps):
            lg = model.logits(x[-1:]).float()
            rows.append(lg[0].cpu())
            t = int(lg.argmax(-1))
            toks.append(t)
            ids = torch.tensor([t], device=dev)
            if dec is not None:
                x = dec.decode([st], ids)
                advance([st], [1])
            else:
                x = run_tokens(model, ids, [st], [1])
    return toks, torch.stack(rows)


@section
def parity() -> dict:
    from moeflash.weights.build import build_tiny

    official = convert("tiny", ["--official"])
    prompt = [256] + list(range(60, 100))
    out = {}
    for name, make in (("tiny", lambda dt, dev: move_model(build_tiny(dt), dev)),
                       ("official", lambda dt, dev: load(official, dt, dev))):
        steps = 6 if ARGS.quick else 12
        ref_toks, ref = _logits_run(make("float32", "cpu"), prompt, steps, False)
        for dt, tol in (("float32", 1e-3), ("bfloat16", 0.25)):
            for graphs in (False, True):
                toks, lg = _logits_run(make(dt, DEV), prompt, steps, graphs)
                # teacher-forced comparison would need the same tokens: compare while the tokens agree
                agree = next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), len(toks))
                diff = float((lg[:max(agree, 1)] - ref[:max(agree, 1)]).abs().max())
                key = f"{name}_{dt}_{'graph' if graphs else 'eager'}"
                out[key] = {"max_abs_dlogit": diff, "tokens_equal": toks == ref_toks, "agree_steps": agree,
                            "ok": diff < tol and (toks == ref_toks or dt == "bfloat16")}
    out["all_ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


@section
def tiers() -> dict:
    official = convert("tiny", ["--official"])
    prompt = [256] + list(range(40, 70))
    steps = 8 if ARGS.quick else 16
    want, _ = _logits_run(load(official, "float32"), prompt, steps, False)
    probe = load(official, "float32", "cpu", expert_memory=1.0)
    eb = probe.expert_store.expert_bytes
    probe.expert_store.close()
    out = {"expert_bytes": eb}
    for prefetch in (False, True):
        model = load(official, "float32", expert_memory=12 * eb / 2**30, device_expert_memory=5 * eb / 2**30,
                     prefetch=prefetch)
        try:
            got, _ = _logits_run(model, prompt, steps, False)
            st = model.expert_store.stats()
        finally:
            model.expert_store.close()
        dev = st["device"]
        out["prefetch" if prefetch else "demand"] = {
            "tokens_equal": got == want, "device": {k: dev[k] for k in ("capacity_experts", "hits", "misses",
                                                                         "evictions", "prefetch_loads", "hit_rate")},
            "host": {k: st[k] for k in ("capacity_experts", "hits", "misses", "evictions", "hit_rate")}}
    out["all_ok"] = out["demand"]["tokens_equal"] and out["prefetch"]["tokens_equal"]
    return out


# ------------------------------------------------------------------------------------------------------
def _decode_model(model, batches: list[int], prompt_len: int, steps: int, compile: bool = False) -> dict:
    """Step time of `steps` decode steps at each batch (graphs; eager too at batch 1), bytes per step.
    `compile`: graphs of the torch.compile'd static step only."""
    from moeflash.engine.graphs import GraphDecoder

    vocab = model.config.vocab_size
    res = {}
    hbm = R.get("probes", {}).get("hbm_read_gbps")
    for b in batches:
        for graphs in ((False, True) if b == 1 and not compile else (True,)):
            g = torch.Generator().manual_seed(b)
            states = [model.new_seq_state() for _ in range(b)]
            with torch.inference_mode():
                for st in states:  # prefill each alone
                    ids = torch.randint(0, vocab, (prompt_len,), generator=g).to(DEV)
                    run_tokens(model, ids, [st], [prompt_len])
                dec = GraphDecoder(model, b, prompt_len + steps + 16, compile=compile) if graphs else None
                toks = torch.randint(0, vocab, (b,), generator=g).to(DEV)

                def step():
                    x = dec.decode(states, toks) if dec is not None else model.forward_tokens(toks, states, [1] * b)
                    advance(states, [1] * b)
                    return x
                t = clock(step, warmup=3, iters=steps)
                moved = bytes_per_token(model, states)
            key = f"batch{b}_{'compiled_graph' if compile else 'graph' if graphs else 'eager'}"
            res[key] = {"step_ms": 1e3 * t, "tok_s": b / t, "bytes_per_step": moved["total"],
                        "dense_bytes": moved["dense"], "expert_bytes": moved["experts"], "state_bytes": moved["state"],
                        "gbps": moved["total"] / t / 1e9,
                        "frac_hbm": moved["total"] / t / 1e9 / hbm if hbm else None}
            del dec, states
    return res


def _models() -> list[tuple[str, str]]:
    if ARGS.quick:
        return [("tiny-official", convert("tiny", ["--official"]))]
    out = [("mini-official", convert("mini", ["--official"]))]
    if not ARGS.skip_real:
        out.append(("flash-2layer-official", convert("v4-flash", ["--layers", "3:5", "--official"])))
    return out


@section
def decode() -> dict:
    out = {}
    batches = [1, 4] if ARGS.quick else [1, 16, 64]
    for name, path in _models():
        model = load(path, "auto")
        pb = param_bytes(model)
        out[name] = {"dtype": str(model.embed.weight.dtype), "dense_weight_bytes": pb["dense"],
                     "expert_bytes": pb["per_expert"],
                     **_decode_model(model, batches, 64, 8 if ARGS.quick else 30)}
        del model
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    return out


@section
def prefill() -> dict:
    out = {}
    n = 256 if ARGS.quick else 2048
    gemm = R.get("probes", {}).get("bf16_gemm_tflops")
    for name, path in _models():
        model = load(path, "auto")
        ids = torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).to(DEV)

        def run():
            with torch.inference_mode():
                st = model.new_seq_state()
                for a in range(0, n, 512):  # 512-token chunks, as the engine schedules them
                    run_tokens(model, ids[a:a + 512], [st], [min(512, n - a)])
        t = clock(run, warmup=1, iters=3)
        flops = activated_flops_per_token(model.config, head=False) * n  # no logits in this loop
        att = attention_flops(model.config, 0, n)
        total = flops + att["attention"] + att["indexer"]
        out[name] = {"tokens": n, "seconds": t, "tok_s": n / t, "tflops": total / t / 1e12,
                     "frac_gemm": total / t / 1e12 / gemm if gemm else None}
        del model
    return out


@section
def planner() -> dict:
    """Per-layer time of a real-size V4-Flash layer (batch 1 and 16, graphs), the head's time, the copy speed."""
    if ARGS.quick:
        path = convert("tiny", ["--official"])
    elif ARGS.skip_real:
        raise RuntimeError("needs the real-size layers (run without --skip-real)")
    else:
        path = convert("v4-flash", ["--layers", "3:5", "--official"])
    model = load(path, "auto")
    c = model.config
    with torch.inference_mode():
        x = torch.randn(1, c.hc_mult, c.hidden_size, device=DEV, dtype=model.embed.weight.dtype)
        head_ms = 1e3 * clock(lambda: model.logits(x).argmax(-1), 3, 20)
    dec = _decode_model(model, [1, 16], 64, 20)
    pb = param_bytes(model)
    layers = c.num_hidden_layers
    out = {"model": Path(path).name, "layers": layers, "head_ms": head_ms,
           "layer_ms": {b: (dec[f"batch{b}_graph"]["step_ms"] - head_ms) / layers for b in (1, 16)},
           "layer_ms_eager_b1": (dec["batch1_eager"]["step_ms"] - head_ms) / layers,
           "expert_bytes": pb["per_expert"], "dense_bytes_per_layer": (pb["dense"] - pb["head"]) / layers,
           "h2d_pinned_gbps": R.get("probes", {}).get("h2d_pinned_gbps"), "decode": dec}
    del model
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    # the same layers with their experts served by the expert store (GPU tier over pinned host RAM), both
    # budgets holding every expert and warmed by a prefill: a step's time with the store's bookkeeping and
    # no copies (what one H200 runs for V4-Flash, minus the misses the planner adds)
    every = layers * c.n_routed_experts * pb["per_expert"] * 1.02 / 2**30
    stored = load(path, "auto", expert_memory=every, device_expert_memory=every)
    try:
        g = torch.Generator().manual_seed(7)
        st = stored.new_seq_state()
        with torch.inference_mode():
            warm = torch.randint(0, c.vocab_size, (256,), generator=g).to(DEV)
            run_tokens(stored, warm, [st], [256])
            tok = torch.randint(0, c.vocab_size, (1,), generator=g).to(DEV)
            before = stored.expert_store.stats()["device"]
            from moeflash.engine.graphs import GraphDecoder

            dec = GraphDecoder(stored, 1, 256 + 128)  # piecewise: graphs between the routed experts

            def eager():
                run_tokens(stored, tok, [st], [1])

            def piecewise():
                dec.decode([st], tok)
                advance([st], [1])
            t_eager = clock(eager, 2, 10)
            t = clock(piecewise, 3, 20)
        after = stored.expert_store.stats()["device"]
        acc = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
        out["layer_ms_store_b1"] = (1e3 * t - head_ms) / layers
        out["layer_ms_store_eager_b1"] = (1e3 * t_eager - head_ms) / layers
        out["store_hit_rate_while_timed"] = (after["hits"] - before["hits"]) / acc if acc else None
    finally:
        stored.expert_store.close()
    return out


@section
def compiled() -> dict:
    """The static step compiled by torch.compile (Inductor fuses its small elementwise kernels) and then
    recorded: batch 1 on each model, against the uncompiled graph measured in `decode`."""
    out = {}
    for name, path in _models():
        model = load(path, "auto")
        t = time.perf_counter()
        r = _decode_model(model, [1], 64, 8 if ARGS.quick else 30, compile=True)
        out[name] = {**r, "seconds_with_compile": time.perf_counter() - t}
        base = R["sections"].get("decode", {}).get(name, {}).get("batch1_graph")
        if base:
            out[name]["speedup_vs_graph"] = base["step_ms"] / r["batch1_compiled_graph"]["step_ms"]
        del model
    return out


def main() -> int:
    global ARGS, DEV
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--dir", default=os.environ.get("MOEFLASH_GPU_DIR", "/tmp/moeflash-gpu"),
                   help="where the seeded checkpoints are written")
    p.add_argument("--quick", action="store_true", help="tiny shapes only (a dry run of every code path)")
    p.add_argument("--skip-real", action="store_true", help="skip the two real-size V4-Flash layers")
    p.add_argument("--budget-s", type=float, default=420.0, help="sections not started by then are skipped")
    p.add_argument("--only", nargs="*", default=None, help="run only these sections")
    ARGS = p.parse_args()
    DEV = common.DEVICE = resolve_device(ARGS.device)  # common.timed waits on it
    Path(ARGS.dir).mkdir(parents=True, exist_ok=True)
    R["machine"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(DEV),
                    "triton": _version("triton"), "python": sys.version.split()[0], "quick": ARGS.quick}
    save()
    for fn in (probes, kernel_checks, parity, tiers, decode, prefill, planner, compiled):
        fn()
    R["total_seconds"] = round(time.perf_counter() - T0, 1)
    save()
    print(json.dumps({k: R[k] for k in ("errors", "total_seconds")}, indent=1), file=sys.stderr)
    return 0 if not R["errors"] else 1


def _version(name: str):
    try:
        return __import__(name).__version__
    except ImportError:
        return None


DEV = torch.device("cpu")
if __name__ == "__main__":
    sys.exit(main())
