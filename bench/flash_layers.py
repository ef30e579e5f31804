"""Real-size proof without 160 GB: two V4-Flash layers at their real sizes, in the official format.

The checkpoint is `moeflash convert --preset v4-flash --layers 3:5 --official` (an HCA and a CSA layer,
both score-routed like 40 of V4-Flash's 43, 256 FP4 experts each, the full 129,280-token vocabulary;
about 9 GB), written tensor by tensor once into /tmp/moeflash-bench/flash-2layer.

In fresh processes (peak RSS is per process):
1. storage precision, native kernels: load time, resident and peak memory as ratios to the files'
   bytes, batch-1 greedy decode (step time, and the head's share timed apart: per-layer time =
   (step - head) / 2), bytes read per token and the fraction of the bandwidth probe reached;
2. storage precision, plain-torch kernel references (MOEFLASH_KERNELS=torch): the same greedy tokens?
Then the measured per-layer time goes into the planner (`--layer-ms`, with the measured head as
`--head-ms`: the head is the same size at any depth) for the real 43-layer V4-Flash on this machine's
profile with enough RAM, beside the planner's own model.

    python bench/flash_layers.py --threads 2 [--tokens 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import BENCH_DIR, ROOT, machine_info, print_json, rounded

CHILD = r"""
import json, resource, statistics, sys, time, torch
sys.path.insert(0, sys.argv[4])
from common import bytes_per_token, moeflash_greedy_steps, read_bandwidth_probe, rss_bytes
torch.set_num_threads(int(sys.argv[2]))
from moeflash import kernels
from moeflash.weights.build import load_model
from moeflash.engine.forward import run_tokens
runtime = rss_bytes()
t0 = time.perf_counter()
model, _ = load_model(sys.argv[1])
load_s = time.perf_counter() - t0
after = rss_bytes()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
tokens = int(sys.argv[3])
with torch.inference_mode():
    times, ids, nxt, st = moeflash_greedy_steps(model, torch.arange(1, 33), 2, tokens)
    moved = bytes_per_token(model, st)
    x = run_tokens(model, nxt, st, [1])
    head = []
    for _ in range(5):
        t = time.perf_counter(); model.logits(x).argmax(-1); head.append(time.perf_counter() - t)
step = statistics.median(times)
head_s = statistics.median(head)
bw = read_bandwidth_probe() if sys.argv[5] == "1" else None
print(json.dumps({"kernels": kernels.status()["kernels"], "dtype": str(model.embed.weight.dtype),
                  "load_s": load_s, "runtime_bytes": runtime, "resident_bytes": after, "peak_bytes": peak,
                  "step_ms": [1e3 * t for t in times], "step_ms_median": 1e3 * step,
                  "head_ms": 1e3 * head_s, "layer_ms": 1e3 * (step - head_s) / model.config.num_hidden_layers,
                  "bytes_per_token": moved["per_token"], "read_gbps": bw, "greedy_ids": ids}))
"""


def run_child(path: Path, threads: int, tokens: int, kernels: str, probe: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MOEFLASH_KERNELS"}
    if kernels:
        env["MOEFLASH_KERNELS"] = kernels
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(threads), str(tokens),
                        str(Path(__file__).resolve().parent), "1" if probe else "0"],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"child failed ({kernels or 'native'}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(BENCH_DIR / "flash-2layer"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8, help="timed greedy decode steps")
    p.add_argument("--no-reference", action="store_true", help="skip the plain-torch reference run")
    args = p.parse_args()
    path = Path(args.model)
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, "-m", "moeflash.cli", "convert", "--preset", "v4-flash", "--layers", "3:5",
                        "--official", "--out", str(path)], check=True, cwd=str(ROOT), stdout=sys.stderr)
    files = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    out = {"model": str(path), "file_bytes": files}
    native = run_child(path, args.threads, args.tokens, "", probe=True)
    native["weights_over_files"] = (native["resident_bytes"] - native["runtime_bytes"]) / files
    native["peak_over_files"] = native["peak_bytes"] / files
    native["roofline_fraction"] = (native["bytes_per_token"] / (native["step_ms_median"] / 1e3)
                                   / (native["read_gbps"] * 1e9))
    out["storage_native"] = native
    if not args.no_reference:
        ref = run_child(path, args.threads, max(2, args.tokens // 4), "torch", probe=False)
        n = len(ref["greedy_ids"])
        out["storage_torch_reference"] = {k: ref[k] for k in ("kernels", "step_ms_median", "layer_ms")}
        out["same_greedy_tokens_as_reference"] = native["greedy_ids"][:n] == ref["greedy_ids"]
        out["compared_tokens"] = n
    from moeflash.plan.hardware import get_profile
    from moeflash.plan.planner import PlanInputs, plan

    hw = get_profile("cpu-2c").replace(memory_gib=256.0)
    pl = plan(PlanInputs(model="v4-flash", context=4096, layer_ms=native["layer_ms"], head_ms=native["head_ms"]), hw)
    d = pl["decode"]["batch_1"]
    out["planner_v4_flash_43_layers"] = {
        "profile": "cpu-2c with 256 GiB (everything resident)",
        "modelled_tokens_per_s": d["expected_tokens_per_s"], "modelled_step_ms": d["time_ms"]["step"],
        "from_measured_layer": d["from_measured_layer"],
        "command": f"moeflash plan --model v4-flash --hardware cpu-2c --memory 256 --context 4096 "
                   f"--layer-ms {native['layer_ms']:.2f} --head-ms {native['head_ms']:.2f}"}
    out["machine"] = machine_info()
    print_json(rounded(out))


if __name__ == "__main__":
    main()
