"""Task files (JSONL) and their scoring rules.

One JSON object per line, of either kind (an optional "tag" groups results):

- `{"prompt": ..., "answer": ...}`: the model's greedy continuation up to the end of the line is
  correct when it equals the answer after `normalize_answer` (exact match, as SQuAD scores it);
- `{"prompt": ..., "choices": [...], "answer_index": i}`: multiple choice, scored as lm-evaluation-harness
  does: the choice with the highest summed log-likelihood given the prompt (`acc`), and the highest per
  byte of the choice (`acc_norm`).
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no English articles, single spaces."""
    s = _ARTICLES.sub(" ", s.lower().translate(_PUNCT))
    return " ".join(s.split())


def load_tasks(path: str | Path) -> list[dict]:
    """The tasks of a JSONL file, validated: a clear error names the line and the field at fault."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--tasks {path}: no such file")
    tasks = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string")
        tag = row.get("tag", "all")
        if not isinstance(tag, str):
            raise ValueError(f"{where}: \"tag\" must be a string")
        if "choices" in row:
            choices, idx = row["choices"], row.get("answer_index")
            if not isinstance(choices, list) or len(choices) < 2 or not all(
                    isinstance(c, str) and c for c in choices):
                raise ValueError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(choices):
                raise ValueError(f"{where}: \"answer_index\" must be an integer in [0, {len(choices)})")
            tasks.append({"kind": "choice", "prompt": prompt, "choices": choices, "answer_index": idx, "tag": tag})
        elif "answer" in row:
            if not isinstance(row["answer"], str):
                raise ValueError(f"{where}: \"answer\" must be a string")
            tasks.append({"kind": "exact", "prompt": prompt, "answer": row["answer"], "tag": tag})
        else:
            raise ValueError(f"{where}: needs \"answer\" (exact match) or \"choices\" + \"answer_index\"")
    if not tasks:
        raise ValueError(f"--tasks {path}: no tasks")
    return tasks
