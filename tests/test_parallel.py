"""Expert parallelism on this machine: 2 processes (gloo), each holding half of every MoE layer's
experts, give the logits and greedy tokens of 1 process holding them all."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from moeflash.engine import LLMEngine, SamplingParams
from moeflash.engine.forward import run_tokens
from moeflash.engine.parallel import owned_experts
from moeflash.weights.build import build_tiny

PROMPTS = [[256, 72, 101, 108, 108, 111], [256] + list(range(40, 77))]  # different lengths, one batch
STEPS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens for both prompts together (continuous batching), and the logits of the first
    prompt's continuation fed one token at a time."""
    outs = LLMEngine(model).generate(PROMPTS, SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))
    tokens = [o.token_ids for o in outs]
    state = model.new_seq_state()
    x = run_tokens(model, torch.tensor(PROMPTS[0]), [state], [len(PROMPTS[0])])
    logits = [model.logits(x[-1:])[0]]
    for t in tokens[0][:-1]:
        logits.append(model.logits(run_tokens(model, torch.tensor([t]), [state], [1]))[0])
    return tokens, logits


def rank_main(rank: int, world: int, port: int, results):
    torch.set_num_threads(1)
    from moeflash.engine.parallel import ExpertParallel, shard_experts_

    ep = ExpertParallel(rank, world, init_method=f"tcp://127.0.0.1:{port}", timeout_s=60)
    try:
        model = build_tiny("float32")
        info = shard_experts_(model, rank, world, ep.all_reduce)
        with torch.inference_mode():
            tokens, logits = run(model)
        results[rank] = {"tokens": tokens, "logits": torch.stack(logits), "expert_bytes": info["expert_bytes"],
                         "owned": list(info["owned"])}
    finally:
        ep.close()


def test_two_ranks_equal_one():
    ref_model = build_tiny("float32")
    with torch.inference_mode():
        ref_tokens, ref_logits = run(ref_model)
    all_bytes = sum(p.numel() * p.element_size() for layer in ref_model.layers if hasattr(layer.ffn, "combine")
                    for e in layer.ffn.experts for p in e.parameters())
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(rank_main, args=(2, free_port(), results), nprocs=2, join=True)
    ref_logits = torch.stack(ref_logits)
    for rank in (0, 1):
        r = results[rank]
        # each layer's experts split in halves: rank 0 the first, rank 1 the second
        assert r["owned"] == list(owned_experts(8, rank, 2))
        assert r["expert_bytes"] * 2 == all_bytes
        # the partial sums add up in another order: equal to fp32 rounding
        assert torch.allclose(r["logits"], ref_logits, atol=1e-5, rtol=1e-5)
        # greedy tokens agree wherever the best token leads by more than rounding could move
        top2 = ref_logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3
        assert clear.sum() >= len(clear) - 1
        first_unclear = int((~clear).nonzero()[0]) if (~clear).any() else len(clear)
        assert r["tokens"][0][:first_unclear] == ref_tokens[0][:first_unclear]
    assert results[0]["tokens"] == results[1]["tokens"]  # lockstep: every rank computes the same


@pytest.mark.parametrize("n,world,ranges", [(8, 2, [range(0, 4), range(4, 8)]), (7, 3, [range(0, 3), range(3, 5), range(5, 7)])])
def test_owned_experts(n, world, ranges):
    assert [owned_experts(n, r, world) for r in range(world)] == ranges
    with pytest.raises(ValueError):
        owned_experts(2, 0, 3)


def test_generate_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m moeflash.cli generate ... --expert-parallel`: rank 0 prints what a
    single process prints (each of these 7 greedy tokens leads the next by >= 0.026, far above rounding)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    args = ["generate", "--model", "tiny", "--prompt-ids", "256,72,105", "--max-new-tokens", "7", "--json",
            "--threads", "1"]
    one = subprocess.run([sys.executable, "-m", "moeflash.cli", *args], capture_output=True, text=True, timeout=120)
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
                          "moeflash.cli", *args, "--expert-parallel"], capture_output=True, text=True, timeout=180)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    lines = [ln for ln in two.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 1 prints nothing
    assert json.loads(lines[0])["token_ids"] == json.loads(one.stdout)["token_ids"]
    # outside torchrun the flag is a clear error
    bad = subprocess.run([sys.executable, "-m", "moeflash.cli", *args, "--expert-parallel"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "torchrun" in bad.stderr


def _children_with_rank(pid: int, rank: int) -> list[int]:
    from pathlib import Path

    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().split()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[3]) == pid and f"RANK={rank}".encode() in env:
            out.append(int(proc.name))
    return out


def test_serve_under_torchrun_then_a_rank_dies(tmp_path):
    """Rank 0 serves what one process serves; killing rank 1 ends the whole run within the timeout
    (no hang), and rank 0 stops answering."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    port = free_port()
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
                             "moeflash.cli", "serve", "--model", "tiny", "--port", str(port), "--threads", "1",
                             "--expert-parallel", "--parallel-timeout", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise AssertionError("the expert-parallel server did not start: " + proc.stderr.read1().decode()[-2000:])
        body = {"model": "tiny", "prompt": [256, 72, 105], "max_tokens": 7, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        one = subprocess.run([sys.executable, "-m", "moeflash.cli", "generate", "--model", "tiny", "--prompt-ids",
                              "256,72,105", "--max-new-tokens", "7", "--json"], capture_output=True, text=True)
        assert r["choices"][0]["text"] == json.loads(one.stdout)["text"]
        # two prompts, n = 2: four sequences in lockstep
        r = httpx.post(url + "/v1/completions", timeout=60, json=dict(body, prompt=[[256, 72, 105], [256, 1, 2, 3]], n=2))
        assert [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 4
        agents = _children_with_rank(proc.pid, 1)
        assert agents, "rank 1 not found"
        os.kill(agents[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(Exception):  # no answer from rank 0 any more (an error, or the run is gone)
            got = httpx.post(url + "/v1/completions", json=body, timeout=30)
            if got.status_code == 200:
                raise AssertionError("rank 0 still served")
            raise RuntimeError(got.status_code)
        proc.wait(timeout=60)
        assert time.monotonic() - t0 < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def store_rank(rank: int, world: int, port: int, ckpt: str, results):
    torch.set_num_threads(1)
    from moeflash.engine.load import load_model
    from moeflash.engine.parallel import ExpertParallel, shard_experts_

    ep = ExpertParallel(rank, world, init_method=f"tcp://127.0.0.1:{port}", timeout_s=60)
    try:
        model, _ = load_model(ckpt, dtype="float32", expert_memory=1.0)
        shard_experts_(model, rank, world, ep.all_reduce)
        with torch.inference_mode():
            tokens, logits = run(model)
        store = model.expert_store
        read = {e for (layer, e) in store.cache}  # the experts this rank's store ever made resident
        results[rank] = {"logits": torch.stack(logits), "read": sorted(read), "bytes_read": store.stats()["bytes_read"]}
    finally:
        ep.close()


def test_each_rank_reads_only_its_own_experts(checkpoints):
    """With the expert store, rank r fetches only experts it owns from the checkpoint, and the
    logits equal one process's with every expert in memory."""
    from moeflash.engine.load import load_model

    ckpt = checkpoints["plain"]

    ref_model, _ = load_model(str(ckpt), dtype="float32")
    with torch.inference_mode():
        _, ref_logits = run(ref_model)
    results = mp.Manager().dict()
    mp.spawn(store_rank, args=(2, free_port(), str(ckpt), results), nprocs=2, join=True)
    for rank in (0, 1):
        r = results[rank]
        assert set(r["read"]) <= set(owned_experts(8, rank, 2)) and r["read"] and r["bytes_read"] > 0
        assert torch.allclose(r["logits"], torch.stack(ref_logits), atol=1e-5, rtol=1e-5)


def moefied_rank(rank: int, world: int, port: int, path: str, results):
    torch.set_num_threads(1)
    from moeflash.engine.load import load_model
    from moeflash.engine.parallel import ExpertParallel, shard_experts_

    ep = ExpertParallel(rank, world, init_method=f"tcp://127.0.0.1:{port}", timeout_s=60)
    try:
        model, _ = load_model(path, dtype="float32")
        info = shard_experts_(model, rank, world, ep.all_reduce)
        ids = [256, 72, 101, 108, 108, 111, 44, 32, 119]
        with torch.no_grad():
            results[rank] = {"logits": model(torch.tensor([ids]))[0], "expert_bytes": info["expert_bytes"]}
    finally:
        ep.close()


def test_two_ranks_equal_one_for_a_moefied_llama(tmp_path):
    from moeflash.evaluate.corpora import builtin_text
    from moeflash.moefy import moefy, save_gguf
    from moeflash.weights.build import load_gguf_model

    from .test_gguf_llama import write_tiny_llama

    src = tmp_path / "tiny.gguf"
    write_tiny_llama(src, "F32")
    model, tok = load_gguf_model(src, "float32")
    moefy(model, tok.encode(builtin_text("prose", 3000), special=False)[:600], 4, 2, router_hidden=0, steps=20)
    path = save_gguf(model, src, tmp_path / "moe.gguf")
    ref, _ = load_gguf_model(path, "float32")
    ids = [256, 72, 101, 108, 108, 111, 44, 32, 119]
    with torch.no_grad():
        want = ref(torch.tensor([ids]))[0]
    full = sum(t.numel() * t.element_size() for layer in ref.layers for t in (layer.ffn.gate, layer.ffn.up, layer.ffn.down))
    results = mp.Manager().dict()
    mp.spawn(moefied_rank, args=(2, free_port(), str(path), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert torch.allclose(results[rank]["logits"], want, atol=1e-5, rtol=1e-5)
        assert 2 * results[rank]["expert_bytes"] == full


def disagree_rank(rank: int, world: int, port: int, results):
    from moeflash.engine.parallel import ExpertParallel
    from moeflash.engine.prefix_cache import model_fingerprint

    ep = ExpertParallel(rank, world, init_method=f"tcp://127.0.0.1:{port}", timeout_s=30)
    try:
        model = build_tiny("float32", seed=rank)  # rank 1 loaded other weights
        try:
            ep.agree(model_fingerprint(model))
            results[rank] = "agreed"
        except ValueError as e:
            results[rank] = str(e)
    finally:
        ep.close()


def test_ranks_that_loaded_different_models_refuse_to_start():
    results = mp.Manager().dict()
    mp.spawn(disagree_rank, args=(2, free_port(), results), nprocs=2, join=True)
    assert all("disagree" in results[r] for r in (0, 1))


def test_ctrl_c_on_rank_0_stops_every_rank():
    """SIGINT to the serving rank: it shuts down gracefully, tells the others to stop, and the whole
    torchrun run ends with status 0."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    port = free_port()
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
                             "moeflash.cli", "serve", "--model", "tiny", "--port", str(port), "--threads", "1",
                             "--expert-parallel"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        rank0 = _children_with_rank(proc.pid, 0)
        assert rank0
        os.kill(rank0[0], signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def fp4_rank(rank: int, world: int, port: int, ckpt: str, store: bool, results):
    torch.set_num_threads(1)
    from moeflash.engine.load import load_model
    from moeflash.engine.parallel import ExpertParallel, shard_experts_

    ep = ExpertParallel(rank, world, init_method=f"tcp://127.0.0.1:{port}", timeout_s=60)
    try:
        model, _ = load_model(ckpt, dtype="float32", **({"expert_memory": 1.0} if store else {}))
        info = shard_experts_(model, rank, world, ep.all_reduce)
        with torch.inference_mode():
            _, logits = run(model)
        fetched = sorted({e for (_, e) in model.expert_store.cache}) if store else None
        results[rank] = {"logits": torch.stack(logits), "expert_bytes": info["expert_bytes"], "fetched": fetched}
    finally:
        ep.close()


@pytest.mark.parametrize("store", [False, True])
def test_two_ranks_equal_one_with_official_fp4_experts(checkpoints, store):
    """The official format keeps the experts as FP4 codes: each rank keeps its slice of the packed
    codes and scales; the logits equal one process's."""
    from moeflash.engine.load import load_model

    ckpt = checkpoints["official"]
    ref, _ = load_model(str(ckpt), dtype="float32")
    assert all(layer.ffn.fp4 for layer in ref.layers)
    full = sum(getattr(layer.ffn, n).numel() for layer in ref.layers for n in ("q13", "s13", "q2", "s2"))
    with torch.inference_mode():
        _, want = run(ref)
    results = mp.Manager().dict()
    mp.spawn(fp4_rank, args=(2, free_port(), str(ckpt), store, results), nprocs=2, join=True)
    for rank in (0, 1):
        assert torch.allclose(results[rank]["logits"], torch.stack(want), atol=1e-5, rtol=1e-5)
        if store:  # the slab's FP4 experts: this rank fetched only its own
            assert results[rank]["fetched"] and set(results[rank]["fetched"]) <= set(owned_experts(8, rank, 2))
        else:
            assert 2 * results[rank]["expert_bytes"] == full


@pytest.mark.parametrize("official", [False, True])
def test_a_rank_reads_only_its_own_experts_from_the_checkpoint(checkpoints, monkeypatch, official):
    import re

    from moeflash.engine.load import load_model
    from moeflash.weights.loader import Checkpoint

    ckpt = checkpoints["official" if official else "plain"]
    read = []
    for method in ("get", "get_quantized"):
        orig = getattr(Checkpoint, method)
        monkeypatch.setattr(Checkpoint, method, lambda self, name, *a, orig=orig, **k: (read.append(name),
                                                                                         orig(self, name, *a, **k))[1])
    own = owned_experts(8, 1, 2)
    model, _ = load_model(str(ckpt), dtype="float32", experts=own)
    experts = {int(m.group(1)) for n in read if (m := re.match(r"layers\.\d+\.ffn\.experts\.(\d+)\.", n))}
    assert experts == set(own)  # the other rank's experts were never read
    ffn = model.layers[1].ffn
    assert ffn.owned == own and (ffn.q13.shape[0] == 4 if official else sum(1 for e in ffn.experts if list(e.parameters())) == 4)


def loaded_rank(rank: int, world: int, port: int, ckpt: str, results):
    torch.set_num_threads(1)
    from moeflash.engine.load import load_model
    from moeflash.engine.parallel import ExpertParallel, shard_experts_

    ep = ExpertParallel(rank, world, init_method=f"tcp://127.0.0.1:{port}", timeout_s=60)
    try:
        model, _ = load_model(ckpt, dtype="float32", experts=owned_experts(8, rank, world))
        shard_experts_(model, rank, world, ep.all_reduce)
        with torch.inference_mode():
            _, logits = run(model)
        results[rank] = torch.stack(logits)
    finally:
        ep.close()


def test_ranks_loaded_with_their_own_experts_equal_one(checkpoints):
    from moeflash.engine.load import load_model

    ckpt = checkpoints["plain"]
    ref, _ = load_model(str(ckpt), dtype="float32")
    with torch.inference_mode():
        _, want = run(ref)
    results = mp.Manager().dict()
    mp.spawn(loaded_rank, args=(2, free_port(), str(ckpt), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert torch.allclose(results[rank], torch.stack(want), atol=1e-5, rtol=1e-5)
