"""MoE-fication of a dense llama model (`moeflash moefy`), after MoEfication (Zhang et al., 2022).

Each MLP's intermediate neurons are split into `experts` groups of equal size, and a small router per
layer learns which groups matter for a token; the MoE-fied model computes only the `top_k` best groups.
The split and the routers come from calibration text run through the dense model:

1. **Activations.** For every layer, the MLP's input x (after its norm) and its neuron activations
   h = silu(gate x) * (up x) on each calibration token.
2. **Split.** Neurons that fire together belong together: balanced k-means (equal-size clusters) on each
   neuron's activation pattern |h| over the tokens, scaled by its down-projection column's norm (what
   it can add to the output), normalised; cosine similarity, a fixed seed, a fixed number of rounds.
3. **Routers.** A token's need for an expert is the summed |h| x ||down column|| of its neurons (an
   upper bound of the expert's contribution to the output). A router (one linear layer, or two with a
   ReLU) is trained on x to give the experts a token needs most the highest scores: a multi-label
   loss on "is among the top_k by need", Adam on minibatches drawn with a fixed seed.

The result is a `MoefiedMLP` per layer (model/llama.py); `save_gguf` writes a GGUF that moeflash loads
like any llama file (arch "llama" plus `moeflash.moe.*` keys and llama.cpp's `*_exps` tensor names; the
other tensors and all metadata copied from the source file as they were). llama.cpp has no architecture
for an unweighted sum of experts, so it cannot run the result. With top_k = experts every neuron is
used and the model computes what the dense one does (its neurons reordered).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .engine.forward import run_tokens
from .model.llama import Llama, LlamaMLP, MoefiedMLP


def _dense_weights(mlp: LlamaMLP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [I, d], up [I, d], down [d, I]) in fp32, whatever layout or blocks they are held in."""
    return tuple(lin.weight.float().contiguous() for lin in (mlp.w1, mlp.w3, mlp.w2))  # GgufLinear: decoded


@torch.inference_mode()
def collect_activations(model: Llama, token_ids: list[int], window: int = 512) -> list[torch.Tensor]:
    """Per layer, the MLP input x (after its norm) for every calibration token: [tokens, d] fp32."""
    xs: list[list[torch.Tensor]] = [[] for _ in model.layers]
    hooks = []
    for i, layer in enumerate(model.layers):
        hooks.append(layer.ffn.register_forward_pre_hook(lambda mod, args, i=i: xs[i].append(args[0].float().clone())))
    try:
        for s in range(0, len(token_ids), window):
            piece = token_ids[s:s + window]
            run_tokens(model, torch.tensor(piece, dtype=torch.long), [model.new_seq_state()], [len(piece)])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(x) for x in xs]


def balanced_kmeans(features: torch.Tensor, k: int, rounds: int = 12, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of `features` into `k` clusters of exactly n / k rows by cosine similarity;
    returns each row's cluster [n]. Each round assigns rows to the most similar centroid that still has
    room, the rows most similar to any centroid first (a greedy balanced assignment), then moves the
    centroids."""
    n = features.shape[0]
    if n % k:
        raise ValueError(f"{n} rows do not split into {k} equal clusters")
    cap = n // k
    f = F.normalize(features.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = f[torch.randperm(n, generator=g)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(rounds):
        sim = (f @ centroids.T).numpy()  # [n, k]
        room = np.full(k, cap)
        for r in np.argsort(-sim.max(axis=1), kind="stable"):  # the surest rows choose first
            c = int(np.where(room > 0, sim[r], -np.inf).argmax())
            assign[r] = c
            room[c] -= 1
        new = torch.zeros_like(centroids).index_add_(0, assign, f)
        centroids = F.normalize(new, dim=1)
    return assign


def expert_need(h: torch.Tensor, down_norm: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Each token's need for each expert: summed |h| x ||down column|| of its neurons -> [tokens, k]."""
    w = h.abs() * down_norm
    return torch.zeros(h.shape[0], k).index_add_(1, assign, w)


def train_router(x: torch.Tensor, need: torch.Tensor, top_k: int, hidden: int = 0, steps: int = 300,
                 lr: float = 1e-2, seed: int = 0, batch: int = 1024) -> torch.nn.Sequential:
    """A router trained so that the experts a token needs most score highest (see the module
    docstring). x [tokens, d], need [tokens, E]."""
    torch.manual_seed(seed)
    d, e = x.shape[1], need.shape[1]
    router = (torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, e))
              if hidden else torch.nn.Sequential(torch.nn.Linear(d, e)))
    x, need = x.clone(), need.clone()  # normal tensors (activations may come from inference mode)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xn = (x - mean) / std  # trained on standardised inputs, folded back into the first layer below
    target = torch.zeros_like(need).scatter_(1, need.topk(top_k, dim=1).indices, 1.0)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    pos_weight = torch.tensor(float(e - top_k) / max(top_k, 1))  # as many "needed" as "not needed" in the loss
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(0, xn.shape[0], (min(batch, xn.shape[0]),), generator=g)
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(router(xn[rows]), target[rows], pos_weight=pos_weight)
            loss.backward()
            opt.step()
    with torch.no_grad():
        first = router[0]
        first.bias -= (first.weight / std) @ mean
        first.weight /= std
    return router.eval()


def router_recall(router, x: torch.Tensor, need: torch.Tensor, top_k: int) -> float:
    """Fraction of the experts a token needs most (top_k by need) that the router picks."""
    with torch.no_grad():
        picked = router(x).topk(top_k, dim=1).indices
    best = need.topk(top_k, dim=1).indices
    hits = (picked.unsqueeze(2) == best.unsqueeze(1)).any(dim=2).float().sum()
    return float(hits) / best.numel()


@torch.no_grad()
def moefy(model: Llama, calibration_ids: list[int], experts: int, top_k: int, router_hidden: int = 128,
          seed: int = 0, rounds: int = 12, steps: int = 300, progress=None) -> dict:
    """Replace every MLP of `model` (in place) with a `MoefiedMLP`; returns per-layer statistics
    (router recall on the calibration tokens)."""
    c = model.config
    if experts < 1 or c.intermediate_size % experts:
        raise ValueError(f"--experts {experts} must divide the MLP width {c.intermediate_size}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"--top-k must be in [1, {experts}], got {top_k}")
    if len(calibration_ids) < 4 * experts:
        raise ValueError(f"{len(calibration_ids)} calibration tokens are too few for {experts} experts")
    xs = collect_activations(model, calibration_ids)
    stats = []
    m = c.intermediate_size // experts
    for i, layer in enumerate(model.layers):
        gate, up, down = _dense_weights(layer.ffn)
        x = xs[i]
        h = F.silu(x @ gate.T) * (x @ up.T)  # [tokens, I]
        down_norm = down.norm(dim=0)
        assign = balanced_kmeans((h.abs() * down_norm).T, experts, rounds, seed + i)
        order = torch.argsort(assign * c.intermediate_size + torch.arange(c.intermediate_size))  # by expert, then neuron
        need = expert_need(h, down_norm, assign, experts)
        router = train_router(x, need, top_k, router_hidden, steps, seed=seed + i)
        mlp = MoefiedMLP(c.hidden_size, c.intermediate_size, experts, top_k, router_hidden)
        dtype = model.embed.weight.dtype
        mlp.gate.data = gate[order].reshape(experts, m, -1).to(dtype).contiguous()
        mlp.up.data = up[order].reshape(experts, m, -1).to(dtype).contiguous()
        mlp.down.data = down[:, order].reshape(-1, experts, m).permute(1, 0, 2).to(dtype).contiguous()
        mlp.router = router.to(dtype)
        mlp.neurons = order  # the dense neuron at each expert-major slot (saved with the model)
        layer.ffn = mlp
        stats.append({"layer": i, "router_recall": router_recall(router, x, need, top_k),
                      "oracle_need_share": float(need.topk(top_k, dim=1).values.sum() / need.sum())})
        if progress is not None:
            progress(1)
    model.config = c.replace(moe_experts=experts, moe_top_k=top_k, moe_router_hidden=router_hidden)
    return {"layers": stats, "calibration_tokens": len(calibration_ids),
            "mean_router_recall": float(np.mean([s["router_recall"] for s in stats])),
            "mean_oracle_need_share": float(np.mean([s["oracle_need_share"] for s in stats]))}


def save_gguf(model: Llama, source: str | Path, out: str | Path) -> Path:
    """Write the MoE-fied `model` as a GGUF: `source`'s metadata and non-MLP tensors as they were (their
    block types kept), the experts and routers in fp32, and `moeflash.moe.*` keys. Written to a
    temporary name and renamed, so a failed run leaves no file that looks complete."""
    from .weights.gguf import MOE_KEYS, GGUFFile, _gguf

    gguf = _gguf()
    f = GGUFFile(source)
    c = model.config
    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    w = gguf.GGUFWriter(str(tmp), arch=f.arch)
    for key, field in f.reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture",) or key.startswith("moeflash."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.meta(key), vtype, sub_type=sub)
    for key, attr in MOE_KEYS.items():
        w.add_uint32(attr, int(getattr(c, key)))
    dense_mlp = {f"blk.{i}.ffn_{n}.weight" for i in range(c.num_hidden_layers) for n in ("gate", "up", "down")}
    for t in f.reader.tensors:
        if t.name in dense_mlp:
            continue
        if t.name.startswith("blk.") and ("_exps." in t.name or ".ffn_router." in t.name or t.name.endswith("ffn_neurons")):
            continue  # a MoE-fied source: its experts are replaced
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)  # as stored: blocks stay blocks
    for i, layer in enumerate(model.layers):
        mlp = layer.ffn
        w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", mlp.gate.detach().float().numpy())
        w.add_tensor(f"blk.{i}.ffn_up_exps.weight", mlp.up.detach().float().numpy())
        w.add_tensor(f"blk.{i}.ffn_down_exps.weight", mlp.down.detach().float().numpy())
        for j, lin in enumerate(m for m in mlp.router if isinstance(m, torch.nn.Linear)):
            w.add_tensor(f"blk.{i}.ffn_router.{j}.weight", lin.weight.detach().float().numpy())
            w.add_tensor(f"blk.{i}.ffn_router.{j}.bias", lin.bias.detach().float().numpy())
        if getattr(mlp, "neurons", None) is not None:
            w.add_tensor(f"blk.{i}.ffn_neurons", mlp.neurons.to(torch.int32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def activated_ffn_bytes(config, itemsize: int = 4) -> dict:
    """Bytes of MLP weights a token reads, dense and MoE-fied (all layers)."""
    per_layer = 3 * config.hidden_size * config.intermediate_size * itemsize
    share = config.moe_top_k / config.moe_experts if config.moe_experts else 1.0
    return {"dense": per_layer * config.num_hidden_layers,
            "activated": math.ceil(per_layer * share) * config.num_hidden_layers, "share": share}


def calibration_text(max_bytes: int = 49152) -> str:
    """Calibration text from the standard library, disjoint from what `moeflash compare` scores by
    default (the first 16 KB of each built-in domain): half code, half prose, after those 16 KB."""
    from .evaluate.corpora import builtin_text

    skip, half = 16384, max_bytes // 2
    return builtin_text("code", skip + half)[skip:] + builtin_text("prose", skip + half)[skip:]
