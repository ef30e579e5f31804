"""The planner for expert parallelism across machines: N nodes, each a `Hardware` profile, joined by a
network of `link_gbps` GB/s and `link_latency_us` per message.

The layout is moeflash's (`engine/parallel.py`): the dense part is replicated on every node, each node
holds 1/N of every MoE layer's routed experts, and after each MoE layer the nodes all-reduce the
routed partial sums of the step's tokens. Per decode step of batch B:

- **bytes per node**: the dense weights (every node reads all of them), the busiest node's routed
  experts (expected max load of the distinct experts a step uses, spread over N nodes; the step waits
  for it), and the state of the B sequences (every node holds and reads it);
- **collectives**: one all-reduce per MoE layer of B x hidden x activation bytes. A ring all-reduce
  sends 2 (N-1)/N of the buffer through each node's link and takes 2 (N-1) latencies;
- **time**: bytes / (bandwidth x decode efficiency) on the node, plus the all-reduces (not overlapped:
  the next layer needs the sum).

Memory per node: dense + state + 1/N of the experts (+ the node's reserve); the plan says whether it fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .hardware import Hardware
from .planner import (GIB, WEIGHT_DTYPES, distinct_experts, expected_max_load, model_summary, per_million_usd,
                      resolve_model, state_components, state_read_bytes)


@dataclass
class ClusterInputs:
    model: str = "v4-flash"
    nodes: int = 2
    link_gbps: float = 1.25          # 10 GbE
    link_latency_us: float = 50.0    # one message, one way, through the network stack
    batch: int = 1
    context: int = 8192
    weights_dtype: str | None = None
    state_dtype: str = "bf16"
    activation_bytes: int = 2        # bf16 partial sums on the wire
    utilization: float = 0.5


def allreduce_seconds(nbytes: float, nodes: int, link_gbps: float, latency_us: float) -> float:
    """A ring all-reduce of `nbytes` over `nodes`: 2 (N-1) steps of 1/N of the buffer each."""
    if nodes <= 1:
        return 0.0
    return 2 * (nodes - 1) * (latency_us * 1e-6 + nbytes / nodes / (link_gbps * 1e9))


def cluster_plan(inp: ClusterInputs, node: Hardware) -> dict:
    if inp.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {inp.nodes}")
    if not inp.link_gbps > 0 or inp.link_latency_us < 0:
        raise ValueError("--link-gbps must be > 0 and --link-latency-us >= 0")
    name, c, native = resolve_model(inp.model)
    dense_fmt, expert_fmt = WEIGHT_DTYPES[inp.weights_dtype or native]
    s = model_summary(c, dense_fmt, expert_fmt)
    n, b = inp.nodes, inp.batch
    eb = s["expert_bytes"]
    moe_layers = c.num_hidden_layers  # every V4 layer routes (hash-routed layers included)
    # memory per node
    state = b * state_components(c, inp.context, inp.state_dtype)["total"]
    experts_node = math.ceil(s["routed_bytes"] / n)
    capacity = node.memory_gib * GIB * (1 - node.reserve_fraction) - node.runtime_gib * GIB
    used = s["dense_bytes"] + experts_node + state
    # one decode step
    d = distinct_experts(c.n_routed_experts, c.num_experts_per_tok, b)
    busiest = c.num_hidden_layers * expected_max_load(c.n_routed_experts, d, n) * eb
    dense = s["dense_read_bytes"] + b * s["embed_row_bytes"]
    state_read = b * state_read_bytes(c, inp.context, inp.state_dtype)
    per_node = dense + busiest + state_read
    t_mem = per_node / (node.bandwidth_gbps * 1e9 * node.decode_efficiency)
    msg = b * c.hidden_size * inp.activation_bytes
    t_comm = moe_layers * allreduce_seconds(msg, n, inp.link_gbps, inp.link_latency_us)
    step = t_mem + t_comm
    tps = b / step
    price = node.price_per_hour * n if node.price_per_hour is not None else None
    return {
        "model": name, "nodes": n, "node": node.name, "batch": b, "context": inp.context,
        "memory_per_node": {"dense": s["dense_bytes"], "experts": experts_node, "state": state, "total": used,
                            "capacity": capacity, "fits": used <= capacity},
        "per_step": {"bytes_per_node": per_node, "dense": dense, "experts_busiest_node": busiest,
                     "state": state_read, "allreduces": moe_layers, "allreduce_bytes": msg,
                     "wire_bytes_per_node": moe_layers * 2 * (n - 1) / n * msg if n > 1 else 0.0},
        "time_ms": {"memory": 1e3 * t_mem, "network": 1e3 * t_comm, "step": 1e3 * step},
        "tokens_per_s": tps, "price_per_hour": price,
        "usd_per_million_output": per_million_usd(price, tps, inp.utilization),
        "arithmetic": (f"{per_node / 1e9:.2f} GB per node / ({node.bandwidth_gbps:g} GB/s x "
                       f"{node.decode_efficiency:.2f}) = {1e3 * t_mem:.1f} ms; {moe_layers} all-reduces of "
                       f"{msg:,} B over {n} nodes at {inp.link_gbps:g} GB/s, {inp.link_latency_us:g} us = "
                       f"{1e3 * t_comm:.2f} ms; {b} / {step:.4f} s = {tps:.2f} tok/s"),
    }


def format_cluster(p: dict) -> str:
    m, t = p["memory_per_node"], p["time_ms"]
    lines = [f"{p['model']} on {p['nodes']} x {p['node']} (batch {p['batch']}, context {p['context']:,}):",
             f"  memory per node: dense {m['dense'] / GIB:.1f} + experts {m['experts'] / GIB:.1f} + state "
             f"{m['state'] / GIB:.2f} = {m['total'] / GIB:.1f} GiB of {m['capacity'] / GIB:.1f} "
             f"({'fits' if m['fits'] else 'DOES NOT FIT'})",
             f"  per step: {p['per_step']['bytes_per_node'] / 1e9:.2f} GB read per node, "
             f"{p['per_step']['allreduces']} all-reduces of {p['per_step']['allreduce_bytes']:,} bytes",
             f"  time: memory {t['memory']:.1f} ms + network {t['network']:.2f} ms = {t['step']:.1f} ms per step, "
             f"{p['tokens_per_s']:.2f} tok/s"]
    if p["usd_per_million_output"] is not None:
        lines.append(f"  ${p['price_per_hour']:.2f}/h for the cluster: ${p['usd_per_million_output']:.2f} per million "
                     "output tokens")
    lines.append(f"  ({p['arithmetic']})")
    return "\n".join(lines)
