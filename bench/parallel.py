"""Expert parallelism on this machine: 2 ranks x 1 thread against 1 rank x 2 threads.

Each configuration loads the model (fp32), then decodes `--tokens` greedy tokens after a prompt of
`--prompt` tokens, `--rounds` times (median). With 2 ranks (gloo, one process each), every MoE layer's
experts are split between them and their partial sums all-reduced; the time spent inside the
all-reduces is measured per token, beside its count and bytes.

    python bench/parallel.py --models mini flash-shaped
"""

from __future__ import annotations

import argparse
import socket

import torch
import torch.multiprocessing as mp

from common import add_common_args, apply_common_args, log, machine_info, make_or_load, print_json, rounded

from moeflash.evaluate.compare import measure_speed  # noqa: E402


def decode(model, prompt: int, tokens: int, rounds: int) -> dict:
    """Median prefill and decode tokens/s at batch 1 (`moeflash compare`'s measurement)."""
    r = measure_speed(model, prompt, tokens, rounds, seed=0)
    return {"prefill_tok_s": r["prefill_tokens_per_s"], "decode_tok_s": r["decode_tokens_per_s"],
            "decode_spread": r["decode_spread"]}


def rank_main(rank, world, port, name, prompt, tokens, rounds, results):
    torch.set_num_threads(1)
    from moeflash.engine.parallel import ExpertParallel, shard_experts_

    ep = ExpertParallel(rank, world, init_method=f"tcp://127.0.0.1:{port}", timeout_s=600)
    try:
        model = make_or_load(name, "float32")
        shard_experts_(model, rank, world, ep.all_reduce)
        ep.dist.barrier()
        ep.reduce_seconds, ep.reduces, ep.reduce_bytes = 0.0, 0, 0
        r = decode(model, prompt, tokens, rounds)
        steps = (rounds + 1) * (tokens + 1)  # every timed and warm-up forward call
        r["allreduce_ms_per_step"] = 1e3 * ep.reduce_seconds / steps
        r["allreduces_per_step"] = ep.reduces / steps
        r["allreduce_bytes_per_step"] = ep.reduce_bytes / steps
        results[rank] = r
    finally:
        ep.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mini", "flash-shaped"])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    out = []
    for name in args.models:
        torch.set_num_threads(2)
        one = decode(make_or_load(name, "float32"), args.prompt, args.tokens, args.rounds)
        log(f"{name}: 1 rank x 2 threads: {one}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        results = mp.Manager().dict()
        mp.spawn(rank_main, args=(2, port, name, args.prompt, args.tokens, args.rounds, results), nprocs=2, join=True)
        two = dict(results[0])
        log(f"{name}: 2 ranks x 1 thread: {two}")
        out.append({"model": name, "one_rank_two_threads": one, "two_ranks_one_thread": two,
                    "decode_ratio": two["decode_tok_s"] / one["decode_tok_s"],
                    "prefill_ratio": two["prefill_tok_s"] / one["prefill_tok_s"]})
    print_json(rounded({"results": out, "machine": machine_info()}))


if __name__ == "__main__":
    main()
