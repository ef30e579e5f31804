"""Prefix cache, RAM tier: sequence states saved at token-block boundaries and found again by the
tokens before them, so a prompt that starts like an earlier one skips that part of its prefill.

A key is a hash chain over whole blocks of `block_tokens` tokens (block i's key hashes block i-1's key
and block i's tokens), so a shared system prompt, a document and earlier chat turns all match however
the prompt continues. A value is a copy of the state after exactly those tokens (`state.clone()`), so
reuse is exact: the sequence continues as if it had prefilled them itself. The engine saves a state
where a prompt's prefill crosses a boundary it asked for (`marks`) and looks the longest match up when
it admits a sequence. Entries are evicted least recently used first to stay within `budget_bytes`.

`DiskTier` (optional) keeps the same states as files in a directory, so they outlive the process: each
state saved in RAM is also queued to a writer thread (a decode step never waits for a disk write),
written as `KEY.safetensors.part` and renamed when complete, with a CRC-32 of its tensor bytes and
the model's fingerprint in its header. A lookup that misses in RAM reads the file back; a file that is
truncated, corrupt, from another model or in another layout is a miss, and is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("moeflash.prefix_cache")
FORMAT = "moeflash-prefix-state-2"  # 2: CRC-32 checksum


@dataclass
class _Entry:
    tokens: int
    state: object
    nbytes: int


class DiskTier:
    """Saved states as files under `directory`, at most `budget_bytes` of them (oldest used first out).

    `fingerprint` names the model (its configuration, dtype and a digest of its weights): a file made
    by another model is never used. `from_tensors(tensors, meta)` rebuilds a state; `template` is a fresh
    state of this model, whose tensors' dtypes and trailing dimensions a file must match."""

    def __init__(self, directory: str | Path, budget_bytes: int, fingerprint: str, from_tensors, template):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.budget_bytes, self.fingerprint, self.from_tensors = budget_bytes, fingerprint, from_tensors
        self._shapes = {k: (v.dtype, tuple(v.shape[1:])) for k, v in template.to_tensors()[0].items()}
        self.stats = {"written": 0, "read": 0, "bad_files": 0, "evictions": 0, "bytes_written": 0, "bytes_read": 0,
                      "write_seconds": 0.0, "read_seconds": 0.0}
        self._lock = threading.Lock()  # guards _files between the writer thread and lookups
        self._files: OrderedDict[bytes, int] = OrderedDict()  # key -> file bytes, oldest first
        for part in self.dir.glob("*.part"):  # a write that a crash interrupted: never trusted
            part.unlink(missing_ok=True)
        found = sorted(self.dir.glob("*.safetensors"), key=lambda f: f.stat().st_mtime)
        for f in found:
            try:
                self._files[bytes.fromhex(f.name.split(".")[0])] = f.stat().st_size
            except ValueError:
                continue
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="moeflash-prefix-writer", daemon=True)
        self._writer.start()

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(self._files.values())

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._files

    def _path(self, key: bytes) -> Path:
        return self.dir / f"{key.hex()}.safetensors"

    def put(self, key: bytes, tokens: int, state) -> None:
        """Queue a state (an immutable copy) for writing; returns at once."""
        self._queue.put((key, tokens, state))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued state is written (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._write(*item)
            except Exception:  # a full disk, a removed directory: the RAM tier goes on
                log.exception("prefix cache: writing a state failed")

    def _write(self, key: bytes, tokens: int, state) -> None:
        from safetensors.torch import save_file

        if key in self:
            return
        t0 = time.perf_counter()
        tensors, meta = state.to_tensors()
        digest = _digest(tensors)
        path = self._path(key)
        part = path.with_name(path.name + ".part")
        save_file(tensors, str(part), metadata={"format": FORMAT, "model": self.fingerprint, "tokens": str(tokens),
                                                "meta": json.dumps(meta), "digest": digest})
        os.replace(part, path)
        size = path.stat().st_size
        with self._lock:
            self._files[key] = size
            total = sum(self._files.values())
            while total > self.budget_bytes and self._files:
                old, old_size = self._files.popitem(last=False)
                self._path(old).unlink(missing_ok=True)
                total -= old_size
                self.stats["evictions"] += 1
        self.stats["written"] += 1
        self.stats["bytes_written"] += size
        self.stats["write_seconds"] += time.perf_counter() - t0

    def get(self, key: bytes) -> tuple[int, object] | None:
        """(tokens, state) read back, or None; a file that does not verify is removed."""
        if key not in self:
            return None
        path = self._path(key)
        t0 = time.perf_counter()
        try:
            tokens, state = self._read(path)
        except Exception as e:  # truncated, corrupt, foreign: a miss, never wrong output
            log.warning("prefix cache: %s is not usable (%s); removed", path.name, e)
            self.stats["bad_files"] += 1
            self._forget(key)
            return None
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
        os.utime(path)
        self.stats["read"] += 1
        self.stats["bytes_read"] += path.stat().st_size
        self.stats["read_seconds"] += time.perf_counter() - t0
        return tokens, state

    def _read(self, path: Path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            if meta.get("model") != self.fingerprint:
                raise ValueError("made by another model")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if _digest(tensors) != meta.get("digest"):
            raise ValueError("checksum mismatch")
        for k, t in tensors.items():
            want = self._shapes.get(k)
            if want is None or (t.dtype, tuple(t.shape[1:])) != want:
                raise ValueError(f"tensor {k} does not fit this model")
        state = self.from_tensors(tensors, json.loads(meta["meta"]))
        if state.pos != int(meta["tokens"]):
            raise ValueError("position and token count disagree")
        return int(meta["tokens"]), state

    def _forget(self, key: bytes) -> None:
        with self._lock:
            self._files.pop(key, None)
        self._path(key).unlink(missing_ok=True)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """A CRC-32 over the names, shapes and bytes of the tensors: it catches flipped bits and cut files
    at 4 GB/s (blake2b ran at 0.9 GB/s and was the disk tier's bottleneck); files from other models or
    layouts are caught by the fingerprint and the shape checks, not by this."""
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        crc = zlib.crc32(f"{name}{t.dtype}{tuple(t.shape)}".encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.view(torch.uint8).numpy().data, crc)  # the bytes in place, no copy
    return f"crc32:{crc:08x}"


def model_fingerprint(model) -> str:
    """A digest of the model's configuration, dtype and weights (a few rows of every tensor), so saved
    states are only ever used by the model that made them."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(getattr(model.config, "__dict__", str(model.config)), sort_keys=True, default=str).encode())
    for name, t in sorted(list(model.state_dict().items())):
        if t.device.type == "meta" or not t.numel():
            continue
        h.update(name.encode())
        h.update(t.reshape(-1)[:64].float().numpy().tobytes())
    return h.hexdigest()


class PrefixCache:
    def __init__(self, block_tokens: int, budget_bytes: int, disk: DiskTier | None = None):
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.block_tokens = block_tokens
        self.budget_bytes = budget_bytes
        self.disk = disk
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.bytes = 0
        self.stats = {"lookups": 0, "hits": 0, "hit_tokens": 0, "stored": 0, "evictions": 0, "disk_hits": 0}

    @classmethod
    def for_model(cls, model, ram_bytes: int, directory: str | Path | None = None,
                  disk_bytes: int = 0) -> "PrefixCache":
        """A cache for `model`'s states: its block size, and with `directory` a disk tier of
        `disk_bytes` that only this model's files pass (OSError when the directory cannot be made)."""
        disk = None
        if directory is not None:
            disk = DiskTier(directory, disk_bytes, model_fingerprint(model), model.state_from_tensors,
                            model.new_seq_state())
        return cls(model.prefix_block_tokens, ram_bytes, disk)

    def keys(self, tokens: list[int], upto: int) -> list[bytes]:
        """The chain keys of the whole blocks of tokens[:upto]."""
        out, key = [], b""
        arr = np.asarray(tokens[: upto - upto % self.block_tokens], dtype=np.int64)
        for i in range(0, len(arr), self.block_tokens):
            key = hashlib.blake2b(key + arr[i:i + self.block_tokens].tobytes(), digest_size=16).digest()
            out.append(key)
        return out

    def marks(self, prompt: list[int], hints: list[int] = ()) -> list[int]:
        """Where a prompt's prefill should save its state: the last block boundary before its last token
        (the next turn of a chat extends the whole prompt), and the boundary at or before each hint
        (e.g. where the last message starts: the next question about the same document)."""
        b, last = self.block_tokens, len(prompt) - 1
        return sorted({p for p in [last // b * b, *[min(h, last) // b * b for h in hints]] if p > 0})

    def worth_saving(self, marks: list[int], start: int) -> list[int]:
        """The marks past `start` (what the sequence starts from) that each add at least an eighth to
        the prefix before them (and a block): a question 16 tokens past a cached 8,000-token document
        is not worth another full copy of the document's state."""
        out, last = [], start
        for m in marks:
            if m - last >= max(self.block_tokens, last // 8):
                out.append(m)
                last = m
        return out

    def tail_mark(self, consumed: int, base: int) -> int | None:
        """Where a sequence that has consumed `consumed` tokens (prompt and reply) and last saved or
        restored its state at `base` should leave a state behind: the last block boundary, when it is
        worth saving (`worth_saving`); else None. The next turn of a chat starts with this reply."""
        marks = self.worth_saving([consumed // self.block_tokens * self.block_tokens], base)
        return marks[0] if marks else None

    def lookup(self, prompt: list[int]) -> tuple[int, object] | None:
        """(tokens, a copy of the saved state) for the longest saved prefix of prompt[:-1], or None."""
        self.stats["lookups"] += 1
        for key in reversed(self.keys(prompt, len(prompt) - 1)):
            entry = self._entries.get(key)
            if entry is None and self.disk is not None:
                found = self.disk.get(key)
                if found is not None:  # back into RAM, as the most recently used
                    self._insert(key, found[0], found[1])
                    self.stats["disk_hits"] += 1
                    entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.stats["hits"] += 1
                self.stats["hit_tokens"] += entry.tokens
                return entry.tokens, entry.state.clone()
        return None

    def store(self, tokens: list[int], state, copy: bool = True) -> bool:
        """Save a copy of `state`, which has consumed exactly `tokens` (a whole number of blocks); with
        `copy=False` the cache takes `state` itself (a finished sequence's, which nothing else holds).
        False when it is already saved or larger than the whole budget."""
        n = len(tokens)
        if n == 0 or n % self.block_tokens or state.pos != n:
            raise ValueError(f"a saved state needs a whole number of {self.block_tokens}-token blocks and a "
                             f"state at that position; got {n} tokens, state at {state.pos}")
        key = self.keys(tokens, n)[-1]
        if key in self._entries:
            self._entries.move_to_end(key)
            return False
        saved = state.clone() if copy else state
        if self.disk is not None and key not in self.disk:
            self.disk.put(key, n, saved)  # written by the disk tier's thread; the saved state never changes
        if not self._insert(key, n, saved):
            return False
        self.stats["stored"] += 1
        return True

    def _insert(self, key: bytes, tokens: int, state) -> bool:
        nbytes = state.allocated_bytes()
        if nbytes > self.budget_bytes:
            return False
        self._entries[key] = _Entry(tokens, state, nbytes)
        self.bytes += nbytes
        while self.bytes > self.budget_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.stats["evictions"] += 1
        return True

    def __len__(self) -> int:
        return len(self._entries)
