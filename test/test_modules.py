"""BlockwiseFP8Linear and unwrap_for_compile (modules.py): the quantized Linear with plain FP8
parameters, against the subclass path it replaces (same tensors, same math) and the float64
reference."""

import copy

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code
from torchao.quantization import quantize_

from blockwise_fp8 import BlockwiseFP8Config, BlockwiseFP8Linear, BlockwiseFP8Tensor, fusion, reference, save_quantized
from blockwise_fp8 import unwrap_for_compile

from .test_config import MLP, Block


pytestmark = pytest.mark.usefixtures("fresh_compile")


def _quantized(model, **cfg):
    quantize_(model, BlockwiseFP8Config(**cfg))
    return model


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("N,K,bias", [(67, 200, True), (128, 128, False), (16, 67, True), (300, 129, False)])
def test_same_output_as_the_subclass_and_close_to_reference(N, K, bias, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=bias).to(torch.bfloat16)
    sub = _quantized(nn.Sequential(copy.deepcopy(lin)), weight_dtype=dtype, activation_dtype=dtype)
    plain = BlockwiseFP8Linear.from_linear(copy.deepcopy(sub[0]))
    assert plain.weight.dtype == dtype and plain.weight_scale_inv.dtype == torch.float32
    assert tuple(plain.weight_scale_inv.shape) == (-(-N // 128), -(-K // 128))
    x = torch.randn(2, 3, K, dtype=torch.bfloat16)
    with torch.no_grad():
        got, want = plain(x), sub(x)
    assert got.shape == (2, 3, N) and got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    # the independent oracle: float64 math on the same quantized weight
    expect = reference.linear(x.reshape(-1, K), plain.weight, plain.weight_scale_inv,
                              None if lin.bias is None else lin.bias.detach(), activation_dtype=dtype,
                              out_dtype=torch.bfloat16)
    torch.testing.assert_close(got.reshape(-1, N), expect, rtol=2**-7, atol=1e-3)


def test_shares_storage_and_round_trips_to_the_tensor():
    sub = _quantized(nn.Sequential(nn.Linear(256, 128)).to(torch.bfloat16))
    w = sub[0].weight
    plain = BlockwiseFP8Linear.from_linear(sub[0])
    assert plain.weight.data_ptr() == w.qdata.data_ptr()
    assert plain.weight_scale_inv.data_ptr() == w.scale.data_ptr()
    assert not plain.weight.requires_grad and not plain.weight_scale_inv.requires_grad
    back = plain.weight_tensor()
    assert isinstance(back, BlockwiseFP8Tensor)
    assert torch.equal(back.dequantize(), w.dequantize())
    assert "weight=torch.float8_e4m3fn 128x128" in repr(plain)


def test_unwrap_for_compile_swaps_every_quantized_linear_and_keeps_the_others():
    torch.manual_seed(0)
    model = Block().to(torch.bfloat16)
    quantize_(model, BlockwiseFP8Config(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "down")
    x = torch.randn(1, 5, 160, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
    assert unwrap_for_compile(model) is model
    assert all(isinstance(getattr(model, n), BlockwiseFP8Linear) for n in ("q", "k", "v", "o", "gate", "up"))
    assert type(model.down) is nn.Linear and model.down.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_state_dict_is_the_checkpoint_format(tmp_path):
    # save_quantized writes the DeepSeek/HF FP8 format from the subclass form; the unwrapped
    # model's own state_dict has the same names, dtypes and shapes, so it loads that file strictly.
    torch.manual_seed(0)
    model = _quantized(MLP().to(torch.bfloat16))
    save_quantized(model, tmp_path / "ckpt")
    on_disk = load_file(tmp_path / "ckpt" / "model.safetensors")
    unwrapped = unwrap_for_compile(copy.deepcopy(model))
    state = unwrapped.state_dict()
    assert set(state) == set(on_disk)
    for k, t in on_disk.items():
        assert state[k].dtype == t.dtype and state[k].shape == t.shape, k
    fresh = unwrap_for_compile(copy.deepcopy(model))
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(on_disk, strict=True)
    x = torch.randn(4, 200, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_input_and_bias_gradients_match_the_subclass():
    torch.manual_seed(0)
    sub = _quantized(nn.Sequential(nn.Linear(200, 67)).to(torch.float32))
    sub[0].bias.requires_grad_(True)
    plain = BlockwiseFP8Linear.from_linear(copy.deepcopy(sub[0]))
    plain.bias.requires_grad_(True)
    x1 = torch.randn(3, 200, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(3, 67)
    sub(x1).backward(g)
    plain(x2).backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(sub[0].bias.grad, plain.bias.grad)
    assert plain.weight.grad is None


def test_compiled_block_has_no_graph_break_and_groups_like_the_subclass(kernel_device):
    # Dynamo traces BlockwiseFP8Linear.forward itself (the subclass path is traced by AOTAutograd):
    # the Triton backend must not break the graph (its availability probes are answered before
    # tracing), and the fusion pass merges the per-Linear quantizations into one per input
    # (q/k/v: 3 -> 1, gate/up: 2 -> 1), then groups the GEMMs as for the subclass.
    torch.manual_seed(0)
    model = _quantized(Block().to(kernel_device, torch.bfloat16), backend="triton")
    x = torch.randn(1, 3, 160, dtype=torch.bfloat16, device=kernel_device)
    fusion.install()
    opts = dict(fullgraph=True)
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        want, _ = run_and_get_code(torch.compile(model, **opts), x)
        torch._dynamo.reset()
        unwrap_for_compile(model)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        merged, groups = fusion._PASS.merged, fusion._PASS.groups
        got, code = run_and_get_code(torch.compile(model, **opts), x)
    code = "\n".join(code)
    assert fusion._PASS.merged - merged == 3 and fusion._PASS.groups - groups == 2
    assert code.count("blockwise_fp8.quantize_input.default(") == 4
    assert torch.equal(got, want)


def test_compiled_with_the_pass_off_still_matches():
    torch.manual_seed(0)
    model = unwrap_for_compile(_quantized(Block().to(torch.bfloat16)))
    x = torch.randn(2, 4, 160, dtype=torch.bfloat16)
    fusion.uninstall()
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=2**-6, atol=2**-6)


def test_compiled_with_inductor_freezing_matches():
    """Inference users turn on Inductor's freezing (parameters folded into the graph as
    constants): the FP8 weights and scales must survive it, in either weight form."""
    torch.manual_seed(0)
    subclass = _quantized(Block().to(torch.bfloat16))
    module = unwrap_for_compile(copy.deepcopy(subclass))
    x = torch.randn(2, 4, 160, dtype=torch.bfloat16)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        want = subclass(x)
        for model in (subclass, module):
            torch._dynamo.reset()
            got = torch.compile(model, fullgraph=True)(x)
            torch.testing.assert_close(got, want, rtol=2**-6, atol=2**-6)


def test_errors_say_what_was_expected():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        unwrap_for_compile("model")
    with pytest.raises(ValueError, match="no nn.Linear with a BlockwiseFP8Tensor weight.*bfloat16"):
        unwrap_for_compile(MLP().to(torch.bfloat16))
    lin = _quantized(nn.Sequential(nn.Linear(256, 128)).to(torch.bfloat16))[0]
    with pytest.raises(TypeError, match="holds the Linears"):
        unwrap_for_compile(lin)
    with pytest.raises(TypeError, match="expected an nn.Linear whose weight is a BlockwiseFP8Tensor"):
        BlockwiseFP8Linear.from_linear(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="expected an nn.Linear, got ReLU"):
        BlockwiseFP8Linear.from_linear(nn.ReLU())
    w, s = lin.weight.qdata, lin.weight.scale
    with pytest.raises(ValueError, match=r"scale has shape \(1, 1\).*needs \(1, 2\)"):
        BlockwiseFP8Linear(w, s[:, :1])
    with pytest.raises(ValueError, match=r"bias must have shape \(128,\)"):
        BlockwiseFP8Linear(w, s, torch.zeros(3))
    with pytest.raises(TypeError, match="qdata must have an FP8 dtype"):
        BlockwiseFP8Linear(w.float(), s)
    plain = BlockwiseFP8Linear(w, s)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        plain([1.0])
    with pytest.raises(ValueError, match="K"):
        plain(torch.randn(2, 100, dtype=torch.bfloat16))


def test_compiled_dynamic_batch_and_gradients_match_eager():
    # A symbolic M (dynamic=True) takes the row-major scale layout; gradients flow through the
    # autograd.Function that Dynamo traces around the two recorded ops.
    torch.manual_seed(0)
    model = unwrap_for_compile(_quantized(MLP().to(torch.float32)))
    compiled = torch.compile(model, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for batch in (3, 5):
            x = torch.randn(batch, 200)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    x1 = torch.randn(4, 200, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(4, 200)
    model(x1).backward(g)
    torch.compile(model, fullgraph=True)(x2).backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cast", ["to", "half"])
def test_a_dtype_cast_keeps_the_weight_quantized_like_the_subclass(cast):
    torch.manual_seed(0)
    sub = _quantized(MLP().to(torch.bfloat16))
    plain = unwrap_for_compile(copy.deepcopy(sub))
    w8, s32 = plain.up.weight.detach().clone(), plain.up.weight_scale_inv.detach().clone()
    for m in (sub, plain):
        m.to(torch.float16) if cast == "to" else m.half()
    assert plain.up.weight.dtype == torch.float8_e4m3fn and torch.equal(plain.up.weight.view(torch.uint8), w8.view(torch.uint8))
    assert plain.up.weight_scale_inv.dtype == torch.float32 and torch.equal(plain.up.weight_scale_inv, s32)
    assert plain.up.bias.dtype == torch.float16 and plain.up.hp_dtype == torch.float16
    assert isinstance(plain.up.weight, nn.Parameter) and sub.up.weight.dtype == torch.float16
    x = torch.randn(3, 200, dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(plain(x), sub(x))
    assert plain.up.weight_tensor().dtype == torch.float16
