"""How far each compute path moves SmolLM2's logits, and what each dtype costs in decode speed.

Why: `--dtype auto` must keep the model's answers on every CPU (issue 11). bf16 answers depend on the
CPU's bf16 kernels (AMX, AVX512-BF16, AVX2 emulation); this script measures by how much.

Tolerance: SmolLM2-135M-Instruct (the shipped Q4_1 GGUF) reads a few hundred tokens of real English
(the Python reference manual's text from the standard library's `pydoc_data`), teacher-forced, one token
per step as in decode. Each path runs in its own process, under an instruction-set cap set by environment
(ATEN_CPU_CAPABILITY for ATen's kernels, ONEDNN_MAX_CPU_ISA for oneDNN's, MKL_ENABLE_INSTRUCTIONS for
MKL's), so one machine shows what AVX2-only and AVX-512 CPUs compute. The reference is llama.cpp on an F32
copy of the same file: an independent fp32 implementation of the file's exact dequantized weights. Also
measured: llama.cpp on the Q4_1 file itself (its dot products quantize activations to 8 bits).
Per path: max and mean |logit - reference|, mean KL(reference || path) in nats, top-1 agreement, and the
greedy answer to "What is the capital of France?".

Speed: batch-1 greedy decode tokens/s of SmolLM2 and of V4 `mini` in float32 and bfloat16, rounds
interleaved (fp32, bf16, fp32, ...), median and spread.

    python bench/dtype_tolerance.py --threads 2 [--tokens 320] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags, log, machine_info, print_json, rounded  # noqa: E402
from moeflash.engine.forward import run_tokens

CAPS = {
    "native": {},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
QUESTION = "What is the capital of France?"


def real_text(n_chars: int) -> str:
    """English prose shipped with Python: the language reference's topic pages."""
    from pydoc_data.topics import topics

    parts, size = [], 0
    for key in ("if", "while", "for", "try", "with", "function", "class"):
        parts.append(topics[key])
        size += len(topics[key])
        if size >= n_chars:
            break
    return "\n".join(parts)[:n_chars]


# ---- worker: one moeflash path in its own process ------------------------------------------------

@torch.inference_mode()
def worker(dtype: str, ids_file: str, out_file: str, threads: int) -> None:
    from moeflash.cli import _encode_prompt
    from moeflash.engine import LLMEngine, SamplingParams
    from moeflash.weights.build import load_model

    if threads:
        torch.set_num_threads(threads)
    model, tok = load_model("smollm2", dtype=dtype)
    ids = json.loads(Path(ids_file).read_text())
    st = [model.new_seq_state()]
    rows = []
    for t in ids:  # teacher-forced decode: one token per step
        rows.append(model.logits(run_tokens(model, torch.tensor([t]), st, [1])).float()[0].numpy())
    prompt = _encode_prompt(tok, QUESTION, chat=True, system=None)
    out = LLMEngine(model, tok).generate([prompt], SamplingParams(max_tokens=16, temperature=0.0))[0]
    np.save(out_file, np.stack(rows))
    print(json.dumps({"answer": out.text, "dtype": str(model.embed.weight.dtype)}))


def run_worker(dtype: str, cap: str, ids_file: str, threads: int) -> tuple[np.ndarray, dict]:
    out = tempfile.mktemp(suffix=".npy")
    env = {**os.environ, **CAPS[cap]}
    r = subprocess.run([sys.executable, __file__, "--worker", dtype, ids_file, out, "--threads", str(threads)],
                       env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"worker {dtype}/{cap} failed:\n{r.stderr[-2000:]}")
    logits = np.load(out)
    os.unlink(out)
    return logits, json.loads(r.stdout.strip().splitlines()[-1])


# ---- llama.cpp paths -----------------------------------------------------------------------------

def llama_cpp_logits(path: Path, ids: list[int], threads: int, f32_cache: bool) -> tuple[np.ndarray, str]:
    """llama.cpp's logits, one token per call; `f32_cache` keeps keys and values in F32 (the reference),
    else llama.cpp's default F16 cache (as a user runs it)."""
    import llama_cpp

    from moeflash.weights.build import load_model

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    llm = llama_cpp.Llama(str(path), n_ctx=len(ids) + 64, n_batch=1, n_threads=threads or 2, logits_all=True,
                          verbose=False, **cache)
    rows = []
    for t in ids:  # one token per call: the decode path
        llm.eval([t])
        rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
    llm.reset()
    from moeflash.cli import _encode_prompt

    _, tok = load_model("smollm2", dtype="float32")
    prompt = _encode_prompt(tok, QUESTION, chat=True, system=None)
    answer = []
    llm.eval(prompt)
    for _ in range(16):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt == tok.eos_token_id:
            break
        answer.append(nxt)
        llm.eval([nxt])
    llm.close()
    return np.stack(rows), tok.decode(answer)


def distance(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    d = np.abs(got - ref)
    lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "mean_kl_nats": float(kl.mean()),
            "max_kl_nats": float(kl.max()), "top1_agree": float((ref.argmax(-1) == got.argmax(-1)).mean())}


# ---- speed ---------------------------------------------------------------------------------------

@torch.inference_mode()
def decode_speed(model, tokens: int) -> float:
    from common import moeflash_greedy_steps

    times, *_ = moeflash_greedy_steps(model, torch.arange(1, 17), 4, tokens)
    return len(times) / sum(times)


def speed(rounds: int, tokens: int) -> dict:
    from common import make_or_load

    from moeflash.weights.build import load_model

    res: dict = {}
    for _ in range(rounds):
        for dtype in ("float32", "bfloat16"):
            smol, _ = load_model("smollm2", dtype=dtype)
            res.setdefault("smollm2", {}).setdefault(dtype, []).append(decode_speed(smol, tokens))
            del smol
            mini = make_or_load("mini", dtype)
            res.setdefault("mini", {}).setdefault(dtype, []).append(decode_speed(mini, tokens))
            del mini
    out = {}
    for model, by_dtype in res.items():
        out[model] = {d: {"median_tok_s": float(np.median(v)), "min": min(v), "max": max(v), "runs": v}
                      for d, v in by_dtype.items()}
        out[model]["fp32_over_bf16"] = out[model]["float32"]["median_tok_s"] / out[model]["bfloat16"]["median_tok_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=320, help="tokens of real text teacher-forced per path")
    p.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (0: skip the speed part)")
    p.add_argument("--speed-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--worker", nargs=3, metavar=("DTYPE", "IDS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker, args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)

    from moeflash.weights.build import load_model, smollm2_path
    from moeflash.weights.gguf import requantize

    _, tok = load_model("smollm2", dtype="float32")
    ids = tok.encode(real_text(8 * args.tokens))[: args.tokens]
    work = Path(tempfile.mkdtemp(prefix="moeflash-dtype-"))
    ids_file = work / "ids.json"
    ids_file.write_text(json.dumps(ids))
    f32 = work / "smollm2-f32.gguf"
    requantize(smollm2_path(), f32, "F32")
    t0 = time.perf_counter()
    ref, ref_answer = llama_cpp_logits(f32, ids, args.threads, f32_cache=True)
    q41, q41_answer = llama_cpp_logits(smollm2_path(), ids, args.threads, f32_cache=False)
    paths = {"llama.cpp F32 copy, F32 cache (reference)": (distance(ref, ref), ref_answer),
             "llama.cpp Q4_1 file, defaults (8-bit activations, F16 cache)": (distance(ref, q41), q41_answer)}
    flags = cpu_flags()
    for dtype in ("float32", "bfloat16"):
        for cap in CAPS:
            if cap == "avx512" and "avx512f" not in flags:
                continue
            log(f"[dtype_tolerance] moeflash {dtype} under {cap}")
            logits, info = run_worker(dtype, cap, str(ids_file), args.threads)
            paths[f"moeflash {dtype}, {cap}"] = (distance(ref, logits), info["answer"])
    table = {name: {**d, "answer": a} for name, (d, a) in paths.items()}
    out = {"bench": "dtype_tolerance", "machine": machine_info(), "tokens": len(ids),
           "text": "pydoc_data.topics (if, while, for, ...)", "tolerance": table,
           "tolerance_seconds": time.perf_counter() - t0}
    if args.rounds:
        out["decode_speed"] = speed(args.rounds, args.speed_tokens)
    print_json(rounded(out, 6))


if __name__ == "__main__":
    main()
