"""Where a model runs: `--device cpu|cuda|cuda:N|auto`, and moving a loaded model there whole.

Why a module: `model.to(device)` moves parameters and buffers, but a model also holds tensors outside
them (fused projections, packed experts: plain attributes that layers re-derive in `_apply`, and an
expert store's tiers). `move_model` moves the model and then checks that nothing was left behind, so a
missed tensor is an error at load, not a device mismatch in the middle of a request.
"""

from __future__ import annotations

import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' (CUDA when torch sees a GPU, else the CPU), 'cpu', 'cuda' or 'cuda:N' -> torch.device;
    a clear ValueError when the device is not there."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"--device {name!r}: moeflash runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA GPU (torch {torch.__version__}, CUDA build "
                         f"{torch.version.cuda or 'none'}); use --device cpu or auto")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def default_dtype(device: torch.device, dtype: str | torch.dtype) -> str | torch.dtype:
    """`--dtype auto` on a GPU is bfloat16 (what its tensor cores and the grouped expert GEMM take);
    on the CPU `auto` keeps its own rule (weights.build.resolve_dtype)."""
    if isinstance(dtype, str) and dtype == "auto" and device.type == "cuda":
        return torch.bfloat16
    return dtype


def tensors_elsewhere(model: nn.Module, device: torch.device) -> list[str]:
    """Names of tensors the model holds that are not on `device`: parameters, buffers, and tensors held
    as plain attributes of its modules or of objects those hold (fused projections, packed experts)."""
    want = torch.device(device)

    def off(t: torch.Tensor) -> bool:  # meta tensors hold nothing (experts an expert store serves)
        if t.device.type == "meta":
            return False
        return t.device.type != want.type or (want.index is not None and t.device.index != want.index)

    found = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if off(t)]
    seen: set[int] = set()

    def walk(obj, name: str, depth: int) -> None:
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        try:
            items = list(vars(obj).items())
        except TypeError:
            return
        for k, v in items:
            # an expert store keeps its tiers where their budgets say (engine/expert_tier.py)
            if k in ("_parameters", "_buffers", "_modules", "expert_store") or k.startswith("__"):
                continue
            for i, item in enumerate(v if isinstance(v, (list, tuple)) else (v,)):
                label = f"{name}.{k}" + (f"[{i}]" if isinstance(v, (list, tuple)) else "")
                if isinstance(item, torch.Tensor):
                    if off(item):
                        found.append(label)
                elif hasattr(item, "__dict__") and not isinstance(item, (nn.Module, type)):
                    walk(item, label, depth + 1)  # fused-linear objects and the like

    for mname, module in model.named_modules():
        walk(module, mname or "model", 0)
    return found


def move_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move a loaded model to `device` and check that every tensor it holds went with it. A model whose
    routed experts an expert store serves keeps them with the store (engine/expert_tier.py moves them)."""
    device = torch.device(device)
    model._apply(lambda t: t if t.device.type == "meta" else t.to(device))  # `.to` that skips meta
    left = tensors_elsewhere(model, device)
    if left:
        raise RuntimeError(f"moving the model to {device} left {len(left)} tensors behind: {', '.join(left[:5])}")
    return model
