"""`moeflash compare`'s output: a table, JSON, and a plot of quality against cost."""

from __future__ import annotations

import json
import math

from .routing import report as routing_report


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join("{:<%d}" % w if i == 0 else "{:>%d}" % w for i, w in enumerate(widths))
    return [fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*map(str, r)) for r in rows]


def _usd(x) -> str:
    return "-" if x is None or not math.isfinite(x) else (f"${x:,.2f}" if x >= 1 else f"${x:,.4f}")


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def routing_summaries(result: dict, budgets=(0.25, 0.5)) -> dict:
    """`routing.report` for every MoE model of a result."""
    return {m["model"]: routing_report(m["routing"], m["routing_meta"], m.get("routing_traces"), budgets)
            for m in result["models"] if "routing" in m}


def format_compare(result: dict, routing: dict | None = None) -> str:
    texts = list(result["texts"])
    hw = result["hardware"]
    tasks = result["inputs"]["tasks"]
    header = ["model", "kind", "params", "activated"] + [f"bpb {t}" for t in texts]
    if tasks:
        header += ["task acc"]
    header += ["prefill tok/s", "decode tok/s", "memory MB", "$/M in", "$/M out"]
    rows = []
    for m in result["models"]:
        row = [m["model"], m["architecture"], _params(m["params"]), _params(m["activated_params"])]
        row += [f"{m['text'][t]['bits_per_byte']:.3f}" for t in texts]
        if tasks:
            row += [f"{100 * m['tasks']['overall']['accuracy']:.1f}%"]
        sp = m["speed"]
        row += [f"{sp['prefill_tokens_per_s']:,.1f}", f"{sp['decode_tokens_per_s']:,.2f}",
                f"{m['resident_bytes'] / 1e6:,.0f}", _usd(m["usd_per_million"]["input"]),
                _usd(m["usd_per_million"]["output"])]
        rows.append(row)
    out = _table(header, rows)
    inp = result["inputs"]
    out.append("")
    sizes = ", ".join(f"{t} ({v['bytes']:,} bytes)" for t, v in result["texts"].items())
    out.append(f"bits per byte (lower is better) over {sizes}, "
               f"windows of {inp['window']} tokens; speeds measured on this machine at batch 1 ({inp['dtype']}); "
               f"$ at {_usd(hw['price_per_hour'])}/h ({hw['name']}) and {100 * inp['utilization']:.0f}% utilisation")
    for name, rep in (routing or {}).items():
        out.append("")
        out.append(f"Router of {name}: entropy of the expert load against uniform "
                   f"({rep['uniform_entropy_bits']:.2f} bits), and the top-{rep['top_experts_per_layer']} experts' overlap:")
        out.append("  " + ", ".join(f"{t} {100 * v['entropy_vs_uniform']:.1f}%" for t, v in rep["texts"].items()))
        for pair, v in rep["top_expert_overlap"].items():
            out.append(f"  {pair}: Jaccard {v['mean_jaccard']:.2f} (independent uniform choice: {v['chance']:.2f})")
        for t, budgets in rep.get("cache", {}).items():
            cells = []
            for b, r in budgets.items():
                cells.append(f"{100 * float(b):.0f}% budget: " + ", ".join(
                    f"{p} {100 * h:.1f}%" for p, h in r["hit_rate"].items()))
            out.append(f"  expert cache on {t}: " + "; ".join(cells))
    return "\n".join(out)


def to_json(result: dict, routing: dict | None = None) -> str:
    slim = {**result, "models": [{k: v for k, v in m.items() if k != "routing_traces"} for m in result["models"]]}
    if routing is not None:
        slim["routing_report"] = routing
    return json.dumps(slim, indent=1)


def plot_compare(result: dict, path: str) -> None:
    """Bits per byte against dollars per million output tokens, one panel per text, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    texts = list(result["texts"])
    fig, axes = plt.subplots(1, len(texts), figsize=(4.2 * len(texts), 3.6), squeeze=False)
    for ax, t in zip(axes[0], texts):
        for m in result["models"]:
            x = m["usd_per_million"]["output"]
            if x is None:
                continue
            y = m["text"][t]["bits_per_byte"]
            ax.scatter([x], [y], marker="o" if m["architecture"] == "dense" else "s")
            ax.annotate(m["model"].rstrip("/").split("/")[-1], (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        xs = [m["usd_per_million"]["output"] for m in result["models"] if m["usd_per_million"]["output"]]
        if xs and max(xs) / min(xs) > 20:  # orders of magnitude apart: a log axis
            ax.set_xscale("log")
        ax.margins(x=0.3, y=0.15)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"${v:,.2f}"))
        ax.set_xlabel("$ per million output tokens (measured speed)")
        ax.set_ylabel(f"bits per byte on {t} (lower is better)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"quality against cost ({result['hardware']['name']}, "
                 f"{100 * result['inputs']['utilization']:.0f}% utilisation)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
