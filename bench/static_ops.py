"""How many kernels a GPU would launch for one static decode step (what a CUDA graph replays), counted
on the CPU: the step runs with the plain-torch paths a CUDA tensor takes, each call that is one Triton
kernel on a GPU (FP8 linear, FP4 MoE, Sinkhorn, RMSNorm, RoPE, mHC's collapse and expand, mHC's
weights as three) counted once, views and same-dtype casts not counted.

Why: inside a graph a kernel still costs a microsecond or two however little it does, so at batch 1 the
kernel count, not the bytes, can set the step time. A V4-Flash step reads ~11 GB (2.3 ms at 4.8 TB/s);
this count times the layers says how many of those microseconds the step spends on kernel floors.

    python bench/static_ops.py [--model DIR]      # default: the tiny preset in the official format
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from common import ROOT, print_json

import moeflash.kernels as K
import moeflash.kernels.linear  # noqa: F401 (imports fp8_linear by name: patched below)
import moeflash.model.moe  # noqa: F401 (imports moe_fp4 by name: patched below)
import moeflash.model.hyper as hyper
import moeflash.model.v4 as v4
from moeflash.engine.forward import advance, run_tokens
from moeflash.engine.graphs import GraphDecoder
from moeflash.kernels import reference
from moeflash.weights.build import load_model

VIEWS = {"aten::view", "aten::slice", "aten::unsqueeze", "aten::select", "aten::reshape", "aten::flatten",
         "aten::unflatten", "aten::split_with_sizes", "aten::split", "aten::expand", "aten::transpose", "aten::t",
         "aten::chunk", "aten::squeeze", "aten::permute", "aten::as_strided", "aten::alias", "aten::detach",
         "aten::empty", "aten::empty_like", "aten::contiguous", "aten::_unsafe_view", "aten::narrow",
         "aten::view_as", "aten::lift_fresh"}


def one_kernel(fn):
    def run(*a, **kw):
        with record_function("TRITON"):
            return fn(*a, **kw)
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a V4 checkpoint directory (default: tiny, official format)")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    path = args.model
    if path is None:
        path = str(Path(tempfile.mkdtemp()) / "tiny-official")
        subprocess.run([sys.executable, "-m", "moeflash.cli", "convert", "--preset", "tiny", "--official", "--out",
                        path], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    K.native(torch.zeros(1))
    K._NATIVE[:] = [False]  # the paths a CUDA tensor takes where Triton has no kernel
    for name in ("fp8_linear", "moe_fp4", "sinkhorn", "rms_norm", "apply_rope"):
        original = getattr(K, name)
        wrapped = one_kernel(original)
        # every module that imported the function by name (model/moe.py imports moe_fp4, kernels/linear.py
        # fp8_linear): patching only `kernels` left those calling the plain-torch loop, counted op by op
        for mod in [K] + [m for n, m in sys.modules.items() if n.startswith("moeflash.") and m is not None]:
            if getattr(mod, name, None) is original:
                setattr(mod, name, wrapped)
    # mHC on a GPU: the weights are three kernels (a cast, the mix GEMM, one Triton kernel); the collapse
    # and the expand one Triton kernel each
    hc_post = one_kernel(lambda *a: reference.hc_weights(*a))
    K.hc_weights = (lambda x, fn, base, scale, iters, he, ne: (
        x.float(), torch.nn.functional.linear(x.flatten(-2).float(), fn.float()),
        hc_post(x, fn, base, scale, iters, he, ne))[-1])
    for fn_name in ("hc_collapse", "hc_expand"):
        wrapped = one_kernel(getattr(hyper, fn_name))
        setattr(hyper, fn_name, wrapped)
        setattr(v4, fn_name, wrapped)
    model, _ = load_model(path, args.dtype)
    dec = GraphDecoder(model, 1, 128)
    st = model.new_seq_state()
    with torch.inference_mode():
        run_tokens(model, torch.arange(1, 20), [st], [19])
        dec.decode([st], torch.tensor([5]))
        advance([st], [1])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dec._step(1)

    def top(e) -> bool:
        q = e.cpu_parent
        while q is not None:
            if q.name == "TRITON" or q.name.startswith("aten::"):
                return False
            q = q.cpu_parent
        return True

    def launches(e) -> bool:
        if e.name in VIEWS:
            return False
        if e.name == "aten::to":  # a cast to the same dtype launches nothing
            return any(ch.name == "aten::_to_copy" for ch in e.cpu_children)
        return True

    ops = collections.Counter(e.name for e in prof.events()
                              if (e.name == "TRITON" or e.name.startswith("aten::")) and top(e) and launches(e))
    layers = model.config.num_hidden_layers
    total = sum(ops.values())
    print_json({"bench": "static_ops", "model": path, "dtype": args.dtype, "layers": layers,
                "layer_types": model.config.layer_types, "kernels_per_step": total,
                "kernels_per_layer": total / layers, "v4_flash_kernels_per_step_est": round(total / layers * 43),
                "by_op": dict(ops.most_common())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
