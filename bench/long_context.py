"""Long-context decode: speed and exact state size as one sequence grows (V4-SPEC §4).

One sequence is prefilled in chunks of `--chunk` tokens through `model.forward_tokens` and extended
context by context: to 4K, measure, continue to 32K, measure, to 128K, measure (each measurement
point is reached by feeding more prompt chunks; the decoded tokens of an earlier point stay in the
sequence, so the position there is context + decoded so far). At each point: `--decode` greedy decode
steps (forward_tokens + logits + argmax, the first one untimed as a warm-up) give decode tokens/s and
the bytes a decode step reads (weights + distinct experts + state read, common.bytes_per_token);
then the live state `seq_state.used_bytes()` is compared with the formula
`moeflash.model.state.state_bytes(config, tokens, element_size)` (`state_matches_formula`).
Prefill time and tokens/s for each segment are printed too. Progress goes to stderr.

`--state-dtype bf16` holds the records (window ring, entries, indexer keys) in bf16 under fp32 compute
(engine/load.load_model). At each context, `indexer_topk_ms` times the indexer's selection over that
many CSA entries (ctx / 4) both ways: a stable sort of every score (before) and the keyed O(T) top-k
(model/compressor.top_entries), on ReLU'd random scores with k = the model's index_topk.
`--compare-records` decodes from copies of the state with fp32 and with bf16 records in interleaved rounds
(the speed ratio of `--state-dtype bf16`, measured in one run); `--compare-indexer` the same for the
indexer's native scores against the plain-torch einsum path.

    python bench/long_context.py --preset mini --contexts 4096 32768 131072 --chunk 2048
    python bench/long_context.py --preset mini --official --numerics fast --state-dtype bf16 --contexts 4096 32768
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from common import (add_common_args, apply_common_args, bytes_per_token, log, machine_info, make_or_load,
                    official_files, print_json, random_tokens, read_bandwidth_probe, rounded, state_element_size)
from moeflash.engine.forward import run_tokens


def topk_timing(entries: int, k: int, iters: int = 9) -> dict:
    """ms for the indexer's selection of k of `entries` scores: the full stable sort vs top_entries."""
    import statistics

    from moeflash.model.compressor import SORT_MAX_ENTRIES, top_entries

    if entries <= k:
        return {}
    scores = torch.randn(1, entries, generator=torch.Generator().manual_seed(entries)).relu_()
    out = {}
    for name, fn in (("sort", lambda: torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]),
                     ("keyed", lambda: top_entries(scores, k))):
        fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = 1e3 * statistics.median(times)
    out["used"] = "sort" if entries <= SORT_MAX_ENTRIES else "keyed"
    return out


def records_as(st, dtype):
    """A copy of a V4 sequence state with its records (window ring, entries) cast to `dtype`: the layout a
    `--state-dtype` run holds at the same position (the values differ by that rounding only)."""
    out = st.clone()
    for layer in out.layers:
        layer.window = layer.window.to(dtype)
        for part in layer.parts():
            part.entries = part.entries.to(dtype)
    return out


def interleaved(model, states: dict, nxt, setup=None, rounds: int = 5, tokens: int = 4) -> dict:
    """Decode ms/token from each named state (copies of one position), in interleaved rounds; `setup(name)`
    runs before each variant's turn. This VM's speed drifts between runs: only a ratio measured in one run
    means anything. Returns each variant's median ms and its [min, max]."""
    import statistics

    times = {k: [] for k in states}
    for _ in range(rounds):
        for name, s in states.items():
            if setup is not None:
                setup(name)
            tok = nxt
            t0 = time.perf_counter()
            for _ in range(tokens):
                tok = model.logits(run_tokens(model, tok, [s], [1])).argmax(-1)
            times[name].append(1e3 * (time.perf_counter() - t0) / tokens)
    out = {f"{k}_ms": statistics.median(v) for k, v in times.items()}
    out["spread_ms"] = {k: [min(v), max(v)] for k, v in times.items()}
    return out


def interleaved_records(model, st, nxt) -> dict:
    """fp32 against bf16 records (the speed ratio of `--state-dtype bf16`)."""
    r = interleaved(model, {"fp32": records_as(st, torch.float32), "bf16": records_as(st, torch.bfloat16)}, nxt)
    return {**r, "fp32_over_bf16": r["fp32_ms"] / r["bf16_ms"]}


def interleaved_indexer(model, st, nxt) -> dict:
    """The indexer's scores from the native kernel against the plain-torch einsum path."""
    from moeflash.kernels import reference
    from moeflash.model import compressor

    native = compressor.indexer_scores
    paths = {"native": native, "einsum": reference.indexer_scores}
    try:
        r = interleaved(model, {k: st.clone() for k in paths}, nxt,
                        setup=lambda name: setattr(compressor, "indexer_scores", paths[name]))
    finally:
        compressor.indexer_scores = native
    return {**r, "einsum_over_native": r["einsum_ms"] / r["native_ms"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--decode", type=int, default=16, help="timed decode tokens at each context")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--official", action="store_true",
                   help="the preset in DeepSeek's official format (FP8 dense, FP4 experts; common.official_files), "
                        "loaded at storage precision in --numerics")
    p.add_argument("--numerics", choices=["exact", "reference", "fast"], default="exact")
    p.add_argument("--compare-records", action="store_true",
                   help="at each context also decode from copies of the state with fp32 and bf16 records, in "
                        "interleaved rounds (records_ms)")
    p.add_argument("--compare-indexer", action="store_true",
                   help="at each context also decode with the indexer's native scores and with the einsum path, "
                        "in interleaved rounds (indexer_ms)")
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    from moeflash.model.state import state_bytes_per_token

    from moeflash.engine.load import STATE_DTYPES, load_model

    if args.official:
        model, _ = load_model(official_files(args.preset)[0], dtype=args.dtype, numerics=args.numerics)
    else:
        model = make_or_load(args.preset, args.dtype)

    model.state_dtype = STATE_DTYPES[args.state_dtype]
    cfg = model.config
    if max(args.contexts) + args.decode * len(args.contexts) + 1 > cfg.max_position_embeddings:
        raise SystemExit(f"error: contexts exceed the model's max_position_embeddings {cfg.max_position_embeddings}")
    probe_d = read_bandwidth_probe(1.0, details=True)
    probe = probe_d["median"]
    gc.collect()
    log(f"[long] read bandwidth {probe:.1f} GB/s")
    with torch.inference_mode():  # warm-up: one chunk on a throwaway state (first-touch memory costs)
        n = min(args.chunk, max(args.contexts))
        run_tokens(model, random_tokens(cfg.vocab_size, n, args.seed + 7), [model.new_seq_state()], [n])
    gc.collect()
    st = model.new_seq_state()
    esize = state_element_size(st)
    prompt = random_tokens(cfg.vocab_size, max(args.contexts), args.seed)
    fed = 0  # prompt tokens consumed so far
    rows = []
    nxt = None
    with torch.inference_mode():
        for ctx in sorted(args.contexts):
            t0 = time.perf_counter()
            start_pos = st.pos
            x = None
            while fed < ctx:
                b = min(fed + args.chunk, ctx)
                x = run_tokens(model, prompt[fed:b], [st], [b - fed])
                fed = b
                if fed % (8 * args.chunk) == 0 or fed == ctx:
                    el = time.perf_counter() - t0
                    log(f"[long]   prefill {fed}/{ctx} tokens ({(st.pos - start_pos) / el:.0f} tok/s, {el:.0f}s)")
            nxt = model.logits(x[-1:]).argmax(-1)
            prefill_s = time.perf_counter() - t0
            prefilled = st.pos - start_pos
            times, reads = [], []
            for i in range(args.decode + 1):
                t1 = time.perf_counter()
                x = run_tokens(model, nxt, [st], [1])
                nxt = model.logits(x).argmax(-1)
                dt = time.perf_counter() - t1
                if i:  # the first step is a warm-up
                    times.append(dt)
                    reads.append(bytes_per_token(model, [st]))
            dec_s = sum(times)
            used = st.used_bytes()
            formula = model.state_bytes(st.pos)
            mean = {k: sum(r[k] for r in reads) / len(reads) for k in ("dense", "experts", "state", "total")}
            row = {
                "context": ctx, "position": st.pos,
                "prefill_tokens": prefilled, "prefill_s": prefill_s,
                "prefill_tokens_per_s": prefilled / prefill_s,
                "decode_tokens_per_s": len(times) / dec_s, "decode_ms_per_token": 1e3 * dec_s / len(times),
                "bytes_per_decode_token": mean,
                "achieved_GBps": sum(r["total"] for r in reads) / dec_s / 1e9,
                "state_used_bytes": used, "state_formula_bytes": formula,
                "state_matches_formula": used == formula,
                "state_allocated_bytes": st.allocated_bytes(),
                "indexer_topk_ms": topk_timing(ctx // 4, cfg.index_topk),
            }
            if args.compare_records:
                row["records_ms"] = interleaved_records(model, st, nxt)
            if args.compare_indexer:
                row["indexer_ms"] = interleaved_indexer(model, st, nxt)
            row["fraction_of_read_bw"] = row["achieved_GBps"] / probe
            log(f"[long] ctx {ctx}: prefill {prefilled} tok in {prefill_s:.1f}s; decode "
                f"{row['decode_tokens_per_s']:.2f} tok/s; state {used} B (formula {formula}, "
                f"{'equal' if used == formula else 'DIFFERENT'})")
            rows.append(row)
            gc.collect()
    print_json(rounded({
        "bench": "long_context", "preset": args.preset, "dtype": args.dtype, "chunk": args.chunk,
        "official": args.official, "numerics": args.numerics,
        "decode_tokens": args.decode, "state_element_size": esize, "state_dtype": args.state_dtype,
        "state_bytes_per_token_asymptotic": state_bytes_per_token(cfg, esize),
        "read_bw_probe_GBps": probe, "read_bw_probe_runs_GBps": probe_d["runs"], "rows": rows,
        "all_states_match_formula": all(r["state_matches_formula"] for r in rows),
        "machine": machine_info(),
    }, 6))


if __name__ == "__main__":
    main()
