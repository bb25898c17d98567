"""Eager linear calls replayed from recorded launches (blockwise_fp8/replay.py): same bits as the
full path, and never where the recording could not stand for the call."""

from __future__ import annotations

import copy

import pytest
import torch

import blockwise_fp8 as bf
from blockwise_fp8 import ops, reference, replay
from blockwise_fp8.kernels import launch as L
from blockwise_fp8.kernels import quant

from .conftest import KERNEL_DEVICE
from .helpers import gemm_accumulation_rel

# On CPU the interpreter runs backend "triton"; on CUDA "auto" takes the paths users get (the fused
# M = 1 gemv after a first two-step call, cuBLAS where the table says, which is never replayed).
BACKEND_CASES = ["triton"] if KERNEL_DEVICE == "cpu" else ["triton", "auto"]


def _weight(N, K, dtype=torch.float8_e4m3fn, seed=0):
    torch.manual_seed(seed)
    w_q, w_s = bf.quantize_weight(torch.randn(N, K), dtype=dtype, backend="reference")
    return w_q.to(KERNEL_DEVICE), w_s.to(KERNEL_DEVICE)


def _key(x, w_q, w_s, bias=None, backend="triton", activation_dtype=torch.float8_e4m3fn, out_dtype=None):
    return ops._eager_key(x, w_q, w_s, bias, activation_dtype, out_dtype, backend)


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


class _CountFullCalls:
    """Counts the calls that run ops._linear, the full path (a replay does not)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = ops._linear

        def counted(*args):
            self.n += 1
            return real(*args)

        monkeypatch.setattr(ops, "_linear", counted)


@pytest.mark.parametrize("backend", BACKEND_CASES)
@pytest.mark.parametrize("lead, M, N, K, with_bias, out_dtype", [
    ((), 1, 256, 256, False, torch.bfloat16),
    ((2,), 3, 200, 384, True, torch.float32),
    ((), 16, 256, 512, False, torch.bfloat16),
    ((), 67, 256, 256, True, torch.bfloat16),
    ((2,), 100, 384, 256, False, torch.float16),
])
def test_replayed_calls_give_the_full_paths_bits(backend, lead, M, N, K, with_bias, out_dtype, monkeypatch):
    w_q, w_s = _weight(N, K)
    bias = torch.randn(N, dtype=torch.bfloat16, device=KERNEL_DEVICE) if with_bias else None
    xs = [torch.randn(*lead, M, K, dtype=torch.bfloat16, device=KERNEL_DEVICE) * 4.0 ** i for i in range(4)]
    full = _CountFullCalls(monkeypatch)
    with torch.no_grad():
        outs = [bf.linear(x, w_q, w_s, bias, out_dtype=out_dtype, backend=backend) for x in xs]
    key = _key(xs[0], w_q, w_s, bias, backend, out_dtype=out_dtype)
    entry = replay._PLANS.get(key)
    if type(entry) is not replay.Plan:
        # where "auto" takes cuBLAS (a torch op): never replayed, and given up on
        rows = M * (lead[0] if lead else 1)
        assert backend == "auto" and entry is replay._NEVER
        assert ops._gemm_backend_for_call("auto", rows, K, torch.float8_e4m3fn, w_q, out_dtype) == "cublas"
        assert full.n == len(xs)
        return
    assert full.n <= 3  # the first call (unrecorded), then two recordings that agree
    monkeypatch.setattr(ops, "REPLAY_EAGER_CALLS", False)
    with torch.no_grad():
        again = [bf.linear(x, w_q, w_s, bias, out_dtype=out_dtype, backend=backend) for x in xs]
    for out, ref_out, x in zip(outs, again, xs):
        assert out.shape == (*lead, M, N) and out.dtype == out_dtype
        assert torch.equal(out, ref_out)
    # and right, against the float64 oracle on the quantized operands (the last, replayed call)
    x2 = xs[-1].reshape(-1, K)
    a_q, a_s = reference.quantize(x2.cpu(), (1, 128), torch.float8_e4m3fn)
    exact = reference.gemm(a_q, a_s, w_q.cpu(), w_s.cpu(), block_size=128, out_dtype=torch.float64,
                           bias=None if bias is None else bias.cpu())
    scale = (reference.dequantize(a_q, a_s, (1, 128), torch.float64).abs()
             @ reference.dequantize(w_q.cpu(), w_s.cpu(), (128, 128), torch.float64).abs().T)
    tol = scale * gemm_accumulation_rel(backend, KERNEL_DEVICE, K) + exact.abs() * torch.finfo(out_dtype).eps + 1e-30
    assert ((outs[-1].reshape(-1, N).cpu().double() - exact).abs() <= tol).all()


def test_host_made_descriptors_are_rebuilt_on_the_new_tensors(monkeypatch):
    from blockwise_fp8.kernels import gemm as G

    # the skinny kernel takes descriptors made on the host where a stream captures (and, once, on
    # a first eager call); made to take them on every call here
    monkeypatch.setattr(G, "_capturing", lambda a: True)
    w_q, w_s = _weight(256, 512)
    xs = [torch.randn(16, 512, dtype=torch.bfloat16, device=KERNEL_DEVICE) * (i + 1) for i in range(4)]
    with torch.no_grad():
        outs = [bf.linear(x, w_q, w_s, backend="triton") for x in xs]
    plan = replay._PLANS[_key(xs[0], w_q, w_s)]
    assert type(plan) is replay.Plan and any(step[0] == "launch" and step[5] for step in plan.steps)
    monkeypatch.setattr(ops, "REPLAY_EAGER_CALLS", False)
    with torch.no_grad():
        for x, out in zip(xs, outs):
            assert torch.equal(out, bf.linear(x, w_q, w_s, backend="triton"))


def test_a_plan_waits_for_two_recordings_that_agree():
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    calls = []

    def second_call_differs(x):
        calls.append(1)
        block = 64 if len(calls) == 2 else 128  # the first recorded call launches something else
        return quant.quantize(x, 1, block, torch.float8_e4m3fn)[0]

    key = ("test", 1)
    replay.call(key, second_call_differs, (x,), ())
    assert replay._PLANS[key] is replay._SEEN  # a first call runs plainly, unrecorded
    for _ in range(2):
        replay.call(key, second_call_differs, (x,), ())
    assert type(replay._PLANS[key]) is tuple  # two recordings, not the same: on trial still
    replay.call(key, second_call_differs, (x,), ())
    assert type(replay._PLANS[key]) is replay.Plan
    n = len(calls)
    q = replay.call(key, second_call_differs, (x * 2,), ())
    assert len(calls) == n  # replayed, not called
    assert torch.equal(q.view(torch.uint8), quant.quantize(x * 2, 1, 128, torch.float8_e4m3fn)[0].view(torch.uint8))


def _quantize_then(work):
    """A call that quantizes its input and hands (q, scale) to ``work``; and the list of its calls."""
    calls = []

    def fn(x):
        calls.append(1)
        return work(*quant.quantize(x, 1, 128, torch.float8_e4m3fn))

    return fn, calls


@pytest.mark.parametrize("torch_work", [
    lambda q, s: q.float() * 2,  # ops on the kernel's output
    lambda q, s: torch.zeros(q.shape, device=q.device) + s.sum(),  # a factory, a reduction
    lambda q, s: q.clone(),  # a copy
    lambda q, s: s.mul_(2),  # in place, on what the call allocated and returns
    lambda q, s: q.view(torch.uint8)[:, 1:3],  # a view that changes the dtype (an op), then a view
    lambda q, s: torch.cat([s, s * 0.5]).t(),  # a list of tensors
])
def test_torch_ops_are_replayed_in_order(torch_work):
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    fn, calls = _quantize_then(torch_work)

    key = ("test", 2)
    for i in range(3):
        replay.call(key, fn, (x + i,), ())
    assert type(replay._PLANS[key]) is replay.Plan
    for i in range(3, 6):
        n = len(calls)
        out = replay.call(key, fn, (x * i,), ())
        assert len(calls) == n  # replayed
        expected = fn(x * i)
        assert out.dtype == expected.dtype and out.shape == expected.shape and out.stride() == expected.stride()
        assert torch.equal(_bits(out), _bits(expected))


@pytest.mark.parametrize("reads", [
    lambda q, s: q.float() * (2 if s.max().item() > 1 else 3),  # a value steers the Python
    lambda q, s: q.float() * (2 if torch.equal(s, s) else 3),
])
def test_calls_that_read_tensor_values_are_never_replayed(reads):
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    fn, calls = _quantize_then(reads)

    key = ("test", 3)
    for i in range(replay.MAX_TRIES + 2):
        out, expected = replay.call(key, fn, (x + i,), ()), fn(x + i)
        assert torch.equal(out, expected)
    assert replay._PLANS[key] is replay._NEVER
    assert len(calls) == 2 * (replay.MAX_TRIES + 2)


def test_inputs_sharing_storage_are_not_replayed():
    buf = torch.randn(2, 4, 256, dtype=torch.bfloat16, device=KERNEL_DEVICE)

    def fn(x, y):
        return quant.quantize(y, 1, 128, torch.float8_e4m3fn)[0]  # y is a view of x's storage

    key = ("test", 4)
    for i in range(replay.MAX_TRIES + 1):  # (the first call is not recorded)
        replay.call(key, fn, (buf[0], buf[1]), ())
    assert replay._PLANS[key] is replay._NEVER


def test_persistent_buffers_are_kept_and_other_outside_tensors_refused():
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    outside = torch.empty(4, 256, dtype=torch.float8_e4m3fn, device=KERNEL_DEVICE)
    scale = torch.empty(4, 2, dtype=torch.float32, device=KERNEL_DEVICE)

    def into_outside(x):  # writes into tensors the call did not allocate nor take
        grid, meta = quant._quantize_launch(4, 256, 1, 128, torch.float8_e4m3fn, quant.ACT_TILING, False, False,
                                            quant.hardware_fp8_cast(x.device))
        L.launch(quant.quantize_kernel, grid, (x, outside, scale, 4, 4, 256, 256, 1, 256, 1, 2, 1), meta)
        return torch.empty(1, device=x.device)

    key = ("test", 5)
    for i in range(replay.MAX_TRIES + 1):  # (the first call is not recorded)
        replay.call(key, into_outside, (x + i,), ())
    assert replay._PLANS[key] is replay._NEVER
    L.persistent(outside)
    L.persistent(scale)
    key = ("test", 6)
    for i in range(3):
        replay.call(key, into_outside, (x + i,), ())
    assert type(replay._PLANS[key]) is replay.Plan
    replay.call(key, into_outside, (x * 3,), ())
    expected = quant.quantize(x * 3, 1, 128, torch.float8_e4m3fn)[0]
    assert torch.equal(outside.view(torch.uint8), expected.view(torch.uint8))


def test_no_key_where_a_call_must_run_in_full(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    w_q, w_s = _weight(256, 256)
    x = torch.randn(3, 256, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    assert _key(x, w_q, w_s) is not None
    assert _key(x, w_q, w_s, backend="reference") is None
    assert _key(x, w_q, w_s, backend=["triton"]) is None  # a wrong type is for the checks to report
    assert _key(x, w_q, w_s, activation_dtype="e4m3") is None
    assert _key(x, bf.BlockwiseFP8Tensor.from_hp(torch.randn(256, 256, device=KERNEL_DEVICE)), w_s) is None
    with torch.enable_grad():
        assert _key(x.clone().requires_grad_(), w_q, w_s) is None
        assert _key(x, w_q, w_s) is not None  # grad mode alone changes nothing
    with TorchDispatchMode():
        assert _key(x, w_q, w_s) is None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert _key(x, w_q, w_s) is None
    if KERNEL_DEVICE == "cpu":
        assert _key(x, w_q, w_s, backend="auto") is None  # the reference on CPU
    # what the kernels specialize on is in the key: 16-byte alignment, strides
    wide = torch.randn(3, 260, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    assert _key(wide[:, 4:], w_q, w_s) != _key(wide[:, :256], w_q, w_s)  # 8 bytes apart
    assert _key(x.t().contiguous().t(), w_q, w_s) != _key(x, w_q, w_s)
    monkeypatch.setattr(ops, "REPLAY_EAGER_CALLS", False)
    full = _CountFullCalls(monkeypatch)
    with torch.no_grad():
        for _ in range(4):
            bf.linear(x, w_q, w_s, backend="triton")
    assert full.n == 4 and not replay._PLANS


def test_misaligned_and_strided_inputs_replay_their_own_plans(monkeypatch):
    w_q, w_s = _weight(256, 256)
    wide = torch.randn(3, 260, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    xs = [wide[:, 4:], wide[:, :256], wide[:, :256].t().contiguous().t()]
    with torch.no_grad():
        for _ in range(3):
            outs = [bf.linear(x, w_q, w_s, backend="triton") for x in xs]
    assert sum(type(e) is replay.Plan for e in replay._PLANS.values()) == 3
    monkeypatch.setattr(ops, "REPLAY_EAGER_CALLS", False)
    with torch.no_grad():
        for x, out in zip(xs, outs):
            assert torch.equal(out, bf.linear(x, w_q, w_s, backend="triton"))


def test_a_launch_hook_sends_calls_back_to_the_full_path(monkeypatch):
    import triton

    w_q, w_s = _weight(256, 256)
    x = torch.randn(3, 256, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    with torch.no_grad():
        for _ in range(3):
            bf.linear(x, w_q, w_s, backend="triton")
        assert type(replay._PLANS[_key(x, w_q, w_s)]) is replay.Plan
        full = _CountFullCalls(monkeypatch)
        bf.linear(x, w_q, w_s, backend="triton")
        assert full.n == 0
        monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda *a: None)
        bf.linear(x, w_q, w_s, backend="triton")
        assert full.n == 1


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_capture_runs_the_full_path():
    w_q, w_s = _weight(1024, 1024)
    x = torch.randn(16, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            eager = bf.linear(x, w_q, w_s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            assert _key(x, w_q, w_s, backend="auto") is None
            captured = bf.linear(x, w_q, w_s)
        graph.replay()
    assert torch.equal(captured, eager)


def test_quantized_modules_replay_with_the_full_paths_bits(monkeypatch):
    """The user's path: a quantize_'d model (subclass weights) and its unwrap_for_compile form
    (BlockwiseFP8Linear), called eagerly again and again, give the bits of calls run in full."""
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.GELU(), torch.nn.Linear(384, 256))
    model = model.to(KERNEL_DEVICE, torch.bfloat16)
    quantize_(model, bf.BlockwiseFP8Config(backend="triton", skip=()))
    assert isinstance(model[0].weight, bf.BlockwiseFP8Tensor)
    plain = bf.unwrap_for_compile(copy.deepcopy(model))
    assert isinstance(plain[2], bf.BlockwiseFP8Linear)
    xs = [torch.randn(2, 5, 256, dtype=torch.bfloat16, device=KERNEL_DEVICE) * (i + 1) for i in range(5)]
    full = _CountFullCalls(monkeypatch)
    with torch.no_grad():
        got = {name: [m(x) for x in xs] for name, m in (("subclass", model), ("plain", plain))}
    assert full.n <= 2 * 2 * 3  # two models, two Linears, three calls in full before replay
    monkeypatch.setattr(ops, "REPLAY_EAGER_CALLS", False)
    with torch.no_grad():
        for name, m in (("subclass", model), ("plain", plain)):
            for x, out in zip(xs, got[name]):
                assert torch.equal(out, m(x))
