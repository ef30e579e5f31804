"""`moeflash` command line: generate (more subcommands arrive with the engine and server)."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import stream
    from .weights.build import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.prompt_ids is not None:
        try:
            prompt = _parse_ids(args.prompt_ids)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif args.prompt is not None:
        if tokenizer is None:
            print(f"error: {args.model} has no tokenizer.json; pass --prompt-ids instead of --prompt",
                  file=sys.stderr)
            return 2
        prompt = tokenizer.encode(args.prompt, add_bos=True)
    else:
        print("error: give --prompt TEXT or --prompt-ids 1,2,3", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out: list[int] = []
    try:
        for tok in stream(model, prompt, args.max_new_tokens, args.temperature, args.seed):
            out.append(tok)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else None
    if args.json:
        print(json.dumps({"token_ids": out, "text": text, "prompt_tokens": len(prompt),
                          "seconds": round(dt, 4)}))
    else:
        print(text if text is not None else ",".join(map(str, out)))
        print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeflash", description="DeepSeek-V4-class MoE inference")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--model", default="tiny", help="checkpoint directory or preset name (tiny)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weight/compute dtype; auto picks float32 when it fits in RAM (fastest here)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    g.add_argument("--json", action="store_true", help="print one JSON object {token_ids, text}")
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 0) < 0:
        print("error: --max-new-tokens must be >= 0", file=sys.stderr)
        return 2
    if getattr(args, "temperature", 0.0) < 0:
        print("error: --temperature must be >= 0", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
