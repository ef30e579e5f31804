"""SmolLM2 against its MoE-fied versions (`moeflash moefy`), on the standard library's text.

For K/E = 1/8, 1/4 and 1/2 (E = 16 experts per MLP): MoE-fy SmolLM2 (cached under BENCH_DIR), then run
`moeflash compare` over the dense model and the three: bits per byte on code, prose and legal text,
measured prefill and decode tokens/s, memory, and each MoE's routing replayed through the expert-cache
policies against Belady at 25% and 50% budgets. Also the ceiling of any split at 25%: per layer, the
relative error of the MLP output when each token keeps only its own top 25% of neurons (an oracle that
no expert grouping or router can beat), on the prose text.

    python bench/moefy.py --threads 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
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
    print_json(rounded({"models": rows, "cache_replay": cache, "routing_entropy_vs_uniform": entropy,
                        "oracle_ceiling_25pct": oracle_ceiling(), "texts": result["texts"],
                        "machine": machine_info()}))


if __name__ == "__main__":
    main()
