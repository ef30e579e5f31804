"""Which collective pays for expert parallelism here: all-reduce (moeflash's layout: every rank runs
every token through the replicated dense part, then sums the MoE layer's partial outputs) against
all-to-all dispatch (a layout where each rank runs its own tokens through the dense part and sends each
token to the ranks that own its experts, then gets the results back: two all-to-alls per MoE layer).

For a batch of B tokens of hidden size d across N ranks (gloo, this machine), one MoE layer's
communication: all-reduce of a [B, d] buffer, against two all_to_all_single calls moving each rank's
B / N tokens x top-k expert copies (the (N-1)/N of them that leave the rank). Median of `--rounds`.

    python bench/collectives.py --hidden 4096 --top-k 6
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import machine_info, print_json, rounded


def rank_main(rank, world, port, hidden, top_k, batches, rounds, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = {}
    for b in batches:
        x = torch.randn(b, hidden)
        local = max(1, b // world) * top_k  # this rank's (token, expert) pairs
        send = torch.randn(local - local % world or world, hidden)  # split evenly over the ranks
        recv = torch.empty_like(send)
        ar, a2a = [], []
        for r in range(rounds + 2):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            t1 = time.perf_counter()
            dist.all_to_all_single(recv, send)  # dispatch
            dist.all_to_all_single(send, recv)  # combine
            t2 = time.perf_counter()
            if r >= 2:
                ar.append(t1 - t0)
                a2a.append(t2 - t1)
        out[b] = {"allreduce_ms": 1e3 * statistics.median(ar), "all_to_all_ms": 1e3 * statistics.median(a2a),
                  "allreduce_bytes": x.numel() * 4, "all_to_all_bytes": 2 * send.numel() * 4}
    if rank == 0:
        results.update(out)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(args.world, port, args.hidden, args.top_k, args.batches, args.rounds, results),
             nprocs=args.world, join=True)
    rows = [{"batch": b, **results[b], "all_to_all_vs_allreduce": results[b]["all_to_all_ms"] / results[b]["allreduce_ms"]}
            for b in args.batches]
    print_json(rounded({"hidden": args.hidden, "top_k": args.top_k, "world": args.world, "results": rows,
                        "machine": machine_info()}))


if __name__ == "__main__":
    main()
