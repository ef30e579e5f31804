"""How many torch ops one batch-1 decode step dispatches, per layer kind: the "ATen ops per layer per token"
of issue 25, counted two ways on a V4 checkpoint in the official format (default `mini`, `--numerics fast`).

- `top_level`: the ops the model's Python code dispatches (a `TorchDispatchMode` sees each call once, with
  the line of moeflash that made it), split by the layer (`sliding`, `csa`, `hca`) whose forward made it and
  `other` (embedding, the hyper head, the LM head, the engine's bookkeeping);
- `profiler`: every ATen op the torch profiler records in the step, nested ones included (a native op's
  allocations, a view's `as_strided`), and the native `moeflash::` calls.

Both counts are of one step at position `--prompt`, after a few warm-up steps. No timing: the counts do not
depend on this VM's noise. Run it at two commits to compare (the JSON carries the commit).

    python bench/step_ops.py [--preset mini] [--numerics fast] [--batch 1]
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import add_common_args, apply_common_args, machine_info, official_files, print_json
from moeflash.engine.forward import advance, run_tokens
from moeflash.engine.load import load_model


class _Counter(TorchDispatchMode):
    """Counts each dispatched op by the block (model/v4.py Block) running when it is dispatched."""

    def __init__(self, kinds: dict[int, str]):
        super().__init__()
        self.kinds, self.counts = kinds, collections.Counter()

    layer = -1  # the block running now (set and cleared by hooks on the blocks), -1 outside them

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.kinds.get(_Counter.layer, "other")] += 1
        return func(*args, **(kwargs or {}))


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--numerics", default="fast", choices=["exact", "reference", "fast"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    ckpt, _ = official_files(args.preset)
    model, _ = load_model(ckpt, numerics=args.numerics)
    short = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa", "heavily_compressed_attention": "hca"}
    kinds = {i: short.get(layer.layer_type, layer.layer_type) for i, layer in enumerate(model.layers)}
    per_kind = collections.Counter(kinds.values())
    b = args.batch
    states = [model.new_seq_state() for _ in range(b)]
    x = run_tokens(model, torch.arange(1, args.prompt + 1).repeat(b), states, [args.prompt] * b)
    advance(states, [args.prompt] * b)
    nxt = model.logits(x[torch.arange(1, b + 1) * args.prompt - 1]).argmax(-1)

    def step(nxt):
        out = run_tokens(model, nxt, states, [1] * b)
        advance(states, [1] * b)
        return model.logits(out).argmax(-1)

    for _ in range(3):
        nxt = step(nxt)
    # which layer is running: a forward pre-hook on each block sets it for the counter
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: setattr(_Counter, "layer", i))
             for i, layer in enumerate(model.layers)]
    hooks += [layer.register_forward_hook(lambda m, a, o: setattr(_Counter, "layer", -1)) for layer in model.layers]
    counter = _Counter(kinds)
    with counter:
        nxt = step(nxt)
    for h in hooks:
        h.remove()
    with torch.profiler.profile() as prof:
        nxt = step(nxt)
    events = prof.key_averages()
    aten = sum(e.count for e in events if e.key.startswith("aten::"))
    native = {e.key: e.count for e in events if e.key.startswith("moeflash::")}
    top = dict(counter.counts)
    print_json({
        "bench": "step_ops", "preset": args.preset, "numerics": args.numerics, "batch": b, "position": args.prompt + 3,
        "layers": dict(per_kind),
        "top_level": {"step": sum(top.values()), "by_kind": top,
                      "per_layer": {k: round(top.get(k, 0) / n, 1) for k, n in per_kind.items()}},
        "profiler": {"aten_ops_step": aten, "native_calls_step": sum(native.values()), "native": native},
        "machine": machine_info()})


if __name__ == "__main__":
    main()
