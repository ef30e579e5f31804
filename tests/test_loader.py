"""Checkpoint loading: official FP8/FP4 and HF names, single and sharded files, laziness, clear errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from moeflash.weights import loader as L
from moeflash.weights import names as N
from moeflash.weights.loader import Checkpoint, CheckpointError, check, load_into, load_state_dict
from moeflash.weights.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8


def official_state():
    """(stored tensors as the official checkpoint ships them, internal name -> expected decoded value)."""
    torch.manual_seed(0)
    stored, want = {}, {}

    def plain(name, t):
        stored[name] = want[name] = t

    def fp8(name, shape):
        q, s = quant_fp8(torch.randn(shape))
        stored[name + ".weight"], stored[name + ".scale"] = q, s
        want[name + ".weight"] = dequant_fp8(q, s)

    def fp4(name, shape):
        q, s = quant_fp4(torch.randn(shape))
        stored[name + ".weight"], stored[name + ".scale"] = q, s
        want[name + ".weight"] = dequant_fp4(q, s)

    plain("embed.weight", torch.randn(16, 8).bfloat16())
    plain("layers.0.attn_norm.weight", torch.randn(8).bfloat16())
    plain("layers.0.hc_attn_scale", torch.randn(3))
    fp8("layers.0.attn.wq_a", (130, 200))  # partial 128x128 blocks: scale [2, 2]
    plain("layers.0.ffn.gate.tid2eid", torch.randint(0, 4, (16, 2)))
    plain("layers.0.ffn.gate.bias", torch.randn(4))
    for j in range(2):
        fp4(f"layers.0.ffn.experts.{j}.w1", (32, 64))
        fp4(f"layers.0.ffn.experts.{j}.w2", (64, 32))
        fp4(f"layers.0.ffn.experts.{j}.w3", (32, 64))
    plain("mtp.0.e_proj.weight", torch.randn(8, 16).bfloat16())
    return stored, want


def write(folder, stored, shards=1):
    """Save as model.safetensors, or as `shards` files plus model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(stored, str(folder / "model.safetensors"))
        return folder
    names = list(stored)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: stored[n] for n in names[k::shards]}
        save_file(part, str(folder / file))
        weight_map |= {n: file for n in part}
    (folder / L.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def spec(want, drop_mtp=False):
    return {k: tuple(v.shape) for k, v in want.items() if not (drop_mtp and k.startswith("mtp."))}


def assert_same(got, want):
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.fixture
def official(tmp_path):
    stored, want = official_state()
    return write(tmp_path / "ckpt", stored), stored, want


# -- values ------------------------------------------------------------------------------------------

def test_single_file_official_decodes_exactly(official):
    folder, stored, want = official
    for path in (folder, folder / "model.safetensors"):
        ckpt = Checkpoint.open(path)
        assert ckpt.scheme == N.OFFICIAL
        assert sorted(ckpt.names()) == sorted(want)  # scales are folded into their weights
        assert "layers.0.attn.wq_a.scale" in ckpt.stored_names()
        for name, value in want.items():
            assert_same(ckpt.get(name), value)
    assert ckpt.info("layers.0.attn.wq_a.weight").fmt == "fp8"
    assert ckpt.shape("layers.0.ffn.experts.1.w2.weight") == (64, 32)  # logical, packed is [64, 16]
    # dtype converts floating tensors only
    assert ckpt.get("layers.0.attn.wq_a.weight", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert_same(ckpt.get("layers.0.ffn.gate.tid2eid", dtype=torch.bfloat16), want["layers.0.ffn.gate.tid2eid"])
    w, s, fmt = ckpt.get_quantized("layers.0.ffn.experts.0.w1.weight")
    assert fmt == "fp4" and torch.equal(w, stored["layers.0.ffn.experts.0.w1.weight"])
    assert torch.equal(s.view(torch.uint8), stored["layers.0.ffn.experts.0.w1.scale"].view(torch.uint8))


def test_sharded_checkpoint_with_index(tmp_path):
    stored, want = official_state()
    folder = write(tmp_path / "sharded", stored, shards=3)
    for path in (folder, folder / L.INDEX_NAME):
        ckpt = Checkpoint.open(path)
        assert len(ckpt.files) == 3
        state = load_state_dict(ckpt, spec(want))
        assert state.keys() == want.keys()
        for name, value in want.items():
            assert_same(state[name], value)
    # dtype applies to floats; a tensor spec (e.g. a meta model's state_dict) gives the dtype
    state = load_state_dict(ckpt, {"embed.weight": torch.empty(16, 8, device="meta"),
                                   "layers.0.ffn.gate.tid2eid": (16, 2)}, skip_prefixes=("layers.", "mtp."))
    assert state["embed.weight"].dtype == torch.float32 and state["layers.0.ffn.gate.tid2eid"].dtype == torch.int64


def test_hf_names_merged_experts_and_weight_scale_inv(tmp_path):
    torch.manual_seed(1)
    E, I, d = 3, 64, 128
    q, s = quant_fp8(torch.randn(64, 128))
    f8 = [quant_fp8(torch.randn(2 * I, d)) for _ in range(E)]  # 2I = 128: the w1/w3 split cuts a block
    f4 = [quant_fp4(torch.randn(2 * I, d)) for _ in range(E)]
    f4d = [quant_fp4(torch.randn(d, I)) for _ in range(E)]
    down = torch.randn(E, d, I)
    stored = {
        "model.layers.0.self_attn.q_a_proj.weight": q,
        # HF convention: a float32 weight_scale_inv is the multiplier itself
        "model.layers.0.self_attn.q_a_proj.weight_scale_inv": 2.0 ** (s.view(torch.uint8).float() - 127),
        "model.layers.0.mlp.experts.gate_up_proj": torch.stack([w for w, _ in f8]),
        "model.layers.0.mlp.experts.gate_up_proj_scale_inv": torch.stack([x for _, x in f8]),
        "model.layers.0.mlp.experts.down_proj": down,
        "model.layers.1.mlp.experts.gate_up_proj": torch.stack([w for w, _ in f4]),
        "model.layers.1.mlp.experts.gate_up_proj_scale_inv": torch.stack([x for _, x in f4]),
        "model.layers.1.mlp.experts.down_proj": torch.stack([w for w, _ in f4d]),
        "model.layers.1.mlp.experts.down_proj_scale_inv": torch.stack([x for _, x in f4d]),
        "lm_head.weight": torch.randn(16, 8),
    }
    ckpt = Checkpoint.open(write(tmp_path / "hf", stored))
    assert ckpt.scheme == N.HF
    assert len(ckpt.names()) == 1 + 3 * E + 3 * E + 1
    assert torch.equal(ckpt.get("layers.0.attn.wq_a.weight"), dequant_fp8(q, s))
    assert torch.equal(ckpt.get("head.weight"), stored["lm_head.weight"])
    for j in range(E):
        full8, full4 = dequant_fp8(*f8[j]), dequant_fp4(*f4[j])
        assert torch.equal(ckpt.get(f"layers.0.ffn.experts.{j}.w1.weight"), full8[:I])
        assert torch.equal(ckpt.get(f"layers.0.ffn.experts.{j}.w3.weight"), full8[I:])
        assert torch.equal(ckpt.get(f"layers.0.ffn.experts.{j}.w2.weight"), down[j])
        assert torch.equal(ckpt.get(f"layers.1.ffn.experts.{j}.w1.weight"), full4[:I])
        assert torch.equal(ckpt.get(f"layers.1.ffn.experts.{j}.w3.weight"), full4[I:])
        assert torch.equal(ckpt.get(f"layers.1.ffn.experts.{j}.w2.weight"), dequant_fp4(*f4d[j]))
    assert ckpt.shape("layers.1.ffn.experts.2.w3.weight") == (I, d)
    w, sc, fmt = ckpt.get_quantized("layers.1.ffn.experts.2.w3.weight")  # only that half is read
    assert fmt == "fp4" and w.shape == (I, d // 2) and sc.shape == (I, d // 32)
    with pytest.raises(CheckpointError, match="cuts through"):
        ckpt.get_quantized("layers.0.ffn.experts.0.w3.weight")


def test_transformers_model_checkpoints_load_under_internal_names(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV4Config(  # V4-SPEC 6.2, cut to one hash layer + CSA + HCA
        vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, qk_rope_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, num_hash_layers=1,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        sliding_window=8, index_n_heads=2, index_head_dim=8, index_topk=4, hc_mult=2,
        max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(cfg).eval().float()
    sd = model.state_dict()
    internal = N.hf_to_internal(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "state.safetensors"))
    model.save_pretrained(tmp_path / "saved")  # transformers' own (different) spelling
    for path in (tmp_path / "state.safetensors", tmp_path / "saved"):
        ckpt = Checkpoint.open(path)
        assert ckpt.scheme == N.HF
        state = load_state_dict(ckpt, {k: v.shape for k, v in internal.items()})
        for name, value in internal.items():
            assert_same(state[name], value)


# -- laziness ----------------------------------------------------------------------------------------

def test_open_and_names_read_no_tensor_data(tmp_path, monkeypatch):
    stored, want = official_state()
    folder = write(tmp_path / "lazy", stored, shards=3)

    def no_data(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(L, "safe_open", no_data)
    monkeypatch.setattr(L, "pread_exact", no_data)
    ckpt = Checkpoint.open(folder)
    assert sorted(ckpt.names()) == sorted(want)
    assert all(ckpt.shape(n) == tuple(v.shape) for n, v in want.items())
    check(ckpt, spec(want))  # the whole-model check needs headers only
    assert ckpt.reads == 0
    with pytest.raises(CheckpointError, match="tensor data was read"):
        ckpt.get("embed.weight")
    monkeypatch.undo()
    ckpt = Checkpoint.open(folder)
    ckpt.get("layers.0.ffn.experts.1.w2.weight")
    assert ckpt.reads == 2  # weight + scale, and only their shards were opened
    info = ckpt.info("layers.0.ffn.experts.1.w2.weight")
    assert set(ckpt._fds) == {info.source.file, info.scale.file} and len(ckpt.files) == 3


# -- errors ------------------------------------------------------------------------------------------

def test_missing_unexpected_and_misshaped_tensors_are_named(official):
    folder, _, want = official
    ckpt = Checkpoint.open(folder)
    expected = spec(want, drop_mtp=True)
    expected["layers.0.attn.wkv.weight"] = (4, 8)
    del expected["layers.0.ffn.gate.bias"]
    expected["layers.0.attn.wq_a.weight"] = (128, 200)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(ckpt, expected)
    msg = str(e.value)
    assert "missing tensor 'layers.0.attn.wkv.weight' (expected shape [4, 8]); searched 1 file(s)" in msg
    assert "model.safetensors" in msg
    assert "unexpected tensor 'layers.0.ffn.gate.bias' in model.safetensors" in msg
    assert "unexpected tensor 'mtp.0.e_proj.weight' in model.safetensors (multi-token-prediction" in msg
    assert "skip_prefixes=('mtp.',)" in msg
    assert ("tensor 'layers.0.attn.wq_a.weight' in model.safetensors has shape [130, 200], expected [128, 200]"
            in msg)
    with pytest.raises(CheckpointError, match=r"has shape \[8\], expected \[9\]"):
        ckpt.get("layers.0.attn_norm.weight", expected_shape=(9,))
    # skipping MTP is explicit
    assert "mtp.0.e_proj.weight" not in load_state_dict(ckpt, spec(want, drop_mtp=True), skip_prefixes=("mtp.",))


def test_hf_missing_tensor_names_the_hf_tensor(tmp_path):
    ckpt = Checkpoint.open(write(tmp_path / "hf", {"model.norm.weight": torch.ones(4)}))
    with pytest.raises(CheckpointError) as e:
        check(ckpt, {"norm.weight": (4,), "layers.0.attn.wq_a.weight": (2, 4), "mtp.0.enorm.weight": (4,),
                     "layers.0.ffn.experts.3.w1.weight": (2, 4)})
    msg = str(e.value)
    assert "'layers.0.attn.wq_a.weight' (HF: 'model.layers.0.self_attn.q_a_proj.weight')" in msg
    assert "'layers.0.ffn.experts.3.w1.weight' (HF: expert 3 of 'model.layers.0.mlp.experts.gate_up_proj')" in msg
    assert "Hugging Face checkpoints have no MTP weights" in msg


def test_quantized_weight_with_missing_or_misshaped_scale(tmp_path):
    stored, _ = official_state()
    no_scale = {k: v for k, v in stored.items() if k != "layers.0.attn.wq_a.scale"}
    ckpt = Checkpoint.open(write(tmp_path / "a", no_scale))
    with pytest.raises(CheckpointError) as e:
        ckpt.get("layers.0.attn.wq_a.weight")
    msg = str(e.value)
    assert "'layers.0.attn.wq_a.weight' in model.safetensors is F8_E4M3" in msg
    assert "'layers.0.attn.wq_a.scale', expected shape [2, 2]" in msg

    no_scale = {k: v for k, v in stored.items() if k != "layers.0.ffn.experts.0.w1.scale"}
    ckpt = Checkpoint.open(write(tmp_path / "a4", no_scale))
    with pytest.raises(CheckpointError, match=r"w1.weight' in model.safetensors is I8 \(FP4-quantized\) but has no "
                                              r"scale tensor \(looked for '.*w1.scale', expected shape \[32, 2\]\)"):
        ckpt.info("layers.0.ffn.experts.0.w1.weight")

    bad = dict(stored, **{"layers.0.ffn.experts.1.w2.scale": stored["layers.0.ffn.experts.1.w2.scale"][:, :0]})
    ckpt = Checkpoint.open(write(tmp_path / "b", bad))
    with pytest.raises(CheckpointError) as e:
        check(ckpt, {"layers.0.ffn.experts.1.w2.weight": (64, 32)}, skip_prefixes=("",))
    msg = str(e.value)
    assert "'layers.0.ffn.experts.1.w2.weight' in model.safetensors" in msg
    assert "scale 'layers.0.ffn.experts.1.w2.scale' in model.safetensors has shape [64, 0]" in msg
    assert "expected shape [64, 1]" in msg


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"hello, this is not a safetensors file")
    with pytest.raises(CheckpointError, match=r"junk/model.safetensors is not a safetensors file"):
        Checkpoint.open(tmp_path / "junk")
    header = b"{not json"
    (tmp_path / "bad.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match=r"bad.safetensors has a corrupt safetensors header"):
        Checkpoint.open(tmp_path / "bad.safetensors")
    good = tmp_path / "good.safetensors"
    save_file({"x": torch.zeros(4)}, str(good))
    good.write_bytes(good.read_bytes() + b"\0\0")  # safetensors itself refuses this later, less clearly
    with pytest.raises(CheckpointError, match=r"good.safetensors is corrupt: it has 2 bytes more"):
        Checkpoint.open(good)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors files in .*empty"):
        Checkpoint.open(tmp_path / "empty")


def test_index_pointing_at_a_missing_shard(tmp_path):
    stored, _ = official_state()
    folder = write(tmp_path / "s", stored, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    msg = str(e.value)
    assert "model.safetensors.index.json maps" in msg and "'model-00002-of-00002.safetensors'" in msg
    assert f"e.g. {list(stored)[1]!r}" in msg and "download the missing shard" in msg


def test_truncated_shard_is_caught_before_mmap(tmp_path, monkeypatch):
    stored, _ = official_state()
    folder = write(tmp_path / "t", stored, shards=2)
    shard = folder / "model-00001-of-00002.safetensors"
    last = max(L.read_header(shard).values(), key=lambda t: t.end)  # the tensor the cut will damage
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    monkeypatch.setattr(L, "safe_open", lambda *a, **k: pytest.fail("safetensors was asked to map the file"))
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    msg = str(e.value)
    assert f"model-00001-of-00002.safetensors is truncated: it has {len(data) - 10} bytes but its header says " \
           f"{len(data)}; tensor {last.name!r}" in msg
    assert "lies past the end of the file" in msg and "Re-download" in msg


def test_load_into_module_on_meta_and_cpu(official):
    folder, _, want = official
    ckpt = Checkpoint.open(folder)

    def build(device):
        root = torch.nn.Module()
        for name, value in want.items():
            *path, leaf = name.split(".")
            mod = root
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            t = torch.empty(value.shape, dtype=value.dtype if not value.is_floating_point() else torch.float32,
                            device=device)
            if t.is_floating_point():
                mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
            else:
                mod.register_buffer(leaf, t)
        return root

    for device in ("meta", "cpu"):
        model = load_into(build(device), ckpt)
        sd = model.state_dict()
        for name, value in want.items():
            assert sd[name].device.type == "cpu"
            assert torch.equal(sd[name], value.to(sd[name].dtype))
            assert sd[name].dtype == (torch.float32 if value.is_floating_point() else value.dtype)


def test_contiguous_span():
    from moeflash.weights.loader import contiguous_span

    assert contiguous_span((4, 6, 8), None) == (0, 192, (4, 6, 8))
    assert contiguous_span((4, 6, 8), (2,)) == (96, 48, (6, 8))
    assert contiguous_span((4, 6, 8), (2, slice(1, 3))) == (96 + 8, 16, (2, 8))
    assert contiguous_span((4, 6, 8), (slice(1, 3),)) == (48, 96, (2, 6, 8))
    assert contiguous_span((4, 6, 8), (-1,)) == (144, 48, (6, 8))
    assert contiguous_span((4, 6, 8), (slice(0, 4, 2),)) is None  # strided: not one run
    assert contiguous_span((4, 6, 8), (slice(0, 2), 1)) is None  # an index after a slice
    assert contiguous_span((4, 6, 8), (4,)) is None


def test_reads_equal_safetensors_and_leave_no_mapping(tmp_path):
    """Checkpoint reads (pread) equal safetensors' own reads, whole and sliced, for every dtype the
    official format uses; while the checkpoint is open, no mapping of its file is in the process."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from moeflash.weights.loader import Checkpoint

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(6, 5, 4, generator=g), "b": torch.randn(7, 3, generator=g).bfloat16(),
               "c": torch.randint(-128, 127, (5, 8), generator=g, dtype=torch.int8),
               "d": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
               "e": torch.randint(0, 255, (3, 2), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu),
               "f": torch.arange(6, dtype=torch.int64)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    ck = Checkpoint.open(path)
    whole = {name: ck._read(ck.tensors[name]) for name in tensors}
    indices = ((2,), (2, slice(1, 4)), (slice(1, 3),))
    sliced = [ck._read(ck.tensors["a"], index) for index in indices]
    assert str(path) not in open("/proc/self/maps").read()
    ck.close()
    with safe_open(str(path), framework="pt") as ref:
        for name in tensors:
            assert torch.equal(whole[name].view(torch.uint8), ref.get_tensor(name).view(torch.uint8)), name
        for index, got in zip(indices, sliced):
            assert torch.equal(got, ref.get_slice("a")[index]), index
