"""A long document read once, then questioned many times: time to first token with the prefix cache.

For each model: a random document of `--doc-tokens` tokens, then `--questions` questions of 24 random
tokens each, one after another through `LLMEngine` with a `PrefixCache` (RAM, plus a disk tier in a
temporary directory), the server's hint at the document's end. Reports the time to first token (TTFT) of
question 1 (the whole document prefilled) and of questions 2..N (the document's state reused), their
ratio, then the same after a "restart": a new engine and cache on the same directory, so the first
question (a new one) reads the state from disk (its pages dropped from the page cache first, so the read
is cold). Also the saved state's bytes per token against the model's own formula, and the disk tier's
write and read throughput against probes on the same directory and bytes (a plain write, a cold read,
the checksum, safetensors' serialisation). Greedy tokens with and without a hit are compared.

    python bench/prefix_cache.py --threads 2                       # mini 16K and SmolLM2 8K (its context)
    python bench/prefix_cache.py --models mini --doc-tokens 4096   # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import add_common_args, apply_common_args, log, machine_info, make_or_load, print_json, rounded

from moeflash.engine import LLMEngine, SamplingParams  # noqa: E402
from moeflash.engine.prefix_cache import PrefixCache  # noqa: E402

PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def load(name: str):
    if name == "smollm2":
        from moeflash.engine.load import load_model

        return load_model("smollm2", dtype="float32")[0]
    return make_or_load(name, "float32")


def run_request(engine: LLMEngine, prompt: list[int], params: SamplingParams, hints=()) -> tuple[float, object]:
    """(seconds to the first token, the final output) of one request run alone through `engine`."""
    t0 = time.perf_counter()
    rid = engine.add_request(prompt, params, cache_hints=list(hints))
    first, final = None, None
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid and first is None and o.new_token_ids:
                first = time.perf_counter() - t0
            if o.request_id == rid and o.finished:
                final = o
    return first, final


def ttft(engine: LLMEngine, prompt: list[int], hint: int) -> tuple[float, list[int], int]:
    first, out = run_request(engine, prompt, PARAMS, [hint])
    return first, out.token_ids, out.cached_tokens


def drop_pages(path) -> None:
    """Write a file back and drop its pages from the page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def probes(directory: str, state) -> dict:
    """What the disk tier's time is made of, on the same directory and the same bytes: a plain write
    (to the page cache, as the tier writes), a cold read (`probe_disk`), the checksum over the state's
    tensors, and safetensors' serialisation to memory."""
    from safetensors.torch import save

    from moeflash.engine.prefix_cache import _digest
    from moeflash.plan.hardware import probe_disk

    tensors, _ = state.to_tensors()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    t0 = time.perf_counter()
    _digest(tensors)
    t_sum = time.perf_counter() - t0
    t0 = time.perf_counter()
    blob = save(tensors)
    t_ser = time.perf_counter() - t0
    sub = Path(directory) / "probe"
    sub.mkdir()
    t0 = time.perf_counter()
    (sub / "write").write_bytes(blob)
    t_write = time.perf_counter() - t0
    (sub / "write").unlink()
    cold = probe_disk(sub, mib=max(64, nbytes >> 20))
    sub.rmdir()
    return {"state_tensor_bytes": nbytes, "checksum_gb_per_s": nbytes / t_sum / 1e9,
            "serialise_gb_per_s": nbytes / t_ser / 1e9, "plain_write_gb_per_s": len(blob) / t_write / 1e9,
            "cold_read_gb_per_s": cold}


def run_model(name: str, doc_tokens: int, questions: int, seed: int) -> dict:
    model = load(name)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(0, vocab, (doc_tokens,), generator=g).tolist()
    qs = [torch.randint(0, vocab, (24,), generator=g).tolist() for _ in range(questions + 1)]
    fresh = qs.pop()  # asked only after the restart
    out: dict = {"model": name, "doc_tokens": doc_tokens, "block_tokens": model.prefix_block_tokens}
    with tempfile.TemporaryDirectory(prefix="moeflash-prefix-") as d, torch.inference_mode():
        cache = PrefixCache.for_model(model, 8 << 30, d, 8 << 30)
        engine = LLMEngine(model, max_num_batched_tokens=512, prefix_cache=cache)
        times, tokens, cached = [], [], []
        for q in qs:
            t, toks, c = ttft(engine, doc + q, doc_tokens)
            times.append(t)
            tokens.append(toks)
            cached.append(c)
            log(f"{name}: question {len(times)}: ttft {t:.3f} s, cached {c}")
        cache.disk.flush()
        ref = LLMEngine(model, max_num_batched_tokens=512)  # without the cache: the same tokens?
        _, ref_tokens, _ = ttft(ref, doc + qs[1], doc_tokens)
        _, ref_fresh, _ = ttft(ref, doc + fresh, doc_tokens)
        state_bytes = max(e.nbytes for e in cache._entries.values())
        saved_at = max(e.tokens for e in cache._entries.values())
        doc_state = max(cache._entries.values(), key=lambda e: e.tokens).state
        probe = probes(d, doc_state)
        for f in Path(d).glob("*.safetensors"):  # the restart reads cold from the disk, not the page cache
            drop_pages(f)
        # a restart: a new engine and cache on the same directory; the first question reads the disk
        cache2 = PrefixCache.for_model(model, 8 << 30, d, 8 << 30)
        engine2 = LLMEngine(model, max_num_batched_tokens=512, prefix_cache=cache2)
        t_disk, toks_disk, c_disk = ttft(engine2, doc + fresh, doc_tokens)
        disk, written = cache2.disk.stats, cache.disk.stats
        out.update({
            "ttft_q1_s": times[0], "ttft_q2_to_qn_median_s": statistics.median(times[1:]),
            "ttft_q2_to_qn_max_s": max(times[1:]), "ratio_median": statistics.median(times[1:]) / times[0],
            "cached_tokens": cached, "tokens_equal_without_cache": ref_tokens == tokens[1],
            "after_restart": {"ttft_s": t_disk, "ratio": t_disk / times[0], "cached_tokens": c_disk,
                              "tokens_equal": toks_disk == ref_fresh, "disk_reads": disk["read"],
                              "disk_read_gb_per_s": disk["bytes_read"] / max(disk["read_seconds"], 1e-9) / 1e9},
            "state_bytes_at_doc": state_bytes, "state_tokens": saved_at,
            "state_bytes_formula": model.state_bytes(saved_at),
            "disk_bytes": cache.disk.bytes, "disk_files_written": written["written"],
            "disk_write_gb_per_s": written["bytes_written"] / max(written["write_seconds"], 1e-9) / 1e9,
            "probes": probe,
        })
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mini", "smollm2"])
    p.add_argument("--doc-tokens", type=int, nargs="+", default=None,
                   help="one per model (default: 16384 for mini, 8000 for smollm2, whose context is 8192)")
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    defaults = {"mini": 16384, "smollm2": 8000}
    docs = args.doc_tokens or [defaults.get(m, 4096) for m in args.models]
    results = [run_model(m, n, args.questions, args.seed) for m, n in zip(args.models, docs)]
    print_json(rounded({"results": results, "machine": machine_info()}))


if __name__ == "__main__":
    main()
