"""Planner inputs from a GPU check's measurements (bench/gpu_check.py's JSON file).

Why: the GPU profiles (h100, h200, 8xh200) stand on published figures and an assumed efficiency. The GPU
check measures, on the machine itself, what the planner's measured-layer estimate needs: the read
bandwidth and bf16 GEMM rate (the rooflines), the host-to-device copy speed from pinned memory (what an
expert miss costs), and the decode time of one V4-Flash layer at real size with CUDA graphs, and of the
head (as CUDA graphs, and eagerly: with an expert store the steps are eager, so a plan with experts
outside GPU memory uses the eager time). `moeflash plan --measured FILE` plans with those numbers in
place of the published ones; each replaced figure's source names the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from .hardware import Hardware


def load_measurements(path: str | Path) -> dict:
    """The parts of a gpu_check JSON the planner uses; a clear ValueError when the file lacks them."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--measured {path}: not a readable JSON file ({e})") from None
    sec = data.get("sections", {})
    probes, planner = sec.get("probes"), sec.get("planner")
    missing = [n for n, v in (("probes", probes), ("planner", planner)) if not v]
    if missing:
        errors = data.get("errors", {})
        why = "; ".join(f"{n}: {str(errors.get(n, 'absent')).strip().splitlines()[-1]}" for n in missing)
        raise ValueError(f"--measured {path}: the GPU check has no {' / '.join(missing)} section ({why})")
    layer_ms = planner.get("layer_ms", {})
    b1 = layer_ms.get("1", layer_ms.get(1))
    if not b1 or b1 <= 0:
        raise ValueError(f"--measured {path}: no batch-1 per-layer time in its planner section")
    return {"file": str(path), "device": data.get("machine", {}).get("device"),
            "device_name": probes.get("device_name"), "model": planner.get("model"),
            "bandwidth_gbps": probes["hbm_read_gbps"], "tflops": probes["bf16_gemm_tflops"],
            "memory_gib": probes.get("device_memory_gib"), "host_link_gbps": probes.get("h2d_pinned_gbps"),
            "layer_ms": b1, "head_ms": planner.get("head_ms"),
            # with an expert store: the layer timed with the store (all experts cached), else the eager one
            "layer_ms_store": planner.get("layer_ms_store_b1") or planner.get("layer_ms_eager_b1"),
            "quick": data.get("machine", {}).get("quick")}


def measured_hardware(base: Hardware, m: dict) -> Hardware:
    """`base` (a profile of the same kind of machine) with every figure the check measured replaced."""
    over = {"bandwidth_gbps": m["bandwidth_gbps"] * base.devices, "tflops": m["tflops"] * base.devices}
    if m.get("memory_gib"):
        over["memory_gib"] = m["memory_gib"] * base.devices
    if m.get("host_link_gbps"):
        over["host_link_gbps"] = m["host_link_gbps"] * base.devices
    src = f"measured by bench/gpu_check.py ({m['file']}" + (f", {m['device_name']}" if m.get("device_name") else "") + ")"
    return base.replace(**over, sources={**base.sources, **{k: src for k in over},
                                         "layer_ms": src, "head_ms": src})
