"""Session 35 (H200): M = 65-128 on weights past the 'other' ring's 64 K blocks, where plan() keeps
the tma kernel's 64-row tiles: against _half_card_plan's ws tiles with scales from memory and in the
ring, and _wide_plan's; e5m2, activation in padded storage; bf16 and cuBLAS e4m3 beside.
Self-heat 0.2 s, best of 2 rotated rounds, us; '~': not allclose to plan's output."""
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
sms, ring = G._num_sms(0), G.card_plans(0)
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
        _, ms_ = quant.quantize(x, 1, 128, torch.float8_e5m2, scale_m_major=True, rows_multiple_of=rows)
        rq, rs, ms_ = rq[:M], rs[:M], ms_[:M]
        n_tiles = triton.cdiv(N, 128)
        sides = {"plan": G.plan(M, N, K, tma=True, ws=True, num_sms=sms, scales_in_ring=True, card=ring, multicast=True),
                 "half_mem": G._half_card_plan(n_tiles, kb, sms, False),
                 "half_ring": G._half_card_plan(n_tiles, kb, sms, True),
                 "wide": G._wide_plan(M, N, kb, ws=True, num_sms=sms, ws192_cost=G.WS192_COST, scales_in_ring=True, card=ring)}
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
        say(f"M={M} N={N} K={K} {desc} | " + "  ".join(f"{k} {t:.1f}{'~' if k in off else ''}" for k, t in best.items()))
