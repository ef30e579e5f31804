"""How far each numerics mode (kernels/numerics.py) lands from an independent fp32 reference, next to llama.cpp.

- `smollm2`: SmolLM2-135M-Instruct, the shipped Q4_1 file and its Q8_0 re-encoding, teacher-forced over
  real English text (the GPL-3 text Debian ships in /usr/share/common-licenses). Reference: transformers'
  LlamaForCausalLM in fp32 on the file's weights decoded by gguf-py (decoders independent of moeflash's).
  Engines: moeflash `exact` and `fast` on the packed file, llama.cpp on the same file.
- `mini`: V4 `mini` in DeepSeek's official format (FP8 dense linears, FP4 experts; random weights),
  teacher-forced over the exact path's own greedy continuation of a random prompt. Reference:
  transformers' DeepseekV4ForCausalLM in fp32 on the decoded checkpoint (common.build_hf). Engines:
  moeflash `exact`, `reference` (DeepSeek's e4m3 activations), `fast`, each of exact and fast with the bf16
  LM head requantized to Q8_0 (`--head q8_0`), and llama.cpp on the GGUF converted from the checkpoint
  (MXFP4 experts, Q8_0 dense and head: its usual V4 file).

Per engine and position: top-1 agreement with the reference, KL(reference || engine) in nats, and the
relative logit error ||l - l_ref|| / ||l_ref||; reported as the mean (top-1, KL) and the median and 99th
percentile (relative error) over positions. The `fast` mode's claim is that it is no further from the
reference than llama.cpp is.

    python bench/numerics_accuracy.py --threads 2 [--models smollm2 mini] [--tokens 512]
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import numpy as np
import torch

from common import (BENCH_DIR, add_common_args, apply_common_args, log, machine_info, official_files, print_json,
                    random_tokens, rounded)

TEXT = Path("/usr/share/common-licenses/GPL-3")


def distance(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    """Per-position distances of logits [T, V] from ref [T, V], summarised."""
    logits, ref = logits.double(), ref.double()
    top1 = (logits.argmax(-1) == ref.argmax(-1)).double()
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(logits, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    rel = (logits - ref).norm(dim=-1) / ref.norm(dim=-1)
    return {"top1_agreement": float(top1.mean()), "kl_mean": float(kl.mean()),
            "rel_error_median": float(rel.median()), "rel_error_p99": float(torch.quantile(rel, 0.99)),
            "positions": int(ref.shape[0])}


@torch.inference_mode()
def moeflash_logits(model, ids: torch.Tensor) -> torch.Tensor:
    from moeflash.engine.forward import run_tokens

    x = run_tokens(model, ids, [model.new_seq_state()], [ids.numel()])
    return model.logits(x).float()


def llama_cpp_logits(path, ids: list[int], threads: int) -> torch.Tensor:
    from llama_cpp import Llama

    n = len(ids)
    ll = Llama(model_path=str(path), n_ctx=n + 16, n_batch=n, n_ubatch=n, n_threads=threads,
               n_threads_batch=threads, logits_all=True, verbose=False)
    ll.eval(ids)
    out = torch.from_numpy(np.array(ll.scores[:n], dtype=np.float32))
    del ll
    gc.collect()
    return out


def hf_llama_from_gguf(path):
    """transformers' LlamaForCausalLM (fp32) holding a llama GGUF's weights as gguf-py decodes them, q / k
    rows permuted back from llama.cpp's adjacent-pair order to transformers' rotate-half order."""
    import gguf
    import transformers

    from moeflash.weights.gguf import GGUFFile, llama_config

    c = llama_config(GGUFFile(path))
    hcfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(hcfg).eval().float()
    reader = gguf.GGUFReader(str(path))

    def unpair(w, heads):  # adjacent pairs (2i, 2i+1) -> halves (i, i + d/2)
        d = w.shape[0] // heads
        return w.reshape(heads, d // 2, 2, -1).transpose(1, 2).reshape(w.shape)

    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
                 "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in reader.tensors:
        w = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).copy())
        w = w.reshape(list(reversed([int(s) for s in t.shape])))
        base, _, kind = t.name.rpartition(".")
        if base.startswith("blk."):
            _, layer, part = base.split(".")
            if part == "attn_q":
                w = unpair(w, c.num_attention_heads)
            elif part == "attn_k":
                w = unpair(w, c.num_key_value_heads)
            key = f"model.layers.{layer}.{per_layer[part]}.{kind}"
        else:
            key = f"{names[base]}.{kind}"
        sd[key] = w
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"SmolLM2 weights do not map onto transformers: {missing[:4]} {unexpected[:4]}")
    if "lm_head.weight" in missing:
        hf.tie_weights()
    return hf


def smollm2(args) -> dict:
    from moeflash.kernels.numerics import set_numerics
    from moeflash.weights.build import load_gguf_model, smollm2_path
    from moeflash.weights.gguf import requantize

    src = smollm2_path()
    files = {"Q4_1": src, "Q8_0": BENCH_DIR / "smollm2-q8_0.gguf"}
    if not files["Q8_0"].exists():
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        requantize(src, files["Q8_0"], "Q8_0")
    out = {"text": f"{TEXT} (first {args.tokens} tokens)"}
    for qtype, path in files.items():
        model, tok = load_gguf_model(path, "float32")
        ids = torch.tensor(tok.encode(TEXT.read_text(), add_bos=True)[: args.tokens])
        log(f"[smollm2 {qtype}] transformers fp32 reference")
        hf = hf_llama_from_gguf(path)
        with torch.inference_mode():
            ref = hf(ids[None]).logits[0].float()
        del hf
        gc.collect()
        res = {}
        got = {}
        for mode in ("exact", "fast"):
            log(f"[smollm2 {qtype}] moeflash {mode}")
            set_numerics(model, mode)
            got[mode] = moeflash_logits(model, ids)
            res[f"moeflash {mode}"] = distance(got[mode], ref)
        del model
        gc.collect()
        log(f"[smollm2 {qtype}] llama.cpp")
        ll = llama_cpp_logits(path, ids.tolist(), torch.get_num_threads())
        res["llama.cpp"] = distance(ll, ref)
        res["moeflash fast vs exact"] = distance(got["fast"], got["exact"])
        res["llama.cpp vs moeflash exact"] = distance(ll, got["exact"])
        out[qtype] = res
    return out


def mini(args) -> dict:
    from common import build_hf

    from moeflash.kernels.numerics import set_numerics
    from moeflash.weights.build import load_model

    ckpt, gguf_path = official_files("mini")
    model, _ = load_model(ckpt, dtype="float32")
    prompt = random_tokens(model.config.vocab_size, 16, args.seed)
    with torch.inference_mode():  # the exact path's own greedy continuation: natural logits to compare
        from moeflash.engine.forward import run_tokens

        st = [model.new_seq_state()]
        x = run_tokens(model, prompt, st, [prompt.numel()])
        seq = prompt.tolist()
        nxt = int(model.logits(x[-1:]).argmax(-1))
        for _ in range(args.tokens - prompt.numel()):
            seq.append(nxt)
            x = run_tokens(model, torch.tensor([nxt]), st, [1])
            nxt = int(model.logits(x).argmax(-1))
    ids = torch.tensor(seq)
    res, got = {}, {}
    for mode in ("exact", "reference", "fast"):
        log(f"[mini] moeflash {mode}")
        set_numerics(model, mode)
        got[mode] = moeflash_logits(model, ids)
    from moeflash.engine.load import requantize_head_

    requantize_head_(model)
    for mode in ("exact", "fast"):
        set_numerics(model, mode)
        got[f"{mode}, head q8_0"] = moeflash_logits(model, ids)
    del model
    gc.collect()
    log("[mini] transformers fp32 reference (decoded checkpoint)")
    dense, _ = load_model(ckpt, dtype="float32", dequantize=True)
    hf, _ = build_hf(dense, torch.float32)
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0].float()
    del hf, dense
    gc.collect()
    for mode, lg in got.items():
        res[f"moeflash {mode}"] = distance(lg, ref)
    log("[mini] llama.cpp (MXFP4 experts, Q8_0 dense)")
    ll = llama_cpp_logits(gguf_path, ids.tolist(), torch.get_num_threads())
    res["llama.cpp"] = distance(ll, ref)
    for mode in ("reference", "fast", "exact, head q8_0", "fast, head q8_0"):
        res[f"moeflash {mode} vs exact"] = distance(got[mode], got["exact"])
    res["llama.cpp vs moeflash exact"] = distance(ll, got["exact"])
    return {"tokens": "a random 16-token prompt and the exact path's greedy continuation", **res}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=["smollm2", "mini"], default=["smollm2", "mini"])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p)
    args = p.parse_args()
    apply_common_args(args)
    result = {}
    if "smollm2" in args.models:
        result["smollm2"] = smollm2(args)
    if "mini" in args.models:
        result["mini"] = mini(args)
    result["machine"] = machine_info()
    print_json(rounded(result, 5))


if __name__ == "__main__":
    main()
