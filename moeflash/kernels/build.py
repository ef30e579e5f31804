"""Build and load the native kernels (native/*.cpp) as torch custom ops (`torch.ops.moeflash.*`).

Why our own build: the project installs without ninja or a CUDA toolchain, and a few small C++ files compiled
once per (source, torch, compiler) into a cache folder is all the kernels need. `make install` builds it
(`python -m moeflash.kernels.build`); a first use builds it if that did not happen. The library is
compiled for the generic x86-64 baseline; its AVX2 and AVX-512 functions carry their own target
attributes and are called only when the CPU reports the features, so one build runs on every x86 CPU.
Without a compiler, or if the build fails, `load()` returns False and callers use the plain-torch
references in `reference.py` (slower, same results within fp32 rounding).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

NATIVE = Path(__file__).with_name("native")
# quant_ops.cpp: the fp32-activation ("exact") kernels; quant_act.cpp: the quantized-activation ("fast",
# "reference") kernels; block_ops.cpp: the small ops of a block (mHC, norms, rotations, the router's epilogue,
# SwiGLU); attention_ops.cpp: decode attention and the indexer's scores. Headers and the shared kernel body
# are hashed too.
SOURCES = [NATIVE / "quant_ops.cpp", NATIVE / "quant_act.cpp", NATIVE / "block_ops.cpp", NATIVE / "attention_ops.cpp"]
DEPENDS = [NATIVE / "cpu.h", NATIVE / "ops_common.h", NATIVE / "quant_act.h", NATIVE / "quant_act_kernels.inc"]
_state: dict = {}


def _cache_dir() -> Path:
    base = os.environ.get("MOEFLASH_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moeflash", "kernels")
    return Path(base)


def _compiler() -> str | None:
    for cc in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cc and shutil.which(cc):
            return cc
    return None


FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp"]


def _key(cxx: str) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES + DEPENDS), torch.__version__.encode(), version.encode(), sys.version.encode(),
                 " ".join(FLAGS).encode()):
        h.update(part)
    return h.hexdigest()[:16]


def library_path() -> Path | None:
    cxx = _compiler()
    return None if cxx is None else _cache_dir() / _key(cxx) / "moeflash_kernels.so"


def build(verbose: bool = False) -> Path:
    """Compile the library if it is not in the cache; returns its path. Raises RuntimeError on failure."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++, c++ or clang++) found; the plain-torch kernels are used")
    out = library_path()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import include_paths, library_paths

    with open(out.parent / ".lock", "w") as lock:  # two processes may build at once (tests, servers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        compile_flags = [f for f in FLAGS if f != "-shared"] + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                                                                 f"-I{sysconfig.get_paths()['include']}"]
        compile_flags += [f"-I{p}" for p in include_paths()]
        # one compiler per source, in parallel (the quantized-activation file is the slow one), then a link
        objs = [out.with_name(f"{src.stem}.{os.getpid()}.o") for src in SOURCES]
        procs = [subprocess.Popen([cxx, *compile_flags, "-c", str(src), "-o", str(obj)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for src, obj in zip(SOURCES, objs)]
        results = [(p.args, *p.communicate()) for p in procs]
        cmd = [cxx, "-shared", "-fopenmp", *map(str, objs), "-o", str(tmp)]
        cmd += [f"-L{p}" for p in library_paths()] + [f"-Wl,-rpath,{p}" for p in library_paths()]
        cmd += ["-lc10", "-ltorch", "-ltorch_cpu"]
        failed = [(args, err) for (args, _, err), p in zip(results, procs) if p.returncode != 0]
        r = subprocess.run(cmd, capture_output=True, text=True) if not failed else None
        for obj in objs:
            obj.unlink(missing_ok=True)
        if failed or r.returncode != 0:
            tmp.unlink(missing_ok=True)
            args, err = failed[0] if failed else (cmd, r.stderr)
            raise RuntimeError(f"building the native kernels failed ({' '.join(args[:3])} ...):\n{err[-3000:]}")
        if verbose:
            for _, _, err in results:
                if err:
                    print(err, file=sys.stderr)
        os.replace(tmp, out)
    return out


def load() -> bool:
    """Load the native ops once per process (building them if needed); False if they cannot be had.
    MOEFLASH_KERNELS=torch forces the plain-torch references."""
    if "ok" in _state:
        return _state["ok"]
    ok = False
    if os.environ.get("MOEFLASH_KERNELS", "").lower() != "torch":
        try:
            torch.ops.load_library(str(build()))
            from .fake import register

            register()  # shapes without data, so torch.compile traces through the ops (kernels/fake.py)
            ok = True
        except Exception as e:  # no compiler, headers or toolchain: the references run (a GPU box may lack them)
            _state["error"] = str(e)
    _state["ok"] = ok
    return ok


def status() -> dict:
    """What the kernels run on: native (with its instruction-set path) or the torch references."""
    if load():
        return {"kernels": "native", "isa": torch.ops.moeflash.isa(), "library": str(library_path())}
    return {"kernels": "torch", "why": _state.get("error", "MOEFLASH_KERNELS=torch")}


def main() -> int:
    """`make install`: build now, so that no first request waits for the compiler. Never fails the install:
    without the library the plain-torch kernels run."""
    import json
    import time

    t0 = time.perf_counter()
    try:
        build()
    except RuntimeError as e:
        print(f"moeflash kernels: {e}", file=sys.stderr)
        return 0
    print(json.dumps({**status(), "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
