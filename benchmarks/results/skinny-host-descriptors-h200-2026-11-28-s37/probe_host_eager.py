"""Eager per-call time (host-bound) of the skinny kernel with descriptors in the kernel or on the host."""
import time, torch
from blockwise_fp8 import ops
from blockwise_fp8.kernels import gemm as G
for M, N, K in [(32, 8192, 8192), (32, 4096, 4096), (16, 4096, 4096)]:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** .5
    wq, ws = ops.quantize_weight(w, torch.float8_e4m3fn)
    aq, as_ = ops.quantize_activation(x, torch.float8_e4m3fn)
    res = {}
    for name, tma, host in (("pointer", None, False), ("tma", 1, False), ("tma_host", 1, True)):
        G.SKINNY_TMA, G.SKINNY_TMA_HOST = tma, host
        for _ in range(20):
            G.gemm(aq, as_, wq, ws, None, torch.bfloat16)
        torch.cuda.synchronize()
        best = 1e9
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(300):
                G.gemm(aq, as_, wq, ws, None, torch.bfloat16)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            best = min(best, (t1 - t) / 300 * 1e6)
        res[name] = best
    G.SKINNY_TMA, G.SKINNY_TMA_HOST = 32, False
    print(f"host us per eager call M={M} {N}x{K}: " + "  ".join(f"{k} {v:.1f}" for k, v in res.items()))
