"""The storage-precision kernels against torch's products, and where a V4 decode step spends its time.

Part 1 (`--size 4096`): N x N weights, products with 1, 4 and 16 input rows: kernels.fp8_linear,
fp4_linear (exact and `fast` numerics) and bf16_linear against torch's fp32 (input-major) and bf16 `mm`, in
interleaved rounds, with the read-bandwidth probe measured in the same process. Each call reads the next of
several copies of its weight, together larger than the last-level cache (`--working-set`, default 4x it),
so the weights come from memory. GB/s are counted at each format's storage bytes.

Part 2 (`--model DIR`, e.g. a checkpoint from `moeflash convert --preset mini --official`): batch-1
greedy decode timed per part of the step (attention, MoE with its shared expert and router, mHC
weights, logits), with timing hooks around those modules.

    python bench/kernels.py --threads 2 [--size 4096] [--rounds 5] [--model /tmp/moeflash-bench/mini-official]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from common import (add_common_args, apply_common_args, machine_info, print_json, read_bandwidth_probe,
                    rounded, timed)

from moeflash import kernels as K
from moeflash.weights.quant import quant_fp4, quant_fp8
from moeflash.engine.forward import run_tokens


def median_time(fn, iters: int = 30) -> float:
    return timed(fn, warmup=3, iters=iters)["median"]


def llc_bytes() -> int:
    """The last-level cache's size (sysfs), or 32 MiB when unknown."""
    import glob

    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
            best = max(best, int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1))
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def products(n: int, rounds: int, working_set: int) -> dict:
    """One call = one product against the next of several N x N weights of each format, so that the weights
    a format cycles through total more than `working_set` bytes (by default 4x the last-level cache):
    every call reads its weight from memory, as a model's layers do, not from cache."""
    w = torch.randn(n, n) * 0.05
    q8, s8 = quant_fp8(w)
    s8 = s8.float() if s8.dtype.is_floating_point else K.reference.e8m0_to_float(s8)
    q4, s4 = quant_fp4(w)
    wf = w.t().contiguous().t()  # input-major: the fp32 layout moeflash uses
    wb = w.bfloat16()
    nbytes = {"fp8": n * n + 4 * (n // 128) ** 2, "fp4": n * n // 2 + n * n // 32, "fp4_fast": n * n // 2 + n * n // 32,
              "bf16_kernel": 2 * n * n, "fp32_mm": 4 * n * n, "bf16_mm": 2 * n * n}
    copies = {k: max(2, -(-working_set // b)) for k, b in nbytes.items()}
    pools = {"fp8": [(q8.clone(), s8) for _ in range(copies["fp8"])],
             "fp4": [(q4.clone(), s4.clone()) for _ in range(copies["fp4"])],
             "bf16": [wb.clone() for _ in range(copies["bf16_kernel"])],
             "fp32": [wf.t().contiguous().t() for _ in range(copies["fp32_mm"])]}
    turn = collections.Counter()

    def next_of(pool: str):
        turn[pool] += 1
        return pools[pool][turn[pool] % len(pools[pool])]

    samples: dict = collections.defaultdict(list)
    for _ in range(rounds):
        for m in (1, 4, 16):
            x = torch.randn(m, n)
            xb = x.bfloat16()
            fns = {"fp8": lambda: K.fp8_linear(x, *next_of("fp8")),
                   "fp4": lambda: K.fp4_linear(x, *next_of("fp4")),
                   "fp4_fast": lambda: K.fp4_linear(x, *next_of("fp4"), numerics=K.FAST),
                   "bf16_kernel": lambda: K.bf16_linear(x, next_of("bf16")),
                   "fp32_mm": lambda: x @ next_of("fp32").t(),
                   "bf16_mm": lambda: xb @ next_of("bf16").t()}
            for name, fn in fns.items():
                samples[(m, name)].append(median_time(fn))
    out = {"working_set_bytes": {k: copies[k] * b for k, b in nbytes.items()}}
    for (m, name), ts in samples.items():
        t = statistics.median(ts)
        out.setdefault(f"rows_{m}", {})[name] = {"ms": 1e3 * t, "gbps": nbytes[name] / t / 1e9,
                                                 "ms_min_max": [1e3 * min(ts), 1e3 * max(ts)]}
    return out


@torch.inference_mode()
def decode_split(path: str, tokens: int) -> dict:
    import moeflash.model.v4 as v4
    from moeflash.weights.build import load_model

    model, _ = load_model(path, dtype="float32")
    spent: collections.Counter = collections.Counter()

    def timed(obj, attr, key):
        f = getattr(obj, attr)

        def g(*a, **k):
            t0 = time.perf_counter()
            r = f(*a, **k)
            spent[key] += time.perf_counter() - t0
            return r
        setattr(obj, attr, g)

    for layer in model.layers:
        timed(layer.attn, "forward", "attention")
        timed(layer.ffn, "forward", "moe (all)")
        timed(layer.ffn.gate, "forward", "moe: router")
        if layer.ffn.shared_experts is not None:
            timed(layer.ffn.shared_experts, "forward", "moe: shared expert")
    timed(v4, "hc_weights", "mhc weights")
    timed(model, "logits", "logits")
    st = [model.new_seq_state()]
    nxt = model.logits(run_tokens(model, torch.arange(1, 65), st, [64])[-1:]).argmax(-1)
    for _ in range(4):
        nxt = model.logits(run_tokens(model, nxt, st, [1])).argmax(-1)
    spent.clear()
    t0 = time.perf_counter()
    for _ in range(tokens):
        nxt = model.logits(run_tokens(model, nxt, st, [1])).argmax(-1)
    total = (time.perf_counter() - t0) / tokens
    return {"ms_per_token": 1e3 * total, "tokens_per_s": 1 / total, "kernels": K.status(),
            "parts_ms_per_token": {k: 1e3 * v / tokens for k, v in spent.most_common()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", default=None, help="a V4 checkpoint directory for the decode-step split")
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--working-set", type=float, default=None, metavar="MiB",
                   help="bytes each format's weights cycle through (default: 4x the last-level cache)")
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    ws = int(args.working_set * 2**20) if args.working_set else 4 * llc_bytes()
    out = {"bench": "kernels", "kernels": K.status(), "llc_bytes": llc_bytes(),
           "read_probe_gbps": read_bandwidth_probe(1.0), "products": products(args.size, args.rounds, ws)}
    if args.model:
        out["decode_split"] = decode_split(args.model, args.tokens)
    out["machine"] = machine_info()
    print_json(rounded(out))


if __name__ == "__main__":
    main()
