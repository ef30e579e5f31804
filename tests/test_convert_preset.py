"""`moeflash convert --preset NAME`: seeded random checkpoints written tensor by tensor (so a preset
bigger than RAM, like a 2-layer cut of V4-Flash, can be written), and `--layers` cuts."""

from __future__ import annotations

import json

import pytest
import torch

from moeflash.cli import main
from moeflash.config import CSA, HCA, MOE, ModelConfig
from moeflash.model.init import randomize_
from moeflash.model.v4 import Transformer
from moeflash.weights.loader import Checkpoint
from moeflash.weights.save import save_checkpoint


@pytest.mark.parametrize("official", [False, True])
def test_streamed_preset_equals_the_in_memory_checkpoint(tmp_path, capsys, official):
    """The streamed writer gives every tensor (and scale) the in-memory save of randomize_ gives,
    across several shards."""
    argv = ["convert", "--preset", "tiny", "--seed", "4", "--out", str(tmp_path / "s"), "--shard-gb", "0.0002"]
    assert main(argv + (["--official"] if official else [])) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["file_bytes"] > 0 and info["layers"] == 4
    ref = save_checkpoint(randomize_(Transformer(ModelConfig.preset("tiny")), seed=4), tmp_path / "r",
                          torch.bfloat16, official=official)
    files = list((tmp_path / "s").glob("*.safetensors"))
    assert len(files) > 1 and not list((tmp_path / "s").glob("*.part"))
    assert json.loads((tmp_path / "s" / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    with Checkpoint.open(tmp_path / "s") as a, Checkpoint.open(ref) as b:
        assert sorted(a.stored_names()) == sorted(b.stored_names())
        for name in b.stored_names():
            assert torch.equal(a._read(a.tensors[name]), b._read(b.tensors[name])), name


def test_layers_cut_keeps_the_schedule_slice(tmp_path, capsys):
    """--layers A:B keeps that slice of the preset's layer kinds and routing, real sizes, no MTP."""
    assert main(["convert", "--preset", "mini", "--layers", "3:5", "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    cfg = ModelConfig.from_json(tmp_path / "m")
    full = ModelConfig.preset("mini")
    assert cfg.num_hidden_layers == 2 and cfg.num_nextn_predict_layers == 0
    assert cfg.layer_types == [HCA, CSA] == full.layer_types[3:5] and cfg.mlp_layer_types == [MOE, MOE]
    assert (cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts) == \
        (full.hidden_size, full.moe_intermediate_size, full.n_routed_experts)
    for bad in ("0", "5:3", "x", "0:99"):
        assert main(["convert", "--preset", "mini", "--layers", bad, "--out", str(tmp_path / "b")]) == 2
        assert "--layers wants" in capsys.readouterr().err
    assert main(["convert", "--preset", "v4-flash", "--out", str(tmp_path / "f")]) == 2  # ~160 GB: no room
    assert "GiB free" in capsys.readouterr().err and not (tmp_path / "f").exists()
