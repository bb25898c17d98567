"""Host time of each layer above our launchers: back-to-back mean / synchronized median per call.

    PYTHONPATH=. python benchmarks/host_layers.py OUT.txt

M = 64, N = K = 4096. The same rows twice: with the real launchers, then with ``ops._cublas_gemm``,
``kernels.gemm.gemm`` and ``kernels.quant.quantize`` stubbed to return preallocated results (the
wrapper layers alone on this host), then a torch.profiler table of one eager linear. Session 12:
results/host-layers-h100-2026-11-27-s12-{before,after}.txt (before/after kernels/launch.py).
"""
import sys
import torch, torch.nn.functional as F
from blockwise_fp8 import ops
from blockwise_fp8.kernels import gemm as G, quant as Q
from host_timing import back_to_back_us as b2b, issue_us

out = open(sys.argv[1], "w")
def say(s=""):
    print(s, flush=True)
    out.write(s + "\n")
M, N, K = 64, 4096, 4096
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
wq, ws = ops.quantize_weight(w)
aq, as_ = ops.quantize_activation(x)
_, as_m = Q.quantize(x, 1, 128, torch.float8_e4m3fn, scale_m_major=True)
pre = torch.empty((M, N), dtype=torch.bfloat16, device="cuda")
FS = F.ScalingType
rows = {
    "F.linear bf16": lambda: F.linear(x, w),
    "torch._scaled_mm": lambda: torch._scaled_mm(aq, wq.t(), as_m, ws.t(), out_dtype=torch.bfloat16),
    "F.scaled_mm": lambda: F.scaled_mm(aq, wq.t(), as_m, FS.BlockWise1x128, ws.t(), FS.BlockWise128x128, output_dtype=torch.bfloat16),
    "ops._cublas_gemm": lambda: ops._cublas_gemm(aq, as_m, wq, ws, None, torch.bfloat16),
    "_gemm_op.op (dispatcher+body) cublas": lambda: ops._gemm_op.op(aq, as_m, wq, ws, None, torch.bfloat16, "cublas"),
    "_gemm_op (wrapper) cublas": lambda: ops._gemm_op(aq, as_m, wq, ws, None, torch.bfloat16, "cublas"),
    "ops.gemm(cublas)": lambda: ops.gemm(aq, as_m, wq, ws, backend="cublas"),
    "with torch.cuda.device(dev)": lambda: torch.cuda.device(aq.device).__enter__(),
    "ops.resolve_backend": lambda: ops.resolve_backend("auto", aq.device, op="gemm"),
    "ops.cublas_blockwise_available": lambda: ops.cublas_blockwise_available(aq.device),
    "kernels.gemm (tma)": lambda: G.gemm(aq, as_, wq, ws, None, torch.bfloat16),
    "ops.gemm(triton)": lambda: ops.gemm(aq, as_, wq, ws, backend="triton"),
    "quant.quantize": lambda: Q.quantize(x, 1, 128, torch.float8_e4m3fn),
    "ops.quantize_activation": lambda: ops.quantize_activation(x),
    "ops.linear(triton)": lambda: ops.linear(x, wq, ws, backend="triton"),
    "ops.linear(cublas)": lambda: ops.linear(x, wq, ws, backend="cublas"),
}
say(f"{torch.cuda.get_device_name()} torch {torch.__version__}; M={M} N={N} K={K}; host us: back-to-back mean / sync-before median")
def table(tag):
    say(f"## {tag}")
    for name, fn in rows.items():
        try:
            say(f"  {name:40s} {b2b(fn):8.1f} {issue_us(fn, 200):8.1f}")
        except Exception as e:
            say(f"  {name:40s} failed {type(e).__name__}: {str(e)[:100]}")
table("real")
real_cublas, real_gemm, real_quant = ops._cublas_gemm, G.gemm, Q.quantize
ops._cublas_gemm = lambda *a: pre
G.gemm = lambda *a, **k: pre
qa = (aq, as_)
Q.quantize = lambda *a, **k: qa
table("launchers stubbed (ops._cublas_gemm, kernels.gemm, quant.quantize return preallocated results)")
ops._cublas_gemm, G.gemm, Q.quantize = real_cublas, real_gemm, real_quant
# the torch profiler's view of one eager linear, CPU side
from torch.profiler import profile, ProfilerActivity
for _ in range(20): ops.linear(x, wq, ws, backend="triton")
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(50): ops.linear(x, wq, ws, backend="triton")
    torch.cuda.synchronize()
say(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
out.close()
