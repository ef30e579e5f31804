"""Markdown tables for BENCHMARKS.md from the JSON that bench/vs_llamacpp.py, numerics_accuracy.py,
long_context.py and decode_step.py print, each table headed by the commit, machine and command it came from (so a table cannot outlive its
provenance). Tokens/s are the median over rounds, with [min, max].

    python bench/report.py bench/results/vs_llamacpp-*.json bench/results/numerics_accuracy-*.json
"""

from __future__ import annotations

import json
import sys


def provenance(m: dict) -> str:
    kernels = m.get("kernels", {})
    return (f"Commit `{m.get('commit')}`, {m.get('cpu')} ({m.get('cpus')} CPUs, {m.get('threads')} threads, "
            f"{', '.join(m.get('simd_flags', [])) or 'no AVX2'}; kernels {kernels.get('isa')}, dot products "
            f"{kernels.get('dot')}), torch {m.get('torch')}; `python bench/{m.get('command')}`; load average at "
            f"the end {m.get('loadavg_1m_5m')}.")


def tps(d: dict) -> str:
    return f"{d['median']:.1f} [{d['min']:.1f}, {d['max']:.1f}]"


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def speed_table(name: str, res: dict) -> list[str]:
    engines = [k for k, v in res.items() if isinstance(v, dict) and "decode_tokens_per_s" in v]
    peer = res["llama.cpp"]
    lines = [f"**{name}**" + (f" (read probe {res['read_probe_gbps']:.1f} GB/s; a step reads "
                              f"{res['bytes_per_token']['step'] / 1e6:.1f} MB, the layers alone "
                              f"{res['bytes_per_token']['layers'] / 1e6:.1f} MB, the head "
                              f"{res['bytes_per_token']['head'] / 1e6:.1f} MB)" if "bytes_per_token" in res else ""),
             "",
             "| engine | decode tok/s | prefill tok/s | decode vs llama.cpp | prefill vs llama.cpp | roofline, step | roofline, layers |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in engines:
        r = res[e]
        d = r["decode_tokens_per_s"]["median"] / peer["decode_tokens_per_s"]["median"]
        p = r["prefill_tokens_per_s"]["median"] / peer["prefill_tokens_per_s"]["median"]
        lines.append(f"| {e} | {tps(r['decode_tokens_per_s'])} | {tps(r['prefill_tokens_per_s'])} | "
                     f"{'' if e == 'llama.cpp' else f'{d:.2f}x'} | {'' if e == 'llama.cpp' else f'{p:.2f}x'} | "
                     f"{pct(r.get('roofline_step'))} | {pct(r.get('roofline_layers'))} |")
    for key, b in res.items():
        if key.startswith("batch_"):
            lines += ["", f"Batch {key[6:]} (moeflash fast, head q8_0): {tps(b['aggregate_tokens_per_s'])} tok/s in "
                          f"aggregate against {tps(b['batch_1_tokens_per_s'])} at batch 1: **{b['ratio']:.2f}x**."]
    return lines + [""]


def accuracy_table(name: str, res: dict) -> list[str]:
    lines = [f"**{name}**", "",
             "| engine | against | top-1 agreement | mean KL (nats) | relative logit error, median | p99 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, r in res.items():
        if not isinstance(r, dict) or "top1_agreement" not in r:
            continue
        engine, _, against = key.partition(" vs ")
        lines.append(f"| {engine} | {against or 'transformers fp32'} | {100 * r['top1_agreement']:.1f}% | "
                     f"{r['kl_mean']:.2g} | {r['rel_error_median']:.2g} | {r['rel_error_p99']:.2g} |")
    return lines + [""]


def indexer(row: dict) -> str:
    r = row.get("indexer_ms")
    return f"{r['native_ms']:.1f} / {r['einsum_ms']:.1f} ({r['einsum_over_native']:.2f}x)" if r else ""


def records(row: dict) -> str:
    r = row.get("records_ms")
    return f"{r['fp32_ms']:.1f} / {r['bf16_ms']:.1f} ({r['fp32_over_bf16']:.2f}x)" if r else ""


def long_context_table(doc: dict) -> list[str]:
    lines = [f"**{doc['preset']}{' (official format)' if doc.get('official') else ''}, {doc['dtype']}, numerics "
             f"{doc.get('numerics', 'exact')}, state records {doc.get('state_dtype', 'auto')} "
             f"({doc['state_element_size']} bytes a value)** (read probe {doc['read_bw_probe_GBps']:.1f} GB/s)", "",
             "| context | prefill tok/s (segment) | decode tok/s | state bytes | = formula | state read per decode token "
             "| indexer top-k ms: sort / keyed (used) | decode ms/token, fp32 / bf16 records (interleaved) "
             "| decode ms/token, native / einsum indexer scores (interleaved) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["rows"]:
        t = r.get("indexer_topk_ms") or {}
        topk = f"{t['sort']:.2f} / {t['keyed']:.2f} ({t['used']})" if t else ""
        lines.append(f"| {r['context']:,} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['state_used_bytes']:,} | {r['state_matches_formula']} | "
                     f"{r['bytes_per_decode_token']['state'] / 1e6:.1f} MB | {topk} | {records(r)} | {indexer(r)} |")
    return lines + [""]


def decode_step_table(doc: dict) -> list[str]:
    lines = [f"**{doc['preset']} (official format), numerics {doc['numerics']}, batch {doc['batch']}, static slots of "
             f"{doc['max_len']} tokens{', Inductor C++ wrapper' if doc.get('cpp_wrapper') else ''}**", "",
             "| step | ms a step [min, max] | vs eager | first warm-up s | greedy tokens = eager's | ATen ops a step |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, v in doc["variants"].items():
        ms = v["ms_per_step"]
        lines.append(f"| {name} | {ms['median']:.2f} [{ms['min']:.2f}, {ms['max']:.2f}] | {v['vs_eager']:.2f}x | "
                     f"{v['first_warmup_s']:.1f} | {v['same_tokens_as_eager']} | {v['aten_ops_per_step']} |")
    return lines + [""]


def render(doc: dict) -> list[str]:
    out = [provenance(doc["machine"]), ""]
    if doc.get("bench") == "long_context":
        return out + long_context_table(doc)
    if doc.get("bench") == "decode_step":
        return out + decode_step_table(doc)
    for model, res in doc.items():
        if model == "machine":
            continue
        if model == "smollm2":
            for q, r in res.items():
                if isinstance(r, dict):
                    out += (accuracy_table(f"SmolLM2 {q}", r) if any("top1_agreement" in str(v) for v in r.values())
                            else speed_table(f"SmolLM2 {q}", r))
        else:
            out += (accuracy_table(model, res) if any("top1_agreement" in str(v) for v in res.values())
                    else speed_table(model, res))
    return out


def main() -> int:
    for path in sys.argv[1:]:
        with open(path) as f:
            print("\n".join(render(json.load(f))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
