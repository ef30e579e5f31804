"""Lazy access to safetensors checkpoints under moeflash's internal tensor names.

A checkpoint is one `*.safetensors` file, a folder of them, or a folder with
`model.safetensors.index.json` (shards listed in its `weight_map`). Opening one reads only the
headers: each is checked against the file size first, so a truncated download is reported by name
instead of surfacing later as garbage. Tensor data is read only when `Checkpoint.get` asks for it, with
pread into memory the process owns (a routed expert inside a merged HF tensor alone), so no mapping of
the files lingers in resident memory while a model loads; dtypes pread does not know go through
`safetensors.safe_open`.

`get` returns tensors under the INTERNAL (= official DeepSeek) names of `names.py`, decoding FP8 / FP4
weights that have a companion scale (`X.scale`, or HF `X.weight_scale_inv` / `..._proj_scale_inv`).
`load_state_dict` checks a whole checkpoint against a model's expected names and shapes first and
reports every problem with the tensor, the file and the expected shape.
"""

from __future__ import annotations

import json
import os
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from . import names as N
from .quant import FP4_GROUP, FP8_BLOCK, dequant_fp4, dequant_fp8, fp4_scale_shape, fp8_scale_shape

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors refuses larger headers too

# Bits per element of each safetensors dtype (F4 shapes count 4-bit elements).
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "U16": 16, "I16": 16, "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32,
    "U64": 64, "I64": 64, "F64": 64, "C64": 64, "F4": 4,
}
# safetensors dtype -> torch dtype, for the tensors read with pread (others go through safe_open)
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                "F8_E8M0": torch.float8_e8m0fnu}
_FP8_DTYPES = ("F8_E4M3",)
_FP4_DTYPES = ("I8", "U8", "F4")
_SCALE_DTYPES = ("F8_E8M0", "U8", "F32", "BF16", "F16")


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not match what the model expects."""


def _shp(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header describes it (offsets relative to the data section)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class TensorInfo:
    """What an internal name resolves to, known from headers alone.

    shape is the logical shape `get` returns; fmt is "fp8", "fp4" or None; expert / half locate a
    routed expert inside a merged HF tensor (half 0 / 1 = w1 / w3 rows of gate_up_proj).
    """

    name: str
    shape: tuple[int, ...]
    source: StoredTensor
    scale: StoredTensor | None = None
    fmt: str | None = None
    expert: int | None = None
    half: int | None = None

    @property
    def file(self) -> Path:
        return self.source.file


def contiguous_span(shape: tuple[int, ...], index: tuple | None) -> tuple[int, int, tuple[int, ...]] | None:
    """(first element, element count, result shape) of `tensor[index]` when it is one contiguous run of
    a row-major tensor: leading integer indices, then at most one step-1 slice; None otherwise."""
    index = index or ()
    first, dims = 0, list(shape)
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    out_shape: list[int] = []
    for k, ix in enumerate(index):
        if isinstance(ix, int) and not out_shape:
            if not -shape[k] <= ix < shape[k]:
                return None
            first += (ix % shape[k]) * strides[k]
        elif isinstance(ix, slice) and not out_shape and ix.step in (None, 1):
            a, b, _ = ix.indices(shape[k])
            first += a * strides[k]
            out_shape.append(max(0, b - a))
        else:
            return None
    rest = dims[len(index):]
    out = tuple(out_shape + rest)
    return first, math.prod(out), out


def pread_exact(fd: int, offset: int, nbytes: int) -> bytearray:
    """Exactly `nbytes` from `fd` at `offset` (OSError on a short file)."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise OSError(f"short read at offset {offset + got} ({got} of {nbytes} bytes)")
        got += n
    return buf


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Parse and check one safetensors header without reading tensor data.

    Raises CheckpointError for files that are not safetensors, have a corrupt header, or are shorter
    than their header says (truncated downloads).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{path} is not a safetensors file (its first 8 bytes do not give a valid header length; "
                    f"file size {size} bytes); re-download or re-convert it"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e}); re-download or re-convert it") from e

    data_size = size - 8 - n
    out: dict[str, StoredTensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
            bits = _DTYPE_BITS[dtype]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"{path} has a corrupt or unsupported header entry for tensor {name!r}: {meta!r} ({err!r})"
            ) from err
        need = -(-math.prod(shape) * bits // 8)
        if e - b != need or b < 0:
            raise CheckpointError(
                f"{path} has a corrupt header: tensor {name!r} ({dtype} {_shp(shape)}) needs {need} bytes "
                f"but its data_offsets [{b}, {e}] span {e - b}; re-download or re-convert it"
            )
        out[name] = StoredTensor(name, path, dtype, shape, b, e)
    last = max(out.values(), key=lambda t: t.end, default=None)
    if last is not None and last.end > data_size:
        first_bad = min((t for t in out.values() if t.end > data_size), key=lambda t: t.end)
        raise CheckpointError(
            f"{path} is truncated: it has {size} bytes but its header says {8 + n + last.end}; tensor "
            f"{first_bad.name!r} ({first_bad.dtype} {_shp(first_bad.shape)}) lies past the end of the file. "
            "Re-download this file"
        )
    used = last.end if last is not None else 0
    if used < data_size:
        raise CheckpointError(
            f"{path} is corrupt: it has {data_size - used} bytes more than its header describes "
            f"({size} bytes, header says {8 + n + used}). Re-download or re-convert this file"
        )
    return out


def _checkpoint_files(path: Path) -> tuple[list[Path], Path | None]:
    """Files of a checkpoint path, and its index json if any."""
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.is_file():
        return ([], path) if path.name.endswith(".json") else ([path], None)
    if (path / INDEX_NAME).is_file():
        return [], path / INDEX_NAME
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no *.safetensors files in {path}; expected model.safetensors, or shards with {INDEX_NAME}"
        )
    return files, None


def _read_index(index: Path) -> dict[str, StoredTensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map' object): {e!r}") from e
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    tensors: dict[str, StoredTensor] = {}
    for shard, listed in by_shard.items():
        file = index.parent / shard
        if not file.is_file():
            raise CheckpointError(
                f"{index.name} maps {len(listed)} tensor(s), e.g. {listed[0]!r}, to shard {shard!r}, but {file} "
                "does not exist; download the missing shard"
            )
        header = read_header(file)
        for name in listed:
            if name not in header:
                raise CheckpointError(
                    f"{index.name} says tensor {name!r} is in {shard!r}, but that file has no such tensor; "
                    "the index and the shards come from different versions: re-download both"
                )
        _merge_headers(tensors, header)
    return tensors


def _merge_headers(into: dict[str, StoredTensor], header: Mapping[str, StoredTensor]) -> None:
    for name, t in header.items():
        if name in into and into[name].file != t.file:
            raise CheckpointError(
                f"tensor {name!r} is stored twice, in {into[name].file.name} and {t.file.name}; "
                "remove the stray file from the checkpoint folder"
            )
        into[name] = t


def _scale_target(name: str, stored: Mapping[str, StoredTensor]) -> str | None:
    """The weight a stored scale belongs to (`X.scale`, `X.weight_scale_inv`, `X_scale_inv`), if stored."""
    for suffix, repl in ((".weight_scale_inv", ".weight"), ("_scale_inv", ""), (".scale", ".weight")):
        if name.endswith(suffix) and name[: -len(suffix)] + repl in stored:
            return name[: -len(suffix)] + repl
    return None


def _scale_name(weight: str, scheme: str) -> str:
    """Name the scale of a stored weight would have in its scheme."""
    if not weight.endswith(".weight"):
        return weight + "_scale_inv"
    return weight + "_scale_inv" if scheme == N.HF and weight.startswith("model.") else weight[:-7] + ".scale"


class Checkpoint:
    """A safetensors checkpoint seen under internal tensor names; data is read only on `get`."""

    def __init__(self, tensors: dict[str, StoredTensor], origin: Path):
        self.origin = origin
        self.files = sorted({t.file for t in tensors.values()})
        self.tensors = tensors  # stored name -> header entry
        self.reads = 0  # tensors read from disk so far
        self._handles: dict[Path, object] = {}
        self._fds: dict[Path, tuple[int, int]] = {}
        self._scales: dict[str, StoredTensor] = {}  # stored weight name -> its stored scale
        for name in tensors:
            target = _scale_target(name, tensors)
            if target is not None:
                self._scales[target] = tensors[name]
        try:
            self.scheme = N.detect_scheme(tensors)
        except ValueError:
            self.scheme = N.OFFICIAL  # unknown names: used as stored
        # internal name -> (stored name, expert, half)
        self._where: dict[str, tuple[str, int | None, int | None]] = {}
        for name, t in tensors.items():
            if _scale_target(name, tensors) is not None:
                continue
            for iname, j, half in self._internal(name, t):
                if iname in self._where:
                    other = self._where[iname][0]
                    raise CheckpointError(
                        f"{t.file.name}: tensors {other!r} and {name!r} both map to {iname!r}; keep only one"
                    )
                self._where[iname] = (name, j, half)

    def _internal(self, name: str, t: StoredTensor) -> list[tuple[str, int | None, int | None]]:
        if self.scheme != N.HF:
            return [(name, None, None)]
        try:
            if N.is_hf_merged_expert(name):
                return N.hf_expert_names(name, t.shape[0] if t.shape else 0)
            return [(N.hf_to_internal_name(name), None, None)]
        except ValueError:
            return [(name, None, None)]  # not a V4 name: keep it as stored (e.g. a dense model)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Open a `.safetensors` file, a folder of them, or a sharded folder / its index json."""
        path = Path(path)
        files, index = _checkpoint_files(path)
        tensors: dict[str, StoredTensor] = {}
        if index is not None:
            tensors = _read_index(index)
        for f in files:
            _merge_headers(tensors, read_header(f))
        return cls(tensors, path)

    # -- names and metadata (no data read) ---------------------------------------------------------
    def names(self) -> list[str]:
        """Internal names of all tensors (scales are folded into their weights)."""
        return list(self._where)

    def stored_names(self) -> list[str]:
        """Tensor names exactly as stored in the files."""
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def _searched(self) -> str:
        shown = ", ".join(f.name for f in self.files[:6])
        more = f" and {len(self.files) - 6} more" if len(self.files) > 6 else ""
        return f"{len(self.files)} file(s) of {self.origin}: {shown}{more}"

    def _stored_name_hint(self, name: str) -> str:
        if self.scheme != N.HF:
            return ""
        try:
            if N.is_routed_expert(name):
                hf, j, _ = N.hf_expert_location(name)
                return f" (HF: expert {j} of {hf!r})"
            return f" (HF: {N.internal_to_hf_name(name)!r})"
        except ValueError:
            return " (Hugging Face checkpoints have no MTP weights)" if name.startswith("mtp.") else ""

    def info(self, name: str) -> TensorInfo:
        """Resolve an internal name: stored tensor, scale, format and logical shape (headers only)."""
        if name not in self._where:
            raise CheckpointError(
                f"tensor {name!r}{self._stored_name_hint(name)} not found; searched {self._searched()}"
            )
        stored, j, half = self._where[name]
        t = self.tensors[stored]
        shape = t.shape[1:] if j is not None else t.shape
        scale = self._scales.get(stored)
        fmt = None
        where = f"tensor {name!r} in {t.file.name}" + (f" (stored as {stored!r})" if stored != name else "")
        if scale is not None:
            fmt, shape = self._check_scale(where, t, scale, shape, j is not None)
        elif t.dtype in _FP8_DTYPES + ("F4",) or (t.dtype in ("I8", "U8") and stored.endswith(("weight", "_proj"))):
            raise self._missing_scale(where, t, shape, j is not None)
        if half is not None:
            if shape[0] % 2:
                raise CheckpointError(f"{where}: merged gate_up_proj has an odd number of rows {_shp(shape)}")
            shape = (shape[0] // 2, *shape[1:])
        return TensorInfo(name, tuple(shape), t, scale, fmt, j, half)

    def _missing_scale(self, where: str, t: StoredTensor, shape: tuple[int, ...], merged: bool) -> CheckpointError:
        kind = "FP8" if t.dtype in _FP8_DTYPES else "FP4"
        want = ""
        if len(shape) == 2:
            if kind == "FP8":
                grid = fp8_scale_shape(*shape)
            else:
                grid = fp4_scale_shape(shape[0], shape[1] if t.dtype == "F4" else 2 * shape[1])
            want = f", expected shape {_shp(((t.shape[0],) if merged else ()) + grid)}"
        return CheckpointError(
            f"{where} is {t.dtype} ({kind}-quantized) but has no scale tensor (looked for "
            f"{_scale_name(t.name, self.scheme)!r}{want}); the checkpoint is incomplete: re-download the "
            "shard holding the scales"
        )

    def _check_scale(self, where: str, t: StoredTensor, scale: StoredTensor, shape: tuple[int, ...],
                     merged: bool) -> tuple[str, tuple[int, ...]]:
        """Format and logical shape of a weight with a scale; errors name the expected scale shape."""
        if len(shape) != 2:
            raise CheckpointError(f"{where} has a scale but shape {_shp(shape)}; quantized weights are 2-D")
        if t.dtype in _FP8_DTYPES:
            fmt, logical = "fp8", shape
            grid = fp8_scale_shape(*shape, FP8_BLOCK)
        elif t.dtype in _FP4_DTYPES:
            fmt = "fp4"
            logical = shape if t.dtype == "F4" else (shape[0], 2 * shape[1])
            grid = fp4_scale_shape(*logical, FP4_GROUP)
        else:
            raise CheckpointError(
                f"{where} has dtype {t.dtype} but a companion scale {scale.name!r}; only F8_E4M3 (FP8) and "
                "I8 (packed FP4) weights carry scales"
            )
        want = ((t.shape[0],) if merged else ()) + grid
        if scale.shape != want or scale.dtype not in _SCALE_DTYPES:
            raise CheckpointError(
                f"{where}: its scale {scale.name!r} in {scale.file.name} has shape {_shp(scale.shape)} and dtype "
                f"{scale.dtype}, expected shape {_shp(want)} ({fmt.upper()} weight {_shp(t.shape)}) with dtype "
                "F8_E8M0 (or a float multiplier)"
            )
        return fmt, logical

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape of an internal tensor (after dequantization / expert split)."""
        return self.info(name).shape

    # -- data ---------------------------------------------------------------------------------------
    def _handle(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot open {file} as safetensors: {e}") from e
        return self._handles[file]

    def fd(self, file: Path) -> tuple[int, int]:
        """(file descriptor, offset of the data section) of one of the checkpoint's files, for pread;
        open until `close`."""
        if file not in self._fds:
            fd = os.open(file, os.O_RDONLY)
            self._fds[file] = (fd, 8 + int.from_bytes(os.pread(fd, 8, 0), "little"))
        return self._fds[file]

    def _pread(self, t: StoredTensor, index: tuple | None) -> torch.Tensor | None:
        """The tensor (or a contiguous slice: leading integer indices, then at most one step-1 slice)
        read with pread into memory this process owns: no mapping of the file lingers in its
        resident memory. None where that does not apply (then safe_open reads it)."""
        dtype = TORCH_DTYPES.get(t.dtype)
        span = contiguous_span(t.shape, index)
        if dtype is None or span is None:
            return None
        first, count, shape = span
        item = torch.empty((), dtype=dtype).element_size()
        fd, base = self.fd(t.file)
        return torch.frombuffer(pread_exact(fd, base + t.start + first * item, count * item), dtype=dtype).view(shape) \
            if count else torch.empty(shape, dtype=dtype)

    def _read(self, t: StoredTensor, index: tuple | None = None) -> torch.Tensor:
        try:
            out = self._pread(t, index)
            if out is None:
                h = self._handle(t.file)
                out = h.get_tensor(t.name) if index is None else h.get_slice(t.name)[index]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {t.name!r} from {t.file}: {e}") from e
        self.reads += 1
        return out

    def _rows(self, info: TensorInfo) -> tuple[int, int] | None:
        """Row range of a w1 / w3 half inside its expert's gate_up rows, or None for whole tensors."""
        if info.half is None:
            return None
        n = info.shape[0]
        return (0, n) if info.half == 0 else (n, 2 * n)

    def get_quantized(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
        """(stored weight, stored scale or None, "fp8" | "fp4" | None) without decoding.

        Keeps FP4 experts 4x smaller than bf16 in memory; decode later with `quant.dequant_*`.
        """
        info = self.info(name)
        rows = self._rows(info)
        if info.fmt == "fp8" and rows and rows[0] % FP8_BLOCK:
            raise CheckpointError(
                f"tensor {name!r} in {info.file.name}: w1 / w3 split at row {rows[0]} cuts through "
                f"{FP8_BLOCK}-row FP8 scale blocks; use get() to decode the merged expert instead"
            )
        idx = (info.expert,) if info.expert is not None else ()
        w_idx = idx + ((slice(*rows),) if rows else ())
        weight = self._read(info.source, w_idx or None)
        scale = None
        if info.scale is not None:
            s_rows = rows
            if rows and info.fmt == "fp8":
                s_rows = (rows[0] // FP8_BLOCK, -(-rows[1] // FP8_BLOCK))
            s_idx = idx + ((slice(*s_rows),) if s_rows else ())
            scale = self._read(info.scale, s_idx or None)
        return weight, scale, info.fmt

    def get(self, name: str, dtype: torch.dtype | None = None,
            expected_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Read one tensor by internal name; quantized weights come back decoded (float32 by default).

        dtype converts floating-point results only (integer buffers such as `tid2eid` stay integer).
        expected_shape, if given, is checked before any data is read.
        """
        info = self.info(name)
        if expected_shape is not None and tuple(expected_shape) != info.shape:
            raise CheckpointError(self._shape_msg(info, expected_shape))
        rows = self._rows(info)
        if info.fmt == "fp8" and rows and rows[0] % FP8_BLOCK:
            full = dequant_fp8(self._read(info.source, (info.expert,)), self._read(info.scale, (info.expert,)))
            out = full[rows[0]:rows[1]]
        elif info.fmt is not None:
            w, s, fmt = self.get_quantized(name)
            out = dequant_fp8(w, s) if fmt == "fp8" else dequant_fp4(w, s)
        else:
            idx = ((info.expert,) if info.expert is not None else ()) + ((slice(*rows),) if rows else ())
            out = self._read(info.source, idx or None)
        if dtype is not None and out.dtype.is_floating_point:
            out = out.to(dtype)
        return out

    def _shape_msg(self, info: TensorInfo, expected: Sequence[int]) -> str:
        stored = "" if info.source.name == info.name else f" (stored as {info.source.name!r}" + (
            f", expert {info.expert})" if info.expert is not None else ")")
        return (f"tensor {info.name!r} in {info.file.name}{stored} has shape {_shp(info.shape)}, "
                f"expected {_shp(expected)}")

    def close(self) -> None:
        """Drop the open file handles (and their memory maps)."""
        self._handles.clear()
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.origin)!r}, scheme={self.scheme!r}, {len(self._where)} tensors, {len(self.files)} file(s))"


# -- whole models -----------------------------------------------------------------------------------

Spec = torch.Tensor | Sequence[int]


def _spec(spec: Spec) -> tuple[tuple[int, ...], torch.dtype | None]:
    if isinstance(spec, torch.Tensor):
        return tuple(spec.shape), spec.dtype
    return tuple(int(s) for s in spec), None


def _report(ckpt: Checkpoint, problems: list[str]) -> CheckpointError:
    shown = "\n  - ".join(problems[:12])
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    return CheckpointError(
        f"checkpoint {ckpt.origin} does not match the model ({len(problems)} problem(s)):\n  - {shown}{more}"
    )


def check(ckpt: Checkpoint, expected: Mapping[str, Spec], skip_prefixes: Sequence[str] = ()) -> dict[str, TensorInfo]:
    """Check names, shapes and scales against `expected` (name -> tensor or shape) from headers only."""
    problems: list[str] = []
    for name in ckpt.names():
        if name not in expected and not name.startswith(tuple(skip_prefixes)):
            file = ckpt.tensors[ckpt._where[name][0]].file.name
            hint = ""
            if name.startswith("mtp."):
                hint = (" (multi-token-prediction weights load only into a model built with MTP; "
                        "build it with MTP or pass skip_prefixes=('mtp.',) to ignore them)")
            problems.append(f"unexpected tensor {name!r} in {file}{hint}")
    infos: dict[str, TensorInfo] = {}
    for name, spec in expected.items():
        shape, _ = _spec(spec)
        if name not in ckpt:
            problems.append(f"missing tensor {name!r}{ckpt._stored_name_hint(name)} (expected shape {_shp(shape)}); "
                            f"searched {ckpt._searched()}")
            continue
        try:
            info = ckpt.info(name)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if info.shape != shape:
            problems.append(ckpt._shape_msg(info, shape))
        infos[name] = info
    if problems:
        raise _report(ckpt, problems)
    return infos


def load_state_dict(ckpt: Checkpoint, expected: Mapping[str, Spec], dtype: torch.dtype | None = None,
                    skip_prefixes: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Read every tensor `expected` names after checking the whole checkpoint (see `check`).

    expected maps internal names to a tensor (e.g. a model's `state_dict()`, meta tensors are fine: its
    shape and dtype are used) or a shape. Floating tensors are converted to `dtype` if given, else to the
    expected tensor's dtype; without either, they keep the stored dtype (float32 for decoded FP8 / FP4).
    """
    check(ckpt, expected, skip_prefixes)
    out: dict[str, torch.Tensor] = {}
    for name, spec in expected.items():
        t = ckpt.get(name)
        _, want = _spec(spec)
        if want is not None and want.is_floating_point != t.dtype.is_floating_point:
            raise CheckpointError(
                f"tensor {name!r} in {ckpt.info(name).file.name} has dtype {t.dtype} but the model expects {want}"
            )
        target = dtype if dtype is not None and t.dtype.is_floating_point else want
        out[name] = t.to(target) if target is not None and target != t.dtype else t
    return out


def load_into(module: torch.nn.Module, ckpt: Checkpoint, dtype: torch.dtype | None = None,
              skip_prefixes: Sequence[str] = ()) -> torch.nn.Module:
    """Load a checkpoint into a module whose state_dict keys are internal names (strict).

    A module built on the meta device gets the loaded tensors assigned instead of copied.
    """
    expected = module.state_dict()
    state = load_state_dict(ckpt, expected, dtype, skip_prefixes)
    module.load_state_dict(state, strict=True, assign=any(t.is_meta for t in expected.values()))
    return module


__all__ = ["CheckpointError", "Checkpoint", "StoredTensor", "TensorInfo", "read_header", "check",
           "load_state_dict", "load_into", "INDEX_NAME"]
