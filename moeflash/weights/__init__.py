"""Checkpoints: tensor names, FP8 / FP4 formats, lazy memory-mapped safetensors access."""

from .loader import Checkpoint, CheckpointError, load_into, load_state_dict
from .names import detect_scheme, hf_to_internal, internal_to_hf
from .quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8

__all__ = [
    "Checkpoint", "CheckpointError", "load_into", "load_state_dict",
    "detect_scheme", "hf_to_internal", "internal_to_hf",
    "dequant_fp4", "dequant_fp8", "quant_fp4", "quant_fp8",
]
