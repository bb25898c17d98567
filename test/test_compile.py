"""torch.compile of quantized models: one graph (fullgraph, zero graph breaks), the kernels as
opaque custom-op nodes, no recompilation per batch size, same outputs as eager."""

import warnings

import pytest
import torch
import torch.nn as nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torchao.quantization import quantize_

from blockwise_fp8 import BlockwiseFP8Config, BlockwiseFP8Tensor

from .test_config import MLP, Block

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (Triton kernels, CUDA graphs)")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _quantized(make, device="cpu", **cfg):
    torch.manual_seed(0)
    model = make().to(device=device, dtype=torch.bfloat16)
    quantize_(model, BlockwiseFP8Config(**cfg))
    return model


class _GraphCapture:
    """An aot_eager-like backend that keeps the ATen graphs it was given."""

    def __init__(self):
        self.graphs = []

        def keep(gm, example_inputs):
            self.graphs.append(gm)
            return gm

        self.backend = aot_autograd(fw_compiler=keep)

    def count(self, target) -> int:
        return sum(1 for g in self.graphs for n in g.graph.nodes if n.op == "call_function" and n.target == target)


def _no_graph_breaks():
    return sum(counters["graph_break"].values()) == 0


# MLP's two Linears read different inputs; Block's q/k/v read one, gate/up another.
@pytest.mark.parametrize("make, shape, n_inputs", [(MLP, (4, 200), 2), (Block, (2, 8, 160), 4)])
def test_fullgraph_one_gemm_per_linear_one_quantization_per_input(make, shape, n_inputs):
    model = _quantized(make)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    capture = _GraphCapture()
    compiled = torch.compile(model, fullgraph=True, backend=capture.backend)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no dequantize fallback inside the graph
        warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
        out = compiled(x)
        expect = model(x)
    assert torch.equal(out, expect)
    assert _no_graph_breaks() and len(capture.graphs) == 1
    assert capture.count(torch.ops.blockwise_fp8.gemm.default) == n_linear
    assert capture.count(torch.ops.blockwise_fp8.quantize_input.default) == n_inputs
    assert capture.count(torch.ops.blockwise_fp8.linear.default) == 0
    # The weight never reaches the graph in high precision.
    assert capture.count(torch.ops.blockwise_fp8.dequantize.default) == 0


class _MutatedInput(nn.Module):
    """Two Linears on one tensor object, changed in place between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(256, 256), nn.Linear(256, 256)

    def forward(self, x):
        h = x * 1.5
        y = self.a(h)
        h.mul_(2)
        return y + self.b(h)


def test_input_changed_in_place_is_quantized_again():
    model = _quantized(_MutatedInput)
    capture = _GraphCapture()
    compiled = torch.compile(model, fullgraph=True, backend=capture.backend)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    assert capture.count(torch.ops.blockwise_fp8.quantize_input.default) == 2


def test_shared_quantization_keeps_input_gradients():
    # Sharing happens inside the forward of each quantized Linear's autograd.Function; the
    # straight-through input gradient must still sum the three projections' contributions.
    model = _quantized(Block)
    x = torch.randn(2, 8, 160, dtype=torch.bfloat16)
    x_eager, x_comp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    capture = _GraphCapture()
    out = torch.compile(model, fullgraph=True, backend=capture.backend)(x_comp)
    expect = model(x_eager)
    assert torch.equal(out, expect)
    out.float().sum().backward()
    expect.float().sum().backward()
    torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=2**-7, atol=2**-7)
    assert capture.count(torch.ops.blockwise_fp8.quantize_input.default) == 4


def test_torch_export_shares_quantization():
    # torch.export (the route to AOTInductor) traces the same way: one gemm per Linear, one
    # quantize_input per distinct input, and the exported program equals eager.
    model = _quantized(Block)
    x = torch.randn(2, 8, 160, dtype=torch.bfloat16)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        assert torch.equal(program.module()(x), model(x))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.blockwise_fp8.gemm.default) == 7
    assert targets.count(torch.ops.blockwise_fp8.quantize_input.default) == 4
    weight = program.state_dict["q.weight"]
    assert isinstance(weight, BlockwiseFP8Tensor) and weight.qdata.dtype == torch.float8_e4m3fn


def test_explain_reports_zero_graph_breaks():
    model = _quantized(Block)
    x = torch.randn(2, 8, 160, dtype=torch.bfloat16)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_dynamic_batch_does_not_recompile_per_m():
    model = _quantized(MLP)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=cnt)
    with torch.no_grad():
        for m in (3, 5, 9, 17, 33, 1):
            x = torch.randn(m, 200, dtype=torch.bfloat16)
            assert torch.equal(compiled(x), model(x))
    # One static graph for the first M, one dynamic graph for every later M (1 is specialized).
    assert cnt.frame_count <= 3
    cnt.clear()
    with torch.no_grad():
        for m in (6, 12, 40):
            compiled(torch.randn(m, 200, dtype=torch.bfloat16))
    assert cnt.frame_count == 0


def test_grad_enabled_model_compiles():
    # LayerNorm weights and biases require grad: compile traces a backward graph through the
    # quantized linears, and the input/bias gradients flow.
    model = _quantized(Block)
    x = torch.randn(2, 8, 160, dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert torch.equal(out, model(x)) and _no_graph_breaks()
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert model.norm1.weight.grad is not None and model.q.bias.grad is not None


def test_inductor_cpu_reference_backend():
    model = _quantized(MLP)
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=cnt)
    with torch.no_grad():
        for m in (4, 7):
            x = torch.randn(m, 200, dtype=torch.bfloat16)
            torch._dynamo.mark_dynamic(x, 0)
            # Inductor may fuse GELU differently from eager: one bf16 rounding apart at most.
            torch.testing.assert_close(compiled(x), model(x), rtol=2**-7, atol=2**-7)
    assert cnt.frame_count == 1 and _no_graph_breaks()


@pytest.mark.parametrize("compiler,M", [("aot_eager", 3), ("aot_eager", 67), ("inductor", 67)])
def test_triton_backend_compiles(kernel_device, compiler, M):
    # M = 67: quantize_input returns M rows of storage padded to 128 (gemm.activation_rows)
    model = nn.Sequential(nn.Linear(136, 144)).to(kernel_device, torch.bfloat16)
    quantize_(model, BlockwiseFP8Config(backend="triton"))
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = torch.randn(M, 136, dtype=torch.bfloat16, device=kernel_device)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    assert _no_graph_breaks()


def test_triton_backend_shares_quantization(kernel_device):
    # The Triton kernels (the interpreter on CPU) behind the shared quantize_input node: the
    # compiled Block equals eager, where every Linear quantizes its input itself.
    model = _quantized(Block, kernel_device, backend="triton")
    capture = _GraphCapture()
    compiled = torch.compile(model, fullgraph=True, backend=capture.backend)
    x = torch.randn(1, 3, 160, dtype=torch.bfloat16, device=kernel_device)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    assert capture.count(torch.ops.blockwise_fp8.quantize_input.default) == 4


# --------------------------------------------------------------------------- CUDA only


@requires_cuda
# Inductor fuses the block's bf16 elementwise ops differently from eager, so an activation can
# differ by a bf16 ulp before quantization and land on the other side of an FP8 rounding
# midpoint: the tolerance is a few FP8 steps of the activation format (seen on an H100: e5m2
# moved 7 of 2560 outputs by up to 0.027).
@pytest.mark.parametrize(
    "act, wdt, tol",
    [(torch.float8_e4m3fn, torch.float8_e4m3fn, 2**-6), (torch.float8_e5m2, torch.float8_e5m2, 2**-4)],
)
def test_cuda_inductor_fullgraph(act, wdt, tol):
    model = _quantized(Block, "cuda", activation_dtype=act, weight_dtype=wdt)
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=cnt)
    with torch.no_grad():
        for b in (2, 3, 5, 9):
            x = torch.randn(b, 8, 160, dtype=torch.bfloat16, device="cuda")
            torch.testing.assert_close(compiled(x), model(x), rtol=tol, atol=tol)
    assert cnt.frame_count <= 2 and _no_graph_breaks()
    assert isinstance(model.q.weight, BlockwiseFP8Tensor) and model.q.weight.is_cuda


@requires_cuda
def test_cuda_cublas_backend_compiles():
    from blockwise_fp8 import ops

    if not ops.cublas_blockwise_available(torch.device("cuda")):
        pytest.skip("this GPU/torch build has no blockwise cuBLAS GEMM (needs sm_90, cuBLAS >= 12.9)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).to("cuda", torch.bfloat16)
    quantize_(model, BlockwiseFP8Config(backend="cublas"))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for m in (128, 256, 384):
            x = torch.randn(m, 256, dtype=torch.bfloat16, device="cuda")
            torch.testing.assert_close(compiled(x), model(x), rtol=2**-6, atol=2**-6)
    assert _no_graph_breaks()


@requires_cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_shared_quantization_scale_layout(dynamic):
    """Above M = 256 auto sends e4m3 to cuBLAS, which reads M-major activation scales. A static-M
    graph writes the shared quantization that way where cuBLAS will read it; a dynamic-M graph
    keeps row-major scales (a per-M choice would recompile at the table's edges) and cuBLAS calls
    transpose them. Either way the compiled Block matches eager bit for bit on both sides of the
    threshold (eager quantizes per Linear with the same kernel)."""
    from blockwise_fp8 import ops

    if not ops.cublas_blockwise_available(torch.device("cuda")):
        pytest.skip("this GPU/torch build has no blockwise cuBLAS GEMM (needs sm_90, cuBLAS >= 12.9)")
    torch.manual_seed(0)
    model = Block(d=256, heads=4, ffn=512).to("cuda", torch.bfloat16)
    quantize_(model, BlockwiseFP8Config())
    capture = _GraphCapture()
    compiled = torch.compile(model, fullgraph=True, backend=capture.backend, dynamic=dynamic)
    layouts = []
    e4m3, bf16 = torch.float8_e4m3fn, torch.bfloat16
    for M, route in ((320, "cublas"), (16, "triton")):  # the Block's Linears have N, K <= 512
        assert ops.choose_gemm_backend(M, 256, 256, e4m3, e4m3, bf16, cublas_available=True) == route
    with torch.no_grad():
        for seq in (160, 8):  # M = 320 (cuBLAS) and 16 (our skinny kernel)
            x = torch.randn(2, seq, 256, dtype=torch.bfloat16, device="cuda")
            assert torch.equal(compiled(x), model(x))
            nodes = [n for n in capture.graphs[-1].graph.nodes if n.target == torch.ops.blockwise_fp8.quantize_input.default]
            assert len(nodes) == 4
            layouts.append({n.args[2] for n in nodes})  # scale_m_major
    assert layouts == ([{False}, {False}] if dynamic else [{True}, {False}])
    assert len(capture.graphs) == (1 if dynamic else 2)


@requires_cuda
def test_cuda_reduce_overhead_cuda_graphs():
    model = _quantized(MLP, "cuda")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for m in (1, 1, 1, 16, 16, 16):  # repeated shapes: recorded once, then replayed
            x = torch.randn(m, 200, dtype=torch.bfloat16, device="cuda")
            out = compiled(x).clone()
            torch.testing.assert_close(out, model(x), rtol=2**-6, atol=2**-6)
    assert _no_graph_breaks()


@requires_cuda
def test_cuda_reduce_overhead_split_k_decode():
    """Decode shapes whose GEMM splits K: its arrival counters must come from outside the CUDA
    graph pool (cudagraph trees refuse untracked allocations made while recording)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 256), nn.GELU(), nn.Linear(256, 4096)).to("cuda", torch.bfloat16)
    quantize_(model, BlockwiseFP8Config())
    from blockwise_fp8.kernels import gemm as G

    assert G.plan(1, 256, 4096, tma=True).split_k > 1
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
            out = compiled(x).clone()
            assert torch.equal(out, model(x))  # same kernels, same deterministic split-K sum


def test_assign_loaded_model_compiles_with_grad_enabled():
    # load_state_dict(assign=True) into a fresh model leaves Parameters that require grad;
    # the frozen-weight warning must not break the graph.
    source = _quantized(MLP)
    fresh = MLP().to(torch.bfloat16)
    fresh.load_state_dict(source.state_dict(), assign=True)
    assert fresh.up.weight.requires_grad and isinstance(fresh.up.weight, BlockwiseFP8Tensor)
    compiled = torch.compile(fresh, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 200, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(compiled(x), source(x))
    assert _no_graph_breaks()
