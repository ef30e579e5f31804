"""`--dtype auto` keeps the embedded model's answers on every CPU.

auto picks float32 whenever fp32 weights fit (weights/build.py: bf16 answers depend on the CPU's bf16
kernels); SmolLM2's Q4_1 / Q8_0 matrices then stay packed and run moeflash's native kernels, whose
instruction-set path follows ATEN_CPU_CAPABILITY too. Each instruction-set path that auto can take is run here in a subprocess capped by environment
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), so one machine checks what AVX2-only
and AVX-512 CPUs compute: the README's prompts must give llama.cpp's greedy tokens on an F32 copy of the
same GGUF file, with logits within fp32 noise. The cap is verified inside the subprocess, so a cap that
did not take cannot pass for one that did.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from moeflash.config import ModelConfig
from moeflash.weights import build
from moeflash.weights.build import resolve_dtype, smollm2_path

from .cpu import cpu_flags

PROMPTS = ["What is the capital of France?", "Give me three tips for staying healthy."]
STEPS = 24

CAPS = {
    "native": ({}, None),
    "avx512": ({"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                "MKL_ENABLE_INSTRUCTIONS": "AVX512"}, "AVX512"),
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
             "AVX2"),
}

WORKER = r"""
import json, sys
import numpy as np, torch
from moeflash.cli import _encode_prompt
from moeflash.engine import LLMEngine, SamplingParams
from moeflash.weights.build import load_model

prompts, steps, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(2)
model, tok = load_model("smollm2", dtype="auto")
ids = [_encode_prompt(tok, p, chat=True, system=None) for p in prompts]
res = LLMEngine(model, tok).generate(ids, SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True))
logits = {}
with torch.no_grad():
    for i, (p, r) in enumerate(zip(ids, res)):
        logits[str(i)] = model(torch.tensor([p + r.token_ids[:-1]]))[0].numpy()
np.savez(out, **logits)
from moeflash.kernels import build
build.load()
print(json.dumps({"dtype": str(model.embed.weight.dtype), "capability": torch.backends.cpu.get_cpu_capability(),
                  "kernels": torch.ops.moeflash.isa(),
                  "ids": ids, "greedy": [r.token_ids for r in res],
                  "text": [tok.decode(r.token_ids, skip_special_tokens=True) for r in res]}))
"""


def test_auto_is_float32_when_it_fits_and_bfloat16_when_it_does_not(monkeypatch):
    from moeflash.weights.gguf import GGUFFile, llama_config

    smol = llama_config(GGUFFile(smollm2_path()))
    tiny = ModelConfig.preset("tiny")
    monkeypatch.setattr(build, "available_ram", lambda: 16 << 30)
    assert resolve_dtype("auto", smol) == torch.float32
    assert resolve_dtype("auto", tiny) == torch.float32
    # whatever the CPU: the choice follows memory only
    monkeypatch.setattr(build, "available_ram", lambda: 100 << 20)  # 0.4 x 100 MiB < 4 x 135M bytes
    assert resolve_dtype("auto", smol) == torch.bfloat16
    assert resolve_dtype("float32", smol) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float16", smol)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """llama.cpp's greedy tokens and logits on an F32 copy of the shipped Q4_1 file."""
    from moeflash.cli import _encode_prompt
    from moeflash.weights.build import load_model
    from moeflash.weights.gguf import requantize

    from .test_gguf_llama import llama_cpp_greedy, llama_cpp_model

    path = tmp_path_factory.mktemp("smol") / "smollm2-f32.gguf"
    requantize(smollm2_path(), path, "F32")
    ll = llama_cpp_model(path)
    _, tok = load_model("smollm2", dtype="float32")
    out = []
    for p in PROMPTS:
        ids = _encode_prompt(tok, p, chat=True, system=None)
        out.append((ids, *llama_cpp_greedy(ll, ids, STEPS)))
    ll.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("cap", list(CAPS))
def test_auto_keeps_llama_cpp_answers_under_each_instruction_set(cap, reference, tmp_path):
    env_cap, capability = CAPS[cap]
    if cap == "avx512" and "avx512f" not in cpu_flags():
        pytest.skip("this CPU has no AVX-512")
    import os

    out = tmp_path / "logits.npz"
    r = subprocess.run([sys.executable, "-c", WORKER, json.dumps(PROMPTS), str(STEPS), str(out)],
                       env={**os.environ, **env_cap}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    if capability:
        assert got["capability"] == capability, got["capability"]  # the cap took effect
        assert got["kernels"] == capability.lower()  # moeflash's own kernels follow ATen's cap
    assert got["dtype"] == "torch.float32"
    logits = np.load(out)
    for i, (ids, ref_greedy, ref_logits) in enumerate(reference):
        assert got["ids"][i] == ids
        err = np.abs(logits[str(i)] - ref_logits).max()
        print(f"\n[dtype auto, {cap}] {PROMPTS[i]!r}: max|dlogit| {err:.2e}: {got['text'][i][:60]!r}")
        assert got["greedy"][i] == ref_greedy, got["text"][i]
        assert err < 1e-3
    assert "Paris" in got["text"][0]
