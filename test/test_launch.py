"""kernels.launch: replaying a compiled kernel's launcher without Triton's per-call binding.

The replay rule is tested here on CPU with a stand-in for a jitted kernel that compiles one
"kernel" per specialization the way Triton does (int values, tensor dtype and 16-byte alignment,
keywords): a replayed launch must reach the kernel compiled for the same specialization, with the
arguments in parameter order. On the GPU the real kernels are launched twice each and checked
against the reference, and an unaligned activation after an aligned one must compile anew.
"""

from __future__ import annotations

import pytest
import torch
import triton

from blockwise_fp8 import reference
from blockwise_fp8.kernels import gemm as G
from blockwise_fp8.kernels import launch as L
from blockwise_fp8.kernels import quant as Q

from .conftest import KERNEL_DEVICE
from .test_gemm import _check


class FakeCompiled:
    """What Triton's CompiledKernel offers the replay: run, function, packed_metadata."""

    def __init__(self, spec):
        self.spec = spec
        self.function = object()
        self.packed_metadata = ("packed", spec)
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class FakeKernel:
    """Parameters: x (pointer), n (int), then the constexprs BLOCK (required) and FLAG (default 7)."""

    def __init__(self):
        self.compiled = {}
        self.slow_launches = []
        self.device_caches = {0: (None, None, None, None, self._binder)}

    @staticmethod
    def _binder(x, n, BLOCK, FLAG=7, **options):
        return {"x": x, "n": n, "BLOCK": BLOCK, "FLAG": FLAG}, None, options

    @staticmethod
    def _specialization(x, n, BLOCK, FLAG=7, **options):
        return (x.dtype, x.data_ptr() % 16 == 0, n == 1, n % 16 == 0, BLOCK, FLAG, tuple(sorted(options.items())))

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            spec = self._specialization(*args, **kwargs)
            compiled = self.compiled.setdefault(spec, FakeCompiled(spec))
            self.slow_launches.append((grid, spec))
            return compiled

        return run


@pytest.fixture
def replaying(monkeypatch):
    """launch() as on a GPU: not interpreting, device 0, stream 1234, an empty table."""
    monkeypatch.setattr(L, "INTERPRETING", False)
    monkeypatch.setattr(L, "_current_device", lambda: 0)
    monkeypatch.setattr(L, "_current_stream", lambda device: 1234)
    monkeypatch.setattr(L, "_COMPILED", {})


def test_second_launch_replays_the_compiled_kernel(replaying):
    k = FakeKernel()
    x = torch.zeros(64, dtype=torch.float32)
    meta = (("BLOCK", 32), ("num_warps", 4))
    L.launch(k, (3,), (x, 64), meta)
    L.launch(k, (5, 2), (x, 64), meta)
    assert len(k.slow_launches) == 1
    (compiled,) = k.compiled.values()
    (replayed,) = compiled.launches
    # grid padded to 3-D, the current stream, the kernel's handles, no launch hooks, then every
    # parameter in order: the positional arguments and the constexprs with defaults applied
    assert replayed[:4] == (5, 2, 1, 1234)
    assert replayed[4] is compiled.function and replayed[5] is compiled.packed_metadata
    assert replayed[6:9] == (None, None, None)
    assert replayed[9] is x and replayed[10:] == (64, 32, 7)


@pytest.mark.parametrize("change", ["int value", "int divisibility", "alignment", "dtype", "keyword", "option"])
def test_a_different_specialization_compiles_again(replaying, change):
    k = FakeKernel()
    buf = torch.zeros(80, dtype=torch.float32)
    x, n, meta = buf[:64], 64, (("BLOCK", 32), ("num_warps", 4))
    L.launch(k, (1,), (x, n), meta)
    if change == "int value":
        n = 1
    elif change == "int divisibility":
        n = 65
    elif change == "alignment":
        x = buf[1:65]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        x = torch.zeros(64, dtype=torch.float16)
    elif change == "keyword":
        meta = (("BLOCK", 64), ("num_warps", 4))
    else:
        meta = (("BLOCK", 32), ("num_warps", 8))
    L.launch(k, (1,), (x, n), meta)
    assert len(k.slow_launches) == 2 and len(k.compiled) == 2
    assert all(not c.launches for c in k.compiled.values())  # nothing replayed onto the wrong kernel
    L.launch(k, (1,), (x, n), meta)  # the new specialization replays in turn
    assert len(k.slow_launches) == 2
    assert k.compiled[k._specialization(x, n, **dict(meta + L.COMPILE_OPTIONS))].launches


def test_compiles_with_fp_fusion_on_whatever_the_default(replaying):
    """Every compile asks for FMA contraction (Triton 3.9 warns that 3.10 turns its default off;
    our kernels were tuned and timed with it on); the replay key stays the launch's own meta, so
    the next launch with that meta replays the kernel compiled with the option."""
    k = FakeKernel()
    x = torch.zeros(64)
    L.launch(k, (1,), (x, 64), (("BLOCK", 32), ("num_warps", 4)))
    ((_, spec),) = k.slow_launches
    assert ("enable_fp_fusion", True) in spec[-1] and ("num_warps", 4) in spec[-1]
    L.launch(k, (1,), (x, 64), (("BLOCK", 32), ("num_warps", 4)))
    assert len(k.slow_launches) == 1 and len(next(iter(k.compiled.values())).launches) == 1


def test_same_specialization_other_values_replays(replaying):
    """Two ints with the same specialization but different values are still different keys (the
    value is the key), so a replay never hands a kernel a size it was not launched with before."""
    k = FakeKernel()
    x = torch.zeros(64)
    L.launch(k, (1,), (x, 32), (("BLOCK", 32),))
    L.launch(k, (1,), (x, 48), (("BLOCK", 32),))
    assert len(k.slow_launches) == 2 and len(k.compiled) == 1
    L.launch(k, (1,), (x.clone(), 48), (("BLOCK", 32),))
    assert len(k.slow_launches) == 2
    (compiled,) = k.compiled.values()
    assert compiled.launches[0][10] == 48


def test_launch_hooks_keep_tritons_path(replaying):
    k = FakeKernel()
    x = torch.zeros(64)
    seen = []
    hook = seen.append
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(3):
            L.launch(k, (1,), (x, 64), (("BLOCK", 32),))
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert len(k.slow_launches) == 3
    L.launch(k, (1,), (x, 64), (("BLOCK", 32),))
    assert len(k.slow_launches) == 3  # hooks gone: replayed


def test_interpreter_always_takes_tritons_path(replaying, monkeypatch):
    monkeypatch.setattr(L, "INTERPRETING", True)
    k = FakeKernel()
    x = torch.zeros(64)
    for _ in range(3):
        L.launch(k, (1,), (x, 64), (("BLOCK", 32),))
    assert len(k.slow_launches) == 3 and not L._COMPILED


def test_table_starts_over_when_full(replaying, monkeypatch):
    monkeypatch.setattr(L, "_MAX_ENTRIES", 2)
    k = FakeKernel()
    x = torch.zeros(64)
    for n in (16, 32, 48):
        L.launch(k, (1,), (x, n), (("BLOCK", 32),))
    assert len(L._COMPILED) == 1
    L.launch(k, (1,), (x, 48), (("BLOCK", 32),))
    assert len(k.slow_launches) == 3  # the newest entry survived


def test_prefer_l1_is_set_once_per_compiled_kernel(replaying, monkeypatch):
    """A registered kernel's carveout is asked for when its compiled kernel first enters the table
    (once per compiled kernel, replays never); other kernels keep Triton's setting."""
    seen = []
    monkeypatch.setattr(L, "_set_prefer_l1", seen.append)
    monkeypatch.setattr(L, "_PREFER_L1", set())
    monkeypatch.setattr(L, "_L1_SET", set())
    wide, plain = FakeKernel(), FakeKernel()
    assert L.prefer_l1(wide) is wide
    x = torch.zeros(64)
    for n in (16, 16, 8, 32):  # 16 and 32: two table keys, one compiled kernel
        L.launch(wide, (1,), (x, n), (("BLOCK", 32),))
        L.launch(plain, (1,), (x, n), (("BLOCK", 32),))
    assert len(wide.compiled) == 2 and len(L._COMPILED) == 6
    assert seen == [c.function for c in wide.compiled.values()]


class FakeLibcuda:
    def __init__(self, cache_err=0, attr_err=0):
        self.calls = []
        self.errs = (cache_err, attr_err)

    def cuFuncSetCacheConfig(self, handle, config):
        self.calls.append(("cache", handle.value, config.value))
        return self.errs[0]

    def cuFuncSetAttribute(self, handle, attribute, value):
        self.calls.append(("attr", handle.value, attribute.value, value.value))
        return self.errs[1]


def test_set_prefer_l1_asks_for_the_smallest_carveout(monkeypatch):
    lib = FakeLibcuda()
    monkeypatch.setattr(L, "_LIBCUDA", [lib])
    L._set_prefer_l1(0x1234)
    # CU_FUNC_CACHE_PREFER_L1, then a 0 % CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
    assert lib.calls == [("cache", 0x1234, 2), ("attr", 0x1234, 9, 0)]


@pytest.mark.parametrize("errs", [(1, 0), (0, 1)])
def test_set_prefer_l1_warns_where_the_driver_refuses(monkeypatch, errs):
    monkeypatch.setattr(L, "_LIBCUDA", [FakeLibcuda(*errs)])
    with pytest.warns(RuntimeWarning, match="could not set the L1 carveout.*CUDA error 1"):
        L._set_prefer_l1(0x1234)


def test_set_prefer_l1_warns_without_libcuda(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(L, "_LIBCUDA", [])
    monkeypatch.setattr(L.ctypes, "CDLL", missing)
    with pytest.warns(RuntimeWarning, match="OSError: libcuda.so.1"):
        L._set_prefer_l1(0x1234)


def test_argument_key_of_descriptors():
    from triton.tools.tensor_descriptor import TensorDescriptor

    t = torch.zeros(64, 128, dtype=torch.float32)
    a = L._argument_key((TensorDescriptor.from_tensor(t, [16, 128]),))
    b = L._argument_key((TensorDescriptor.from_tensor(t, [32, 128]),))
    c = L._argument_key((TensorDescriptor.from_tensor(t.clone(), [16, 128]),))
    assert a != b and a == c


# --------------------------------------------------------------------------- the real kernels


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="replays need compiled kernels (CUDA)")
@pytest.mark.parametrize("M, N, K", [(1, 384, 512), (16, 384, 512), (64, 384, 1024), (512, 1024, 1024)])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_replayed_launches_are_exact(M, N, K, dtype, monkeypatch):
    """Each kernel (gemv, skinny, tma, ws, quantize) launched three times: from Triton's path,
    replayed, and replayed on other buffers (the skinny kernel: its host-descriptor kind first,
    then the eager kind from Triton's path, then replayed); all bit-identical to the first, which
    matches the reference. An unaligned activation of the same shape must not replay the aligned kernel."""
    runs = []
    kernels = (G.gemm_gemv_kernel, G.gemm_skinny_kernel, G.gemm_tma_kernel, G.gemm_tiled_kernel,
               getattr(G.gemm_hopper, "gemm_ws_kernel", None), Q.quantize_kernel)
    for kernel in kernels:
        if kernel is None:
            continue
        real = kernel.run

        def counted(*args, _real=real, _kernel=kernel, **kwargs):
            runs.append(_kernel)
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)
    monkeypatch.setattr(L, "_COMPILED", {})
    g = torch.Generator().manual_seed(M + N + K)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16).cuda()
    w = torch.randn(N, K, generator=g) * 0.05
    wq, ws = (t.cuda() for t in reference.quantize(w.cpu(), (128, 128), dtype))
    outs = []
    for i in range(3):
        xi = x if i < 2 else x.clone()
        aq, as_ = Q.quantize(xi, 1, 128, dtype)
        outs.append((aq, as_, G.gemm(aq, as_, wq, ws, None, torch.bfloat16)))
    # the skinny kernel's first eager call runs the host-descriptor kernel a CUDA-graph capture would
    # replay (gemm.SKINNY_TMA_CAPTURED), its second the eager one: one Triton launch each
    captured_first = G.SKINNY_TMA_CAPTURED is not None and G.plan(M, N, K, tma=False).kind == "skinny"
    assert len(runs) == 2 + captured_first, f"expected one Triton launch per compiled kernel, then replays; got {runs}"
    aq, as_, out = outs[0]
    raq, ras = reference.quantize(x.cpu(), (1, 128), dtype)
    assert torch.equal(aq.cpu().view(torch.uint8), raq.view(torch.uint8)) and torch.equal(as_.cpu(), ras)
    _check(out, aq, as_, wq, ws, None, torch.bfloat16)
    for a2, s2, o2 in outs[1:]:
        assert torch.equal(a2.view(torch.uint8), aq.view(torch.uint8)) and torch.equal(s2, as_)
        assert torch.equal(o2.view(torch.int16), out.view(torch.int16))
    if M <= G.SKINNY_MAX_M:  # an unaligned activation of the same shape (the streaming kernels take one)
        buf = torch.empty(M * K + 1, dtype=dtype, device="cuda")
        unaligned = buf[1:].view(M, K)
        unaligned.copy_(aq)
        before = len(runs)
        out_u = G.gemm(unaligned, as_, wq, ws, None, torch.bfloat16)
        assert len(runs) == before + 1
        assert torch.equal(out_u.view(torch.int16), out.view(torch.int16))


def _fresh_ws_operands(monkeypatch, M, N, K, dtype):
    """Quantized CUDA operands of an M x N x K GEMM that the ws kernel serves (else the test skips),
    with launch's tables emptied, so that the next GEMM is a first launch."""
    monkeypatch.setattr(L, "_COMPILED", {})
    monkeypatch.setattr(L, "_L1_SET", set())
    aq, as_ = Q.quantize(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), 1, 128, dtype)
    wq, ws = Q.quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16), 128, 128, dtype)
    if not G.ws_usable(aq, wq):
        pytest.skip("the ws kernel does not run on this GPU")
    return aq, as_, wq, ws


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="needs compiled kernels (CUDA)")
def test_ws_kernel_runs_with_the_smallest_carveout(monkeypatch):
    """After a launch of the ws GEMM, its compiled kernel reports the carveout prefer_l1 asked for
    (0 %), and the quantize kernels (not registered) whatever Triton left, not 0 -- read back from
    the driver."""
    import ctypes

    aq, as_, wq, ws = _fresh_ws_operands(monkeypatch, 512, 1024, 1024, torch.float8_e4m3fn)
    G.gemm(aq, as_, wq, ws, None, torch.bfloat16)
    lib = L._libcuda()

    def carveouts(kernel):  # of each compiled kernel in the table (the activation's and weight's quantize differ)
        values = []
        for key, (compiled, _) in L._COMPILED.items():
            if key[0] == id(kernel):
                value = ctypes.c_int(-2)
                assert lib.cuFuncGetAttribute(ctypes.byref(value), ctypes.c_int(9), ctypes.c_void_p(compiled.function)) == 0
                values.append(value.value)
        return values

    assert carveouts(G.gemm_hopper.gemm_ws_kernel) == [0]
    quantize = carveouts(Q.quantize_kernel)
    assert len(quantize) == 2 and 0 not in quantize


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="CUDA-graph capture needs a CUDA device")
def test_ws_kernel_captured_after_warmup_replays_its_eager_bits(monkeypatch):
    """The carveout is set at the ws kernel's first (eager) launch; a CUDA graph captured after it
    replays the same kernel and gives the eager output's bits."""
    aq, as_, wq, ws = _fresh_ws_operands(monkeypatch, 1024, 512, 1024, torch.float8_e5m2)
    eager = G.gemm(aq, as_, wq, ws, None, torch.bfloat16)
    assert len(L._L1_SET) == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = G.gemm(aq, as_, wq, ws, None, torch.bfloat16)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.view(torch.int16), eager.view(torch.int16))
    _check(eager, aq, as_, wq, ws, None, torch.bfloat16)
