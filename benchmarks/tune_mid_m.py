"""Development sweep (GPU): 64x128 vs 128x128 (vs 128x64) TMA tiles for M = 80..256, where the grid
is one or two waves short of full; CUDA-graph timing next to bf16 and the current plan().

    python benchmarks/tune_mid_m.py > results/tune-mid-m-<card>-<date>.txt
"""

import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from blockwise_fp8 import ops  # noqa: E402
from blockwise_fp8.kernels import gemm as G  # noqa: E402


def us(fn) -> float:
    return do_bench_cudagraph(fn, rep=40) * 1e3


torch.manual_seed(0)
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
for dt in (torch.float8_e5m2, torch.float8_e4m3fn):
    for M in (80, 128, 192, 256):
        for N, K in ((10240, 8192), (14336, 4096), (8192, 8192), (4096, 4096), (57344, 8192)):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
            wq, ws = ops.quantize_weight(w, dtype=dt)
            aq, as_ = ops.quantize_activation(x, dtype=dt)
            res = {}
            ref = None
            for name, p in (("64x128w4", G.Plan("tma", 64, 128, 4, 4, flatten=True)),
                            ("128x128w8", G.Plan("tma", 128, 128, 8, 4, flatten=False)),
                            ("128x64w4", G.Plan("tma", 128, 64, 4, 5, flatten=True)),
                            ("plan", None)):
                f = lambda: G.gemm(aq, as_, wq, ws, None, torch.bfloat16, plan_override=p)
                o = f()
                ref = o if ref is None else ref
                ok = torch.allclose(o.float(), ref.float(), rtol=2e-2, atol=2e-2)
                res[name] = (us(f), ok)
            tb = us(lambda: F.linear(x, w))
            cur = G.plan(M, N, K, tma=True)
            print(f"{str(dt)[-5:]} M={M:4d} N={N:6d} K={K:5d} bf16 {tb:6.1f} " + " ".join(f"{k} {t:6.1f}{'' if ok else '!'}" for k, (t, ok) in res.items()) + f"  plan={cur.block_m}x{cur.block_n}", flush=True)
