"""Structured output: the cost of a grammar's token mask next to a decode step, and the two grammar
engines on PyPI compared on the same vocabulary and schema.

1. SmolLM2 (fp32) writes JSON for a schema through `LLMEngine` with an llguidance constraint: the
   time of each mask (computing the allowed tokens and applying them to the logits) against the time
   of each engine step, and the same generation without the constraint.
2. llguidance and outlines-core on SmolLM2's 49,152-token vocabulary: compile time of the schema and
   the time to produce each token's allowed set along a valid output (outlines-core only if installed).

    python bench/structured.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import add_common_args, apply_common_args, machine_info, print_json, rounded

from moeflash.engine import LLMEngine, SamplingParams  # noqa: E402
from moeflash.engine.load import load_model  # noqa: E402
from moeflash.structured import Constraint, GrammarCompiler  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer"},
                                           "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
          "required": ["name", "age", "languages"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}
PROMPT = "A famous programmer described as JSON with name, age and languages: "


def engine_run(model, tok, constraint, max_tokens: int) -> dict:
    masks: list[float] = []
    orig = Constraint.mask_

    def timed(self, logits):
        t0 = time.perf_counter()
        orig(self, logits)
        masks.append(time.perf_counter() - t0)

    Constraint.mask_ = timed
    try:
        eng = LLMEngine(model, tok)
        rid = eng.add_request(tok.encode(PROMPT, special=False),
                              SamplingParams(max_tokens=max_tokens, temperature=0, constraint=constraint))
        steps, text = [], ""
        while eng.has_unfinished():
            t0 = time.perf_counter()
            for o in eng.step():
                if o.request_id == rid and o.finished:
                    text = o.text
            steps.append(time.perf_counter() - t0)
    finally:
        Constraint.mask_ = orig
    decode = steps[1:]  # the first step is the prefill
    return {"text": text, "steps": len(steps), "decode_step_ms_median": 1e3 * statistics.median(decode),
            "mask_us_median": 1e6 * statistics.median(masks) if masks else None,
            "mask_us_max": 1e6 * max(masks) if masks else None,
            "mask_share_of_step": statistics.median(masks) / statistics.median(decode) if masks else None}


def engines(tok, vocab: int) -> dict:
    out = {}
    target = json.dumps({"name": "Grace Hopper", "age": 85, "languages": ["COBOL", "FLOW-MATIC"]},
                        separators=(",", ":"))
    ids = tok.encode(target, special=False)
    t0 = time.perf_counter()
    comp = GrammarCompiler(tok, vocab, tok.eos_token_id)
    t_vocab = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = comp.compile("json_schema", SCHEMA)
    c = g.new()
    t_comp = time.perf_counter() - t0
    import torch

    times = []
    for t in ids:
        logits = torch.zeros(vocab)
        t0 = time.perf_counter()
        c.mask_(logits)
        times.append(time.perf_counter() - t0)
        c.accept(t)
    out["llguidance"] = {"vocabulary_ms": 1e3 * t_vocab, "compile_ms": 1e3 * t_comp,
                         "mask_us_median": 1e6 * statistics.median(times), "mask_us_max": 1e6 * max(times)}
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        out["outlines_core"] = "not installed (pip install outlines-core)"
        return out
    t0 = time.perf_counter()
    vmap: dict[str, list[int]] = {}
    for i in range(vocab):
        if i == tok.eos_token_id:
            continue
        b = tok.token_bytes(i)
        vmap.setdefault(b.decode("utf-8", errors="replace") if b else f"<{i}>", []).append(i)
    voc = Vocabulary(tok.eos_token_id, vmap)
    t_vocab = time.perf_counter() - t0
    schema = {k: v for k, v in SCHEMA.items() if k != "x-guidance"}
    t0 = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(schema)), voc))
    t_comp = time.perf_counter() - t0
    times = []
    for t in ids:
        t0 = time.perf_counter()
        allowed = torch.tensor(guide.get_tokens())
        logits = torch.zeros(vocab)
        logits[allowed] += 0  # what applying the set costs
        times.append(time.perf_counter() - t0)
        guide.advance(t)
    out["outlines_core"] = {"vocabulary_ms": 1e3 * t_vocab, "compile_ms": 1e3 * t_comp,
                            "mask_us_median": 1e6 * statistics.median(times), "mask_us_max": 1e6 * max(times)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=60)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    model, tok = load_model("smollm2", dtype="float32")
    vocab = model.config.vocab_size
    comp = GrammarCompiler(tok, vocab, model.config.eos_token_id)
    constrained = engine_run(model, tok, comp.compile("json_schema", SCHEMA), args.max_tokens)
    free = engine_run(model, tok, None, args.max_tokens)
    print_json(rounded({"smollm2_json_schema": constrained, "smollm2_unconstrained": free,
                        "grammar_engines": engines(tok, vocab), "machine": machine_info()}))


if __name__ == "__main__":
    main()
