"""Batched decode throughput and achieved bandwidth (DESIGN.md "Performance model").

For each batch size B: B sequences get prompts of `--prompt` random tokens (fixed seed) and are
prefilled in one `run_tokens(model, tokens, states, lengths)` call (states from
`model.new_seq_state()`); then `--warmup` + `--tokens` decode steps run, each exactly what the
engine's step does: ONE `forward_tokens` call with one token for each of the B sequences, then
`model.logits(streams)` and argmax. Only the `--tokens` steps after the warm-up are timed.

Per batch it reports ms/step, aggregate and per-sequence tokens/s, the distinct routed experts read
per step per layer (mean, from `MoE.last_experts`), the bytes a step reads (dense weights incl. the LM
head + one embedding row per token; distinct experts x expert bytes; state read: window ring, HCA
entries, CSA top-k entries + all indexer keys; see common.bytes_per_token) in total and per token,
the achieved bandwidth (bytes per step / step time) and its fraction of `torch.sum`'s read
bandwidth measured in the same process.

Then the same decode through `LLMEngine` (greedy, ignore_eos, max_tokens = warmup + tokens) at the
`--engine-batch` sizes: steps after the first (which prefills every prompt) are decode steps; their
mean time against the raw loop's shows the engine's own per-step overhead.

    python bench/decode.py --preset mini --batch 1 4 16 --tokens 32 --dtype float32
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import common
from common import (add_common_args, apply_common_args, bytes_per_token, log, machine_info,
                    make_or_load, param_bytes, print_json, random_tokens, read_bandwidth_probe,
                    rounded)
from moeflash.engine.forward import run_tokens


def prompts_for(vocab: int, batch: int, length: int, seed: int) -> list[torch.Tensor]:
    return [random_tokens(vocab, length, seed * 1000 + i) for i in range(batch)]


@torch.inference_mode()
def warm_up(model) -> None:
    """One short untimed prefill + decode so first-call costs (allocator, kernels) are not measured."""
    st = [model.new_seq_state()]
    x = run_tokens(model, random_tokens(model.config.vocab_size, 16, 123), st, [16])
    for _ in range(2):
        x = run_tokens(model, model.logits(x[-1:]).argmax(-1), st, [1])


@torch.inference_mode()
def raw_decode(model, batch: int, prompt_len: int, tokens: int, warmup: int, seed: int) -> dict:
    cfg = model.config
    prompts = prompts_for(cfg.vocab_size, batch, prompt_len, seed)
    states = [model.new_seq_state() for _ in range(batch)]
    t0 = time.perf_counter()
    x = run_tokens(model, torch.cat(prompts), states, [prompt_len] * batch)
    last = torch.arange(1, batch + 1, device=x.device) * prompt_len - 1
    nxt = model.logits(x[last]).argmax(-1)
    common.sync()
    prefill_s = time.perf_counter() - t0
    step_s, reads = [], []
    ones = [1] * batch
    for i in range(warmup + tokens):
        common.sync()
        t0 = time.perf_counter()
        x = run_tokens(model, nxt, states, ones)
        nxt = model.logits(x).argmax(-1)
        common.sync()
        dt = time.perf_counter() - t0
        if i >= warmup:
            step_s.append(dt)
            reads.append(bytes_per_token(model, states))
    total_s = sum(step_s)
    ms = sorted(step_s)
    mean_bytes = {k: sum(r[k] for r in reads) / len(reads) for k in ("dense", "experts", "state", "total")}
    per_layer = [sum(r["distinct_experts_per_layer"][j] for r in reads) / len(reads)
                 for j in range(len(model.layers))]
    return {
        "batch": batch,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "ms_per_step_mean": 1e3 * total_s / len(step_s),
        "ms_per_step_median": 1e3 * ms[len(ms) // 2],
        "ms_per_step_best": 1e3 * ms[0],
        "tokens_per_s": batch * len(step_s) / total_s,
        "tokens_per_s_per_seq": len(step_s) / total_s,
        "distinct_experts_per_step_per_layer_mean": sum(per_layer) / len(per_layer),
        "distinct_experts_per_layer": per_layer,
        "bytes_per_step": mean_bytes,
        "bytes_per_token": mean_bytes["total"] / batch,
        "achieved_GBps": sum(r["total"] for r in reads) / total_s / 1e9,
    }


@torch.inference_mode()
def engine_decode(model, batch: int, prompt_len: int, max_tokens: int, seed: int) -> dict:
    from moeflash.engine import LLMEngine, SamplingParams

    cfg = model.config
    prompts = [p.tolist() for p in prompts_for(cfg.vocab_size, batch, prompt_len, seed)]
    eng = LLMEngine(model, max_num_seqs=batch, max_num_batched_tokens=max(512, batch * prompt_len))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        eng.add_request(p, params)
    times = []
    t_all = time.perf_counter()
    while eng.has_unfinished():
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    decode = times[1:]  # step 1 prefills all prompts (and samples each first token)
    return {"batch": batch, "steps": len(times), "prefill_step_s": times[0],
            "decode_steps": len(decode),
            "ms_per_step_mean": 1e3 * sum(decode) / max(len(decode), 1),
            "tokens_per_s": batch * len(decode) / max(sum(decode), 1e-9),
            "generated_tokens": eng.stats["generated_tokens"], "total_s": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--tokens", type=int, default=32, help="timed decode steps per batch size")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps first")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    p.add_argument("--engine-batch", type=int, nargs="*", default=[1, 16],
                   help="batch sizes to run through LLMEngine (none: skip)")
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)

    model = make_or_load(args.preset, args.dtype)
    log("[decode] bandwidth probe ...")
    probe_d = read_bandwidth_probe(1.0, details=True)
    probe = probe_d["median"]
    gc.collect()
    log(f"[decode] read bandwidth {probe:.1f} GB/s")
    warm_up(model)
    rows = []
    for b in args.batch:
        log(f"[decode] raw loop, batch {b}: prefill {args.prompt} x {b}, decode {args.warmup}+{args.tokens}")
        r = raw_decode(model, b, args.prompt, args.tokens, args.warmup, args.seed)
        r["fraction_of_read_bw"] = r["achieved_GBps"] / probe
        log(f"[decode]   {r['ms_per_step_mean']:.1f} ms/step, {r['tokens_per_s']:.1f} tok/s, "
            f"{r['achieved_GBps']:.1f} GB/s ({100 * r['fraction_of_read_bw']:.0f}% of probe)")
        rows.append(r)
        gc.collect()
    raw_by_b = {r["batch"]: r for r in rows}
    eng_rows = []
    for b in args.engine_batch or []:
        log(f"[decode] LLMEngine, batch {b}")
        e = engine_decode(model, b, args.prompt, args.warmup + args.tokens, args.seed)
        if b in raw_by_b:
            e["overhead_vs_raw"] = e["ms_per_step_mean"] / raw_by_b[b]["ms_per_step_mean"]
            e["overhead_ms_per_step"] = e["ms_per_step_mean"] - raw_by_b[b]["ms_per_step_mean"]
        log(f"[decode]   {e['ms_per_step_mean']:.1f} ms/step, {e['tokens_per_s']:.1f} tok/s")
        eng_rows.append(e)
        gc.collect()
    pb = param_bytes(model)
    print_json(rounded({
        "bench": "decode", "preset": args.preset, "dtype": args.dtype, "prompt_tokens": args.prompt,
        "timed_steps": args.tokens, "warmup_steps": args.warmup,
        "read_bw_probe_GBps": probe, "read_bw_probe_runs_GBps": probe_d["runs"],
        "model_bytes": {"dense_incl_head": pb["dense"], "per_expert": pb["per_expert"],
                        "experts_per_token_per_layer": model.config.num_experts_per_tok,
                        "routed_total": pb["routed_total"], "embed_table": pb["embed_table"]},
        "raw": rows, "engine": eng_rows, "machine": machine_info(),
    }))


if __name__ == "__main__":
    main()
