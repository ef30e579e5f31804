"""The plan as a text table (`format_plan`), as JSON (`to_json`) and as pictures (`plot_plan`: dollars
per million tokens against utilisation, tokens/s against the expert budget)."""

from __future__ import annotations

import dataclasses
import json
import math

from .planner import GIB, PlanInputs, plan


def gib(x: float) -> str:
    return f"{x / GIB:,.2f} GiB"


def gb(x: float) -> str:
    if x >= 1e9:
        return f"{x / 1e9:,.2f} GB"
    if x >= 1e6:
        return f"{x / 1e6:,.1f} MB"
    return f"{x / 1e3:,.1f} kB"


def num(x: float, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:,.{nd}f}"


def usd(x: float | None) -> str:
    """Dollars with two significant digits below $1 ($0.14, $0.028, $0.0028), cents above."""
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if 0 < x < 1:
        return f"${x:.{max(2, 1 - math.floor(math.log10(x)))}f}"
    return f"${x:,.2f}" if x < 1e5 else f"${x:,.0f}"


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    cols = list(zip(headers, *rows))
    width = [max(len(str(v)) for v in col) for col in cols]
    fmt = lambda r: indent + "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, width)))
    return [fmt(headers), indent + "  ".join("-" * w for w in width)] + [fmt(r) for r in rows]


def _prefix_cache_lines(pc: dict) -> list[str]:
    q = pc["question"]
    out = ["", f"Prefix cache, {pc['documents']:,} document(s) of {pc['document_tokens']:,} tokens "
               f"(state saved at {pc['saved_at_tokens']:,}, a multiple of {pc['block_tokens']}), "
               f"then a {pc['question_tokens']}-token question and a {pc['answer_tokens']}-token answer:"]
    per = pc["snapshot_bytes_per_token"]
    out.append(f"  saved state {pc['snapshot_bytes'] / 1e6:,.1f} MB ({num(per, 0) if per else '-'} bytes per "
               f"token, {pc['state_dtype']}); disk for all: {pc['arithmetic']}")
    rows = []
    for label, key in (("miss (whole prompt prefilled)", "miss"), ("hit, state from RAM", "hit_from_ram"),
                       ("hit, state from disk", "hit_from_disk")):
        r = q[key]
        if r is None:
            continue
        rows.append([label, num(r.get("restore_s", 0.0), 3), num(r["prefill_s"], 2), num(r["decode_s"], 2),
                     num(r["total_s"], 2), usd(r["usd"]) if r["usd"] is not None else "-",
                     f"{100 * r['time_to_first_token_vs_miss']:.1f}%" if r.get("time_to_first_token_vs_miss") else "-"])
    out += _table(["question", "restore s", "prefill s", "decode s", "total s", "$", "TTFT vs miss"], rows)
    return out


def format_plan(p: dict) -> str:
    m, hw, inp, w, st, mem = p["model"], p["hardware"], p["inputs"], p["weights"], p["state"], p["memory"]
    out = [f"moeflash plan: {m['name']} on {hw['name']} ({hw['description']})",
           f"context {inp['context']:,} tokens, batch {inp['batch']}, weights {inp['weights_dtype']} "
           f"(dense {inp['dense_format']}, routed experts {inp['expert_format']}), state {inp['state_dtype']}", ""]
    out.append(f"Model: {m['total_params']:,} parameters ({m['total_params'] / 1e9:.2f}B; MTP's "
               f"{m['mtp_params'] / 1e9:.2f}B {'included' if inp['mtp'] else 'not loaded'}), "
               f"{m['activated_params']:,} activated per token ({100 * m['activated_params'] / m['total_params']:.2f}%); "
               f"{m['layers']} layers, top-{m['top_k']} of {m['routed_experts_per_layer']} routed experts")
    out.append("")
    out.append("Weights (total parameters decide memory), by component and tier:")
    rows = [[c["name"], f"{c['params']:,}", gb(c["bytes"]) if c["bytes"] else "0",
             gib(c["tiers"]["fast"]), gib(c["tiers"]["host"]), gib(c["tiers"]["disk"])] for c in w["components"]]
    t = w["by_tier"]
    rows.append(["total", f"{sum(c['params'] for c in w['components']):,}", gb(w["total_bytes"]),
                 gib(t["fast"]), gib(t["host"]), gib(t["disk"])])
    out += _table(["component", "params", "bytes", "fast memory", "host RAM", "disk"], rows)
    out.append(f"  routed experts: {w['experts_resident']:,} of {w['experts_total']:,} in fast memory, "
               f"{w['experts_host']:,} in host RAM, {w['experts_disk']:,} on disk; one expert {gb(w['expert_bytes'])}"
               + ("; served by the expert store" if w["expert_store"] else ""))
    out.append("")
    pt, ps = st["per_token"], st["per_sequence_at_context"]
    out.append(f"Sequence state ({st['dtype']}), per sequence:")
    rows = [[k.replace("_", " "), num(pt.get(k, 0.0), 1) if k in pt else "-", f"{ps[k]:,}", gib(ps[k])]
            for k in ("window", "csa_entries", "indexer_keys", "hca_entries", "compressor_pending")]
    rows.append(["total", num(pt["total"], 1), f"{ps['total']:,}", gib(ps["total"])])
    out += _table(["component", "bytes/token (growth)", f"bytes at {inp['context']:,} tokens", ""], rows)
    out.append(f"  x {inp['batch']} sequences = {gib(st['batch_total'])}")
    out.append("")
    out.append(f"Memory: usable fast memory {gib(mem['fast_capacity'])} ({hw['memory_gib']:,.1f} GiB less "
               f"{100 * mem['reserve_fraction']:.0f}% reserve and {mem['runtime'] / GIB:.2f} GiB runtime)")
    out.append(f"  dense {gib(mem['dense'])} + resident experts {gib(mem['experts_resident'])} + state "
               f"{gib(mem['state'])} = {gib(mem['fast_used'])} -> {'FITS' if mem['fits'] else 'DOES NOT FIT'}; "
               f"at most {mem['max_batch_at_context']} sequence(s) of {inp['context']:,} tokens beside these experts")
    if mem["host_used"] or mem["disk_used"]:
        out.append(f"  host RAM {gib(mem['host_used'])}, disk {gib(mem['disk_used'])}")
    out.append(f"  expert cache hit rate {inp['hit_rate']:.3f}: {inp['hit_rate_source']}")
    out.append("")
    out.append(f"Decode (bytes read per step by tier; efficiency {inp['decode_efficiency']:.3g} of "
               f"{hw['bandwidth_gbps']:,.0f} GB/s"
               + (", plus moeflash's measured CPU step overhead" if inp["overhead_modelled"] else "") + "):")
    rows = []
    for key in ("batch_1", "batch_n") if inp["batch"] > 1 else ("batch_1",):
        d = p["decode"][key]
        b = d["bytes_per_step"]
        rows.append([str(d["batch"]), num(d["distinct_experts_per_layer"], 1), gb(b["dense"]), gb(b["experts_fast"]),
                     gb(b["experts_host"] + b["experts_disk"]), gb(b["state"]), gb(d["bytes_per_token"]),
                     num(d["time_ms"]["step"], 2), num(d["roofline_tokens_per_s"], 1),
                     num(d["expected_tokens_per_s"], 1), d["bound"]])
    out += _table(["batch", "experts/layer", "dense", "experts (fast)", "experts (host/disk)", "state",
                   "per token", "ms/step", "roofline tok/s", "expected tok/s", "bound by"], rows)
    ml = p["decode"]["batch_1"].get("from_measured_layer")
    if ml:
        copies = (f" + {ml['expert_misses_per_token']:.1f} expert misses x {ml['ms_per_miss']:.3f} ms "
                  f"(hit rate {ml['hit_rate']:.1%}, {ml['experts_resident']:,} of {ml['experts_total']:,} experts "
                  f"resident)" if ml["copy_ms"] else "")
        out.append(f"  from the measured layer ({ml['layer_steps']}): {ml['layers']} x {ml['layer_ms']:.3f} ms + head "
                   f"{ml['head_ms']:.2f} ms ({'measured' if ml['head_measured'] else 'modelled'}){copies} = "
                   f"{ml['step_ms']:.2f} ms/step, "
                   f"{ml['tokens_per_s']:.2f} tok/s at batch 1")
        if "hit_rate_needed" in ml:
            need = ml["hit_rate_needed"]
            out.append(f"  {ml['target_tokens_per_s']:g} tok/s per stream needs "
                       + ("more than every expert hitting (the resident part alone is slower)" if need is None
                          else f"a hit rate of at least {need:.1%}"))
    pf = p["prefill"]
    out.append("")
    out.append(f"Prefill of a {pf['prompt_tokens']:,}-token prompt ({pf['flops']['per_token'] / 1e9:,.1f} GFLOP per "
               f"token: weights {pf['flops']['weights'] / pf['prompt_tokens'] / 1e9:,.1f}, attention "
               f"{pf['flops']['attention'] / pf['prompt_tokens'] / 1e9:,.2f}, indexer "
               f"{pf['flops']['indexer'] / pf['prompt_tokens'] / 1e9:,.2f}; efficiency {inp['prefill_efficiency']:.3g} "
               f"of {hw['tflops'] if inp['dense_format'] != 'fp8' or not hw['tflops_fp8'] else hw['tflops_fp8']:,.1f} TFLOP/s):")
    out.append(f"  roofline {num(pf['roofline_tokens_per_s'], 0)} tok/s, expected {num(pf['expected_tokens_per_s'], 0)} "
               f"tok/s ({num(pf['time_s']['total'], 2)} s for the prompt)")
    out += _prefix_cache_lines(p["prefix_cache"])
    c = p["cost"]
    out.append("")
    if c["price_per_hour"] is None:
        out.append("Cost: no price for this hardware; give --price-per-hour")
    else:
        um = c["usd_per_million"]
        src = "given" if c["price_source"].startswith("given") else "the profile's price; see its sources in --json"
        out.append(f"Cost at {usd(c['price_per_hour'])}/h ({src}) and {100 * c['utilization']:.0f}% utilisation:")
        out.append(f"  $ per million tokens: input {usd(um['input'])}, cached input {usd(um['cached_input'])} "
                   f"(a prefix cache hit: the state copied from memory), output {usd(um['output'])}"
                   + (f" (batch {inp['batch']}; batch 1: {usd(um['output_batch1'])})" if inp["batch"] > 1 else ""))
    out.append("  DeepSeek API, $ per million tokens:")
    out += _table(["model", "date", "input", "cached input", "output"],
                  [[r["model"], r["date"], usd(r["input"]), usd(r["cached_input"]), usd(r["output"])]
                   for r in c["api_prices"]], indent="    ")
    mo = c["monthly"]
    out.append(f"  Monthly, {mo['arithmetic']} ({100 * (1 - inp['output_share']):.0f}% input, "
               f"{100 * inp['output_share']:.0f}% output):")
    for r in mo["api"]:
        out.append(f"    API {r['model']} ({r['date']}): {r['arithmetic']}")
    sh = mo.get("self_hosted")
    if sh and sh.get("cannot_serve"):
        out.append(f"    self-hosted: {sh['reason']}")
    elif sh:
        out.append(f"    self-hosted, dedicated: {sh['dedicated_arithmetic']} per month")
        out.append(f"    self-hosted, machine-hours the volume needs: {sh['hours_arithmetic']} "
                   f"({100 * sh['busy_fraction_of_one_machine']:.1f}% of one machine's month; "
                   f"{usd(sh['pay_per_hour_used_usd'])} if billed only for those hours)")
        out.append(f"    one machine's capacity at this mix, busy all day: {sh['capacity_tokens_per_day']:,.0f} tokens/day")
        if "break_even_tokens_per_day" in sh:
            out.append(f"    break-even with the V4-Flash API (from 2026-04-26): {sh['break_even_tokens_per_day']:,.0f} "
                       "tokens/day" + ("" if sh["break_even_reachable"] else
                                       " -- more than one machine can serve: the API is cheaper at every volume"))
    if p["notes"]:
        out.append("")
        out.append("Notes:")
        out += [f"  - {n}" for n in p["notes"]]
    return "\n".join(out)


def _clean(x):
    if isinstance(x, float):
        return None if math.isnan(x) else ("inf" if math.isinf(x) else x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(p: dict) -> str:
    return json.dumps(_clean(p), indent=1, default=str)


def plot_plan(p: dict, inputs: PlanInputs, hw, path: str) -> str:
    """Two panels: $ per million tokens vs utilisation (self-hosted input and output next to the API
    prices), and expected decode tokens/s vs the fraction of routed experts in fast memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    price = p["cost"]["price_per_hour"]
    us = [i / 100 for i in range(2, 101)]
    if price is not None:
        tin = p["prefill"]["expected_tokens_per_s"]
        tout = p["decode"]["batch_n"]["expected_tokens_per_s"]
        a.plot(us, [price / (tin * 3600 * u) * 1e6 for u in us], label="self-hosted input")
        a.plot(us, [price / (tout * 3600 * u) * 1e6 for u in us],
               label=f"self-hosted output (batch {p['inputs']['batch']})")
    api = p["cost"]["api_prices"][1]
    a.axhline(api["input"], color="gray", ls="--", lw=1, label=f"API V4-Flash input ${api['input']}")
    a.axhline(api["output"], color="black", ls=":", lw=1, label=f"API V4-Flash output ${api['output']}")
    a.set_yscale("log")
    a.set_xlabel("utilisation (fraction of hours busy)")
    a.set_ylabel("$ per million tokens")
    a.set_title(f"{p['model']['name']} on {p['hardware']['name']} at {usd(price)}/h")
    a.legend(fontsize=8)
    a.grid(True, which="both", alpha=0.3)

    routed = p["weights"]["routed_bytes"]
    fr = [i / 20 for i in range(21)]
    tps1, tpsb, fits = [], [], []
    for f in fr:
        q = plan(dataclasses.replace(inputs, expert_memory_gib=f * routed / GIB, hit_rate=None), hw)
        tps1.append(q["decode"]["batch_1"]["expected_tokens_per_s"])
        tpsb.append(q["decode"]["batch_n"]["expected_tokens_per_s"])
        fits.append(q["memory"]["fits"])
    b.plot([100 * f for f in fr], tps1, marker="o", ms=3, label="batch 1")
    if p["inputs"]["batch"] > 1:
        b.plot([100 * f for f in fr], tpsb, marker="o", ms=3, label=f"batch {p['inputs']['batch']}")
    if not all(fits):
        first = next(100 * f for f, ok in zip(fr, fits) if not ok)
        b.axvline(first, color="red", ls="--", lw=1, label="fast memory full beyond")
    b.set_xlabel("routed experts in fast memory (% of all; uniform routing: hit rate = this)")
    b.set_ylabel("expected decode tokens/s")
    b.set_title(f"context {p['inputs']['context']:,}, {p['inputs']['weights_dtype']}")
    b.legend(fontsize=8)
    b.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
