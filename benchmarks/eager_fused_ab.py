"""Eager decode step (4 Llama-3-8B layers, batch 1, quantize_'s subclass weights): the activation
quantized inside the gemv kernel at M = 1 (ops.FUSED_QUANT_MAX_M = 1) against two launches (0),
alternating in one process, after checking that both give the same bits.

    PYTHONPATH=. python benchmarks/eager_fused_ab.py OUT.txt [--shapes]

Session 12: results/eager-fused-ab-h100-2026-11-27-s12.txt (3 and then 6 alternations; the
constant was named EAGER_FUSED_QUANT_MAX_M then, with the same effect on eager calls).

--shapes then also times one M = 1 `ops.linear` per weight shape (Llama-3-8B's and the GEMM
grid's), fused against two launches: as an eager loop (wall time per call, host included) of
`ops.linear` with FUSED_QUANT_MAX_M 1 and 0, and replayed from a CUDA graph (triton's
do_bench_cudagraph median) of `gemm.linear_fused` against `ops.linear` (which, since session 17,
does not fuse while a stream captures): session 16's grid found the fused kernel 24-42% slower
under replay on the grid's weights.
"""
import sys, time, torch
from torchao.quantization import quantize_
from blockwise_fp8 import BlockwiseFP8Config, ops
from blockwise_fp8.demo_model import LLAMA3_8B, DecoderConfig, DecoderStack, init_weights
out = open(sys.argv[1], "w")
def say(s):
    print(s, flush=True)
    out.write(s + "\n")
cfg = DecoderConfig(LLAMA3_8B.hidden, LLAMA3_8B.ffn, LLAMA3_8B.heads, LLAMA3_8B.kv_heads, 4)
with torch.device("cuda"):
    model = DecoderStack(cfg, max_len=2048).to(torch.bfloat16)
init_weights(model, seed=0)
model.eval()
quantize_(model, BlockwiseFP8Config())
x = torch.randn(1, 1, cfg.hidden, device="cuda", dtype=torch.bfloat16)
pos = torch.tensor([2047], device="cuda")
say(f"{torch.cuda.get_device_name()} torch {torch.__version__}; eager decode b1, 4 layers; ms per step (50 steps)")
with torch.no_grad():
    model.setup_cache(1, 2048, device="cuda")
    outs = {}
    for v in (0, 1):
        ops.FUSED_QUANT_MAX_M = v
        outs[v] = model.decode(x, pos).clone()
    say(f"bit-identical: {torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))}")
    for rep in range(6):
        for v in (0, 1):
            ops.FUSED_QUANT_MAX_M = v
            for _ in range(5):
                model.decode(x, pos)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                model.decode(x, pos)
            issue = (time.perf_counter() - t0) / 50 * 1e3
            torch.cuda.synchronize()
            step = (time.perf_counter() - t0) / 50 * 1e3
            say(f"rep {rep} FUSED_QUANT_MAX_M={v}: step {step:.3f} ms, issue {issue:.3f} ms")

if "--shapes" in sys.argv:
    import triton
    from blockwise_fp8 import quantize_weight
    from blockwise_fp8.kernels.gemm import linear_fused

    # Llama-3-8B's q|k|v, o, gate|up, down; the GEMM grid's four (N, K)
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
              (8192, 8192), (10240, 8192), (57344, 8192), (8192, 28672)]
    say("M = 1 ops.linear, e4m3: us per call, eager loop (200 calls) / CUDA-graph replay; fused vs two launches")
    with torch.no_grad():
        for N, K in shapes:
            w_q, w_s = quantize_weight(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
            xs = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            call = lambda: ops.linear(xs, w_q, w_s)  # noqa: E731
            fused = lambda: linear_fused(xs, w_q, w_s, None, torch.bfloat16)  # noqa: E731
            got, eager, graph = {}, {}, {}
            for v in (0, 1, 0, 1):  # alternating, best of two each
                ops.FUSED_QUANT_MAX_M = v
                got[v] = call().clone()
                got[v] = call().clone()  # (the first call of a shape runs the two launches)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(200):
                    call()
                torch.cuda.synchronize()
                eager[v] = min(eager.get(v, float("inf")), (time.perf_counter() - t0) / 200 * 1e6)
                graph[v] = min(graph.get(v, float("inf")), triton.testing.do_bench_cudagraph(
                    fused if v else call, rep=100, return_mode="median") * 1e3)
            say(f"N={N:6d} K={K:6d} eager {eager[1]:7.1f} vs {eager[0]:7.1f}   graph {graph[1]:7.1f} vs {graph[0]:7.1f}"
                f"   bit-identical: {torch.equal(got[0], got[1])}")
            del w_q, w_s
