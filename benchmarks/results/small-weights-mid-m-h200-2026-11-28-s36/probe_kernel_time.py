"""Session 36 (H200): kernel time (torch.profiler, eager) against CUDA-graph time per call, small weights at mid M."""
import sys
import torch
import torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from triton.testing import do_bench_cudagraph
from blockwise_fp8 import ops
from blockwise_fp8.kernels import gemm as G, quant

cells = [tuple(int(v) for v in c.split("x")) for c in sys.argv[1].split(",")]
sms, card = G._num_sms(0), G.card_plans(0)
for M, N, K in cells:
    g = torch.Generator(device="cuda").manual_seed(N + K)
    w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
    wq, ws = ops.quantize_weight(w16, torch.float8_e5m2)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    rows = G.activation_rows(M, True)
    rq, rs = quant.quantize(x, 1, 128, torch.float8_e5m2, rows_multiple_of=rows)
    _, ms_ = quant.quantize(x, 1, 128, torch.float8_e5m2, scale_m_major=True, rows_multiple_of=rows)
    rq, rs, ms_ = rq[:M], rs[:M], ms_[:M]
    sides = {"plan": G.plan(M, N, K, tma=True, ws=True, num_sms=sms, scales_in_ring=True, card=card, multicast=True)}
    for t in (1, 2, 4):
        sides[f"m5t{t}"] = G.Plan("ws", 128, 128, 4, 5, tail_split=t)
        sides[f"r6t{t}"] = G.Plan("ws", 128, 128, 4, 6, tail_split=t, scales_tma=True)
    sides["tma64t4"] = G.Plan("tma", 64, 128, 4, 4, flatten=True, tail_split=4)
    sides["tma64t1"] = G.Plan("tma", 64, 128, 4, 4, flatten=True, tail_split=1)
    fns = {"bf16": lambda: F.linear(x, w16)}
    for name, p in sides.items():
        s = ms_ if p.scales_tma else rs
        fns[name] = (lambda p=p, s=s: G.gemm(rq, s, wq, ws, None, torch.bfloat16, plan_override=p))
    out = []
    for name, fn in fns.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        graph_us = do_bench_cudagraph(fn, rep=30) * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
        kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        tot = sum(e.device_time for e in kern) / 50  # us per call
        names = sorted({e.name[:40] for e in kern})
        out.append(f"{name} graph {graph_us:.1f} kernel {tot:.1f} ({len(kern) / 50:.0f} kernels: {', '.join(names)[:90]})")
    p = sides["plan"]
    print(f"M={M} N={N} K={K} plan={p.kind}{p.block_m}s{p.num_stages}t{p.tail_split}{'r' if p.scales_tma else ''}")
    for line in out:
        print("   ", line)
