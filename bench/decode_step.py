"""Does a compiled decode step pay on the CPU? Eager against the static step, plain and torch.compile'd.

Batch-B greedy decode of a V4 checkpoint (default: `mini` in the official format, `--numerics fast`) in
three ways, in interleaved rounds (this VM is noisy):
- `eager`: `run_tokens` (the engine's path on the CPU: per-sequence state, ~330 ATen ops per layer);
- `static`: engine/graphs.GraphDecoder without capture: `Transformer.forward_static` over batched static
  slots (fixed shapes, masks instead of branches, entry buffers read to their capacity `--max-len`);
- `compiled`: the same static step through `torch.compile(dynamic=False)`: one graph, thanks to the
  native ops' fake kernels (kernels/fake.py); Inductor fuses the small ops between the native calls.
  `--cpp-wrapper` also sets Inductor's C++ wrapper (no Python between its kernels).

Each round decodes `--tokens` timed steps after `--warmup` untimed ones (a step: the forward, the logits
and the argmax); compile time is the compiled variant's first warm-up. Reported: ms/token median, min and
max over rounds, the ratio to eager, whether every variant's greedy tokens equal eager's, and the ATen ops
a step dispatches in each variant (torch profiler, one step).

    python bench/decode_step.py --threads 2 [--batch 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import add_common_args, apply_common_args, log, machine_info, official_files, print_json, rounded
from moeflash.engine.forward import advance, run_tokens
from moeflash.engine.graphs import GraphDecoder
from moeflash.engine.load import load_model


class Variant:
    """One way to run the decode step, with its own states (each variant decodes the same greedy text)."""

    def __init__(self, model, name: str, batch: int, max_len: int):
        self.model, self.name, self.batch = model, name, batch
        self.graphs = None if name == "eager" else GraphDecoder(model, batch, max_len, compile=name == "compiled")

    def start(self, prompt: torch.Tensor):
        model, b = self.model, self.batch
        self.states = [model.new_seq_state() for _ in range(b)]
        x = run_tokens(model, prompt.repeat(b), self.states, [len(prompt)] * b)
        rows = torch.arange(1, b + 1) * len(prompt) - 1
        self.next = model.logits(x[rows]).argmax(-1)
        self.tokens = [self.next.tolist()]

    def step(self) -> None:
        if self.graphs is None:
            x = run_tokens(self.model, self.next, self.states, [1] * self.batch)
        else:
            x = self.graphs.decode(self.states, self.next)
            advance(self.states, [1] * self.batch)
        self.next = self.model.logits(x).argmax(-1)
        self.tokens.append(self.next.tolist())


def aten_ops(variant: Variant) -> int:
    with torch.profiler.profile() as prof:
        variant.step()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--numerics", default="fast", choices=["exact", "reference", "fast"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-len", type=int, default=256, help="the static slots' length")
    p.add_argument("--cpp-wrapper", action="store_true")
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    if args.cpp_wrapper:
        import torch._inductor.config as inductor

        inductor.cpp_wrapper = True
    ckpt, _ = official_files(args.preset)
    model, _ = load_model(ckpt, numerics=args.numerics)
    prompt = torch.arange(1, 17)
    variants = [Variant(model, name, args.batch, args.max_len) for name in ("eager", "static", "compiled")]
    times = {v.name: [] for v in variants}
    warm = {}
    for r in range(args.rounds):
        for v in variants:
            log(f"round {r + 1}/{args.rounds}: {v.name}")
            v.start(prompt)
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                v.step()
            warm.setdefault(v.name, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(args.tokens):
                v.step()
            times[v.name].append(1e3 * (time.perf_counter() - t0) / args.tokens)
    eager = statistics.median(times["eager"])
    out = {"bench": "decode_step", "preset": args.preset, "numerics": args.numerics, "batch": args.batch, "max_len": args.max_len,
           "cpp_wrapper": args.cpp_wrapper, "variants": {}}
    for v in variants:
        ms = times[v.name]
        out["variants"][v.name] = {
            "ms_per_step": {"median": statistics.median(ms), "min": min(ms), "max": max(ms)},
            "ms_per_token": statistics.median(ms) / args.batch,
            "vs_eager": eager / statistics.median(ms), "first_warmup_s": warm[v.name],
            "same_tokens_as_eager": v.tokens == variants[0].tokens, "aten_ops_per_step": aten_ops(v)}
    out["machine"] = machine_info()
    print_json(rounded(out))


if __name__ == "__main__":
    main()
