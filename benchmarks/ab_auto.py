"""ours (backend="triton") vs cuBLAS at M = 48..256 on model shapes, e4m3, bf16 out: the data
behind ops.choose_gemm_backend's M bands (results/ab-auto-mid-m-h100-2026-11-27-s12.txt).

    PYTHONPATH=. python benchmarks/ab_auto.py OUT.txt
"""
import sys, torch, triton, triton.testing
from blockwise_fp8 import ops
from blockwise_fp8.kernels import quant as Q
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (10240, 8192), (8192, 8192), (57344, 8192),
          (8192, 28672), (1024, 4096), (14336, 4096), (7168, 2048), (2048, 7168)]
MS = [48, 64, 80, 96, 128, 160, 192, 256]
out = open(sys.argv[1], "w")
def say(s):
    print(s, flush=True)
    out.write(s + "\n")
say(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
say("N,K,M,ours_us,cublas_us,auto_pick,ours/cublas")
torch.manual_seed(0)
for N, K in SHAPES:
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    wq, ws = ops.quantize_weight(w)
    for M in MS:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        aq, as_ = ops.quantize_activation(x)
        _, as_m = Q.quantize(x, 1, 128, torch.float8_e4m3fn, scale_m_major=True)  # what linear hands cuBLAS
        t = {}
        for b in ("triton", "cublas"):
            t[b] = triton.testing.do_bench_cudagraph(lambda: ops.gemm(aq, as_ if b == "triton" else as_m, wq, ws, backend=b),
                                                        rep=60, return_mode="median")
        pick = ops.choose_gemm_backend(M, N, K, aq.dtype, wq.dtype, torch.bfloat16, cublas_available=True)
        say(f"{N},{K},{M},{t['triton']*1e3:.1f},{t['cublas']*1e3:.1f},{pick},{t['triton']/t['cublas']:.3f}")
out.close()
