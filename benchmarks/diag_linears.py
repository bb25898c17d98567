"""Per-Linear timing at the Llama-3-8B shapes: bf16 F.linear vs ours (linear, quant, gemm), CUDA-graph replay."""
import torch, torch.nn.functional as F
from triton.testing import do_bench_cudagraph
from blockwise_fp8 import ops
from blockwise_fp8.kernels import quant, gemm as gk
torch.manual_seed(0)
shapes = {"qkv_q":(4096,4096),"k":(1024,4096),"o":(4096,4096),"gate":(14336,4096),"down":(4096,14336)}
print(f"{'name':6s} {'M':>5s} {'bf16':>8s} {'linear':>8s} {'quant':>8s} {'gemm':>8s} {'x':>6s}  plan")
for M in (1, 16, 2048):
    for name,(N,K) in shapes.items():
        x = torch.randn(M,K,device="cuda",dtype=torch.bfloat16)
        w = torch.randn(N,K,device="cuda",dtype=torch.bfloat16)/K**0.5
        wq, ws = ops.quantize_weight(w)
        aq, as_ = ops.quantize_activation(x)
        t_b = do_bench_cudagraph(lambda: F.linear(x,w))*1e3
        t_l = do_bench_cudagraph(lambda: ops.linear(x,wq,ws))*1e3
        t_q = do_bench_cudagraph(lambda: quant.quantize(x,1,128,torch.float8_e4m3fn))*1e3
        t_g = do_bench_cudagraph(lambda: ops.gemm(aq,as_,wq,ws))*1e3
        p = gk.plan(M,N,K,tma=True)
        print(f"{name:6s} {M:5d} {t_b:8.1f} {t_l:8.1f} {t_q:8.1f} {t_g:8.1f} {t_b/t_l:6.2f}  {p}", flush=True)
