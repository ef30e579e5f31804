"""The planner against measurement: predict, then measure, memory and decode / prefill tokens/s.

For each configuration (`mini` and `flash-shaped`, all experts in RAM; `flash-shaped` through the
expert store at `--budgets` fractions of its routed experts) a fresh process loads the bf16
checkpoint (`/tmp/moeflash-bench/<preset>`, written by `bench/common.make_or_load` if missing), then:

- memory: the bytes the engine holds (every distinct parameter / buffer tensor, the expert store's
  resident experts, and each sequence's `SeqState.used_bytes()`), and the process's VmRSS / VmHWM;
- decode: `--batch` sequences prefilled with `--prompt` random tokens (the expert store is warmed
  with `--store-prompt` tokens so its cache is full), `--warmup` untimed then `--tokens` timed steps
  of forward_tokens + logits + argmax; tokens/s = batch / median step time (the mean is reported
  too: on this shared VM a neighbour's burst inflates the mean, never the median);
- prefill: one sequence of `--prefill` tokens in 512-token chunks (`hardware.prefill_seconds`), the
  faster of two runs.

Predictions come from `moeflash.plan.plan` for the same checkpoint directory, batch, context (the
mean position of the timed steps), dtype and expert budget, on the `cpu-2c` profile as shipped, and
with `--calibrate` also on a profile measured now (`hardware.probe_hardware`, in its own process:
bandwidth, matmul, disk, and the engine's cost model fitted on `mini-overhead` and a 4-layer
width-640 model, never on the presets checked here). Errors are (predicted - measured) / measured.

Process memory: the planner predicts the bytes the engine allocates. The process also holds the
runtime (torch + moeflash, `EngineCosts.runtime_gib`) and, for bf16 checkpoints loaded in bf16,
pages of the memory-mapped checkpoint that stay mapped after being copied (packed experts, fused
projections): page cache, reclaimable, but counted in VmRSS. `rss_predicted` adds both.

    python bench/plan_vs_measured.py --threads 2 --calibrate
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

from common import (
    BENCH_DIR,
    ROOT,
    add_common_args,
    apply_common_args,
    log,
    machine_info,
    make_or_load,
    print_json,
    rounded,
)
from moeflash.engine.forward import run_tokens

GIB = 2 ** 30


def status_mib() -> dict:
    s = open("/proc/self/status").read()
    out = {}
    for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        m = re.search(k + r":\s+(\d+)", s)
        out[k] = int(m.group(1)) * 1024 if m else None
    return out


def held_bytes(model) -> int:
    """Bytes of every distinct tensor the model holds (views counted once; meta tensors: none)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    store = getattr(model, "expert_store", None)
    if store is not None:
        total += sum(e.nbytes for e in store.cache.values())
    return total


def worker(cfg: dict) -> dict:
    import torch
    from common import random_tokens, touch_weights

    from moeflash.plan.hardware import prefill_seconds
    from moeflash.engine.load import load_model

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    kw = {}
    if cfg.get("budget_gib") is not None:
        kw = dict(expert_memory=cfg["budget_gib"], expert_policy="lfu")  # the defaults: LFU, no prefetch
    t0 = time.perf_counter()
    model, _ = load_model(BENCH_DIR / cfg["preset"], dtype="bfloat16", **kw)
    if not kw:
        touch_weights(model)
    load_s = time.perf_counter() - t0
    store = getattr(model, "expert_store", None)
    vocab = model.config.vocab_size
    out = {"load_s": load_s, "after_load": status_mib(), "decode": [], "prefill": []}
    with torch.inference_mode():
        if store is not None:  # fill the cache: one long prompt touches every expert
            st = [model.new_seq_state()]
            run_tokens(model, random_tokens(vocab, cfg["store_prompt"], 99), st, [cfg["store_prompt"]])
        st = [model.new_seq_state()]  # untimed warm-up decode: first steps after a load run slow here
        nxt = model.logits(run_tokens(model, random_tokens(vocab, 16, 7), st, [16])[-1:]).argmax(-1)
        for _ in range(8):
            nxt = model.logits(run_tokens(model, nxt, st, [1])).argmax(-1)
        for b in cfg["batches"]:
            states = [model.new_seq_state() for _ in range(b)]
            p = cfg["prompt"]
            ids = torch.cat([random_tokens(vocab, p, 1000 * b + i) for i in range(b)])
            x = run_tokens(model, ids, states, [p] * b)
            nxt = model.logits(x[torch.arange(1, b + 1) * p - 1]).argmax(-1)
            for _ in range(cfg["warmup"]):
                nxt = model.logits(run_tokens(model, nxt, states, [1] * b)).argmax(-1)
            before = store.stats() if store else None
            reps = []  # `--repeats` runs of `--tokens` steps; the fastest median counts (as the probe does)
            for _ in range(cfg["repeats"]):
                times = []
                for _ in range(cfg["tokens"]):
                    t1 = time.perf_counter()
                    nxt = model.logits(run_tokens(model, nxt, states, [1] * b)).argmax(-1)
                    times.append(time.perf_counter() - t1)
                reps.append(times)
            meds = [sorted(t)[len(t) // 2] for t in reps]
            med = min(meds)
            times = [x for t in reps for x in t]
            steps = cfg["tokens"] * cfg["repeats"]
            row = {"batch": b, "tokens_per_s": b / med, "tokens_per_s_mean": b * len(times) / sum(times),
                   "ms_per_step_mean": 1e3 * sum(times) / len(times),
                   "ms_per_step_median_per_run": [1e3 * m for m in meds],
                   "positions": [p + cfg["warmup"], p + cfg["warmup"] + steps],
                   "state_used_bytes": sum(s.used_bytes() for s in states),
                   "state_positions": [s.pos for s in states]}
            if store:
                a = store.stats()
                hits, misses = a["hits"] - before["hits"], a["misses"] - before["misses"]
                row.update(hit_rate=hits / max(1, hits + misses),
                           disk_mb_per_step=(a["bytes_read"] - before["bytes_read"]) / steps / 1e6,
                           resident=a["resident"], capacity=a["capacity_experts"])
            row["held_bytes_incl_state"] = held_bytes(model) + row["state_used_bytes"]
            out["decode"].append(row)
            del states, x
        for n in cfg["prefill"]:
            s = min(prefill_seconds(model, n) for _ in range(2))
            out["prefill"].append({"tokens": n, "seconds": s, "tokens_per_s": n / s})
    out["held_bytes"] = held_bytes(model)
    out["end"] = status_mib()
    if store:
        store.close()
    return out


def run_worker(cfg: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                       cwd=str(ROOT))
    if r.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def calibrate_worker(threads: int) -> dict:
    import dataclasses

    import torch

    from moeflash.plan.hardware import probe_hardware

    if threads:
        torch.set_num_threads(threads)
    hw = probe_hardware(log=log)
    return dataclasses.asdict(hw)


def mapped_duplicates(config, routed_bytes: int, store: bool) -> int:
    """Checkpoint pages the bf16 loader keeps mapped after copying them: the routed experts (packed
    into two tensors per layer when all are resident) and the projections fused per attention layer."""
    from moeflash.plan.planner import _config_key, _tensors, tensor_bytes

    fused = re.compile(r"attn\.(wq_a|wkv|wq_b|compressor\.(wkv|wgate)|indexer\.(weights_proj|wq_b|compressor\.(wkv|wgate)))\.weight$")
    dup = sum(tensor_bytes(n, shp, f, isz, "bf16", "bf16") for n, shp, f, isz, _ in _tensors(_config_key(config))
              if n.startswith("layers.") and fused.search(n))
    return dup + (0 if store else routed_bytes)


def err(pred, meas):
    return None if pred is None or not meas else (pred - meas) / meas


def predict(preset: str, hw, batch: int, position: int, budget_gib, prefill: int | None = None) -> dict:
    from moeflash.plan.planner import PlanInputs, plan

    return plan(PlanInputs(model=str(BENCH_DIR / preset), context=position, batch=batch, weights_dtype="bf16",
                           expert_memory_gib=budget_gib, prompt_len=prefill), hw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--calibrate-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--calibrate", action="store_true", help="also measure a profile now and predict with it")
    p.add_argument("--presets", nargs="+", default=["mini", "flash-shaped"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--budgets", type=float, nargs="*", default=[0.5, 1.0],
                   help="flash-shaped expert-store budgets (fractions of all routed experts)")
    p.add_argument("--store-batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--store-prompt", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size; the fastest median counts")
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    add_common_args(p)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.calibrate_worker:
        print(json.dumps(calibrate_worker(args.threads)))
        return
    apply_common_args(args)
    from moeflash.config import ModelConfig
    from moeflash.plan.hardware import EngineCosts, Hardware, get_profile

    t_start = time.perf_counter()
    for preset in args.presets:  # write the checkpoints once (not timed here)
        if not (BENCH_DIR / preset / "config.json").exists():
            make_or_load(preset, "bfloat16")
    profiles = {"cpu-2c (shipped)": get_profile("cpu-2c")}
    calibration = None
    if args.calibrate:
        log("[plan_vs_measured] calibrating (probe_hardware) in a fresh process")
        r = subprocess.run([sys.executable, __file__, "--calibrate-worker", "--threads", str(args.threads)],
                           capture_output=True, text=True, cwd=str(ROOT))
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-3000:])
        sys.stderr.write(r.stderr)
        calibration = json.loads(r.stdout)
        d = dict(calibration)
        d["engine"] = EngineCosts(**d["engine"])
        profiles["probe (now)"] = Hardware(**d)

    configs = []
    for preset in args.presets:
        configs.append({"preset": preset, "budget": None, "batches": args.batch})
        if preset == "flash-shaped":
            for b in args.budgets:
                configs.append({"preset": preset, "budget": b, "batches": args.store_batch})
    rows = []
    for c in configs:
        cfg = ModelConfig.from_json(BENCH_DIR / c["preset"])
        n_exp = cfg.num_hidden_layers * cfg.n_routed_experts
        eb = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
        budget_gib = None if c["budget"] is None else (c["budget"] * n_exp * eb + 4096) / GIB
        label = f"{c['preset']}" + ("" if c["budget"] is None else f", expert store {c['budget']:.0%}")
        log(f"[plan_vs_measured] measuring {label} (fresh process)")
        m = run_worker({"preset": c["preset"], "budget_gib": budget_gib, "batches": c["batches"],
                        "threads": args.threads, "prompt": args.prompt, "store_prompt": args.store_prompt,
                        "warmup": args.warmup, "tokens": args.tokens, "repeats": args.repeats,
                        "prefill": args.prefill if c["budget"] in (None, 0.5) else args.prefill[:1]})
        for prof, hw in profiles.items():
            for d in m["decode"]:
                pos = (d["positions"][0] + d["positions"][1]) // 2
                q = predict(c["preset"], hw, d["batch"], pos, budget_gib)
                dec = q["decode"]["batch_n"]
                rows.append({"config": label, "profile": prof, "what": f"decode tok/s, batch {d['batch']}",
                             "predicted": dec["expected_tokens_per_s"], "measured": d["tokens_per_s"],
                             "error": err(dec["expected_tokens_per_s"], d["tokens_per_s"]),
                             "detail": {"predicted_ms": dec["time_ms"], "predicted_bytes_per_step": dec["bytes_per_step"],
                                        "predicted_hit_rate": q["inputs"]["hit_rate"],
                                        "measured_hit_rate": d.get("hit_rate"),
                                        "measured_disk_mb_per_step": d.get("disk_mb_per_step")}})
                if prof.startswith("cpu-2c"):
                    qs = predict(c["preset"], hw, d["batch"], d["state_positions"][0], budget_gib)
                    pred_mem = qs["memory"]["fast_used"]
                    rows.append({"config": label, "profile": "-", "what": f"engine bytes held (weights + state), batch {d['batch']}",
                                 "predicted": pred_mem, "measured": d["held_bytes_incl_state"],
                                 "error": err(pred_mem, d["held_bytes_incl_state"])})
            for pf in m["prefill"]:
                q = predict(c["preset"], hw, 1, pf["tokens"], budget_gib, prefill=pf["tokens"])
                rows.append({"config": label, "profile": prof, "what": f"prefill tok/s, {pf['tokens']} tokens",
                             "predicted": q["prefill"]["expected_tokens_per_s"], "measured": pf["tokens_per_s"],
                             "error": err(q["prefill"]["expected_tokens_per_s"], pf["tokens_per_s"]),
                             "detail": {"predicted_s": q["prefill"]["time_s"]}})
        hw = profiles["cpu-2c (shipped)"]
        q = predict(c["preset"], hw, 1, args.prompt, budget_gib)
        store = c["budget"] is not None
        dup = mapped_duplicates(cfg, q["weights"]["routed_bytes"], store)
        rss_pred = hw.runtime_gib * GIB + q["memory"]["dense"] + q["memory"]["experts_resident"] + dup
        rows.append({"config": label, "profile": "-", "what": "process VmRSS at the end (runtime + weights + mapped copies)",
                     "predicted": rss_pred, "measured": m["end"]["VmRSS"],
                     "error": err(rss_pred, m["end"]["VmRSS"]),
                     "detail": {"mapped_duplicates": dup, "after_load": m["after_load"], "end": m["end"]}})
        rows.append({"config": label, "profile": "-", "what": "process VmHWM (peak) over the whole run",
                     "predicted": rss_pred, "measured": m["end"]["VmHWM"], "error": err(rss_pred, m["end"]["VmHWM"])})
        rows.append({"config": label, "profile": "-", "what": "load seconds", "predicted": None,
                     "measured": m["load_s"], "error": None})
    timed = [r for r in rows if r["error"] is not None]
    within = sum(abs(r["error"]) <= 0.25 for r in timed)
    print_json(rounded({"bench": "plan_vs_measured", "rows": rows,
                        "within_25pct": f"{within} of {len(timed)}",
                        "calibration": calibration, "seconds": time.perf_counter() - t_start,
                        "machine": machine_info()}))


if __name__ == "__main__":
    main()
