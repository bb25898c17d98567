"""Tensor parallelism through DTensor, on 2 processes.

Two CPU processes over gloo (reference backend) without GPUs; two GPUs over NCCL (Triton
backend) when the machine has them. One spawn runs every distributed scenario and saves what
each rank computed; the tests below compare it, in this process, with oracles built here on one
device from the same seeds:

* a column-parallel Linear's local output equals the single-device quantized Linear applied to
  the same input with the same rows of the weight, bit for bit;
* a row-parallel Linear's output equals the bf16 sum of the two single-device quantized partial
  products (what the all-reduce computes), bit for bit;
* a 2-layer Llama-style decoder at TP=2 equals the single-device quantized decoder within bf16
  rounding (the row-parallel all-reduce rounds each partial sum to bf16 once more);
* the checkpoint loaded shard by shard holds exactly the slices of the single-device weights,
  and no rank read a whole sharded tensor.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blockwise_fp8 import BlockwiseFP8Config, BlockwiseFP8Tensor, save_quantized
from blockwise_fp8.demo_model import DecoderConfig, DecoderStack, init_weights

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

WORLD = 2
GPU = torch.cuda.is_available() and torch.cuda.device_count() >= WORLD
BACKEND = "triton" if GPU else "reference"
DIST_BACKEND = "nccl" if GPU else "gloo"
# Every sharded size is a multiple of 128 * 2: q 512 (256/rank), k/v 256 (128/rank), ffn 768 (384/rank).
CFG = DecoderConfig(hidden=512, ffn=768, heads=4, kv_heads=2, layers=2)
B, S = 2, 8
REPO = Path(__file__).resolve().parent.parent


def _device(rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if GPU else torch.device("cpu")




def _quantized_model(device, seed=0) -> DecoderStack:
    from torchao.quantization import quantize_

    torch.manual_seed(seed)
    m = init_weights(DecoderStack(CFG, max_len=64), seed=seed).to(device=device, dtype=torch.bfloat16)
    quantize_(m, BlockwiseFP8Config(backend=BACKEND))
    return m


def _input(device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, S, CFG.hidden, generator=g).to(device=device, dtype=torch.bfloat16)


def _record_linears(model, store: dict):
    """Forward hooks keeping each Linear's (local) input and output."""
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(mod, inp, out, name=name):
                store[name] = (_local(inp[0]).detach().cpu(), _local(out).detach().cpu())
            hooks.append(mod.register_forward_hook(hook))
    return hooks


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------- the 2-process run


def _worker(rank: int, port: int, outdir: str, ckpt: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import parallel
    from torchao.quantization import quantize_

    from blockwise_fp8 import distributed as bdist
    from blockwise_fp8.demo_model import _rope_tables

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if GPU:
        torch.cuda.set_device(rank)
    dist.init_process_group(DIST_BACKEND, rank=rank, world_size=WORLD)
    dev = _device(rank)
    mesh = init_device_mesh(dev.type, (WORLD,))
    out: dict = {}
    try:
        # 1. the decoder, parallelized from a full quantized copy (rank 0's weights scattered)
        model = _quantized_model(dev)
        bdist.parallelize(model, mesh, DecoderStack.tensor_parallel_plan())
        model.localize_for_tensor_parallel(WORLD)
        acts: dict = {}
        hooks = _record_linears(model, acts)
        with torch.no_grad():
            y = model(_input(dev))
        for h in hooks:
            h.remove()
        out["decoder_out"] = y.cpu()
        out["decoder_linears"] = acts
        w = model.layers[0].q_proj.weight
        out["weight_types"] = (type(w).__name__, type(_local(w)).__name__, tuple(w.shape), tuple(_local(w).shape))
        full = w.full_tensor()  # all-gather of qdata and scale
        out["q_full"] = (type(full).__name__, full.qdata.cpu(), full.scale.cpu())
        down = model.layers[0].down_proj.weight
        out["down_local"] = (_local(down).qdata.cpu(), _local(down).scale.cpu(), down.placements[0].dim)

        # 2. a reduction of quantized weights has no meaning: refused, not run on a dequantized copy
        try:
            dist.all_reduce(_local(w))
            out["all_reduce"] = "no error"
        except NotImplementedError as e:
            out["all_reduce"] = str(e)

        # 2b. unwrap_for_compile: plain local parameters, the same model eager and compiled
        with torch.no_grad():
            out["compiled"] = torch.compile(model, fullgraph=True)(_input(dev)).cpu()
        torch._dynamo.reset()
        bdist.unwrap_for_compile(model)
        out["unwrapped_params"] = {n: (type(p).__name__, p.dtype) for n, p in model.named_parameters() if "q_proj" in n}
        with torch.no_grad():
            out["unwrapped_eager"] = model(_input(dev)).cpu()
            out["unwrapped_compiled"] = torch.compile(model, fullgraph=True)(_input(dev)).cpu()
        torch._dynamo.reset()

        # 3. the raw parallelize_module on a layer whose shard is not whole blocks
        bad = torch.nn.Sequential(torch.nn.Linear(256, 384, bias=False)).to(dev, torch.bfloat16)
        quantize_(bad, BlockwiseFP8Config(backend=BACKEND))
        for name, fn in (("raw", parallel.parallelize_module), ("ours", bdist.parallelize)):
            try:
                fn(bad, mesh, {"0": parallel.ColwiseParallel()})
                out[f"bad_{name}"] = "no error"
            except ValueError as e:
                out[f"bad_{name}"] = str(e)

        # 4. meta model -> quantize_ -> parallelize -> load only this rank's slices
        import safetensors

        reads = []
        real_open = safetensors.safe_open

        class Recording:
            def __init__(self, *a, **k):
                self.h = real_open(*a, **k)

            def __enter__(self):
                self.h.__enter__()
                return self

            def __exit__(self, *exc):
                return self.h.__exit__(*exc)

            def get_tensor(self, key):
                reads.append((key, "whole", None))
                return self.h.get_tensor(key)

            def get_slice(self, key):
                sl = self.h.get_slice(key)

                class S:
                    def __getitem__(_, index):
                        t = sl[index]
                        reads.append((key, "slice", tuple(t.shape)))
                        return t

                    def __getattr__(_, attr):
                        return getattr(sl, attr)
                return S()

            def __getattr__(self, attr):
                return getattr(self.h, attr)

        safetensors.safe_open = Recording
        try:
            with torch.device("meta"):
                meta = DecoderStack(CFG, max_len=64).to(torch.bfloat16)
            quantize_(meta, BlockwiseFP8Config(backend=BACKEND))
            bdist.parallelize(meta, mesh, DecoderStack.tensor_parallel_plan())
            result = bdist.load_sharded(meta, ckpt, device=dev, backend=BACKEND)
        finally:
            safetensors.safe_open = real_open
        cos, sin = _rope_tables(CFG, 64, device=dev)
        # non-persistent buffers: computed, not stored (bf16, as .to(bfloat16) made them)
        meta.cos, meta.sin = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
        meta.localize_for_tensor_parallel(WORLD)
        with torch.no_grad():
            out["loaded_out"] = meta(_input(dev)).cpu()
        out["loaded_reads"] = reads
        out["loaded_quantized"] = result.quantized
        out["loaded_local"] = {
            n: (_local(p).qdata.cpu(), _local(p).scale.cpu(), p.placements[0].dim)
            for n, p in meta.named_parameters() if isinstance(_local(p), BlockwiseFP8Tensor)
        }
        out["loaded_is_dtensor"] = all(isinstance(p, DTensor) for n, p in meta.named_parameters() if "proj" in n)
    finally:
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def oracle():
    return _quantized_model(_device(0))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, oracle):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("tp")
    ckpt = tmp / "ckpt"
    save_quantized(oracle, ckpt, max_shard_size=1 << 20)  # several shards: the index path too
    mp.spawn(_worker, args=(_free_port(), str(tmp), str(ckpt)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _ulps_bf16(t: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at |t| (float32)."""
    t = t.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(t)) - 7)


# ---------------------------------------------------------------------- the tests

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


def test_weights_are_dtensors_of_block_aligned_quantized_shards(ranks, oracle):
    for rank, r in enumerate(ranks):
        outer, inner, gshape, lshape = r["weight_types"]
        assert (outer, inner) == ("DTensor", "BlockwiseFP8Tensor")
        assert gshape == (512, 512) and lshape == (256, 512)
        # the row-parallel down_proj: columns [rank*384, (rank+1)*384) and their scale columns
        q, s, dim = r["down_local"]
        ref = oracle.layers[0].down_proj.weight
        assert dim == 1
        assert torch.equal(q.view(torch.uint8), ref.qdata[:, rank * 384:(rank + 1) * 384].cpu().view(torch.uint8))
        assert torch.equal(s, ref.scale[:, rank * 3:(rank + 1) * 3].cpu())


def test_full_tensor_gathers_the_quantized_weight_exactly(ranks, oracle):
    ref = oracle.layers[0].q_proj.weight
    for r in ranks:
        kind, q, s = r["q_full"]
        assert kind == "BlockwiseFP8Tensor"
        assert torch.equal(q.view(torch.uint8), ref.qdata.cpu().view(torch.uint8))
        assert torch.equal(s, ref.scale.cpu())


@pytest.mark.parametrize("layer", range(CFG.layers))
@pytest.mark.parametrize("proj", COLWISE)
def test_column_parallel_linear_is_bit_exact(ranks, oracle, layer, proj):
    w = getattr(oracle.layers[layer], proj).weight
    n = w.shape[0] // WORLD
    for rank, r in enumerate(ranks):
        x, y = r["decoder_linears"][f"layers.{layer}.{proj}"]
        assert y.shape[-1] == n
        want = F.linear(x.to(w.device), w[rank * n:(rank + 1) * n].contiguous()).cpu()
        assert torch.equal(y, want), f"rank {rank}: max diff {(y.float() - want.float()).abs().max()}"


@pytest.mark.parametrize("layer", range(CFG.layers))
@pytest.mark.parametrize("proj", ROWWISE)
def test_row_parallel_linear_is_the_bf16_sum_of_exact_partials(ranks, oracle, layer, proj):
    w = getattr(oracle.layers[layer], proj).weight
    k = w.shape[1] // WORLD
    partials = []
    for rank, r in enumerate(ranks):
        x, _ = r["decoder_linears"][f"layers.{layer}.{proj}"]
        assert x.shape[-1] == k
        partials.append(F.linear(x.to(w.device), w[:, rank * k:(rank + 1) * k].contiguous()).cpu())
    want = partials[0] + partials[1]  # bf16 + bf16, rounded once: what a 2-rank all-reduce computes
    for rank, r in enumerate(ranks):
        _, y = r["decoder_linears"][f"layers.{layer}.{proj}"]
        assert torch.equal(y, want), f"rank {rank}: max diff {(y.float() - want.float()).abs().max()}"


def test_decoder_at_tp2_is_as_accurate_as_the_single_device_quantized_decoder(ranks, oracle):
    # Every Linear is exact given its input (the two tests above); what differs is the one extra
    # bf16 rounding of each row-parallel partial sum. The next layer quantizes its activation to
    # FP8, which turns some of those 1-ulp differences into 1-FP8-ulp differences, so the two
    # models differ by FP8 rounding noise, not by bf16 ulps, after a row-parallel layer. What must
    # hold is that TP costs no accuracy: against the unquantized bf16 decoder, the TP model's error
    # is that of the single-device quantized model.
    x = _input(_device(0))
    with torch.no_grad():
        single = oracle(x).cpu().float()
        ref_model = init_weights(DecoderStack(CFG, max_len=64), seed=0).to(device=x.device, dtype=torch.bfloat16)
        bf16 = ref_model(x).cpu().float()
    assert torch.equal(ranks[0]["decoder_out"], ranks[1]["decoder_out"])  # replicated output
    tp = ranks[0]["decoder_out"].float()
    err_single, err_tp = (single - bf16).norm(), (tp - bf16).norm()
    assert err_tp <= 1.1 * err_single, (err_tp, err_single)
    assert (tp - single).norm() < err_single, ((tp - single).norm(), err_single)
    assert (tp - single).norm() < 0.05 * single.norm()


def test_unwrap_for_compile_keeps_the_model(ranks):
    for r in ranks:
        # each sharded quantized weight is now two plain local tensors, rebuilt in the forward
        assert r["unwrapped_params"] == {
            "layers.0.q_proj.parametrizations.weight.original0": ("Parameter", torch.float8_e4m3fn),
            "layers.0.q_proj.parametrizations.weight.original1": ("Parameter", torch.float32),
            "layers.1.q_proj.parametrizations.weight.original0": ("Parameter", torch.float8_e4m3fn),
            "layers.1.q_proj.parametrizations.weight.original1": ("Parameter", torch.float32),
        }, r["unwrapped_params"]
        assert torch.equal(r["unwrapped_eager"], r["decoder_out"])  # the very same computation
        # compiled, the same graph as the compiled model with DTensor(BlockwiseFP8Tensor) weights
        # (compiled and eager differ: inductor fuses the bf16 norms and rotary differently)
        assert torch.equal(r["unwrapped_compiled"], r["compiled"])


def test_reductions_of_quantized_weights_are_refused(ranks):
    for r in ranks:
        assert "c10d.allreduce_" in r["all_reduce"] and "only data movement" in r["all_reduce"]


def test_shards_that_are_not_whole_blocks_fail_at_parallelize_time(ranks):
    for r in ranks:
        # PyTorch's own parallelize_module: our slicing refuses, naming the shape and the range
        assert "(384, 256)" in r["bad_raw"] and "[0:192]" in r["bad_raw"], r["bad_raw"]
        # blockwise_fp8.distributed.parallelize: the layer, its sizes, and TP sizes that fit
        assert "'0'" in r["bad_ours"] and "(384, 256)" in r["bad_ours"] and "[192, 192]" in r["bad_ours"]
        assert "TP sizes that fit this layer: [1, 3]" in r["bad_ours"], r["bad_ours"]


def test_sharded_load_reads_only_this_ranks_slices(ranks, oracle):
    for rank, r in enumerate(ranks):
        assert r["loaded_is_dtensor"]
        assert len(r["loaded_quantized"]) == 7 * CFG.layers
        reads = r["loaded_reads"]
        sharded = [key for key, how, _ in reads if "proj" in key]
        assert sharded and all(how == "slice" for key, how, _ in reads if "proj" in key)
        for key, how, shape in reads:
            if "proj" not in key:
                continue
            mod = oracle.get_submodule(key.rsplit(".", 1)[0])
            full = tuple(mod.weight.shape) if key.endswith(".weight") else tuple(mod.weight.scale.shape)
            assert shape is not None and shape != full and sum(shape) < sum(full), (key, shape, full)
        # ... and the slices are exactly the single-device weights' shards
        for name, (q, s, dim) in r["loaded_local"].items():
            ref = oracle.get_parameter(name)
            n = ref.shape[dim] // WORLD
            want = ref.narrow(dim, rank * n, n)
            assert torch.equal(q.view(torch.uint8), want.qdata.cpu().view(torch.uint8)), name
            assert torch.equal(s, want.scale.cpu()), name


def test_sharded_load_gives_the_same_model(ranks):
    for r in ranks:
        assert torch.equal(r["loaded_out"], r["decoder_out"])


def test_check_plan_without_processes():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from torchao.quantization import quantize_

    from blockwise_fp8.distributed import check_plan

    m = torch.nn.Sequential(torch.nn.Linear(512, 640, bias=False), torch.nn.Linear(640, 512, bias=False))
    quantize_(m, BlockwiseFP8Config())
    plan = {"0": ColwiseParallel(), "1": RowwiseParallel()}
    assert check_plan(m, 5, plan) == [("0", "ColwiseParallel", 0), ("1", "RowwiseParallel", 1)]
    with pytest.raises(ValueError) as e:
        check_plan(m, 2, plan)
    msg = str(e.value)
    assert "'0' (Linear, weight (640, 512))" in msg and "'1' (Linear, weight (512, 640))" in msg
    assert "[320, 320]" in msg and "TP sizes that fit this layer: [1, 5]" in msg
    with pytest.raises(ValueError, match="matches no submodule"):
        check_plan(m, 2, {"nope": ColwiseParallel()})
    with pytest.raises(TypeError, match="DeviceMesh or an int"):
        check_plan(m, "2", plan)
    with pytest.raises(ValueError, match="at least 1"):
        check_plan(m, 0, plan)
def test_tp_benchmark_smoke(tmp_path):
    csv = tmp_path / "tp.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         str(REPO / "benchmarks" / "bench_tp.py"), "--smoke", "--csv", str(csv),
         "--prefill-modes", "default,reduce-overhead"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = csv.read_text().strip().splitlines()
    # {bf16, ours} x {prefill, prefill (CUDA graphs), decode}; the smoke run is eager throughout
    assert rows[0].startswith("date,") and len(rows) == 1 + 6
    assert sum(",prefill (CUDA graphs),1," in r and ",eager," in r for r in rows) == 2
    assert "tokens/s" in proc.stdout


def test_tp_benchmark_refuses_an_unknown_prefill_mode(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_tp
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    with pytest.raises(SystemExit):
        bench_tp.main(["--csv", "unused.csv", "--prefill-modes", "default,max-autotune"])
    assert "got 'default,max-autotune'" in capsys.readouterr().err
