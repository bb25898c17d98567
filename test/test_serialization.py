"""Saving and loading quantized models: torch.save/torch.load(weights_only=True), load_state_dict
with assign=True into fresh (also meta-device) models, and copy_-style loading."""

import io

import pytest
import torch
from torchao.quantization import quantize_

from blockwise_fp8 import BlockwiseFP8Config, BlockwiseFP8Tensor

from .test_config import Block

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
CFG = dict(activation_dtype=E4M3, weight_dtype=E5M2, backend="reference")


def _fresh(seed=0, device=None):
    torch.manual_seed(seed)
    if device is None:
        return Block().to(torch.bfloat16)
    with torch.device(device):
        return Block().to(torch.bfloat16)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture
def saved():
    model = _fresh()
    quantize_(model, BlockwiseFP8Config(**CFG))
    x = torch.randn(2, 8, 160, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x)
    return _roundtrip(model.state_dict()), x, out


def _check_loaded(model, x, out):
    w = model.q.weight
    assert isinstance(w, BlockwiseFP8Tensor)
    assert (w.qdata.dtype, w.activation_dtype, w.backend, w.dtype) == (E5M2, E4M3, "reference", torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_state_dict_holds_the_quantized_tensors(saved):
    sd, _, _ = saved
    w = sd["q.weight"]
    assert type(w) is BlockwiseFP8Tensor and w.scale.shape == (2, 2) and w.qdata.dtype == E5M2
    assert BlockwiseFP8Tensor in torch.serialization.get_safe_globals()


def test_assign_into_fresh_model(saved):
    sd, x, out = saved
    model = _fresh(seed=1)  # different random init, never quantized
    model.load_state_dict(sd, assign=True)
    _check_loaded(model, x, out)


def test_assign_into_meta_model(saved):
    sd, x, out = saved
    model = _fresh(device="meta")
    model.load_state_dict(sd, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    _check_loaded(model, x, out)


def test_meta_model_quantized_then_materialized_then_copied(saved):
    sd, x, out = saved
    model = _fresh(device="meta")
    quantize_(model, BlockwiseFP8Config(**CFG))  # structure only: no values on meta
    assert isinstance(model.q.weight, BlockwiseFP8Tensor) and model.q.weight.is_meta
    model.to_empty(device="cpu")
    assert isinstance(model.q.weight, BlockwiseFP8Tensor) and not model.q.weight.is_meta
    model.load_state_dict(sd)  # copy_ into the existing tensors
    _check_loaded(model, x, out)


def test_copy_into_quantized_model(saved):
    sd, x, out = saved
    model = _fresh(seed=2)
    quantize_(model, BlockwiseFP8Config(**CFG))
    before = model.q.weight.qdata.data_ptr()
    model.load_state_dict(sd)
    assert model.q.weight.qdata.data_ptr() == before  # loaded in place
    _check_loaded(model, x, out)


def test_bf16_checkpoint_into_quantized_model():
    # A high-precision state dict copied into a quantized model is quantized on the way in.
    bf16 = _fresh(seed=3)
    sd = _roundtrip(bf16.state_dict())
    expect = _fresh(seed=3)
    quantize_(expect, BlockwiseFP8Config(**CFG))
    model = _fresh(seed=4)
    quantize_(model, BlockwiseFP8Config(**CFG))
    model.load_state_dict(sd)
    x = torch.randn(2, 8, 160, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), expect(x))


def test_format_mismatch_is_a_clear_error(saved):
    sd, _, _ = saved
    model = _fresh()
    quantize_(model, BlockwiseFP8Config())  # e4m3 weights; the checkpoint holds e5m2
    with pytest.raises(RuntimeError, match="float8_e5m2.*float8_e4m3fn.*requantize"):
        model.load_state_dict(sd)


def test_single_tensor_roundtrip_keeps_everything():
    w = BlockwiseFP8Tensor.from_hp(torch.randn(300, 200, dtype=torch.float16), dtype=E4M3, activation_dtype=E5M2)
    back = _roundtrip({"w": w})["w"]
    assert type(back) is BlockwiseFP8Tensor
    assert (back.shape, back.dtype, back.block_size, back.activation_dtype, back.backend) == (
        w.shape, w.dtype, w.block_size, w.activation_dtype, w.backend
    )
    assert torch.equal(back.qdata.view(torch.uint8), w.qdata.view(torch.uint8))
    assert torch.equal(back.scale, w.scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_save_load_and_device_moves(saved):
    sd, x, out = saved
    model = _fresh().to("cuda")
    model.load_state_dict({k: v.to("cuda") for k, v in sd.items()}, assign=True)
    assert model.q.weight.qdata.is_cuda and model.q.weight.scale.is_cuda
    cuda_sd = _roundtrip(model.state_dict())
    back = _fresh()
    back.load_state_dict({k: v.to("cpu") for k, v in cuda_sd.items()}, assign=True)
    _check_loaded(back, x, out)
    moved = model.to("cpu")
    _check_loaded(moved, x, out)
