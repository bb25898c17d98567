"""Session 35: the ws kernel on a tight activation (storage of exactly M rows) with gemm_hopper's
pad copy off ("tight") and on ("copy"), against the same rows in padded storage as linear writes
them ("padded"); bit-compare. e5m2/e4m3, bf16 out. Self-heat 0.3 s, best of 2 rotated rounds, us."""
import sys
import torch
from blockwise_fp8 import ops
from blockwise_fp8.kernels import gemm as G, gemm_hopper as H, quant
sys.path.insert(0, "benchmarks")
import bench_gemm as B

say = B.results_log(sys.argv[1], "self-heat 0.3 s, best of 2, us; '!' bits differ from padded")
for cell in sys.argv[2].split(","):
    dname, shape = cell.split(":")
    M, N, K = (int(v) for v in shape.split("x"))
    dt = B.DTYPES[dname]
    g = torch.Generator(device="cuda").manual_seed(M + N + K)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w16 = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
    wq, ws = ops.quantize_weight(w16, dt)
    m_major = G.prefers_m_major_scales(M, N, K, wq)
    rows = G.activation_rows(M, m_major)
    pq, ps = quant.quantize(x, 1, 128, dt, scale_m_major=m_major, rows_multiple_of=rows)
    pq, ps = pq[:M], ps[:M]
    tq = pq.clone()  # tight data; scales as linear writes them (their rows padded)
    p = G.plan(M, N, K, tma=True, ws=True, num_sms=G._num_sms(0), card=G.card_plans(0),
               scales_in_ring=m_major, multicast=True)

    def run(q, copy):
        H.PAD_COPY_MAX_M = 1024 if copy else 0
        try:
            return G.gemm(q, ps, wq, ws, None, torch.bfloat16)
        finally:
            H.PAD_COPY_MAX_M = 1024
    fns = {"tight": lambda: run(tq, False), "copy": lambda: run(tq, True), "padded": lambda: run(pq, True)}
    ref = fns["padded"]()
    same = {k: torch.equal(f(), ref) for k, f in fns.items()}
    best = B.time_contenders(fns, 100, 2, settle=B.self_heat(0.3))
    say(f"{cell} plan={p.kind}{p.block_m}t{p.tail_split}c{p.cluster}r{int(p.scales_tma)} " +
        "  ".join(f"{k} {t:.1f}{'' if same[k] else '!'}" for k, t in best.items()) +
        f"  tight/padded {best['tight'] / best['padded']:.3f} copy/padded {best['copy'] / best['padded']:.3f}")
