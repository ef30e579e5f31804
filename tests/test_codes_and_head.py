"""Official-format checkpoints drawn as codes (`convert --codes`), and the LM head requantized to Q8_0
(`--head q8_0`)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from moeflash.cli import main
from moeflash.engine.load import load_model
from moeflash.kernels.linear import GgufLinear
from moeflash.weights.quant import dequant_fp4, dequant_fp8, quant_q8_0


def test_codes_checkpoint_has_sane_values_and_runs(tmp_path, capsys):
    out = tmp_path / "codes"
    assert main(["convert", "--preset", "tiny", "--official", "--codes", "--out", str(out)]) == 0
    capsys.readouterr()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    fp8 = next(k for k in index if k.endswith("attn.wq_a.weight"))
    fp4 = next(k for k in index if ".experts.0.w1.weight" in k)
    with safe_open(str(out / index[fp8]), "pt") as f:
        w8, s8 = f.get_tensor(fp8), f.get_tensor(fp8[:-len("weight")] + "scale")
    with safe_open(str(out / index[fp4]), "pt") as f:
        w4, s4 = f.get_tensor(fp4), f.get_tensor(fp4[:-len("weight")] + "scale")
    assert w8.dtype == torch.float8_e4m3fn and s8.dtype == torch.float8_e8m0fnu and w4.dtype == torch.int8
    for w in (dequant_fp8(w8, s8), dequant_fp4(w4, s4)):
        assert torch.isfinite(w).all()
        assert 0.05 < float(w.pow(2).mean().sqrt()) < 0.2  # drawn at the init's RMS (0.1), within a power of 2
    assert main(["generate", "--model", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4
    assert main(["convert", "--preset", "tiny", "--codes", "--out", str(tmp_path / "x")]) == 2


def test_q8_0_quantizer_is_ggmls():
    gguf = pytest.importorskip("gguf")
    w = torch.randn(48, 160) * torch.logspace(-3, 1, 160)
    w[3] = 0.0  # an all-zero row: d = 0
    ours = quant_q8_0(w).numpy()
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(ours, theirs)


def test_head_q8_0_is_close_to_the_stored_head(checkpoints):
    stored, _ = load_model(checkpoints["official"], dtype="float32")
    model, _ = load_model(checkpoints["official"], dtype="float32", head="q8_0", numerics="fast")
    assert isinstance(model.head, GgufLinear) and model.head.qtype == 8 and model.head.numerics == 2
    ids = torch.arange(1, 20)
    with torch.inference_mode():
        a, b = stored(ids[None])[0], model(ids[None])[0]
    assert 0 < float(((a - b).norm(dim=-1) / a.norm(dim=-1)).median()) < 0.05
    with pytest.raises(ValueError, match="unknown head"):
        load_model(checkpoints["official"], head="q4")


def test_state_dtype_flag(checkpoints, capsys):
    """`--state-dtype bf16` reaches the model's records; a dense model refuses it clearly."""
    model, _ = load_model(checkpoints["official"], dtype="float32", state_dtype="bf16")
    st = model.new_seq_state()
    assert st.layers[0].window.dtype == torch.bfloat16 and model.state_bytes(64) < load_model(
        checkpoints["official"], dtype="float32")[0].state_bytes(64)
    assert main(["generate", "--model", str(checkpoints["official"]), "--prompt-ids", "1,2,3",
                 "--max-new-tokens", "3", "--json", "--state-dtype", "bf16"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 3
    with pytest.raises(ValueError, match="applies to V4 models"):
        load_model("smollm2", state_dtype="bf16")
    with pytest.raises(ValueError, match="unknown state dtype"):
        load_model(checkpoints["official"], state_dtype="fp8")
