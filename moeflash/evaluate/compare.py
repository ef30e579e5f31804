"""`moeflash compare`: several models on the same text and tasks: quality, speed, memory and dollars.

For each model, one after another (each loaded alone, so its memory is its own):
- bits per byte on each text (`scoring.bits_per_byte`);
- task accuracy on a JSONL file (`tasks`), per tag;
- prefill and decode tokens/s measured here (median of `rounds`), and the resident memory its loading
  added (RSS, after the heap is trimmed);
- dollars per million input and output tokens: the hardware's price per hour over the measured
  tokens/s at `utilization` (the planner's arithmetic, `plan.planner.per_million_usd`);
- for a MoE model (V4, or a MoE-fied llama), the router's choices on each text and each task tag
  ("task:TAG"; `routing.RoutingStats`), for `routing.report`.

Everything is greedy and seeded, so a run is deterministic on a given machine.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..engine.forward import run_tokens
from .corpora import digest, load_text
from .scoring import bits_per_byte, continuation_logprob, greedy_answer
from .tasks import normalize_answer


@dataclass
class CompareInputs:
    models: list[str]
    texts: list[str] = field(default_factory=lambda: ["code", "prose"])  # files or built-in domains
    tasks: list[dict] | None = None           # from tasks.load_tasks
    max_bytes: int = 16384                    # of each text
    window: int = 1024                        # tokens per scoring window
    dtype: str = "float32"
    price_per_hour: float | None = None
    hardware: str = "cpu-2c"
    utilization: float = 0.5
    speed_prompt_tokens: int = 256
    speed_decode_tokens: int = 32
    rounds: int = 3
    max_answer_tokens: int = 32
    seed: int = 0


def _rss() -> int:
    from ..engine.async_engine import _trim_heap

    gc.collect()
    _trim_heap()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _params(model) -> dict:
    """Total and activated parameters per token, from the config (the weights may be held packed, as
    GGUF blocks or FP4, not as parameters): a V4 model as the planner counts it, a llama by its shapes."""
    c = model.config
    if hasattr(c, "num_parameters"):
        return {"params": c.num_parameters(), "activated_params": c.activated_parameters()}
    from ..plan.planner import model_summary

    s = model_summary(c)
    return {"params": s["total_params"], "activated_params": s["activated_params"]}


@torch.inference_mode()
def measure_speed(model, prompt_tokens: int, decode_tokens: int, rounds: int, seed: int) -> dict:
    """Median prefill and decode tokens/s at batch 1 over `rounds` (a warm-up round first)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=g)
    pre, dec = [], []
    for r in range(rounds + 1):
        state = model.new_seq_state()
        t0 = time.perf_counter()
        x = run_tokens(model, prompt, [state], [prompt_tokens])
        nxt = model.logits(x[-1:]).argmax(-1)
        t1 = time.perf_counter()
        for _ in range(decode_tokens):
            nxt = model.logits(run_tokens(model, nxt, [state], [1])).argmax(-1)
        t2 = time.perf_counter()
        if r:  # round 0 warms up
            pre.append(prompt_tokens / (t1 - t0))
            dec.append(decode_tokens / (t2 - t1))
    return {"prefill_tokens_per_s": statistics.median(pre), "decode_tokens_per_s": statistics.median(dec),
            "prefill_spread": [min(pre), max(pre)], "decode_spread": [min(dec), max(dec)], "rounds": rounds,
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens}


def score_tasks(model, tokenizer, tasks: list[dict], max_answer_tokens: int, progress=None, routing=None) -> dict:
    """Accuracy per tag and overall: exact match, and multiple choice (acc, acc_norm). With `routing`
    (a RoutingStats), each task's tokens are filed under "task:TAG"."""
    per: dict[str, dict] = {}
    on_rows = routing.take if routing is not None else None
    for t in tasks:
        row = per.setdefault(t["tag"], {"n": 0, "correct": 0, "correct_norm": 0})
        if routing is not None:
            routing.start(f"task:{t['tag']}")
        if t["kind"] == "exact":
            got = greedy_answer(model, tokenizer, t["prompt"], max_answer_tokens, on_rows=on_rows)
            ok = normalize_answer(got) == normalize_answer(t["answer"])
            row["correct"] += ok
            row["correct_norm"] += ok
        else:
            scores = [continuation_logprob(model, tokenizer, t["prompt"], c, on_rows) for c in t["choices"]]
            best = max(range(len(scores)), key=lambda i: scores[i][0])
            best_norm = max(range(len(scores)), key=lambda i: scores[i][0] / max(scores[i][1], 1))
            row["correct"] += best == t["answer_index"]
            row["correct_norm"] += best_norm == t["answer_index"]
        row["n"] += 1
        if progress is not None:
            progress(1)
    out = {tag: {"n": r["n"], "accuracy": r["correct"] / r["n"], "accuracy_norm": r["correct_norm"] / r["n"]}
           for tag, r in per.items()}
    n = sum(r["n"] for r in per.values())
    out["overall"] = {"n": n, "accuracy": sum(r["correct"] for r in per.values()) / n,
                      "accuracy_norm": sum(r["correct_norm"] for r in per.values()) / n}
    return out


def compare(inp: CompareInputs, load=None, progress_bar: bool = True) -> dict:
    """Run every model on the inputs; one JSON-ready dict (see the module docstring). `load(spec)`
    returns (model, tokenizer) (default: `engine.load.load_model` at `inp.dtype`)."""
    from ..plan.hardware import get_profile
    from ..plan.planner import per_million_usd
    from .routing import RoutingStats, is_moe

    if not inp.models:
        raise ValueError("give at least one model")
    if not 0 < inp.utilization <= 1:
        raise ValueError(f"--utilization must be in (0, 1], got {inp.utilization}")
    hw = get_profile(inp.hardware)
    price = inp.price_per_hour if inp.price_per_hour is not None else hw.price_per_hour
    texts = [load_text(spec, inp.max_bytes) for spec in inp.texts]
    names = [n for n, _ in texts]
    if len(set(names)) != len(names):
        raise ValueError(f"two texts share a name: {names}")
    if load is None:
        from ..engine.load import load_model

        def load(spec):
            return load_model(spec, dtype=inp.dtype)
    results = []
    for spec in inp.models:
        torch.manual_seed(inp.seed)
        before = _rss()
        t0 = time.perf_counter()
        model, tokenizer = load(spec)
        load_s = time.perf_counter() - t0
        if tokenizer is None:
            raise ValueError(f"{spec} has no tokenizer: compare scores text (give a model with tokenizer.json)")
        resident = _rss() - before
        routing = RoutingStats(model) if is_moe(model) else None
        res = {"model": str(spec), "architecture": "moe" if routing else "dense", **_params(model),
               "resident_bytes": resident, "load_seconds": load_s, "text": {}}
        total = sum(len(tokenizer.encode(t, special=False)) for _, t in texts) + len(inp.tasks or [])
        bar = _bar(total, f"{spec}", progress_bar)
        for name, text in texts:
            if routing is not None:
                routing.start(name)
            r = bits_per_byte(model, tokenizer, text, inp.window, progress=bar.update,
                              on_rows=routing.take if routing else None)
            res["text"][name] = {**r, "digest": digest(text)}
        if inp.tasks:
            res["tasks"] = score_tasks(model, tokenizer, inp.tasks, inp.max_answer_tokens, bar.update, routing)
        bar.close()
        if routing is not None:
            res["routing"] = routing.counts()
            res["routing_meta"] = routing.meta()
            res["routing_traces"] = routing.traces()
            routing.detach()
        res["speed"] = measure_speed(model, inp.speed_prompt_tokens, inp.speed_decode_tokens, inp.rounds, inp.seed)
        sp = res["speed"]
        res["usd_per_million"] = {
            "input": per_million_usd(price, sp["prefill_tokens_per_s"], inp.utilization),
            "output": per_million_usd(price, sp["decode_tokens_per_s"], inp.utilization)}
        results.append(res)
        del model, tokenizer, routing
        gc.collect()
    return {"models": results, "texts": {n: {"bytes": len(t.encode("utf-8")), "digest": digest(t)} for n, t in texts},
            "hardware": {"name": hw.name, "price_per_hour": price,
                         "price_source": "given" if inp.price_per_hour is not None else hw.sources.get("price_per_hour"),
                         "speeds": "measured on this machine"},
            "inputs": {"window": inp.window, "max_bytes": inp.max_bytes, "dtype": inp.dtype,
                       "utilization": inp.utilization, "seed": inp.seed, "tasks": len(inp.tasks or [])}}


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", leave=False)
