"""Prefill throughput and achieved FLOP/s against a measured matmul peak (DESIGN.md "Performance model").

For each prompt length L, one sequence (`model.new_seq_state()`) is fed a random prompt in chunks of
`--chunk` tokens through `model.forward_tokens`, and the last token's logits are computed (what the
engine does before sampling the first token). Time = wall time of all chunks + logits, after one
untimed warm-up chunk on a throwaway state (on this VM, memory a process touches for the first
time is slow; the warm-up keeps that out of the timing).

FLOPs counted: 2 x activated parameters per token (dense + shared expert + top-k routed experts; the
embedding table excluded), the LM head once (only the last token's logits are computed), plus the attention core 2*2*H*D per key attended per token
(keys = visible window + visible compressed entries: all of them for HCA, at most index_topk for CSA).
The lightning indexer's scoring (2*Hi*Di per indexer key, CSA layers) is reported separately and in
`achieved_GFLOPs_with_indexer`. The fp32 square `matmul_probe` runs in the same process; `fraction_of_matmul`
= achieved / probe (with --dtype bfloat16 a bf16 probe and fraction are reported too).

    python bench/prefill.py --preset mini --lengths 512 4096 --chunk 512
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import common
from common import (activated_flops_per_token, add_common_args, apply_common_args, attention_flops, head_flops, log,
                    machine_info, make_or_load, matmul_probe, print_json, random_tokens, rounded)
from moeflash.engine.forward import run_tokens


@torch.inference_mode()
def prefill(model, length: int, chunk: int, seed: int) -> dict:
    tokens = random_tokens(model.config.vocab_size, length, seed)
    st = model.new_seq_state()
    chunk_s = []
    t_all = time.perf_counter()
    x = None
    for a in range(0, length, chunk):
        t0 = time.perf_counter()
        b = min(a + chunk, length)
        x = run_tokens(model, tokens[a:b], [st], [b - a])
        common.sync()
        chunk_s.append(time.perf_counter() - t0)
    model.logits(x[-1:]).argmax(-1)
    common.sync()
    total = time.perf_counter() - t_all
    return {"seconds": total, "chunk_seconds": chunk_s, "state_used_bytes": st.used_bytes()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)

    model = make_or_load(args.preset, args.dtype)
    cfg = model.config
    log("[prefill] matmul probe (fp32, n=2048) ...")
    peak = matmul_probe(2048, torch.float32)
    peak_dtype = peak if args.dtype == "float32" else matmul_probe(2048, args.dtype)
    log(f"[prefill] matmul fp32 {peak:.1f} GFLOP/s; {args.dtype} {peak_dtype:.1f} GFLOP/s")
    with torch.inference_mode():  # warm-up: one chunk on a throwaway state (first-touch memory costs)
        n = min(args.chunk, max(args.lengths))
        run_tokens(model, random_tokens(cfg.vocab_size, n, 99), [model.new_seq_state()], [n])
    per_tok = activated_flops_per_token(cfg, head=False)
    rows = []
    for L in args.lengths:
        log(f"[prefill] length {L} in chunks of {args.chunk} ...")
        r = prefill(model, L, args.chunk, args.seed)
        att = attention_flops(cfg, 0, L)
        flops = per_tok * L + head_flops(cfg) + att["attention"]
        r.update({
            "length": L, "chunk": args.chunk,
            "tokens_per_s": L / r["seconds"],
            "flops": {"weights": per_tok * L, "attention": att["attention"], "indexer": att["indexer"],
                      "total": flops},
            "achieved_GFLOPs": flops / r["seconds"] / 1e9,
            "achieved_GFLOPs_with_indexer": (flops + att["indexer"]) / r["seconds"] / 1e9,
        })
        r["fraction_of_matmul"] = r["achieved_GFLOPs"] / peak
        if args.dtype != "float32":
            r[f"fraction_of_{args.dtype}_matmul"] = r["achieved_GFLOPs"] / peak_dtype
        r["chunk_tokens_per_s"] = [min(args.chunk, L - i * args.chunk) / s
                                   for i, s in enumerate(r.pop("chunk_seconds"))]
        log(f"[prefill]   {r['seconds']:.2f}s, {r['tokens_per_s']:.0f} tok/s, "
            f"{r['achieved_GFLOPs']:.1f} GFLOP/s ({100 * r['fraction_of_matmul']:.0f}% of fp32 matmul)")
        rows.append(r)
        gc.collect()
    probes = {"matmul_probe_fp32_GFLOPs": peak}
    if args.dtype != "float32":
        probes[f"matmul_probe_{args.dtype}_GFLOPs"] = peak_dtype
    print_json(rounded({
        "bench": "prefill", "preset": args.preset, "dtype": args.dtype, **probes,
        "flops_per_token_weights": per_tok, "rows": rows, "machine": machine_info(),
    }))


if __name__ == "__main__":
    main()
