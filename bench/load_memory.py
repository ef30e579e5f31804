"""Loading a V4 checkpoint at storage precision against decoding it at load: time, resident and peak
memory (as ratios to the files' bytes), and batch-1 decode speed with the same greedy tokens.

Each mode runs in a fresh process (peak RSS is per process). Resident memory is read after loading;
"runtime" is the process's resident memory before the model is loaded (torch and moeflash imported).

    python bench/load_memory.py --threads 2 [--model /tmp/moeflash-bench/mini-official]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import BENCH_DIR, ROOT, machine_info, print_json, rounded

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[4])
from common import moeflash_greedy_steps, rss_bytes
torch.set_num_threads(int(sys.argv[3]))
from moeflash.weights.build import load_model
runtime = rss_bytes()
t0 = time.perf_counter()
model, _ = load_model(sys.argv[1], dtype="float32", dequantize=sys.argv[2] == "dequantize")
load_s = time.perf_counter() - t0
after = rss_bytes()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
times, ids, *_ = moeflash_greedy_steps(model, torch.arange(1, 17), 4, 32)
print(json.dumps({"load_s": load_s, "runtime_bytes": runtime, "resident_bytes": after, "peak_bytes": peak,
                  "decode_tokens_per_s": len(times) / sum(times), "greedy_ids": ids}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(BENCH_DIR / "mini-official"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    path = Path(args.model)
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, "-m", "moeflash.cli", "convert", "--preset", "mini", "--official",
                        "--out", str(path)], check=True, cwd=str(ROOT), stdout=sys.stderr)
    files = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    out = {"model": str(path), "file_bytes": files}
    for mode in ("storage", "dequantize"):
        r = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(args.threads),
                            str(Path(__file__).resolve().parent)], capture_output=True, text=True, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["weights_over_files"] = (res["resident_bytes"] - res["runtime_bytes"]) / files
        res["peak_over_files"] = res["peak_bytes"] / files
        out[mode] = res
    out["same_greedy_tokens"] = out["storage"].pop("greedy_ids") == out["dequantize"].pop("greedy_ids")
    out["machine"] = machine_info()
    print_json(rounded(out))


if __name__ == "__main__":
    main()
