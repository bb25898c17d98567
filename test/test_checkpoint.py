"""blockwise_fp8.checkpoint: the DeepSeek/HF FP8 safetensors format in and out.

Checkpoints written by the code under test are read back with safetensors directly and checked
against float64 math done here (scale convention, block layout, error bound); checkpoints read by
the code under test are written here by hand, with an independent float64 quantizer.
"""

import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torchao.quantization import quantize_

from blockwise_fp8 import BlockwiseFP8Config, BlockwiseFP8Tensor, reference
from blockwise_fp8 import checkpoint as ckpt
from blockwise_fp8.checkpoint import CheckpointError, load_quantized, save_quantized

from .helpers import expand_blocks, fp8_spacing

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2

# Net.up has 200 output features: a partial last block, which save_quantized warns about
# (test_partial_blocks_warn checks the warning itself).
pytestmark = pytest.mark.filterwarnings("ignore::blockwise_fp8.checkpoint.PartialBlockWarning")


class Net(nn.Module):
    """Embedding, a norm, three Linears (one with a partial last block), a tied head."""

    def __init__(self, vocab=96, d=256, h=200, tie=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.norm(self.embed(ids))
        x = x + self.down(F.gelu(self.up(x)))
        return self.lm_head(self.proj(x))


def _net(seed=0, dtype=torch.bfloat16, **kw):
    torch.manual_seed(seed)
    return Net(**kw).to(dtype)


def _quantized(weight_dtype=E4M3, **kw):
    m = _net(**kw)
    quantize_(m, BlockwiseFP8Config(weight_dtype=weight_dtype), filter_fn=ckpt.skip_filter())
    return m


def _read_all(path):
    """Every tensor of a checkpoint directory, read with safetensors alone."""
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        with safe_open(os.path.join(path, f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _quantize_f64(w: torch.Tensor, dtype=E4M3):
    """The test's own blockwise quantizer (float64 amax, scale = amax / fp8_max)."""
    fmax = torch.finfo(dtype).max
    N, K = w.shape
    sb = (math.ceil(N / 128), math.ceil(K / 128))
    scale = torch.empty(sb, dtype=torch.float64)
    for i in range(sb[0]):
        for j in range(sb[1]):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double()
            scale[i, j] = max(blk.abs().max().item() / fmax, 2.0**-126)
    s32 = scale.float()
    q = (w.double() / expand_blocks(s32.double(), 128, 128, w.shape)).clamp(-fmax, fmax).to(dtype)
    return q, s32


# ---------------------------------------------------------------------------------- save


@pytest.mark.parametrize("weight_dtype", [E4M3, E5M2])
def test_saved_files_follow_the_format(tmp_path, weight_dtype):
    m = _quantized(weight_dtype)
    ref = _net()  # the same weights before quantization
    out = save_quantized(m, tmp_path / "ck")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {
        "quant_method": "fp8", "fmt": {E4M3: "e4m3", E5M2: "e5m2"}[weight_dtype], "activation_scheme": "dynamic",
        "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"],
    }
    t = _read_all(out)
    # the head is tied to the embedding: written once, under the first name
    assert "lm_head.weight" not in t and "embed.weight" in t
    assert set(t) == {
        "embed.weight", "norm.weight", "norm.bias", "up.weight", "up.weight_scale_inv", "up.bias",
        "down.weight", "down.weight_scale_inv", "proj.weight", "proj.weight_scale_inv", "step",
    }
    for name in ("up", "down", "proj"):
        w = getattr(ref, name).weight.detach()
        q, s = t[f"{name}.weight"], t[f"{name}.weight_scale_inv"]
        assert q.dtype == weight_dtype and s.dtype == torch.float32
        assert tuple(s.shape) == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128))
        # weight_scale_inv is the dequantization multiplier: q * s is the weight within half an FP8 step
        s_full = expand_blocks(s.double(), 128, 128, w.shape)
        err = (q.double() * s_full - w.double()).abs()
        # half an FP8 step, plus the float32 rounding of w / scale (docs/numerics.md: IEEE float32 division)
        bound = s_full * fp8_spacing(w.double() / s_full, weight_dtype) / 2 + w.double().abs() * 2.0**-24
        assert bool((err <= bound).all())
        # and each block's amax maps to +-fp8_max (scale = amax / fp8_max, not its inverse)
        amax = expand_blocks(s.double(), 1, 1, s.shape) * torch.finfo(weight_dtype).max
        blocks_amax = torch.stack([
            torch.stack([w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double().abs().max() for j in range(s.shape[1])])
            for i in range(s.shape[0])
        ])
        assert torch.allclose(amax, blocks_amax, rtol=2**-23, atol=0)
    assert torch.equal(t["embed.weight"], ref.embed.weight.detach())
    assert torch.equal(t["norm.bias"], ref.norm.bias.detach())


def test_round_trip_is_bit_exact_and_keeps_the_tie(tmp_path):
    m = _quantized()
    out = save_quantized(m, tmp_path / "ck")
    fresh = _net(seed=1)  # different values everywhere
    result = load_quantized(fresh, out)
    assert result.quantized == ["down", "proj", "up"] and result.weight_dtype == E4M3
    assert not result.missing_keys and not result.unexpected_keys
    for name in ("up", "down", "proj"):
        a, b = getattr(m, name).weight, getattr(fresh, name).weight
        assert isinstance(b, BlockwiseFP8Tensor) and not b.requires_grad
        assert torch.equal(a.qdata.view(torch.uint8), b.qdata.view(torch.uint8))
        assert torch.equal(a.scale, b.scale) and b.dtype == torch.bfloat16
    assert fresh.lm_head.weight is fresh.embed.weight
    ids = torch.randint(0, 96, (2, 5))
    assert torch.equal(m(ids), fresh(ids))


def test_sharded_checkpoint_and_its_index(tmp_path):
    m = _quantized(tie=False)
    out = save_quantized(m, tmp_path / "ck", max_shard_size="60KB")
    names = sorted(os.listdir(out))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    everything = _read_all(out)
    assert set(index["weight_map"]) == set(everything)
    for key, shard in index["weight_map"].items():
        with safe_open(str(out / shard), "pt") as h:
            assert key in h.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in everything.values())
    for shard in shards:  # no shard above the limit unless it holds a single tensor
        with safe_open(str(out / shard), "pt") as h:
            keys = list(h.keys())
            size = sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in keys)
        assert size <= 60_000 or len(keys) == 1
    fresh = _net(seed=1, tie=False)
    load_quantized(fresh, out)
    ids = torch.randint(0, 96, (1, 7))
    assert torch.equal(m(ids), fresh(ids))


def test_reads_a_hand_written_sharded_checkpoint(tmp_path):
    """A checkpoint written here with safetensors and the test's own quantizer, as DeepSeek ships it."""
    src = _net(tie=False)
    tensors = {k: v.detach().clone() for k, v in src.state_dict().items()}
    expected = {}
    for name in ("up", "down", "proj"):
        q, s = _quantize_f64(tensors[f"{name}.weight"])
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = q, s
        expected[name] = (q, s)
    keys = sorted(tensors)
    half = len(keys) // 2
    d = tmp_path / "ds"
    d.mkdir()
    parts = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for fname, ks in parts.items():
        save_file({k: tensors[k] for k in ks}, str(d / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}))
    model = _net(seed=3, tie=False)
    load_quantized(model, d)
    x = torch.randn(3, 4, 256, dtype=torch.bfloat16)
    for name, (q, s) in expected.items():
        w = getattr(model, name).weight
        assert torch.equal(w.qdata.view(torch.uint8), q.view(torch.uint8)) and torch.equal(w.scale, s)
        # the layer computes the float64 simulation of blockwise FP8 with these q and s
        inp = x if name != "down" else torch.randn(3, 4, 200, dtype=torch.bfloat16)
        bias = getattr(model, name).bias
        want = reference.linear(inp, q, s, None if bias is None else bias.detach())
        assert torch.equal(getattr(model, name)(inp), want)
    assert torch.equal(model.embed.weight, src.embed.weight)
    # a single .safetensors file works too
    save_file({k: tensors[k] for k in keys}, str(tmp_path / "one.safetensors"))
    other = _net(seed=4, tie=False)
    load_quantized(other, tmp_path / "one.safetensors")
    assert torch.equal(other.up.weight.qdata.view(torch.uint8), expected["up"][0].view(torch.uint8))


def test_loads_into_a_meta_model_and_an_fp32_model(tmp_path):
    m = _quantized(tie=False)
    out = save_quantized(m, tmp_path / "ck")
    with torch.device("meta"):
        meta = Net(tie=False).to(torch.bfloat16)
    load_quantized(meta, out, device="cpu")
    assert all(not t.is_meta for t in meta.state_dict().values())
    ids = torch.randint(0, 96, (2, 3))
    assert torch.equal(m(ids), meta(ids))
    assert repr(meta.up) == repr(m.up) and "BlockwiseFP8(" in repr(meta.up)
    fp32 = _net(seed=1, dtype=torch.float32, tie=False)
    load_quantized(fp32, out)
    assert fp32.up.weight.dtype == torch.float32 and fp32.norm.weight.dtype == torch.float32
    assert torch.equal(fp32.up.weight.dequantize(torch.float32), m.up.weight.dequantize(torch.float32))


def test_e5m2_round_trip_and_mixed_dtypes_refused(tmp_path):
    m = _quantized(E5M2)
    out = save_quantized(m, tmp_path / "ck")
    fresh = _net(seed=2)
    assert load_quantized(fresh, out).weight_dtype == E5M2
    assert fresh.up.weight.qdata.dtype == E5M2
    mixed = _net()
    quantize_(mixed, BlockwiseFP8Config(weight_dtype=E5M2), filter_fn=lambda mod, fqn: fqn == "up")
    quantize_(mixed, BlockwiseFP8Config(weight_dtype=E4M3), filter_fn=lambda mod, fqn: fqn == "proj")
    with pytest.raises(ValueError, match="mix FP8 dtypes"):
        save_quantized(mixed, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


def test_save_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="no BlockwiseFP8Tensor weights"):
        save_quantized(_net(), tmp_path / "a")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        save_quantized({"w": torch.zeros(1)}, tmp_path / "b")
    with pytest.raises(ValueError, match="max_shard_size"):
        save_quantized(_quantized(), tmp_path / "c", max_shard_size="lots")
    with pytest.raises(FileNotFoundError, match="parent directory"):
        save_quantized(_quantized(), tmp_path / "no" / "such" / "dir")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        save_quantized(_quantized(), tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    save_quantized(_quantized(), tmp_path / "full", overwrite=True)
    assert sorted(os.listdir(tmp_path / "full")) == ["config.json", "model.safetensors"]


def test_save_to_an_unwritable_directory(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: make the access check see what a user would
        real = os.access
        monkeypatch.setattr(ckpt.os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    try:
        with pytest.raises(PermissionError, match="not writable"):
            save_quantized(_quantized(), ro / "ck")
    finally:
        ro.chmod(0o700)
    assert os.listdir(ro) == []


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    calls = []
    real = safetensors.torch.save_file

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C between two shards
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(_quantized(tie=False), tmp_path / "ck", max_shard_size="60KB")
    assert len(calls) == 2
    assert os.listdir(tmp_path) == []  # neither the destination nor the temporary directory


# ---------------------------------------------------------------------------------- load errors


@pytest.fixture
def saved(tmp_path):
    return save_quantized(_quantized(tie=False), tmp_path / "ck")


def _rewrite(path, edit):
    t = _read_all(path)
    edit(t)
    save_file(t, str(path / "model.safetensors"))


def _snapshot(model):
    return {k: (v.qdata.clone() if isinstance(v, BlockwiseFP8Tensor) else v.clone()) for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    now = _snapshot(model)
    return all(
        type(now[k]) is type(snap[k]) and torch.equal(now[k].view(torch.uint8) if now[k].element_size() == 1 else now[k], snap[k].view(torch.uint8) if snap[k].element_size() == 1 else snap[k])
        for k in snap
    )


def test_missing_and_unexpected_keys(saved):
    _rewrite(saved, lambda t: (t.pop("norm.bias"), t.__setitem__("extra.weight", torch.zeros(3))))
    model = _net(seed=5, tie=False)
    snap = _snapshot(model)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): norm.bias.*unexpected keys \(1\): extra.weight"):
        load_quantized(model, saved)
    assert _unchanged(model, snap)
    result = load_quantized(model, saved, strict=False)
    assert result.missing_keys == ["norm.bias"] and result.unexpected_keys == ["extra.weight"]
    assert isinstance(model.up.weight, BlockwiseFP8Tensor)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.__setitem__("up.weight_scale_inv", torch.ones(2, 1)), r"'up.weight_scale_inv' has shape \(2, 1\).*needs \(2, 2\)"),
        (lambda t: t.__setitem__("up.weight", torch.zeros(200, 128, dtype=E4M3)), r"'up.weight' has shape \(200, 128\), the model's weight \(200, 256\)"),
        (lambda t: t.pop("proj.weight_scale_inv"), "'proj.weight' is stored in F8_E4M3 without a weight_scale_inv"),
        (lambda t: t.__setitem__("up.weight_scale_inv", torch.ones(2, 2, dtype=torch.float16)), "scales must be F32"),
        (lambda t: t.__setitem__("up.weight", torch.zeros(200, 256)), "must be F8_E4M3 or F8_E5M2"),
        (lambda t: t.__setitem__("norm.weight", torch.zeros(128)), r"'norm.weight' has shape \(128,\), the model's tensor \(256,\)"),
        (lambda t: t.pop("down.weight"), "'down.weight_scale_inv' has no 'down.weight' beside it"),
    ],
)
def test_bad_tensors_are_reported_and_the_model_is_untouched(saved, edit, message):
    _rewrite(saved, edit)
    model = _net(seed=5, tie=False)
    snap = _snapshot(model)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(model, saved)
    assert _unchanged(model, snap)


@pytest.mark.parametrize(
    "qc, exc, message",
    [
        ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, NotImplementedError, "activation_scheme is 'static'"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, NotImplementedError, "weight_block_size is None"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [1, 128]}, NotImplementedError, r"weight_block_size is \[1, 128\]"),
        ({"quant_method": "awq"}, NotImplementedError, "quant_method is 'awq'"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e3m4"}, CheckpointError, "fmt must be one of"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, CheckpointError, "states fmt 'e5m2'"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}, NotImplementedError, "scale_fmt 'ue8m0'"),
    ],
)
def test_config_entries_are_checked(saved, qc, exc, message):
    (saved / "config.json").write_text(json.dumps({"quantization_config": qc}))
    with pytest.raises(exc, match=message):
        load_quantized(_net(seed=5, tie=False), saved)


def test_bad_paths_and_arguments(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized(_net(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_quantized(_net(), tmp_path / "empty")
    (tmp_path / "badindex").mkdir()
    (tmp_path / "badindex" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(_net(), tmp_path / "badindex")
    (tmp_path / "badindex" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="names the shard gone.safetensors"):
        load_quantized(_net(), tmp_path / "badindex")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_quantized(_net(), tmp_path / "junk.safetensors")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        load_quantized(_net(), 42)
    with pytest.raises(ValueError, match="activation_dtype"):
        load_quantized(_net(tie=False), saved, activation_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend"):
        load_quantized(_net(tie=False), saved, backend="fast")


def test_scale_on_a_module_that_is_not_linear(tmp_path):
    m = _quantized(tie=False)
    out = save_quantized(m, tmp_path / "ck")
    _rewrite(out, lambda t: t.__setitem__("embed.weight_scale_inv", torch.ones(1, 2)))
    with pytest.raises(NotImplementedError, match="'embed', a Embedding"):
        load_quantized(_net(tie=False), out)


def test_skip_filter():
    f = ckpt.skip_filter(["lm_head", r"layers\.0\."])
    lin = nn.Linear(4, 4)
    assert f(lin, "model.layers.1.mlp") and not f(lin, "lm_head") and not f(lin, "model.layers.0.q")
    assert not f(nn.LayerNorm(4), "norm")
    with pytest.raises(TypeError, match="wrap a single pattern in a tuple"):
        ckpt.skip_filter("lm_head")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        ckpt.skip_filter(["("])


def test_partial_blocks_warn(tmp_path):
    with pytest.warns(ckpt.PartialBlockWarning, match=r"'up.weight' has shape \(200, 256\)"):
        save_quantized(_quantized(), tmp_path / "a")
    m = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 256)).to(torch.bfloat16)
    quantize_(m, BlockwiseFP8Config())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_quantized(m, tmp_path / "b")


def test_loads_into_an_already_quantized_model(tmp_path):
    m = _quantized(tie=False)
    out = save_quantized(m, tmp_path / "ck")
    other = _quantized(tie=False)
    with torch.no_grad():
        other.norm.weight.fill_(3.0)
    before = other.up.weight
    load_quantized(other, out)
    assert other.up.weight is not before and isinstance(other.up.weight, BlockwiseFP8Tensor)
    ids = torch.randint(0, 96, (2, 4))
    assert torch.equal(other(ids), m(ids))
