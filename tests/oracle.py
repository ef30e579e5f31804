"""transformers 5.23 DeepseekV4ForCausalLM as the reference oracle for parity tests.

Builds the HF model for a moeflash ModelConfig, randomises every parameter (including the ones HF
initialises to 0 or 1, V4-SPEC §6.2) and hands the same weights to moeflash via the HF->internal
name mapping, so the tests also exercise that mapping.
"""

from __future__ import annotations

import pytest
import torch

from moeflash.config import ModelConfig
from moeflash.model.init import randomize_
from moeflash.model.v4 import Transformer
from moeflash.weights.names import hf_to_internal

transformers = pytest.importorskip("transformers", reason="transformers==5.23.0 (the test extra) is the oracle")


def hf_model(cfg: ModelConfig, seed: int = 0):
    hcfg = transformers.DeepseekV4Config(**cfg.to_hf_kwargs())
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(hcfg).eval().float()
    # Randomise through moeflash's own init on a moeflash model, then copy into HF: one init for both.
    ours = randomize_(Transformer(cfg), seed=seed)
    sd = ours.state_dict()
    from moeflash.weights.names import internal_to_hf
    hf_sd = internal_to_hf({k: v for k, v in sd.items() if not k.startswith("mtp.")})
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m or "inv_freq" in m for m in missing), missing
    return model


def ours_from_hf(cfg: ModelConfig, hf) -> Transformer:
    model = Transformer(cfg).eval()
    sd = hf_to_internal(hf.state_dict())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(m.startswith("mtp.") for m in missing), missing
    return model
