"""SmolLM2 against its MoE-fied versions (`moeflash moefy`), on the standard library's text.

For K/E = 1/8, 1/4 and 1/2 (E = 16 experts per MLP): MoE-fy SmolLM2 (cached under BENCH_DIR), then run
`moeflash compare` over the dense model and the three: bits per byte on code, prose and legal text,
measured prefill and decode tokens/s, memory, and each MoE's routing replayed through the expert-cache
policies against Belady at 25% and 50% budgets (replayed traces), then the 1/4 model decoding real
text through the expert store at those budgets against all in RAM (`--parts store` alone). Also the ceiling of any split at 25%: per layer, the
relative error of the MLP output when each token keeps only its own top 25% of neurons (an oracle that
no expert grouping or router can beat), on the prose text.

    python bench/moefy.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from common import BENCH_DIR, ROOT, add_common_args, apply_common_args, log, machine_info, print_json, rounded

from moeflash.evaluate.compare import CompareInputs, compare  # noqa: E402
from moeflash.evaluate.corpora import builtin_text  # noqa: E402
from moeflash.evaluate.report import routing_summaries  # noqa: E402
from moeflash.moefy import _dense_weights, activated_ffn_bytes, collect_activations  # noqa: E402


def moefied(experts: int, top_k: int, seed: int) -> str:
    out = BENCH_DIR / f"smollm2-moe-e{experts}-k{top_k}.gguf"
    if not out.exists():
        log(f"moefy E={experts} K={top_k} -> {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "moeflash.cli", "moefy", "--model", "smollm2", "--experts",
                        str(experts), "--top-k", str(top_k), "--out", str(out), "--seed", str(seed)],
                       check=True, cwd=str(ROOT), stdout=sys.stderr)
    return str(out)


@torch.inference_mode()
def oracle_ceiling(share: float = 0.25, tokens: int = 2048) -> dict:
    """Per layer: relative error of the MLP output when each token keeps its own top `share` of neurons
    by |h| x ||down column||."""
    from moeflash.engine.load import load_model

    model, tok = load_model("smollm2", dtype="float32")
    ids = tok.encode(builtin_text("prose"), special=False)[:tokens]
    xs = collect_activations(model, ids)
    errs = []
    for i, layer in enumerate(model.layers):
        gate, up, down = _dense_weights(layer.ffn)
        h = F.silu(xs[i] @ gate.T) * (xs[i] @ up.T)
        keep = int(h.shape[1] * share)
        idx = (h.abs() * down.norm(dim=0)).topk(keep, dim=1).indices
        mask = torch.zeros_like(h).scatter_(1, idx, 1.0)
        full, part = h @ down.T, (h * mask) @ down.T
        errs.append(float(((full - part).norm(dim=1) / full.norm(dim=1)).mean()))
    return {"share": share, "tokens": len(ids), "relative_error_per_layer": errs,
            "mean_relative_error": sum(errs) / len(errs)}


@torch.inference_mode()
def store_decode(path: str, budgets=(0.25, 0.5), policies=("lru", "lfu"), tokens: int = 256, rounds: int = 3) -> dict:
    """Decode steps over real text (teacher-forced: each step feeds the text's next token, so every
    configuration routes the same tokens) with every expert in memory, then with the expert store at
    each budget (a fraction of all experts) and policy: tokens/s (median of rounds, interleaved) and
    the store's hit rate, against the same routing replayed under Belady."""
    from moeflash.engine.expert_policy import replay
    from moeflash.engine.forward import run_tokens
    from moeflash.engine.load import load_model
    from moeflash.evaluate.routing import RoutingStats

    resident, tok = load_model(path, dtype="float32")
    ids = tok.encode(builtin_text("legal"), special=False)[:tokens]
    cfg = resident.config
    one = 3 * cfg.hidden_size * cfg.intermediate_size // cfg.moe_experts * 4
    total = cfg.num_hidden_layers * cfg.moe_experts
    rec = RoutingStats(resident)
    rec.start("legal")

    def run(model, record=False):
        st = model.new_seq_state()
        t0 = time.perf_counter()
        for t in ids:
            run_tokens(model, torch.tensor([t]), [st], [1])
            if record:
                rec.take(1)
        return len(ids) / (time.perf_counter() - t0)

    run(resident, record=True)
    rec.detach()
    trace = rec.traces()["legal"]
    configs = {"all in RAM": resident}
    for b in budgets:
        for p in policies:
            m, _ = load_model(path, dtype="float32", expert_memory=(int(total * b) + 0.5) * one / 2**30, expert_policy=p)
            configs[f"{p} {b:g}"] = m
    speeds = {k: [] for k in configs}
    first = {}  # each store's counters after its first pass (from cold, as Belady is replayed)
    for r in range(rounds):
        for k, m in configs.items():
            speeds[k].append(run(m))
            if r == 0 and getattr(m, "expert_store", None) is not None:
                first[k] = m.expert_store.stats()
    out = {"tokens": len(ids), "expert_bytes": one, "experts": total, "results": {}}
    for k, m in configs.items():
        r = {"decode_tokens_per_s": statistics.median(speeds[k]), "spread": [min(speeds[k]), max(speeds[k])],
             "vs_all_in_ram": statistics.median(speeds[k]) / statistics.median(speeds["all in RAM"])}
        store = getattr(m, "expert_store", None)
        if store is not None:
            st = first[k]
            r["hit_rate"] = st["hit_rate"]
            r["capacity_experts"] = st["capacity_experts"]
            best = replay(trace, st["capacity_experts"], policies=(store.policy_name,), warmup_fraction=0.0)
            r["belady_hit_rate"] = best["results"]["belady"]["hit_rate"]
            r["vs_belady"] = st["hit_rate"] / r["belady_hit_rate"] if r["belady_hit_rate"] else None
        out["results"][k] = r
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", nargs="+", default=["compare", "store"], choices=["compare", "store"])
    p.add_argument("--store-top-k", type=int, default=4, help="the MoE-fied model the store serves")
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    if "store" in args.parts and "compare" not in args.parts:
        path = moefied(args.experts, args.store_top_k, args.seed)
        print_json(rounded({"store": store_decode(path, rounds=args.rounds), "machine": machine_info()}))
        return
    models = ["smollm2"] + [moefied(args.experts, k, args.seed) for k in args.top_k]
    result = compare(CompareInputs(models=models, texts=["code", "prose", "legal"], rounds=args.rounds),
                     progress_bar=False)
    routing = routing_summaries(result)
    rows = []
    for m in result["models"]:
        from moeflash.engine.load import load_model

        cfg = load_model(m["model"], dtype="float32")[0].config
        rows.append({"model": m["model"], "experts": cfg.moe_experts, "top_k": cfg.moe_top_k,
                     "bits_per_byte": {t: v["bits_per_byte"] for t, v in m["text"].items()},
                     "prefill_tokens_per_s": m["speed"]["prefill_tokens_per_s"],
                     "decode_tokens_per_s": m["speed"]["decode_tokens_per_s"],
                     "decode_spread": m["speed"]["decode_spread"],
                     "activated_ffn_bytes_fp32": activated_ffn_bytes(cfg)["activated"],
                     "params": m["params"], "activated_params": m["activated_params"]})
    dense = rows[0]["bits_per_byte"]
    for r in rows:
        r["bpb_vs_dense"] = {t: v / dense[t] for t, v in r["bits_per_byte"].items()}
    cache = {name: {t: rep["cache"][t] for t in rep.get("cache", {})} for name, rep in routing.items()}
    entropy = {name: {t: v["entropy_vs_uniform"] for t, v in rep["texts"].items()} for name, rep in routing.items()}
    out = {"models": rows, "cache_replay": cache, "routing_entropy_vs_uniform": entropy,
           "oracle_ceiling_25pct": oracle_ceiling(), "texts": result["texts"], "machine": machine_info()}
    if "store" in args.parts:
        out["store"] = store_decode(moefied(args.experts, args.store_top_k, args.seed), rounds=args.rounds)
    print_json(rounded(out))


if __name__ == "__main__":
    main()
