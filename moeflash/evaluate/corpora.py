"""Real text that ships with Python, so evaluations need no download: the standard library's own
sources (`code`), the documentation topics `pydoc` ships (`pydoc_data.topics`: the language
reference's prose, `prose`) and licence text (`legal`: Python's LICENSE.txt, or Debian's
common-licenses where a distribution leaves it out). Each domain is a fixed list read in a fixed order and cut at a line
boundary, so a given Python version always yields the same text (other versions ship other text)."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

# stdlib modules of plain, commented Python, read in this order
CODE_FILES = ("textwrap.py", "heapq.py", "fractions.py", "statistics.py", "csv.py", "difflib.py", "argparse.py",
              "json/decoder.py", "json/encoder.py")
DOMAINS = ("code", "prose", "legal")
# licence text: Python's own, else Debian's (base-files)
LEGAL_FILES = ("LICENSE.txt", "/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0")


def _cut(parts, max_bytes: int) -> str:
    """Join `parts` in order up to `max_bytes` UTF-8 bytes, cutting the last one at a line boundary."""
    out, used = [], 0
    for part in parts:
        for line in part.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if used + n > max_bytes:
                return "".join(out)
            out.append(line)
            used += n
    return "".join(out)


def builtin_text(domain: str, max_bytes: int = 16384) -> str:
    """The first `max_bytes` bytes (at most) of a built-in domain's text."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    if domain == "code":
        root = Path(sysconfig.get_paths()["stdlib"])
        return _cut((_read(root / f) for f in CODE_FILES), max_bytes)
    if domain == "prose":
        from pydoc_data.topics import topics

        return _cut((topics[k].strip() + "\n\n" for k in sorted(topics)), max_bytes)
    if domain == "legal":
        root = Path(sysconfig.get_paths()["stdlib"])
        for f in LEGAL_FILES:
            if (root / f).is_file():
                return _cut([_read(root / f)], max_bytes)
        raise ValueError(f"no licence text found ({', '.join(LEGAL_FILES)})")
    raise ValueError(f"unknown text domain {domain!r}; built in: {', '.join(DOMAINS)} (or give a file)")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"the standard library file {path} cannot be read ({e})") from e


def load_text(spec: str, max_bytes: int) -> tuple[str, str]:
    """(name, text) for a built-in domain name or a UTF-8 text file (cut to `max_bytes` as well)."""
    if spec in DOMAINS:
        return spec, builtin_text(spec, max_bytes)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--text {spec!r} is neither a file nor a built-in domain ({', '.join(DOMAINS)})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{spec} is not UTF-8 text ({e})") from e
    text = _cut([text], max_bytes)
    if not text.strip():
        raise ValueError(f"{spec} has no text")
    return path.stem, text


def digest(text: str) -> str:
    """A short digest naming exactly which text was scored (the output records it)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
