"""Expert store: decode speed and cache hit rates per budget and policy, next to the all-in-RAM speed,
plus trace replays (recorded and synthetic skewed) with the Belady ceiling.

Model: the `flash-shaped` preset (827M parameters, 8 layers x 256 routed experts, top-6, ~4.9% active;
bf16 checkpoint from `moeflash convert`, 1.6 GB of routed experts). Each configuration runs in a fresh
process: load, prefill a 64-token random prompt, `--warmup` untimed and `--tokens` timed greedy decode
steps at batch 1; hit rates and bytes read count the timed steps only. The expert store reads with pread and drops the pages it read from the page cache
(posix_fadvise DONTNEED), so misses are real reads from the disk, and the disk's cold read bandwidth
is measured first the same way.

Random weights route almost uniformly, so live hit rates sit near budget / total whatever the policy:
that says little about real models. The replays say more: the trace recorded from this model, and a
skewed synthetic trace (Zipf 1.0 over experts per layer, 4 domains switching every 256 tokens) of the
same shape; for each, hit rates per policy and Belady's optimum, and the tokens/s each would give
(all-in-RAM ms/token + misses/token x expert bytes / disk bandwidth).

With `--official` the same preset is written in DeepSeek's official format (FP8 dense, FP4 experts,
`flash-shaped-official`, 0.41 GB of experts) and loaded with `--dtype auto` (fp32): the store then
holds FP4 experts in the slots of its slab and runs them with the same fused kernel as all-in-RAM.

    python bench/experts.py --threads 2 [--official --budgets 0.5 1.0 --policies lfu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import BENCH_DIR, add_common_args, apply_common_args, log, machine_info, make_or_load, print_json, rounded
from moeflash.engine.forward import run_tokens

PRESET = "flash-shaped"


def worker(cfg: dict) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    from common import random_tokens
    from moeflash.engine.load import load_model

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    t0 = time.perf_counter()
    kw = {}
    if cfg.get("budget") is not None:
        kw = dict(expert_memory=cfg["budget_gib"], expert_policy=cfg["policy"], prefetch=cfg["prefetch"])
    model, _ = load_model(BENCH_DIR / cfg["dir"], dtype=cfg["dtype"], **kw)
    if not kw:  # all in RAM: read every weight once so no page faults land in the timed steps
        for p in model.parameters():
            p.data.view(-1)[:: max(1, 4096 // p.element_size())].float().sum()
    load_s = time.perf_counter() - t0
    store = getattr(model, "expert_store", None)
    prompt = random_tokens(model.config.vocab_size, 64, 0)
    with torch.inference_mode():
        st = [model.new_seq_state()]
        x = run_tokens(model, prompt, st, [prompt.numel()])
        nxt = model.logits(x[-1:]).argmax(-1)
        for _ in range(cfg["warmup"]):  # warm the cache (and the allocator) before measuring
            nxt = model.logits(run_tokens(model, nxt, st, [1])).argmax(-1)
        before = store.stats() if store else None
        t0 = time.perf_counter()
        for _ in range(cfg["tokens"]):
            nxt = model.logits(run_tokens(model, nxt, st, [1])).argmax(-1)
        dt = time.perf_counter() - t0
    out = {"load_s": load_s, "decode_tokens_per_s": cfg["tokens"] / dt, "decode_ms_per_token": 1e3 * dt / cfg["tokens"]}
    if store:
        after = store.stats()
        d = {k: after[k] - before[k] for k in ("hits", "misses", "evictions", "bytes_read", "tokens",
                                                "predicted", "predicted_used", "used")}
        out.update(capacity_experts=after["capacity_experts"], hit_rate_all=after["hit_rate"],
                   decode_hit_rate=d["hits"] / max(1, d["hits"] + d["misses"]),
                   decode_mib_read_per_token=d["bytes_read"] / max(1, d["tokens"]) / 2**20,
                   prefetch_accuracy=(d["predicted_used"] / d["used"]) if d["used"] else None,
                   expert_mib=after["expert_bytes"] / 2**20)
        store.close()
    if cfg.get("record_trace"):
        out["trace"] = record(model, cfg["record_trace"])
    return out


def record(model, path: str) -> str:
    """Greedy-decode 4 random prompts (64 + 128 tokens) and write their routing trace."""
    from common import random_tokens
    from moeflash.engine.expert_policy import write_trace
    from moeflash.engine.experts import record_trace

    prompts = [random_tokens(model.config.vocab_size, 64, 100 + s).tolist() for s in range(4)]
    write_trace(path, record_trace(model, prompts, 128)["tokens"])
    return path


def run(cfg: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def replays(trace, total_experts: int, budgets, ms_per_token: float, expert_bytes: float, disk_gbps: float) -> list:
    from moeflash.engine.expert_policy import replay

    rows = []
    for b in budgets:
        cap = max(1, int(round(b * total_experts)))
        res = replay(trace, cap)["results"]
        n = len(trace) * 0.9  # replay scores the tokens after its 10% warm-up
        est = {k: 1.0 / (ms_per_token / 1e3 + (v["misses"] / n) * expert_bytes / (disk_gbps * 1e9))
               for k, v in res.items()}
        rows.append({"budget": b, "capacity": cap, "hit_rate": {k: v["hit_rate"] for k, v in res.items()},
                     "est_tokens_per_s": est})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--policies", nargs="+", default=["lru", "lfu", "pinned"])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--official", action="store_true", help="the official FP8 / FP4 format (FP4 experts in the store)")
    add_common_args(p)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    apply_common_args(args)
    from moeflash.config import ModelConfig
    from moeflash.engine.expert_policy import read_trace, synthetic_trace
    from moeflash.engine.experts import disk_read_gbps

    cfg = ModelConfig.preset(PRESET)
    total = cfg.num_hidden_layers * cfg.n_routed_experts
    params = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    if args.official:
        ckpt, dtype, expert_bytes = f"{PRESET}-official", "auto", params // 2 + params // 32
        if not (BENCH_DIR / ckpt / "config.json").exists():
            subprocess.run([sys.executable, "-m", "moeflash.cli", "convert", "--preset", PRESET, "--official",
                            "--out", str(BENCH_DIR / ckpt)], check=True, stdout=sys.stderr)
    else:
        make_or_load(PRESET, "bfloat16")  # writes the checkpoint once
        ckpt, dtype, expert_bytes = PRESET, "bfloat16", params * 2
    base = {"threads": args.threads, "tokens": args.tokens, "warmup": args.warmup, "dir": ckpt, "dtype": dtype}
    disk = disk_read_gbps(BENCH_DIR / ckpt)
    log(f"[experts] cold disk read {disk:.2f} GB/s")
    trace_path = str(BENCH_DIR / f"{PRESET}.trace.jsonl")
    log("[experts] all in RAM (and recording a routing trace)")
    ram = run(dict(base, record_trace=trace_path))
    live = []
    for b in args.budgets:
        for pol in args.policies:
            for prefetch in ([False, True] if pol == "lfu" else [False]):
                log(f"[experts] budget {b:.0%} {pol} prefetch={prefetch}")
                gib = (b * total * expert_bytes + 4096) / 2**30
                r = run(dict(base, budget=b, budget_gib=gib, policy=pol, prefetch=prefetch))
                r.update(budget=b, policy=pol, prefetch=prefetch,
                         speed_vs_ram=r["decode_tokens_per_s"] / ram["decode_tokens_per_s"])
                live.append(r)
    ms = ram["decode_ms_per_token"]
    recorded = replays(read_trace(trace_path), total, args.budgets, ms, expert_bytes, disk)
    skewed = replays(synthetic_trace(6000, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok,
                                     zipf_s=1.0, seed=0), total, args.budgets, ms, expert_bytes, disk)
    ram.pop("trace", None)
    print_json(rounded({"bench": "experts", "preset": PRESET, "checkpoint": ckpt, "dtype": dtype, "routed_experts": total,
                        "expert_mib": expert_bytes / 2**20, "disk_cold_read_GBps": disk, "all_in_ram": ram,
                        "live": live, "replay_recorded_trace": recorded,
                        "replay_synthetic_zipf1_4domains": skewed, "machine": machine_info()}))


if __name__ == "__main__":
    main()
