"""moeflash vs transformers 5.23.0 on the same checkpoint, same storage dtype, same process.

moeflash: the preset's checkpoint loaded with `load_model(dir, dtype)`. transformers:
`DeepseekV4ForCausalLM` built from `DeepseekV4Config(**cfg.to_hf_kwargs())` without init, given the
moeflash model's state dict through `moeflash.weights.names.internal_to_hf`, stored in the same dtype
(for bf16 HF keeps its `_keep_in_fp32_modules_strict` tensors (mHC, sinks, norms) in fp32, as its
from_pretrained does; see common.build_hf). HF's default experts implementation is used unless
`--hf-experts` (e.g. eager) is given; if it fails, eager is used and reported.

Measured for each, one after the other (moeflash first; the HF model is built from it, then the
moeflash model is freed):
- batch-1 decode: a random prompt of `--prompt` tokens is prefilled, then `--warmup` untimed and
  `--tokens` timed greedy steps (moeflash: forward_tokens + logits + argmax; HF: model(input_ids=next,
  past_key_values=DynamicCache(config=hf_config), use_cache=True) + argmax);
- prefill: `--prefill` tokens of a fresh sequence in one call (moeflash: forward_tokens + last-row
  logits; HF: one forward with a fresh DynamicCache and logits_to_keep=1).
Reports tokens/s of both and the ratios moeflash / HF (> 1: moeflash is faster).

    python bench/vs_transformers.py --preset mini --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from common import (add_common_args, apply_common_args, build_hf, hf_experts_impl, hf_greedy_steps, log,
                    machine_info, make_or_load, moeflash_decode_and_prefill, print_json, random_tokens,
                    rounded)


@torch.inference_mode()
def bench_hf(hf, hcfg, prompt, tokens, warmup, long_prompt) -> dict:
    import transformers

    hf(input_ids=long_prompt[None, :32], past_key_values=transformers.DynamicCache(config=hcfg),
       use_cache=True, logits_to_keep=1)  # warm-up
    out = hf(input_ids=prompt[None], past_key_values=transformers.DynamicCache(config=hcfg), use_cache=True,
             logits_to_keep=1)
    times, out_ids, _, _ = hf_greedy_steps(hf, out, warmup, tokens)
    dec = sum(times)
    t0 = time.perf_counter()
    out = hf(input_ids=long_prompt[None], past_key_values=transformers.DynamicCache(config=hcfg),
             use_cache=True, logits_to_keep=1)
    out.logits[:, -1].argmax(-1)
    pre = time.perf_counter() - t0
    return {"decode_tokens_per_s": len(times) / dec, "decode_ms_per_token": 1e3 * dec / len(times),
            "prefill_s": pre, "prefill_tokens_per_s": long_prompt.numel() / pre, "greedy_ids": out_ids}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--hf-experts", default=None, help="transformers experts implementation (default: its own)")
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)

    model = make_or_load(args.preset, args.dtype)
    cfg = model.config
    prompt = random_tokens(cfg.vocab_size, args.prompt, args.seed)
    long_prompt = random_tokens(cfg.vocab_size, args.prefill, args.seed + 1)
    log(f"[vs_hf] moeflash ({args.dtype}): decode {args.tokens} tokens, prefill {args.prefill} ...")
    ours = moeflash_decode_and_prefill(model, prompt, long_prompt, args.warmup, args.tokens)
    log(f"[vs_hf]   moeflash decode {ours['decode_tokens_per_s']:.2f} tok/s, prefill "
        f"{ours['prefill_tokens_per_s']:.1f} tok/s")
    hf, hcfg = build_hf(model, args.dtype, args.hf_experts)
    del model
    gc.collect()
    impl = hf_experts_impl(hf)
    log(f"[vs_hf] transformers ({args.dtype}, {impl} experts) ...")
    try:
        theirs = bench_hf(hf, hcfg, prompt, args.tokens, args.warmup, long_prompt)
    except Exception as e:  # e.g. a grouped_mm kernel missing for this dtype on CPU
        if impl == "eager":
            raise
        log(f"[vs_hf]   {impl} failed ({type(e).__name__}: {e}); retrying with eager experts")
        hf.set_experts_implementation("eager")
        impl = f"eager (after {impl} failed: {type(e).__name__})"
        theirs = bench_hf(hf, hcfg, prompt, args.tokens, args.warmup, long_prompt)
    theirs["experts_implementation"] = impl
    log(f"[vs_hf]   transformers decode {theirs['decode_tokens_per_s']:.2f} tok/s, prefill "
        f"{theirs['prefill_tokens_per_s']:.1f} tok/s")
    same = ours.pop("greedy_ids") == theirs.pop("greedy_ids")
    print_json(rounded({
        "bench": "vs_transformers", "preset": args.preset, "dtype": args.dtype,
        "prompt_tokens": args.prompt, "decode_tokens": args.tokens, "prefill_tokens": args.prefill,
        "moeflash": ours, "transformers": theirs,
        "decode_ratio_moeflash_over_hf": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
        "prefill_ratio_moeflash_over_hf": ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"],
        "same_greedy_tokens": same,
        "machine": machine_info(),
    }))


if __name__ == "__main__":
    main()
