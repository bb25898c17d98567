"""BlockwiseFP8Tensor: construction, the linear-like ops against the float64 oracle, layout ops,
copies and moves, the dequantize fallback and the errors for bad input."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from blockwise_fp8 import BlockwiseFP8Tensor, reference
from blockwise_fp8.tensor import _WARNED_OPS

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
HP = [torch.bfloat16, torch.float16, torch.float32]


def _weight(n=300, k=200, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) / k**0.5).to(dtype)


def _x(*shape, dtype=torch.bfloat16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _oracle(x, t, bias=None, out_dtype=None):
    """The float64 reference linear on the tensor's own FP8 data (x @ W.T + bias)."""
    return reference.linear(
        x, t.qdata, t.scale, bias, activation_dtype=t.activation_dtype, out_dtype=out_dtype or x.dtype
    )


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("wdtype", [E4M3, E5M2])
@pytest.mark.parametrize("hp", HP)
def test_from_hp_matches_reference_quantization(wdtype, hp):
    w = _weight(dtype=hp)
    t = BlockwiseFP8Tensor.from_hp(w, dtype=wdtype, activation_dtype=E5M2)
    q, s = reference.quantize(w, (128, 128), wdtype)
    assert torch.equal(t.qdata.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(t.scale, s)
    assert t.shape == w.shape and t.dtype == hp and t.scale.shape == (3, 2)
    assert t.block_size == (128, 128) and t.activation_block_size == (1, 128)
    assert t.activation_dtype == E5M2 and t.backend == "auto" and t.hp_dtype == hp
    assert torch.equal(t.dequantize(), reference.dequantize(q, s, (128, 128), hp))
    assert t.dequantize(torch.float32).dtype == torch.float32
    assert type(t.dequantize()) is torch.Tensor


def test_constructor_positional_from_checkpoint_tensors():
    # How a checkpoint loader builds it: (qdata, scale) straight from FP8 safetensors.
    q, s = reference.quantize(_weight(), (128, 128), E4M3)
    t = BlockwiseFP8Tensor(q, s, (128, 128), E4M3, "reference", torch.float16)
    assert t.dtype == torch.float16 and t.backend == "reference" and t.qdata is q and t.scale is s
    t2 = BlockwiseFP8Tensor(qdata=q, scale=s, block_size=[128, 128], activation_dtype=E5M2, backend="auto",
                            hp_dtype=torch.bfloat16)
    assert t2.block_size == (128, 128) and t2.dtype == torch.bfloat16


def test_all_zero_blocks_are_finite_and_exact():
    w = _weight()
    w[:128, :128] = 0
    t = BlockwiseFP8Tensor.from_hp(w)
    assert torch.isfinite(t.scale).all()
    assert torch.equal(t.dequantize()[:128, :128], torch.zeros(128, 128, dtype=torch.bfloat16))
    x = _x(3, 200)
    assert torch.isfinite(F.linear(x, t)).all()


def test_repr_is_readable():
    r = repr(BlockwiseFP8Tensor.from_hp(_weight(), dtype=E5M2))
    for part in ("BlockwiseFP8Tensor(", "shape=(300, 200)", "float8_e5m2", "block_size=(128, 128)",
                 "activation_dtype=torch.float8_e4m3fn", "backend='auto'", "dtype=torch.bfloat16"):
        assert part in r
    assert "tensor(" not in r  # no data dump


def test_constructor_rejects_bad_components():
    q, s = reference.quantize(_weight(), (128, 128), E4M3)
    with pytest.raises(TypeError, match="FP8 dtype"):
        BlockwiseFP8Tensor(q.float(), s)
    with pytest.raises(TypeError, match="float32"):
        BlockwiseFP8Tensor(q, s.double())
    with pytest.raises(ValueError, match=r"needs \(3, 2\)"):
        BlockwiseFP8Tensor(q, s[:2])
    with pytest.raises(ValueError, match="2-D"):
        BlockwiseFP8Tensor(q[0], s[0])
    with pytest.raises(ValueError, match=r"\(128, 128\)"):
        BlockwiseFP8Tensor(q, s, block_size=(64, 64))
    with pytest.raises(ValueError, match="activation_dtype"):
        BlockwiseFP8Tensor(q, s, activation_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend"):
        BlockwiseFP8Tensor(q, s, backend="cuda")
    with pytest.raises(ValueError, match="hp_dtype"):
        BlockwiseFP8Tensor(q, s, hp_dtype=torch.float64)
    with pytest.raises(TypeError, match="torch.Tensor"):
        BlockwiseFP8Tensor(q.tolist(), s)


def test_from_hp_rejects_bad_input():
    w = _weight()
    with pytest.raises(TypeError, match="torch.float64"):
        BlockwiseFP8Tensor.from_hp(w.double())
    with pytest.raises(TypeError, match="torch.int32"):
        BlockwiseFP8Tensor.from_hp(w.to(torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        BlockwiseFP8Tensor.from_hp(w[0])
    with pytest.raises(ValueError, match="dtype must be"):
        BlockwiseFP8Tensor.from_hp(w, dtype=torch.int8)
    with pytest.raises(TypeError, match="already a BlockwiseFP8Tensor"):
        BlockwiseFP8Tensor.from_hp(BlockwiseFP8Tensor.from_hp(w))
    bad = w.clone()
    bad[200, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        BlockwiseFP8Tensor.from_hp(bad)


# --------------------------------------------------------------------------- linear-like ops


@pytest.mark.parametrize("hp", HP)
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
def test_f_linear_matches_oracle(hp, use_bias, lead):
    t = BlockwiseFP8Tensor.from_hp(_weight(dtype=hp))
    x = _x(*lead, 200, dtype=hp)
    bias = _x(300, dtype=hp, seed=7) if use_bias else None
    out = F.linear(x, t, bias)
    assert out.shape == (*lead, 300) and out.dtype == hp
    assert torch.equal(out, _oracle(x, t, bias))


@pytest.mark.parametrize("pair", [(E4M3, E4M3), (E5M2, E5M2), (E4M3, E5M2), (E5M2, E4M3)])
def test_dtype_pairs_use_the_activation_dtype(pair):
    act, wdt = pair
    t = BlockwiseFP8Tensor.from_hp(_weight(), dtype=wdt, activation_dtype=act)
    x = _x(4, 200)
    out = F.linear(x, t)
    assert torch.equal(out, _oracle(x, t))
    other = E5M2 if act == E4M3 else E4M3
    # The activation dtype really is used: the other FP8 format gives a different result.
    assert not torch.equal(out, reference.linear(x, t.qdata, t.scale, activation_dtype=other, out_dtype=x.dtype))


def test_dispatch_level_linear_decomposition():
    # With __torch_function__ off, F.linear decomposes into aten.t + aten.addmm / aten.mm on
    # the weight: the transposed view must reach the NT GEMM exactly.
    t = BlockwiseFP8Tensor.from_hp(_weight())
    x, bias = _x(5, 200), _x(300, seed=3)
    with torch._C.DisableTorchFunctionSubclass():
        with_bias = F.linear(x, t, bias)
        no_bias = F.linear(_x(2, 3, 200), t)
    assert torch.equal(with_bias, _oracle(x, t, bias))
    assert torch.equal(no_bias, _oracle(_x(2, 3, 200), t))


def test_aten_ops_match_oracle():
    t = BlockwiseFP8Tensor.from_hp(_weight())
    x, x3, bias = _x(5, 200), _x(2, 3, 200), _x(300, seed=3)
    expect, expect_b = _oracle(x, t), _oracle(x, t, bias)
    assert torch.equal(torch.ops.aten.linear.default(x, t, bias), expect_b)
    assert torch.equal(torch.ops.aten.mm.default(x, t.t()), expect)
    assert torch.equal(torch.mm(x, t.t()), expect)
    assert torch.equal(torch.ops.aten.addmm.default(bias, x, t.t()), expect_b)
    assert torch.equal(torch.addmm(bias, x, t.t()), expect_b)
    assert torch.equal(torch.ops.aten.matmul.default(x3, t.t()), _oracle(x3, t))
    assert torch.equal(torch.matmul(x3, t.t()), _oracle(x3, t))
    assert torch.equal(x3 @ t.t(), _oracle(x3, t))
    assert torch.equal(x @ t.transpose(0, 1), expect)
    # Weight on the left: W @ x.T == (x @ W.T).T, same numerics.
    assert torch.equal(torch.mm(t, x.t()), expect.t())
    assert torch.equal(t @ x.t(), expect.t())


def test_addmm_alpha_beta_and_broadcast_bias():
    t = BlockwiseFP8Tensor.from_hp(_weight(), activation_dtype=E4M3)
    x, bias = _x(5, 200, dtype=torch.float32), _x(5, 300, dtype=torch.float32, seed=4)
    plain = _oracle(x, t).double()
    out = torch.addmm(bias, x, t.t(), beta=0.5, alpha=2.0)
    torch.testing.assert_close(out.double(), 0.5 * bias.double() + 2.0 * plain, rtol=1e-6, atol=1e-6)
    nan_bias = torch.full((5, 300), float("nan"))
    assert torch.equal(torch.addmm(nan_bias, x, t.t(), beta=0), _oracle(x, t))


def test_linear_on_sliced_and_transposed_weights():
    t = BlockwiseFP8Tensor.from_hp(_weight(300, 300))
    x = _x(3, 300)
    rows = t[128:]  # N sliced: a (172, 300) weight
    assert torch.equal(F.linear(x, rows), reference.linear(x, t.qdata[128:], t.scale[1:], out_dtype=x.dtype))
    cols = t[:, :256]  # K sliced: non-contiguous qdata
    x2 = x[:, :256]
    assert torch.equal(F.linear(x2, cols), reference.linear(x2, t.qdata[:, :256], t.scale[:, :2], out_dtype=x.dtype))
    tt = t.t()  # a (K, N) tensor used as an NK weight: the GEMM must read the transpose
    assert torch.equal(F.linear(x, tt), reference.linear(x, t.qdata.t(), t.scale.t(), out_dtype=x.dtype))


def test_linear_rejects_bad_input():
    t = BlockwiseFP8Tensor.from_hp(_weight())
    with pytest.raises(ValueError, match="disagree on K"):
        F.linear(_x(3, 100), t)
    with pytest.raises(TypeError, match="torch.float64"):
        F.linear(_x(3, 200).double(), t)
    with pytest.raises(TypeError, match="torch.int64"):
        F.linear(torch.ones(3, 200, dtype=torch.long), t)
    with pytest.raises(NotImplementedError, match="both operands"):
        torch.mm(BlockwiseFP8Tensor.from_hp(_weight(5 * 40, 300)), t)
    with pytest.raises(ValueError, match="2-D"):
        torch.mm(_x(2, 3, 200), t.t())
    with pytest.raises(ValueError, match="bias must have shape"):
        F.linear(_x(3, 200), t, _x(299))


@pytest.mark.parametrize("use_bias", [False, True])
def test_triton_backend_through_interpreter(kernel_device, use_bias):
    t = BlockwiseFP8Tensor.from_hp(_weight(144, 136).to(kernel_device), backend="triton")
    x = _x(3, 136).to(kernel_device)
    bias = _x(144, seed=5).to(kernel_device) if use_bias else None
    out = F.linear(x, t, bias)
    exact = _oracle(x, t, bias, out_dtype=torch.float64)
    # FP32 accumulation then one bf16 rounding: within a bf16 ulp of the float64 value.
    torch.testing.assert_close(out.double(), exact, rtol=2**-7, atol=1e-3)
    assert torch.equal(t.dequantize(), reference.dequantize(t.qdata, t.scale, (128, 128)))


def test_input_and_bias_gradients():
    t = BlockwiseFP8Tensor.from_hp(_weight(), dtype=E4M3)
    x = _x(4, 200, dtype=torch.float32).requires_grad_()
    bias = _x(300, dtype=torch.float32, seed=2).requires_grad_()
    g = _x(4, 300, dtype=torch.float32, seed=9)
    F.linear(x, t, bias).backward(g)
    w = reference.dequantize(t.qdata, t.scale, (128, 128), torch.float64)
    torch.testing.assert_close(x.grad.double(), g.double() @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad.double(), g.double().sum(0), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- layout ops


def test_transpose_is_a_view_of_the_blocks():
    t = BlockwiseFP8Tensor.from_hp(_weight())
    for tt in (t.t(), t.transpose(0, 1), t.transpose(-1, -2), t.permute(1, 0), t.T):
        assert isinstance(tt, BlockwiseFP8Tensor) and tt.shape == (200, 300)
        assert tt.qdata.data_ptr() == t.qdata.data_ptr()
        assert torch.equal(tt.dequantize(), t.dequantize().t())
    assert torch.equal(t.t().t().dequantize(), t.dequantize())


@pytest.mark.parametrize(
    "take, rows, cols",
    [
        (lambda t: t[128:256], slice(128, 256), slice(None)),
        (lambda t: t[256:], slice(256, None), slice(None)),
        (lambda t: t[:, 128:], slice(None), slice(128, None)),
        (lambda t: t.narrow(0, 0, 128), slice(0, 128), slice(None)),
        (lambda t: t.narrow(1, 128, 72), slice(None), slice(128, 200)),
        (lambda t: t[-172:], slice(128, None), slice(None)),
    ],
)
def test_block_aligned_slices(take, rows, cols):
    t = BlockwiseFP8Tensor.from_hp(_weight())
    s = take(t)
    assert isinstance(s, BlockwiseFP8Tensor)
    assert torch.equal(s.dequantize(), t.dequantize()[rows, cols])
    assert s.qdata.data_ptr() != 0 and s.scale.dtype == torch.float32


def test_split_and_chunk():
    t = BlockwiseFP8Tensor.from_hp(_weight(384, 300))
    full = t.dequantize()
    parts = t.split(128)
    assert [p.shape[0] for p in parts] == [128, 128, 128]
    assert torch.equal(torch.cat([p.dequantize() for p in parts]), full)
    parts = t.split([256, 128])
    assert torch.equal(parts[1].dequantize(), full[256:])
    parts = t.chunk(3)
    assert torch.equal(parts[2].dequantize(), full[256:])
    parts = t.split(128, dim=1)  # 128, 128, 44: the last partial block is kept whole
    assert [p.shape[1] for p in parts] == [128, 128, 44]
    assert torch.equal(parts[2].dequantize(), full[:, 256:])
    q, k, v = t.chunk(3, dim=0)  # fused QKV: the usual reason to split a weight
    assert torch.equal(k.dequantize(), full[128:256])


@pytest.mark.parametrize(
    "cut",
    [
        lambda t: t[:100],
        lambda t: t[64:],
        lambda t: t[:, 1:],
        lambda t: t[::2],
        lambda t: t.narrow(0, 0, 200),
        lambda t: t.split(100),
        lambda t: t.chunk(2, dim=1),
        lambda t: t.split([100, 200]),
    ],
)
def test_slices_through_a_block_are_refused(cut):
    t = BlockwiseFP8Tensor.from_hp(_weight())
    with pytest.raises(ValueError, match="blocks|block"):
        cut(t)


def test_view_and_reshape():
    t = BlockwiseFP8Tensor.from_hp(_weight())
    assert torch.equal(t.view(300, 200).dequantize(), t.dequantize())
    assert torch.equal(t.reshape(-1, 200).dequantize(), t.dequantize())
    with pytest.raises(NotImplementedError, match="cannot be viewed"):
        t.view(600, 100)
    with pytest.raises(NotImplementedError, match="cannot be viewed"):
        t.reshape(-1)
    with torch.inference_mode():  # where view_as reaches __torch_dispatch__ undecomposed (DTensor.from_local)
        v = t.view_as(t)
        assert isinstance(v, BlockwiseFP8Tensor) and torch.equal(v.dequantize(), t.dequantize())
        with pytest.raises(NotImplementedError, match="cannot be viewed"):
            t.view_as(torch.empty(600, 100))


# --------------------------------------------------------------------------- copies and moves


def test_detach_clone_to():
    t = BlockwiseFP8Tensor.from_hp(_weight(), dtype=E5M2, activation_dtype=E5M2, backend="reference")
    for c in (t.detach(), t.clone(), t.to("cpu"), t.to(torch.device("cpu")), t.cpu(), t.contiguous()):
        assert isinstance(c, BlockwiseFP8Tensor)
        assert (c.activation_dtype, c.backend, c.dtype, c.qdata.dtype) == (E5M2, "reference", torch.bfloat16, E5M2)
        assert torch.equal(c.dequantize(), t.dequantize())
    c = t.clone()
    assert c.qdata.data_ptr() != t.qdata.data_ptr()
    h = t.to(torch.float16)  # a new high-precision dtype for the same FP8 values
    assert isinstance(h, BlockwiseFP8Tensor) and h.dtype == torch.float16
    assert torch.equal(h.qdata.view(torch.uint8), t.qdata.view(torch.uint8))
    assert torch.equal(h.dequantize(), reference.dequantize(t.qdata, t.scale, (128, 128), torch.float16))
    assert t.half().dtype == torch.float16 and t.float().dtype == torch.float32
    with pytest.raises(TypeError, match="float64"):
        t.double()
    with pytest.raises(TypeError, match="dequantize"):
        t.to(torch.float8_e4m3fn)
    m = torch.nn.Linear(200, 300).to(torch.bfloat16)
    m.weight = torch.nn.Parameter(t, requires_grad=False)
    m.to(torch.float16)
    assert isinstance(m.weight, BlockwiseFP8Tensor) and m.weight.dtype == torch.float16


def test_copy_():
    src = BlockwiseFP8Tensor.from_hp(_weight(seed=1))
    dst = BlockwiseFP8Tensor.from_hp(_weight(seed=2))
    q_ptr = dst.qdata.data_ptr()
    dst.copy_(src)
    assert dst.qdata.data_ptr() == q_ptr  # in place
    assert torch.equal(dst.dequantize(), src.dequantize())
    # A high-precision source is quantized into the destination's format.
    w = _weight(seed=3)
    dst.copy_(w)
    q, s = reference.quantize(w, (128, 128), E4M3)
    assert torch.equal(dst.scale, s) and torch.equal(dst.qdata.view(torch.uint8), q.view(torch.uint8))
    with pytest.raises(ValueError, match="shape mismatch"):
        dst.copy_(BlockwiseFP8Tensor.from_hp(_weight(256, 200)))
    with pytest.raises(ValueError, match="requantize"):
        dst.copy_(BlockwiseFP8Tensor.from_hp(_weight(), dtype=E5M2))
    with pytest.raises(ValueError, match="shape mismatch"):
        dst.copy_(_weight(200, 300))


def test_empty_like_stays_quantized():
    t = BlockwiseFP8Tensor.from_hp(_weight())
    e = torch.empty_like(t)
    assert isinstance(e, BlockwiseFP8Tensor) and e.shape == t.shape and e.scale.shape == t.scale.shape


# --------------------------------------------------------------------------- everything else


def test_pure_ops_fall_back_to_dequantize_with_one_warning():
    t = BlockwiseFP8Tensor.from_hp(_weight())
    full = t.dequantize()
    _WARNED_OPS.discard(torch.ops.aten.mul.Tensor)
    with pytest.warns(UserWarning, match="aten.mul.Tensor"):
        out = t * 2
    assert type(out) is torch.Tensor and torch.equal(out, full * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is quiet
        assert torch.equal(t * 3, full * 3)
    with pytest.warns(UserWarning, match="embedding"):
        emb = F.embedding(torch.tensor([1, 299]), t)
    assert torch.equal(emb, full[[1, 299]])


@pytest.mark.parametrize(
    "op",
    [lambda t: t.add_(1), lambda t: t.zero_(), lambda t: t.fill_(0.5), lambda t: t.unsqueeze(0),
     lambda t: t.diagonal(), lambda t: t.as_strided((2, 2), (1, 1))],
)
def test_mutating_and_aliasing_ops_are_refused(op):
    t = BlockwiseFP8Tensor.from_hp(_weight())
    before = t.dequantize()
    with pytest.raises(NotImplementedError, match=r"aten\."):
        op(t)
    assert torch.equal(t.dequantize(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_cuda_moves_and_linear(backend):
    t = BlockwiseFP8Tensor.from_hp(_weight(), backend=backend)
    for c in (t.to("cuda"), t.cuda(), t.to(device="cuda", dtype=torch.float16)):
        assert isinstance(c, BlockwiseFP8Tensor) and c.qdata.is_cuda and c.scale.is_cuda and c.is_cuda
        assert torch.equal(c.cpu().qdata.view(torch.uint8), t.qdata.view(torch.uint8))
    g = t.cuda()
    x, bias = _x(2, 3, 200).cuda(), _x(300, seed=3).cuda()
    exact = _oracle(x.cpu(), t, bias.cpu(), out_dtype=torch.float64)
    torch.testing.assert_close(F.linear(x, g, bias).cpu().double(), exact, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close((x @ g.t()).cpu().double(), _oracle(x.cpu(), t, out_dtype=torch.float64),
                               rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(g.dequantize().cpu(), t.dequantize())


def test_weight_requiring_grad_warns_once_that_it_is_frozen(monkeypatch):
    from blockwise_fp8 import tensor as tensor_module

    monkeypatch.setattr(tensor_module, "_FROZEN_WARNED", [False])
    p = torch.nn.Parameter(BlockwiseFP8Tensor.from_hp(_weight()))  # requires_grad=True
    x = _x(3, 200, dtype=torch.float32).requires_grad_()
    with pytest.warns(UserWarning, match="frozen"):
        out = F.linear(x, p)
    out.sum().backward()
    assert p.grad is None and x.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.linear(x, p)  # once only
        with torch.no_grad():
            F.linear(x, p)


@pytest.mark.parametrize("backend", ["triton", "cublas"])
def test_gemm_backend_does_not_decide_where_the_weight_is_quantized(backend, monkeypatch):
    """A CPU weight with a GPU-only GEMM backend (to be moved to CUDA later) still quantizes, to
    the reference's bits; the backend is checked when a linear runs, with a clear error."""
    from blockwise_fp8 import ops

    monkeypatch.setattr(ops, "_interpreting", lambda: False)
    w = _weight()
    t = BlockwiseFP8Tensor.from_hp(w, backend=backend)
    q, s = reference.quantize(w, (128, 128), torch.float8_e4m3fn)
    assert torch.equal(t.qdata.view(torch.uint8), q.view(torch.uint8)) and torch.equal(t.scale, s)
    assert torch.equal(t.dequantize(torch.float32), reference.dequantize(q, s, (128, 128), torch.float32))
    with pytest.raises(ops.BackendUnavailableError, match=f"backend='{backend}'"):
        F.linear(torch.randn(2, 200, dtype=torch.bfloat16), t)
