"""Session 33: is a ragged M slow because of partially out-of-bounds TMA boxes? Same GEMM on the
activation padded with zero rows to a multiple of 64 / 128 (output rows sliced), against the plan
on the ragged M, and cuBLAS. Bit-compare out[:M]."""
import sys
import torch
from blockwise_fp8 import ops
from blockwise_fp8.kernels import gemm as G
sys.path.insert(0, "benchmarks")
import bench_gemm as B

say = B.results_log(sys.argv[1], "self-heat 0.3 s, best of 2, us")
cells = sys.argv[2].split(",")
for cell in cells:
    dname, M, N, K = cell.split(":")[0], *(int(v) for v in cell.split(":")[1].split("x"))
    dt = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[dname]
    g = torch.Generator(device="cuda").manual_seed(M + N + K)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
    wq, ws = ops.quantize_weight(w16, dt)
    fns, outs, plans = {}, {}, {}
    for name, mult in (("plan", 1), ("pad64", 64), ("pad128", 128)):
        Mp = -(-M // mult) * mult
        xp = torch.zeros(Mp, K, device="cuda", dtype=torch.bfloat16)
        xp[:M] = x
        aq, as_ = ops.quantize_activation(xp, dt)
        sc = B.operand_scales(aq, as_, wq, dt)["ours_triton"]
        p = G.plan(Mp, N, K, tma=True, ws=True, num_sms=132, ring=G.ring_limits(0),
                   scales_in_ring=G.prefers_m_major_scales(Mp, N, K, wq), multicast=True)
        plans[name] = f"{p.kind}{p.block_m}t{p.tail_split}c{p.cluster}r{int(p.scales_tma)}"
        fns[name] = lambda aq=aq, sc=sc: G.gemm(aq, sc, wq, ws, None, torch.bfloat16)
        outs[name] = fns[name]()[:M]
        if name == "plan" and dt == torch.float8_e4m3fn:
            cs = B.operand_scales(aq, as_, wq, dt)["cublas"]
            fns["cublas"] = lambda aq=aq, cs=cs: ops._cublas_gemm(aq, cs, wq, ws, None, torch.bfloat16)
    same = {k: torch.equal(outs[k], outs["plan"]) for k in outs}
    best = B.time_contenders(fns, 100, 2, settle=B.self_heat(0.3))
    say(f"{cell} " + "  ".join(f"{k}[{plans.get(k, '')}] {t:.1f}{'' if same.get(k, True) else '!'}" for k, t in best.items()))
