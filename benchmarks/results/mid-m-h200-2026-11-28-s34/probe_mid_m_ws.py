"""Session 34 (run as devrun/probe_mid_m_s34.py; PYTHONPATH=. python THIS OUT.txt 130,160,200,250 10240x8192,...): at M = 129-256, where plan() takes the tma kernel's 64 x 128 tiles, against the ws
kernel's 128 x 128 tiles as _wide_plan gives them (tail split, ring or memory scales by the card's
ring limits) and as _half_card_plan would split them; e5m2, activation in padded storage as linear
writes it; bf16 and cuBLAS e4m3 beside. Self-heat 0.2 s, best of 2 rotated rounds, us."""
import sys
import torch
import torch.nn.functional as F
import triton
from blockwise_fp8 import ops
from blockwise_fp8.kernels import gemm as G, quant
sys.path.insert(0, "benchmarks")
import bench_gemm as B

say = B.results_log(sys.argv[1], "self-heat 0.2 s, best of 2, us; '~' after a time: not allclose to plan's")
ms = [int(v) for v in sys.argv[2].split(",")]
shapes = [tuple(int(v) for v in s.split("x")) for s in sys.argv[3].split(",")]
sms, ring = G._num_sms(0), G.ring_limits(0)
for N, K in shapes:
    g = torch.Generator(device="cuda").manual_seed(N + K)
    w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
    wq, ws = ops.quantize_weight(w16, torch.float8_e5m2)
    wq4, ws4 = ops.quantize_weight(w16, torch.float8_e4m3fn)
    kb = triton.cdiv(K, 128)
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        rows = G.activation_rows(M, True)
        rq, rs = quant.quantize(x, 1, 128, torch.float8_e5m2, rows_multiple_of=rows)
        mq, ms_ = quant.quantize(x, 1, 128, torch.float8_e5m2, scale_m_major=True, rows_multiple_of=rows)
        rq, rs, ms_ = rq[:M], rs[:M], ms_[:M]
        cur = G.plan(M, N, K, tma=True, ws=True, num_sms=sms, scales_in_ring=True, ring=ring, multicast=True)
        wide = G._wide_plan(M, N, kb, ws=True, num_sms=sms, ws192_cost=G.WS192_COST, scales_in_ring=True, ring=ring)
        tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
        half = G._half_card_plan(tiles, kb, sms, True) if 2 * tiles <= sms else None
        t64 = G.Plan("tma", 64, 128, 4, 4, flatten=True, tail_split=G._tail_split(triton.cdiv(M, 64) * triton.cdiv(N, 128), kb, sms))
        sides = {"plan": cur, "tma64": t64, "wide": wide}
        if half is not None and half != wide:
            sides["half"] = half
        fns = {"bf16": lambda: F.linear(x, w16)}
        for name, p in sides.items():
            s = ms_ if p.scales_tma else rs
            fns[name] = (lambda p=p, s=s: G.gemm(rq, s, wq, ws, None, torch.bfloat16, plan_override=p))
        a4, s4 = ops.quantize_activation(x, torch.float8_e4m3fn)
        cs = B.operand_scales(a4, s4, wq4, torch.float8_e4m3fn)["cublas"]
        fns["cublas_e4m3"] = lambda: ops._cublas_gemm(a4, cs, wq4, ws4, None, torch.bfloat16)
        ref = fns["plan"]().float()
        off = {k for k in sides if not torch.allclose(fns[k]().float(), ref, rtol=2e-2, atol=2e-2)}
        best = B.time_contenders(fns, 100, 2, settle=B.self_heat(0.2))
        desc = " ".join(f"{k}={p.kind}{p.block_m}s{p.num_stages}t{p.tail_split}{'r' if p.scales_tma else ''}" for k, p in sides.items())
        say(f"M={M} N={N} K={K} tiles={tiles} {desc} | " + "  ".join(f"{k} {t:.1f}{'~' if k in off else ''}" for k, t in best.items()))
