"""What a MoE's router does with a user's text: which experts each token used, per text, and what that
means for an expert cache.

`RoutingStats` hooks every MoE layer's router (the `on_route` hook the expert store uses) and files each
token's experts under the text being scored. `report` turns the counts and traces into:
- the load distribution per layer and its entropy against uniform (log2 of the expert count);
- the overlap of the most used experts between texts (Jaccard of each layer's top experts);
- for each cache budget, the hit rate (and the bytes it would serve) of each cache policy and of
  Belady's optimum, replaying the text's own trace (`engine.expert_policy.replay`).
"""

from __future__ import annotations

import math
import numpy as np


class RoutingStats:
    """Which experts each token used (an `engine.experts.RoutingRecorder`), filed under the text or
    task being scored."""

    def __init__(self, model):
        from ..engine.experts import RoutingRecorder

        self.n_layers = len(model.layers)
        self.n_experts, self.top_k, self.expert_bytes = moe_shape(model)
        self._recorder = RoutingRecorder(model)
        self._current: str | None = None
        self._traces: dict[str, list] = {}

    def start(self, name: str | None) -> None:
        """File the next forward calls' tokens under `name` (None: record nothing)."""
        self._current = name
        if name is not None:
            self._traces.setdefault(name, [])

    def take(self, n_tokens: int) -> None:
        """Called after each forward call of `n_tokens` tokens: their experts, layer by layer."""
        rows = self._recorder.take()
        if len(rows) != n_tokens:
            raise RuntimeError(f"the forward call routed {len(rows)} tokens, not {n_tokens}")
        if self._current is not None:
            self._traces[self._current] += rows

    def counts(self) -> dict:
        """{text: [[tokens routed to expert e] for each layer]}"""
        out = {}
        for name, trace in self._traces.items():
            c = np.zeros((self.n_layers, self.n_experts), dtype=np.int64)
            for tok in trace:
                for layer, ids in enumerate(tok):
                    c[layer, ids] += 1
            out[name] = c.tolist()
        return out

    def traces(self) -> dict[str, list]:
        return self._traces

    def meta(self) -> dict:
        return {"layers": self.n_layers, "experts": self.n_experts, "top_k": self.top_k,
                "expert_bytes": self.expert_bytes}

    def detach(self) -> None:
        self._recorder.detach()


def is_moe(model) -> bool:
    """A V4 model, or a llama whose MLPs were MoE-fied."""
    c = model.config
    return bool(getattr(c, "n_routed_experts", 0) or getattr(c, "moe_experts", 0))


def moe_shape(model) -> tuple[int, int, int]:
    """(experts per layer, experts per token, bytes of one expert's weights)."""
    c = model.config
    ffn = model.layers[0].ffn
    if getattr(c, "moe_experts", 0):  # a MoE-fied llama: experts stacked in MoefiedMLP
        per = sum(t[0].numel() * t.element_size() for t in (ffn.gate, ffn.up, ffn.down))
        return c.moe_experts, c.moe_top_k, per
    experts = getattr(ffn, "experts", None)
    per = sum(p.numel() * p.element_size() for p in experts[0].parameters()) if experts is not None and len(experts) else 0
    return c.n_routed_experts, c.num_experts_per_tok, per


def entropy_bits(counts) -> float:
    c = np.asarray(counts, dtype=np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log2(p)).sum()) if p.size else 0.0


def top_experts(counts, m: int) -> set[int]:
    """The `m` most used experts (ties broken by the lower id, so the set is deterministic)."""
    c = list(counts)
    return set(sorted(range(len(c)), key=lambda e: (-c[e], e))[:m])


def report(counts: dict, meta: dict, traces: dict | None = None, budgets=(0.25, 0.5),
           policies=("lru", "lfu")) -> dict:
    """Load, entropy, top-expert overlap and cache replay for each text (see the module docstring)."""
    from ..engine.expert_policy import replay

    n_exp, n_layers, k = meta["experts"], meta["layers"], meta["top_k"]
    m = max(k, n_exp // 8)  # "top experts": an eighth of them (at least top-k)
    out: dict = {"uniform_entropy_bits": math.log2(n_exp), "top_experts_per_layer": m, "texts": {}}
    for name, c in counts.items():
        ent = [entropy_bits(row) for row in c]
        tokens = int(sum(c[0])) // k if c and k else 0
        out["texts"][name] = {
            "tokens": tokens,
            "entropy_bits_per_layer": ent,
            "entropy_vs_uniform": float(np.mean(ent)) / math.log2(n_exp) if n_exp > 1 else 1.0,
            "max_load_vs_mean_per_layer": [max(row) / (sum(row) / n_exp) if sum(row) else 0.0 for row in c],
        }
    names = list(counts)
    out["top_expert_overlap"] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            jac = []
            for layer in range(n_layers):
                ta, tb = top_experts(counts[a][layer], m), top_experts(counts[b][layer], m)
                jac.append(len(ta & tb) / len(ta | tb))
            out["top_expert_overlap"][f"{a} / {b}"] = {"mean_jaccard": float(np.mean(jac)), "per_layer": jac,
                                                       "chance": _chance_jaccard(n_exp, m)}
    if traces:
        total = n_layers * n_exp
        out["cache"] = {}
        for name, trace in traces.items():
            rows = {}
            for f in budgets:
                cap = max(1, int(total * f))
                r = replay(trace, cap, policies=policies)
                rows[f"{f:g}"] = {"capacity_experts": cap,
                                  "hit_rate": {p: v["hit_rate"] for p, v in r["results"].items()},
                                  "hit_bytes": {p: v["hits"] * meta["expert_bytes"] for p, v in r["results"].items()},
                                  "vs_belady": {p: v["vs_belady"] for p, v in r["results"].items() if p != "belady"}}
            out["cache"][name] = rows
    return out


def _chance_jaccard(n: int, m: int) -> float:
    """Expected Jaccard of two independent uniformly random m-subsets of n experts."""
    # E|A&B| = m^2/n; |A|B| = 2m - |A&B|; the ratio of expectations is close enough for a reference
    inter = m * m / n
    return inter / (2 * m - inter)


def plot_heatmap(counts: dict, path: str, title: str = "") -> None:
    """One panel per text: layers x experts, the share of each layer's tokens routed to each expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(counts)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.2 + 1.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        c = np.asarray(counts[name], dtype=np.float64)
        share = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"{title} {name}".strip(), fontsize=9)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

