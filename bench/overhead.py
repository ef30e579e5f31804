"""Per-token framework overhead: batch-1 decode ms/token on models too narrow to cost anything else.

`mini-overhead` has `mini`'s depth, expert count and routing (8 layers, 96 experts, top-8, window 128,
CSA/HCA) at near-zero width, so its step time is Python + PyTorch dispatch per token; `tiny` is the
4-layer test model. For each preset: a random prompt of `--prompt` tokens is prefilled, then
`--tokens` decode steps (after `--warmup` untimed ones) of forward_tokens + logits + argmax are timed
(moeflash), and the same weights run in transformers 5.23 `DeepseekV4ForCausalLM` (state dict
mapped with `internal_to_hf`; fp32; HF's default experts implementation unless `--hf-experts`):
prefill with a `DynamicCache(config=hf_config)`, then `model(input_ids=next_token,
past_key_values=cache, use_cache=True)` + argmax per token. Reports ms/token for both and the ratio
moeflash / transformers (< 1: moeflash has less overhead). A breakdown is given
for both: the number of ATen ops dispatched per decode step and the most frequent ones
(TorchDispatchMode counting, one extra untimed step).

    python bench/overhead.py
"""

from __future__ import annotations

import argparse
import gc

import torch

from common import (add_common_args, apply_common_args, build_hf, hf_experts_impl, hf_greedy_steps, log,
                    machine_info, make_or_load, moeflash_greedy_steps, print_json, random_tokens,
                    rounded)
from moeflash.engine.forward import run_tokens


def median(xs):
    s = sorted(xs)
    return s[len(s) // 2]


@torch.inference_mode()
def moeflash_decode(model, prompt: torch.Tensor, tokens: int, warmup: int) -> dict:
    times, _, nxt, st = moeflash_greedy_steps(model, prompt, warmup, tokens)
    ops = count_ops(lambda: model.logits(run_tokens(model, nxt, st, [1])).argmax(-1))
    return {"ms_per_token_mean": 1e3 * sum(times) / len(times), "ms_per_token_median": 1e3 * median(times),
            "ms_per_token_best": 1e3 * min(times), "torch_ops_per_token": ops,
            "us_per_op": 1e6 * median(times) / ops if ops else None,
            "top_ops": getattr(count_ops, "last_top", None)}


@torch.inference_mode()
def hf_decode(hf, hcfg, prompt: torch.Tensor, tokens: int, warmup: int) -> dict:
    import transformers

    cache = transformers.DynamicCache(config=hcfg)
    out = hf(input_ids=prompt[None], past_key_values=cache, use_cache=True)
    times, _, nxt, cache = hf_greedy_steps(hf, out, warmup, tokens)
    ops = count_ops(lambda: hf(input_ids=nxt, past_key_values=cache, use_cache=True))
    return {"ms_per_token_mean": 1e3 * sum(times) / len(times), "ms_per_token_median": 1e3 * median(times),
            "ms_per_token_best": 1e3 * min(times), "torch_ops_per_token": ops,
            "us_per_op": 1e6 * median(times) / ops if ops else None,
            "top_ops": getattr(count_ops, "last_top", None)}


def count_ops(fn) -> int | None:
    """ATen ops dispatched by one call of fn (one extra decode step; its result is discarded)."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:  # pragma: no cover
        return None

    class Counter(TorchDispatchMode):
        n = 0
        by_op: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.n += 1
            name = str(func.overloadpacket.__name__)
            Counter.by_op[name] = Counter.by_op.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    count_ops.last_top = dict(sorted(Counter.by_op.items(), key=lambda kv: -kv[1])[:12])
    return Counter.n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["mini-overhead", "tiny"])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--hf-experts", default=None,
                   help="transformers experts implementation (default: its own choice; e.g. eager)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)

    rows = []
    for preset in args.presets:
        model = make_or_load(preset, "float32")
        cfg = model.config
        prompt = random_tokens(cfg.vocab_size, args.prompt, args.seed)
        log(f"[overhead] {preset}: moeflash ...")
        ours = moeflash_decode(model, prompt, args.tokens, args.warmup)
        row = {"preset": preset, "layers": cfg.num_hidden_layers, "experts": cfg.n_routed_experts,
               "top_k": cfg.num_experts_per_tok, "hidden_size": cfg.hidden_size, "moeflash": ours}
        log(f"[overhead]   moeflash {ours['ms_per_token_median']:.2f} ms/token, "
            f"{ours['torch_ops_per_token']} ops/token")
        if not args.no_hf:
            hf, hcfg = build_hf(model, torch.float32, args.hf_experts)
            log(f"[overhead] {preset}: transformers ({hf_experts_impl(hf)} experts) ...")
            theirs = hf_decode(hf, hcfg, prompt, args.tokens, args.warmup)
            theirs["experts_implementation"] = hf_experts_impl(hf)
            row["transformers"] = theirs
            row["ratio_moeflash_over_hf_ms"] = ours["ms_per_token_median"] / theirs["ms_per_token_median"]
            row["speedup_vs_hf"] = theirs["ms_per_token_median"] / ours["ms_per_token_median"]
            log(f"[overhead]   transformers {theirs['ms_per_token_median']:.2f} ms/token, "
                f"{theirs['torch_ops_per_token']} ops/token")
            del hf
        rows.append(row)
        del model
        gc.collect()
    print_json(rounded({"bench": "overhead", "prompt_tokens": args.prompt, "timed_tokens": args.tokens,
                        "rows": rows, "machine": machine_info()}))


if __name__ == "__main__":
    main()
