"""The FP8 row kernel at 1..16 input rows, on a working set past the last-level cache, optionally from another
build of the native library (to compare two commits' kernels: run this once per library, alternating).

Twelve 4096 x 4096 e4m3 weights with their 128 x 128 scales (192 MiB in all) are multiplied in turn by an
[M, 4096] fp32 input, `--rounds` times; reported per M: ms per weight (median, min, max over rounds) and the
weight bytes read per second.

    python bench/fp8_rows.py --threads 2 [--rows 1 4 8 16] [--library ~/.cache/moeflash/kernels/<key>/moeflash_kernels.so]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import add_common_args, apply_common_args, machine_info, print_json
from moeflash import kernels as K
from moeflash.weights.quant import quant_fp8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--library", default=None, help="a built moeflash_kernels.so to load instead of this checkout's")
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    if args.library:  # this checkout's library must not load too (the same op names): kernels report "torch"
        import os

        os.environ["MOEFLASH_KERNELS"] = "torch"
        torch.ops.load_library(args.library)
    else:
        assert K.native(torch.zeros(1)), K.status()
    g = torch.Generator().manual_seed(0)
    weights = []
    for _ in range(12):
        q, s = quant_fp8(torch.randn(4096, 4096, generator=g) * 0.02)
        weights.append((q.view(torch.uint8), s.float()))
    out = {"bench": "fp8_rows", "library": args.library or str(K.build.library_path()), "rows": {}}
    for m in args.rows:
        x = torch.randn(m, 4096, generator=g)
        torch.ops.moeflash.fp8_linear(x, *weights[0])  # warm-up
        ms = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for q, s in weights:
                torch.ops.moeflash.fp8_linear(x, q, s)
            ms.append(1e3 * (time.perf_counter() - t0) / len(weights))
        med = statistics.median(ms)
        out["rows"][m] = {"ms_per_weight": {"median": med, "min": min(ms), "max": max(ms)},
                          "weight_gb_per_s": 4096 * 4096 / med / 1e6}
    out["machine"] = machine_info()
    if args.library:
        out["machine"]["kernels"] = {"isa": torch.ops.moeflash.isa(), "library": args.library}
    print_json(out)


if __name__ == "__main__":
    main()
