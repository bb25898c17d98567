"""The public functional API (ops.py): what it accepts, what it refuses and how, output shapes,
and gemm / linear against the float64 product of the dequantized operands."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import blockwise_fp8 as bf
from blockwise_fp8 import ops, reference

from .conftest import KERNEL_DEVICE
from .helpers import gemm_accumulation_rel

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
BACKENDS = ["reference", "triton"]


def _device(backend):
    return KERNEL_DEVICE if backend == "triton" else "cpu"


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("fn", [bf.quantize_activation, bf.quantize_weight])
def test_quantize_refuses_non_floating_input(fn):
    with pytest.raises(TypeError, match=r"x|w.*must be one of .*bfloat16.*got torch.int32"):
        fn(torch.ones(4, 128, dtype=torch.int32))
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        fn([[1.0] * 128])


@pytest.mark.parametrize("fn", [bf.quantize_activation, bf.quantize_weight])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.bfloat16, torch.int8])
def test_quantize_refuses_unsupported_fp8_dtype(fn, dtype):
    with pytest.raises(ValueError, match=r"supported FP8 dtypes torch.float8_e4m3fn, torch.float8_e5m2, got"):
        fn(torch.randn(4, 128), dtype)


@pytest.mark.parametrize("fn", [bf.quantize_activation, bf.quantize_weight])
@pytest.mark.parametrize("block_size", [0, 100, 256, -128])
def test_quantize_refuses_unsupported_block_size(fn, block_size):
    with pytest.raises(ValueError, match=rf"block_size must be one of \(32, 64, 128\), got {block_size}"):
        fn(torch.randn(4, 128), block_size=block_size)
    with pytest.raises(TypeError, match="block_size must be an int"):
        fn(torch.randn(4, 128), block_size=128.0)


def test_quantize_weight_needs_2d():
    with pytest.raises(ValueError, match=r"w must be 2-D \(N, K\), got shape \(2, 3, 128\)"):
        bf.quantize_weight(torch.randn(2, 3, 128))
    with pytest.raises(ValueError, match="at least one dimension"):
        bf.quantize_activation(torch.tensor(1.0))


def test_dequantize_refusals():
    q, s = bf.quantize_activation(torch.randn(4, 300))
    with pytest.raises(ValueError, match=r"scale has shape \(4, 2\), but q of shape \(4, 300\) needs \(4, 3\)"):
        bf.dequantize(q, s[:, :2], (1, 128))
    with pytest.raises(TypeError, match="scale must be float32, got torch.float16"):
        bf.dequantize(q, s.half(), (1, 128))
    with pytest.raises(TypeError, match=r"q must be an FP8 tensor .* got torch.float32"):
        bf.dequantize(q.float(), s, (1, 128))
    with pytest.raises(ValueError, match=r"q has unsupported FP8 dtype torch.float8_e4m3fnuz"):
        bf.dequantize(q.float().to(torch.float8_e4m3fnuz), s, (1, 128))
    with pytest.raises(TypeError, match=r"block_size must be a pair"):
        bf.dequantize(q, s, 128)
    with pytest.raises(ValueError, match=r"block_size rows must be 1 or one of"):
        bf.dequantize(q, s, (3, 128))
    with pytest.raises(ValueError, match=r"dtype must be one of .* got torch.float64"):
        bf.dequantize(q, s, (1, 128), torch.float64)
    with pytest.raises(ValueError, match=r"with block_size \(128, 128\) q must be 2-D"):
        bf.dequantize(q.reshape(2, 2, 300), s.reshape(2, 2, 3), (128, 128))


def test_gemm_refusals():
    a_q, a_s = bf.quantize_activation(torch.randn(5, 300))
    w_q, w_s = bf.quantize_weight(torch.randn(200, 300))
    with pytest.raises(ValueError, match=r"a_q of shape \(5, 300\) and w_q disagree on K: w_q has shape \(200, 256\)"):
        bf.gemm(a_q, a_s, w_q[:, :256], w_s[:, :2])
    with pytest.raises(ValueError, match=r"w_scale has shape \(2, 2\), but w_q of shape \(200, 300\) needs \(2, 3\)"):
        bf.gemm(a_q, a_s, w_q, w_s[:, :2])
    with pytest.raises(ValueError, match=r"a_scale has shape \(5, 2\), but a_q of shape \(5, 300\) needs \(5, 3\)"):
        bf.gemm(a_q, a_s[:, :2], w_q, w_s)
    with pytest.raises(ValueError, match=r"bias must have shape \(200,\)"):
        bf.gemm(a_q, a_s, w_q, w_s, bias=torch.randn(300))
    with pytest.raises(TypeError, match="bias must be a floating-point tensor, got torch.int64"):
        bf.gemm(a_q, a_s, w_q, w_s, bias=torch.ones(200, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"w_q must be 2-D"):
        bf.gemm(a_q, a_s, w_q[None], w_s)
    with pytest.raises(ValueError, match=r"out_dtype must be one of"):
        bf.gemm(a_q, a_s, w_q, w_s, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="a_q must be an FP8 tensor"):
        bf.gemm(a_q.float(), a_s, w_q, w_s)
    with pytest.raises(ValueError, match="backend must be one of"):
        bf.gemm(a_q, a_s, w_q, w_s, backend="cuda")
    with pytest.raises(ValueError, match="x of shape \\(5, 256\\) and w_q disagree on K"):
        bf.linear(torch.randn(5, 256), w_q, w_s)
    with pytest.raises(ValueError, match="activation_dtype must be one of the supported FP8 dtypes"):
        bf.linear(torch.randn(5, 300), w_q, w_s, activation_dtype=torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices_refused():
    a_q, a_s = bf.quantize_activation(torch.randn(5, 300))
    w_q, w_s = bf.quantize_weight(torch.randn(200, 300, device="cuda"))
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        bf.gemm(a_q, a_s, w_q, w_s)


def test_triton_backend_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setattr(ops, "_interpreting", lambda: False)
    with pytest.raises(bf.BackendUnavailableError, match="backend='triton' needs CUDA tensors, got tensors on cpu"):
        bf.quantize_activation(torch.randn(2, 128), backend="triton")


def test_auto_is_reference_on_cpu():
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"


def test_no_gradient_is_refused_not_invented():
    # The ops have no derivative; the dispatcher's autograd fallback would return a wrong one
    # with a mere warning. The forward runs; backward names the op and says what to use.
    w = torch.randn(256, 256)
    w_q, w_s = bf.quantize_weight(w)
    x = torch.randn(4, 256, requires_grad=True)
    a_q, a_s = bf.quantize_activation(x.detach())
    bias = torch.randn(256, requires_grad=True)
    calls = {
        "linear": lambda: bf.linear(x, w_q, w_s),
        "gemm": lambda: bf.gemm(a_q, a_s, w_q, w_s, bias=bias),
        "quantize": lambda: bf.quantize_activation(x)[1],
    }
    for name, call in calls.items():
        out = call()
        assert out.requires_grad
        with pytest.raises(NotImplementedError, match=f"blockwise_fp8::{name} has no gradient formula"):
            out.float().sum().backward()
    with torch.no_grad():
        assert not bf.linear(x, w_q, w_s).requires_grad


# ----------------------------------------------------------------------------- eager calls and the dispatcher


def _operands(M=4, K=256, N=256):
    torch.manual_seed(0)
    w_q, w_s = bf.quantize_weight(torch.randn(N, K))
    return torch.randn(M, K, dtype=torch.bfloat16), w_q, w_s


def test_direct_eager_calls_give_the_dispatchers_results(monkeypatch):
    x, w_q, w_s = _operands()
    w_q = torch.nn.Parameter(w_q, requires_grad=False)  # as BlockwiseFP8Linear holds it
    a_q, a_s = bf.quantize_activation(x)
    calls = [lambda: bf.linear(x, w_q, w_s), lambda: bf.gemm(a_q, a_s, w_q, w_s),
             lambda: bf.quantize_activation(x), lambda: bf.dequantize(a_q, a_s, (1, 128))]
    for call in calls:
        direct = call()
        monkeypatch.setattr(ops, "DIRECT_EAGER_CALLS", False)
        through = call()
        monkeypatch.setattr(ops, "DIRECT_EAGER_CALLS", True)
        for d, t in zip(direct if isinstance(direct, tuple) else (direct,), through if isinstance(through, tuple) else (through,)):
            assert d.dtype == t.dtype and torch.equal(d.view(torch.uint8), t.view(torch.uint8))


def test_direct_calls_only_where_nothing_intercepts_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    x, w_q, w_s = _operands()
    args = (x, w_q, w_s, None, torch.float8_e4m3fn, torch.bfloat16, "reference")
    assert ops._nothing_intercepts(args)
    assert ops._nothing_intercepts((x, torch.nn.Parameter(w_q, requires_grad=False), [w_s, None], 3, "auto"))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not ops._nothing_intercepts((fake,) + args[1:])
    assert not ops._nothing_intercepts((x, [w_q, fake]))
    assert not ops._nothing_intercepts((bf.BlockwiseFP8Tensor.from_hp(torch.randn(128, 128)),))
    assert not ops._nothing_intercepts((x, object()))  # an argument of a kind nobody foresaw
    with TorchDispatchMode():
        assert not ops._nothing_intercepts(args)
    with TorchFunctionMode():
        assert not ops._nothing_intercepts(args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert not ops._nothing_intercepts(args)
    seen = []
    torch.func.vmap(lambda row: seen.append(ops._nothing_intercepts((row,))) or row)(x)
    torch.jit.trace(lambda t: seen.append(ops._nothing_intercepts((t,))) or t * 2, (x,), check_trace=False)
    assert seen == [False, False]
    assert ops._nothing_intercepts(args)  # and back once they are gone


def test_modes_and_the_profiler_still_see_eager_calls():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w_q, w_s = _operands()
    with Log() as log:
        bf.linear(x, w_q, w_s)
    assert "blockwise_fp8.linear.default" in log.ops
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        bf.linear(x, w_q, w_s)
    assert any(e.key == "blockwise_fp8::linear" for e in prof.key_averages())


# ----------------------------------------------------------------------------- shapes and values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(), (0,), (3,), (2, 3), (2, 1, 3)])
def test_linear_and_gemm_keep_leading_shape(backend, lead):
    dev = _device(backend)
    g = torch.Generator().manual_seed(len(lead))
    x = torch.randn(*lead, 200, generator=g).to(dev, torch.bfloat16)
    w_q, w_s = bf.quantize_weight(torch.randn(129, 200, generator=g).to(dev), backend=backend)
    y = bf.linear(x, w_q, w_s, backend=backend)
    assert y.shape == (*lead, 129) and y.dtype == torch.bfloat16
    a_q, a_s = bf.quantize_activation(x, backend=backend)
    out = bf.gemm(a_q, a_s, w_q, w_s, out_dtype=torch.float32, backend=backend)
    assert out.shape == (*lead, 129)
    ref = reference.gemm(a_q.cpu(), a_s.cpu(), w_q.cpu(), w_s.cpu(), out_dtype=torch.float64)
    a = a_q.cpu().double() * a_s.cpu().double().repeat_interleave(128, -1)[..., :200]
    wd = w_q.cpu().double() * w_s.cpu().double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:129, :200]
    acc = gemm_accumulation_rel(backend, dev, 200) * (a.abs() @ wd.abs().T)
    assert ((out.cpu().double() - ref).abs() <= 2.0**-24 * ref.abs() + acc).all()
    # linear is quantize + gemm: the same numbers, rounded once more to bf16
    assert ((y.cpu().double() - ref).abs() <= 2.0**-8 * ref.abs() + acc).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_m_major", [False, True])
@pytest.mark.parametrize("M, K", [(1, 128), (3, 200), (67, 384)])
def test_quantize_input_op_is_quantize_activation_with_chosen_scale_layout(backend, scale_m_major, M, K):
    # The node compiled graphs use for linear's activation (shared by Linears of one input).
    dev = _device(backend)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dev, torch.bfloat16)
    q, s = torch.ops.blockwise_fp8.quantize_input(x, torch.float8_e4m3fn, scale_m_major, backend)
    q_ref, s_ref = reference.quantize(x.cpu(), (1, 128), torch.float8_e4m3fn)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)
    assert s.stride() == ((1, M) if scale_m_major else (s.shape[1], 1))
    torch.library.opcheck(
        torch.ops.blockwise_fp8.quantize_input.default, (x, torch.float8_e4m3fn, scale_m_major, backend),
        test_utils=("test_schema", "test_faketensor"),
    )


# Half an ulp of each output format, relative; float16 adds half its subnormal spacing.
OUT_TOL = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    M=st.integers(0, 20),
    N=st.integers(1, 200),
    K=st.integers(1, 300),
    a_dtype=st.sampled_from(FP8),
    w_dtype=st.sampled_from(FP8),
    out_dtype=st.sampled_from(list(OUT_TOL)),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_gemm_matches_float64(backend, M, N, K, a_dtype, w_dtype, out_dtype, with_bias, seed):
    dev = _device(backend)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-8, 9, (M, 1), generator=g).float())
    w = torch.randn(N, K, generator=g) / K**0.5
    bias = torch.randn(N, generator=g) if with_bias else None
    a_q, a_s = bf.quantize_activation(x.to(dev), a_dtype, backend=backend)
    w_q, w_s = bf.quantize_weight(w.to(dev), w_dtype, backend=backend)
    out = bf.gemm(a_q, a_s, w_q, w_s, out_dtype=out_dtype, bias=None if bias is None else bias.to(dev), backend=backend)
    assert out.dtype == out_dtype and out.shape == (M, N)
    # The oracle: float64 product of the dequantized operands, computed here, not by the package.
    a = a_q.cpu().double() * a_s.cpu().double().repeat_interleave(128, 1)[:, :K]
    wd = w_q.cpu().double() * w_s.cpu().double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:N, :K]
    exact = a @ wd.T + (0 if bias is None else bias.double())
    # One rounding to out_dtype, plus the accumulation error of the backend.
    magnitude = a.abs() @ wd.abs().T + (0 if bias is None else bias.double().abs())
    acc = gemm_accumulation_rel(backend, dev, K) * magnitude
    bound = OUT_TOL[out_dtype] * exact.abs() + acc + (2.0**-25 if out_dtype == torch.float16 else 0)
    assert ((out.cpu().double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("M", [1, 2])
def test_linear_op_fuses_the_quantization_at_m1(M, monkeypatch):
    """The linear op (eager calls) under "auto" quantizes inside the gemv kernel at M <= FUSED_QUANT_MAX_M
    (one launch) from the second call of a shape on, and in a separate kernel above and in the
    first call (which loads the two kernels a CUDA-graph capture replays); all give the two-step
    path's bits. (On CPU the op body runs the kernels through the interpreter.)"""
    from blockwise_fp8.kernels import gemm as G

    fused = []
    real = G.linear_fused
    monkeypatch.setattr(G, "linear_fused", lambda *a, **k: fused.append(1) or real(*a, **k))
    monkeypatch.setattr(ops, "_TWO_STEP_LOADED", set())
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 300, generator=g).to(torch.bfloat16).to(KERNEL_DEVICE)
    w_q, w_s = (t.to(KERNEL_DEVICE) for t in reference.quantize(torch.randn(200, 300, generator=g), (128, 128)))
    e4m3 = torch.float8_e4m3fn
    two_step = ops.gemm(*ops.quantize_activation(x, backend="triton"), w_q, w_s, backend="triton")
    for call in range(2):
        out = ops._linear_op.op(x, w_q, w_s, None, e4m3, torch.bfloat16, "auto")
        assert len(fused) == (call if M <= ops.FUSED_QUANT_MAX_M else 0)
        assert torch.equal(out.view(torch.int16), two_step.view(torch.int16))
    # another output dtype is another pair of kernels: its first call is two-step again
    ops._linear_op.op(x, w_q, w_s, None, e4m3, torch.float16, "auto")
    assert len(fused) == (1 if M <= ops.FUSED_QUANT_MAX_M else 0)


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="CUDA-graph capture needs a CUDA device")
@pytest.mark.parametrize("warmups", [1, 3])
def test_capture_after_eager_warmup_meets_the_same_kernels(warmups, monkeypatch):
    """The usual recipe for capturing eager code -- warm up on a side stream, then capture -- works
    at M = 1: the capture takes the two launches (faster replayed than the fused kernel) that the
    first warm-up call loaded (Triton cannot load a kernel while a stream is capturing), later
    warm-up calls fuse, and the replayed graph gives the eager result's bits."""
    from blockwise_fp8.kernels import gemm as G

    fused = []
    real = G.linear_fused
    monkeypatch.setattr(G, "linear_fused", lambda *a, **k: fused.append(1) or real(*a, **k))
    monkeypatch.setattr(ops, "_TWO_STEP_LOADED", set())
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    w_q, w_s = ops.quantize_weight(torch.randn(384, 512, device="cuda"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmups):
            eager = ops.linear(x, w_q, w_s)
    torch.cuda.current_stream().wait_stream(s)
    assert len(fused) == warmups - 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.linear(x, w_q, w_s)
    assert len(fused) == warmups - 1
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.view(torch.int16), eager.view(torch.int16))
