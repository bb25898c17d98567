"""The Inductor pass that runs Linears sharing an input as one gemm_group node (fusion.py), and
the gemm_group op behind it."""

import os
import subprocess
import sys

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx
from torchao.quantization import quantize_

from blockwise_fp8 import BlockwiseFP8Config, fusion, reference

from .conftest import KERNEL_DEVICE
from .test_config import MLP, Block

GEMM = torch.ops.blockwise_fp8.gemm.default
GROUP = torch.ops.blockwise_fp8.gemm_group.default


pytestmark = pytest.mark.usefixtures("fresh_compile")


def _compiled_run(model, x, fuse: bool):
    """Inductor-compiled output, generated code, and how many groups the pass made."""
    fusion.install() if fuse else fusion.uninstall()
    torch._dynamo.reset()
    groups = fusion._PASS.groups
    # no compile caches: a cached graph would not run the pass again (the counter stays put)
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        out, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    return out, "\n".join(code), fusion._PASS.groups - groups


def test_installed_on_import():
    assert fusion.installed()


def test_block_runs_qkv_and_gate_up_as_groups(kernel_device):
    # Block: q/k/v read one input, gate/up another, o and down their own. With the Triton kernels
    # (the interpreter on CPU) at M = 3 the groups take the skinny kernel, one launch each; with
    # K = 160 no split over K, so grouped and separate GEMMs sum in the same order: equal bits.
    torch.manual_seed(0)
    model = Block().to(kernel_device, torch.bfloat16)
    quantize_(model, BlockwiseFP8Config(backend="triton"))
    x = torch.randn(1, 3, 160, dtype=torch.bfloat16, device=kernel_device)
    fused, code, groups = _compiled_run(model, x, fuse=True)
    assert groups == 2 and "blockwise_fp8.gemm_group" in code
    separate, code, groups = _compiled_run(model, x, fuse=False)
    assert groups == 0 and "blockwise_fp8.gemm_group" not in code
    assert torch.equal(fused, separate)
    with torch.no_grad():  # eager: Inductor's bf16 elementwise ops may round differently
        torch.testing.assert_close(fused, model(x), rtol=2**-6, atol=2**-6)


def test_linears_of_different_inputs_stay_apart():
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    quantize_(model, BlockwiseFP8Config())
    x = torch.randn(4, 200, dtype=torch.bfloat16)
    out, code, groups = _compiled_run(model, x, fuse=True)
    assert groups == 0 and "gemm_group" not in code
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=2**-6, atol=2**-6)


def _operands(seed=0, M=2, K=256, Ns=(128, 64)):
    g = torch.Generator().manual_seed(seed)
    aq, as_ = reference.quantize(torch.randn(M, K, generator=g), (1, 128), torch.float8_e4m3fn)
    ws = [reference.quantize(torch.randn(n, K, generator=g) * 0.05, (128, 128), torch.float8_e4m3fn) for n in Ns]
    return aq, as_, ws


def test_weight_made_after_the_first_gemm_is_left_out():
    """The group node goes where the first gemm was: a gemm whose weight is computed after that
    point cannot join it; one on a weight that exists can, even the same weight again."""
    aq, as_, [(w1, s1), (w2, s2)] = _operands()

    def f(aq, as_, w1, s1, w2, s2):
        o1 = GEMM(aq, as_, w1, s1, None, torch.bfloat16, "reference")
        late = w2.clone()
        o2 = GEMM(aq, as_, late, s2, None, torch.bfloat16, "reference")
        o3 = GEMM(aq, as_, w1, s1, None, torch.float32, "reference")  # other out dtype: its own group
        o4 = GEMM(aq, as_, w1, s1, None, torch.bfloat16, "reference")
        return o1, o2, o3, o4

    args = (aq, as_, w1, s1, w2, s2)
    gm = make_fx(f)(*args)
    before = [o.clone() for o in gm(*args)]
    fusion.FuseSiblingGemms()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    groups = [n for n in calls if n.target is GROUP]
    assert len(groups) == 1 and len(groups[0].args[2]) == 2  # o1 and o4
    assert sum(n.target is GEMM for n in calls) == 2  # o2 (late weight), o3 (float32)
    assert all(torch.equal(a, b) for a, b in zip(gm(*args), before))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gemm_group_op_opcheck(backend):
    if backend == "triton" and KERNEL_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no Triton device")
    aq, as_, ws = _operands(Ns=(128, 64, 200))
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    bias = [None, torch.randn(64), None]
    args = (aq.to(dev), as_.to(dev), [w.to(dev) for w, _ in ws], [s.to(dev) for _, s in ws],
            [b if b is None else b.to(dev) for b in bias], torch.bfloat16, backend)
    # test_schema compares inputs with arithmetic that CPU float8 tensors do not have
    torch.library.opcheck(GROUP, args, test_utils=("test_faketensor",))
    outs = GROUP(*args)
    for out, (w, s), b in zip(outs, ws, bias):
        expect = reference.gemm(aq, as_, w, s, block_size=128, out_dtype=torch.float32, bias=b)
        torch.testing.assert_close(out.cpu().float(), expect, rtol=2**-7, atol=2**-7)


class _OtherPass(CustomGraphPass):
    def __call__(self, graph):
        pass

    def uuid(self):
        return "other"


def test_install_keeps_a_pass_already_there():
    other = _OtherPass()
    inductor_config.post_grad_custom_post_pass = other
    fusion.uninstall()  # not ours: left in place
    assert inductor_config.post_grad_custom_post_pass is other
    if fusion._lists_of_passes():
        assert fusion.install() and fusion.installed()
        assert list(inductor_config.post_grad_custom_post_pass) == [other, fusion._PASS]
        fusion.uninstall()
        assert list(inductor_config.post_grad_custom_post_pass) == [other] and not fusion.installed()
    else:
        with pytest.warns(UserWarning, match="post_grad_custom_post_pass already holds"):
            assert not fusion.install()
        assert inductor_config.post_grad_custom_post_pass is other


@pytest.mark.parametrize("flag, expect", [("0", "False"), ("1", "True")])
def test_environment_opt_out(flag, expect):
    env = dict(os.environ, BLOCKWISE_FP8_FUSE_GEMMS=flag)
    run = subprocess.run([sys.executable, "-c", "import blockwise_fp8; print(blockwise_fp8.fusion.installed())"],
                         capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == expect


def test_dynamic_batch_grouped_equals_separate():
    # A dynamic M reaches gemm_group as a symbol: one compiled graph serves every batch size, and
    # (reference backend: each weight's product computed alone either way) grouped and separate
    # graphs give the same bits.
    torch.manual_seed(0)
    model = Block().to(torch.bfloat16)
    quantize_(model, BlockwiseFP8Config())
    xs = [torch.randn(b, 4, 160, dtype=torch.bfloat16) for b in (2, 3, 5)]
    outs = {}
    for fuse in (True, False):
        fusion.install() if fuse else fusion.uninstall()
        torch._dynamo.reset()
        groups = fusion._PASS.groups
        compiled = torch.compile(model, dynamic=True, fullgraph=True)
        with torch.no_grad(), inductor_config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            outs[fuse] = [compiled(x) for x in xs]
        assert fusion._PASS.groups - groups == (2 if fuse else 0)  # one graph for all three sizes
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))


@pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13),
    reason="torch 2.11 (the H100 machine) segfaults loading an AOTInductor package of a model with our ops, "
    "CPU and CUDA, with and without this pass (docs/usage.md); runs on 2.13",
)
def test_aoti_package_runs_the_grouped_graph(tmp_path):
    # AOTInductor compiles the exported graph with the same post-grad passes; its C++ runner
    # calls gemm_group (Tensor[] in, Tensor[] out) through the proxy executor.
    torch.manual_seed(0)
    model = Block().to(torch.bfloat16)
    quantize_(model, BlockwiseFP8Config())
    x = torch.randn(2, 4, 160, dtype=torch.bfloat16)
    groups = fusion._PASS.groups
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):
        ep = torch.export.export(model, (x,))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "block.pt2"))
        out = torch._inductor.aoti_load_package(path)(x)
        expect = model(x)
    assert fusion._PASS.groups - groups == 2
    # Inductor's bf16 elementwise ops (layer norm, residuals) round differently from eager
    torch.testing.assert_close(out, expect, rtol=2**-5, atol=2**-5)
