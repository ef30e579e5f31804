"""Does torch.compile pay on the decode step? Eager against Inductor on parts of the model.

For each variant, in a fresh subprocess (compiled code and Dynamo caches stay out of the other runs):
load `--model`, prefill a 16-token prompt, run `--warmup` untimed greedy steps (compilation and
recompilation happen here; their seconds are reported) and `--tokens` timed steps of
run_tokens + logits + argmax. Variants:

- `eager`: the model as it runs in the engine (measured first and last, for the spread);
- `whole`: `torch.compile(model.forward_tokens, dynamic=True)`;
- `attn` / `ffn` / `block`: `torch.compile(..., dynamic=True)` on every layer's attention, MoE or
  whole block.

Reports ms/token (median, min, max), the ratio to the median of the eager runs (> 1: compiled is
slower), the warm-up seconds, and whether the greedy tokens equal eager's.

    python bench/torch_compile.py --model /tmp/moeflash-bench/mini-official
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from common import add_common_args, apply_common_args, log, machine_info, print_json, rounded


def run_variant(args) -> dict:
    import torch

    from moeflash.engine.forward import run_tokens
    from moeflash.engine.load import load_model

    model, _ = load_model(args.model)
    model.eval()
    if args.variant == "whole":
        model.forward_tokens = torch.compile(model.forward_tokens, dynamic=True)
    elif args.variant != "eager":
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = 64
        for layer in model.layers:
            mod = layer if args.variant == "block" else getattr(layer, args.variant)
            mod.forward = torch.compile(mod.forward, dynamic=True)
    st = [model.new_seq_state()]
    out, times = [], []
    with torch.inference_mode():
        t0 = time.perf_counter()
        nxt = model.logits(run_tokens(model, torch.arange(1, 17), st, [16])[-1:]).argmax(-1)
        for _ in range(args.warmup):
            nxt = model.logits(run_tokens(model, nxt, st, [1])).argmax(-1)
            out.append(int(nxt))
        warm = time.perf_counter() - t0
        for _ in range(args.tokens):
            a = time.perf_counter()
            nxt = model.logits(run_tokens(model, nxt, st, [1])).argmax(-1)
            times.append(time.perf_counter() - a)
            out.append(int(nxt))
    return {"variant": args.variant, "warmup_s": warm, "ms_median": 1e3 * statistics.median(times),
            "ms_min": 1e3 * min(times), "ms_max": 1e3 * max(times), "tokens": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory, .gguf, or tiny / smollm2")
    p.add_argument("--variants", nargs="+", default=["whole", "attn", "ffn", "block"])
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--variant", help=argparse.SUPPRESS)  # set in the per-variant subprocess
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    runs = []
    for variant in ["eager", *args.variants, "eager"]:
        log(f"compile: {variant}")
        cmd = [sys.executable, __file__, "--model", args.model, "--variant", variant, "--tokens",
               str(args.tokens), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            runs.append({"variant": variant, "error": res.stderr.strip().splitlines()[-1:]})
            continue
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        log(json.dumps({k: v for k, v in runs[-1].items() if k != "tokens"}))
    eager = [r for r in runs if r["variant"] == "eager" and "error" not in r]
    base = statistics.median(r["ms_median"] for r in eager) if eager else None
    reference = eager[0]["tokens"] if eager else None
    for r in runs:
        if "error" in r:
            continue
        r["ratio_to_eager"] = r["ms_median"] / base if base else None
        r["tokens_equal_eager"] = r.pop("tokens") == reference
    print_json(rounded({"model": args.model, "runs": runs, "machine": machine_info()}))


if __name__ == "__main__":
    main()
