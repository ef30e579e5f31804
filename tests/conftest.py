"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from moeflash.cli import main


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """The tiny preset written once as an fp32 checkpoint ("plain") and in the official FP8 / FP4 format
    ("official"): directories the tests read, never modify."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for kind, flags in (("plain", ["--dtype", "float32"]), ("official", ["--official"])):
        out[kind] = str(root / kind)
        assert main(["convert", "--preset", "tiny", "--out", out[kind], *flags]) == 0
    return out
